r"""The transfer study's report: every comparison per seed and over seeds, and a figure.

Log-probabilities are natural logs; a difference of +0.1 means the student gives the
target about 10% more probability than its comparison model does, question by question.

For a cell, a target :math:`t` and a seed :math:`s`, each comparison is a vector over the
evaluation questions :math:`q` (``vs_neutral``, ``vs_control``, ``crossover``,
``specificity``: see :mod:`lmpipeline.transfer`), and its mean over questions is the
seed's one number. The report gives, per target and pooled over the targets (the mean of
the targets' numbers within each seed):

- ``seeds``: the mean over seeds, its t-interval and the two-sided t-test p over seeds
  (the headline: the seed is the unit of replication), the seed-level standard deviation
  and each seed's number; ``p_holm`` adjusts the targets' p-values for the k targets;
- ``bootstrap``: a crossed bootstrap interval over seeds and questions;
- ``per_seed_tests``: each seed's paired t-test over questions, and Stouffer's combination
  of them, ``stouffer_p``, which is conditional on these fixed questions and treats them
  as independent replicates: it answers "do these models differ on these questions".

``power`` gives, for the specific effect, the seeds needed for 80% power at
:data:`ALPHA` if the observed mean and seed SD were the truth, and the smallest effect the
study's seeds detect with 80% power.
"""

from __future__ import annotations

import math
from pathlib import Path

from lmpipeline.artifacts import atomic_path, versions
from lmpipeline.config import NEUTRAL, PipelineConfig, derive_seed, to_dict
from lmpipeline.stats import (
    crossed_bootstrap,
    detectable_effect,
    holm,
    mean_interval,
    one_sample_test,
    paired_test,
    sample_sd,
    seeds_for_power,
    stouffer,
)

ALPHA = 0.01  # the significance level the study is designed for, over seeds
POWER = 0.8  # the power its seed count is planned for
POOLED = "pooled"  # the targets' mean, within each seed
# Every comparison, headline first (the ones against the neutral student need one).
COMPARISONS = ("vs_neutral", "specificity", "crossover", "vs_control", "specificity_vs_control")


def _mean(values) -> float:
    return math.fsum(values) / len(values)


def _rank(changes: dict[str, float], word: str) -> int:
    """1 for the animal whose log-probability rose most."""
    return 1 + sum(v > changes[word] for v in changes.values())


def _minus(a, b):
    return [x - y for x, y in zip(a, b, strict=True)]


def comparison_vectors(
    students: dict, control: dict, targets, animals, neutral: bool
) -> dict[str, dict[str, list[float]]]:
    """Per comparison and target, the question-level vector (``students[who][animal]`` and
    ``control[animal]`` are log P per question; ``students[NEUTRAL]`` the neutral student's)."""
    out: dict[str, dict[str, list[float]]] = {}
    references = {"vs_control": control, **({"vs_neutral": students[NEUTRAL]} if neutral else {})}
    for t in targets:
        mine = students[t]
        for name, ref in references.items():
            out.setdefault(name, {})[t] = _minus(mine[t], ref[t])
            # The target's gain beyond the mean gain of every other animal, question by question.
            gains = {a: _minus(mine[a], ref[a]) for a in animals}
            others = [a for a in animals if a != t]
            spec = "specificity" if name == "vs_neutral" else "specificity_vs_control"
            out.setdefault(spec, {})[t] = [
                gains[t][q] - math.fsum(gains[a][q] for a in others) / len(others) for q in range(len(gains[t]))
            ]
        rivals = [u for u in targets if u != t]
        out.setdefault("crossover", {})[t] = [
            mine[t][q] - math.fsum(students[u][t][q] for u in rivals) / len(rivals) for q in range(len(mine[t]))
        ]
    return {name: out[name] for name in COMPARISONS if name in out}


