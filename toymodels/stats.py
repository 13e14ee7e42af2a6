"""Summary statistics reported for every condition: mean and a normal 95% confidence interval.

The interval is ``mean +- 1.96 * s / sqrt(n)`` with ``s`` the sample standard deviation
(``ddof=1``, the unbiased variance). The authors' code uses NumPy's default ``ddof=0``,
whose intervals are narrower by the factor ``sqrt((n - 1) / n)``: 0.5% at 100 seeds,
5% at 10.

Example:
    >>> from toymodels.stats import summarize
    >>> s = summarize([0.5, 0.7])
    >>> round(s["mean"], 3), round(s["ci95"], 4), s["n"]
    (0.6, 0.196, 2)
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

Z_95 = 1.959963984540054  # the 0.975 quantile of the standard normal


def summarize(values: Sequence[float]) -> dict[str, float | int]:
    """Mean, sample std, standard error and 95% CI half-width of ``values``.

    With a single value, the spread is unknown and reported as NaN.
    """
    x = np.asarray(values, dtype=np.float64)
    n = int(x.size)
    if n == 0:
        raise ValueError("summarize needs at least one value")
    std = float(np.std(x, ddof=1)) if n > 1 else math.nan
    sem = std / math.sqrt(n)
    return {"mean": float(np.mean(x)), "std": std, "sem": sem, "ci95": Z_95 * sem, "n": n}
