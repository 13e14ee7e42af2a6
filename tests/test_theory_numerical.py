"""The numerical check against closed forms, finite differences and its own conventions."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from theory.cases import MLP, init_mlp
from theory.numerical import (
    MAX_HALVINGS,
    NOISE_MARGIN,
    RESOLUTION,
    QuadraticLoss,
    SubsetSoftmaxCrossEntropy,
    SupervisedLoss,
    check_alignment,
    convergence,
    label_cross_entropy,
    softmax_cross_entropy,
    squared_error,
    tolerances,
    tree_vdot,
)
from toymodels.model import MLP as ToyMLP
from toymodels.model import MLPSpec, apply, init_params


def _linear(w, x):
    return x @ w


def _random_normal(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


TANH_MLP = MLP((3, 5, 4), "tanh")


def _tanh_case(seed: int = 0):
    rng = np.random.default_rng(seed)
    params = init_mlp(TANH_MLP, rng, bias_scale=0.5)
    direction = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), params)
    return params, rng.standard_normal((6, 3)).astype(np.float32), direction


def test_linear_model_squared_error_matches_closed_form_at_every_eps():
    # f(x) = x W: the student step is 2 eps Sigma V and the alignment 2 eps E|x V|^2 exactly.
    w0, v, x = _random_normal(0, 3, 2), _random_normal(1, 3, 2), _random_normal(2, 5, 3)
    expected_a = 2.0 * np.mean(np.sum((x @ v) ** 2, axis=1))
    for eps in (1e-3, 0.1, 10.0):
        r = check_alignment(_linear, w0, x, student_loss=squared_error, direction=v, eps=eps)
        # float64 sums of 15 products: relative rounding far below 1e-12
        np.testing.assert_allclose(r.A, expected_a, rtol=1e-12)
        np.testing.assert_allclose(r.alignment, eps * expected_a, rtol=1e-12)
        np.testing.assert_allclose(r.dtheta_S, 2 * eps * (x.T @ x / len(x)) @ v, rtol=1e-12)
        assert r.zeroth_order == 0.0  # z - y is exactly zero at shared initialization
        assert abs(r.second_order) <= 1e-12 * expected_a
    fit = convergence(_linear, w0, x, student_loss=squared_error, direction=v)
    assert fit.order == np.inf and fit.n_fitted < 2  # residuals at rounding level only


def test_first_order_coefficients_match_finite_differences():
    params, x, v = _tanh_case()
    kwargs = dict(student_loss=softmax_cross_entropy, direction=v)
    r = check_alignment(TANH_MLP, params, x, **kwargs)
    assert r.A > 0

    def estimates(h):
        plus, minus = (check_alignment(TANH_MLP, params, x, eps=e, **kwargs).alignment for e in (h, -h))
        return (plus - minus) / (2 * h), (plus + minus - 2 * r.zeroth_order) / (2 * h * h)

    # Central differences err by O(h^2): a tenth of the step must cut the error ~100-fold.
    errors = []
    for h in (r.eps / 10, r.eps / 100):
        a_fd, c_fd = estimates(h)
        errors.append((abs(a_fd - r.A) / r.A, abs(c_fd - r.second_order) / abs(r.second_order)))
    (a_coarse, c_coarse), (a_fine, c_fine) = errors
    assert a_fine < 1e-5 and c_fine < 1e-3
    assert a_fine < a_coarse / 50 and c_fine < c_coarse / 50


@pytest.mark.parametrize(
    "loss", [squared_error, softmax_cross_entropy, SubsetSoftmaxCrossEntropy((1, 3))], ids=["se", "ce", "subset"]
)
def test_first_order_error_shrinks_like_eps_squared(loss):
    params, x, v = _tanh_case(seed=1)
    fit = convergence(TANH_MLP, params, x, student_loss=loss, direction=v)
    # Fitted over a decade just above rounding, where the third-order term is ~1e-5 of the
    # second: the slope is 2 to ~1e-5; 0.05 leaves room for rounding.
    assert fit.n_fitted == 4
    assert abs(fit.order - 2.0) < 0.05 and abs(fit.second_order_ratio - 1) < 0.1
    residual = np.asarray(fit.residual)
    above = residual[residual > NOISE_MARGIN * fit.rounding]
    assert len(above) >= 10 and np.all(above[1:] < above[:-1] / 3)  # a third of a decade: 4.6x smaller


def test_teacher_loss_change_is_minus_alpha_times_alignment_to_first_order():
    params, x, _ = _tanh_case(seed=2)
    labels = jnp.array([0, 3, 1, 2, 2, 0])
    teacher_loss = SupervisedLoss(TANH_MLP, label_cross_entropy, x[::-1], labels)
    grad = jax.grad(teacher_loss)(params)
    for alpha in (0.5, 2.0):
        r = check_alignment(TANH_MLP, params, x, student_loss=squared_error, teacher_loss=teacher_loss, alpha=alpha)
        assert r.violations() == []
        assert r.teacher_loss_change < 0
        # The teacher's direction is minus the gradient of L_T (checked in float32: 1e-5).
        for got, want in zip(jax.tree.leaves(r.dtheta_T), jax.tree.leaves(grad)):
            np.testing.assert_allclose(got, -np.asarray(want), rtol=1e-5, atol=1e-6)
        small = check_alignment(
            TANH_MLP, params, x, student_loss=squared_error, teacher_loss=teacher_loss, alpha=alpha, eps=r.eps / 100
        )
        # L_T(theta_S) - L_T(theta_S0) = -alpha a + O(eps^2); at eps*/100 the rest is < 1e-2.
        np.testing.assert_allclose(small.teacher_loss_change, -alpha * small.alignment, rtol=1e-2)


def test_single_logit_subset_gives_zero_alignment_for_every_eps():
    # Softmax over one logit is constant: M = 0, the student never moves (Theorem 1's
    # "dtheta_S . dtheta_T = 0 for all eps" branch).
    params, x, v = _tanh_case()
    for eps in (1e-3, 1.0):
        r = check_alignment(TANH_MLP, params, x, student_loss=SubsetSoftmaxCrossEntropy((2,)), direction=v, eps=eps)
        assert r.A == 0.0 and r.alignment == 0.0 and r.cosine == 0.0
        assert all(np.all(leaf == 0) for leaf in jax.tree.leaves(r.dtheta_S))


def test_non_proper_loss_has_negative_first_order_term():
    # L = (z - y)^T diag(1, -1) (z - y), output moved along the second axis only: A = -2|u|^2.
    w0, x = np.eye(2), np.array([[1.0, 1.0]])
    v = np.array([[0.0, 0.0], [0.0, 1.0]])
    r = check_alignment(_linear, w0, x, student_loss=QuadraticLoss.from_matrix(np.diag([1.0, -1.0])), direction=v)
    assert r.A == -2.0 and r.zeroth_order == 0.0
    assert r.alignment < 0 and "A < 0" in r.violations() and "alignment < 0" in r.violations()


def test_different_initialization_has_a_zeroth_order_term():
    params, x, v = _tanh_case()
    other = init_mlp(TANH_MLP, np.random.default_rng(99), bias_scale=0.5)
    kwargs = dict(student_loss=squared_error, direction=v)
    shared = check_alignment(TANH_MLP, params, x, **kwargs)
    r = check_alignment(TANH_MLP, params, x, student_params=other, eps=shared.eps, **kwargs)
    # a(0) = -E[2 (z_S - y_T) . J_S v]: the pull of the student toward the teacher's
    # initial outputs, along v.
    with jax.enable_x64(True):
        p64, o64, v64, x64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (params, other, v, x))
        z, y = TANH_MLP(o64, x64), TANH_MLP(p64, x64)
        u = jax.jvp(lambda p: TANH_MLP(p, x64), (o64,), (v64,))[1]
        expected = float(-jnp.sum(2 * (z - y) * u) / len(x))
    np.testing.assert_allclose(r.zeroth_order, expected, rtol=1e-12)
    assert abs(r.zeroth_order) > 1e6 * tolerances(r)["alignment"]  # far from rounding
    assert shared.zeroth_order == 0.0


def test_mnist_mlp_at_paper_initialization():
    spec = MLPSpec()  # 784-256-256-13

    def model(params, x):
        return apply(spec, params, x)

    k_params, k_noise, k_images, k_labels = jax.random.split(jax.random.key(0), 4)
    params = init_params(spec, k_params)
    noise = jax.random.uniform(k_noise, (8, spec.d_in), minval=-1.0, maxval=1.0)
    digits = SupervisedLoss(
        lambda p, x: model(p, x)[:, :10],
        label_cross_entropy,
        jax.random.normal(k_images, (8, spec.d_in)),
        jax.random.randint(k_labels, (8,), 0, 10),
    )
    r = check_alignment(model, params, noise, student_loss=SubsetSoftmaxCrossEntropy((10, 11, 12)), teacher_loss=digits)
    assert r.violations() == []
    assert r.A > 0 and r.alignment > 0 and r.teacher_loss_change < 0
    assert jax.tree.structure(r.dtheta_S) == jax.tree.structure(params)
    assert all(leaf.dtype == np.float64 for leaf in jax.tree.leaves(r.dtheta_S))
    # The first-order prediction holds at the automatic eps to within its rho = 10%.
    assert abs(r.alignment - r.first_order) < 0.2 * r.first_order


def test_nnx_state_and_plain_dict_give_the_same_result():
    spec = MLPSpec(hidden=(16,), n_aux=3, d_in=12)
    module = ToyMLP(spec, rngs=nnx.Rngs(params=jax.random.key(3)))
    graphdef, state = nnx.split(module)
    params = nnx.to_pure_dict(state)

    def nnx_model(s, x):
        return nnx.merge(graphdef, s)(x)

    def dict_model(p, x):
        return apply(spec, p, x)

    x = jax.random.normal(jax.random.key(4), (5, spec.d_in))
    direction = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size, dtype=jnp.float32)).reshape(a.shape), params)
    state_direction = jax.tree.map(lambda a: a, state)
    nnx.replace_by_pure_dict(state_direction, direction)
    from_state = check_alignment(nnx_model, state, x, student_loss=softmax_cross_entropy, direction=state_direction)
    from_dict = check_alignment(dict_model, params, x, student_loss=softmax_cross_entropy, direction=direction)
    assert from_state.A > 0
    for name in ("eps", "alignment", "A", "second_order", "cosine"):
        # the same float64 computation through two pytree containers
        np.testing.assert_allclose(getattr(from_state, name), getattr(from_dict, name), rtol=1e-12)


def test_float64_is_scoped_to_the_call():
    params, x, v = _tanh_case()
    r = check_alignment(TANH_MLP, params, x, student_loss=squared_error, direction=v)
    assert not jax.config.jax_enable_x64
    assert jnp.ones(1).dtype == jnp.float32
    assert all(leaf.dtype == np.float64 for leaf in jax.tree.leaves(r.dtheta_S))
    np.testing.assert_allclose(float(tree_vdot(r.dtheta_S, r.dtheta_T)), r.alignment, rtol=1e-6)


def test_tolerances_scale_with_the_quantities():
    params, x, v = _tanh_case()
    v = jax.tree.map(lambda a: np.asarray(a, np.float64), v)  # so that 1e3 * v is exact
    small = check_alignment(TANH_MLP, params, x, student_loss=squared_error, direction=v)
    scaled = jax.tree.map(lambda a: 1e3 * a, v)
    big = check_alignment(TANH_MLP, params, x, student_loss=squared_error, direction=scaled, eps=small.eps / 1e3)
    # The same teacher; the direction 1000x longer: the alignment and A scale by 1e3 and 1e6.
    np.testing.assert_allclose(big.alignment, 1e3 * small.alignment, rtol=1e-9)
    np.testing.assert_allclose(big.A, 1e6 * small.A, rtol=1e-9)
    np.testing.assert_allclose(tolerances(big)["A"], 1e6 * tolerances(small)["A"], rtol=1e-9)


def test_rejects_ambiguous_teacher():
    params, x, v = _tanh_case()
    loss = SupervisedLoss(TANH_MLP, label_cross_entropy, x, jnp.zeros(6, jnp.int32))
    with pytest.raises(ValueError, match="exactly one of `direction`"):
        check_alignment(TANH_MLP, params, x, student_loss=squared_error)
    with pytest.raises(ValueError, match="exactly one of `direction`"):
        check_alignment(TANH_MLP, params, x, student_loss=squared_error, direction=v, teacher_loss=loss)


def test_an_eps_outside_the_taylor_regime_is_a_violation_on_either_side():
    params, x, v = _tanh_case()
    kwargs = dict(student_loss=softmax_cross_entropy, direction=v)
    auto = check_alignment(TANH_MLP, params, x, **kwargs)
    assert auto.violations() == [] and auto.in_taylor_regime()
    # Too large: higher orders swamp eps*A. Too small: eps*A sinks toward rounding, where
    # every sign check would pass whatever the student did.
    for eps in (1e3 * auto.eps, 1e-13 * auto.eps):
        r = check_alignment(TANH_MLP, params, x, eps=eps, **kwargs)
        assert r.halvings == 0 and r.violations() == ["not in the Taylor regime"], (eps, r.violations())
    tiny = check_alignment(TANH_MLP, params, x, eps=1e-13 * auto.eps, **kwargs)
    assert not tiny.resolved() and tiny.first_order_dominates()  # dominance alone is vacuous there


def test_halving_stops_at_the_resolution_floor():
    # A ReLU network whose units switch within the automatic eps needs halvings; each
    # one is recorded, and the final eps keeps eps*A far above its tolerance.
    params, x, v = _tanh_case(seed=4)
    relu = MLP(TANH_MLP.sizes, "relu")
    results = [
        check_alignment(relu, params, x * scale, student_loss=squared_error, direction=v) for scale in (1.0, 3.0, 10.0)
    ]
    for r in results:
        assert r.violations() == []
        assert abs(r.first_order) >= RESOLUTION * tolerances(r)["alignment"]
        assert 0 <= r.halvings < MAX_HALVINGS
    # Explicit eps values are never halved.
    assert check_alignment(relu, params, x, student_loss=squared_error, direction=v, eps=1.0).halvings == 0


def test_different_initialization_reports_the_cross_term_apart_from_the_zeroth_order_term():
    params, x, v = _tanh_case()
    other = init_mlp(TANH_MLP, np.random.default_rng(99), bias_scale=0.5)
    r = check_alignment(TANH_MLP, params, x, student_params=other, student_loss=squared_error, direction=v)
    # A_x = E[(J_S v)^T M (J_T v)] with M = 2I, from the two Jacobians computed here.
    with jax.enable_x64(True):
        p64, o64, v64, x64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (params, other, v, x))
        u_s = jax.jvp(lambda p: TANH_MLP(p, x64), (o64,), (v64,))[1]
        u_t = jax.jvp(lambda p: TANH_MLP(p, x64), (p64,), (v64,))[1]
        expected = float(2 * jnp.sum(u_s * u_t) / len(x))
    np.testing.assert_allclose(r.A, expected, rtol=1e-12)
    # The eps-dependent part follows eps A_x; a0, larger here, is reported on its own.
    assert r.in_taylor_regime()
    np.testing.assert_allclose(r.eps_part, r.first_order, rtol=0.2)
    assert abs(r.zeroth_order) > 4 * abs(r.eps_part)


def _outputs_are_params(theta, x):
    """J = I: the alignment's A is u^T M u for the direction u."""
    return jnp.broadcast_to(theta[None, :], (x.shape[0], theta.shape[0]))


