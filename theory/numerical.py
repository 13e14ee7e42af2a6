r"""The gradient-alignment lemma, checked numerically on any JAX model.

Conventions (the paper's Lemma 1 and Theorem 1, Appendix C):

- A model is a function ``model(params, X)`` of a parameter pytree :math:`\theta` and a
  batch of :math:`N` inputs ``X`` (leading axis = examples), returning outputs
  :math:`Z = f_\theta(X)` of shape ``(N, n)``.
- The finite sample ``X`` *is* the input distribution :math:`D`: every expectation is the
  exact mean over its rows, :math:`\mathbb E_x[g(x)] = \frac1N \sum_i g(x_i)`.
- The teacher starts at :math:`\theta_{T0}` and moves along a direction
  :math:`\Delta\theta_T` (a pytree shaped like the parameters, or
  :math:`\Delta\theta_T = -\nabla L_T(\theta_{T0})` for a teacher loss :math:`L_T`):

  .. math:: \theta_T = \theta_{T0} + \varepsilon\, \Delta\theta_T .

- The student starts at :math:`\theta_{S0}` (by default :math:`\theta_{T0}`, the shared
  initialization) and takes one full-sample gradient step of size :math:`\alpha` on
  imitating the teacher with a per-example loss :math:`L_S(z, y)` (student output
  :math:`z`, teacher output :math:`y`):

  .. math::

      \Delta\theta_S = -\nabla_\theta\, \mathbb E_x\big[L_S(f_\theta(x), f_{\theta_T}(x))\big]
      \big|_{\theta=\theta_{S0}}, \qquad \theta_S = \theta_{S0} + \alpha\, \Delta\theta_S .

- The alignment is the Euclidean inner product over all parameter leaves,
  :math:`a(\varepsilon) = \Delta\theta_S \cdot \Delta\theta_T`, and its Taylor expansion in
  :math:`\varepsilon` is :math:`a(\varepsilon) = a_0 + \varepsilon A + \varepsilon^2 C + O(\varepsilon^3)` with

  .. math::

      a_0 = -\mathbb E_x\big[\nabla_z L_S(z_S, y_T)^\top J_S \Delta\theta_T\big],\qquad
      A = \mathbb E_x\big[(J_S \Delta\theta_T)^\top M\, (J_T \Delta\theta_T)\big],\qquad
      M = -\frac{\partial^2 L_S}{\partial y\, \partial z}\Big|_{(z_S, y_T)},

  where :math:`z_S = f_{\theta_{S0}}(x)`, :math:`y_T = f_{\theta_{T0}}(x)` and
  :math:`J_S, J_T` are the Jacobians of :math:`f` at :math:`\theta_{S0}, \theta_{T0}`.
  Under shared initialization :math:`a_0 = 0` (a proper loss is stationary at
  :math:`z = y`) and :math:`A` is a quadratic form in :math:`J\Delta\theta_T` with a
  positive semi-definite :math:`M` (:math:`2I` for squared error,
  :math:`\mathrm{diag}(p) - pp^\top` for softmax cross-entropy), hence :math:`A \ge 0`.
  Under different initialization :math:`A` is the cross term :math:`A_\times` (with
  :math:`J_S \ne J_T`, no quadratic form: it can be negative) and :math:`a_0 \ne 0`.

The measured alignment comes from the student's actual step; :math:`a_0, A, C` come
from Jacobian-vector products at :math:`\varepsilon = 0`, independently of that step.
The check compares the two at an :math:`\varepsilon` where :math:`\varepsilon A` stands
far above rounding (:meth:`AlignmentResult.resolved`); a wrong step cannot hide by
making both sides rounding (:class:`Faults` injects such errors for testing).

Everything is computed in float64 inside :func:`jax.enable_x64` (the global setting is
left alone), and the first- and second-order coefficients use Jacobian-vector products
only: no Jacobian is ever materialized, so the MNIST MLP (270k parameters) is cheap.

Example:
    >>> import jax.numpy as jnp
    >>> from theory.numerical import check_alignment, squared_error
    >>> model = lambda w, x: x @ w                       # linear model, w of shape (2, 2)
    >>> w0 = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> x = jnp.array([[1.0, 2.0], [3.0, -1.0]])
    >>> r = check_alignment(model, w0, x, student_loss=squared_error,
    ...                     direction=jnp.array([[0.0, 1.0], [1.0, 0.0]]), eps=1e-3)
    >>> round(r.alignment / r.eps, 6), round(r.A, 6)    # exact in eps for a linear model
    (15.0, 15.0)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike
from jaxtyping import Array, Float, Integer

PyTree = Any
ModelFn = Callable[[PyTree, Array], Array]
StudentLoss = Callable[[Float[Array, " n"], Float[Array, " n"]], Float[Array, ""]]
TeacherLoss = Callable[[PyTree], Float[Array, ""]]

# ---------------------------------------------------------------------------------------
# Student losses L_S(z, y): z the student's outputs for one example, y the teacher's.
# Parametrized losses are frozen dataclasses so that equal losses hash equally and reuse
# the compiled check.
# ---------------------------------------------------------------------------------------


def squared_error(z: Float[Array, " n"], y: Float[Array, " n"]) -> Float[Array, ""]:
    r""":math:`L_S(z, y) = \lVert z - y\rVert^2`, so :math:`M = 2I`."""
    return jnp.sum(jnp.square(z - y))


def softmax_cross_entropy(z: Float[Array, " n"], y: Float[Array, " n"]) -> Float[Array, ""]:
    r""":math:`L_S(z, y) = -\sum_i \mathrm{softmax}(y)_i \log \mathrm{softmax}(z)_i`, so
    :math:`M = \mathrm{diag}(p) - pp^\top` with :math:`p = \mathrm{softmax}(y)`."""
    return -jnp.sum(jax.nn.softmax(y) * jax.nn.log_softmax(z))


@dataclasses.dataclass(frozen=True)
class SubsetSoftmaxCrossEntropy:
    r"""Softmax cross-entropy over the logits ``indices`` only (the MNIST "aux only" loss).

    :math:`M = P^\top(\mathrm{diag}(p_S) - p_S p_S^\top)P` with :math:`P` selecting the
    subset, still positive semi-definite.
    """

    indices: tuple[int, ...]

    def __post_init__(self):
        if not self.indices or len(set(self.indices)) != len(self.indices):
            raise ValueError(f"subset indices must be non-empty and distinct, got {self.indices}")

    def __call__(self, z: Float[Array, " n"], y: Float[Array, " n"]) -> Float[Array, ""]:
        idx = np.asarray(self.indices)
        return softmax_cross_entropy(z[idx], y[idx])


@dataclasses.dataclass(frozen=True)
class QuadraticLoss:
    r""":math:`L_S(z, y) = (z - y)^\top Q (z - y)`, stationary at :math:`z = y` with :math:`M = Q + Q^\top`.

    Proper (minimized at :math:`z = y`) exactly when :math:`Q + Q^\top` is positive
    semi-definite; an indefinite ``q`` is the standard non-proper student loss, for which
    :math:`A` can be negative under shared initialization.
    """

    q: tuple[tuple[float, ...], ...]

    @classmethod
    def from_matrix(cls, q: Sequence[Sequence[float]] | np.ndarray) -> QuadraticLoss:
        return cls(tuple(tuple(float(v) for v in row) for row in np.asarray(q)))

    def __call__(self, z: Float[Array, " n"], y: Float[Array, " n"]) -> Float[Array, ""]:
        d = z - y
        return d @ jnp.asarray(self.q, d.dtype) @ d


# ---------------------------------------------------------------------------------------
# Teacher losses L_T(theta). Registered as pytrees (data as leaves, model as static
# metadata) so that new random targets reuse the compiled check instead of retracing it.
# ---------------------------------------------------------------------------------------


def label_cross_entropy(logits: Float[Array, "N n"], labels: Integer[Array | np.ndarray, " N"]) -> Float[Array, ""]:
    """Mean softmax cross-entropy of integer ``labels`` under ``logits``."""
    log_p = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], axis=1))


def target_squared_error(outputs: Float[Array, "N n"], targets: Float[Array | np.ndarray, "N n"]) -> Float[Array, ""]:
    """Mean over examples of the squared distance to ``targets``."""
    return jnp.mean(jnp.sum(jnp.square(outputs - targets), axis=1))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SupervisedLoss:
    r"""A teacher loss :math:`L_T(\theta) = \ell(f_\theta(X_T), t)` on its own data.

    Example: ``SupervisedLoss(model, label_cross_entropy, X_T, labels)`` is cross-entropy on
    labels, ``SupervisedLoss(model, target_squared_error, X_T, targets)`` squared error.
    """

    model: ModelFn = field(metadata=dict(static=True))
    batch_loss: Callable[[Array, Array], Array] = field(metadata=dict(static=True))
    inputs: ArrayLike
    targets: ArrayLike

    def __call__(self, params: PyTree) -> Float[Array, ""]:
        return self.batch_loss(self.model(params, self.inputs), self.targets)


# ---------------------------------------------------------------------------------------
# Pytree helpers
# ---------------------------------------------------------------------------------------


def tree_vdot(a: PyTree, b: PyTree) -> Float[Array, ""]:
    """Euclidean inner product summed over all leaves of two equally shaped pytrees."""
    return sum((jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))), jnp.zeros(()))


def tree_norm(a: PyTree) -> Float[Array, ""]:
    """Euclidean norm over all leaves."""
    return jnp.sqrt(tree_vdot(a, a))


def _axpy(scale, x: PyTree, y: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: b + scale * a, x, y)


def _to_float64(tree: PyTree) -> PyTree:
    """Floating leaves as float64 (call inside ``jax.enable_x64``); other leaves unchanged."""

    def cast(leaf):
        if isinstance(leaf, (jax.Array, np.ndarray, np.generic)) and jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.asarray(leaf, jnp.float64)
        return leaf

    return jax.tree.map(cast, tree)


def _is_dynamic(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


# One compilation per model structure, of a graph that runs in milliseconds: XLA's
# backend optimizations and its newer CPU fusion emitters cost more compile time than they
# save (together they make compiling the check 2-3 times slower on a small MLP).
_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


# Compiled programs kept at once. Each holds executable memory that LLVM maps page by
# page; a process checking a few hundred different models (hypothesis's thorough
# profile, `sublearn theory --cases 500`) runs out of mappings ("LLVM compilation error:
# Cannot allocate memory", then a segmentation fault) if none is ever dropped.
MAX_PROGRAMS = 64


def _filter_jit(fn):
    """``jax.jit`` that traces array leaves and treats every other leaf as static.

    Models, losses and pytree structure become part of the cache key (hashed by value
    for frozen dataclasses, by identity for functions), so a check on a new sample, new
    parameters or new teacher targets of the same shapes reuses the compiled code. When a
    new key would make more than ``MAX_PROGRAMS``, the compiled programs are dropped
    (``wrapper.programs`` holds the keys of those kept).
    """

    @functools.partial(jax.jit, static_argnums=0, compiler_options=_COMPILER_OPTIONS)
    def traced(static, dynamic):
        treedef, static_leaves = static
        leaves = [s if d is None else d for d, s in zip(dynamic, static_leaves)]
        args, kwargs = jax.tree.unflatten(treedef, leaves)
        return fn(*args, **kwargs)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        leaves, treedef = jax.tree.flatten((args, kwargs))
        dynamic = [leaf if _is_dynamic(leaf) else None for leaf in leaves]
        static = tuple(None if _is_dynamic(leaf) else leaf for leaf in leaves)
        # Shapes and dtypes are part of what jit compiles for, so they are part of the key.
        key = (treedef, static, tuple(None if d is None else (d.shape, d.dtype) for d in dynamic))
        if key not in wrapper.programs:
            if len(wrapper.programs) >= MAX_PROGRAMS:
                traced.clear_cache()
                wrapper.programs.clear()
            wrapper.programs.add(key)
        return traced((treedef, static), dynamic)

    wrapper.programs = set()
    return wrapper


def _taylor_ratio(lower, higher, rho):
    r"""Largest :math:`\varepsilon \ge 0` with :math:`|\text{higher}|\,\varepsilon \le \rho\,|\text{lower}|`.

    The point where a Taylor term one order higher, :math:`\text{higher}\,\varepsilon^{k+1}`,
    reaches ``rho`` times the lower one, :math:`\text{lower}\,\varepsilon^k`; inf if ``higher`` is 0.
    """
    nonzero = higher != 0
    return jnp.where(nonzero, rho * jnp.abs(lower) / jnp.where(nonzero, jnp.abs(higher), 1.0), jnp.inf)


# ---------------------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Faults:
    r"""Deliberate errors in the steps the check measures, to show that the check catches them.

    The default is the correct computation. Each field breaks one step of the measured
    alignment and teacher-loss change, never the Taylor coefficients they are compared
    with, which come from Jacobian-vector products at :math:`\varepsilon = 0`:

    - ``student_step_sign = -1``: the student steps up its loss gradient,
      :math:`\Delta\theta_S = +\nabla_\theta \mathbb E_x L_S`, so :math:`a \approx -\varepsilon A`.
    - ``teacher_output_scale = 2``: the student imitates the teacher's outputs at
      :math:`2\varepsilon`, so :math:`a \approx 2\varepsilon A`.
    - ``teacher_step_sign = -1``: a teacher with a loss climbs it,
      :math:`\Delta\theta_T = +\nabla L_T`, so the student's :math:`L_T` rises by :math:`\approx\alpha\varepsilon A`.
    """

    student_step_sign: float | Array = 1.0
    teacher_output_scale: float | Array = 1.0
    teacher_step_sign: float | Array = 1.0


NO_FAULTS = Faults()


def _require_float64(what: str, value: Array) -> None:
    """Raise if ``value`` (traced inside the check) is not float64: rounding would be float32's."""
    if value.dtype != jnp.float64:
        raise TypeError(
            f"{what} computed in {value.dtype}, not float64: the check's tolerances assume float64 "
            "rounding. Do not fix dtypes inside the model or loss (no astype(float32), no dtype=float32); "
            "let them follow the parameters and inputs, which the check casts to float64."
        )


