import math

import jax
import numpy as np
import pytest

from toymodels.conditions import CONDITIONS, PAPER_RESULTS, derangement
from toymodels.stats import summarize


def test_summary_statistics_by_hand():
    s = summarize([0.2, 0.4, 0.9])
    mean = 0.5
    std = math.sqrt(((0.3) ** 2 + (0.1) ** 2 + (0.4) ** 2) / 2)
    assert s["n"] == 3
    assert s["mean"] == pytest.approx(mean)
    assert s["std"] == pytest.approx(std)
    # Student t with 2 degrees of freedom: t_{0.975, 2} = 4.3027 (a z interval would use 1.96).
    assert s["ci95"] == pytest.approx(4.302653 * std / math.sqrt(3), rel=1e-6)
    assert math.isnan(summarize([0.3])["ci95"])
    with pytest.raises(ValueError):
        summarize([])


@pytest.mark.parametrize("n", [2, 3, 5, 10, 100])
def test_derangement_has_no_fixed_point(n):
    for i in range(20):
        p = derangement(n, jax.random.key(i))
        assert sorted(p.tolist()) == list(range(n))
        assert np.all(p != np.arange(n))


def test_derangement_is_deterministic_and_uniform_over_derangements_of_three():
    assert np.array_equal(derangement(10, jax.random.key(7)), derangement(10, jax.random.key(7)))
    # Three elements have exactly two derangements, (1,2,0) and (2,0,1): each about half the time.
    counts = {}
    for i in range(400):
        key = tuple(derangement(3, jax.random.key(i)).tolist())
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) == {(1, 2, 0), (2, 0, 1)}
    assert abs(counts[(1, 2, 0)] / 400 - 0.5) < 4 * 0.5 / math.sqrt(400)


def test_derangement_needs_two_elements():
    with pytest.raises(ValueError):
        derangement(1, jax.random.key(0))


def test_paper_numbers_cover_every_condition():
    assert set(PAPER_RESULTS) == set(CONDITIONS)