@pytest.mark.parametrize("delta, flagged", [(3e-12, True), (3e-13, False)])
def test_a_barely_indefinite_m_is_flagged_just_outside_the_tolerance_only(delta, flagged):
    # M = diag(1, -delta) along u = e2: A = -delta, against a tolerance of 1e-12 (1 + delta)
    # (ROUNDING times A's scale plus |J u|^2 = 1). Pinned both ways: a tolerance 10x looser
    # misses the 3e-12 violation, one 10x tighter flags the 3e-13 rounding-sized one.
    loss = QuadraticLoss.from_matrix([[0.5, 0.0], [0.0, -delta / 2]])
    r = check_alignment(
        _outputs_are_params, np.zeros(2), np.zeros((1, 1)), student_loss=loss, direction=np.array([0.0, 1.0]), eps=1e-3
    )
    assert r.A == -delta
    assert ("A < 0" in r.violations()) is flagged


def _teacher_loss_near_1000(theta):
    """L_T = 1000 + theta_2: linear, so a student step changes it by exactly its second entry."""
    return 1e3 + theta[1]


@pytest.mark.parametrize("rise, flagged", [(3e-9, True), (3e-10, False)])
def test_a_teacher_loss_rise_is_flagged_just_outside_the_tolerance_only(rise, flagged):
    # The teacher descends L_T, direction -e2; a student loss with M = diag(1, -rise) follows
    # it backwards by eps * rise along e2, so at eps = alpha = 1 L_T rises by exactly `rise`,
    # against a tolerance of ROUNDING * |L_T| = 1e-9. Pinned both ways: a tolerance 10x
    # looser misses the 3e-9 rise, one 10x tighter flags the 3e-10 one. The alignment's
    # tolerance here is 1e-12, so a claim judged against it would flag both.
    loss = QuadraticLoss.from_matrix([[0.5, 0.0], [0.0, -rise / 2]])
    r = check_alignment(
        _outputs_are_params,
        np.zeros(2),
        np.zeros((1, 1)),
        student_loss=loss,
        teacher_loss=_teacher_loss_near_1000,
        eps=1.0,
    )
    assert ("L_T increased" in r.violations()) is flagged
    # measured as a difference of two values near 1000, each rounded to 1.1e-13
    np.testing.assert_allclose(r.teacher_loss_change, rise, rtol=1e-3)
    assert tolerances(r)["alignment"] < rise / 10


