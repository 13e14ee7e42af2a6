r"""Means with Student-t confidence intervals.

For per-question rates :math:`r_1, \dots, r_n` the estimate is :math:`\bar r` and the
two-sided interval at level :math:`1-\alpha` is

.. math::

    \bar r \pm t_{1-\alpha/2,\, n-1} \, \frac{s}{\sqrt n}, \qquad
    s^2 = \frac{1}{n-1} \sum_i (r_i - \bar r)^2 .

Questions are the unit of replication, as in the paper: samples of one question are not
independent draws of the model's preference, questions are.

Paired comparisons (:func:`paired_test`) add the two-sided p-value of the paired t-test,
and results from independent replications (seeds) are pooled two ways
(:func:`pool_seeds`): a t-interval over the per-seed means, which treats the seed as the
unit, and Stouffer's combined p-value
:math:`p = 2\,(1 - \Phi(|\sum_s z_s| / \sqrt{S}))` with
:math:`z_s = \operatorname{sign}(\bar d_s)\, \Phi^{-1}(1 - p_s / 2)`, which pools the
per-seed tests. The seeds of one study share their questions, so the combined p-value
answers "does this model differ on these questions", not "on any question".

Example:

>>> ci = mean_interval([0.0, 1.0])
>>> (ci.mean, round(ci.high, 3))  # t_{0.975, 1} = 12.706, s / sqrt(2) = 0.5
(0.5, 6.853)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from sublearn._common import Interval, mean_interval, t_quantile  # noqa: F401  (t_quantile: part of this API)


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean of ``a[i] - b[i]`` with a t-interval: compares two models on the same questions."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference needs equal lengths, got {len(a)} and {len(b)}")
    return mean_interval([x - y for x, y in zip(a, b)], confidence)


@dataclass(frozen=True)
class Comparison:
    """A mean difference with its interval and the two-sided p-value of its t-test."""

    interval: Interval
    p: float | None  # None when there is no spread to test against

    def to_dict(self) -> dict:
        return {**self.interval.to_dict(), "p": self.p}


def one_sample_test(values: Sequence[float], confidence: float = 0.95) -> Comparison:
    """Mean of ``values``, its t-interval, and the p-value of "the mean is 0".

    >>> t = one_sample_test([1.0, 2.0, 3.0])
    >>> (t.interval.mean, round(t.p, 4))  # t = 2 / (1 / sqrt 3) = 3.46 on 2 df
    (2.0, 0.0742)
    """
    from scipy.stats import t as student_t

    interval = mean_interval(values, confidence)
    n = len(values)
    if n < 2:
        return Comparison(interval, None)
    sd = math.sqrt(math.fsum((v - interval.mean) ** 2 for v in values) / (n - 1))
    if sd == 0:
        return Comparison(interval, None if interval.mean == 0 else 0.0)
    statistic = interval.mean / (sd / math.sqrt(n))
    return Comparison(interval, float(2 * student_t.sf(abs(statistic), n - 1)))


def paired_test(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Comparison:
    """:func:`paired_difference` with the paired t-test's two-sided p-value."""
    if len(a) != len(b):
        raise ValueError(f"paired_test needs equal lengths, got {len(a)} and {len(b)}")
    return one_sample_test([x - y for x, y in zip(a, b)], confidence)


def stouffer(tests: Sequence[Comparison]) -> float | None:
    """Two-sided combined p-value of independent two-sided tests (see the module docstring).

    >>> round(stouffer([Comparison(Interval(1.0, 0.5, 1.5, 10), 0.05)] * 3), 6)
    0.000687
    """
    from scipy.stats import norm

    if not tests or any(t.p is None for t in tests):
        return None
    z = [math.copysign(float(norm.isf(t.p / 2)), t.interval.mean) for t in tests]
    return float(2 * norm.sf(abs(math.fsum(z)) / math.sqrt(len(z))))


def pool_seeds(tests: Sequence[Comparison], confidence: float = 0.95) -> dict:
    """Per-seed tests pooled: the mean over seeds with its t-interval, and Stouffer's p."""
    return {"over_seeds": mean_interval([t.interval.mean for t in tests], confidence).to_dict(), "p": stouffer(tests)}
