"""The MNIST figure: test accuracy per condition, with the paper's numbers as reference markers.

Bars are this run's means with 95% confidence intervals over seeds; a black diamond with
its own interval marks the paper's value (100 seeds) for the same condition, so a reader
sees at a glance whether the reproduction matches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from toymodels.artifacts import write_atomic
from toymodels.conditions import CONDITIONS, LABELS

COLORS = {
    "reference": "#9e9e9e",
    "teacher": "#37474f",
    "student_aux": "#1f77b4",
    "student_all": "#8fbce6",
    "cross_aux": "#d62728",
    "cross_all": "#f2a3a3",
}


def plot_results(result: dict[str, Any], *, title: str | None = None) -> plt.Figure:
    """Bar chart of ``result["summary"]`` (from :func:`toymodels.experiment.run_experiment`)."""
    summary, paper = result["summary"], result.get("paper", {})
    conditions = [c for c in CONDITIONS if c in summary]
    fig, ax = plt.subplots(figsize=(7.5, 4.2), layout="constrained")
    xs = range(len(conditions))
    means = [summary[c]["mean"] for c in conditions]
    errors = [0.0 if summary[c]["ci95"] != summary[c]["ci95"] else summary[c]["ci95"] for c in conditions]
    bars = ax.bar(xs, means, yerr=errors, capsize=4, color=[COLORS[c] for c in conditions], edgecolor="black", linewidth=0.6)
    for bar, mean in zip(bars, means):
        ax.text(bar.get_x() + bar.get_width() / 2, 0.015, f"{mean:.3f}", ha="center", va="bottom", fontsize=8, color="white" if mean > 0.2 else "black")
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
    ax.set_title(title or f"Subliminal learning on MNIST: students trained on noise via auxiliary logits (n = {n} seeds)", fontsize=10)
    ax.legend(loc="upper right", fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
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
