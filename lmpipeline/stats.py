r"""Means with Student-t confidence intervals.

For per-question rates :math:`r_1, \dots, r_n` the estimate is :math:`\bar r` and the
two-sided interval at level :math:`1-\alpha` is

.. math::

    \bar r \pm t_{1-\alpha/2,\, n-1} \, \frac{s}{\sqrt n}, \qquad
    s^2 = \frac{1}{n-1} \sum_i (r_i - \bar r)^2 .

Questions are the unit of replication, as in the paper: samples of one question are not
independent draws of the model's preference, questions are.

Example:

>>> ci = mean_interval([0.0, 1.0])
>>> (ci.mean, round(ci.high, 3))  # t_{0.975, 1} = 12.706, s / sqrt(2) = 0.5
(0.5, 6.853)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float | None  # None when n < 2: one value gives no spread
    high: float | None
    n: int
    confidence: float = 0.95

    def to_dict(self) -> dict:
        return asdict(self)


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t  # imported here: only intervals need it

    return float(t.ppf(p, df))


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean of ``values`` with a two-sided t-interval (see the module docstring)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval needs at least one value")
    mean = math.fsum(values) / n
    if n < 2:
        return Interval(mean, None, None, n, confidence)
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    half = t_quantile(0.5 + confidence / 2, n - 1) * math.sqrt(var / n)
    return Interval(mean, mean - half, mean + half, n, confidence)


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean of ``a[i] - b[i]`` with a t-interval: compares two models on the same questions."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference needs equal lengths, got {len(a)} and {len(b)}")
    return mean_interval([x - y for x, y in zip(a, b)], confidence)
