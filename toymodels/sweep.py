"""Sweeps: rerun the experiment while one config field takes several values.

Example (a quick sweep over the number of auxiliary logits):

    >>> from toymodels.config import tiny
    >>> from toymodels.sweep import run_sweep
    >>> sweep = run_sweep(tiny(seeds=2, seeds_per_chunk=2, teacher_epochs=1, student_epochs=1), "n_aux", [1, 3])
    >>> [point["value"] for point in sweep["points"]]
    [1, 3]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import matplotlib.pyplot as plt

from sublearn._common import PartsProgress, Progress, SilentProgress
from toymodels.conditions import CONDITIONS, LABELS, STUDENT_CONDITIONS
from toymodels.config import ConfigError, MnistConfig
from toymodels.data import MNIST, load_mnist
from toymodels.experiment import ExperimentResult, run_experiment
from toymodels.figure import COLORS


def run_sweep(
    base: MnistConfig,
    field: str,
    values: Sequence[Any],
    *,
    data: MNIST | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run :func:`run_experiment` once per value of ``field``; everything else as in ``base``.

    Returns:
        ``{"field", "values", "points": [{"value", "summary", "accuracy", "final_loss"}], "base_config"}``.
    """
    if field not in {f.name for f in dataclasses.fields(MnistConfig)}:
        raise ConfigError(f"cannot sweep unknown config field {field!r}")
    configs = [dataclasses.replace(base, **{field: value}).validate() for value in values]
    points = run_points(list(zip(values, configs)), data=data, progress=progress, label=field)
    return {
        "field": field,
        "values": list(values),
        "points": points,
        "base_config": base.to_dict(),
        "lowest_final_loss": {c: lowest_final_loss(points, c) for c in STUDENT_CONDITIONS},
    }


def lowest_final_loss(points: Sequence[dict[str, Any]], condition: str) -> Any:
    """The swept value whose students of ``condition`` end with the lowest mean training loss.

    This is how a learning rate is chosen on the distillation loss rather than on the
    transfer it produces: the loss is each seed's mean over the last epoch, averaged over
    seeds; a point where any seed diverged (a non-finite or missing loss) counts as
    infinitely bad.

    >>> lowest_final_loss(
    ...     [{"value": 0.1, "final_loss": {"s": [2.0, 1.0]}}, {"value": 1.0, "final_loss": {"s": [1.0, None]}},
    ...      {"value": 0.3, "final_loss": {"s": [1.0, 1.5]}}], "s")
    0.3
    """

    def mean_loss(point: dict[str, Any]) -> float:
        losses = point["final_loss"][condition]
        finite = all(v is not None and math.isfinite(v) for v in losses)
        return sum(losses) / len(losses) if finite else math.inf

    return min(points, key=mean_loss)["value"]


def run_points(
    points: Sequence[tuple[Any, MnistConfig]],
    *,
    data: MNIST | None = None,
    progress: Progress | None = None,
    label: str = "point",
    on_point: Callable[[Any, MnistConfig, ExperimentResult], None] | None = None,
) -> list[dict[str, Any]]:
    """Run :func:`run_experiment` for every ``(value, config)``; the loop under every sweep.

    ``on_point(value, config, result)`` is called after each point with the full result,
    so that a caller can save it before the next point starts (the atlas resumes from
    what it saved). ``progress`` counts the points (:class:`sublearn._common.PartsProgress`).

    Returns:
        ``[{"value", "summary", "accuracy", "final_loss"}]`` in the order of ``points``
        (``final_loss``: :attr:`ExperimentResult.final_loss`, per seed).
    """
    data = data or load_mnist()
    parts = PartsProgress(progress or SilentProgress(), len(points), f"{len(points)} run(s) of the experiment")
    out = []
    for value, config in points:
        parts.next_part(f"{label}={value}" if label else str(value))
        result = run_experiment(config, data=data, progress=parts)
        parts.finish_part()
        if on_point is not None:
            on_point(value, config, result)
        out.append(
            {"value": value, "summary": result.summary, "accuracy": result.accuracy, "final_loss": result.final_loss}
        )
    return out


def plot_sweep(
    sweep: dict[str, Any], conditions: Sequence[str] = ("student_aux", "cross_aux"), *, log_x: bool = False
) -> plt.Figure:
    """Mean test accuracy (95% CI band) of ``conditions`` against the swept value."""
    fig, ax = plt.subplots(figsize=(6, 3.8), layout="constrained")
    xs = [p["value"] for p in sweep["points"]]
    for condition in conditions:
        assert condition in CONDITIONS, condition
        means = [p["summary"][condition]["mean"] for p in sweep["points"]]
        cis = [p["summary"][condition]["ci95"] for p in sweep["points"]]
        ax.errorbar(
            xs,
            means,
            yerr=cis,
            marker="o",
            capsize=3,
            color=COLORS[condition],
            label=LABELS[condition].replace("\n", " "),
        )
    ax.axhline(0.1, color="gray", linestyle=":", linewidth=1, label="chance")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(sweep["field"])
    ax.set_ylabel("MNIST test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return fig
