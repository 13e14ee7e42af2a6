"""Throughput of the MNIST experiment's compiled epochs against this machine's matmul peak.

Measures, in one process:

1. the float32 matmul peak: a jitted ``jnp.dot`` of two square matrices, best of several;
2. one teacher epoch and one student epoch (all four conditions) for a chunk of seeds at
   the paper's configuration, after a warm-up call that compiles them;

and prints the achieved GFLOP/s of each and its ratio to the peak. FLOPs are counted
analytically (:meth:`toymodels.model.MLPSpec.flops_per_example`): a training step is a
forward pass, weight gradients everywhere and input gradients below the first layer; the
students' step adds one shared teacher forward pass. Wall and process CPU times are both
reported, since on a shared machine wall time alone overstates the cost.

Usage: ``python benchmarks/mnist_throughput.py [--seeds 10] [--matmul-size 4096]``
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from toymodels.config import MnistConfig
from toymodels.data import load_mnist
from toymodels.experiment import _student_masks
from toymodels.model import init_params
from toymodels.noise import noise_words
from toymodels.train import make_optimizer, spec_of, student_epoch, teacher_epoch


def timed(fn, *args, repeats: int = 1):
    """Best wall time and its CPU time over ``repeats`` calls (results blocked on)."""
    best = (float("inf"), float("inf"))
    out = None
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        out = jax.block_until_ready(fn(*args))
        best = min(best, (time.perf_counter() - w0, time.process_time() - c0))
    return best, out


def matmul_peak(n: int, repeats: int = 5) -> tuple[float, float]:
    """GFLOP/s of a jitted float32 ``jnp.dot`` of two ``n x n`` matrices: per wall second, per CPU second."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    (wall, cpu), _ = timed(dot, a, b, repeats=repeats)
    return 2 * n**3 / wall / 1e9, 2 * n**3 / cpu / 1e9


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="seeds per compiled call (the chunk size)")
    parser.add_argument("--matmul-size", type=int, default=4096)
    parser.add_argument("--n-train", type=int, default=None, help="fewer training images for a quick check")
    parser.add_argument("--n-noise", type=int, default=60_000)
    args = parser.parse_args(argv)

    config = MnistConfig(seeds=args.seeds, seeds_per_chunk=args.seeds, n_train=args.n_train, n_noise=args.n_noise).validate()
    spec = spec_of(config)
    data = load_mnist().subset(config.n_train, None)
    images, labels = jnp.asarray(data.train_images), jnp.asarray(data.train_labels)
    keys = jax.random.split(jax.random.key(0), args.seeds)
    optimizer = make_optimizer(config)

    def fresh_teachers():
        params = jax.vmap(lambda k: init_params(spec, k))(keys)
        return params, jax.vmap(optimizer.init)(params)

    train_teachers = teacher_epoch(config)
    timed(train_teachers, *fresh_teachers(), keys, images, labels)  # compile
    (t_wall, t_cpu), (teachers, _, _) = timed(train_teachers, *fresh_teachers(), keys, images, labels)

    def fresh_students():
        students = jax.tree.map(lambda a: jnp.stack([a] * 4, axis=1), teachers)
        return students, jax.vmap(jax.vmap(optimizer.init))(students)

    words = jax.vmap(noise_words)(keys)
    masks = jnp.asarray(_student_masks(config))
    train_students = student_epoch(config)
    timed(train_students, *fresh_students(), teachers, words, keys, masks)  # compile
    (s_wall, s_cpu), _ = timed(train_students, *fresh_students(), teachers, words, keys, masks)
    peak, peak_per_cpu = matmul_peak(args.matmul_size)

    n_train = data.train_images.shape[0]
    teacher_flop = spec.flops_per_example() * n_train * args.seeds
    student_flop = (4 * spec.flops_per_example() + spec.flops_per_example(forward_only=True)) * config.n_noise * args.seeds
    report = {
        "seeds": args.seeds,
        "matmul_peak_gflops": peak,
        "matmul_gflop_per_cpu_s": peak_per_cpu,
        "teacher_epoch": {"wall_s": t_wall, "cpu_s": t_cpu, "gflops": teacher_flop / t_wall / 1e9, "gflop_per_cpu_s": teacher_flop / t_cpu / 1e9},
        "student_epoch": {"wall_s": s_wall, "cpu_s": s_cpu, "gflops": student_flop / s_wall / 1e9, "gflop_per_cpu_s": student_flop / s_cpu / 1e9},
        "devices": [str(d) for d in jax.devices()],
    }
    for phase in ("teacher_epoch", "student_epoch"):
        report[phase]["ratio_to_peak"] = report[phase]["gflops"] / peak
        # Per CPU second, the ratio is robust to other processes sharing the cores.
        report[phase]["cpu_ratio_to_peak"] = report[phase]["gflop_per_cpu_s"] / peak_per_cpu
    total_flop = (teacher_flop * config.teacher_epochs + student_flop * config.student_epochs) / args.seeds
    print(f"float32 matmul peak ({args.matmul_size}^2): {peak:7.1f} GFLOP/s ({peak_per_cpu:.1f} per CPU second)")
    for phase in ("teacher_epoch", "student_epoch"):
        r = report[phase]
        print(
            f"{phase:<14} {r['wall_s']:6.2f}s wall {r['cpu_s']:6.2f}s cpu  {r['gflops']:7.1f} GFLOP/s  "
            f"ratio to peak {r['ratio_to_peak']:.2f} (per CPU second {r['cpu_ratio_to_peak']:.2f})"
        )
    print(f"this config: {total_flop / 1e12:.2f} TFLOP per seed; at this throughput "
          f"{args.seeds} seeds train in {config.teacher_epochs * t_wall + config.student_epochs * s_wall:.0f}s")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
