"""Throughput of the MNIST experiment, per matmul precision, against this machine's matmul peaks.

Measures, in one process:

1. the matmul peaks: a jitted ``jnp.dot`` of two square matrices in float32, and with
   bfloat16 inputs and float32 accumulation (what ``--precision bf16`` runs), best of
   several;
2. for each precision, one teacher epoch and one student epoch (all four conditions) for
   a chunk of seeds at the paper's configuration, after a warm-up call that compiles them:
   achieved GFLOP/s, ratio to the matching peak, and the projected seconds per 10 seeds;
3. with ``--peer``, the whole experiment end to end (``run_experiment``) in each
   precision and the same experiment in eager PyTorch (``benchmarks/peer_torch.py``, the
   paper's procedure written as a PyTorch user would), and the ratio of their times.

With ``--track N`` it measures instead, for each precision, the cost of ``--track N``
(:mod:`toymodels.track`): one student epoch with and without tracking every ``N`` steps,
alternated ``--repeats`` times so both see the same machine load, and the ratio of the
best times.

FLOPs are counted analytically (:meth:`toymodels.model.MLPSpec.flops_per_example`): a
training step is a forward pass, weight gradients everywhere and input gradients below
the first layer; the students' step adds one shared teacher forward pass. Wall and
process CPU times are both reported, since on a shared machine wall time alone overstates
the cost; ratios are taken within this one process. The peak resident memory of the
process is printed at the end.

Usage: ``python benchmarks/mnist_throughput.py [--seeds 10] [--precisions float32 bf16] [--peer | --track 10]``
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import resource
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from toymodels.config import PRECISIONS, MnistConfig
from toymodels.data import load_mnist
from toymodels.experiment import _student_masks, run_experiment
from toymodels.model import init_params
from toymodels.noise import noise_words
from toymodels.precision import compute_dtype
from toymodels.track import probe_batch
from toymodels.train import make_optimizer, spec_of, student_epoch, teacher_epoch


def timed(fn, *args, repeats: int = 1):
    """Best (wall, CPU) time over ``repeats`` calls (results blocked on), and the last result."""
    best = (float("inf"), float("inf"))
    out = None
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        out = jax.block_until_ready(fn(*args))
        best = min(best, (time.perf_counter() - w0, time.process_time() - c0))
    return best, out


def matmul_peak(n: int, precision: str, repeats: int = 5) -> tuple[float, float]:
    """GFLOP/s of a jitted ``n x n`` matmul in ``precision`` (float32 accumulation): per wall and per CPU second."""
    dtype = compute_dtype(precision)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    dot(a, b).block_until_ready()
    (wall, cpu), _ = timed(dot, a, b, repeats=repeats)
    return 2 * n**3 / wall / 1e9, 2 * n**3 / cpu / 1e9


def epoch_throughput(config: MnistConfig, images, labels) -> dict:
    """Time one teacher epoch and one student epoch of ``config`` (compiled first)."""
    spec = spec_of(config)
    keys = jax.random.split(jax.random.key(0), config.seeds)
    optimizer = make_optimizer(config)

    def fresh_teachers():
        params = jax.vmap(lambda k: init_params(spec, k))(keys)
        return params, jax.vmap(optimizer.init)(params)

    train_teachers = teacher_epoch(config)
    timed(train_teachers, *fresh_teachers(), keys, images, labels)  # compile
    (t_wall, t_cpu), (teachers, _, _) = timed(train_teachers, *fresh_teachers(), keys, images, labels)

    def fresh_students():
        students = jax.tree.map(lambda a: jnp.stack([a] * 4, axis=1), teachers)
        return students, jax.vmap(jax.vmap(make_optimizer(config, students=True).init))(students)

    words = jax.vmap(noise_words)(keys)
    masks = jnp.asarray(_student_masks(config))
    train_students = student_epoch(config)
    timed(train_students, *fresh_students(), teachers, words, keys, masks)  # compile
    (s_wall, s_cpu), _ = timed(train_students, *fresh_students(), teachers, words, keys, masks)

    n_train = images.shape[0]
    flops = {
        "teacher_epoch": spec.flops_per_example() * n_train * config.seeds,
        "student_epoch": (4 * spec.flops_per_example() + spec.flops_per_example(forward_only=True))
        * config.n_noise
        * config.seeds,
    }
    out = {}
    for phase, (wall, cpu) in (("teacher_epoch", (t_wall, t_cpu)), ("student_epoch", (s_wall, s_cpu))):
        out[phase] = {
            "wall_s": wall,
            "cpu_s": cpu,
            "gflops": flops[phase] / wall / 1e9,
            "gflop_per_cpu_s": flops[phase] / cpu / 1e9,
        }
    per_seed = (config.teacher_epochs * t_wall + config.student_epochs * s_wall) / config.seeds
    out["seconds_per_10_seeds"] = 10 * per_seed
    out["cpu_seconds_per_10_seeds"] = (
        10 * (config.teacher_epochs * t_cpu + config.student_epochs * s_cpu) / config.seeds
    )
    return out


def tracking_overhead(config: MnistConfig, every: int, probe, repeats: int) -> dict:
    """Best wall and CPU seconds of one student epoch without and with ``--track every``, and their ratios.

    Teachers are untrained initializations: an epoch's work does not depend on what the
    teacher has learned, and this keeps the measurement to the student epoch alone.
    """
    spec = spec_of(config)
    keys = jax.random.split(jax.random.key(0), config.seeds)
    optimizer = make_optimizer(config, students=True)
    references = jax.vmap(lambda k: init_params(spec, k))(keys)
    teachers = jax.vmap(lambda k: init_params(spec, jax.random.fold_in(k, 1)))(keys)
    words = jax.vmap(noise_words)(keys)
    masks = jnp.asarray(_student_masks(config))
    starts = jax.tree.map(lambda a: jnp.stack([a] * 4, axis=1), references)

    def fresh_students():
        students = jax.tree.map(jnp.copy, starts)
        return students, jax.vmap(jax.vmap(optimizer.init))(students)

    plain = student_epoch(dataclasses.replace(config, track=0))
    tracked = student_epoch(dataclasses.replace(config, track=every))
    run_plain = lambda: plain(*fresh_students(), teachers, words, keys, masks)  # noqa: E731
    run_tracked = lambda: tracked(*fresh_students(), teachers, words, keys, starts, references, masks, *probe)  # noqa: E731
    timed(run_plain), timed(run_tracked)  # compile
    best = {"untracked": (float("inf"),) * 2, "tracked": (float("inf"),) * 2}
    for _ in range(repeats):
        best["untracked"] = min(best["untracked"], timed(run_plain)[0])
        best["tracked"] = min(best["tracked"], timed(run_tracked)[0])
    return {
        "every": every,
        **{f"{k}_wall_s": v[0] for k, v in best.items()},
        **{f"{k}_cpu_s": v[1] for k, v in best.items()},
        "ratio_wall": best["tracked"][0] / best["untracked"][0],
        "ratio_cpu": best["tracked"][1] / best["untracked"][1],
    }


def end_to_end(config: MnistConfig) -> dict:
    """Wall and CPU seconds of the whole experiment (data loading, compilation, training, evaluation)."""
    (wall, cpu), result = timed(lambda: run_experiment(config))
    return {"wall_s": wall, "cpu_s": cpu, "mean_accuracy": {c: s["mean"] for c, s in result.summary.items()}}


def _peer_module():
    spec = importlib.util.spec_from_file_location("peer_torch", Path(__file__).with_name("peer_torch.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def peer_end_to_end(config: MnistConfig) -> dict:
    (wall, cpu), result = timed(lambda: _peer_module().run(config))
    return {"wall_s": wall, "cpu_s": cpu, "mean_accuracy": {c: float(np.mean(v)) for c, v in result.items()}}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kilobytes on Linux


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seeds", type=int, default=10, help="seeds per compiled call (the chunk size), and of the --peer runs"
    )
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--matmul-size", type=int, default=4096)
    parser.add_argument("--n-train", type=int, default=None, help="fewer training images for a quick check")
    parser.add_argument("--n-noise", type=int, default=60_000)
    parser.add_argument("--peer", action="store_true", help="also time the whole experiment against eager PyTorch")
    parser.add_argument(
        "--track", type=int, default=0, metavar="N", help="measure instead the cost of tracking every N steps"
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed calls of each variant with --track (best is kept)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the report to this file")
    args = parser.parse_args(argv)

    def config_for(precision: str) -> MnistConfig:
        return MnistConfig(
            seeds=args.seeds,
            seeds_per_chunk=args.seeds,
            n_train=args.n_train,
            n_noise=args.n_noise,
            precision=precision,
        ).validate()

    data = load_mnist().subset(args.n_train, None)
    images, labels = jnp.asarray(data.train_images), jnp.asarray(data.train_labels)
    report: dict = {"seeds": args.seeds, "devices": [str(d) for d in jax.devices()], "precisions": {}}
    if args.track:
        report["tracking"] = {}
        for precision in args.precisions:
            r = report["tracking"][precision] = tracking_overhead(
                config_for(precision), args.track, probe_batch(data), args.repeats
            )
            print(
                f"[{precision}] student epoch, {args.seeds} seeds, n_noise {args.n_noise}: "
                f"{r['untracked_wall_s']:.2f}s wall ({r['untracked_cpu_s']:.2f}s cpu) untracked, "
                f"{r['tracked_wall_s']:.2f}s wall ({r['tracked_cpu_s']:.2f}s cpu) with --track {args.track}; "
                f"ratio {r['ratio_wall']:.3f} wall, {r['ratio_cpu']:.3f} cpu"
            )
        print(json.dumps(report))
        if args.json is not None:
            args.json.write_text(json.dumps(report, indent=1))
        return report
    for precision in args.precisions:
        peak, peak_per_cpu = matmul_peak(args.matmul_size, precision)
        r = {
            "matmul_peak_gflops": peak,
            "matmul_gflop_per_cpu_s": peak_per_cpu,
            **epoch_throughput(config_for(precision), images, labels),
        }
        for phase in ("teacher_epoch", "student_epoch"):
            r[phase]["ratio_to_peak"] = r[phase]["gflops"] / peak
            # Per CPU second, the ratio is robust to other processes sharing the cores.
            r[phase]["cpu_ratio_to_peak"] = r[phase]["gflop_per_cpu_s"] / peak_per_cpu
        report["precisions"][precision] = r
        print(
            f"[{precision}] matmul peak ({args.matmul_size}^2): {peak:6.1f} GFLOP/s ({peak_per_cpu:.1f} per CPU second)"
        )
        for phase in ("teacher_epoch", "student_epoch"):
            p = r[phase]
            print(
                f"[{precision}] {phase:<14} {p['wall_s']:6.2f}s wall "
                f"{p['cpu_s']:6.2f}s cpu  {p['gflops']:6.1f} GFLOP/s  "
                f"ratio to peak {p['ratio_to_peak']:.2f} (per CPU second {p['cpu_ratio_to_peak']:.2f})"
            )
        print(
            f"[{precision}] training time per 10 seeds: {r['seconds_per_10_seeds']:.1f}s wall, "
            f"{r['cpu_seconds_per_10_seeds']:.1f}s CPU"
        )
    if len(args.precisions) == 2:
        f32, bf16 = (report["precisions"][p] for p in PRECISIONS)
        report["bf16_over_float32_cpu_time"] = bf16["cpu_seconds_per_10_seeds"] / f32["cpu_seconds_per_10_seeds"]
        print(f"bf16 / float32 training CPU time: {report['bf16_over_float32_cpu_time']:.2f}")

    if args.peer:
        report["peer"] = peer_end_to_end(config_for("float32"))
        peer = report["peer"]
        print(
            f"[peer: eager PyTorch] {args.seeds} seeds end to end: {peer['wall_s']:.1f}s wall, {peer['cpu_s']:.1f}s CPU"
        )
        report["end_to_end"] = {}
        for precision in args.precisions:
            ours = report["end_to_end"][precision] = end_to_end(config_for(precision))
            ours["ratio_to_peer_wall"] = ours["wall_s"] / peer["wall_s"]
            ours["ratio_to_peer_cpu"] = ours["cpu_s"] / peer["cpu_s"]
            print(
                f"[{precision}] {args.seeds} seeds end to end: {ours['wall_s']:.1f}s wall, {ours['cpu_s']:.1f}s CPU; "
                f"ours/peer {ours['ratio_to_peer_wall']:.2f} wall, {ours['ratio_to_peer_cpu']:.2f} CPU"
            )
    report["peak_rss_gb"] = peak_rss_gb()
    print(f"peak resident memory of this process: {report['peak_rss_gb']:.2f} GB")
    print(json.dumps(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
