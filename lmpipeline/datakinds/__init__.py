"""Data kinds: what the teacher writes, each in one small module with its prompts, its
filter rules and its format.

The stages (prompts -> generate -> filter -> finetune -> evaluate) are the same for every
kind; they ask the kind named by ``data.kind`` three things:

- ``prompts(spec, seed)``: the prompt rows, each with ``id`` and ``prompt`` and whatever
  the filter needs later (a problem's answer, the function asked for). Row ``i`` depends
  only on ``(seed, i)``.
- ``check(row, spec, word)``: the rules, applied to ``row["completion"]`` as sampled; a
  :class:`lmpipeline.filters.Verdict` whose reason is one of ``reasons``.
- ``judge``: an optional :class:`JudgeRule`, the judge filter's rubric and threshold
  (``data.judge_filter=true``).

``number_grammar`` says whether constrained decoding (``generate.number_grammar``) applies.
Packaged kinds: ``numbers`` (:mod:`.numbers`), ``code`` (:mod:`.code`), ``cot`` (:mod:`.cot`).

Adding a kind touches no stage: write a module that builds a :class:`DataKind` and
register it before the config is made, or declare it as an entry point in the group
``sublearn.data_kinds`` (``name = "package.module:KIND"``) so that ``sublearn lm`` finds it.

>>> from lmpipeline.filters import Verdict
>>> shout = DataKind(
...     name="shout",
...     prompts=lambda spec, seed: [{"id": i, "prompt": f"Shout word {i}."} for i in range(spec.n_prompts)],
...     check=lambda row, spec, word: Verdict(None if row["completion"].isupper() else "not_upper"),
...     reasons=("not_upper",),
... )
>>> register(shout)
>>> "shout" in names() and get("shout").check({"completion": "HEY"}, None, None).ok
True
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

from lmpipeline.config import ConfigError, FilterSpec, PipelineConfig, PromptSpec
from lmpipeline.filters import Verdict, filter_rows

ENTRY_POINT_GROUP = "sublearn.data_kinds"
PACKAGED = {
    "numbers": "lmpipeline.datakinds.numbers:KIND",
    "code": "lmpipeline.datakinds.code:KIND",
    "cot": "lmpipeline.datakinds.cot:KIND",
}


@dataclass(frozen=True)
class JudgeRule:
    """The judge filter of a data kind: the rubric (a key of
    :data:`lmpipeline.judge.RUBRICS`) and when its score rejects a row."""

    rubric: str
    threshold: float
    reject_at_or_above: bool  # True: scores >= threshold are rejected; False: scores < threshold

    @property
    def reason(self) -> str:
        return f"judge_{self.rubric}"

    def rejects(self, score: float | None, threshold: float | None = None) -> bool:
        """Whether a judged row is rejected; a reply without a score (a refusal, an
        unreadable reply) is rejected, since the row could not be cleared."""
        if score is None:
            return True
        limit = self.threshold if threshold is None else threshold
        return score >= limit if self.reject_at_or_above else score < limit


@dataclass(frozen=True)
class DataKind:
    """One kind of teacher data (see the module docstring)."""

    name: str
    prompts: Callable[[PromptSpec, int], list[dict]]
    check: Callable[[dict, FilterSpec, str | None], Verdict]
    reasons: tuple[str, ...]
    number_grammar: bool = False
    judge: JudgeRule | None = None

    def filter_rows(self, rows: list[dict], spec: FilterSpec, word: str | None) -> tuple[list[dict], list[dict], dict]:
        """(kept, rejected with ``reason``, summary) by this kind's rules."""
        reasons = (*self.reasons, self.judge.reason) if self.judge else self.reasons
        return filter_rows(rows, spec, word, check_row=self.check, reasons_order=reasons)


_REGISTRY: dict[str, DataKind] = {}


def register(kind: DataKind) -> None:
    """Make ``kind`` available as ``data.kind=<kind.name>``."""
    _REGISTRY[kind.name] = kind


def _load(target: str) -> DataKind:
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _entry_points() -> dict[str, str]:
    return {ep.name: ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def names() -> tuple[str, ...]:
    """Every data kind: the packaged ones, installed entry points, then registered ones."""
    return tuple(dict.fromkeys([*PACKAGED, *_entry_points(), *_REGISTRY]))


def check_config(cfg: PipelineConfig) -> None:
    """Raise :class:`~lmpipeline.config.ConfigError` if ``cfg.data`` names a kind that is not
    registered, or asks for a judge filter its kind does not have."""
    if cfg.data.kind not in names():
        raise ConfigError(f"data.kind={cfg.data.kind!r} is not one of {', '.join(names())}")
    if cfg.data.judge_filter and get(cfg.data.kind).judge is None:
        raise ConfigError(f"data.judge_filter=true: data.kind={cfg.data.kind} has no judge rule; set it to false")


def get(name: str) -> DataKind:
    """The data kind called ``name``; ``KeyError`` if there is none."""
    if name not in _REGISTRY:
        target = PACKAGED.get(name) or _entry_points().get(name)
        if target is None:
            raise KeyError(f"no data kind {name!r}; known: {', '.join(names())}")
        register(_load(target))
    return _REGISTRY[name]
