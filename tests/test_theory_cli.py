"""``sublearn theory``: the table, the JSON, the exit codes."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from sublearn.cli import main
from theory.cases import MLP
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
    assert abs(mnist["taylor_order"] - 2) < 0.2 and mnist["taylor_order_expected"] == 2
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
    assert failures([_row(taylor_order_outside=2)]) == [
        "g: 2 case(s) with a Taylor order other than predicted (2 +- 0.2, or at least 3 - 0.2 where C = 0)"
    ]
    assert "1 case(s) with a ReLU exactly at its kink" in format_table([_row(at_kink=1)])
    table = format_table([_row()])
    assert "different init" in table.splitlines()[0] and "counts, not violations" in table
    header, row = table.splitlines()[1:3]
    assert header.split()[-3:] == ["A_x", "a-a0", "a0"] and row.split()[-3:] == ["1/4", "1/4", "2/4"]


def test_a_first_order_term_below_rounding_is_counted_apart_unless_it_is_common():
    from theory.cases import MLP, CaseSpec, build_case
    from theory.cli import evaluate, summarize

    # Softplus outputs of norm 18 saturate the softmax: the teacher's step moves the
    # student's loss by eps*A ~ 1e-15 at eps = 1, the largest the check allows, where
    # float64 rounds the alignment at ~1e-15.
    spec = CaseSpec(
        MLP((2, 3, 3, 3), "softplus"), "normal", 1.39, 0.5, "shifted", 1, "softmax_cross_entropy", "cross_entropy", 80
    )
    case = build_case(spec)
    record = evaluate(case.model, case.params, case.params, case.inputs, **case.check_kwargs())
    assert record["unresolved"] and not record["A_is_zero"] and record["violations"] == ["not in the Taylor regime"]
    assert record["first_order_over_tolerance"] < 10
    good = {**record, "unresolved": False, "violations": [], "taylor_order_as_expected": True}
    row = summarize("g", [record] + [good] * 19)
    assert (row["unresolved"], row["shared_init_violations"], row["taylor_order_outside"]) == (1, 0, 0)
    assert not any("violate" in line or "below rounding" in line for line in failures([row]))
    assert "1 case(s) whose first-order term eps*A cannot be resolved" in format_table([row])
    crowded = summarize("g", [record] * 3 + [good] * 17)
    assert any("3 of 20 case(s) with a first-order term below rounding" in line for line in failures([crowded]))


def test_a_teacher_step_that_moves_only_the_last_bias_may_leave_a_x_equal_to_a():
    from theory.cases import MLP, CaseSpec, build_case
    from theory.cli import evaluate, summarize

    # The teacher's loss sees one all-zero input with zero biases: every hidden ReLU sits at
    # its kink there, so L_T's gradient moves only the last bias, and so does the step for
    # both initializations: A_x = A exactly.
    spec = CaseSpec(
        MLP((2, 3, 4), "relu"), "uniform", 1.0902418165365209, 0.0, "sparse", 1, "squared_error", "squared_error", 247
    )
    case = build_case(spec)
    assert case.moves_only_last_bias()
    assert not build_case(dataclasses.replace(spec, mlp=MLP((2, 3, 4), "tanh"))).moves_only_last_bias()
    assert not build_case(dataclasses.replace(spec, bias_scale=0.5)).moves_only_last_bias()
    record = evaluate(case.model, case.params, case.other_params, case.inputs, **case.check_kwargs())
    assert record["different_init_equals_shared"] and record["A"] > 0
    record.update(hidden_layers=1, moves_only_last_bias=True, units_at_kink=0)
    assert summarize("g", [record])["different_init_equals_shared"] == 0
    assert summarize("g", [{**record, "moves_only_last_bias": False}])["different_init_equals_shared"] == 1


def test_a_kink_on_the_teacher_loss_data_counts_as_a_kink():
    from theory.cases import CaseSpec, build_case
    from theory.numerical import check_alignment

    # Zero biases: a sample of the teacher's own data that turns the first layer off puts
    # the second layer exactly at its kink there, not on the check's inputs. L_T's change
    # then follows its one-sided first-order term at no eps.
    spec = CaseSpec(MLP((3, 5, 5, 3), "relu"), "normal", 1.0, 0.0, "normal", 3, "squared_error", "cross_entropy", 213)
    case = build_case(spec)
    assert case.model.units_at_kink(case.params, case.inputs) == 0 and case.units_at_kink() == 5
    assert check_alignment(case.model, case.params, case.inputs, **case.check_kwargs()).violations() == [
        "not in the Taylor regime"
    ]


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
        taylor_order_as_expected=True,
        taylor_exact=False,
        different_init_cross_term_negative=False,
        different_init_eps_part_negative=False,
        different_init_zeroth_order_negative=True,
        units_at_kink=0,
    )
    kink = {
        **smooth,
        "violations": ["not in the Taylor regime"],
        "taylor_order": 1.0,
        "taylor_order_as_expected": False,
        "different_init_equals_shared": True,  # only the output biases move the outputs
        "units_at_kink": 3,
    }
    row = summarize("g", [smooth, kink])
    assert (row["at_kink"], row["shared_init_violations"], row["taylor_order_outside"]) == (1, 0, 0)
    assert row["different_init_equals_shared"] == 0
    assert summarize("g", [smooth, {**kink, "units_at_kink": 0}])["different_init_equals_shared"] == 1
    assert failures([row]) == []
    assert failures([summarize("g", [smooth, {**kink, "units_at_kink": 0}])]) != []


def test_nothing_to_check_fails_the_verdict_and_explained_zeros_are_listed_apart():
    assert failures([_row(A_zero=4)]) == [
        "g: A = 0 in every case, so nothing was checked (do the model's outputs depend on its parameters?)"
    ]
    assert failures([_row(A_zero=1)]) == [
        "g: 1 case(s) with A = 0 that their spec does not explain "
        "(a teacher step that does not move the outputs the student is scored on)"
    ]
    explained = _row(A_zero=1, A_zero_explained=1, A_zero_explanations=["a subset loss over one logit is constant"])
    assert failures([explained]) == []
    assert "1 case(s) with A = 0 by construction (a subset loss over one logit is constant)" in format_table(
        [explained]
    )
    # Explained or not, a group in which every A is 0 checked nothing.
    assert failures([_row(A_zero=4, A_zero_explained=4)]) != []
    assert failures([_row(different_init_equals_shared=2)]) == [
        "g: 2 case(s) with a hidden layer have the same A under different initialization: "
        "the student's own parameters were not used"
    ]
    no_signs = dict(different_init_cross_term_negative=0, different_init_eps_part_negative=0)
    no_signs["different_init_zeroth_order_negative"] = 0
    assert failures([_row(cases=6, **no_signs)]) == []  # 2^-6 > 1%: likely enough by chance
    assert failures([_row(cases=7, **no_signs)]) == [
        "g: no negative A_x, a(eps) - a0 or a0 in 7 different-initialization cases "
        "(chance below 2^-7 if the check works)"
    ]


def test_only_a_one_logit_subset_explains_a_zero_alignment():
    from theory.cases import MLP, CaseSpec
    from theory.cli import zero_alignment_explained

    spec = CaseSpec(
        MLP((2, 3, 3)), "normal", 1.0, 0.0, "normal", 4, "subset_softmax_cross_entropy", "direction", 0, (1,)
    )
    assert zero_alignment_explained(spec) == "a subset loss over one logit is constant"
    assert zero_alignment_explained(dataclasses.replace(spec, subset=(0, 1))) is None
    assert zero_alignment_explained(dataclasses.replace(spec, student_loss="squared_error", subset=())) is None


@dataclasses.dataclass(frozen=True)
class _IgnoresItsParameters(MLP):
    """A planted defect: outputs that depend on the inputs only, so every A is 0."""

    def __call__(self, params, x):
        return jnp.tanh(x[:, :1]) * jnp.ones((1, self.sizes[-1]))


def _theory(argv, capsys):
    code = main(["theory", "--quiet", *argv])
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def test_the_command_exits_0_when_the_lemma_is_checked_and_1_when_a_planted_defect_leaves_nothing_to_check(
    monkeypatch, capsys
):
    import theory.cases
    import theory.numerical

    argv = ["--cases", "8", "--mnist-cases", "1", "--mnist-samples", "4"]
    code, out, err = _theory(argv, capsys)
    assert (code, err) == (0, [])
    assert "random MLPs" in out and "MNIST MLP" in out

    build_case = theory.cases.build_case
    monkeypatch.setattr(
        theory.cases,
        "build_case",
        lambda spec: dataclasses.replace(
            build_case(spec), model=_IgnoresItsParameters(spec.mlp.sizes, spec.mlp.activation)
        ),
    )
    code, _, err = _theory(["--cases", "4", "--mnist-cases", "0"], capsys)
    assert code == 1
    assert "sublearn theory: random MLPs: A = 0 in every case, so nothing was checked" in err[0]
    monkeypatch.undo()

    check_alignment = theory.numerical.check_alignment

    def drops_the_students_parameters(*args, student_params=None, **kwargs):
        return check_alignment(*args, **kwargs)

    monkeypatch.setattr(theory.numerical, "check_alignment", drops_the_students_parameters)
    code, _, err = _theory(argv, capsys)
    assert code == 1
    assert any("MNIST MLP 784-256-256-13: 1 case(s) with a hidden layer have the same A" in line for line in err)
    assert any(line.startswith("sublearn theory: random MLPs: ") and "not used" in line for line in err)


def test_the_different_initialization_record_is_the_librarys_check_with_the_students_parameters():
    import theory.cases
    from theory.cli import evaluate
    from theory.numerical import check_alignment

    spec = theory.cases.CaseSpec(
        theory.cases.MLP((3, 5, 4), "tanh"), "normal", 1.0, 0.1, "normal", 8, "softmax_cross_entropy", "direction", 3
    )
    case = theory.cases.build_case(spec)
    record = evaluate(case.model, case.params, case.other_params, case.inputs, **case.check_kwargs())
    library = check_alignment(case.model, case.params, case.inputs, **case.check_kwargs(shared_init=False))
    assert record["different_init_cross_term"] == library.A
    assert record["different_init_zeroth_order"] == library.zeroth_order
    assert record["different_init_eps_part"] == library.eps_part
    assert abs(record["different_init_cross_term"] - record["A"]) > 1e-3 * abs(record["A"])
    assert not record["different_init_equals_shared"]
