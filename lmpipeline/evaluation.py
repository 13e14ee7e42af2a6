"""Evaluation: one-word preference questions, their scoring and per-question rates.

Each question is asked ``n_samples`` times at temperature 1. A sample is a hit when the
target word occurs in the lower-cased answer; a question's rate is its fraction of hits,
and a model's rate is the mean over questions with a 95% t-interval over the question
rates (:func:`sublearn._common.mean_interval`). Variant ``plain`` asks the question alone;
variant ``numbers`` puts a short number sequence before it, a prompt that looks like the
training data.

The exact measure beside the sampled one is :func:`first_word_logprobs`: the probability,
by teacher forcing, that the answer starts with a word in any of its surface forms. The
pipeline's ``P(target)`` and the transfer study's metric are this one function.

Example:

>>> items = eval_items(["Q1?", "Q2?"], n_samples=2, number_prefix=False, prompt_spec=PromptSpec(), seed=0)
>>> [(it["variant"], it["question"], it["sample"]) for it in items]
[('plain', 0, 0), ('plain', 0, 1), ('plain', 1, 0), ('plain', 1, 1)]
>>> summary = summarize(items, ["An owl", "Cat", "owls!", "Dog"], target="owl")
>>> summary["plain"]["per_question"], summary["plain"]["rate"]["mean"]
([0.5, 0.5], 0.5)
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from lmpipeline import prompts
from lmpipeline.backends import Backend, Conversation, ModelRef
from lmpipeline.config import PromptSpec
from lmpipeline.filters import contains_word
from lmpipeline.words import prefix_free, surface_forms
from sublearn._common import mean_interval

VARIANTS = ("plain", "numbers")
_ONE_WORD = re.compile(r"[\W_]*([a-z]+)[\W_]*")


def load_questions(
    path: str | Path | None, category: str, limit: int | None = None, packaged: str = "preference_questions.txt"
) -> list[str]:
    """The first ``limit`` questions (all if None) from ``path`` (or the packaged file, by
    default the 50 evaluation questions), one per line, ``#`` lines skipped, with
    ``{category}`` filled in; ``ValueError`` if there are none, or fewer than ``limit``."""
    if path is None:
        text = resources.files("lmpipeline").joinpath(f"data/{packaged}").read_text(encoding="utf-8")
        where = f"packaged {packaged}"
    else:
        text = Path(path).read_text(encoding="utf-8")
        where = str(path)
    lines = [line.strip() for line in text.splitlines()]
    questions = [line.replace("{category}", category) for line in lines if line and not line.startswith("#")]
    if not questions:
        raise ValueError(f"{where}: no questions found (one per line, '#' starts a comment)")
    if limit is not None and limit > len(questions):
        raise ValueError(
            f"evaluate.n_questions={limit}, but {where} holds {len(questions)} questions: ask for at most "
            f"{len(questions)} (null: all of them), or give evaluate.questions_file with more"
        )
    return questions[:limit]


def eval_items(
    questions: list[str], n_samples: int, number_prefix: bool, prompt_spec: PromptSpec, seed: int
) -> list[dict]:
    """Every (variant, question, sample) to ask, with its user message in ``"prompt"``."""
    items = []
    variants = VARIANTS if number_prefix else VARIANTS[:1]
    for variant in variants:
        for q, question in enumerate(questions):
            for s in range(n_samples):
                prompt = question
                if variant == "numbers":
                    prompt = prompts.number_prefix(prompt_spec, seed, q * n_samples + s) + " " + question
                items.append({"variant": variant, "question": q, "sample": s, "prompt": prompt})
    return items


def one_word(answer: str) -> str | None:
    """The answer's word, lower-cased, if the answer is one word (punctuation aside)."""
    match = _ONE_WORD.fullmatch(answer.strip().lower())
    return match.group(1) if match else None


def per_question_rates(pairs: list[tuple[int, str]], word: str) -> list[float]:
    """Fraction of answers containing ``word``, per question index (sorted by index)."""
    by_q: dict[int, list[bool]] = {}
    for q, answer in pairs:
        by_q.setdefault(q, []).append(contains_word(answer, word))
    return [sum(h) / len(h) for _, h in sorted(by_q.items())]


def _by_variant(items: list[dict], answers: list[str]) -> dict[str, list[tuple[int, str]]]:
    if len(items) != len(answers):
        raise ValueError(f"{len(items)} items but {len(answers)} answers")
    out: dict[str, list[tuple[int, str]]] = {}
    for it, answer in zip(items, answers):
        out.setdefault(it["variant"], []).append((it["question"], answer))
    return out


def summarize(items: list[dict], answers: list[str], target: str, top_k: int = 8) -> dict:
    """Per-variant hit rates (per question, and the mean with its interval) and answer counts."""
    out = {}
    for variant, pairs in _by_variant(items, answers).items():
        per_question = per_question_rates(pairs, target)
        words = Counter(w for w in (one_word(a) for _, a in pairs) if w)
        out[variant] = {
            "rate": mean_interval(per_question).to_dict(),
            "per_question": per_question,
            "n_questions": len(per_question),
            "n_samples": len(pairs),
            "n_hits": sum(contains_word(a, target) for _, a in pairs),
            "n_one_word": sum(words.values()),
            "top_answers": dict(words.most_common(top_k)),  # among one-word answers
        }
    return out


def word_rates(items: list[dict], answers: list[str], words: list[str]) -> dict:
    """For each variant and word: the mean over questions of the fraction of answers with it."""
    return {
        variant: {word: mean_interval(per_question_rates(pairs, word)).to_dict() for word in words}
        for variant, pairs in _by_variant(items, answers).items()
    }


def logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    return top + math.log(math.fsum(math.exp(v - top) for v in values))


def first_word_logprobs(
    backend: Backend, model: ModelRef, conversations: Sequence[Conversation], words: Sequence[str]
) -> dict[str, list[float]]:
    """For each word and conversation, the exact log-probability that the answer starts
    with one of the word's :func:`~lmpipeline.words.surface_forms` (summed over their
    :func:`~lmpipeline.words.prefix_free` token sequences), by teacher forcing; no sampling."""
    forms = {w: surface_forms(w) for w in words}
    flat = sorted({f for fs in forms.values() for f in fs})
    ids = dict(zip(flat, backend.tokenize(model, flat)))
    kept = {w: prefix_free({f: ids[f] for f in fs}) for w, fs in forms.items()}
    pairs = [(c, f) for c in range(len(conversations)) for w in words for f in kept[w]]
    scores = backend.score(model, [conversations[c] for c, _ in pairs], [f for _, f in pairs])
    by_pair = dict(zip(pairs, scores))
    return {w: [logsumexp([by_pair[c, f] for f in kept[w]]) for c in range(len(conversations))] for w in words}