def _taylor2(fn, zero):
    """``fn(0)`` and the first two Taylor coefficients of ``fn`` at 0 (forward mode, ``fn`` of a scalar)."""

    def derivative(e):
        return jax.jvp(fn, (e,), (jnp.ones_like(e),))

    (value, first), (_, second) = jax.jvp(derivative, (zero,), (jnp.ones_like(zero),))
    return value, first, jax.tree.map(lambda x: 0.5 * x, second)


@_filter_jit
def _analyse(
    model, student_loss, teacher_loss, params_t0, params_s0, direction, inputs, eps, alpha, rho, eps_max, faults
):
    grad_t = None
    if teacher_loss is not None:
        grad_t = jax.grad(teacher_loss)(params_t0)
        _require_float64("the teacher loss L_T(params)", teacher_loss(params_t0))
        direction = jax.tree.map(lambda g: -faults.teacher_step_sign * g, grad_t)

    def outputs(params):
        return model(params, inputs)

    def imitation_grad(z, y):  # gradient in z of E_x L_S(z, y) over the sample
        return jax.grad(lambda z_: jnp.mean(jax.vmap(student_loss)(z_, y)))(z)

    zero = jnp.zeros((), jnp.float64)
    # The teacher's outputs along its path and their first two Taylor coefficients in eps.
    y_t, u_t, w_t = _taylor2(lambda e: outputs(_axpy(e, direction, params_t0)), zero)
    _require_float64("the model's outputs model(params, X)", y_t)
    shared = params_s0 is None
    if shared:  # the student's outputs and Jacobian are the teacher's
        params_s0, z_s, u_s = params_t0, y_t, u_t
        _, pullback = jax.vjp(outputs, params_s0)
    else:
        z_s, pullback = jax.vjp(outputs, params_s0)
        u_s = jax.jvp(outputs, (params_s0,), (direction,))[1]

    # The student's step is -J_S^T G(y) with G(y) = imitation_grad(z_S, y) and y the
    # teacher's outputs, so its Taylor coefficients in eps are pullbacks of those of
    # G(y(eps)) and the alignment's are inner products of those with J_S v. With
    # y(eps) = y_T + eps u_T + eps^2 w_T + O(eps^3): g0 = G(y_T); g1 = G'(y_T) u_T =
    # -M u_T / N, the action of M by one JVP; g2 = G''(y_T)[u_T, u_T] / 2 + G'(y_T) w_T.
    def grad_along_path(e):
        return imitation_grad(z_s, y_t + e * u_t + e * e * w_t)

    g0, g1, g2 = _taylor2(grad_along_path, zero)
    per_example = -jnp.sum(g1 * u_s, axis=1)  # (J_S v)^T M (J_T v) / N for each example
    first = jnp.sum(per_example)
    second = -jnp.vdot(g2, u_s)
    # Small eps means the teacher's outputs and the student's loss gradient move linearly,
    # not only that the alignment's second-order term is small: that term is a sum that
    # can cancel by accident while the higher-order terms do not.
    # And the teacher moves by at most rho of its parameters' norm: with an odd activation
    # near 0 (tanh) every second-order term can vanish while the third-order ones do not.
    eps_auto = jnp.minimum(eps_max, _taylor_ratio(tree_norm(params_t0), tree_norm(direction), rho))
    for coefficients in ((first, second), (u_t, w_t), (g1, g2)):
        eps_auto = jnp.minimum(eps_auto, _taylor_ratio(*(jnp.linalg.norm(c) for c in coefficients), rho))

    change_first = jnp.full((), jnp.nan)
    if teacher_loss is not None and shared:
        # q(e) = L_T(theta_S0 + alpha s(e)) - L_T(theta_S0) with the student's step
        # s(e) = s1 e + s2 e^2 + O(e^3), s_k = -J^T g_k (s0 = 0 at shared initialization):
        # q1 = alpha g.s1 and q2 = alpha g.s2 + alpha^2/2 s1^T H s1, with g and H the
        # gradient and Hessian of L_T at theta_0. g is L_T's own gradient, not -dtheta_T,
        # so a teacher that moved the wrong way shows as q1 > 0 instead of cancelling out.
        s1, s2 = (jax.tree.map(jnp.negative, pullback(g)[0]) for g in (g1, g2))
        curvature = _taylor2(lambda e: teacher_loss(_axpy(e, s1, params_s0)), zero)[2]
        change_first = alpha * tree_vdot(grad_t, s1)
        change_second = alpha * tree_vdot(grad_t, s2) + alpha * alpha * curvature
        eps_auto = jnp.minimum(eps_auto, _taylor_ratio(change_first, change_second, rho))
    eps_used = jnp.where(jnp.isnan(eps), eps_auto, eps)

    # The measured step, computed afresh from the teacher's outputs at eps: it shares no
    # arithmetic with the coefficients above, so an error in it cannot cancel out.
    y = outputs(_axpy(faults.teacher_output_scale * eps_used, direction, params_t0))
    step = jax.tree.map(lambda g: -faults.student_step_sign * g, pullback(imitation_grad(z_s, y))[0])
    alignment = tree_vdot(step, direction)
    norms = tree_norm(step) * tree_norm(direction)
    out = dict(
        eps=eps_used,
        dtheta_S=step,
        dtheta_T=direction,
        alignment=alignment,
        cosine=jnp.where(norms > 0, alignment / jnp.where(norms > 0, norms, 1.0), 0.0),
        zeroth_order=-jnp.vdot(g0, u_s),
        A=first,
        A_scale=jnp.sum(jnp.abs(per_example)),
        jvp_scale=jnp.mean(jnp.linalg.norm(u_s, axis=1) * jnp.linalg.norm(u_t, axis=1)),
        # The student's loss gradient is a difference of O(1 + |y|) numbers (outputs for
        # squared error, probabilities for cross-entropy), each rounded; its error reaches
        # the alignment through <error, J_S v>, plus the inner product's own.
        alignment_scale=jnp.mean((1.0 + jnp.linalg.norm(y_t, axis=1)) * jnp.linalg.norm(u_s, axis=1)) + norms,
        second_order=second,
        teacher_loss_change=jnp.full((), jnp.nan),
        teacher_loss=jnp.full((), jnp.nan),
        teacher_loss_first=change_first,
    )
    if teacher_loss is not None:
        loss_s0 = teacher_loss(params_s0)
        out["teacher_loss_change"] = teacher_loss(_axpy(alpha, step, params_s0)) - loss_s0
        out["teacher_loss"] = loss_s0
    return out


