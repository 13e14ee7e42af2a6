"""The MNIST figures: test accuracy per condition, and the students' alignment along training.

:func:`plot_results`: bars are this run's means with 95% confidence intervals over seeds;
a black diamond with its own interval marks the paper's value (100 seeds) for the same
condition, so a reader sees at a glance whether the reproduction matches.

:func:`plot_trajectory`: the ``--track`` curves (:mod:`toymodels.track`), one panel per
metric, each student condition's mean over seeds with its 95% confidence band.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from sublearn._common import write_atomic
from toymodels.conditions import CONDITIONS, LABELS, STUDENT_CONDITIONS

COLORS = {
    "reference": "#9e9e9e",
    "teacher": "#37474f",
    "student_aux": "#1f77b4",
    "student_all": "#8fbce6",
    "cross_aux": "#d62728",
    "cross_all": "#f2a3a3",
}


def _as_json(result: Any) -> dict[str, Any]:
    """A run's JSON form, from the form itself (a saved results.json) or the result object."""
    return result.to_json() if hasattr(result, "to_json") else result


def plot_results(result: Any, *, title: str | None = None) -> plt.Figure:
    """Bar chart of a run's summary: an :class:`~toymodels.experiment.ExperimentResult` or its JSON form."""
    result = _as_json(result)
    summary, paper = result["summary"], result.get("paper", {})
    conditions = [c for c in CONDITIONS if c in summary]
    fig, ax = plt.subplots(figsize=(7.5, 4.2), layout="constrained")
    xs = range(len(conditions))
    means = [summary[c]["mean"] for c in conditions]
    # No spread with one seed: NaN in memory, null once read back from JSON.
    errors = [
        0.0 if summary[c]["ci95"] is None or math.isnan(summary[c]["ci95"]) else summary[c]["ci95"] for c in conditions
    ]
    bars = ax.bar(
        xs, means, yerr=errors, capsize=4, color=[COLORS[c] for c in conditions], edgecolor="black", linewidth=0.6
    )
    for bar, mean in zip(bars, means):
        ax.text(
            bar.get_x() + bar.get_width() / 2,
            0.015,
            f"{mean:.3f}",
            ha="center",
            va="bottom",
            fontsize=8,
            color="white" if mean > 0.2 else "black",
        )
    if paper:
        px = [i + 0.3 for i, c in enumerate(conditions) if c in paper]
        pm = [paper[c]["mean"] for c in conditions if c in paper]
        pe = [paper[c]["ci95"] for c in conditions if c in paper]
        ax.errorbar(px, pm, yerr=pe, fmt="D", color="black", markersize=5, capsize=3, label="paper (100 seeds)")
    ax.axhline(0.1, color="gray", linestyle=":", linewidth=1, label="chance (0.1)")
    ax.set_xticks(list(xs), [LABELS[c] for c in conditions], fontsize=8.5)
    ax.set_ylabel("MNIST test accuracy")
    ax.set_ylim(0, 1)
    n = summary[conditions[0]]["n"]
    ax.set_title(
        title or f"Subliminal learning on MNIST: students trained on noise via auxiliary logits (n = {n} seeds)",
        fontsize=10,
    )
    ax.legend(loc="upper right", fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return fig


TRAJECTORY_PANELS = {
    "displacement_cos": "cos(θ_S(t) − θ_S(0), θ_T − θ_0)",
    "step_cos": "cos(θ_S(t) − θ_S(t−1), θ_T − θ_0)",
    "teacher_loss": "teacher loss L_T on the probe batch",
    "probe_accuracy": "digit accuracy on the probe batch",
}


def plot_trajectory(result: Any) -> plt.Figure:
    """Mean and 95% CI band over seeds of every tracked metric against the student step.

    Cosines are signed, so a student moving against its teacher's displacement shows as
    negative. The dashed line in the loss and accuracy panels is the teachers' own mean
    on the probe batch; dotted vertical lines mark epoch boundaries.
    """
    trajectory = _as_json(result)["trajectory"]
    steps, conditions = trajectory["steps"], trajectory["conditions"]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.6), layout="constrained", sharex=True)
    for ax, (metric, title) in zip(axes.flat, TRAJECTORY_PANELS.items()):
        for condition in (c for c in STUDENT_CONDITIONS if c in conditions):
            curve = conditions[condition][metric]
            mean = np.asarray(curve["mean"])
            ci = np.nan_to_num(np.asarray(curve["ci95"], dtype=float))  # NaN (null in JSON) with one seed: no band
            label = LABELS[condition].replace("\n", " ")
            ax.plot(steps, mean, color=COLORS[condition], linewidth=1.6, label=label)
            ax.fill_between(steps, mean - ci, mean + ci, color=COLORS[condition], alpha=0.25, linewidth=0)
        if metric in trajectory["teacher"]:
            ax.axhline(
                trajectory["teacher"][metric]["mean"],
                color=COLORS["teacher"],
                linestyle="--",
                linewidth=1,
                label="teacher",
            )
        if metric.endswith("_cos"):
            ax.axhline(0.0, color="gray", linewidth=0.8)
        if metric == "probe_accuracy":
            ax.axhline(0.1, color="gray", linestyle=":", linewidth=1, label="chance (0.1)")
        for boundary in range(trajectory["steps_per_epoch"], steps[-1], trajectory["steps_per_epoch"]):
            ax.axvline(boundary, color="gray", linestyle=":", linewidth=0.6, alpha=0.6)
        ax.set_title(title, fontsize=9.5)
        ax.spines[["top", "right"]].set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("student step t")
    handles, labels = axes[1, 1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=8, frameon=False)
    n = len(next(iter(conditions.values()))["displacement_cos"]["values"])
    fig.suptitle(
        f"Students' alignment with their teacher along distillation (mean, 95% CI over n = {n} seeds; "
        f"probe: {trajectory['probe']['n']} test images)",
        fontsize=10,
    )
    return fig


def save_figure(fig: plt.Figure, out_dir: str | Path, stem: str = "mnist_figure") -> list[Path]:
    """Write ``fig`` as PNG and PDF into ``out_dir``, each atomically."""
    paths = []
    for suffix in ("png", "pdf"):
        path = Path(out_dir) / f"{stem}.{suffix}"
        write_atomic(path, lambda tmp, s=suffix: fig.savefig(tmp, format=s, dpi=150))
        paths.append(path)
    plt.close(fig)
    return paths
