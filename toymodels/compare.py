"""Compare two MNIST runs over the same seeds, bar by bar: each run's mean and CI, and their paired difference.

Two runs that share ``seed`` and ``seeds`` train the same seeds from the same keys, so
their per-seed accuracies pair up, and the difference of a bar is estimated from the
per-seed differences, ``d_s = a_s - b_s``: mean ``d`` with a Student-t 95% interval
``t_{0.975, n-1} * sd(d) / sqrt(n)`` (:func:`toymodels.stats.summarize`). Pairing removes the
seed-to-seed spread that both runs share, so it resolves far smaller differences than
comparing the two intervals.

Usage: ``python -m toymodels.compare A/results.json B/results.json [--out comparison.json]``

Example:
    >>> a = {"config": {"seed": 0, "seeds": 3}, "accuracy": {"teacher": [0.90, 0.92, 0.94]}}
    >>> b = {"config": {"seed": 0, "seeds": 3}, "accuracy": {"teacher": [0.91, 0.91, 0.95]}}
    >>> row = compare(a, b)["teacher"]
    >>> round(row["difference"]["mean"], 4), row["difference_inside_ci"]
    (-0.0033, True)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from sublearn._common import write_json
from toymodels.config import ConfigError
from toymodels.stats import summarize


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per condition: ``a`` and ``b`` summaries, the paired difference ``a - b``, and two verdicts.

    ``difference_inside_ci``: the paired difference's interval contains 0.
    ``means_inside_each_others_ci``: each run's mean lies inside the other's interval.

    Raises:
        ConfigError: the runs do not cover the same seeds.
    """
    for key in ("seed", "seeds"):
        if a["config"][key] != b["config"][key]:
            raise ConfigError(
                f"the runs differ in {key} ({a['config'][key]} vs {b['config'][key]}): compare runs over the same seeds"
            )
    table = {}
    for condition, values in a["accuracy"].items():
        x, y = np.asarray(values, np.float64), np.asarray(b["accuracy"][condition], np.float64)
        sa, sb = summarize(x), summarize(y)
        diff = summarize(x - y)
        table[condition] = {
            "a": sa,
            "b": sb,
            "difference": diff,
            "difference_inside_ci": abs(diff["mean"]) <= diff["ci95"],
            "means_inside_each_others_ci": abs(sa["mean"] - sb["mean"]) <= min(sa["ci95"], sb["ci95"]),
        }
    return table


def format_comparison(table: dict[str, dict[str, Any]], names: tuple[str, str] = ("a", "b")) -> str:
    lines = [f"{'condition':<14}{names[0]:>18}{names[1]:>18}{'paired difference':>24}   0 inside its CI"]
    for condition, row in table.items():
        a, b, d = row["a"], row["b"], row["difference"]
        lines.append(
            f"{condition:<14}{a['mean']:>10.3f} +- {a['ci95']:.3f}{b['mean']:>10.3f} +- {b['ci95']:.3f}"
            f"{d['mean']:>+14.4f} +- {d['ci95']:.4f}   {'yes' if row['difference_inside_ci'] else 'NO'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toymodels.compare", description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="results.json of the first run")
    parser.add_argument("b", type=Path, help="results.json of the second run")
    parser.add_argument("--out", type=Path, default=None, help="write the comparison as JSON here")
    args = parser.parse_args(argv)
    from toymodels.experiment import read_results

    try:
        runs = [read_results(p) for p in (args.a, args.b)]
        table = compare(*runs)
    except (OSError, ValueError, KeyError) as err:
        print(f"{parser.prog}: error: cannot compare {args.a} and {args.b}: {err}", file=sys.stderr)
        return 2
    # Runs written before the precision option existed were float32.
    names = tuple(r["config"].get("precision", "float32") for r in runs)
    print(format_comparison(table, names))
    if args.out is not None:
        write_json(
            args.out,
            {
                "a": str(args.a),
                "b": str(args.b),
                "names": names,
                "configs": [r["config"] for r in runs],
                "comparison": table,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