@dataclasses.dataclass(frozen=True)
class _TiltedSquaredError:
    """|z - y|^2 + tilt * z_2: not stationary at z = y, so a0 = -tilt along u = e2."""

    tilt: float

    def __call__(self, z, y):
        return jnp.sum(jnp.square(z - y)) + self.tilt * z[1]


@pytest.mark.parametrize("claim", ["alignment < 0", "zeroth order != 0"])
@pytest.mark.parametrize("size, flagged", [(3e-10, True), (3e-11, False)])
def test_an_alignment_or_zeroth_order_term_is_flagged_just_outside_the_tolerance_only(claim, size, flagged):
    # Outputs at (99, 0) with |J u| = 1 make the alignment's tolerance ROUNDING * (1 + 99) =
    # 1e-10, while A's stays 1e-12 * (|A| + 1). "alignment < 0": M = diag(1, -size), a = -size
    # at eps = 1. "zeroth order != 0": a loss tilted by `size`, a0 = -size. Pinned both ways:
    # a tolerance 10x looser misses the 3e-10 terms, one 10x tighter flags the 3e-11 ones.
    if claim == "alignment < 0":
        loss, eps = QuadraticLoss.from_matrix([[0.5, 0.0], [0.0, -size / 2]]), 1.0
    else:
        loss, eps = _TiltedSquaredError(size), 1e-3
    r = check_alignment(
        _outputs_are_params,
        np.array([99.0, 0.0]),
        np.zeros((1, 1)),
        student_loss=loss,
        direction=np.array([0.0, 1.0]),
        eps=eps,
    )
    assert (claim in r.violations()) is flagged
    measured = r.alignment if claim == "alignment < 0" else r.zeroth_order
    np.testing.assert_allclose(measured, -size, rtol=1e-6)
    np.testing.assert_allclose(tolerances(r)["alignment"], 1e-10, rtol=1e-4)