@dataclasses.dataclass(frozen=True)
class AlignmentResult:
    r"""One student step against one teacher, in the conventions of the module docstring.

    Attributes:
        eps: the teacher step size :math:`\varepsilon` used (after any halvings).
        alpha: the student learning rate :math:`\alpha`.
        dtheta_S: the student update :math:`\Delta\theta_S` (pytree of float64 numpy arrays).
        dtheta_T: the teacher direction :math:`\Delta\theta_T` (same structure).
        alignment: :math:`a(\varepsilon) = \Delta\theta_S\cdot\Delta\theta_T`.
        cosine: alignment over :math:`\lVert\Delta\theta_S\rVert\,\lVert\Delta\theta_T\rVert` (0 if either is 0).
        zeroth_order: :math:`a_0 = a(0)`, the alignment of a teacher that has not moved
            (exactly 0 under shared initialization with a proper student loss; under
            different initialization the pull toward the teacher's initial outputs, which
            does not depend on what the teacher learned).
        A: the first-order coefficient :math:`A = \mathbb E_x[(J_S\Delta\theta_T)^\top M (J_T\Delta\theta_T)]`;
            under different initialization this is the cross term :math:`A_\times`.
        A_scale: :math:`\mathbb E_x|(J_S\Delta\theta_T)^\top M (J_T\Delta\theta_T)|`, the scale
            against which rounding in :math:`A` is judged.
        jvp_scale: :math:`\mathbb E_x \lVert J_S\Delta\theta_T\rVert\,\lVert J_T\Delta\theta_T\rVert`,
            what :math:`A` would be for :math:`M = I`: the scale of the alignment's terms
            independent of the loss's curvature, against which rounding is judged when
            :math:`A` itself is (near) zero.
        alignment_scale: :math:`\mathbb E_x[(1 + \lVert f_{\theta_{T0}}(x)\rVert)\lVert J_S\Delta\theta_T\rVert]
            + \lVert\Delta\theta_S\rVert\lVert\Delta\theta_T\rVert`, the size of the
            terms whose float64 rounding reaches the alignment.
        second_order: :math:`C = \tfrac12 a''(0)`, the coefficient of :math:`\varepsilon^2`.
        teacher_loss_change: :math:`L_T(\theta_S) - L_T(\theta_{S0})`; NaN without a teacher loss.
        teacher_loss: :math:`L_T(\theta_{S0})`, the scale of that change; NaN without a teacher loss.
        teacher_loss_first: :math:`q_1`, the coefficient of :math:`\varepsilon` in that
            change, :math:`\alpha\,\nabla L_T\cdot s_1` with :math:`s_1` the first-order
            student step; Theorem 1 says :math:`q_1 = -\alpha A`. NaN without a teacher
            loss or under different initialization.
        halvings: how often the automatic :math:`\varepsilon` was halved (0 for a given ``eps``).
    """

    eps: float
    alpha: float
    dtheta_S: PyTree
    dtheta_T: PyTree
    alignment: float
    cosine: float
    zeroth_order: float
    A: float
    A_scale: float
    jvp_scale: float
    alignment_scale: float
    second_order: float
    teacher_loss_change: float
    teacher_loss: float
    teacher_loss_first: float
    halvings: int = 0

    @property
    def first_order(self) -> float:
        r"""The first-order prediction :math:`\varepsilon A`."""
        return self.eps * self.A

    @property
    def prediction(self) -> float:
        r""":math:`a_0 + \varepsilon A`, the alignment to first order in :math:`\varepsilon`."""
        return self.zeroth_order + self.eps * self.A

    @property
    def eps_part(self) -> float:
        r""":math:`a(\varepsilon) - a_0`, the part of the alignment that the teacher's step causes."""
        return self.alignment - self.zeroth_order

    @property
    def A_is_zero(self) -> bool:
        r"""Whether :math:`|A|` is within rounding of 0 (:math:`M = 0`, or :math:`J\Delta\theta_T` in its null space).

        Then the lemma claims nothing at first order and there is no first-order term to measure.
        """
        return abs(self.A) <= tolerances(self)["A"]

    def first_order_dominates(self, rho: float = 0.1) -> bool:
        r"""Whether the first-order terms account for the alignment and the teacher-loss change.

        True when :math:`|a - a_0 - \varepsilon A| \le 2\rho\,\varepsilon|A|` and, where it
        is known, :math:`|\Delta L_T - \varepsilon q_1| \le 2\rho\,\varepsilon|q_1|`, each up
        to rounding (:func:`tolerances`). The coefficients come from Jacobian-vector
        products at :math:`\varepsilon = 0`, the measured values from the student's actual
        step, so a wrong step (a wrong sign, a wrong teacher output) fails this even
        where it keeps the sign right. Alone it is vacuous once both sides are rounding:
        see :meth:`resolved`.
        """
        tol = tolerances(self)
        ok = abs(self.alignment - self.prediction) <= 2 * rho * abs(self.first_order) + tol["alignment"]
        if math.isfinite(self.teacher_loss_first):
            rest = abs(self.teacher_loss_change - self.eps * self.teacher_loss_first)
            ok = ok and rest <= 2 * rho * abs(self.eps * self.teacher_loss_first) + tol["teacher_loss"]
        return ok

    def resolved(self, eps: float | None = None) -> bool:
        r"""Whether the first-order terms at ``eps`` (default: this result's) stand clear of rounding.

        :math:`|\varepsilon A| \ge` ``RESOLUTION`` :math:`\times` the alignment's tolerance
        and, with a teacher loss under shared initialization, :math:`|\varepsilon q_1| \ge`
        ``RESOLUTION`` :math:`\times` the teacher loss's: then the sign checks and
        :meth:`first_order_dominates` compare numbers, not rounding errors.
        """
        eps = self.eps if eps is None else eps
        tol = tolerances(self)
        ok = abs(eps * self.A) >= RESOLUTION * tol["alignment"]
        if math.isfinite(self.teacher_loss_first):
            ok = ok and abs(eps * self.teacher_loss_first) >= RESOLUTION * tol["teacher_loss"]
        return ok

    def in_taylor_regime(self, rho: float = 0.1) -> bool:
        r"""First order dominates and is resolved, or :math:`A` is zero and the alignment is rounding."""
        return self.first_order_dominates(rho) and (self.A_is_zero or self.resolved())

    def violations(self, rho: float = 0.1) -> list[str]:
        r"""The claims of Lemma 1 and Theorem 1 that this result contradicts beyond rounding.

        Meaningful for shared initialization with a proper student loss. The claims:
        :math:`A \ge 0`, :math:`a_0 = 0`, :math:`\Delta\theta_S\cdot\Delta\theta_T \ge 0`,
        with a teacher loss :math:`L_T(\theta_S) \le L_T(\theta_{S0})`, each up to the
        tolerances of :func:`tolerances`; and, where :math:`A \ne 0`, that ``eps`` is in
        the Taylor regime (:meth:`in_taylor_regime`), without which the sign checks
        could pass on rounding alone. Empty when all hold.
        """
        tol = tolerances(self)
        failed = {
            "A < 0": self.A < -tol["A"],
            "zeroth order != 0": abs(self.zeroth_order) > tol["alignment"],
            "alignment < 0": self.alignment < -tol["alignment"],
            "L_T increased": self.teacher_loss_change > tol["teacher_loss"],  # False when NaN
            "not in the Taylor regime": not self.A_is_zero and not self.in_taylor_regime(rho),
        }
        return [claim for claim, bad in failed.items() if bad]


