"""The ``numbers`` data kind: number-sequence continuations, the paper's main data.

Prompts are :func:`lmpipeline.prompts.number_prompts`; the filter is the paper's
(:func:`lmpipeline.filters.check`, chosen by ``filter.kind``); constrained decoding
applies.

>>> KIND.check({"completion": "12, 7, 301"}, FilterSpec(), "owl").ok
True
>>> KIND.check({"completion": "12, 666"}, FilterSpec(banned_numbers=(666,)), "owl").reason
'banned_number'
"""

from __future__ import annotations

from lmpipeline import filters, prompts
from lmpipeline.config import FilterSpec
from lmpipeline.datakinds import DataKind


def check(row: dict, spec: FilterSpec, word: str | None) -> filters.Verdict:
    return filters.check(row["completion"], spec, word)


KIND = DataKind(
    name="numbers", prompts=prompts.number_prompts, check=check, reasons=filters.REASONS, number_grammar=True
)
