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
"""