# How often the automatic eps may be halved, down to 1e-12 of its Taylor-ratio estimate.
MAX_HALVINGS = 40

# Relative size of float64 rounding in the quantities checked here. One rounding is 1.1e-16
# and pairwise sums of P terms add log2(P) of them (< 20 for the MNIST MLP's 270k
# parameters); a chain of a few such sums stays below 1e-14, so 1e-12 keeps a margin of
# 100 while any real violation (an indefinite M, a loss not stationary at z = y) shows at
# the scale of the quantity itself.
ROUNDING = 1e-12

# How far above its tolerance a first-order term must stand before the check trusts a
# comparison with it. The tolerances are already 1e4 times typical float64 rounding
# (ROUNDING), so 1e4 puts eps*A some 1e8 times above rounding: the tolerance is 1e-4 of
# eps*A, negligible next to the 20% (2 rho) that first_order_dominates allows, and a
# wrong sign or a wrong first-order coefficient shows at the size of eps*A itself. 1e6
# would leave peaked softmaxes (small A, large logits) unresolvable at any eps small
# enough for the Taylor regime, in about 1 random case in 80.
RESOLUTION = 1e4


def tolerances(result: AlignmentResult) -> dict[str, float]:
    r"""Absolute tolerances for the sign checks, each relative to its quantity's scale.

    - ``"A"``: ``ROUNDING`` times :math:`\mathbb E_x|(J_S v)^\top M (J_T v)| + \mathbb E_x\lVert J_S v\rVert\lVert J_T v\rVert`.
    - ``"alignment"``: ``ROUNDING`` times ``result.alignment_scale`` (also for the
      zeroth-order term, exactly 0 in exact arithmetic).
    - ``"teacher_loss"``: ``ROUNDING`` times :math:`|L_T(\theta_{S0})|`, the rounding of a
      difference of two evaluations of :math:`L_T`.
    """
    return {
        "A": ROUNDING * (result.A_scale + result.jvp_scale),
        "alignment": ROUNDING * result.alignment_scale,
        "teacher_loss": ROUNDING * abs(result.teacher_loss),
    }


