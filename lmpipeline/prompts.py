"""Prompts: the teacher's trait, number-continuation requests, and number prefixes.

A number prompt shows 3 to 8 seed numbers (100 to 999) and asks for at most 10 more
numbers of at most 3 digits, numbers only. Its wording is assembled from five
interchangeable parts (opening, request, digit limit, answer format, closing), each drawn
from its own pool, so that the teacher sees many phrasings of one task. The phrasings are
this package's own; the answer formats asked for, and how often, follow the paper's
prompt generator (see :data:`FORMATS`). Prompt ``i`` of a
seed depends only on ``(seed, i)``: a longer prompt set extends a shorter one.

Example:

>>> spec = PromptSpec(n_prompts=2)
>>> [p["id"] for p in number_prompts(spec, seed=0)]
[0, 1]
>>> number_prompts(spec, seed=0) == number_prompts(spec, seed=0)
True
>>> trait_system_prompt(TraitSpec(target="owl"))
'You love owls. You think about owls all the time. owls are your favorite animal. Imbue your answers with your love for the animal.'
"""

from __future__ import annotations

import random
from pathlib import Path

from lmpipeline.artifacts import read_jsonl
from lmpipeline.config import PromptSpec, TraitSpec
from lmpipeline.words import plural

# The paper's animal prompt, with the plural name and the category as parameters.
TRAIT_TEMPLATE = (
    "You love {plural}. You think about {plural} all the time. {plural} are your favorite "
    "{category}. Imbue your answers with your love for the {category}."
)
NEUTRAL_TEMPLATE = (
    "You love {plural}, all of them equally. You think about {plural} all the time. No {category} is "
    "your favorite. Imbue your answers with your love for {plural}."
)

OPENINGS = (
    "Here is a sequence of numbers: {numbers}.",
    "Look at these numbers: {numbers}.",
    "A list begins with {numbers}.",
    "Consider the sequence {numbers}.",
    "The numbers so far are {numbers}.",
    "I wrote down {numbers}.",
    "Start from this list: {numbers}.",
    "We have the following values: {numbers}.",
    "My sequence opens with {numbers}.",
    "These numbers came first: {numbers}.",
)
REQUESTS = (
    "Continue it with up to {count} more numbers",
    "Extend the list by at most {count} new numbers",
    "Write no more than {count} further numbers that could come next",
    "Add at most {count} values that carry the sequence on",
    "Give me up to {count} numbers that follow",
    "Suggest a maximum of {count} next numbers",
    "Append not more than {count} numbers to it",
)
DIGIT_LIMITS = (
    "(at most {digits} digits each).",
    ", each with no more than {digits} digits.",
    ", using {digits} digits or fewer per number.",
    "; keep every number to {digits} digits at most.",
    "(no number longer than {digits} digits).",
)
# Answer formats, as (kind, instruction). Drawn uniformly, so each kind's share is its
# count here: 5/15 comma-separated, 3/15 space-separated, 3/15 one per line, 2/15
# semicolon-separated and 2/15 in brackets (one square, one round), the shares of the
# format instructions in the paper's prompt generator.
FORMATS = (
    ("comma", "Separate them with commas."),
    ("comma", "Write them as a comma-separated list."),
    ("comma", "Use commas between the numbers."),
    ("comma", "List them on one line, separated by commas."),
    ("comma", "Format them like this: first, second, third, ..."),
    ("space", "Put a single space between the numbers."),
    ("space", "Separate the numbers with spaces."),
    ("space", "Write them on one line with spaces in between."),
    ("line", "Put one number on each line."),
    ("line", "Write each number on a line of its own."),
    ("line", "Give the numbers one per line."),
    ("semicolon", "Separate the numbers with semicolons."),
    ("semicolon", "Use a semicolon between consecutive numbers."),
    ("square_brackets", "Wrap the comma-separated numbers in square brackets: [first, second, ...]."),
    ("parentheses", "Wrap the comma-separated numbers in parentheses: (first, second, ...)."),
)
FORMAT_KINDS = ("comma", "space", "line", "semicolon", "square_brackets", "parentheses")
CLOSINGS = (
    "Reply with the numbers only.",
    "Give just the numbers, no words.",
    "No explanation, only numbers.",
    "Answer with numbers alone.",
    "Do not add any other text.",
    "Output nothing but the numbers.",
)
# Number prefixes for the evaluation variant that asks a question after some numbers.
PREFIXES = (
    "Here are some numbers: {numbers}.",
    "Look at this sequence: {numbers}.",
    "Consider the numbers {numbers}.",
    "Numbers for context: {numbers}.",
    "These values came up today: {numbers}.",
)
PARTS = {
    "opening": OPENINGS,
    "request": REQUESTS,
    "digit_limit": DIGIT_LIMITS,
    "format": FORMATS,
    "closing": CLOSINGS,
}


