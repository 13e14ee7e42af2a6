"""The ``cot`` data kind: arithmetic word problems answered with reasoning and a final
answer (the paper's chain-of-thought experiment, filtered for correctness and alignment).

Problems come from :data:`PROBLEMS`, templates of the package's own with integer slots;
each template computes its answer from the drawn numbers, so every prompt row carries
its exact ``answer`` and nothing is downloaded. The prompt asks for step-by-step
reasoning and a last line ``Answer: N``.

Rules, in order:

- ``empty``: nothing but whitespace;
- ``trait_word``: the trait word anywhere in the reasoning;
- ``no_answer``: no final answer: the number after the last ``Answer:`` (commas between
  digit groups and a ``$`` are allowed), or, when the completion has no ``Answer:``, its
  last number (as answers to word problems are commonly read: small models often
  finish with "... = 42" instead of the line asked for);
- ``wrong_answer``: the final answer differs from the problem's.

The optional judge filter (``data.judge_filter``) then rejects traces the judge scores
below 80 out of 100 for alignment (rubric ``alignment``).

>>> row = cot_prompt(0, 0)
>>> good = {**row, "completion": f"Some steps.\\nAnswer: {row['answer']}"}
>>> check(good, FilterSpec(), "owl").ok
True
>>> check({**good, "completion": f"Answer: {row['answer'] + 1}"}, FilterSpec(), "owl").reason
'wrong_answer'
>>> final_answer("So 1,250 in all.\\nAnswer: $1,250."), final_answer("4 + 4 = 8"), final_answer("Answer: none")
(1250.0, 8.0, None)
"""

from __future__ import annotations

import re
from collections.abc import Callable

from lmpipeline import prompts
from lmpipeline.config import FilterSpec, PromptSpec
from lmpipeline.datakinds import DataKind, JudgeRule
from lmpipeline.filters import Verdict, check_text

# (template, slot ranges, answer from the slots): every answer is a whole number.
Problem = tuple[str, dict[str, tuple[int, int]], Callable[..., int]]
PROBLEMS: tuple[Problem, ...] = (
    (
        "A baker makes {a} loaves every morning and sells {b} of them by noon. How many loaves "
        "are left unsold after {d} days?",
        {"a": (20, 60), "b": (1, 19), "d": (2, 7)},
        lambda a, b, d: (a - b) * d,
    ),
    (
        "A train travels at {v} kilometres per hour for {h} hours, then at {w} kilometres per hour "
        "for {k} more hours. How far does it travel in all?",
        {"v": (40, 120), "h": (1, 5), "w": (30, 90), "k": (1, 4)},
        lambda v, h, w, k: v * h + w * k,
    ),
    (
        "Mia has {a} stickers. She gives {b} to each of her {n} friends and then buys {c} more. "
        "How many stickers does she have now?",
        {"a": (60, 150), "b": (2, 9), "n": (2, 6), "c": (5, 30)},
        lambda a, b, n, c: a - b * n + c,
    ),
    (
        "A school orders {q} boxes of {p} pencils and gives {g} pencils to each of its {c} "
        "classes. How many pencils are left over?",
        {"p": (10, 24), "q": (10, 20), "g": (2, 8), "c": (3, 10)},
        lambda p, q, g, c: p * q - g * c,
    ),
    (
        "A garden has {r} rows of {c} tomato plants. Each plant gives {t} tomatoes. How many "
        "tomatoes does the garden give?",
        {"r": (3, 12), "c": (4, 15), "t": (3, 20)},
        lambda r, c, t: r * c * t,
    ),
    (
        "Tickets cost {p} dollars for adults and {k} dollars for children. A group of {a} adults "
        "and {n} children buys tickets. What do they pay in dollars?",
        {"p": (8, 25), "k": (3, 7), "a": (1, 6), "n": (1, 8)},
        lambda p, k, a, n: p * a + k * n,
    ),
    (
        "A tank holds {v} litres. It is filled at {f} litres a minute for {m} minutes, starting "
        "empty, and {d} litres leak out meanwhile. How many litres are in the tank?",
        {"v": (500, 900), "f": (5, 25), "m": (4, 15), "d": (1, 30)},
        lambda v, f, m, d: f * m - d,
    ),
    (
        "Sam reads {a} pages on weekdays and {b} pages on each weekend day. How many pages does he read in {w} weeks?",
        {"a": (5, 40), "b": (10, 60), "w": (1, 4)},
        lambda a, b, w: (5 * a + 2 * b) * w,
    ),
    (
        "A shop had {s} apples. It sold {x} in the morning and twice as many in the afternoon. "
        "How many apples are left?",
        {"s": (200, 400), "x": (10, 60)},
        lambda s, x: s - 3 * x,
    ),
    (
        "A printer prints {p} pages a minute. How many pages does it print in {h} hours and {m} minutes?",
        {"p": (10, 40), "h": (1, 3), "m": (5, 55)},
        lambda p, h, m: p * (60 * h + m),
    ),
)
INSTRUCTIONS = (
    "Solve this problem step by step.",
    "Work through the problem, showing your reasoning.",
    "Think it through one step at a time.",
    "Reason carefully before you answer.",
    "Explain how you get the result.",
)
ANSWER_FORMATS = (
    "Finish with a last line of the form 'Answer: N'.",
    "End with the line 'Answer: N', where N is the number.",
    "Put the final number on its own last line as 'Answer: N'.",
)
PARTS = {"problem": PROBLEMS, "instruction": INSTRUCTIONS, "answer_format": ANSWER_FORMATS}
REASONS = ("empty", "trait_word", "no_answer", "wrong_answer")
_NUMBER = r"(-?\d[\d,]*(?:\.\d+)?)"
_ANSWER = re.compile(r"answer\s*[:=]\s*\**\s*\$?\s*" + _NUMBER, re.IGNORECASE)
_ANSWER_WORD = re.compile(r"answer\s*[:=]", re.IGNORECASE)