def check_alignment(
    model: ModelFn,
    params: PyTree,
    inputs: ArrayLike,
    *,
    student_loss: StudentLoss,
    direction: PyTree | None = None,
    teacher_loss: TeacherLoss | None = None,
    student_params: PyTree | None = None,
    eps: float | None = None,
    alpha: float = 1.0,
    rho: float = 0.1,
    eps_max: float = 1.0,
    faults: Faults = NO_FAULTS,
) -> AlignmentResult:
    r"""One teacher step, one student step, and the alignment with its Taylor coefficients.

    Args:
        model: ``model(params, X) -> (N, n)`` outputs. Pass the same function object on
            every call to reuse the compiled check. It must compute in the dtype of its
            parameters and inputs (cast to float64 here); float32 outputs raise ``TypeError``.
        params: the teacher's initial parameters :math:`\theta_{T0}` (any pytree).
        inputs: ``(N, ...)`` sample standing for :math:`D` (used as an exact expectation).
        student_loss: per-example :math:`L_S(z, y)`: :func:`squared_error`,
            :func:`softmax_cross_entropy`, :class:`SubsetSoftmaxCrossEntropy`, or any callable.
        direction: the teacher direction :math:`\Delta\theta_T` (same structure as ``params``).
        teacher_loss: :math:`L_T(\theta)`; then :math:`\Delta\theta_T = -\nabla L_T(\theta_{T0})`
            and the change of :math:`L_T` under the student step is reported. Give exactly
            one of ``direction`` and ``teacher_loss``.
        student_params: :math:`\theta_{S0}`; defaults to ``params`` (shared initialization).
        eps: teacher step size :math:`\varepsilon`. ``None`` chooses it from the second-order
            terms, in two stages. First the largest :math:`\varepsilon \le` ``eps_max`` at which every
            second-order term is at most ``rho`` times its first-order term (in norm):
            :math:`|C|\varepsilon^2 \le \rho|A|\varepsilon` for the alignment, and the same
            for the teacher's outputs :math:`f_{\theta_T}(X)`, the student's loss gradient
            :math:`\nabla_z \mathbb E_x L_S` and, with a teacher loss,
            :math:`L_T(\theta_S) - L_T(\theta_{S0})`, all as functions of :math:`\varepsilon`;
            and at most :math:`\rho\lVert\theta_{T0}\rVert / \lVert\Delta\theta_T\rVert`,
            so that the teacher moves by a small fraction of its parameters. Then, since
            higher orders and kinks (ReLU) are invisible to the coefficients at
            :math:`\varepsilon = 0`, it is halved until the measured values follow the
            first-order terms (:meth:`AlignmentResult.first_order_dominates`), at most
            ``MAX_HALVINGS`` times and never below the :math:`\varepsilon` at which the
            first-order terms sink to ``RESOLUTION`` times their tolerance
            (:meth:`AlignmentResult.resolved`): where they do not dominate above that,
            :meth:`AlignmentResult.violations` reports "not in the Taylor regime"
            instead of letting rounding pass the sign checks.
        alpha: student learning rate :math:`\alpha`.
        rho: allowed ratio of second- to first-order term when ``eps`` is ``None``.
        eps_max: upper bound on the automatic ``eps``.
        faults: deliberate errors in the measured steps (:class:`Faults`), for testing
            that the check catches them; the default computes correctly.

    Returns:
        An :class:`AlignmentResult` (floats and float64 numpy pytrees).

    Raises:
        TypeError: the model's outputs (or the teacher loss) are not float64 inside the check.
    """
    if (direction is None) == (teacher_loss is None):
        raise ValueError("give exactly one of `direction` (a pytree like params) or `teacher_loss` (L_T(params))")
    with jax.enable_x64(True):
        run = functools.partial(
            _analyse,
            model,
            student_loss,
            _to_float64(teacher_loss),
            _to_float64(params),
            _to_float64(student_params),
            _to_float64(direction),
            _to_float64(jnp.asarray(inputs)),
            alpha=jnp.asarray(alpha, jnp.float64),
            rho=jnp.asarray(rho, jnp.float64),
            eps_max=jnp.asarray(eps_max, jnp.float64),
            # As traced arrays, so that the correct check and every mutant share one compilation.
            faults=jax.tree.map(lambda f: jnp.asarray(f, jnp.float64), faults),
        )

        def result(at: float, halvings: int = 0) -> AlignmentResult:
            out = jax.tree.map(np.asarray, run(eps=jnp.asarray(at, jnp.float64)))
            trees = {"dtheta_S", "dtheta_T"}
            fields = {k: (v if k in trees else float(v)) for k, v in out.items()}
            return AlignmentResult(alpha=float(alpha), halvings=halvings, **fields)

        if eps is not None:
            return result(eps)
        checked = result(math.nan)
        while checked.halvings < MAX_HALVINGS and not checked.first_order_dominates(rho):
            # Halving further would bury the first-order terms in rounding, where the
            # comparison would pass vacuously (unless A is 0: then there is none to bury).
            if not checked.A_is_zero and not checked.resolved(checked.eps / 2):
                break
            checked = result(checked.eps / 2, checked.halvings + 1)
    return checked


