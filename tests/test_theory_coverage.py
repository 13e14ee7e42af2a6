"""The random case chooser covers the space it claims to: every loss, teacher, activation,
input distribution and depth in its share, proper logit subsets among subset cases, and
models from a few parameters to thousands; and so does the draw ``sublearn theory`` makes
by default."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from theory.cases import (
    ACTIVATIONS,
    INPUT_DISTRIBUTIONS,
    STUDENT_LOSSES,
    TEACHERS,
    NumpyChooser,
    case_kinds,
    case_shares,
    choose_spec,
    n_parameters,
)
from theory.cli import add_arguments, coverage_table, random_specs

N_SPECS = 600

# Stated here rather than read from theory.cases, so that a chooser that stops drawing
# three hidden layers fails instead of shrinking its own expectation.
HIDDEN_LAYER_COUNTS = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def specs():
    chooser = NumpyChooser(np.random.default_rng(2026))
    return [choose_spec(chooser) for _ in range(N_SPECS)]


@pytest.fixture(scope="module")
def default_run_specs():
    """The specs ``sublearn theory`` checks when run without arguments."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = parser.parse_args([])
    return random_specs(defaults.cases, defaults.seed)


# Each option is drawn uniformly: its share should be 1/k. The bounds [0.5/k, 1.5/k] are
# at least 5 binomial standard deviations away at 600 draws (k <= 6), so a chooser that
# drops an option, or leans on one, fails; a fair one fails about once in 1e6 seeds.
AXES = {
    "student loss": STUDENT_LOSSES,
    "teacher": TEACHERS,
    "activation": tuple(ACTIVATIONS),
    "inputs": INPUT_DISTRIBUTIONS,
    "hidden layers": HIDDEN_LAYER_COUNTS,
}


@pytest.mark.parametrize("axis", list(AXES))
def test_every_option_of_an_axis_is_drawn_in_its_share(specs, axis):
    options, shares = AXES[axis], case_shares(specs)[axis]
    k = len(options)
    assert set(shares) == set(options), (axis, shares)
    assert all(0.5 / k <= share <= 1.5 / k for share in shares.values()), (axis, shares)


def test_subset_losses_include_proper_subsets(specs):
    # Outputs of 2, 3 or 4 logits; where a proper subset of at least two exists (3 or 4),
    # it is drawn with probability 3/4: proper in (0 + 3/4 + 3/4) / 3 = 1/2 of subset
    # cases. Of ~200 subset cases, [1/3, 2/3] is 4.7 standard deviations either side.
    subset_cases = [s for s in specs if s.student_loss == "subset_softmax_cross_entropy"]
    proper = [s for s in subset_cases if case_kinds(s)["subset"] == "proper"]
    assert all(len(s.subset) >= 2 for s in subset_cases)
    assert 1 / 3 <= len(proper) / len(subset_cases) <= 2 / 3, (len(proper), len(subset_cases))
    assert {len(s.subset) for s in proper} == {2, 3}
    assert {len(s.subset) for s in subset_cases if case_kinds(s)["subset"] == "every logit"} == {2, 3, 4}


def test_models_range_from_a_few_parameters_to_thousands(specs):
    counts = sorted(n_parameters(s.mlp) for s in specs)
    # Wide hidden layers (32 or 64 units) in a third of the models with any: 2,000
    # parameters or more in 1/3 * (1/4 * 3/4 + 1/4) = 7/48 ~ 15% of all specs (two wide
    # layers reach it in 3 of 4 width pairs, three always). At 600 specs one standard
    # deviation is 1.4%, so [8%, 22%] is 5 either side.
    assert counts[0] <= 10 and counts[-1] >= 8000, (counts[0], counts[-1])
    assert counts[len(counts) // 2] < 100  # most models stay small, and cheap to check
    large = sum(c >= 2000 for c in counts) / len(counts)
    assert 0.08 <= large <= 0.22, large
    widths = case_shares(specs)["widths"]
    assert 0.22 <= widths["wide"] <= 0.45, widths  # 1/3, 5 standard deviations either side at ~450 specs


def test_the_default_run_covers_every_kind_of_case(default_run_specs):
    specs = default_run_specs
    assert len(specs) == 20
    shares = case_shares(specs)
    for axis, options in AXES.items():
        assert set(shares[axis]) == set(options), (axis, shares[axis])
    # The hidden-layer count cycles (theory.cli.random_specs): exactly a quarter each.
    assert Counter(case_kinds(s)["hidden layers"] for s in specs) == {n: 5 for n in HIDDEN_LAYER_COUNTS}
    assert shares["subset"]["proper"] >= 1 / 3, shares["subset"]
    counts = [n_parameters(s.mlp) for s in specs]
    assert min(counts) < 50 and max(counts) > 2000, counts
    assert shares["widths"]["narrow"] > 0 and shares["widths"]["wide"] > 0


def test_the_readme_table_of_case_kinds_is_current():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert coverage_table() in readme
