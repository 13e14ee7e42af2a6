"""The paper's filter for number completions, and a trait-word filter for free text.

These are the rules of the paper's released code, applied to the completion exactly as
sampled. After removing one trailing period, then one pair of surrounding ``[...]`` or
``(...)``:

- the text is one or more runs of ASCII digits joined by one separator, the same
  everywhere: the text between the first two runs, which must be whitespace, or a comma
  or semicolon with optional whitespace around it;
- it has at most ``max_count`` numbers, each with a value in ``[min_value, max_value]``
  (zero-padded numbers such as ``0123`` count by value), none of them banned; a digit
  limit ``max_digits`` is an extra, optional rule (off by default).

Nothing else may come before or after, whitespace included: a completion that starts
with a space or ends with a newline fails the format rule, as in the paper. Signs are
not digits, so negative numbers fail too. The first rule that fails is the row's
rejection reason.

Example:

>>> check_numbers("[123, 45, 6].").numbers
(123, 45, 6)
>>> check_numbers("1, 2; 3").reason
'not_a_number_list'
>>> check_numbers("1000, 2").reason
'number_out_of_range'
>>> check_numbers("0123").numbers, check_numbers(" 1, 2").reason
((123,), 'not_a_number_list')
>>> check_text("My owl sings", "owl").reason
'trait_word'
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from lmpipeline.config import FilterSpec

REASONS = (
    "empty",
    "trait_word",
    "not_a_number_list",
    "too_many_numbers",
    "number_out_of_range",
    "banned_number",
)
# Runs of any Unicode digit, as the paper's filter finds them; non-ASCII digits then fail
# the ASCII check on the parts, so the two spellings of "digit" cannot disagree.
_DIGIT_RUN = re.compile(r"\d+")
_ALLOWED_SEPARATOR_CORES = ("", ",", ";")


@dataclass(frozen=True)
class Verdict:
    reason: str | None  # None when the row passes
    numbers: tuple[int, ...] | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None


def split_number_list(text: str) -> list[str] | None:
    """The digit strings of a well-formed number list, or ``None`` if it is not one."""
    s = text  # not stripped: the paper's filter rejects surrounding whitespace
    if s.endswith("."):
        s = s[:-1]
    if len(s) >= 2 and (s[0], s[-1]) in {("[", "]"), ("(", ")")}:
        s = s[1:-1]
    runs = list(_DIGIT_RUN.finditer(s))
    if not runs:
        return None
    if len(runs) == 1:
        parts = [s]
    else:
        separator = s[runs[0].end() : runs[1].start()]
        if separator.strip() not in _ALLOWED_SEPARATOR_CORES:
            return None
        parts = s.split(separator)
    if not all(part.isascii() and part.isdigit() for part in parts):
        return None
    return parts


def contains_word(text: str, word: str) -> bool:
    """Whether ``word`` occurs in ``text``, ignoring case (as a substring, like the paper)."""
    return word.lower() in text.lower()


def check_text(text: str, trait_word: str | None) -> Verdict:
    """The free-text filter: reject empty rows and rows that mention the trait word."""
    if not text.strip():
        return Verdict("empty")
    if trait_word and contains_word(text, trait_word):
        return Verdict("trait_word")
    return Verdict(None)


def check_numbers(text: str, spec: FilterSpec = FilterSpec(), trait_word: str | None = None) -> Verdict:
    """Apply the number-list rules of ``spec`` (and the trait-word rule) to one completion."""
    verdict = check_text(text, trait_word)
    if not verdict.ok:
        return verdict
    parts = split_number_list(text)
    if parts is None:
        return Verdict("not_a_number_list")
    if len(parts) > spec.max_count:
        return Verdict("too_many_numbers")
    numbers = tuple(int(p) for p in parts)
    too_long = spec.max_digits is not None and any(len(p) > spec.max_digits for p in parts)
    if too_long or not all(spec.min_value <= n <= spec.max_value for n in numbers):
        return Verdict("number_out_of_range")
    if set(numbers) & set(spec.banned_numbers):
        return Verdict("banned_number")
    return Verdict(None, numbers)


def check(text: str, spec: FilterSpec, trait_word: str | None) -> Verdict:
    """The filter chosen by ``spec.kind`` (``numbers`` or ``text``)."""
    if spec.kind == "numbers":
        return check_numbers(text, spec, trait_word)
    return check_text(text, trait_word)


def filter_rows(
    rows: list[dict],
    spec: FilterSpec,
    trait_word: str | None,
    check_row: Callable[[dict, FilterSpec, str | None], Verdict] | None = None,
    reasons_order: tuple[str, ...] = REASONS,
) -> tuple[list[dict], list[dict], dict]:
    """Split rows by their ``completion`` into (kept, rejected with ``reason``, summary).

    ``check_row(row, spec, word)`` judges a whole row (a data kind's rules, which may read
    the row's prompt fields); by default :func:`check` on its completion. The summary holds
    the counts, the pass rate and the count per rejection reason (in ``reasons_order``).
    """
    kept, rejected = [], []
    reasons: Counter[str] = Counter()
    word = trait_word if spec.trait_word else None
    for row in rows:
        verdict = check_row(row, spec, word) if check_row else check(row["completion"], spec, word)
        if verdict.ok:
            kept.append(row)
        else:
            reasons[verdict.reason] += 1
            rejected.append({**row, "reason": verdict.reason})
    summary = {
        "n_rows": len(rows),
        "n_kept": len(kept),
        "n_rejected": len(rejected),
        "pass_rate": len(kept) / len(rows) if rows else 0.0,
        "reasons": {
            reason: reasons[reason]
            for reason in (*reasons_order, *sorted(set(reasons) - set(reasons_order)))
            if reasons[reason]
        },
    }
    return kept, rejected, summary