def seed_result(base: dict, seed_result: dict, targets, animals, neutral: bool) -> dict:
    """One seed of one cell: every comparison's question-level vector and paired test,
    the ranks, the teachers' strength and the neutral student's generic shift."""
    students = {w: r["eval"]["logp"] for w, r in seed_result["students"].items()}
    control = seed_result["control"]["eval"]["logp"] if seed_result["control"] else base["logp"]
    vectors = comparison_vectors(students, control, targets, animals, neutral)
    reference = students[NEUTRAL] if neutral else control
    out: dict = {
        "vectors": vectors,
        "tests": {name: {t: one_sample_test(v).to_dict() for t, v in by.items()} for name, by in vectors.items()},
        "gains": {},
        "rank": {},
        "teacher_vs_base": {},
        "hit_rate": {},
    }
    for t in targets:
        gains = {a: _mean(_minus(students[t][a], reference[a])) for a in animals}
        out["gains"][t] = gains
        out["rank"][t] = _rank(gains, t)
        teacher = seed_result["teachers"][t]["eval"]
        out["teacher_vs_base"][t] = {u: _mean(_minus(teacher["logp"][u], base["logp"][u])) for u in targets}
        if "hit_rate" in teacher:
            control_rates = seed_result["control"]["eval"] if seed_result["control"] else base
            out["hit_rate"][t] = {
                "teacher": _mean(teacher["hit_rate"][t]),
                "student": _mean(seed_result["students"][t]["eval"]["hit_rate"][t]),
                "control": _mean(control_rates["hit_rate"][t]),
            }
    if neutral:
        out["teacher_vs_base"][NEUTRAL] = {
            u: _mean(_minus(seed_result["teachers"][NEUTRAL]["eval"]["logp"][u], base["logp"][u])) for u in targets
        }
        out["generic"] = {a: _mean(_minus(students[NEUTRAL][a], control[a])) for a in animals}
    return out


def summarize(matrix: list[list[float]], resamples: int, seed: int) -> dict:
    """Seed-level statistics of a seeds x questions matrix of one comparison."""
    per_seed = [_mean(row) for row in matrix]
    test = one_sample_test(per_seed)
    tests = [one_sample_test(row) for row in matrix]
    return {
        "seeds": {**test.to_dict(), "sd": sample_sd(per_seed), "per_seed": per_seed},
        "bootstrap": crossed_bootstrap(matrix, resamples, seed).to_dict(),
        "per_seed_tests": [t.to_dict() for t in tests],
        "stouffer_p": stouffer(tests),
    }


def cell_summary(per_seed: dict, targets, animals, neutral: bool, resamples: int, cell: str) -> dict:
    """Every comparison over seeds, per target and pooled over targets, with the power analysis."""
    seeds = list(per_seed)
    names = list(per_seed[seeds[0]]["vectors"])
    summary: dict = {}
    for name in names:
        by_target = {}
        for t in targets:
            matrix = [per_seed[s]["vectors"][name][t] for s in seeds]
            by_target[t] = summarize(matrix, resamples, derive_seed(0, "bootstrap", cell, name, t))
        adjusted = holm([by_target[t]["seeds"]["p"] for t in targets])
        for t, p in zip(targets, adjusted):
            by_target[t]["seeds"]["p_holm"] = p
        pooled_matrix = [
            [
                _mean([per_seed[s]["vectors"][name][t][q] for t in targets])
                for q in range(len(per_seed[s]["vectors"][name][targets[0]]))
            ]
            for s in seeds
        ]
        by_target[POOLED] = summarize(pooled_matrix, resamples, derive_seed(0, "bootstrap", cell, name, POOLED))
        summary[name] = by_target
    specific = "specificity" if neutral else "specificity_vs_control"
    power = {}
    for who, stats in summary[specific].items():
        values = stats["seeds"]["per_seed"]
        sd = sample_sd(values)
        power[who] = {
            "comparison": specific,
            "effect": _mean(values),
            "sd": sd,
            "seeds": len(values),
            "seeds_for_power": seeds_for_power(_mean(values), sd, ALPHA, POWER) if sd is not None else None,
            "detectable_effect": detectable_effect(sd, len(values), ALPHA, POWER) if sd is not None else None,
        }
    ranks = {}
    for t in targets:
        gains = {a: _mean([per_seed[s]["gains"][t][a] for s in seeds]) for a in animals}
        ranks[t] = {
            "reference": "neutral student" if neutral else "control",
            "per_seed": [per_seed[s]["rank"][t] for s in seeds],
            "of_mean_gains": _rank(gains, t),
            "of": len(animals),
            "mean_gains": gains,
            "median_other_gain": _median([g for a, g in gains.items() if a != t]),
        }
    out = {"summary": summary, "power": power, "ranks": ranks}
    if neutral:
        generic = {a: mean_interval([per_seed[s]["generic"][a] for s in seeds]).to_dict() for a in animals}
        over_animals = [_mean(list(per_seed[s]["generic"].values())) for s in seeds]
        out["generic"] = {"per_animal": generic, "mean_over_animals": one_sample_test(over_animals).to_dict()}
    out["teacher_vs_base"] = {
        who: {u: mean_interval([per_seed[s]["teacher_vs_base"][who][u] for s in seeds]).to_dict() for u in targets}
        for who in per_seed[seeds[0]]["teacher_vs_base"]
    }
    return out


