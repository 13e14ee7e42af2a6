"""``sublearn theory``: the table, the JSON, the exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sublearn.cli import main
from theory.cli import failures, format_table
from theory.numerical import RESOLUTION


def test_checks_random_mlps_and_the_paper_mnist_mlp(tmp_path, capsys):
    out = tmp_path / "results" / "theory.json"
    code = main(["theory", "--cases", "1", "--mnist-cases", "1", "--mnist-samples", "8", "--quiet", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    result = json.loads(out.read_text())
    random_row, mnist_row = result["summary"]
    assert (random_row["cases"], mnist_row["cases"]) == (1, 1)
    assert random_row["shared_init_violations"] == 0 and mnist_row["shared_init_violations"] == 0
    assert result["failures"] == []
    (mnist,) = result["mnist_cases"]
    assert mnist["A"] > 0 and mnist["alignment"] > 0 and mnist["teacher_loss_change"] < 0
    assert abs(mnist["taylor_order"] - 2) < 0.2
    # Measured far above rounding, not halved into it.
    assert mnist["in_taylor_regime"] and mnist["first_order_over_tolerance"] >= RESOLUTION
    assert all(r["violations"] == [] and r["A"] > 0 and r["halvings"] < 40 for r in result["random_cases"])
    # Different initialization: three separately labelled numbers per case.
    for r in result["random_cases"] + result["mnist_cases"]:
        assert r["different_init_eps_part"] == r["different_init_alignment"] - r["different_init_zeroth_order"]
        assert r["different_init_cross_term_negative"] == (r["different_init_cross_term"] < 0)
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


def _row(**overrides):
    row = dict(
        name="g",
        cases=4,
        at_kink=0,
        A_zero=0,
        min_A=0.5,
        shared_init_violations=0,
        halvings_max=1,
        taylor_order_median=2.0,
        taylor_order_min=1.9,
        taylor_order_max=2.1,
        taylor_order_outside=0,
        taylor_exact=0,
        different_init_cross_term_negative=1,
        different_init_eps_part_negative=1,
        different_init_zeroth_order_negative=2,
    )
    return {**row, **overrides}


def test_exit_verdict_counts_violations_and_taylor_orders_but_not_different_init_signs():
    assert failures([_row(different_init_cross_term_negative=4, different_init_eps_part_negative=4)]) == []
    assert failures([_row(shared_init_violations=1)]) == ["g: 1 case(s) violate the lemma under shared initialization"]
    assert failures([_row(taylor_order_outside=2)]) == ["g: 2 case(s) with a Taylor order outside [1.8, 2.2]"]
    assert "1 case(s) with a ReLU exactly at its kink" in format_table([_row(at_kink=1)])
    table = format_table([_row()])
    assert "different init" in table.splitlines()[0] and "counts, not violations" in table
    header, row = table.splitlines()[1:3]
    assert header.split()[-3:] == ["A_x", "a-a0", "a0"] and row.split()[-3:] == ["1/4", "1/4", "2/4"]


def test_relu_cases_at_a_kink_are_counted_apart():
    # Zero biases and an all-zero input row put every first-layer ReLU exactly at 0.
    from theory.cases import MLP, init_mlp
    from theory.cli import summarize

    mlp = MLP((2, 3, 2), "relu")
    params = init_mlp(mlp, np.random.default_rng(0))
    assert mlp.units_at_kink(params, np.zeros((2, 2))) == 6
    assert mlp.units_at_kink(params, np.ones((2, 2))) == 0
    assert MLP((2, 3, 2), "tanh").units_at_kink(params, np.zeros((2, 2))) == 0
    smooth = dict(
        A=1.0,
        A_is_zero=False,
        first_order_over_tolerance=1e9,
        violations=[],
        halvings=0,
        eps=0.1,
        taylor_order=2.0,
        different_init_cross_term_negative=False,
        different_init_eps_part_negative=False,
        different_init_zeroth_order_negative=True,
        units_at_kink=0,
    )
    kink = {**smooth, "violations": ["not in the Taylor regime"], "taylor_order": 1.0, "units_at_kink": 3}
    row = summarize("g", [smooth, kink])
    assert (row["at_kink"], row["shared_init_violations"], row["taylor_order_outside"]) == (1, 0, 0)
    assert failures([row]) == []
    assert failures([summarize("g", [smooth, {**kink, "units_at_kink": 0}])]) != []