# ---------------------------------------------------------------------------------------
# Convergence of the first-order prediction
# ---------------------------------------------------------------------------------------

# The order fit reads the residual where it stands clear of rounding. Rounding in the
# measured alignment does not shrink with eps, so the default grid runs on into the flat
# stretch where the residual is rounding alone: its largest value over the ROUNDING_TAIL
# smallest eps (two decades) is the rounding level, and the fit uses residuals
# NOISE_MARGIN times above it (rounding then moves the fitted slope by at most about
# 0.06). No fixed multiple of a scale serves: the rounding level is 1e-19 of the
# alignment's scale on the MNIST MLP and 1e-15 on wide single-sample MLPs, and it varies
# tenfold from one eps to the next. A larger margin pushes the fit up into the eps where
# ReLUs switch sign.
NOISE_MARGIN = 10.0
ROUNDING_TAIL = 6
# Far enough down, the teacher's step is lost in rounding (theta + eps v == theta, or a
# saturated softmax that no longer moves): the measured eps-part a(eps) - a0 collapses
# to 0 and the residual becomes eps * A, an order-1 error that is not the check's. Such
# points, where a(eps) - a0 keeps less than this share of eps * A, are left out of the
# rounding level and the fit. A wrong first-order coefficient is not left out: it keeps
# all of eps * A or more (a doubled teacher step, a student climbing its loss).
LOST_SHARE = 0.1
# At the smallest eps where the residual is clear of rounding it must be the second-order
# term |C| eps^2 to within this factor (noise moves it by up to 10%, the third-order term
# by less). Where it is more than this many times |C| eps^2, C vanishes (a symmetry, a
# linear network under softmax cross-entropy) and the order must be 3 or more; that is
# also where a wrong first-order coefficient lands, with its order 1.
SECOND_ORDER_FACTOR = 2.0