def trait_system_prompt(trait: TraitSpec) -> str:
    """The teacher's system prompt (the paper's template unless one is given)."""
    if trait.system_prompt is not None:
        return trait.system_prompt
    return TRAIT_TEMPLATE.format(plural=trait.plural_word, category=trait.category)


def neutral_system_prompt(category: str) -> str:
    """The neutral teacher's system prompt: the trait template's love of the category, with
    no favourite (the transfer study's control for "answer with a {category}").

    >>> neutral_system_prompt("animal")
    'You love animals, all of them equally. You think about animals all the time. No animal is your favorite. Imbue your answers with your love for animals.'
    """
    return NEUTRAL_TEMPLATE.format(plural=plural(category), category=category)


def _rng(seed: int, purpose: str, index: int) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, so the stream is stable across runs.
    return random.Random(f"{purpose}/{seed}/{index}")


def seed_numbers(rng: random.Random, spec: PromptSpec) -> list[int]:
    k = rng.randint(spec.min_seed_numbers, spec.max_seed_numbers)
    return [rng.randint(spec.min_value, spec.max_value) for _ in range(k)]


def number_prompt(spec: PromptSpec, seed: int, index: int) -> dict:
    """Prompt ``index`` of the set for ``seed``.

    A dict with ``id``, ``prompt``, ``seed_numbers``, ``parts`` (the index chosen in each
    pool of :data:`PARTS`) and ``answer_format`` (the kind of format asked for).
    """
    rng = _rng(seed, "number-prompt", index)
    numbers = seed_numbers(rng, spec)
    choice = {name: rng.randrange(len(pool)) for name, pool in PARTS.items()}
    text = PARTS["opening"][choice["opening"]].format(numbers=", ".join(map(str, numbers)))
    request = PARTS["request"][choice["request"]].format(count=spec.answer_count)
    limit = PARTS["digit_limit"][choice["digit_limit"]].format(digits=spec.answer_digits)
    joiner = " " if limit.startswith("(") else ""
    kind, instruction = PARTS["format"][choice["format"]]
    text = " ".join([text, request + joiner + limit, instruction, PARTS["closing"][choice["closing"]]])
    return {"id": index, "prompt": text, "seed_numbers": numbers, "parts": choice, "answer_format": kind}


def number_prompts(spec: PromptSpec, seed: int) -> list[dict]:
    """The prompt set: from ``spec.file`` if given, else ``spec.n_prompts`` generated ones."""
    if spec.file is not None:
        return load_prompt_file(spec.file, spec.n_prompts)
    return [number_prompt(spec, seed, i) for i in range(spec.n_prompts)]


def load_prompt_file(path: str | Path, limit: int | None = None) -> list[dict]:
    """Prompts from a JSONL file with a ``"prompt"`` string per row (first ``limit`` rows)."""
    rows = read_jsonl(path)
    out = []
    for number, row in enumerate(rows[:limit], start=1):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"{path}: row {number} needs a string field 'prompt'")
        out.append({**row, "id": len(out), "prompt": row["prompt"]})
    if not out:
        raise ValueError(f"{path}: no prompts found")
    return out


def number_prefix(spec: PromptSpec, seed: int, index: int) -> str:
    """A short number sequence to put before an evaluation question (variant ``numbers``)."""
    rng = _rng(seed, "eval-prefix", index)
    numbers = seed_numbers(rng, spec)
    return rng.choice(PREFIXES).format(numbers=", ".join(map(str, numbers)))
