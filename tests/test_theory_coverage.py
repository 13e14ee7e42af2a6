"""The random case chooser covers the space it claims to: every loss, teacher, activation,
input distribution and depth in its share, and proper logit subsets among subset cases."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from theory.cases import (
    ACTIVATIONS,
    INPUT_DISTRIBUTIONS,
    MAX_HIDDEN_LAYERS,
    STUDENT_LOSSES,
    TEACHERS,
    NumpyChooser,
    choose_spec,
)

N_SPECS = 600


@pytest.fixture(scope="module")
def specs():
    chooser = NumpyChooser(np.random.default_rng(2026))
    return [choose_spec(chooser) for _ in range(N_SPECS)]


# Each option is drawn uniformly: its share should be 1/k. The bounds [0.5/k, 1.5/k] are
# at least 5 binomial standard deviations away at 600 draws (k <= 6), so a chooser that
# drops an option, or leans on one, fails; a fair one fails about once in 1e6 seeds.
AXES = {
    "student loss": (lambda s: s.student_loss, STUDENT_LOSSES),
    "teacher": (lambda s: s.teacher, TEACHERS),
    "activation": (lambda s: s.mlp.activation, tuple(ACTIVATIONS)),
    "inputs": (lambda s: s.inputs, INPUT_DISTRIBUTIONS),
    "hidden layers": (lambda s: len(s.mlp.sizes) - 2, tuple(range(MAX_HIDDEN_LAYERS + 1))),
}


@pytest.mark.parametrize("axis", list(AXES))
def test_every_option_of_an_axis_is_drawn_in_its_share(specs, axis):
    value, options = AXES[axis]
    shares = {k: v / len(specs) for k, v in Counter(map(value, specs)).items()}
    k = len(options)
    assert set(shares) == set(options), (axis, shares)
    assert all(0.5 / k <= share <= 1.5 / k for share in shares.values()), (axis, shares)


def test_subset_losses_include_proper_subsets(specs):
    # Subsets of 2..n of n in {2, 3, 4} logits, uniform in size: proper in (0 + 1/2 + 2/3) / 3
    # = 39% of subset cases (a subset that always spans every logit is plain cross-entropy).
    subset_cases = [s for s in specs if s.student_loss == "subset_softmax_cross_entropy"]
    proper = [s for s in subset_cases if len(s.subset) < s.mlp.sizes[-1]]
    assert all(len(s.subset) >= 2 for s in subset_cases)
    assert 0.25 <= len(proper) / len(subset_cases) <= 0.55, (len(proper), len(subset_cases))
    assert {len(s.subset) for s in proper} >= {2, 3}