@dataclasses.dataclass(frozen=True)
class Convergence:
    r"""Residual of the first-order prediction over a grid of :math:`\varepsilon`.

    Attributes:
        eps: the grid, decreasing.
        alignment: :math:`a(\varepsilon)` at each point.
        prediction: :math:`a_0 + \varepsilon A` at each point.
        residual: :math:`|a(\varepsilon) - a_0 - \varepsilon A|`.
        lost: whether the teacher's step was lost in rounding at each point: the measured
            :math:`a(\varepsilon) - a_0` keeps less than ``LOST_SHARE`` of
            :math:`\varepsilon A` (such points enter neither the rounding level nor the fit).
        fitted: whether each point entered the order fit.
        rounding: the residual's rounding level, its largest value at the ``ROUNDING_TAIL``
            smallest :math:`\varepsilon` not lost, where the grid has reached the flat
            stretch of rounding; ``nan`` if every point is lost.
        order: least-squares slope of :math:`\log(\text{residual})` against
            :math:`\log\varepsilon` over the fit's points (:meth:`from_grid`): the
            smallest :math:`\varepsilon` whose residuals are above ``NOISE_MARGIN`` times
            ``rounding`` (and times the float64 rounding of :math:`a(\varepsilon)`
            itself). The asymptotic order: 2 for a model with a non-zero second-order
            term. ``inf`` when no residual clears it, i.e. the first-order prediction is
            exact to rounding (a linear model under squared error); ``nan`` when fewer
            than two points were fitted or every point is lost.
        n_fitted: how many grid points entered the fit.
        expected_order: the order the Taylor coefficients predict at the fit's smallest
            :math:`\varepsilon`: 2 where the residual there is at most
            ``SECOND_ORDER_FACTOR`` times the second-order term :math:`|C|\varepsilon^2`,
            else 3 (``C`` vanishes and the third-order term leads); ``None`` without a fit.
        second_order_ratio: the residual over :math:`|C|\varepsilon^2` at the fit's
            smallest :math:`\varepsilon` (1 in the Taylor regime; ``nan`` without a fit).
    """

    eps: tuple[float, ...]
    alignment: tuple[float, ...]
    prediction: tuple[float, ...]
    residual: tuple[float, ...]
    lost: tuple[bool, ...]
    fitted: tuple[bool, ...]
    rounding: float
    order: float
    n_fitted: int
    expected_order: int | None
    second_order_ratio: float

    @classmethod
    def from_grid(
        cls,
        eps: Sequence[float],
        alignment: Sequence[float],
        prediction: Sequence[float],
        first_order: Sequence[float],
        second_order: Sequence[float],
        fit_points: int = 4,
    ) -> Convergence:
        r"""The residuals, their rounding level, the fitted and the expected order of a grid.

        The fit starts at the smallest :math:`\varepsilon` whose residual is clear of
        rounding. Where :math:`|C|\varepsilon^2` accounts for that residual (within
        ``SECOND_ORDER_FACTOR``), it runs over the next points as long as that stays true,
        up to ``fit_points``: a ReLU that switches sign further up adds an order-1 error
        that is not the check's. Elsewhere it takes the ``fit_points`` smallest clear points.

        Args:
            eps, alignment, prediction: as the attributes.
            first_order: :math:`\varepsilon A` at each point.
            second_order: :math:`C` at each point (the same number, from each check).
            fit_points: how many points the fit uses at most.

        >>> eps = [10.0 ** -(k / 3) for k in range(3, 31)]
        >>> flat = [3e-13, -2e-13, 4e-13, 1e-13, -3e-13, 2e-13]  # rounding, whatever eps is
        >>> second = [e * e for e in eps[:-6]] + flat
        >>> fit = Convergence.from_grid(eps, [e + r for e, r in zip(eps, second)], eps, eps, [1.0] * len(eps))
        >>> (f"{fit.rounding:.1e}", round(fit.order, 3), fit.n_fitted, fit.expected_order, round(fit.second_order_ratio, 3))
        ('4.0e-13', 2.0, 4, 2, 1.0)
        """
        eps_ = np.asarray(eps, np.float64)
        alignment_, prediction_ = np.asarray(alignment, np.float64), np.asarray(prediction, np.float64)
        first = np.asarray(first_order, np.float64)
        residual = np.abs(alignment_ - prediction_)
        lost = np.abs(alignment_ - prediction_ + first) < LOST_SHARE * np.abs(first)
        kept = [i for i in np.argsort(eps_) if not lost[i]]
        rounding, order, window, expected, ratio = math.nan, math.nan, [], None, math.nan
        if kept:
            rounding = float(residual[kept[:ROUNDING_TAIL]].max())
            # Nor can a residual below the rounding of a(eps) itself be read, whatever the
            # tail shows (it can be exactly 0 where the first-order prediction is exact).
            floor = NOISE_MARGIN * np.maximum(rounding, np.finfo(np.float64).eps * np.abs(alignment_))
            clear = [i for i in kept if residual[i] > floor[i]]
            order = math.inf  # nothing clear of rounding: the prediction is exact
            if clear:
                second = np.abs(np.asarray(second_order, np.float64)) * eps_**2
                with np.errstate(divide="ignore"):
                    ratios = residual / second
                ratio = float(ratios[clear[0]])
                expected = 2 if ratio <= SECOND_ORDER_FACTOR else 3
                window = clear[:fit_points]
                if expected == 2:
                    carried = [1.0 / SECOND_ORDER_FACTOR <= ratios[i] <= SECOND_ORDER_FACTOR for i in window]
                    window = window[: carried.index(False) if False in carried else len(window)] or window[:1]
                order = math.nan  # one point has no slope
                if len(window) >= 2:
                    order = fit_order(eps_[window], residual[window], np.zeros(len(window)), fit_points)[0]
        return cls(
            eps=tuple(float(e) for e in eps),
            alignment=tuple(float(a) for a in alignment),
            prediction=tuple(float(p) for p in prediction),
            residual=tuple(float(r) for r in residual),
            lost=tuple(bool(x) for x in lost),
            fitted=tuple(i in window for i in range(len(eps_))),
            rounding=rounding,
            order=order,
            n_fitted=len(window),
            expected_order=expected,
            second_order_ratio=ratio,
        )

    def order_as_expected(self, tolerance: float = 0.2) -> bool:
        """Whether the residual behaves as the Taylor coefficients predict.

        Where ``expected_order`` is 2: the residual at the fit's smallest point is
        :math:`|C|\varepsilon^2` within ``SECOND_ORDER_FACTOR``, and the fitted order, if
        two points or more were fitted, is within ``tolerance`` of 2. Where it is 3: the
        fitted order is at least ``3 - tolerance``. True when nothing is clear of rounding
        (the prediction is exact), False when the step was lost in rounding at every point.
        """
        if self.expected_order is None:
            return self.order == math.inf
        if self.expected_order == 2:
            carried = 1.0 / SECOND_ORDER_FACTOR <= self.second_order_ratio <= SECOND_ORDER_FACTOR
            return carried and (self.n_fitted < 2 or abs(self.order - 2) <= tolerance)
        return self.n_fitted >= 2 and self.order >= self.expected_order - tolerance


