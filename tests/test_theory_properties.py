"""Property tests of the alignment lemma on random MLPs, initializations, inputs, losses and teachers.

Positive properties (shared initialization, proper student loss): the first-order
coefficient A is non-negative, the zeroth-order term vanishes, and at an eps chosen from
the example's second-order terms the alignment is non-negative and the teacher's loss does
not rise. Negative properties (the lemma's conditions broken): a search over the same
space must find a negative alignment, with a different initialization and with a
non-proper student loss.
"""

from __future__ import annotations

from hypothesis import HealthCheck, Phase, find, given, note, settings

from theory.cases import NON_PROPER_LOSSES, build_case
from theory.numerical import check_alignment, tolerances
from theory.strategies import case_specs

# Searches for counterexamples: derandomized like the ci profile, no example database so
# that the outcome depends on the code only, and no shrinking (each shrink step would
# compile a new model; the first example found is enough to show that one exists).
SEARCH = settings(
    max_examples=40,
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
)

# A negative alignment counts as found only if it is clearly not rounding: the cosine
# between the student's and the teacher's updates must be below -1e-3.
CLEARLY_NEGATIVE_COSINE = -1e-3


def _check(spec, *, shared_init: bool):
    case = build_case(spec)
    return check_alignment(case.model, case.params, case.inputs, **case.check_kwargs(shared_init=shared_init))


@given(spec=case_specs())
def test_shared_initialization_satisfies_lemma_and_theorem(spec):
    r = _check(spec, shared_init=True)
    tol = tolerances(r)
    note(f"eps={r.eps:.3e} A={r.A:.6e} C={r.second_order:.3e} alignment={r.alignment:.6e} dL_T={r.teacher_loss_change:.3e}")
    assert r.first_order_dominates()  # the automatic eps reached the Taylor regime
    assert r.A >= -tol["A"]
    assert abs(r.zeroth_order) <= tol["alignment"]
    assert r.alignment >= -tol["alignment"]
    if spec.teacher != "direction":
        assert r.teacher_loss_change <= tol["teacher_loss"]


def test_different_initialization_admits_negative_alignment():
    spec = find(
        case_specs(),
        lambda s: _check(s, shared_init=False).cosine < CLEARLY_NEGATIVE_COSINE,
        settings=SEARCH,
    )
    shared, different = _check(spec, shared_init=True), _check(spec, shared_init=False)
    assert different.cosine < CLEARLY_NEGATIVE_COSINE
    # The sign comes from the zeroth-order term, which only a different start makes non-zero.
    assert abs(different.zeroth_order) > 10 * tolerances(different)["alignment"]
    assert not shared.violations()


def test_non_proper_student_loss_admits_negative_alignment():
    spec = find(
        case_specs(losses=NON_PROPER_LOSSES),
        lambda s: _check(s, shared_init=True).cosine < CLEARLY_NEGATIVE_COSINE,
        settings=SEARCH,
    )
    r = _check(spec, shared_init=True)
    tol = tolerances(r)
    assert r.cosine < CLEARLY_NEGATIVE_COSINE
    # Stationary at z = y, so the zeroth-order term still vanishes: the first-order
    # coefficient itself is negative, because M = 2Q is indefinite.
    assert abs(r.zeroth_order) <= tol["alignment"]
    assert r.A < -tol["A"]
    assert "A < 0" in r.violations()
