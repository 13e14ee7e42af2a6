"""Hypothesis strategies for property tests of the alignment lemma.

The spaces are those of :mod:`theory.cases` (the ``sublearn theory`` command draws from
the same functions): MLP architectures from a few parameters to thousands (mostly small,
a third with wide hidden layers) with one of several activations, weight
initializations, input distributions and sample counts, the student losses, and teachers
that follow a random direction or the gradient of a random loss (cross-entropy on random
labels, squared error on random targets). Arrays come from numpy generators seeded by
the drawn ``seed`` (:func:`theory.cases.build_case`), so every example is reproducible
from its :class:`~theory.cases.CaseSpec`. The seed comes from a small range
(:data:`theory.cases.SEEDS`) so that hypothesis shrinks it like any other choice, toward 0.

Shapes come from a few sizes only: examples of equal shapes and losses reuse the compiled
check, which keeps a run of many examples fast. The property tests record each example's
kind (:func:`theory.cases.case_kinds`) with ``event`` and assert afterwards that the
examples covered the space.

Example:
    >>> from hypothesis import given, settings
    >>> from theory.strategies import cases
    >>> @settings(max_examples=5, deadline=None)
    ... @given(cases())
    ... def test_outputs_have_the_declared_width(case):
    ...     assert case.model(case.params, case.inputs).shape[1] == case.model.sizes[-1]
    >>> test_outputs_have_the_declared_width()
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from hypothesis import strategies as st

from theory.cases import (
    ACTIVATIONS,
    INPUT_DISTRIBUTIONS,
    MLP,
    SAMPLE_COUNTS,
    STUDENT_LOSSES,
    TEACHERS,
    Case,
    CaseSpec,
    build_case,
    choose_init,
    choose_mlp,
    choose_spec,
    choose_student_loss,
)

T = TypeVar("T")


@dataclasses.dataclass
class HypothesisChooser:
    """A :class:`theory.cases.Chooser` drawing from hypothesis (so examples shrink)."""

    draw: Callable[[st.SearchStrategy[Any]], Any]

    def choice(self, options: Sequence[T]) -> T:
        return self.draw(st.sampled_from(options))

    def integer(self, low: int, high: int) -> int:
        return self.draw(st.integers(low, high))

    def uniform(self, low: float, high: float) -> float:
        return self.draw(st.floats(low, high))


def activations() -> st.SearchStrategy[str]:
    """Names of :data:`theory.cases.ACTIVATIONS` (tanh, relu, gelu, softplus, sigmoid, identity)."""
    return st.sampled_from(tuple(ACTIVATIONS))


@st.composite
def mlp_architectures(draw) -> MLP:
    """Random depth (0 to 3 hidden layers), narrow or wide widths and activation (:func:`theory.cases.choose_mlp`)."""
    return choose_mlp(HypothesisChooser(draw))


@st.composite
def initializations(draw) -> dict[str, Any]:
    """Keyword arguments of :func:`theory.cases.init_mlp`: distribution, weight scale, bias scale."""
    return choose_init(HypothesisChooser(draw))


def input_distributions() -> st.SearchStrategy[str]:
    """Names accepted by :func:`theory.cases.sample_inputs`."""
    return st.sampled_from(INPUT_DISTRIBUTIONS)


def sample_counts() -> st.SearchStrategy[int]:
    """How many inputs stand for the distribution."""
    return st.sampled_from(SAMPLE_COUNTS)


@st.composite
def student_losses(
    draw, n_out: int, names: Sequence[str] = STUDENT_LOSSES, subset_sizes: tuple[int, int] = (2, 0)
) -> tuple[str, tuple[int, ...]]:
    """A student loss name and, for the subset loss, its logit indices among ``n_out``."""
    return choose_student_loss(HypothesisChooser(draw), n_out, names, subset_sizes)


def teachers(kinds: Sequence[str] = TEACHERS) -> st.SearchStrategy[str]:
    """How the teacher moves: a random direction, or down a random cross-entropy or squared-error loss."""
    return st.sampled_from(tuple(kinds))


@st.composite
def case_specs(
    draw,
    losses: Sequence[str] = STUDENT_LOSSES,
    teacher_kinds: Sequence[str] = TEACHERS,
    subset_sizes: tuple[int, int] = (2, 0),
) -> CaseSpec:
    """A whole :class:`~theory.cases.CaseSpec`; restrict ``losses``, ``teacher_kinds`` or
    the subset loss's ``subset_sizes`` (``(1, 1)``: single logits, where ``A = 0``) to focus."""
    return choose_spec(HypothesisChooser(draw), losses=losses, teachers=teacher_kinds, subset_sizes=subset_sizes)


def cases(
    losses: Sequence[str] = STUDENT_LOSSES,
    teacher_kinds: Sequence[str] = TEACHERS,
    subset_sizes: tuple[int, int] = (2, 0),
) -> st.SearchStrategy[Case]:
    """Built cases (arrays drawn from each spec's seed), ready for :func:`theory.numerical.check_alignment`."""
    return case_specs(losses, teacher_kinds, subset_sizes).map(build_case)