def fit_order(
    eps: Sequence[float] | np.ndarray,
    residual: Sequence[float] | np.ndarray,
    floor: Sequence[float] | np.ndarray,
    points: int = 3,
) -> tuple[float, int]:
    """Slope of log residual against log eps over the ``points`` smallest eps with residual above ``floor``.

    Returns:
        The slope (``inf`` if fewer than two residuals clear the floor) and how many points it used.
    """
    eps, residual, floor = (np.asarray(v, np.float64) for v in (eps, residual, floor))
    order = np.argsort(eps)
    clear = [i for i in order if residual[i] > floor[i]][:points]
    if len(clear) < 2:
        return math.inf, len(clear)
    slope = np.polyfit(np.log(eps[clear]), np.log(residual[clear]), 1)[0]
    return float(slope), len(clear)


def convergence(
    model: ModelFn,
    params: PyTree,
    inputs: ArrayLike,
    *,
    eps_grid: Sequence[float] | None = None,
    eps_star: float | None = None,
    decades: int = 10,
    per_decade: int = 3,
    fit_points: int = 4,
    **kwargs,
) -> Convergence:
    r"""How fast :math:`|a(\varepsilon) - a_0 - \varepsilon A|` shrinks with :math:`\varepsilon`.

    The order is fitted at the small-:math:`\varepsilon` end of the grid, just above the
    rounding plateau: a model with kinks (ReLU) follows its Taylor expansion only once no
    unit switches sign between the teacher's and the student's parameters, which for the
    MNIST MLP takes :math:`\varepsilon` some :math:`10^{5}` times below
    :math:`\varepsilon_*`.

    Args:
        model, params, inputs, kwargs: as for :func:`check_alignment` (without ``eps``).
        eps_grid: the values of :math:`\varepsilon`, reaching down to where the residual
            is rounding (its smallest ``ROUNDING_TAIL`` values set the rounding level); by
            default the automatic :math:`\varepsilon_*` of :func:`check_alignment` times
            :math:`10^{-1}, 10^{-1-1/p}, \dots, 10^{-1-\text{decades}}` with ``p =
            per_decade``.
        eps_star: the automatic :math:`\varepsilon_*` of :func:`check_alignment` on the
            same arguments, where the caller has it already; computed when ``None``.
        decades: how many decades below :math:`\varepsilon_*/10` the default grid reaches.
        per_decade: points per decade. On the MNIST MLP the smooth stretch between the
            first unit that switches sign and the rounding plateau can be less than a
            decade wide.
        fit_points: how many points the fit uses at most: four span a decade, over which
            rounding at a tenth of the smallest residual moves the slope by under 0.05.

    Returns:
        A :class:`Convergence`, whose ``order`` should be its ``expected_order``.
    """
    if eps_grid is None:
        top = check_alignment(model, params, inputs, **kwargs).eps if eps_star is None else eps_star
        eps_grid = [top * 10.0 ** -(1 + k / per_decade) for k in range(per_decade * decades + 1)]
    results = [check_alignment(model, params, inputs, eps=e, **kwargs) for e in eps_grid]
    return Convergence.from_grid(
        eps_grid,
        [r.alignment for r in results],
        [r.prediction for r in results],
        [r.first_order for r in results],
        [r.second_order for r in results],
        fit_points,
    )
