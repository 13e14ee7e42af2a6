r"""The alignment lemma as mathematics: sympy derivations with their claims checked.

Each function returns a :class:`Derivation`: the steps as ``(description, sympy
expression)`` pairs, the main result, and a dictionary of the claims that sympy verified
(each ``True`` only if the identity reduced to zero exactly). In a notebook, displaying a
derivation renders its LaTeX; ``derivation.latex()`` gives the string.

Notation as in :mod:`theory.numerical`: the student loss :math:`L(z, y)` with student
outputs :math:`z` and teacher outputs :math:`y`, :math:`u = J\Delta\theta_T` the change of
the outputs along the teacher's direction, and

.. math:: M = -\frac{\partial^2 L}{\partial y\,\partial z}\Big|_{z=y}, \qquad
          \Delta\theta_S\cdot\Delta\theta_T = \varepsilon\,\mathbb E_x[u^\top M u] + O(\varepsilon^2)
          \ \text{(shared initialization)}.

Example:
    >>> d = softmax_cross_entropy(2)
    >>> d.holds
    True
    >>> d.result
    Matrix([
    [-p1**2 + p1,      -p1*p2],
    [     -p1*p2, -p2**2 + p2]])
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import sympy as sp

__all__ = [
    "Derivation",
    "alignment_expansion",
    "squared_error",
    "softmax_cross_entropy",
    "softmax_cross_entropy_general",
    "subset_softmax_cross_entropy",
    "non_proper_loss",
    "linear_model",
]


# Characters that mean something to LaTeX (or MathJax) even inside \text{...}.
_LATEX_SPECIAL = set("&%$#_{}~^\\")


@dataclasses.dataclass(frozen=True)
class Derivation:
    """A derivation: titled steps, a main result and the claims sympy verified.

    Attributes:
        title: plain text.
        steps: ``(description, lhs, rhs)`` triples: a plain-text description, the
            left-hand side as LaTeX (``""`` for none) and the right-hand side as a sympy
            object or a LaTeX string.
        result: the main sympy result.
        checks: claim -> whether sympy verified it exactly.
    """

    title: str
    steps: tuple[tuple[str, str, Any], ...]
    result: Any
    checks: dict[str, bool]

    def __post_init__(self):
        for text in (self.title, *(step[0] for step in self.steps)):
            if _LATEX_SPECIAL & set(text):
                raise ValueError(f"plain-text description contains a LaTeX special character: {text!r}")

    @property
    def holds(self) -> bool:
        """Whether every checked claim holds."""
        return all(self.checks.values())

    def latex(self) -> str:
        """The steps as one LaTeX ``aligned`` block (without surrounding ``$$``)."""
        rows = []
        for text, lhs, rhs in self.steps:
            body = rhs if isinstance(rhs, str) else sp.latex(rhs)
            rows.append(rf"&\text{{{text}}} \\ &\qquad {lhs + ' = ' if lhs else ''}{body}")
        return r"\begin{aligned}" + r" \\[4pt] ".join(rows) + r"\end{aligned}"

    def _repr_latex_(self) -> str:
        return f"$$\\textbf{{{self.title}}} \\\\ {self.latex()}$$"


Perturb = Callable[[str, Any], Any] | None


def _tap(perturb: Perturb, name: str, expr):
    """``expr``, or ``perturb(name, expr)`` for a negative control.

    Every derivation takes ``perturb``: it replaces a named intermediate (``"loss"``,
    ``"M"``, ``"outputs"``) before the claims are checked, so a test can show that a wrong
    loss, a wrong M or a shifted Jacobian makes a claim fail (a claim that compared a
    result with itself would still hold).
    """
    return expr if perturb is None else perturb(name, expr)


def _is_zero(expr) -> bool:
    """Exact test that a polynomial or rational expression (or matrix of them) vanishes."""
    entries = expr if isinstance(expr, sp.MatrixBase) else [expr]
    return all(sp.cancel(sp.expand(e)) == 0 for e in entries)


def _exp_to_rational(expr, images: dict[sp.Expr, sp.Symbol] | None = None):
    r"""Replace each :math:`e^{m}` of a monomial :math:`m` by a positive symbol :math:`E_m`.

    :math:`e^{\sum_k c_k m_k} \mapsto \prod_k E_{m_k}^{c_k}` turns softmax expressions into
    rational functions, for which :func:`sympy.cancel` decides zero exactly and fast. If
    the rational function is zero as a function of free symbols, the original expression
    is zero for every value of the variables. ``images`` names the symbol of some
    monomials (``{y_i: p_i}`` writes :math:`e^{y_i}` as :math:`p_i`, so that softmax(y) becomes
    :math:`p_i / \sum_j p_j`); the others get fresh positive symbols.
    """
    images = {} if images is None else dict(images)

    def monomials(e):
        out = sp.S.One
        for term in sp.Add.make_args(sp.expand(e.args[0])):
            coeff, mono = term.as_coeff_Mul()
            out *= images.setdefault(mono, sp.Dummy(positive=True)) ** coeff
        return out

    return expr.replace(lambda e: isinstance(e, sp.exp), monomials)


def _pull_constants(total: sp.Sum) -> sp.Expr:
    r"""``Sum(c * f(i) + ...)`` as ``c * Sum(f(i)) + ...`` for ``c`` free of the summation index.

    A sum over several indices is taken one index at a time, innermost first, so that
    :math:`\sum_k\sum_l a_k b_l` becomes the product of two single sums.
    """
    expr = total.function
    for limit in total.limits:
        terms = []
        for term in sp.Add.make_args(sp.expand(expr)):
            constant, rest = term.as_independent(limit[0], as_Add=False)
            terms.append(constant * (sp.Sum(rest, limit).doit() if rest == 1 else sp.Sum(rest, limit)))
        expr = sp.Add(*terms)
    return expr


def _separate_sums(expr, index: sp.Symbol) -> sp.Expr:
    """``expr`` with every sum split into constants times single sums, each over ``index``.

    Constants are pulled out (:func:`_pull_constants`) until nothing changes; then each sum
    whose summand holds no other sum and not ``index`` is renamed to run over ``index``,
    so that equal sums compare equal. A sum that does not separate keeps its own index.
    """
    for _ in range(8):
        separated = sp.expand(expr).replace(lambda e: isinstance(e, sp.Sum), _pull_constants)
        if separated == expr:
            break
        expr = separated

    def renamed(total: sp.Sum):
        (variable, *bounds), *others = total.limits
        if others or total.function.has(sp.Sum) or total.function.has(index):
            return total
        return sp.Sum(total.function.subs(variable, index), (index, *bounds))

    return expr.replace(lambda e: isinstance(e, sp.Sum), renamed)


def _vector(name: str, n: int, **assumptions) -> sp.Matrix:
    return sp.Matrix(sp.symbols(f"{name}1:{n + 1}", **assumptions))


def _psd_by_sum_of_squares(m: sp.Matrix, p: sp.Matrix, coordinates: tuple[int, ...]) -> tuple[sp.Expr, bool]:
    r""":math:`\sum_a p_a(u_{c_a} - \bar u)^2` with :math:`\bar u = \sum_a p_a u_{c_a}`, and whether it is :math:`u^\top M u`.

    ``m`` is the derived :math:`M` with entries rational in the positive symbols ``p``,
    ``coordinates`` the output coordinates :math:`c_a` that ``p`` weighs. Agreement is
    checked where :math:`\sum_a p_a = 1`; it makes :math:`u^\top M u` a sum of squares with
    positive weights, so :math:`M \succeq 0`. A wrong :math:`M` breaks the identity.
    """
    u = _vector("u", m.shape[0], real=True)
    u_bar = sum((p[a] * u[c] for a, c in enumerate(coordinates)), sp.S.Zero)
    squares = sum((p[a] * (u[c] - u_bar) ** 2 for a, c in enumerate(coordinates)), sp.S.Zero)
    on_simplex = {p[-1]: 1 - sum(p[:-1])}
    return squares, _is_zero(((u.T * m * u)[0] - squares).subs(on_simplex))


@functools.lru_cache(maxsize=None)
def alignment_expansion(n: int = 2, *, perturb: Perturb = None) -> Derivation:
    r"""Why the alignment is :math:`\varepsilon\, u^\top M u + O(\varepsilon^2)` and :math:`M \succeq 0` for any proper loss.

    Expand an arbitrary smooth loss to second order around :math:`z = y = c`,

    .. math:: L(c + \zeta, c + \eta) = L_0 + g^\top\zeta + h^\top\eta
              + \tfrac12\zeta^\top H\zeta + \zeta^\top B\eta + \tfrac12\eta^\top K\eta + O(3),

    with symbolic :math:`g, h` and matrices :math:`H, K` (symmetric) and :math:`B`. Under
    shared initialization the student's outputs are :math:`c` and the teacher's are
    :math:`c + \varepsilon u + O(\varepsilon^2)`, and for one input the alignment is
    :math:`a(\varepsilon) = -\nabla_z L(c, c + \varepsilon u)^\top u` (the student's step
    pulled back through :math:`J^\top`, dotted with :math:`\Delta\theta_T`), so
    :math:`a_0 = -g^\top u` and :math:`a_1 = -u^\top B u = u^\top M u`. The third-order
    remainder does not reach :math:`a_1`. A proper loss (minimized at :math:`z = y` for
    every :math:`y`) has :math:`\nabla_z L(y, y) = 0` for all :math:`y`, which forces
    :math:`g = 0` and :math:`B = -H`: then :math:`a_0 = 0` and :math:`M = H`, the Hessian
    at a minimum, positive semi-definite.
    """
    zeta, eta, u, g, h = (_vector(s, n, real=True) for s in ("zeta", "eta", "u", "g", "h"))
    hess = sp.Matrix(n, n, lambda a, b: sp.Symbol(f"H_{min(a, b) + 1}{max(a, b) + 1}", real=True))
    teacher_hess = sp.Matrix(n, n, lambda a, b: sp.Symbol(f"K_{min(a, b) + 1}{max(a, b) + 1}", real=True))
    cross = sp.Matrix(n, n, lambda a, b: sp.Symbol(f"B_{a + 1}{b + 1}", real=True))
    eps, l0 = sp.Symbol("varepsilon", real=True), sp.Symbol("L_0", real=True)
    loss = (
        l0
        + (g.T * zeta)[0]
        + (h.T * eta)[0]
        + (zeta.T * hess * zeta)[0] / 2
        + (zeta.T * cross * eta)[0]
        + (eta.T * teacher_hess * eta)[0] / 2
    )
    loss = _tap(perturb, "loss", loss)
    grad_z = sp.Matrix([sp.diff(loss, v) for v in zeta])
    on_path = {**{v: 0 for v in zeta}, **{v: eps * uk for v, uk in zip(eta, u)}}
    alignment = sp.expand(-(grad_z.subs(on_path).T * u)[0])
    a0, a1 = alignment.coeff(eps, 0), alignment.coeff(eps, 1)
    m = _tap(perturb, "M", -cross)
    # Proper loss: grad_z L(y, y) = 0 for every y, i.e. for zeta = eta = any w.
    w = _vector("w", n, real=True)
    stationary = sp.expand(grad_z.subs({**dict(zip(zeta, w)), **dict(zip(eta, w))}))
    conditions = [c for row in stationary for c in sp.Poly(row, *w).coeffs()]
    # No solution (a term no choice of g and B cancels) means no proper loss of this form.
    solutions = sp.solve(conditions, [*g, *cross], dict=True)
    proper = solutions[0] if solutions else None
    return Derivation(
        title=f"First-order expansion of the alignment (n = {n})",
        steps=(
            ("any loss to second order around z = y = c", r"L(c + \zeta, c + \eta)", loss),
            ("alignment for one input: student outputs c, teacher outputs c + eps u", "a", alignment),
            ("zeroth order", "a_0", a0),
            ("first order, with M = -d2L/dydz = -B", "a_1", a1),
            (
                "a proper loss has zero z-gradient at z = y for every y, which forces",
                "",
                proper or r"\text{no solution}",
            ),
            ("so the zeroth order vanishes and M = H, the Hessian at the minimum", "M", m.subs(proper or {})),
        ),
        result=a1,
        checks={
            "zeroth order is -g^T u": _is_zero(a0 + (g.T * u)[0]),
            "first-order coefficient is u^T M u": _is_zero(a1 - (u.T * m * u)[0]),
            "proper loss: g = 0": proper is not None and all(proper.get(v, v) == 0 for v in g),
            "proper loss: M = H": proper is not None and _is_zero(m.subs(proper) - hess),
            "higher orders of the path vanish here": _is_zero(alignment - a0 - eps * a1),
        },
    )


@functools.lru_cache(maxsize=None)
def squared_error(n: int, *, perturb: Perturb = None) -> Derivation:
    r"""Squared error :math:`L = \lVert z - y\rVert^2`: :math:`\nabla_z L = 0` at :math:`z = y` and :math:`M = 2I`."""
    z, y = _vector("z", n, real=True), _vector("y", n, real=True)
    loss = _tap(perturb, "loss", ((z - y).T * (z - y))[0])
    grad = sp.Matrix([sp.diff(loss, zk) for zk in z])
    at_target = grad.subs(dict(zip(z, y)))
    m = _tap(perturb, "M", -sp.Matrix(n, n, lambda k, l: sp.diff(grad[k], y[l])))
    eigenvalues = m.eigenvals()
    return Derivation(
        title=f"Squared error, n = {n}",
        steps=(
            ("loss", "L", loss),
            ("gradient in z", r"\nabla_z L", grad),
            ("at z = y (zeroth order)", r"\nabla_z L|_{z=y}", at_target),
            ("M = -d2L/dydz", "M", m),
            ("eigenvalues (multiplicity)", "", eigenvalues),
        ),
        result=m,
        checks={
            "zeroth order vanishes": _is_zero(at_target),
            "M = 2 I": _is_zero(m - 2 * sp.eye(n)),
            "M positive definite": all(ev > 0 for ev in eigenvalues),
        },
    )


@functools.lru_cache(maxsize=None)
def softmax_cross_entropy(n: int, *, perturb: Perturb = None) -> Derivation:
    r"""Softmax cross-entropy with ``n`` logits: :math:`M = \mathrm{diag}(p) - pp^\top \succeq 0`, null space :math:`\mathrm{span}(\mathbf 1)`.

    :math:`L = -\sum_i p_i \log q_i` with :math:`p = \mathrm{softmax}(y)`,
    :math:`q = \mathrm{softmax}(z)`. Verified: :math:`\nabla_z L = q - p` (zero at
    :math:`z = y`); :math:`M = \mathrm{diag}(p) - pp^\top`;
    :math:`u^\top M u = \sum_i p_i (u_i - \bar u)^2` with :math:`\bar u = p^\top u` (so
    :math:`M \succeq 0`); :math:`M\mathbf 1 = 0`; and the leading
    :math:`(n-1)\times(n-1)` minor equals :math:`\prod_i p_i > 0`, so the rank is
    :math:`n - 1` and the null space is exactly :math:`\mathrm{span}(\mathbf 1)`.
    """
    z, y = _vector("z", n, real=True), _vector("y", n, real=True)
    p_of_y = sp.Matrix([sp.exp(v) for v in y]) / sum(sp.exp(v) for v in y)
    q_of_z = sp.Matrix([sp.exp(v) for v in z]) / sum(sp.exp(v) for v in z)
    log_sum_exp = sp.log(sum(sp.exp(v) for v in z))
    loss = _tap(perturb, "loss", -sum((p_of_y[i] * (z[i] - log_sum_exp) for i in range(n)), sp.S.Zero))
    grad = sp.Matrix([sp.diff(loss, zk) for zk in z])
    grad_is_q_minus_p = _is_zero(_exp_to_rational(grad - (q_of_z - p_of_y)))
    at_target = grad.subs(dict(zip(z, y)))
    # M from the loss itself at z = y, so that a wrong loss reaches every claim about M.
    m_of_y = _tap(perturb, "M", -sp.Matrix(n, n, lambda k, l: sp.diff(grad[k], y[l])).subs(dict(zip(z, y))))
    m_is_softmax_covariance = _is_zero(_exp_to_rational(m_of_y - (sp.diag(*p_of_y) - p_of_y * p_of_y.T)))

    # The claims about M are checked on the derived M, written in p = softmax(y) (e^{y_i} -> p_i
    # gives p_i / sum_j p_j, and the p sum to 1); the closed form shown is the one that
    # "M = diag(p) - p p^T" certifies.
    p = _vector("p", n, positive=True)
    on_simplex = {p[-1]: 1 - sum(p[:-1])}
    derived = _exp_to_rational(m_of_y, dict(zip(y, p))).subs(on_simplex).applyfunc(sp.cancel)
    squares, psd = _psd_by_sum_of_squares(derived, p, tuple(range(n)))
    minor = derived[: n - 1, : n - 1].det(method="berkowitz") if n > 1 else sp.S.One
    m = sp.diag(*p) - p * p.T
    u = _vector("u", n, real=True)
    return Derivation(
        title=f"Softmax cross-entropy, n = {n}",
        steps=(
            ("loss, with p = softmax(y) and log q = z - logsumexp(z)", "L", loss),
            ("gradient in z, with q = softmax(z)", r"\nabla_z L", sp.Symbol("q") - sp.Symbol("p")),
            ("at z = y (zeroth order)", r"\nabla_z L|_{z=y}", sp.zeros(n, 1)),
            ("M = -d2L/dydz = dp/dy", "M", m),
            ("quadratic form", r"u^\top M u", (u.T * m * u)[0]),
            ("as a sum of squares (the p sum to 1)", r"u^\top M u", squares),
            (
                "the constant vector is in the null space",
                r"M \mathbf{1}",
                sp.expand(derived * sp.ones(n, 1)),
            ),
            (
                "leading principal minor of order n - 1: positive, so rank n - 1",
                r"\det M_{1:n-1,\,1:n-1}",
                sp.factor(minor),
            ),
        ),
        result=m,
        checks={
            "gradient is q - p": grad_is_q_minus_p,
            "zeroth order vanishes": _is_zero(_exp_to_rational(at_target)),
            "M = diag(p) - p p^T": m_is_softmax_covariance,
            "M positive semi-definite (sum of squares)": psd,
            "M 1 = 0": _is_zero(derived * sp.ones(n, 1)),
            "null space is span(1) (minor = prod p)": _is_zero(minor - sp.prod(list(p)).subs(on_simplex)),
        },
    )


@functools.lru_cache(maxsize=None)
def softmax_cross_entropy_general(*, perturb: Perturb = None) -> Derivation:
    r"""The general matrix form for symbolic :math:`n`: :math:`M_{kl} = p_k(\delta_{kl} - p_l)`.

    Derived with indexed symbols and :math:`\sum_{j=1}^n`:
    :math:`\partial L / \partial z_k = q_k - p_k` and
    :math:`-\partial^2 L/\partial y_l \partial z_k = \partial p_k/\partial y_l = p_k(\delta_{kl} - p_l)`,
    i.e. :math:`M = \mathrm{diag}(p) - pp^\top`; and
    :math:`u^\top M u = \sum_i p_i u_i^2 - (\sum_i p_i u_i)^2 = \sum_i p_i(u_i - \bar u)^2 \ge 0`
    using :math:`\sum_i p_i = 1`.
    """
    n = sp.Symbol("n", integer=True, positive=True)
    i, j, k, l = sp.symbols("i j k l", integer=True, positive=True)
    y, z, u = sp.IndexedBase("y"), sp.IndexedBase("z"), sp.IndexedBase("u")
    sum_y = sp.Sum(sp.exp(y[j]), (j, 1, n))
    sum_z = sp.Sum(sp.exp(z[j]), (j, 1, n))

    def p(index):
        return sp.exp(y[index]) / sum_y

    def q(index):
        return sp.exp(z[index]) / sum_z

    def first_branch(expr):  # the indices k, l lie in 1..n, where Piecewise takes its first branch
        return expr.replace(lambda e: isinstance(e, sp.Piecewise), lambda e: e.args[0].expr)

    def as_rational(expr):  # sums separated and over index j, the two normalizers as symbols
        return _separate_sums(expr, j).xreplace(
            {sum_y: sp.Symbol("S_y", positive=True), sum_z: sp.Symbol("S_z", positive=True)}
        )

    loss = _tap(perturb, "loss", -sp.Sum(p(i) * (z[i] - sp.log(sum_z)), (i, 1, n)))
    grad = first_branch(sp.diff(loss, z[k]).doit())
    grad_check = _is_zero(as_rational(grad - (q(k) - p(k))))
    m = _tap(perturb, "M", first_branch(sp.diff(p(k), y[l]).doit()))
    m_check = sp.simplify(sp.expand_power_exp(m - p(k) * (sp.KroneckerDelta(k, l) - p(l)))) == 0
    # The quadratic form of the derived M, the sums over l and then k done where they
    # can be (the Kronecker delta), against the p-weighted variance with p = softmax(y),
    # whose weights sum to 1 through S_y / S_y.
    quadratic_of_m = sp.Sum(first_branch(sp.Sum(u[k] * m * u[l], (l, 1, n)).doit()), (k, 1, n))
    mean = sp.Sum(p(j) * u[j], (j, 1, n))
    variance = sp.Sum(p(i) * (u[i] - mean) ** 2, (i, 1, n))
    psd_check = _is_zero(as_rational(quadratic_of_m - variance))
    pw, ubar = sp.IndexedBase("p"), sp.Symbol(r"\bar u")
    quadratic = sp.Sum(pw[i] * u[i] ** 2, (i, 1, n)) - sp.Sum(pw[i] * u[i], (i, 1, n)) ** 2
    squares = sp.Sum(pw[i] * (u[i] - ubar) ** 2, (i, 1, n))
    return Derivation(
        title="Softmax cross-entropy, general n",
        steps=(
            ("loss", "L", loss),
            ("gradient in z", r"\partial L / \partial z_k", q(k) - p(k)),
            ("M is the y-derivative of p", "M_{kl}", sp.Symbol("p_k") * (sp.KroneckerDelta(k, l) - sp.Symbol("p_l"))),
            ("quadratic form", r"u^\top M u", quadratic),
            ("a p-weighted variance (the p sum to 1)", r"u^\top M u", squares),
        ),
        result=sp.Symbol("p_k") * (sp.KroneckerDelta(k, l) - sp.Symbol("p_l")),
        checks={
            "gradient is q_k - p_k": grad_check,
            "M_kl = p_k (delta_kl - p_l)": m_check,
            "u^T M u = sum_i p_i (u_i - u-bar)^2": psd_check,
        },
    )


@functools.lru_cache(maxsize=None)
def subset_softmax_cross_entropy(n: int, subset: tuple[int, ...], *, perturb: Perturb = None) -> Derivation:
    r"""Cross-entropy over the logits ``subset`` of ``n`` (0-based): :math:`M = P^\top M_S P \succeq 0`.

    The loss sees only :math:`z_S, y_S`, so :math:`M` is the ``subset`` block of the
    softmax-covariance :math:`\mathrm{diag}(p_S) - p_S p_S^\top` (with
    :math:`p_S = \mathrm{softmax}(y_S)`) and zero elsewhere: still positive semi-definite,
    with null space spanned by :math:`\mathbf 1_S` and every coordinate outside ``subset``
    (dimension :math:`n - |S| + 1`). This is the MNIST "aux only" loss.
    """
    if not subset or len(set(subset)) != len(subset) or not all(0 <= s < n for s in subset):
        raise ValueError(f"subset {subset} must be distinct indices in 0..{n - 1}")
    z, y = _vector("z", n, real=True), _vector("y", n, real=True)
    zs, ys = [z[s] for s in subset], [y[s] for s in subset]
    p_sub = sp.Matrix([sp.exp(v) for v in ys]) / sum(sp.exp(v) for v in ys)
    log_sum_exp = sp.log(sum(sp.exp(v) for v in zs))
    loss = _tap(perturb, "loss", -sum((p_sub[i] * (zs[i] - log_sum_exp) for i in range(len(subset))), sp.S.Zero))
    grad = sp.Matrix([sp.diff(loss, zk) for zk in z])
    m = _tap(perturb, "M", -sp.Matrix(n, n, lambda k, l: sp.diff(grad[k], y[l])).subs(dict(zip(z, y))))
    block = sp.zeros(n, n)
    for a, sa in enumerate(subset):
        for b, sb in enumerate(subset):
            block[sa, sb] = (sp.KroneckerDelta(a, b) * p_sub[a] - p_sub[a] * p_sub[b]).subs(dict(zip(z, y)))
    p = _vector("p", len(subset), positive=True)
    squares, psd = _psd_by_sum_of_squares(_exp_to_rational(m, dict(zip(ys, p))), p, subset)
    kernel = [sp.Matrix([1 if k in subset else 0 for k in range(n)])]
    kernel += [sp.Matrix([1 if k == c else 0 for k in range(n)]) for c in range(n) if c not in subset]
    return Derivation(
        title=f"Softmax cross-entropy over logits {list(subset)} of {n}",
        steps=(
            ("loss on the subset only", "L", loss),
            ("at z = y (zeroth order)", r"\nabla_z L|_{z=y}", sp.zeros(n, 1)),
            ("M: the softmax covariance of the subset, zero elsewhere", "M", m),
            ("quadratic form on the subset (the subset p sum to 1)", r"u^\top M u", squares),
            ("null space basis (columns)", "", sp.Matrix.hstack(*kernel)),
        ),
        result=m,
        checks={
            "zeroth order vanishes": _is_zero(_exp_to_rational(grad.subs(dict(zip(z, y))))),
            "M is the embedded subset block": _is_zero(_exp_to_rational(m - block)),
            "M positive semi-definite (sum of squares)": psd,
            "null space contains 1_S and the other coordinates": all(_is_zero(_exp_to_rational(m * v)) for v in kernel),
        },
    )


@functools.lru_cache(maxsize=None)
def non_proper_loss(*, perturb: Perturb = None) -> Derivation:
    r"""A student loss that breaks the lemma: :math:`L = (z - y)^\top Q (z - y)`, :math:`Q = \mathrm{diag}(1, -1)`.

    It is stationary at :math:`z = y`, so the zeroth-order term still vanishes, but not
    minimized there (:math:`L(y + t e_2, y) = -t^2`): it is not proper. :math:`M = 2Q`
    has eigenvalue :math:`-2`, and for the linear model :math:`f(x) = Wx` with one input
    :math:`x = (1, 1)` and teacher direction :math:`V = e_2 e_2^\top`,
    :math:`u = Vx = e_2` gives :math:`A = u^\top M u = -2 < 0`: the student moves against
    the teacher for every small :math:`\varepsilon`.
    """
    z, y = _vector("z", 2, real=True), _vector("y", 2, real=True)
    t = sp.Symbol("t", real=True)
    q = sp.diag(1, -1)
    loss = _tap(perturb, "loss", ((z - y).T * q * (z - y))[0])
    grad = sp.Matrix([sp.diff(loss, zk) for zk in z])
    m = _tap(perturb, "M", -sp.Matrix(2, 2, lambda k, l: sp.diff(grad[k], y[l])))
    along_e2 = loss.subs({z[0]: y[0], z[1]: y[1] + t})
    x, v = sp.Matrix([1, 1]), sp.Matrix([[0, 0], [0, 1]])
    u = v * x
    a = (u.T * m * u)[0]
    return Derivation(
        title="A non-proper student loss",
        steps=(
            ("loss with Q = diag(1, -1)", "L", loss),
            ("at z = y (zeroth order)", r"\nabla_z L|_{z=y}", grad.subs(dict(zip(z, y)))),
            ("not minimized at z = y", "L(y + t e_2, y)", along_e2),
            ("M = 2Q", "M", m),
            ("eigenvalues (multiplicity)", "", m.eigenvals()),
            ("linear model, one input x = (1, 1), teacher direction V with one entry, at (2, 2)", "u = V x", u),
            ("first-order coefficient", r"A = u^\top M u", a),
        ),
        result=a,
        checks={
            "zeroth order vanishes": _is_zero(grad.subs(dict(zip(z, y)))),
            "not minimized at z = y": sp.simplify(along_e2 + t**2) == 0,
            "M has a negative eigenvalue": min(m.eigenvals()) < 0,
            "A < 0 for the example": bool(a < 0),
        },
    )


@functools.lru_cache(maxsize=None)
def linear_model(
    loss: str = "squared_error", n: int = 2, d: int = 2, samples: int = 2, *, perturb: Perturb = None
) -> Derivation:
    r"""The alignment for :math:`f(x) = Wx` in closed form.

    ``loss="squared_error"``: exactly (every order in :math:`\varepsilon`)

    .. math:: \Delta\theta_S\cdot\Delta\theta_T = 2\varepsilon\,\mathrm{tr}(V\hat\Sigma V^\top)
              = \frac{2\varepsilon}{K}\sum_s \lVert V x_s\rVert^2 \ge 0,
              \qquad \hat\Sigma = \frac1K\sum_s x_s x_s^\top,

    a non-negative quadratic form in the teacher direction :math:`V` (here :math:`\Delta W_T = V`).
    ``loss="softmax_cross_entropy"``: the first-order coefficient is
    :math:`A = \frac1K\sum_s (Vx_s)^\top(\mathrm{diag}(p_s) - p_s p_s^\top)(Vx_s)`,
    :math:`p_s = \mathrm{softmax}(Wx_s)`, for ``n = 2`` equal to
    :math:`\frac1K\sum_s p_{s1}p_{s2}((Vx_s)_1 - (Vx_s)_2)^2 \ge 0`.

    Sizes: ``n`` outputs, ``d`` inputs, ``samples`` symbolic inputs :math:`x_s`.
    """
    if loss not in ("squared_error", "softmax_cross_entropy"):
        raise ValueError(f"loss must be 'squared_error' or 'softmax_cross_entropy', got {loss!r}")
    w = sp.Matrix(n, d, lambda a, b: sp.Symbol(f"w_{a + 1}{b + 1}", real=True))
    v = sp.Matrix(n, d, lambda a, b: sp.Symbol(f"v_{a + 1}{b + 1}", real=True))
    xs = [sp.Matrix(d, 1, lambda a, _: sp.Symbol(f"x_{s + 1}{a + 1}", real=True)) for s in range(samples)]
    eps = sp.Symbol("varepsilon", positive=True)

    def per_example(z, y):
        if loss == "squared_error":
            return ((z - y).T * (z - y))[0]
        p = sp.Matrix([sp.exp(c) for c in y]) / sum(sp.exp(c) for c in y)
        log_sum_exp = sp.log(sum(sp.exp(c) for c in z))
        return -sum((p[i] * (z[i] - log_sum_exp) for i in range(n)), sp.S.Zero)

    # Teacher outputs as their own symbols t_s while differentiating in the student's W,
    # then put on the teacher's path t_s = (W + eps V) x_s.
    ts = [sp.Matrix(n, 1, lambda k, _: sp.Symbol(f"t_{s + 1}{k + 1}", real=True)) for s in range(samples)]
    # The student's outputs: a perturbed ("outputs") map shifts the Jacobian the step goes through.
    objective = sum((per_example(_tap(perturb, "outputs", w * x), t) for x, t in zip(xs, ts)), sp.S.Zero) / samples
    step = -sp.Matrix(n, d, lambda a, b: sp.diff(objective, w[a, b]))
    alignment = sum((step[a, b] * v[a, b] for a in range(n) for b in range(d)), sp.S.Zero)
    teacher_path = {t[k]: ((w + eps * v) * x)[k] for x, t in zip(xs, ts) for k in range(n)}
    if loss == "squared_error":
        sigma = sum((x * x.T for x in xs), sp.zeros(d, d)) / samples
        on_path = sp.expand(alignment.subs(teacher_path))
        closed_form = 2 * eps * (v * sigma * v.T).trace()
        squares = 2 * eps * sum((((v * x).T * (v * x))[0] for x in xs), sp.S.Zero) / samples
        return Derivation(
            title=f"Linear model, squared error (n = {n}, d = {d}, K = {samples})",
            steps=(
                ("student step", r"\Delta W_S", step.subs(teacher_path).applyfunc(sp.factor)),
                ("alignment, exact in eps", r"\Delta W_S \cdot V", sp.factor(on_path)),
                (
                    "closed form",
                    r"\Delta W_S \cdot V",
                    r"2 \varepsilon \operatorname{tr}(V \hat\Sigma V^\top), \quad \hat\Sigma = \frac{1}{K}\sum_s x_s x_s^\top",
                ),
                ("as a sum of squares", r"\Delta W_S \cdot V", squares),
            ),
            result=closed_form,
            checks={
                "student step = 2 eps V Sigma": _is_zero(step.subs(teacher_path) - 2 * eps * v * sigma),
                "alignment = 2 eps tr(V Sigma V^T)": _is_zero(on_path - closed_form),
                "alignment = (2 eps / K) sum_s |V x_s|^2": _is_zero(on_path - squares),
            },
        )
    # d/d eps at 0 by the chain rule through the teacher outputs: sum_sk d a / d t_sk (V x_s)_k.
    at_init = {t[k]: (w * x)[k] for x, t in zip(xs, ts) for k in range(n)}
    first = sum((sp.diff(alignment, t[k]) * (v * x)[k] for x, t in zip(xs, ts) for k in range(n)), sp.S.Zero)
    first = first.subs(at_init)
    quadratic, variance = sp.S.Zero, sp.S.Zero
    for x in xs:
        logits, u = w * x, v * x
        p = sp.Matrix([sp.exp(c) for c in logits]) / sum(sp.exp(c) for c in logits)
        quadratic += (u.T * (sp.diag(*p) - p * p.T) * u)[0] / samples
        if n == 2:
            variance += p[0] * p[1] * (u[0] - u[1]) ** 2 / samples
    checks = {
        "zeroth order vanishes": _is_zero(_exp_to_rational(alignment.subs(at_init))),
        "first-order coefficient = mean of u^T (diag(p) - p p^T) u": _is_zero(_exp_to_rational(first - quadratic)),
    }
    steps = [
        ("zeroth order, teacher outputs at the student outputs", "a_0", sp.S.Zero),
        (
            "first order",
            "A",
            r"\frac{1}{K}\sum_s u_s^\top (\mathrm{diag}(p_s) - p_s p_s^\top) u_s, \quad u_s = V x_s,\ p_s = \mathrm{softmax}(W x_s)",
        ),
    ]
    if n == 2:
        checks["A = mean of p1 p2 ((Vx)_1 - (Vx)_2)^2"] = _is_zero(_exp_to_rational(first - variance))
        steps.append(("for two outputs, a sum of squares", "A", variance))
    return Derivation(
        title=f"Linear model, softmax cross-entropy (n = {n}, d = {d}, K = {samples})",
        steps=tuple(steps),
        result=quadratic,
        checks=checks,
    )