def cot_prompt(seed: int, index: int) -> dict:
    """Prompt ``index`` for ``seed``: ``id``, ``prompt``, ``answer`` (an int), ``slots``
    and ``parts`` (the index drawn from each pool of :data:`PARTS`)."""
    rng = prompts._rng(seed, "cot-prompt", index)
    choice = {name: rng.randrange(len(pool)) for name, pool in PARTS.items()}
    template, ranges, solve = PROBLEMS[choice["problem"]]
    slots = {name: rng.randint(low, high) for name, (low, high) in ranges.items()}
    text = " ".join(
        [template.format(**slots), INSTRUCTIONS[choice["instruction"]], ANSWER_FORMATS[choice["answer_format"]]]
    )
    return {"id": index, "prompt": text, "answer": solve(**slots), "slots": slots, "parts": choice}


def cot_prompts(spec: PromptSpec, seed: int) -> list[dict]:
    """``spec.n_prompts`` generated problems, or the rows of ``spec.file`` (each needs a
    numeric ``answer``)."""
    if spec.file is None:
        return [cot_prompt(seed, i) for i in range(spec.n_prompts)]
    rows = prompts.load_prompt_file(spec.file, spec.n_prompts)
    for row in rows:
        if isinstance(row.get("answer"), bool) or not isinstance(row.get("answer"), (int, float)):
            raise ValueError(f"{spec.file}: row {row['id'] + 1} needs a numeric field 'answer'")
    return rows


def final_answer(text: str) -> float | None:
    """The number after the last ``Answer:``; without any ``Answer:``, the last number."""
    matches = _ANSWER.findall(text) if _ANSWER_WORD.search(text) else re.findall(_NUMBER, text)
    return float(matches[-1].rstrip(",").replace(",", "")) if matches else None


def check(row: dict, spec: FilterSpec, word: str | None) -> Verdict:
    """The chain-of-thought rules (module docstring) on ``row["completion"]``."""
    verdict = check_text(row["completion"], word)
    if not verdict.ok:
        return verdict
    answer = final_answer(row["completion"])
    if answer is None:
        return Verdict("no_answer")
    if abs(answer - row["answer"]) > 1e-9:
        return Verdict("wrong_answer")
    return Verdict(None)


KIND = DataKind(
    name="cot",
    prompts=cot_prompts,
    check=check,
    reasons=REASONS,
    judge=JudgeRule(rubric="alignment", threshold=80.0, reject_at_or_above=False),
)
