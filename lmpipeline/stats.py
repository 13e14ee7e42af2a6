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
answers "does this model differ on these questions", not "on any question", and it treats
each seed's questions as independent replicates; the transfer study's headline is
therefore the t-test over the seeds' means (:func:`one_sample_test` on one number per
seed), with :func:`crossed_bootstrap` for the "these questions and other seeds" view.

Planning: :func:`seeds_for_power` is the number of seeds a one-sample t-test over seeds
needs to detect a mean effect :math:`\delta` with seed-level standard deviation
:math:`\sigma` at level :math:`\alpha` with a given power, from the noncentral t
distribution with noncentrality :math:`\delta\sqrt n/\sigma`; :func:`detectable_effect`
inverts it for a given number of seeds.

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


def sample_sd(values: Sequence[float]) -> float | None:
    """The sample standard deviation (``n - 1`` in the denominator); None for fewer than two values."""
    n = len(values)
    if n < 2:
        return None
    mean = math.fsum(values) / n
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def crossed_bootstrap(
    matrix: Sequence[Sequence[float]], resamples: int, seed: int, confidence: float = 0.95
) -> Interval:
    r"""Percentile interval of the grand mean of a seeds x questions matrix, resampling seeds
    and questions independently (a crossed, or "pigeonhole", bootstrap): both the seeds and
    the questions are samples, so the interval covers another draw of either.

    Each resample draws :math:`S` seed rows and :math:`Q` question columns with
    replacement and takes the mean over the :math:`S \times Q` grid they select.

    >>> ci = crossed_bootstrap([[1.0, 1.0], [1.0, 1.0]], resamples=200, seed=0)
    >>> (ci.mean, ci.low, ci.high)
    (1.0, 1.0, 1.0)
    """
    import numpy as np

    x = np.asarray(matrix, dtype=np.float64)
    n_seeds, n_questions = x.shape
    rng = np.random.default_rng(seed)
    # How often each seed and each question is drawn, per resample.
    seed_counts = np.stack([np.bincount(r, minlength=n_seeds) for r in rng.integers(0, n_seeds, (resamples, n_seeds))])
    question_counts = np.stack(
        [np.bincount(r, minlength=n_questions) for r in rng.integers(0, n_questions, (resamples, n_questions))]
    )
    means = np.einsum("bs,sq,bq->b", seed_counts, x, question_counts) / (n_seeds * n_questions)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(float(x.mean()), float(low), float(high), n_seeds, confidence)


def _t_power(n: int, noncentrality_per_root_n: float, alpha: float) -> float:
    from scipy.stats import nct
    from scipy.stats import t as student_t

    critical = student_t.isf(alpha / 2, n - 1)
    nc = noncentrality_per_root_n * math.sqrt(n)
    return float(nct.sf(critical, n - 1, nc) + nct.cdf(-critical, n - 1, nc))


def seeds_for_power(
    effect: float, sd: float, alpha: float = 0.01, power: float = 0.8, most: int = 10_000
) -> int | None:
    """The fewest seeds (at least 2) for which a two-sided one-sample t-test at ``alpha``
    rejects "mean 0" with probability ``power`` when the true mean is ``effect`` and the
    seed-level standard deviation ``sd``; None if more than ``most`` would be needed.

    >>> seeds_for_power(1.0, 1.0, alpha=0.05, power=0.8)  # the textbook 10 for d = 1
    10
    """
    if sd <= 0:
        return 2 if effect != 0 else None
    d = abs(effect) / sd
    if d == 0:
        return None
    n = 2
    while n <= most:
        if _t_power(n, d, alpha) >= power:
            return n
        n += 1
    return None


def detectable_effect(sd: float, n: int, alpha: float = 0.01, power: float = 0.8) -> float | None:
    """The smallest mean effect that ``n`` seeds detect with probability ``power`` (two-sided
    one-sample t-test at ``alpha``, seed-level standard deviation ``sd``); None for n < 2.

    >>> round(detectable_effect(1.0, 10, alpha=0.05, power=0.8), 3)  # 10 seeds: 80% power for d = 1
    0.996
    """
    if n < 2 or sd is None:
        return None
    low, high = 0.0, 1.0
    while _t_power(n, high, alpha) < power:
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if _t_power(n, mid, alpha) < power else (low, mid)
    return high * sd


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family of p-values (None stays None and is not counted).

    >>> holm([0.01, 0.04, 0.03, None])
    [0.03, 0.06, 0.06, None]
    """
    index = sorted((i for i, p in enumerate(pvalues) if p is not None), key=lambda i: pvalues[i])
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(index):
        running = max(running, min(1.0, (len(index) - rank) * pvalues[i]))
        out[i] = running
    return out
