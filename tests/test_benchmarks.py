"""Smoke tests: every benchmark script's ``main`` runs on a small problem and reports sane numbers."""

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_mnist_throughput_runs_and_reports_ratios(capsys):
    report = _load("mnist_throughput").main(["--seeds", "2", "--n-train", "2048", "--n-noise", "2048", "--matmul-size", "512"])
    assert report["matmul_peak_gflops"] > 0
    for phase in ("teacher_epoch", "student_epoch"):
        assert report[phase]["wall_s"] > 0 and 0 < report[phase]["ratio_to_peak"] < 10
    assert "ratio to peak" in capsys.readouterr().out
