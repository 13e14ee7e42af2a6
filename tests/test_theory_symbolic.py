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

DERIVATIONS = [
    ("expansion n=2", lambda: symbolic.alignment_expansion(2)),
    ("expansion n=3", lambda: symbolic.alignment_expansion(3)),
    *[(f"squared error n={n}", lambda n=n: symbolic.squared_error(n)) for n in range(2, 6)],
    *[(f"cross-entropy n={n}", lambda n=n: symbolic.softmax_cross_entropy(n)) for n in range(2, 6)],
    ("cross-entropy general n", symbolic.softmax_cross_entropy_general),
    ("subset (2, 3) of 4", lambda: symbolic.subset_softmax_cross_entropy(4, (2, 3))),
    ("subset (0, 2, 4) of 5", lambda: symbolic.subset_softmax_cross_entropy(5, (0, 2, 4))),
    ("non-proper loss", symbolic.non_proper_loss),
    ("linear model, squared error", lambda: symbolic.linear_model("squared_error", n=2, d=2, samples=2)),
    ("linear model, cross-entropy", lambda: symbolic.linear_model("softmax_cross_entropy", n=2, d=2, samples=1)),
]


@pytest.mark.parametrize("build", [b for _, b in DERIVATIONS], ids=[name for name, _ in DERIVATIONS])
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
