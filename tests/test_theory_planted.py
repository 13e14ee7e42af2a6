"""Pins for slips that the other theory tests let through.

Each test here failed on one deliberately planted bug (a wrong axis, a tolerance read
from the wrong quantity, an off-by-one, a cache keyed on too little, a missing ``abs``)
that every other test in ``tests/test_theory_*.py`` passed, and passes on the correct
code. Most pin a number computed independently (numpy, an explicit formula) or a
synthetic :class:`AlignmentResult` whose tolerances are known exactly, so they are fast.
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sympy as sp
from hypothesis import given, settings
from test_theory_numerical import TANH_MLP, _tanh_case  # the tests' shared tanh case

from theory import symbolic
from theory.cases import MLP, CaseSpec, NumpyChooser, build_case, choose_spec, init_mlp
from theory.numerical import (
    NOISE_MARGIN,
    RESOLUTION,
    AlignmentResult,
    Convergence,
    Faults,
    SubsetSoftmaxCrossEntropy,
    check_alignment,
    convergence,
    fit_order,
    softmax_cross_entropy,
    squared_error,
    target_squared_error,
    tolerances,
)
from theory.strategies import cases, student_losses


def _jvps(params, other, direction, x):
    """``J_T v`` and ``J_S v`` per example, in float64, from plain JAX (not the check)."""
    with jax.enable_x64(True):
        p64, o64, v64, x64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (params, other, direction, x))
        u_t = jax.jvp(lambda p: TANH_MLP(p, x64), (p64,), (v64,))[1]
        u_s = jax.jvp(lambda p: TANH_MLP(p, x64), (o64,), (v64,))[1]
        return np.asarray(u_t), np.asarray(u_s)


# ---------------------------------------------------------------------------------------
# The scales that the tolerances multiply, against explicit per-example formulas
# ---------------------------------------------------------------------------------------


def test_a_scale_and_jvp_scale_are_means_over_examples():
    # A_scale = E_x |(J_S v)^T M (J_T v)| and jvp_scale = E_x |J_S v| |J_T v|, both per
    # example (rows), not per output coordinate (columns). Squared error: M = 2I.
    params, x, v = _tanh_case()
    other = init_mlp(TANH_MLP, np.random.default_rng(99), bias_scale=0.5)
    r = check_alignment(TANH_MLP, params, x, student_params=other, student_loss=squared_error, direction=v)
    u_t, u_s = _jvps(params, other, v, x)
    per_example = 2.0 * np.sum(u_s * u_t, axis=1)
    assert np.any(per_example < 0) and np.any(per_example > 0)  # signs mix: |.| matters
    np.testing.assert_allclose(r.A_scale, np.mean(np.abs(per_example)), rtol=1e-12)
    expected_jvp_scale = np.mean(np.linalg.norm(u_s, axis=1) * np.linalg.norm(u_t, axis=1))
    np.testing.assert_allclose(r.jvp_scale, expected_jvp_scale, rtol=1e-12)


def test_a_scale_equals_a_under_shared_initialization_with_cross_entropy():
    # Shared init, M = diag(p) - pp^T PSD: every per-example term u^T M u >= 0, so the mean
    # of their absolute values is A itself. Per output coordinate the off-diagonal -p p^T
    # makes terms negative, and summing those |.| would give a larger number.
    params, x, v = _tanh_case()
    r = check_alignment(TANH_MLP, params, x, student_loss=softmax_cross_entropy, direction=v)
    assert r.A > 0
    np.testing.assert_allclose(r.A_scale, r.A, rtol=1e-12)


# ---------------------------------------------------------------------------------------
# Tolerances and claims, on synthetic results whose tolerances are known exactly
# ---------------------------------------------------------------------------------------


def _result(**overrides) -> AlignmentResult:
    # tol["A"] = 1e-12 * (1 + 1) = 2e-12, tol["alignment"] = 1e-12 * 100 = 1e-10,
    # tol["teacher_loss"] = 1e-12 * 1e6 = 1e-6: three different numbers, so a claim read
    # against the wrong one shows.
    fields = dict(
        eps=1e-3,
        alpha=1.0,
        dtheta_S=None,
        dtheta_T=None,
        alignment=1e-3,
        cosine=0.5,
        zeroth_order=0.0,
        A=1.0,
        A_scale=1.0,
        jvp_scale=1.0,
        alignment_scale=100.0,
        second_order=0.0,
        teacher_loss_change=math.nan,
        teacher_loss=1e6,
        teacher_loss_first=math.nan,
    )
    return AlignmentResult(**{**fields, **overrides})


def test_synthetic_result_has_the_intended_tolerances():
    tol = tolerances(_result())
    np.testing.assert_allclose([tol["A"], tol["alignment"], tol["teacher_loss"]], [2e-12, 1e-10, 1e-6], rtol=1e-12)
    assert _result().violations() == []


def test_resolved_compares_eps_a_with_the_alignments_tolerance():
    # RESOLUTION * tol["alignment"] = 1e-6, RESOLUTION * tol["A"] = 2e-8: eps A = 1e-7 lies
    # between them, resolved only if judged against the (wrong) tolerance of A.
    r = _result(eps=1e-7, alignment=1e-7)
    assert RESOLUTION * tolerances(r)["A"] < abs(r.first_order) < RESOLUTION * tolerances(r)["alignment"]
    assert not r.resolved()
    assert r.resolved(eps=2e-6) and not r.resolved(eps=5e-7)
    assert r.violations() == ["not in the Taylor regime"]


def test_a_is_zero_uses_the_tolerance_of_a():
    # |A| = 5e-11: above tol["A"] (2e-12), below tol["alignment"] (1e-10).
    assert not _result(A=5e-11, A_scale=5e-11, alignment=5e-14).A_is_zero
    assert _result(A=1e-12, A_scale=1e-12, alignment=1e-15).A_is_zero


@pytest.mark.parametrize("a0", [-1e-6, 1e-6])
def test_a_nonzero_zeroth_order_term_is_a_violation_of_either_sign(a0):
    # 1e-6 is 1e4 times tol["alignment"]: a loss not stationary at z = y, whichever way.
    r = _result(zeroth_order=a0, alignment=a0 + 1e-3)
    assert "zeroth order != 0" in r.violations()
    assert "zeroth order != 0" not in _result(zeroth_order=-5e-11, alignment=1e-3 - 5e-11).violations()


def test_teacher_loss_claims_use_the_teacher_loss_tolerance():
    # Rises of 1e-7 (within tol["teacher_loss"] = 1e-6) pass, 1e-5 do not; both are far
    # above the alignment's tolerance, so a mixed-up tolerance flags the first one.
    assert "L_T increased" not in _result(teacher_loss_change=1e-7).violations()
    assert "L_T increased" in _result(teacher_loss_change=1e-5).violations()


# ---------------------------------------------------------------------------------------
# The halving of eps stops at the last resolved eps
# ---------------------------------------------------------------------------------------


def test_halving_stops_at_the_last_eps_that_is_still_resolved():
    # A wrong step (the student imitates the teacher at 2 eps) never comes to follow eps*A,
    # so the check halves eps down to the resolution floor. It must stop at the smallest
    # eps that is still resolved (the next halving would not be), not one halving past it.
    spec = CaseSpec(
        MLP((3, 5, 4), "tanh"), "normal", 1.0, 0.5, "normal", 8, "softmax_cross_entropy", "cross_entropy", seed=3
    )
    case = build_case(spec)
    r = check_alignment(
        case.model, case.params, case.inputs, faults=Faults(teacher_output_scale=2.0), **case.check_kwargs()
    )
    assert r.halvings > 0
    assert r.resolved() and not r.resolved(r.eps / 2)
    assert r.violations() == ["not in the Taylor regime"]


# ---------------------------------------------------------------------------------------
# The compiled check is keyed on the loss's parameters, not only on its type
# ---------------------------------------------------------------------------------------


def _outputs_are_params(theta, x):
    """J = I: A is u^T M u for the direction u."""
    return jnp.broadcast_to(theta[None, :], (x.shape[0], theta.shape[0]))


def test_subset_losses_with_other_indices_do_not_share_a_compilation():
    # Same shapes, two subsets: each must give its own A = u_S^T (diag(p_S) - p_S p_S^T) u_S.
    logits = np.array([0.3, -0.2, 0.5, 1.1])
    u = np.array([0.0, 0.0, 1.0, -1.0])  # moves only logits 2 and 3
    for subset in [(0, 1), (2, 3), (0, 1)]:
        r = check_alignment(
            _outputs_are_params,
            logits,
            np.zeros((1, 1)),
            student_loss=SubsetSoftmaxCrossEntropy(subset),
            direction=u,
            eps=1e-3,
        )
        p = np.exp(logits[list(subset)]) / np.exp(logits[list(subset)]).sum()
        u_s = u[list(subset)]
        expected = u_s @ (np.diag(p) - np.outer(p, p)) @ u_s
        np.testing.assert_allclose(r.A, expected, rtol=1e-12, atol=1e-15)
    assert expected == 0.0 and r.A == 0.0  # (0, 1) does not see the move


# ---------------------------------------------------------------------------------------
# Teacher losses, the order fit and the convergence grid
# ---------------------------------------------------------------------------------------


def test_target_squared_error_is_a_mean_over_examples_of_a_sum_over_outputs():
    outputs = jnp.array([[1.0, 2.0], [0.0, -1.0], [3.0, 0.5]])  # 3 examples, 2 outputs
    targets = np.zeros((3, 2), np.float32)
    # (1 + 4) + (0 + 1) + (9 + 0.25), over 3 examples
    assert float(target_squared_error(outputs, targets)) == pytest.approx(15.25 / 3, rel=1e-6)


def test_fit_order_uses_the_smallest_clear_eps():
    # Residual eps^2 below 1e-3 and eps^1 above (a kink): the asymptotic order is 2, read
    # from the three smallest eps whose residual clears the floor (the very smallest does not).
    eps = [10.0**-k for k in range(1, 8)]
    residual = [e**2 if e < 1e-3 else 1e-3 * e for e in eps]
    floor = [1e-13] * len(eps)
    order, n = fit_order(eps, residual, floor, points=3)
    assert n == 3
    np.testing.assert_allclose(order, 2.0, rtol=1e-9)  # from eps 1e-4, 1e-5, 1e-6
    assert fit_order(eps, residual, [1.0] * len(eps)) == (math.inf, 0)


def _grid(residual, second_order=1.0, first_order=0.0):
    """A Convergence over eps = 1e-1 ... 1e-11 whose residual is ``residual(eps)``: the
    prediction is ``first_order * eps`` (a0 = 0) and the alignment that plus the residual."""
    eps = [10.0 ** -(k / 2) for k in range(2, 23)]
    first = [first_order * e for e in eps]
    return Convergence.from_grid(
        eps, [f + residual(e) for f, e in zip(first, eps)], first, first, [second_order] * len(eps)
    )


def test_the_order_is_read_just_above_the_rounding_plateau():
    # Rounding of 2e-15 whatever eps is, and 1e-14 once, at the fifth-smallest eps.
    eps = [10.0 ** -(k / 2) for k in range(2, 23)]
    noise = {e: 1e-14 if e == eps[-5] else 2e-15 for e in eps}
    fit = _grid(lambda e: 0.3 * e * e + noise[e], second_order=0.3)
    # The rounding level is the largest residual over two decades of the flat tail.
    assert fit.rounding == pytest.approx(1e-14, rel=1e-3) and not any(fit.lost)
    clear = sorted(e for r, e in zip(fit.residual, fit.eps) if r > NOISE_MARGIN * fit.rounding)
    assert fit.n_fitted == 4 and clear[0] == pytest.approx(1e-6)  # 0.3 eps^2 = 3e-13 there, 3e-14 below
    assert abs(fit.order - 2) < 0.05 and fit.expected_order == 2 and fit.order_as_expected()
    # A floor at the plateau itself (the rule a fixed floor amounts to when it is too low)
    # lets rounding into the fit and bends the slope.
    low_floor, _ = fit_order(fit.eps, fit.residual, [0.5e-14] * len(fit.eps))
    assert abs(low_floor - 2) > 0.2


def test_points_where_the_step_is_lost_in_rounding_are_left_out():
    # Below 1e-7 the measured alignment is exactly a0: the residual is eps * A there.
    eps_a, c = 1e3, 0.3

    def residual(e):
        return eps_a * e if e < 1e-7 else c * e * e + 1e-16

    fit = _grid(lambda e: -residual(e), second_order=c, first_order=eps_a)
    assert [e < 1e-7 for e in fit.eps] == list(fit.lost)
    assert abs(fit.order - 2) < 0.05 and fit.order_as_expected()
    # A step that is wrong (doubled, or the student climbing its loss) is never lost:
    # its order-1 error fails.
    for wrong in (1.0, -2.0):  # a(eps) - a0 = 2 eps A, -eps A
        bad = _grid(lambda e, wrong=wrong: wrong * eps_a * e + c * e * e, second_order=c, first_order=eps_a)
        assert not any(bad.lost) and abs(bad.order - 1) < 0.05 and not bad.order_as_expected()
    # Nothing left at all fails too.
    gone = _grid(lambda e: -eps_a * e, second_order=c, first_order=eps_a)
    assert all(gone.lost) and not gone.order_as_expected()


def test_the_expected_order_is_3_where_the_second_order_term_vanishes():
    cubic = _grid(lambda e: 0.3 * e**3, second_order=0.0)
    assert abs(cubic.order - 3) < 1e-6 and cubic.expected_order == 3 and cubic.order_as_expected()
    # ... but an order of 3 where C is not zero is a failure, and so is order 1 either way.
    assert not _grid(lambda e: 0.3 * e**3 + 1e-30, second_order=0.3).order_as_expected()
    for c in (0.0, 1.0):
        wrong_slope = _grid(lambda e: 0.01 * e, second_order=c)  # a first-order coefficient off by 1%
        assert abs(wrong_slope.order - 1) < 1e-6 and not wrong_slope.order_as_expected()
    exact = _grid(lambda e: 0.0)
    assert exact.order == math.inf and exact.expected_order is None and exact.order_as_expected()
    # A residual well below the second-order term says C (or the measured step) is wrong.
    short = _grid(lambda e: 0.1 * e * e, second_order=0.3)
    assert (
        short.expected_order == 2 and short.second_order_ratio == pytest.approx(1 / 3) and not short.order_as_expected()
    )


def test_the_fit_stops_where_a_relu_switches():
    # Smooth below eps = 1e-6 (residual C eps^2 over a rounding floor of 1e-16), a kink's
    # order-1 error above it: the fit keeps to the smooth stretch, however short.
    def residual(e):
        return 0.3 * e * e + 1e-16 + (1e-3 * e if e > 1e-6 else 0.0)

    fit = _grid(residual, second_order=0.3)
    fitted = [e for e, f in zip(fit.eps, fit.fitted) if f]
    assert max(fitted) == 1e-6 and fit.n_fitted == 3 and abs(fit.order - 2) < 0.05 and fit.order_as_expected()
    # The four smallest clear points, as a fixed window would take them, cross the kink.
    clear = sorted(e for e, r in zip(fit.eps, fit.residual) if r > NOISE_MARGIN * fit.rounding)[:4]
    naive, _ = fit_order(clear, [residual(e) for e in clear], [0.0] * 4, points=4)
    assert naive > 2.5


def _spec(sizes, activation, init, scale, bias, inputs, loss, teacher, seed):
    return CaseSpec(MLP(sizes, activation), init, scale, bias, inputs, 1, loss, teacher, seed)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        # 27k parameters, one sample: rounding at 1.5e-15 of the alignment's scale, above
        # the fixed floor (1e-15 of it) an earlier rule used: it fitted an order of -0.08.
        (_spec((2, 32, 32, 32, 4), "gelu", "uniform", 1.59, 0.5, "shifted", "squared_error", "squared_error", 14), 2),
        # A linear network under softmax cross-entropy: C = 0, the error is cubic.
        (
            _spec(
                (2, 3, 3, 5, 2),
                "identity",
                "normal",
                1.23,
                0.0,
                "sparse",
                "softmax_cross_entropy",
                "squared_error",
                183,
            ),
            3,
        ),
    ],
    ids=["wide-gelu", "linear-cross-entropy"],
)
def test_the_fitted_order_is_the_predicted_one_on_cases_that_once_failed(spec, expected):
    case = build_case(spec)
    fit = convergence(case.model, case.params, case.inputs, **case.check_kwargs())
    assert fit.expected_order == expected and fit.order_as_expected(), (fit.order, fit.expected_order)


def test_the_compiled_programs_are_bounded(monkeypatch):
    from theory import numerical

    monkeypatch.setattr(numerical, "MAX_PROGRAMS", 2)
    monkeypatch.setattr(numerical._analyse, "programs", set())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 2))
    coefficients = []
    for width in (3, 4, 5, 3):  # three models, then the first again
        mlp = MLP((2, width, 2), "tanh")
        params = init_mlp(mlp, np.random.default_rng(width))
        v = jax.tree.map(lambda p: np.ones_like(p), params)
        coefficients.append(check_alignment(mlp, params, x, student_loss=squared_error, direction=v).A)
        assert len(numerical._analyse.programs) <= 2
    assert coefficients[3] == coefficients[0]  # compiled again after the programs were dropped


def test_convergence_grid_spans_its_decades_with_three_points_each():
    w0, v, x = np.eye(2), np.array([[0.0, 1.0], [1.0, 0.0]]), np.array([[1.0, 2.0], [3.0, -1.0]])
    fit = convergence(lambda w, xs: xs @ w, w0, x, student_loss=squared_error, direction=v, decades=2)
    assert len(fit.eps) == 7  # eps*/10 ... eps*/10^3, three points per decade plus the end
    np.testing.assert_allclose(fit.eps[0] / fit.eps[-1], 100.0, rtol=1e-12)


# ---------------------------------------------------------------------------------------
# Cases: the MLP, its initialization, the chooser
# ---------------------------------------------------------------------------------------


def test_mlp_has_a_linear_last_layer():
    mlp = MLP((2, 3, 2), "tanh")
    params = init_mlp(mlp, np.random.default_rng(0), init_scale=2.0, bias_scale=0.5)
    params[-1]["bias"] = np.array([5.0, -5.0], np.float32)  # outputs outside tanh's range
    x = np.array([[1.0, -1.0], [0.5, 2.0]], np.float32)
    h = np.tanh(x @ params[0]["kernel"] + params[0]["bias"])
    expected = h @ params[1]["kernel"] + params[1]["bias"]
    np.testing.assert_allclose(np.asarray(mlp(params, x)), expected, rtol=1e-5)
    assert np.abs(expected).max() > 1.0


def test_init_scale_is_relative_to_the_fan_in():
    # Weights have standard deviation init_scale / sqrt(d_in): 2 / 20 = 0.1 here (d_out = 4
    # would give 1.0). 1600 draws: the sample std is within 5% with overwhelming probability.
    for init in ("normal", "uniform", "truncated_normal"):
        (layer,) = init_mlp(MLP((400, 4)), np.random.default_rng(1), init=init, init_scale=2.0)
        assert layer["kernel"].std() == pytest.approx(0.1, rel=0.05), init


def test_subset_indices_are_among_the_outputs():
    chooser = NumpyChooser(np.random.default_rng(4))
    specs = [choose_spec(chooser, losses=("subset_softmax_cross_entropy",)) for _ in range(200)]
    assert all(max(s.subset) < s.mlp.sizes[-1] for s in specs)
    assert {s.mlp.sizes[0] > s.mlp.sizes[-1] for s in specs} == {True, False}  # the two sizes differ


def test_units_at_kink_counts_exact_zeros_only():
    mlp = MLP((2, 3, 2), "relu")
    params = init_mlp(mlp, np.random.default_rng(0), bias_scale=0.5)
    x = np.array([[1.0, 2.0], [-1.0, 0.5], [0.3, -2.0]], np.float32)
    pre = x.astype(np.float64) @ params[0]["kernel"].astype(np.float64) + params[0]["bias"]
    assert np.any(pre < 0) and not np.any(pre == 0)  # some units off, none exactly at 0
    assert mlp.units_at_kink(params, x) == 0
    assert mlp.units_at_kink(params, np.zeros((2, 2))) == int(np.sum(params[0]["bias"] == 0)) * 2


# ---------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None, derandomize=True, database=None)
@given(case=cases(teacher_kinds=("direction",)))
def test_cases_honour_the_teacher_kinds(case):
    assert case.spec.teacher == "direction" and case.direction is not None and case.teacher_loss is None


@settings(max_examples=15, deadline=None, derandomize=True, database=None)
@given(drawn=student_losses(4, names=("subset_softmax_cross_entropy",), subset_sizes=(1, 1)))
def test_student_losses_honour_the_subset_sizes(drawn):
    name, subset = drawn
    assert name == "subset_softmax_cross_entropy" and len(subset) == 1 and 0 <= subset[0] < 4


# ---------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------


def test_validate_accepts_exactly_all_mnist_training_images():
    from theory.cli import MNIST_TRAIN_IMAGES, _validate

    def args(cases, samples):
        return argparse.Namespace(cases=0, mnist_cases=cases, mnist_samples=samples, out=None, quiet=True, seed=0)

    assert _validate(args(2, MNIST_TRAIN_IMAGES // 2)) is None
    assert "at most 60000" in _validate(args(2, MNIST_TRAIN_IMAGES // 2 + 1))


def test_different_init_signs_are_those_of_their_own_terms():
    # Reversing the teacher's direction flips a0 (linear in v) but not A_x (quadratic):
    # a(eps) = a0 + eps A_x + ... is then negative while its eps-dependent part is positive,
    # and the record's counts must follow a(eps) - a0 and a0, not a(eps).
    from theory.cli import evaluate

    params, x, v = _tanh_case()
    other = init_mlp(TANH_MLP, np.random.default_rng(99), bias_scale=0.5)
    minus_v = jax.tree.map(np.negative, v)
    record = evaluate(TANH_MLP, params, other, x, student_loss=squared_error, direction=minus_v)
    assert record["different_init_alignment"] < -1.0 and record["different_init_zeroth_order"] < -1.0
    assert record["different_init_eps_part"] > 0.1 and record["different_init_cross_term"] > 0
    assert not record["different_init_eps_part_negative"] and not record["different_init_cross_term_negative"]
    assert record["different_init_zeroth_order_negative"]


def test_random_cases_record_the_number_of_hidden_layers(monkeypatch):
    # The linear-model exemption in summarize (a model without a hidden layer can have
    # A_x = A) reads hidden_layers: it must count hidden layers, not weight layers.
    import theory.cli
    from sublearn._common import SilentProgress

    monkeypatch.setattr(theory.cli, "evaluate", lambda *args, **kwargs: {"different_init_equals_shared": False})
    records = list(theory.cli.random_cases(12, 0, SilentProgress()))
    depths = {record["hidden_layers"] for _, record in records}
    assert all(record["hidden_layers"] == len(spec.mlp.sizes) - 2 for spec, record in records)
    assert depths == {0, 1, 2, 3}  # the default draw cycles through every depth


# ---------------------------------------------------------------------------------------
# Symbolic derivations
# ---------------------------------------------------------------------------------------


def test_a_derivation_holds_only_if_every_claim_holds():
    d = symbolic.Derivation("t", (("one", "x", sp.S.Zero),), sp.S.Zero, {"a": True, "b": False})
    assert not d.holds
    perturbed = symbolic.squared_error(3, perturb=lambda name, m: m + sp.eye(3) if name == "M" else m)
    assert not perturbed.checks["M = 2 I"] and perturbed.checks["zeroth order vanishes"]
    assert not perturbed.holds


def test_step_descriptions_must_be_plain_text():
    with pytest.raises(ValueError, match="LaTeX special character"):
        symbolic.Derivation("fine", (("x_1 in the text", "x", sp.S.Zero),), sp.S.Zero, {})


@pytest.mark.parametrize("subset", [(0, 4), (-1, 2), (1, 1), ()])
def test_subset_derivation_rejects_bad_indices(subset):
    with pytest.raises(ValueError, match="distinct indices in 0..3"):
        symbolic.subset_softmax_cross_entropy(4, subset)
