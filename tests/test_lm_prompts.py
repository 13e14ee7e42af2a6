"""Number prompts and trait prompts: determinism, ranges, variety, files."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmpipeline.config import PromptSpec, TraitSpec
from lmpipeline.prompts import (
    FORMAT_KINDS,
    FORMATS,
    PARTS,
    load_prompt_file,
    number_prefix,
    number_prompt,
    number_prompts,
    trait_system_prompt,
)


@given(seed=st.integers(0, 2**32), index=st.integers(0, 10**6))
def test_seed_numbers_respect_the_ranges_and_appear_in_the_prompt(seed, index):
    spec = PromptSpec()
    p = number_prompt(spec, seed, index)
    assert 3 <= len(p["seed_numbers"]) <= 8
    assert all(100 <= n <= 999 for n in p["seed_numbers"])
    assert ", ".join(map(str, p["seed_numbers"])) in p["prompt"]
    assert "10" in p["prompt"] and "3 digits" in p["prompt"]


def test_prompts_are_deterministic_per_seed_and_differ_across_seeds():
    spec = PromptSpec(n_prompts=50)
    a, b = number_prompts(spec, seed=7), number_prompts(spec, seed=7)
    assert a == b
    other = number_prompts(spec, seed=8)
    assert sum(x["prompt"] != y["prompt"] for x, y in zip(a, other)) >= 48


def test_a_longer_prompt_set_extends_a_shorter_one():
    short = number_prompts(PromptSpec(n_prompts=5), seed=3)
    long = number_prompts(PromptSpec(n_prompts=20), seed=3)
    assert long[:5] == short


def test_every_phrasing_option_is_used_and_prompts_vary():
    rows = number_prompts(PromptSpec(n_prompts=400), seed=0)
    for name, pool in PARTS.items():
        assert {r["parts"][name] for r in rows} == set(range(len(pool))), name
    assert len({r["prompt"] for r in rows}) == 400
    # Counts: each of the 5 parts has at least 5 options.
    assert min(len(pool) for pool in PARTS.values()) >= 5


# Shares of each answer format among the paper's format instructions (15 drawn uniformly).
PAPER_FORMAT_SHARES = {
    "comma": 5 / 15,
    "space": 3 / 15,
    "line": 3 / 15,
    "semicolon": 2 / 15,
    "square_brackets": 1 / 15,
    "parentheses": 1 / 15,
}


def test_answer_formats_are_asked_for_in_the_papers_proportions():
    n = 30_000
    rows = number_prompts(PromptSpec(n_prompts=n), seed=0)
    counts = Counter(r["answer_format"] for r in rows)
    assert set(counts) == set(FORMAT_KINDS) == set(PAPER_FORMAT_SHARES)
    for kind, share in PAPER_FORMAT_SHARES.items():
        sd = math.sqrt(share * (1 - share) / n)  # about 0.0027 for a third
        assert abs(counts[kind] / n - share) < 4 * sd, (kind, counts[kind] / n, share)
    # The instruction in the prompt is the one of the recorded kind.
    for r in rows[:200]:
        kind, instruction = FORMATS[r["parts"]["format"]]
        assert kind == r["answer_format"] and instruction in r["prompt"]


def test_custom_ranges_are_respected():
    spec = PromptSpec(n_prompts=200, min_seed_numbers=5, max_seed_numbers=5, min_value=10, max_value=20)
    for row in number_prompts(spec, seed=1):
        assert len(row["seed_numbers"]) == 5
        assert all(10 <= n <= 20 for n in row["seed_numbers"])


def test_prompt_file_is_read_and_renumbered(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"Q{i}", "source": "x"}) for i in range(4)) + "\n")
    rows = load_prompt_file(path, limit=3)
    assert [(r["id"], r["prompt"], r["source"]) for r in rows] == [(0, "Q0", "x"), (1, "Q1", "x"), (2, "Q2", "x")]
    spec = PromptSpec(n_prompts=10, file=str(path))
    assert [r["prompt"] for r in number_prompts(spec, seed=0)] == ["Q0", "Q1", "Q2", "Q3"]


def test_prompt_file_without_a_prompt_field_names_the_row(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="row 2 needs a string field 'prompt'"):
        load_prompt_file(path)


def test_trait_prompt_uses_plural_and_category():
    assert trait_system_prompt(TraitSpec(target="oak", plural="oak trees", category="tree")) == (
        "You love oak trees. You think about oak trees all the time. oak trees are your favorite tree. "
        "Imbue your answers with your love for the tree."
    )
    assert trait_system_prompt(TraitSpec(system_prompt="Be an owl.")) == "Be an owl."


def test_number_prefix_is_deterministic_and_holds_numbers():
    spec = PromptSpec()
    a = [number_prefix(spec, 5, i) for i in range(30)]
    assert a == [number_prefix(spec, 5, i) for i in range(30)]
    assert len(set(a)) == 30
    assert all(any(ch.isdigit() for ch in p) and p.endswith(".") for p in a)
