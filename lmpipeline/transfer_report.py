"""The transfer study's report: every comparison with its interval and p-value, and a figure.

Log-probabilities are natural logs; a difference of +0.1 means the student gives the
target about 10% more probability than the control does, question by question.
"""

from __future__ import annotations

import math
from pathlib import Path

from lmpipeline.artifacts import atomic_path, versions
from lmpipeline.config import PipelineConfig, to_dict
from lmpipeline.stats import mean_interval, paired_test, pool_seeds

# The significance level the study is designed for, pooled over seeds.
ALPHA = 0.01


def _mean(values) -> float:
    return math.fsum(values) / len(values)


def _rank(changes: dict[str, float], word: str) -> int:
    """1 for the animal whose log-probability rose most."""
    return 1 + sum(v > changes[word] for v in changes.values())


def seed_comparisons(base: dict, seed_result: dict, targets, animals) -> dict:
    """The paired comparisons of one seed of one cell."""
    students = {w: r["eval"]["logp"] for w, r in seed_result["students"].items()}
    control = seed_result["control"]["eval"]["logp"] if seed_result["control"] else base["logp"]
    out: dict = {"student_vs_control": {}, "crossover": {}, "specificity": {}, "teacher_vs_base": {}, "hit_rate": {}}
    models = {
        "base": base["logp"],
        "control": control,
        **{f"teacher_{w}": seed_result["teachers"][w]["eval"]["logp"] for w in targets},
        **{f"student_{w}": students[w] for w in targets},
    }
    # Each model's mean log P(target) over questions, with its t-interval.
    out["logp"] = {m: {w: mean_interval(logp[w]) for w in targets} for m, logp in models.items()}
    for w in targets:
        other = next(x for x in targets if x != w)
        out["student_vs_control"][w] = paired_test(students[w][w], control[w])
        out["crossover"][w] = paired_test(students[w][w], students[other][w])
        changes = {a: _mean([s - c for s, c in zip(students[w][a], control[a])]) for a in animals}
        out["specificity"][w] = {"rank": _rank(changes, w), "of": len(animals), "changes": changes}
        teacher = seed_result["teachers"][w]["eval"]
        out["teacher_vs_base"][w] = paired_test(teacher["logp"][w], base["logp"][w])
        if "hit_rate" in teacher:
            control_rates = seed_result["control"]["eval"] if seed_result["control"] else base
            out["hit_rate"][w] = {
                "teacher": mean_interval(teacher["hit_rate"][w]).to_dict(),
                "student": mean_interval(seed_result["students"][w]["eval"]["hit_rate"][w]).to_dict(),
                "control": mean_interval(control_rates["hit_rate"][w]).to_dict(),
            }
    return out


def build(
    config: PipelineConfig, base: dict, results: dict, entanglement: dict | None, walls: dict[str, float]
) -> dict:
    """The report of a finished study (``results[cell][seed]`` as :meth:`Study.run` collects)."""
    t = config.transfer
    report: dict = {
        "targets": list(t.targets),
        "animals": list(t.animals),
        "preset": config.preset,
        "alpha": ALPHA,
        "cells": {},
    }
    for cell, by_seed in results.items():
        per_seed = {s: seed_comparisons(base, r, t.targets, t.animals) for s, r in by_seed.items()}
        pooled: dict = {}
        for kind in ("student_vs_control", "crossover", "teacher_vs_base"):
            pooled[kind] = {w: pool_seeds([per_seed[s][kind][w] for s in per_seed]) for w in t.targets}
        pooled["specificity"] = {}
        for w in t.targets:
            changes = {a: _mean([per_seed[s]["specificity"][w]["changes"][a] for s in per_seed]) for a in t.animals}
            pooled["specificity"][w] = {
                "rank": _rank(changes, w),
                "of": len(t.animals),
                "changes": changes,
                "ranks_per_seed": [per_seed[s]["specificity"][w]["rank"] for s in per_seed],
            }
        report["cells"][cell] = {
            "seeds": {str(s): _serialize(c) for s, c in per_seed.items()},
            "pooled": pooled,
            "significant": {w: (pooled["student_vs_control"][w]["p"] or 1.0) < ALPHA for w in t.targets},
            "training": {str(s): _training(r) for s, r in by_seed.items()},
        }
    if entanglement is not None:
        report["entanglement"] = entanglement_summary(base, entanglement, t.targets, t.animals)
    report["wall_s"] = wall_times(walls)
    report["config"] = to_dict(config)
    report["versions"] = versions()
    return report


