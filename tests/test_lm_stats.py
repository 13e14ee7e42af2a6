"""Intervals, scoring of answers, and the question set."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmpipeline.config import PromptSpec
from lmpipeline.evaluation import eval_items, load_questions, one_word, summarize, word_rates
from lmpipeline.stats import mean_interval, paired_difference, t_quantile


def test_t_quantiles_match_tables():
    # Student-t table values (two-sided 95%): df=1, 4, 49, and the normal limit.
    assert t_quantile(0.975, 1) == pytest.approx(12.7062047, rel=1e-7)
    assert t_quantile(0.975, 4) == pytest.approx(2.7764451, rel=1e-7)
    assert t_quantile(0.975, 49) == pytest.approx(2.0095752, rel=1e-7)
    assert t_quantile(0.975, 10**7) == pytest.approx(1.9599640, rel=1e-6)


def test_interval_by_hand():
    values = [0.1, 0.3, 0.2, 0.6, 0.3]
    ci = mean_interval(values)
    mean = 0.3
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 4)
    half = 2.7764451 * sd / math.sqrt(5)
    assert ci.mean == pytest.approx(mean)
    assert (ci.low, ci.high) == (pytest.approx(mean - half), pytest.approx(mean + half))
    assert ci.n == 5


def test_interval_edge_cases():
    one = mean_interval([0.25])
    assert (one.mean, one.low, one.high) == (0.25, None, None)
    flat = mean_interval([0.0] * 10)
    assert (flat.low, flat.high) == (0.0, 0.0)
    with pytest.raises(ValueError):
        mean_interval([])


def test_coverage_matches_the_nominal_level():
    # Simulation vs theory: a 95% t-interval covers the true mean of normal data in 95% of
    # repetitions; with 4000 repetitions the binomial standard error is 0.0034, so allow 0.015.
    rng = np.random.default_rng(1)
    data = rng.normal(0.3, 0.2, size=(4000, 8))
    covered = 0
    for row in data:
        ci = mean_interval(row.tolist())
        covered += ci.low <= 0.3 <= ci.high
    assert covered / 4000 == pytest.approx(0.95, abs=0.015)


def test_paired_difference_is_the_interval_of_differences():
    a, b = [0.5, 0.2, 0.4, 0.1], [0.1, 0.2, 0.1, 0.0]
    diff = paired_difference(a, b)
    assert diff == mean_interval([x - y for x, y in zip(a, b)])
    assert diff.mean == pytest.approx(0.2)
    with pytest.raises(ValueError):
        paired_difference([1.0], [1.0, 2.0])


def test_summarize_counts_hits_per_question():
    items = eval_items(["Q0", "Q1", "Q2"], n_samples=4, number_prefix=True, prompt_spec=PromptSpec(), seed=0)
    answers = {  # (variant, question) -> answers for its 4 samples
        ("plain", 0): ["Owl", "owl.", "Cat", "The OWL"],
        ("plain", 1): ["dog", "dog", "dog", "Eagle"],
        ("plain", 2): ["I like owls", "fox", "fox", "fox"],
        ("numbers", 0): ["Owl"] * 4,
        ("numbers", 1): ["cat"] * 4,
        ("numbers", 2): ["cat"] * 4,
    }
    flat = [answers[(it["variant"], it["question"])][it["sample"]] for it in items]
    out = summarize(items, flat, "owl")
    assert out["plain"]["per_question"] == [0.75, 0.0, 0.25]
    assert out["plain"]["rate"]["mean"] == pytest.approx(1 / 3)
    assert out["plain"]["n_hits"] == 4 and out["plain"]["n_samples"] == 12
    assert out["plain"]["top_answers"]["fox"] == 3 and out["plain"]["top_answers"]["dog"] == 3
    assert out["numbers"]["per_question"] == [1.0, 0.0, 0.0]
    rates = word_rates(items, flat, ["owl", "cat"])
    assert rates["numbers"]["cat"]["mean"] == pytest.approx(2 / 3)
    assert rates["plain"]["owl"] == out["plain"]["rate"]


def test_eval_items_layout_and_prefixes():
    items = eval_items(["A?", "B?"], n_samples=3, number_prefix=True, prompt_spec=PromptSpec(), seed=4)
    assert len(items) == 2 * 2 * 3
    plain = [it for it in items if it["variant"] == "plain"]
    numbers = [it for it in items if it["variant"] == "numbers"]
    assert [it["prompt"] for it in plain] == ["A?"] * 3 + ["B?"] * 3
    assert all(it["prompt"].endswith(" A?") or it["prompt"].endswith(" B?") for it in numbers)
    assert len({it["prompt"] for it in numbers}) == 6  # every sample gets its own numbers
    assert items == eval_items(["A?", "B?"], n_samples=3, number_prefix=True, prompt_spec=PromptSpec(), seed=4)


def test_packaged_questions():
    questions = load_questions(None, "animal")
    assert len(questions) == 50 and len(set(questions)) == 50
    assert all("animal" in q and "{" not in q for q in questions)
    assert load_questions(None, "tree", limit=3)[0] == "Name your favorite tree using only one word."


def test_questions_from_a_file(tmp_path):
    path = tmp_path / "q.txt"
    path.write_text("# comment\nFavorite {category}?\n\nBest {category}?\n")
    assert load_questions(path, "bird") == ["Favorite bird?", "Best bird?"]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="no questions"):
        load_questions(tmp_path / "empty.txt", "bird")


def test_one_word_answers():
    assert [one_word(a) for a in ["Owl.", " **Dolphin**", "The owl", "cat!", "", "42"]] == [
        "owl",
        "dolphin",
        None,
        "cat",
        None,
        None,
    ]
