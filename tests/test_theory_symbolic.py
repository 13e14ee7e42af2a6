"""The sympy derivations: every claim verified, results agreeing with the numerical check."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import sympy as sp

from theory import symbolic
from theory.numerical import (
    QuadraticLoss,
    SubsetSoftmaxCrossEntropy,
    check_alignment,
    softmax_cross_entropy,
    squared_error,
)

# (family, name, build): the family names the derivation whose claims a control must break.
DERIVATIONS = [
    ("expansion", "expansion n=2", lambda: symbolic.alignment_expansion(2)),
    ("expansion", "expansion n=3", lambda: symbolic.alignment_expansion(3)),
    *[("squared error", f"squared error n={n}", lambda n=n: symbolic.squared_error(n)) for n in range(2, 6)],
    *[("cross-entropy", f"cross-entropy n={n}", lambda n=n: symbolic.softmax_cross_entropy(n)) for n in range(2, 6)],
    ("general cross-entropy", "cross-entropy general n", symbolic.softmax_cross_entropy_general),
    ("subset", "subset (2, 3) of 4", lambda: symbolic.subset_softmax_cross_entropy(4, (2, 3))),
    ("subset", "subset (0, 2, 4) of 5", lambda: symbolic.subset_softmax_cross_entropy(5, (0, 2, 4))),
    ("subset", "subset (1,) of 3", lambda: symbolic.subset_softmax_cross_entropy(3, (1,))),
    ("non-proper example", "non-proper loss", symbolic.non_proper_loss),
    (
        "linear, squared error",
        "linear model, squared error",
        lambda: symbolic.linear_model("squared_error", n=2, d=2, samples=2),
    ),
    (
        "linear, cross-entropy",
        "linear model, cross-entropy",
        lambda: symbolic.linear_model("softmax_cross_entropy", n=2, d=2, samples=1),
    ),
]


@pytest.mark.parametrize("build", [b for _, _, b in DERIVATIONS], ids=[name for _, name, _ in DERIVATIONS])
def test_every_claim_is_verified_and_renders(build):
    d = build()
    assert d.checks and d.holds, {claim: ok for claim, ok in d.checks.items() if not ok}
    latex = d.latex()
    assert latex.startswith(r"\begin{aligned}") and latex.endswith(r"\end{aligned}")
    assert latex.count("{") == latex.count("}")
    assert d._repr_latex_().startswith("$$") and len(d.steps) >= 2


def _probabilities(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max())
    return e / e.sum()


def _identity_model(theta, x):
    """Outputs equal to the parameters, so that J = I and A = u^T M u for the direction u."""
    return jnp.broadcast_to(theta[None, :], (x.shape[0], theta.shape[0]))


def _numerical_m(loss, logits: np.ndarray) -> np.ndarray:
    """M from the numerical check, column by column: A(e_i + e_j) - A(e_i) - A(e_j) = 2 M_ij."""
    n = len(logits)

    def a(u):
        return check_alignment(_identity_model, logits, np.zeros((1, 1)), student_loss=loss, direction=u, eps=1e-3).A

    eye = np.eye(n)
    diag = np.array([a(eye[i]) for i in range(n)])
    return np.array(
        [[diag[i] if i == j else (a(eye[i] + eye[j]) - diag[i] - diag[j]) / 2 for j in range(n)] for i in range(n)]
    )


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_symbolic_m_is_the_numerical_m(n):
    logits = np.random.default_rng(n).standard_normal(n)
    p = _probabilities(logits)
    d = symbolic.softmax_cross_entropy(n)
    symbols = sp.symbols(f"p1:{n + 1}", positive=True)
    m_symbolic = np.array(d.result.subs(dict(zip(symbols, p))), dtype=float)
    # M is computed in float64 from O(1) probabilities: agreement to 1e-12 absolute.
    np.testing.assert_allclose(_numerical_m(softmax_cross_entropy, logits), m_symbolic, atol=1e-12)
    np.testing.assert_allclose(_numerical_m(squared_error, logits), 2 * np.eye(n), atol=1e-12)
    assert np.linalg.eigvalsh(m_symbolic).min() > -1e-15  # positive semi-definite
    np.testing.assert_allclose(m_symbolic @ np.ones(n), 0.0, atol=1e-15)


def test_subset_m_is_the_embedded_block():
    subset, logits = (0, 2, 4), np.random.default_rng(7).standard_normal(5)
    d = symbolic.subset_softmax_cross_entropy(5, subset)
    y = sp.symbols("y1:6", real=True)
    m_symbolic = np.array(d.result.subs(dict(zip(y, logits))).evalf(), dtype=float)
    np.testing.assert_allclose(_numerical_m(SubsetSoftmaxCrossEntropy(subset), logits), m_symbolic, atol=1e-12)
    p = _probabilities(logits[list(subset)])
    np.testing.assert_allclose(m_symbolic[np.ix_(subset, subset)], np.diag(p) - np.outer(p, p), atol=1e-15)
    outside = [k for k in range(5) if k not in subset]
    assert np.all(m_symbolic[outside] == 0) and np.all(m_symbolic[:, outside] == 0)


def test_non_proper_example_is_reproduced_numerically():
    d = symbolic.non_proper_loss()
    assert d.result == -2
    # The derivation's example: f(x) = W x, x = (1, 1), V = e2 e2^T, Q = diag(1, -1).
    r = check_alignment(
        lambda w, x: x @ w.T,
        np.eye(2),
        np.array([[1.0, 1.0]]),
        student_loss=QuadraticLoss.from_matrix(np.diag([1.0, -1.0])),
        direction=np.array([[0.0, 0.0], [0.0, 1.0]]),
        eps=1e-2,
    )
    assert r.A == float(d.result) and r.alignment < 0


def test_linear_closed_form_is_the_numerical_alignment():
    d = symbolic.linear_model("squared_error", n=2, d=2, samples=2)
    rng = np.random.default_rng(11)
    w, v, x = rng.standard_normal((2, 2)), rng.standard_normal((2, 2)), rng.standard_normal((2, 2))
    eps = 0.3
    values = {sp.Symbol("varepsilon", positive=True): eps}
    for a in range(2):
        for b in range(2):
            values[sp.Symbol(f"v_{a + 1}{b + 1}", real=True)] = v[a, b]
            values[sp.Symbol(f"x_{a + 1}{b + 1}", real=True)] = x[a, b]  # x_{s, i}: sample s, entry i
    closed_form = float(d.result.subs(values))
    r = check_alignment(lambda w_, xs: xs @ w_.T, w, x, student_loss=squared_error, direction=v, eps=eps)
    np.testing.assert_allclose(r.alignment, closed_form, rtol=1e-12)
    assert closed_form > 0


def test_plain_text_descriptions_are_enforced():
    with pytest.raises(ValueError, match="LaTeX special character"):
        symbolic.Derivation("a_b", (("text", "x", sp.S.Zero),), sp.S.Zero, {})


def _changed(target: str, change):
    """A ``perturb`` that replaces the intermediate named ``target`` by ``change(expr)``."""
    return lambda name, expr: change(expr) if name == target else expr


def _unit(n: int, i: int, j: int) -> sp.Matrix:
    return sp.Matrix(n, n, lambda a, b: int((a, b) == (i, j)))


def _s(name: str) -> sp.Symbol:
    return sp.Symbol(name, real=True)  # equal to the derivations' own symbols of that name


# Negative controls: each derivation on a wrong loss, a wrong M or a shifted Jacobian, and
# exactly the claims that must then fail. A claim that compared a result with itself, a
# claim computed on a hand-written formula instead of the derived one, or an _is_zero
# that always said yes, would hold under its control.
CONTROLS = [
    (
        "expansion",
        "a cross term added to the loss",
        lambda: symbolic.alignment_expansion(2, perturb=_changed("loss", lambda e: e + _s("zeta1") * _s("eta1"))),
        ["first-order coefficient is u^T M u", "proper loss: M = H"],
    ),
    (
        "expansion",
        "M off by the identity",
        lambda: symbolic.alignment_expansion(2, perturb=_changed("M", lambda m: m + sp.eye(2))),
        ["first-order coefficient is u^T M u", "proper loss: M = H"],
    ),
    (
        "expansion",
        "a term linear in the student's outputs (not proper)",
        lambda: symbolic.alignment_expansion(2, perturb=_changed("loss", lambda e: e + _s("zeta1"))),
        ["zeroth order is -g^T u", "proper loss: g = 0"],
    ),
    (
        "expansion",
        "a third-order term, still proper",
        lambda: symbolic.alignment_expansion(
            2, perturb=_changed("loss", lambda e: e + (_s("zeta1") - _s("eta1")) ** 2 * _s("eta1"))
        ),
        ["higher orders of the path vanish here"],
    ),
    (
        "expansion",
        "a term no proper loss can cancel",
        lambda: symbolic.alignment_expansion(2, perturb=_changed("loss", lambda e: e + _s("zeta1") * _s("eta1") ** 2)),
        ["proper loss: g = 0", "proper loss: M = H", "higher orders of the path vanish here"],
    ),
    (
        "squared error",
        "a non-proper loss",
        lambda: symbolic.squared_error(3, perturb=_changed("loss", lambda e: e + _s("z1") * _s("y1"))),
        ["zeroth order vanishes", "M = 2 I"],
    ),
    (
        "squared error",
        "a wrong M",
        lambda: symbolic.squared_error(3, perturb=_changed("M", lambda m: m + _unit(3, 0, 1))),
        ["M = 2 I"],
    ),
    (
        "squared error",
        "M - 3 I, indefinite",
        lambda: symbolic.squared_error(3, perturb=_changed("M", lambda m: m - 3 * sp.eye(3))),
        ["M = 2 I", "M positive definite"],
    ),
    (
        "cross-entropy",
        "a loss with a linear term",
        lambda: symbolic.softmax_cross_entropy(3, perturb=_changed("loss", lambda e: e + _s("z1"))),
        ["gradient is q - p", "zeroth order vanishes"],
    ),
    (
        "cross-entropy",
        "a non-proper loss, whose M follows",
        lambda: symbolic.softmax_cross_entropy(3, perturb=_changed("loss", lambda e: e + _s("z1") * _s("y1"))),
        [
            "gradient is q - p",
            "zeroth order vanishes",
            "M = diag(p) - p p^T",
            "M positive semi-definite (sum of squares)",
            "M 1 = 0",
            "null space is span(1) (minor = prod p)",
        ],
    ),
    (
        "cross-entropy",
        "a wrong M",
        lambda: symbolic.softmax_cross_entropy(3, perturb=_changed("M", lambda m: m + sp.eye(3) / 4)),
        [
            "M = diag(p) - p p^T",
            "M positive semi-definite (sum of squares)",
            "M 1 = 0",
            "null space is span(1) (minor = prod p)",
        ],
    ),
    (
        "cross-entropy",
        "M - 3 I, indefinite",
        lambda: symbolic.softmax_cross_entropy(2, perturb=_changed("M", lambda m: m - 3 * sp.eye(2))),
        [
            "M = diag(p) - p p^T",
            "M positive semi-definite (sum of squares)",
            "M 1 = 0",
            "null space is span(1) (minor = prod p)",
        ],
    ),
    (
        "cross-entropy",
        "M with one off-diagonal entry changed",
        lambda: symbolic.softmax_cross_entropy(3, perturb=_changed("M", lambda m: m + _unit(3, 0, 1) / 5)),
        [
            "M = diag(p) - p p^T",
            "M positive semi-definite (sum of squares)",
            "M 1 = 0",
            "null space is span(1) (minor = prod p)",
        ],
    ),
    (
        "general cross-entropy",
        "twice the loss",
        lambda: symbolic.softmax_cross_entropy_general(perturb=_changed("loss", lambda e: 2 * e)),
        ["gradient is q_k - p_k"],
    ),
    (
        "general cross-entropy",
        "a wrong M",
        lambda: symbolic.softmax_cross_entropy_general(perturb=_changed("M", lambda m: m + sp.Rational(1, 3))),
        ["M_kl = p_k (delta_kl - p_l)", "u^T M u = sum_i p_i (u_i - u-bar)^2"],
    ),
    (
        "general cross-entropy",
        "M - 3 delta_kl, indefinite",
        lambda: symbolic.softmax_cross_entropy_general(
            perturb=_changed("M", lambda m: m - 3 * sp.KroneckerDelta(*sp.symbols("k l", integer=True, positive=True)))
        ),
        ["M_kl = p_k (delta_kl - p_l)", "u^T M u = sum_i p_i (u_i - u-bar)^2"],
    ),
    (
        "subset",
        "a loss that reads a logit outside the subset",
        lambda: symbolic.subset_softmax_cross_entropy(4, (2, 3), perturb=_changed("loss", lambda e: e + _s("z1"))),
        ["zeroth order vanishes"],
    ),
    (
        "subset",
        "M nonzero outside the subset",
        lambda: symbolic.subset_softmax_cross_entropy(4, (2, 3), perturb=_changed("M", lambda m: m + _unit(4, 0, 0))),
        [
            "M is the embedded subset block",
            "M positive semi-definite (sum of squares)",
            "null space contains 1_S and the other coordinates",
        ],
    ),
    (
        "subset",
        "M - 3 I, indefinite",
        lambda: symbolic.subset_softmax_cross_entropy(4, (2, 3), perturb=_changed("M", lambda m: m - 3 * sp.eye(4))),
        [
            "M is the embedded subset block",
            "M positive semi-definite (sum of squares)",
            "null space contains 1_S and the other coordinates",
        ],
    ),
    (
        "non-proper example",
        "replaced by a proper loss",
        lambda: symbolic.non_proper_loss(
            perturb=_changed("loss", lambda e: (_s("z1") - _s("y1")) ** 2 + (_s("z2") - _s("y2")) ** 2)
        ),
        ["not minimized at z = y", "M has a negative eigenvalue", "A < 0 for the example"],
    ),
    (
        "non-proper example",
        "a loss that ignores the second output (A = 0, not < 0)",
        lambda: symbolic.non_proper_loss(perturb=_changed("loss", lambda e: (_s("z1") - _s("y1")) ** 2)),
        ["not minimized at z = y", "M has a negative eigenvalue", "A < 0 for the example"],
    ),
    (
        "non-proper example",
        "a term linear in the outputs",
        lambda: symbolic.non_proper_loss(perturb=_changed("loss", lambda e: e + _s("z1"))),
        ["zeroth order vanishes", "not minimized at z = y"],
    ),
    (
        "linear, squared error",
        "a shifted Jacobian",
        lambda: symbolic.linear_model(
            "squared_error", n=2, d=2, samples=2, perturb=_changed("outputs", lambda z: sp.diag(2, 1) * z)
        ),
        [
            "student step = 2 eps V Sigma",
            "alignment = 2 eps tr(V Sigma V^T)",
            "alignment = (2 eps / K) sum_s |V x_s|^2",
        ],
    ),
    (
        "linear, cross-entropy",
        "a shifted Jacobian",
        lambda: symbolic.linear_model(
            "softmax_cross_entropy", n=2, d=2, samples=1, perturb=_changed("outputs", lambda z: sp.diag(2, 1) * z)
        ),
        [
            "zeroth order vanishes",
            "first-order coefficient = mean of u^T (diag(p) - p p^T) u",
            "A = mean of p1 p2 ((Vx)_1 - (Vx)_2)^2",
        ],
    ),
]


@pytest.mark.parametrize(
    "build, failing", [c[2:] for c in CONTROLS], ids=[f"{family}: {what}" for family, what, _, _ in CONTROLS]
)
def test_every_derivation_fails_on_a_perturbed_expression(build, failing):
    # Exactly the listed claims fail: the others still hold, so a control breaks what it
    # names and the derivation does not fail wholesale.
    checks = build().checks
    assert {claim for claim, ok in checks.items() if not ok} == set(failing), checks


def test_every_claim_fails_under_some_control():
    # Each claim of each derivation is listed as failing under at least one control of its
    # family (and the test above shows that it does fail there): a new claim, or a claim
    # that no perturbation reaches, fails this test.
    broken: dict[str, set[str]] = {}
    for family, _, _, failing in CONTROLS:
        broken.setdefault(family, set()).update(failing)
    uncovered = {name: sorted(set(build().checks) - broken.get(family, set())) for family, name, build in DERIVATIONS}
    assert {name: claims for name, claims in uncovered.items() if claims} == {}


def test_every_derivation_has_a_negative_control():
    assert (
        {family for family, _, _, _ in CONTROLS}
        == {family for family, _, _ in DERIVATIONS}
        == {
            "expansion",
            "squared error",
            "cross-entropy",
            "general cross-entropy",
            "subset",
            "non-proper example",
            "linear, squared error",
            "linear, cross-entropy",
        }
    )
    assert {f for f in symbolic.__all__ if f != "Derivation"} == {
        "alignment_expansion",
        "squared_error",
        "softmax_cross_entropy",
        "softmax_cross_entropy_general",
        "subset_softmax_cross_entropy",
        "non_proper_loss",
        "linear_model",
    }


def test_is_zero_says_no_to_nonzero_expressions():
    x, y = sp.symbols("x y", real=True)
    assert symbolic._is_zero((x + 1) ** 2 - x**2 - 2 * x - 1)
    assert symbolic._is_zero(sp.Matrix([[x / (x + 1) - 1 + 1 / (x + 1), 0]]))
    assert not symbolic._is_zero((x + 1) ** 2 - x**2 - 2 * x)  # the constant 1 is left
    assert not symbolic._is_zero(1 / (x + 1) - 1 / x)
    assert not symbolic._is_zero(sp.Matrix([[0, 0], [0, x * y]]))  # one nonzero entry is enough
    assert not symbolic._is_zero(sp.Rational(1, 10**12))


def test_sums_separate_only_where_the_summand_factors():
    n = sp.Symbol("n", integer=True, positive=True)
    j, k, i = sp.symbols("j k i", integer=True, positive=True)
    a, b, c = sp.IndexedBase("a"), sp.IndexedBase("b"), sp.IndexedBase("c")
    double = sp.Sum(sp.Sum(a[k] * b[i] + 2 * a[k], (i, 1, n)), (k, 1, n))
    separated = symbolic._separate_sums(double, j)
    assert symbolic._is_zero(separated - sp.Sum(a[j], (j, 1, n)) * (sp.Sum(b[j], (j, 1, n)) + 2 * n))
    # a summand coupling k and l stays a double sum and is not mistaken for a product
    coupled = symbolic._separate_sums(sp.Sum(sp.Sum(a[k] * c[k, i], (i, 1, n)), (k, 1, n)), j)
    assert coupled.has(sp.Sum) and not symbolic._is_zero(coupled - sp.Sum(a[j], (j, 1, n)) * sp.Sum(c[j, j], (j, 1, n)))
    assert not symbolic._is_zero(
        symbolic._separate_sums(sp.Sum(a[k] ** 2, (k, 1, n)), j) - sp.Sum(a[j], (j, 1, n)) ** 2
    )
