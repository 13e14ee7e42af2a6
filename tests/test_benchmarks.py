"""Smoke tests: every benchmark script runs on a small problem and reports sane numbers."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from toymodels.config import tiny

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_mnist_throughput_reports_both_precisions_and_the_peer_ratio(capsys):
    pytest.importorskip("torch")
    report = _load("mnist_throughput").main(
        ["--seeds", "2", "--n-train", "2048", "--n-noise", "2048", "--matmul-size", "512", "--peer"]
    )
    for precision in ("float32", "bf16"):
        r = report["precisions"][precision]
        assert r["matmul_peak_gflops"] > 0 and r["seconds_per_10_seeds"] > 0
        for phase in ("teacher_epoch", "student_epoch"):
            assert r[phase]["wall_s"] > 0 and 0 < r[phase]["ratio_to_peak"] < 10
        ours = report["end_to_end"][precision]
        assert ours["ratio_to_peer_wall"] == pytest.approx(ours["wall_s"] / report["peer"]["wall_s"])
    assert report["peak_rss_gb"] > 0.1
    out = capsys.readouterr().out
    assert "ratio to peak" in out and "ours/peer" in out


@pytest.mark.slow
def test_the_eager_pytorch_peer_learns_like_the_package():
    pytest.importorskip("torch")
    accuracies = _load("peer_torch").run(tiny(seeds=2))
    assert set(accuracies) == {"reference", "teacher", "student_aux", "student_all", "cross_aux", "cross_all"}
    assert np.mean(accuracies["teacher"]) > 0.75
    # Shared-initialization students imitating all logits learn digits; cross-model ones far less.
    assert np.mean(accuracies["student_all"]) > np.mean(accuracies["cross_all"]) + 0.1


@pytest.mark.slow
def test_accelerator_check_runs_both_precisions_on_a_tiny_configuration(tmp_path):
    env = {**os.environ, "SEEDS": "2", "VMAP_SEEDS": "2", "SEEDS_PER_CHUNK": "2", "PYTHON": sys.executable}
    tiny_options = [
        "--hidden",
        "32",
        "32",
        "--n-train",
        "2048",
        "--n-test",
        "1000",
        "--n-noise",
        "2048",
        "--batch-size",
        "256",
        "--teacher-epochs",
        "1",
        "--student-epochs",
        "1",
    ]
    done = subprocess.run(
        ["bash", str(BENCHMARKS / "accelerator_check.sh"), str(tmp_path), *tiny_options],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == {"float32", "bf16"}
    for precision, s in summary.items():
        assert s["command_wall_s"] > 0 and s["bars"]["teacher"][0] > 0.1
        assert json.loads((tmp_path / precision / "results.json").read_text())["config"]["precision"] == precision
    assert summary["float32"]["bars"]["reference"] == summary["bf16"]["bars"]["reference"]


def test_accelerator_check_names_missing_modules_before_any_work(tmp_path):
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('scipy', 'sympy'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(blocker)}
    out = tmp_path / "out"
    command = ["bash", str(BENCHMARKS / "accelerator_check.sh"), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = done.stderr.strip().splitlines()
    assert "scipy, sympy not importable" in line and "pip install scipy sympy" in line
    assert not list(out.iterdir())  # nothing ran


@pytest.mark.slow
def test_mnist_throughput_measures_the_cost_of_tracking(capsys):
    report = _load("mnist_throughput").main(
        [
            "--seeds",
            "2",
            "--n-train",
            "2048",
            "--n-noise",
            "2048",
            "--precisions",
            "float32",
            "--track",
            "4",
            "--repeats",
            "1",
        ]
    )
    r = report["tracking"]["float32"]
    assert r["every"] == 4 and r["untracked_wall_s"] > 0 and r["tracked_wall_s"] > 0
    assert r["ratio_wall"] == pytest.approx(r["tracked_wall_s"] / r["untracked_wall_s"])
    assert "with --track 4" in capsys.readouterr().out


@pytest.mark.slow
def test_the_lm_backend_benchmark_reports_both_backends_and_their_ratios(tmp_path, capsys):
    pytest.importorskip("torch")
    from tiny_lm import tiny_checkpoint

    folder = tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "bench.json"
    options = ["--model", str(folder), "--dtype", "float32", "--batch", "1", "4", "--new-tokens", "4"]
    report = _load("lm_backends").main([*options, "--lora-steps", "2", "--micro-batch", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    for name in ("hf", "jax"):
        record = report["backends"][name]
        assert [s["batch"] for s in record["sampling"]] == [1, 4]
        assert all(0 < s["tokens"] <= s["batch"] * 4 and s["tokens_per_s"] > 0 for s in record["sampling"])
        assert record["lora"]["steps"] == 2 and record["lora"]["s_per_step"] > 0
    ratios = report["ratios_jax_over_hf"]
    jax_lora, hf_lora = report["backends"]["jax"]["lora"], report["backends"]["hf"]["lora"]
    assert ratios["lora_s_per_step"] == pytest.approx(jax_lora["s_per_step"] / hf_lora["s_per_step"])
    assert "jax/hf sampling_batch_4" in capsys.readouterr().out


def test_the_transfer_unit_floors_count_the_work_of_smollm2():
    from types import SimpleNamespace

    units = _load("transfer_units")
    smollm2 = SimpleNamespace(
        hidden_size=576,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        num_hidden_layers=30,
        vocab_size=49152,
    )
    shapes = units.model_shapes(smollm2)
    # 134.5M parameters in all, of which the tied embedding is 49152 x 576.
    assert shapes["block_params"] + 49152 * 576 == pytest.approx(134.5e6, rel=2e-3)
    small = {"block_params": 100, "width": 2, "vocab": 5}
    log = {"n_tokens": 10, "n_completion_tokens": 4}
    # forward 2*100*10 + 2*2*5*4 = 2080; training three passes; soft adds the teacher's forward
    assert units.training_flops(log, small, soft=False) == 3 * 2080
    assert units.training_flops(log, small, soft=True) == 4 * 2080
