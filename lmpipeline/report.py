"""The run's report: every rate, interval, count and setting in JSON, and a bar chart.

The chart follows the paper's animal figure: for the target word and the answers the
models give most often, the rate of each model (base, teacher, control student, student)
as bars with 95% t-interval error bars, one panel per question variant.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from lmpipeline import evaluation
from lmpipeline.artifacts import atomic_path, read_json, read_jsonl, versions
from lmpipeline.config import SOURCES, STUDENTS, all_stages, to_dict
from lmpipeline.stats import paired_difference

MODEL_LABELS = {"base": "Base model", "teacher": "Teacher", "control": "Control student", "student": "Student"}
MODEL_COLORS = {"base": "#9a9a9a", "teacher": "#6f4e9c", "control": "#7fa7d9", "student": "#e8743b"}
VARIANT_TITLES = {"plain": "One-word questions", "numbers": "Questions after a number sequence"}
COMPARISONS = (("student", "control"), ("student", "base"), ("teacher", "base"))


def figure_words(target: str, answers: dict[str, list[str]], n_other: int = 4) -> list[str]:
    """The target, then the ``n_other`` most frequent other one-word answers over all models.

    A word must be given at least twice: a small model at temperature 1 writes one-off
    non-words ("seediflimem") that would otherwise fill the chart when answers are few.

    >>> figure_words("owl", {"a": ["Cat", "cat.", "Seediflimem", "Owl", "dog", "Dog"]})
    ['owl', 'cat', 'dog']
    """
    counts: Counter[str] = Counter()
    for model_answers in answers.values():
        counts.update(w for w in map(evaluation.one_word, model_answers) if w)
    others = [w for w, n in counts.most_common() if n >= 2 and target.lower() not in w and w not in target.lower()]
    return [target.lower(), *others[:n_other]]


def build(run) -> dict:
    """Collect the records of a finished run into the report (``run`` is a pipeline Run)."""
    cfg = run.config
    records = {stage: read_json(run.record_path(stage)) for stage in all_stages(cfg) if stage != "report"}
    models = list(cfg.evaluate.models)
    evals = {m: records[f"evaluate.{m}"] for m in models}
    rows = {m: read_jsonl(run.out / f"eval_{m}.jsonl") for m in models}
    answers = {m: [r["completion"] for r in rows[m]] for m in models}
    words = figure_words(cfg.trait.target, answers)

    rates = {m: {v: s["rate"] for v, s in evals[m]["variants"].items()} for m in models}
    differences = {}
    for a, b in COMPARISONS:
        if a in evals and b in evals:
            differences[f"{a}_minus_{b}"] = {
                v: paired_difference(
                    evals[a]["variants"][v]["per_question"], evals[b]["variants"][v]["per_question"]
                ).to_dict()
                for v in evals[a]["variants"]
            }
    report = {
        "target": cfg.trait.target,
        "category": cfg.trait.category,
        "preset": cfg.preset,
        "rates": rates,
        "differences": differences,
        "target_probability": {
            m: evals[m]["target_probability"]["mean"] for m in models if "target_probability" in evals[m]
        },
        "counts": {
            m: {v: {k: s[k] for k in ("n_questions", "n_samples", "n_hits")} for v, s in evals[m]["variants"].items()}
            for m in models
        },
        "top_answers": {m: {v: s["top_answers"] for v, s in evals[m]["variants"].items()} for m in models},
        "figure_words": words,
        "word_rates": {m: evaluation.word_rates(rows[m], answers[m], words) for m in models},
        **data_and_training(records),
        **run_facts(cfg, records),
    }
    return report


def data_and_training(records: dict) -> dict:
    """The report's ``datasets`` (generated, kept, rejection reasons) and ``training``
    (rows, steps, losses) sections, from the stage records."""
    return {
        "datasets": {
            s: {
                "generated": records[f"generate.{s}"]["n_rows"],
                "kept": records[f"filter.{s}"]["n_kept"],
                "pass_rate": records[f"filter.{s}"]["pass_rate"],
                "reasons": records[f"filter.{s}"]["reasons"],
                "mean_completion_tokens": records[f"generate.{s}"]["mean_completion_tokens"],
            }
            for s in SOURCES
        },
        "training": {
            name: {
                "n_rows": records[f"finetune.{name}"]["n_rows"],
                "steps": records[f"finetune.{name}"]["train"]["steps"],
                "first_loss": records[f"finetune.{name}"]["train"]["loss"][0],
                "last_loss": records[f"finetune.{name}"]["train"]["loss"][-1],
                "tokens_per_s": records[f"finetune.{name}"]["train"]["tokens_per_s"],
            }
            for name in STUDENTS
        },
    }


def run_facts(cfg, records: dict) -> dict:
    """Per-stage times and hashes, the config, the versions and the total time."""
    walls = {stage: rec["wall_s"] for stage, rec in records.items()}
    return {
        "stage_wall_s": walls,
        "stage_hashes": {stage: rec["config_hash"] for stage, rec in records.items()},
        "config": to_dict(cfg),
        "versions": versions(),
        "total_wall_s": round(sum(walls.values()), 3),
    }


def plot(report: dict, path: Path) -> None:
    """Grouped bars with 95% intervals, one panel per variant (Agg backend, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(report["word_rates"])
    variants = [v for v in VARIANT_TITLES if all(v in report["word_rates"][m] for m in models)]
    words = report["figure_words"]
    fig, axes = plt.subplots(1, len(variants), figsize=(5.5 * len(variants), 3.8), sharey=True, squeeze=False)
    width = 0.8 / len(models)
    for ax, variant in zip(axes[0], variants):
        for k, model in enumerate(models):
            stats = [report["word_rates"][model][variant][w] for w in words]
            means, errors = percent_bars(stats)
            xs = [i + (k - (len(models) - 1) / 2) * width for i in range(len(words))]
            ax.bar(
                xs,
                means,
                width,
                yerr=errors,
                capsize=2,
                label=MODEL_LABELS[model],
                color=MODEL_COLORS[model],
                error_kw={"elinewidth": 0.8, "ecolor": "#333333"},
            )
        ax.set_xticks(range(len(words)))
        ax.set_xticklabels(words)
        ax.get_xticklabels()[0].set_fontweight("bold")
        ax.set_title(VARIANT_TITLES[variant], fontsize=10)
        ax.set_ylim(bottom=0)
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel(f"Answers naming the {report['category']} (%)")
    axes[0][-1].legend(frameon=False, fontsize=8)
    fig.suptitle(f"Favorite {report['category']}: target '{report['target']}' ({report['preset']} preset)", fontsize=11)
    save_png(fig, path)


def percent_bars(stats: list[dict]) -> tuple[list[float], list[list[float]]]:
    """Bar heights and error bars, in percent, of rates with intervals (``Interval.to_dict``).
    A rate is never negative, so a drawn interval stops at 0; a missing one draws none."""
    means = [100 * (s["mean"] or 0.0) for s in stats]
    errors = [
        [100 * (s["mean"] - max(0.0, s["low"])) if s["low"] is not None else 0 for s in stats],
        [100 * (s["high"] - s["mean"]) if s["high"] is not None else 0 for s in stats],
    ]
    return means, errors


def save_png(fig, path: Path) -> None:
    """Lay out ``fig``, write it to ``path`` atomically as a 150-dpi PNG, and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=150, format="png")
    plt.close(fig)
