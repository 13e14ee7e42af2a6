"""``sublearn theory``: check the gradient-alignment lemma on random MLPs and on the MNIST MLP.

For every case the command takes one teacher step and one student step
(:func:`theory.numerical.check_alignment`, with the automatic ``eps``) twice: with the
student at the teacher's initialization, where Lemma 1 and Theorem 1 claim
:math:`A \\ge 0`, a non-negative alignment and a lower teacher loss; and from an
independent initialization, where nothing forces the sign. It also fits the order of the
first-order prediction's error at the small end of six decades of ``eps``
(:func:`theory.numerical.convergence`).

Cases: random small MLPs (:func:`theory.cases.choose_spec`: architectures, activations,
initializations, inputs, student losses, teachers), and the MNIST MLP 784-256-256-13 at
the paper's initialization, distilled on uniform noise images through the auxiliary
logits only, with the teacher moving down the digit cross-entropy of real MNIST images.

Prints one table row per group: cases, min A, violations under shared initialization
(must be 0; the exit code is 1 otherwise), negative alignments found under different
initialization, and the fitted Taylor order. ``--out FILE`` writes everything as JSON.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

MNIST_TRAIN_IMAGES = 60_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cases", type=int, default=20, help="random MLP cases (default: 20)")
    parser.add_argument("--mnist-cases", type=int, default=3, help="MNIST MLP initializations; 0 skips them (default: 3)")
    parser.add_argument("--mnist-samples", type=int, default=32, help="noise images and digit images per MNIST case (default: 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
    parser.add_argument("--out", type=Path, default=None, help="write the results to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def _validate(args: argparse.Namespace) -> str | None:
    """The first problem with the arguments, phrased with its fix, or None."""
    if args.cases < 0 or args.mnist_cases < 0:
        return "--cases and --mnist-cases must be at least 0"
    if args.cases + args.mnist_cases == 0:
        return "nothing to check: give --cases or --mnist-cases a positive count"
    if args.mnist_samples < 1:
        return f"--mnist-samples must be at least 1 (got {args.mnist_samples})"
    if args.mnist_cases * args.mnist_samples > MNIST_TRAIN_IMAGES:
        return f"--mnist-cases x --mnist-samples must be at most {MNIST_TRAIN_IMAGES} (each case uses its own digit images)"
    if args.out is not None and args.out.is_dir():
        return f"--out {args.out} is a folder: give a file name such as {args.out / 'theory.json'}"
    return None


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def evaluate(model, params, other_params, inputs, **check_kwargs) -> dict[str, Any]:
    """Shared- and different-initialization checks and the convergence fit for one case."""
    from theory.numerical import check_alignment, convergence, tolerances

    shared = check_alignment(model, params, inputs, **check_kwargs)
    different = check_alignment(model, params, inputs, student_params=other_params, **check_kwargs)
    fit = convergence(model, params, inputs, **check_kwargs)
    return {
        "A": shared.A,
        "A_relative": shared.A / shared.jvp_scale if shared.jvp_scale > 0 else 0.0,
        "eps": shared.eps,
        "alignment": shared.alignment,
        "cosine": shared.cosine,
        "zeroth_order": shared.zeroth_order,
        "teacher_loss_change": _finite_or_none(shared.teacher_loss_change),
        "violations": shared.violations(),
        "first_order_dominates": shared.first_order_dominates(),
        "different_init_alignment": different.alignment,
        "different_init_cosine": different.cosine,
        "different_init_negative": different.alignment < -tolerances(different)["alignment"],
        "taylor_order": _finite_or_none(fit.order),
        "taylor_points": fit.n_fitted,
    }


def random_cases(n_cases: int, seed: int, progress):
    """``(spec, record)`` for ``n_cases`` random MLP cases drawn from ``seed``."""
    import numpy as np

    from theory.cases import NumpyChooser, build_case, choose_spec

    chooser = NumpyChooser(np.random.default_rng(seed))
    for k in range(n_cases):
        spec = choose_spec(chooser)
        case = build_case(spec)
        record = evaluate(case.model, case.params, case.other_params, case.inputs, **case.check_kwargs())
        progress.advance(f"random case {k + 1}/{n_cases}: {spec.mlp.sizes} {spec.mlp.activation}, {spec.student_loss}, teacher {spec.teacher}")
        yield spec, record


def _digit_cross_entropy(logits, labels):
    """The MNIST teacher's loss on a batch, equally weighted."""
    import jax.numpy as jnp

    from toymodels.losses import digit_cross_entropy

    return digit_cross_entropy(logits, labels, jnp.full(labels.shape, 1.0 / labels.shape[0], logits.dtype))