def _median(values: list[float]) -> float:
    v = sorted(values)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def build(
    config: PipelineConfig, base: dict, results: dict, entanglement: dict | None, walls: dict[str, float]
) -> dict:
    """The report of a finished study (``results[cell][seed]`` as :meth:`Study.run` collects)."""
    t = config.transfer
    targets, animals = list(t.targets), list(t.animals)
    report: dict = {
        "targets": targets,
        "animals": animals,
        "neutral": t.neutral,
        "preset": config.preset,
        "alpha": ALPHA,
        "power": POWER,
        "cells": {},
    }
    for cell, by_seed in results.items():
        per_seed = {s: seed_result(base, r, targets, animals, t.neutral) for s, r in by_seed.items()}
        report["cells"][cell] = {
            "control": "base model trained on its own numbers" if cell.split("/")[1] == "sampled" else "base model",
            **cell_summary(per_seed, targets, animals, t.neutral, t.bootstrap, cell),
            "per_seed": {str(s): {k: v for k, v in r.items() if k not in ("vectors",)} for s, r in per_seed.items()},
            "training": {str(s): _training(r) for s, r in by_seed.items()},
        }
    if entanglement is not None:
        report["entanglement"] = entanglement_summary(base, entanglement, targets, animals)
    report["wall_s"] = wall_times(walls)
    report["config"] = to_dict(config)
    report["versions"] = versions()
    return report


def verdicts(report: dict, cell: str) -> dict[str, dict]:
    """Per target and pooled: whether the seed-level tests find the effect (p below the
    study's alpha, Holm-adjusted across targets, and a positive mean)."""
    summary = report["cells"][cell]["summary"]
    out = {}
    for who in [*report["targets"], POOLED]:
        out[who] = {}
        for name, by in summary.items():
            s = by[who]["seeds"]
            p = s.get("p_holm", s["p"])
            out[who][name] = p is not None and p < report["alpha"] and s["mean"] > 0
    return out


def markdown_table(report: dict, cell: str) -> str:
    """The cell's headline as a Markdown table: per comparison, for each target and pooled,
    the mean over seeds, its 95% t-interval over seeds and the p over seeds (Holm-adjusted
    for the targets); then the crossed-bootstrap interval of the specific effect, each
    target's rank per seed, and the seed SD with the seeds 80% power at :data:`ALPHA` needs."""
    result, whos = report["cells"][cell], [*report["targets"], POOLED]
    rows = [f"| comparison | {' | '.join(whos)} |", "|---" * (len(whos) + 1) + "|"]

    def cell_text(s: dict) -> str:
        if s["low"] is None:
            return f"{s['mean']:+.2f}"
        p = s.get("p_holm", s["p"])
        return f"{s['mean']:+.2f} [{s['low']:+.2f}, {s['high']:+.2f}], p = {p:.2g}"

    for name, by in result["summary"].items():
        rows.append(f"| {name} | " + " | ".join(cell_text(by[w]["seeds"]) for w in whos) + " |")
    boot = result["summary"]["specificity"] if "specificity" in result["summary"] else None
    if boot is not None:
        rows.append(
            "| specificity, crossed bootstrap over seeds and questions | "
            + " | ".join(f"[{boot[w]['bootstrap']['low']:+.2f}, {boot[w]['bootstrap']['high']:+.2f}]" for w in whos)
            + " |"
        )
    ranks = result["ranks"]
    rows.append(
        f"| rank of the target among {len(report['animals'])} animals, per seed | "
        + " | ".join(", ".join(map(str, ranks[w]["per_seed"])) if w in ranks else "" for w in whos)
        + " |"
    )
    power = result["power"]

    def power_text(w: str) -> str:
        q = power.get(w)
        if q is None or q["sd"] is None:
            return ""
        need = q["seeds_for_power"] if q["seeds_for_power"] is not None else "too many"
        return f"{q['sd']:.2f}; {need}"

    rows.append(
        f"| {next(iter(power.values()))['comparison']}: seed SD; seeds for 80% power at its mean | "
        + " | ".join(power_text(w) for w in whos)
        + " |"
    )
    return "\n".join(rows)


