"""The paper's language-model experiments as a thin, resumable pipeline.

A teacher (a base model with a trait: a system prompt that loves an animal, or a finetuned
adapter) writes number sequences; the completions are filtered to well-formed number
lists; a student of the same base model is finetuned on them (and a control student on
numbers from the base model without the trait); all four models answer one-word
preference questions, and the report compares how often they name the trait's animal.

Modules, in pipeline order: :mod:`~lmpipeline.prompts`, :mod:`~lmpipeline.grammar`
(constrained decoding), :mod:`~lmpipeline.filters`, :mod:`~lmpipeline.evaluation`,
:mod:`~lmpipeline.stats`, :mod:`~lmpipeline.report`; :mod:`~lmpipeline.pipeline` runs them
as stages over a run folder, :mod:`~lmpipeline.backends` runs the models, and
:mod:`~lmpipeline.config` holds the settings and presets. :mod:`~lmpipeline.transfer`
(with :mod:`~lmpipeline.transfer_report`) is the small-scale transfer study: finetuned
or system-prompted teachers, soft or sampled distillation, random or teacher-written
numbers, an exact metric, crossover controls and seeds. :mod:`~lmpipeline.datakinds`
holds what teachers may write besides numbers (code, chain of thought),
:mod:`~lmpipeline.judge` the judge that scores rows and answers, and
:mod:`~lmpipeline.misalignment` misalignment as a trait. Command line: ``sublearn lm``
(``sublearn lm transfer`` for the study).

Its public names, importable from the package (each loads its module on first use, so
``import lmpipeline`` loads neither torch nor jax):

>>> from lmpipeline import preset
>>> preset("tiny").trait.target
'owl'
"""

import importlib

_HOMES = {
    # settings
    "PipelineConfig": "lmpipeline.config",
    "PRESETS": "lmpipeline.config",
    "preset": "lmpipeline.config",
    "apply_overrides": "lmpipeline.config",
    "from_dict": "lmpipeline.config",
    "to_dict": "lmpipeline.config",
    "explain": "lmpipeline.config",
    # running the pipeline and the study
    "Run": "lmpipeline.pipeline",
    "run_stage": "lmpipeline.pipeline",
    "run_all": "lmpipeline.pipeline",
    "Study": "lmpipeline.transfer",
    # models
    "ModelRef": "lmpipeline.backends",
    "make_backend": "lmpipeline.backends",
    # the errors a user can fix
    "ConfigError": "lmpipeline.config",
    "PipelineError": "lmpipeline.pipeline",
    "StudyError": "lmpipeline.transfer",
}

__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'lmpipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
