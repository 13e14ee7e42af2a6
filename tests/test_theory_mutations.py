"""The check catches broken implementations of the steps it measures.

Each mutant (:class:`theory.numerical.Faults`) breaks one step: the student climbing its
loss, the student imitating the teacher's outputs at 2 eps, the teacher climbing its loss.
Each must show as a violation in :meth:`AlignmentResult.violations` and make
``sublearn theory``'s verdict (:func:`theory.cli.failures`) non-empty, instead of being
halved into rounding until every sign check passes.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import numpy as np
import pytest

from theory.cases import MLP, CaseSpec, NumpyChooser, build_case, choose_spec, init_mlp
from theory.cli import evaluate, failures, summarize
from theory.numerical import RESOLUTION, Faults, check_alignment, tolerances

STUDENT_CLIMBS = Faults(student_step_sign=-1.0)
TEACHER_OUTPUTS_AT_2EPS = Faults(teacher_output_scale=2.0)
TEACHER_CLIMBS = Faults(teacher_step_sign=-1.0)

# What each mutant must trip: the measured alignment no longer follows eps*A (a and b,
# at every eps, so halving stops at the resolution floor), its sign (a), and the
# teacher's loss rising under the student's step (a: the student climbs the L_T the
# teacher descended; c: the student follows a teacher that climbed it).
EXPECTED = {
    "student climbs": (STUDENT_CLIMBS, {"alignment < 0", "not in the Taylor regime", "L_T increased"}),
    "teacher outputs at 2 eps": (TEACHER_OUTPUTS_AT_2EPS, {"not in the Taylor regime"}),
    "teacher climbs": (TEACHER_CLIMBS, {"L_T increased"}),
}

# A small smooth case with a teacher loss: tanh MLP, softmax cross-entropy student,
# teacher stepping down cross-entropy on random labels.
SPEC = CaseSpec(
    MLP((3, 5, 4), "tanh"), "normal", 1.0, 0.5, "normal", 8, "softmax_cross_entropy", "cross_entropy", seed=3
)


def _check(case, faults):
    return check_alignment(case.model, case.params, case.inputs, faults=faults, **case.check_kwargs())


def test_correct_check_passes_the_same_case():
    r = _check(build_case(SPEC), Faults())
    assert r.violations() == [] and r.halvings == 0
    assert abs(r.first_order) >= RESOLUTION * tolerances(r)["alignment"]


@pytest.mark.parametrize("name", EXPECTED)
def test_mutant_is_a_violation_measured_above_rounding(name):
    faults, expected = EXPECTED[name]
    r = _check(build_case(SPEC), faults)
    assert expected <= set(r.violations()), r.violations()
    # Measured where eps*A is still far above rounding: the halving stopped at the floor,
    # not 40 halvings later where every sign check passes vacuously.
    tol = tolerances(r)
    assert abs(r.first_order) >= RESOLUTION * tol["alignment"] / 2.01
    assert r.halvings < 40
    if faults is TEACHER_OUTPUTS_AT_2EPS:
        np.testing.assert_allclose(r.alignment / r.first_order, 2.0, rtol=1e-3)  # 2 eps A, not eps A
    if faults is STUDENT_CLIMBS:
        np.testing.assert_allclose(r.alignment / r.first_order, -1.0, rtol=1e-3)
    if faults is TEACHER_CLIMBS:
        assert r.teacher_loss_change > 1e4 * tol["teacher_loss"]
        np.testing.assert_allclose(r.teacher_loss_first, r.alpha * r.A, rtol=1e-6)  # +alpha A, not -alpha A


@pytest.mark.parametrize("name", ["student climbs", "teacher outputs at 2 eps"])
def test_mutants_without_a_teacher_loss_are_caught_by_the_alignment(name):
    # A teacher direction and no L_T: only the alignment against eps*A can catch them.
    spec = CaseSpec(MLP((2, 3, 3), "gelu"), "uniform", 1.5, 0.0, "sparse", 3, "squared_error", "direction", seed=7)
    faults, _ = EXPECTED[name]
    r = _check(build_case(spec), faults)
    assert "not in the Taylor regime" in r.violations()


def test_every_mutant_is_caught_on_random_cases():
    chooser = NumpyChooser(np.random.default_rng(5))
    specs = [choose_spec(chooser, teachers=("cross_entropy", "squared_error")) for _ in range(4)]
    for spec in specs:
        case = build_case(spec)
        assert _check(case, Faults()).violations() == [], spec
        for name, (faults, expected) in EXPECTED.items():
            assert expected <= set(_check(case, faults).violations()), (name, spec)


@pytest.mark.parametrize("name", EXPECTED)
def test_sublearn_theory_fails_on_each_mutant(name):
    faults, _ = EXPECTED[name]
    case = build_case(SPEC)
    other = init_mlp(case.model, np.random.default_rng(11), bias_scale=0.5)
    good = evaluate(case.model, case.params, other, case.inputs, **case.check_kwargs())
    bad = evaluate(case.model, case.params, other, case.inputs, faults=faults, **case.check_kwargs())
    assert failures([summarize("correct", [good])]) == []
    lines = failures([summarize("mutant", [good, bad])])
    assert any("violate the lemma" in line for line in lines), lines
    if faults is not TEACHER_CLIMBS:  # a wrong first-order coefficient leaves an order-1 error
        assert bad["taylor_order"] is not None and abs(bad["taylor_order"] - 1.0) < 0.1
        assert any("Taylor order other than predicted" in line for line in lines), lines


@pytest.mark.parametrize("name", [None, *EXPECTED])
def test_the_command_exits_1_on_each_mutant_and_0_on_the_correct_check(name, monkeypatch, capsys):
    # The whole program, main() to exit code: two random cases, each the small tanh case
    # with its own seed (so the draw does not depend on the chooser), the check running
    # with the mutant's fault wherever the command calls it.
    import theory.cases
    import theory.numerical
    from theory.cli import main

    seeds = itertools.count(3)
    monkeypatch.setattr(theory.cases, "choose_spec", lambda chooser, **_: dataclasses.replace(SPEC, seed=next(seeds)))
    if name is not None:
        faults, _ = EXPECTED[name]
        monkeypatch.setattr(
            theory.numerical, "check_alignment", functools.partial(theory.numerical.check_alignment, faults=faults)
        )
    code = main(["--cases", "2", "--mnist-cases", "0", "--quiet"])
    out, err = capsys.readouterr()
    assert "random MLPs" in out
    if name is None:
        assert (code, err) == (0, "")
        return
    expected = ["sublearn theory: random MLPs: 2 case(s) violate the lemma under shared initialization"]
    if name != "teacher climbs":  # a wrong first-order coefficient also leaves an order-1 error
        expected.append(
            "sublearn theory: random MLPs: 2 case(s) with a Taylor order other than predicted "
            "(2 +- 0.2, or at least 3 - 0.2 where C = 0)"
        )
    assert (code, err.strip().splitlines()) == (1, expected)


def test_a_float32_model_is_refused():
    case = build_case(SPEC)

    def float32_model(params, x):
        return case.model(params, x).astype(np.float32)

    with pytest.raises(TypeError, match="model's outputs .* computed in float32, not float64"):
        check_alignment(float32_model, case.params, case.inputs, **case.check_kwargs())