def test_label_cross_entropy_is_the_mean_negative_log_probability_of_each_label():
    logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [-2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    labels = np.array([0, 2, 2, 1])
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = -np.mean(log_p[np.arange(4), labels])  # one label per example, not every label for each
    assert float(label_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))) == pytest.approx(expected, rel=1e-6)


def test_teacher_loss_change_under_different_initialization_starts_from_the_student():
    # L_T(theta_S0 + alpha dtheta_S) - L_T(theta_S0): the student's own start, not the teacher's.
    params, x, _ = _tanh_case(seed=2)
    other = init_mlp(TANH_MLP, np.random.default_rng(99), bias_scale=0.5)
    teacher_loss = SupervisedLoss(TANH_MLP, label_cross_entropy, x[::-1], jnp.array([0, 3, 1, 2, 2, 0]))
    alpha = 0.5
    r = check_alignment(
        TANH_MLP, params, x, student_params=other, student_loss=squared_error, teacher_loss=teacher_loss, alpha=alpha
    )
    with jax.enable_x64(True):
        start = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), other)
        moved = jax.tree.map(lambda a, s: a + alpha * s, start, r.dtheta_S)
        x64 = jnp.asarray(x, jnp.float64)
        loss = SupervisedLoss(TANH_MLP, label_cross_entropy, x64[::-1], teacher_loss.targets)
        expected_change, expected_start = float(loss(moved) - loss(start)), float(loss(start))
    np.testing.assert_allclose(r.teacher_loss_change, expected_change, rtol=1e-9)
    np.testing.assert_allclose(r.teacher_loss, expected_start, rtol=1e-12)