def mnist_cases(n_cases: int, n_samples: int, seed: int, progress):
    """Records for the paper's MNIST MLP at ``n_cases`` initializations."""
    import jax
    import jax.numpy as jnp

    from theory.numerical import SubsetSoftmaxCrossEntropy, SupervisedLoss
    from toymodels.data import load_mnist, normalize
    from toymodels.model import N_DIGITS, MLPSpec, apply, init_params
    from toymodels.noise import noise_images, noise_words

    spec = MLPSpec()  # the paper's 784-256-256-13, weights N(0, 1/d_in), zero biases

    def model(params, x):
        return apply(spec, params, x)

    mnist = load_mnist().subset(n_train=n_cases * n_samples)
    for k in range(n_cases):
        k_teacher, k_other, k_noise = jax.random.split(jax.random.fold_in(jax.random.key(seed), k), 3)
        rows = slice(k * n_samples, (k + 1) * n_samples)
        teacher_loss = SupervisedLoss(
            model, _digit_cross_entropy, normalize(mnist.train_images[rows]), jnp.asarray(mnist.train_labels[rows])
        )
        record = evaluate(
            model,
            init_params(spec, k_teacher),
            init_params(spec, k_other),
            noise_images(noise_words(k_noise), jnp.arange(n_samples), spec.d_in, "uniform"),
            student_loss=SubsetSoftmaxCrossEntropy(tuple(range(N_DIGITS, spec.n_out))),  # aux logits only
            teacher_loss=teacher_loss,
        )
        progress.advance(f"MNIST MLP case {k + 1}/{n_cases}")
        yield record


def summarize(name: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """One table row: counts, the smallest A, and the spread of the fitted orders."""
    orders = sorted(r["taylor_order"] for r in records if r["taylor_order"] is not None)
    return {
        "name": name,
        "cases": len(records),
        "min_A": min(r["A"] for r in records) + 0.0,  # + 0.0 turns -0.0 into 0.0
        "shared_init_violations": sum(bool(r["violations"]) for r in records),
        "different_init_negative": sum(r["different_init_negative"] for r in records),
        "taylor_order_median": orders[len(orders) // 2] if orders else None,
        "taylor_order_min": orders[0] if orders else None,
        "taylor_order_max": orders[-1] if orders else None,
        "taylor_exact": len(records) - len(orders),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """The summary table, one line per group of cases.

    A violation under shared initialization is any claim of :meth:`AlignmentResult.violations`
    failing; under different initialization, a negative alignment (beyond rounding).
    """
    lines = [
        f"{'':<28}{'cases':>6}{'min A':>11}{'violations':>18}{'':>10}   Taylor order",
        f"{'':<28}{'':>6}{'':>11}{'shared init':>14}{'different init':>16}   median [min, max]",
    ]
    for row in rows:
        if row["taylor_order_median"] is None:
            order = "exact (no 2nd-order term)"
        else:
            order = f"{row['taylor_order_median']:.3f} [{row['taylor_order_min']:.3f}, {row['taylor_order_max']:.3f}]"
            if row["taylor_exact"]:
                order += f", {row['taylor_exact']} exact"
        shared = f"{row['shared_init_violations']}/{row['cases']}"
        different = f"{row['different_init_negative']}/{row['cases']}"
        lines.append(f"{row['name']:<28}{row['cases']:>6}{row['min_A']:>11.3g}{shared:>14}{different:>16}   {order}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from toymodels.artifacts import environment, write_json_atomic
    from toymodels.progress import SilentProgress, TextProgress

    problem = _validate(args)
    if problem:
        print(f"sublearn theory: error: {problem}", file=sys.stderr)
        return 2
    progress = SilentProgress() if args.quiet else TextProgress()
    progress.start(args.cases + args.mnist_cases, "checking the alignment lemma")
    t0 = time.perf_counter()
    random_records = [
        {"spec": dataclasses.asdict(spec), **record} for spec, record in random_cases(args.cases, args.seed, progress)
    ]
    mnist_records = list(mnist_cases(args.mnist_cases, args.mnist_samples, args.seed, progress))
    progress.close()
    rows = []
    if random_records:
        rows.append(summarize("random MLPs", random_records))
    if mnist_records:
        rows.append(summarize("MNIST MLP 784-256-256-13", mnist_records))
    print(format_table(rows))
    wall = time.perf_counter() - t0
    violations = sum(row["shared_init_violations"] for row in rows)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        write_json_atomic(
            args.out,
            {
                "config": config,
                "summary": rows,
                "random_cases": random_records,
                "mnist_cases": mnist_records,
                "wall_s": wall,
                "environment": environment(),
            },
        )
    print(f"wall time {wall:.1f}s" + (f"; wrote {args.out}" if args.out is not None else ""))
    if violations:
        print(f"sublearn theory: {violations} case(s) violate the lemma under shared initialization", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    from sublearn.cli import main as sublearn_main

    return sublearn_main(["theory", *(sys.argv[1:] if argv is None else argv)])