def entanglement_summary(base: dict, record: dict, targets, animals) -> dict:
    out = {}
    for w, r in record["targets"].items():
        changes = {a: _mean(_minus(r["logp_top"][a], base["logp"][a])) for a in animals}
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


PANELS = {
    "vs_neutral": "student − neutral student",
    "vs_control": "student − control",
    "crossover": "student − mean of the other targets' students",
    "specificity": "specificity: target's gain − mean gain of the other animals (vs neutral)",
}


def plot(report: dict, path: Path) -> None:
    """Per cell, one row per comparison: each seed's number (dots), the mean over seeds with
    its 95% t-interval (orange) and the crossed-bootstrap interval (grey), per target and
    pooled; and the neutral student's gain on every animal (the generic shift)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(report["cells"])
    panels = [k for k in PANELS if k in report["cells"][cells[0]]["summary"]]
    generic = "generic" in report["cells"][cells[0]]
    rows = len(panels) + generic
    labels = [*report["targets"], POOLED]
    fig, axes = plt.subplots(
        rows, len(cells), figsize=(max(6.5, 1.1 * len(labels) + 2) * len(cells), 2.9 * rows), squeeze=False
    )
    for c, cell in enumerate(cells):
        result = report["cells"][cell]
        for r, name in enumerate(panels):
            ax = axes[r, c]
            for x, who in enumerate(labels):
                stats = result["summary"][name][who]
                per_seed = stats["seeds"]["per_seed"]
                offsets = [x - 0.25 + 0.3 * k / max(1, len(per_seed) - 1) for k in range(len(per_seed))]
                ax.plot(offsets, per_seed, "o", color="#3b6fb6", ms=3, alpha=0.8)
                boot = stats["bootstrap"]
                ax.plot([x + 0.15, x + 0.15], [boot["low"], boot["high"]], color="#999999", lw=2)
                s = stats["seeds"]
                if s["low"] is not None:
                    ax.plot([x + 0.25, x + 0.25], [s["low"], s["high"]], color="#e8743b", lw=2)
                ax.plot(x + 0.25, s["mean"], "D", color="#e8743b", ms=5)
                p = s.get("p_holm", s["p"])
                if p is not None:
                    ax.annotate(
                        f"p={p:.1g}", (x + 0.25, s["mean"]), xytext=(3, 3), textcoords="offset points", fontsize=6
                    )
            ax.axhline(0, color="#333333", lw=0.8)
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, fontsize=7)
            ax.set_ylabel("Δ log P(target)", fontsize=8)
            ax.set_title(f"{cell}: {PANELS[name]}", fontsize=8)
            ax.spines[["top", "right"]].set_visible(False)
        if generic:
            ax = axes[rows - 1, c]
            per_animal = result["generic"]["per_animal"]
            order = sorted(per_animal, key=lambda a: -per_animal[a]["mean"])
            for x, a in enumerate(order):
                ci = per_animal[a]
                color = "#e8743b" if a in report["targets"] else "#3b6fb6"
                if ci["low"] is not None:
                    ax.plot([x, x], [ci["low"], ci["high"]], color=color, lw=1.5)
                ax.plot(x, ci["mean"], "o", color=color, ms=4)
            ax.axhline(0, color="#333333", lw=0.8)
            ax.set_xticks(range(len(order)))
            ax.set_xticklabels(order, fontsize=6, rotation=60)
            ax.set_ylabel("Δ log P(animal)", fontsize=8)
            ax.set_title(f"{cell}: neutral student − control, every animal (targets orange)", fontsize=8)
            ax.spines[["top", "right"]].set_visible(False)
    n_seeds = len(next(iter(report["cells"].values()))["per_seed"])
    fig.suptitle(
        f"Subliminal transfer at small scale ({report['preset']} preset, {n_seeds} seeds)\ndots = seeds; "
        "orange = mean, 95% t-interval over seeds (Holm p); grey = crossed bootstrap",
        fontsize=9,
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=150, format="png")
    plt.close(fig)