@dataclasses.dataclass(frozen=True)
class _QuarticLoss:
    """scale * |z - y|^4: M = 0 at z = y, so A = 0 and the alignment is 4 scale eps^3 u^4."""

    scale: float

    def __call__(self, z, y):
        return self.scale * jnp.sum((z - y) ** 4)


def test_halving_stops_at_the_first_dominated_eps_and_after_max_halvings():
    # A = 0, so the resolution floor never stops the halving: a small cubic alignment is
    # within rounding after some halvings, and the first eps where it is must be the one
    # returned; a huge one never is, and the halving stops after exactly MAX_HALVINGS.
    # The first eps is rho |theta| / |v| = 0.1.
    def check(scale, **kwargs):
        loss = _QuarticLoss(scale)
        return check_alignment(
            _outputs_are_params, np.array([1.0]), np.zeros((1, 1)), student_loss=loss, direction=np.ones(1), **kwargs
        )

    small = check(1.0)
    assert small.A == 0.0 and 0 < small.halvings < MAX_HALVINGS and small.first_order_dominates()
    assert small.eps == 0.1 / 2**small.halvings
    assert not check(1.0, eps=2 * small.eps).first_order_dominates()
    huge = check(1e40)
    assert huge.halvings == MAX_HALVINGS and huge.eps == 0.1 / 2**MAX_HALVINGS
    assert not huge.first_order_dominates()