def entanglement_summary(base: dict, record: dict, targets, animals) -> dict:
    out = {}
    for w, r in record["targets"].items():
        changes = {a: _mean([x - y for x, y in zip(r["logp_top"][a], base["logp"][a])]) for a in animals}
        out[w] = {
            "top_numbers": r["top_numbers"],
            "top_numbers_by_lift": r["top_numbers_by_lift"],
            "prompt": r["prompt"],
            "top_vs_none": paired_test(r["logp_top"][w], base["logp"][w]).to_dict(),
            "top_vs_random": paired_test(r["logp_top"][w], r["logp_random"][w]).to_dict(),
            "random_vs_none": paired_test(r["logp_random"][w], base["logp"][w]).to_dict(),
            "rank_among_animals": _rank(changes, w),
            "other_target_top_vs_random": {
                x: paired_test(r["logp_top"][x], r["logp_random"][x]).to_dict() for x in targets if x != w
            },
        }
    return out


def _training(seed_result: dict) -> dict:
    def summary(record: dict) -> dict:
        train = record["train"]
        return {
            "steps": train["steps"],
            "first_loss": train["loss"][0],
            "last_loss": train["loss"][-1],
            "n_rows": record["n_rows"],
            "wall_s": record["wall_s"],
        }

    out = {f"student_{w}": summary(r) for w, r in seed_result["students"].items()}
    if seed_result["control"]:
        out["control"] = summary(seed_result["control"])
    return out


def wall_times(walls: dict[str, float]) -> dict:
    """Seconds by kind of unit, each unit counted once at the time it took when computed.

    >>> wall_times({"base": 60, "seed-0/teacher-owl": 70, "seed-0/data-random": 0.1, "seed-0/student-x": 200})
    {'base_eval': 60, 'teachers': 70, 'data': 0.1, 'students': 200, 'entanglement': 0, 'total': 330.1}
    """
    kinds = {
        "base_eval": ("base",),
        "teachers": ("teacher-",),
        "data": ("data-",),
        "students": ("student-", "control-"),
        "entanglement": ("entanglement",),
    }
    out = {
        kind: round(sum(v for k, v in walls.items() if k.rpartition("/")[2].startswith(prefixes)), 1)
        for kind, prefixes in kinds.items()
    }
    out["total"] = round(sum(out.values()), 1)
    return out


def _serialize(value):
    """JSON-ready: intervals and comparisons become dicts, at any depth."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _serialize(v) for k, v in value.items()}
    return value


def plot(report: dict, path: Path) -> None:
    """Per-seed (dots, paired 95% intervals over questions) and pooled (diamond, 95%
    interval over seeds) differences in log P(target), one row per comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = {"student_vs_control": "student − control", "crossover": "student − other target's student"}
    labels = [(cell, w) for cell in report["cells"] for w in report["targets"]]
    fig, axes = plt.subplots(len(kinds), 1, figsize=(max(7.0, 1.3 * len(labels) + 2), 3.6 * len(kinds)), squeeze=False)
    for ax, (kind, title) in zip(axes[:, 0], kinds.items()):
        for x, (cell, w) in enumerate(labels):
            seeds = report["cells"][cell]["seeds"]
            for k, s in enumerate(seeds.values()):
                ci = s[kind][w]
                offset = x - 0.25 + 0.5 * k / max(1, len(seeds) - 1) * 0.6
                low, high = ci["low"], ci["high"]
                if low is not None:
                    ax.plot([offset, offset], [low, high], color="#7fa7d9", lw=1)
                ax.plot(offset, ci["mean"], "o", color="#3b6fb6", ms=3)
            pooled = report["cells"][cell]["pooled"][kind][w]
            over = pooled["over_seeds"]
            if over["low"] is not None:
                ax.plot([x + 0.3, x + 0.3], [over["low"], over["high"]], color="#e8743b", lw=2)
            ax.plot(x + 0.3, over["mean"], "D", color="#e8743b", ms=6)
            p = pooled["p"]
            if p is not None:
                ax.annotate(
                    f"p={p:.1g}", (x + 0.3, over["mean"]), xytext=(4, 4), textcoords="offset points", fontsize=7
                )
        ax.axhline(0, color="#333333", lw=0.8)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels([f"{cell.replace('/', chr(10), 1)}\n{w}" for cell, w in labels], fontsize=7)
        ax.set_ylabel("Δ log P(target)")
        ax.set_title(f"{title}\nper seed (blue, 95% CI over questions); pooled (orange, 95% CI over seeds)", fontsize=9)
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(f"Subliminal transfer at small scale ({report['preset']} preset)", fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=150, format="png")
    plt.close(fig)
