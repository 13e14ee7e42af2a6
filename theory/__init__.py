"""The gradient-alignment lemma of the subliminal-learning paper (Lemma 1, Theorem 1).

- :mod:`theory.numerical`: the check on any JAX model and parameter pytree, in float64:
  :func:`check_alignment` (one teacher and one student step, the alignment, its Taylor
  coefficients, the change of the teacher's loss; an ``eps`` that does not reach the
  Taylor regime above rounding is a violation) and :func:`convergence` (the order of
  the first-order prediction's error). :class:`Faults` breaks the measured steps on
  purpose, to test that the check catches it.
- :mod:`theory.symbolic`: sympy derivations (expressions plus LaTeX) of :math:`M` for the
  student losses, the vanishing zeroth-order term, a non-proper loss that breaks the
  lemma, and the linear model in closed form.
- :mod:`theory.cases` and :mod:`theory.strategies`: random small MLPs, initializations,
  inputs, losses and teachers, for the ``sublearn theory`` command and for hypothesis.

Importing :mod:`theory` loads JAX but not sympy or hypothesis; import those submodules
when you need them.
"""

from theory.numerical import (
    AlignmentResult,
    Convergence,
    Faults,
    QuadraticLoss,
    SubsetSoftmaxCrossEntropy,
    SupervisedLoss,
    check_alignment,
    convergence,
    label_cross_entropy,
    softmax_cross_entropy,
    squared_error,
    target_squared_error,
    tolerances,
)

__all__ = [
    "AlignmentResult",
    "Convergence",
    "Faults",
    "QuadraticLoss",
    "SubsetSoftmaxCrossEntropy",
    "SupervisedLoss",
    "check_alignment",
    "convergence",
    "label_cross_entropy",
    "softmax_cross_entropy",
    "squared_error",
    "target_squared_error",
    "tolerances",
]
