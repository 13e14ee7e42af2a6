"""``sublearn theory``: the table, the JSON, the exit codes."""

from __future__ import annotations

import json

import pytest

from sublearn.cli import main


def test_checks_random_mlps_and_the_paper_mnist_mlp(tmp_path, capsys):
    out = tmp_path / "results" / "theory.json"
    code = main(["theory", "--cases", "1", "--mnist-cases", "1", "--mnist-samples", "8", "--quiet", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    result = json.loads(out.read_text())
    random_row, mnist_row = result["summary"]
    assert (random_row["cases"], mnist_row["cases"]) == (1, 1)
    assert random_row["shared_init_violations"] == 0 and mnist_row["shared_init_violations"] == 0
    (mnist,) = result["mnist_cases"]
    assert mnist["A"] > 0 and mnist["alignment"] > 0 and mnist["teacher_loss_change"] < 0
    assert abs(mnist["taylor_order"] - 2) < 0.2
    assert all(r["violations"] == [] and r["A"] >= 0 for r in result["random_cases"])
    # What the table shows is what the file holds.
    lines = printed.splitlines()
    mnist_line = next(line for line in lines if line.startswith("MNIST MLP 784-256-256-13"))
    assert f"{mnist_row['min_A']:.3g}" in mnist_line and f"{mnist['taylor_order']:.3f}" in mnist_line
    assert result["config"]["mnist_samples"] == 8 and result["environment"]["versions"]["jax"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--cases", "-1"], "--cases and --mnist-cases must be at least 0"),
        (["--cases", "0", "--mnist-cases", "0"], "nothing to check"),
        (["--mnist-samples", "0"], "--mnist-samples must be at least 1"),
        (["--mnist-cases", "2", "--mnist-samples", "30001"], "must be at most 60000"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    assert main(["theory", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_out_must_be_a_file(tmp_path, capsys):
    assert main(["theory", "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
