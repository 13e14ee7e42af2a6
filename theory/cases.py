r"""Random test cases for the alignment lemma: MLPs, initializations, inputs, losses.

A :class:`CaseSpec` is a handful of hashable choices plus an integer seed;
:func:`build_case` turns it into arrays. The arrays come from numpy generators spawned
from the seed, one independent stream per purpose, rather than from ``jax.random``: every
new shape would compile a JAX random kernel, and for cases this small those compilations
would cost more than the check itself. The hypothesis
strategies (:mod:`theory.strategies`) and the ``sublearn theory`` command draw the
choices with the same functions (:func:`choose_spec` and friends), through a
:class:`Chooser`: hypothesis's ``draw`` there, a seeded numpy generator here.

Example:
    >>> spec = CaseSpec(MLP((2, 3, 2), "tanh"), "normal", 1.0, 0.0, "normal", 4,
    ...                 "squared_error", "direction", seed=0)
    >>> case = build_case(spec)
    >>> case.model(case.params, case.inputs).shape
    (4, 2)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike
from jaxtyping import Array, Float

from theory.numerical import (
    QuadraticLoss,
    StudentLoss,
    SubsetSoftmaxCrossEntropy,
    SupervisedLoss,
    label_cross_entropy,
    softmax_cross_entropy,
    squared_error,
    target_squared_error,
)

T = TypeVar("T")

ACTIVATIONS = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "softplus": jax.nn.softplus,
    "sigmoid": jax.nn.sigmoid,
    "identity": lambda h: h,
}
INITS = ("normal", "uniform", "truncated_normal")
INPUT_DISTRIBUTIONS = ("normal", "uniform", "rademacher", "sparse", "shifted")
STUDENT_LOSSES = ("squared_error", "softmax_cross_entropy", "subset_softmax_cross_entropy")
# Not proper: (z - y)^T Q (z - y) with Q = diag(1, -1, 1, ...), stationary but not minimal at z = y.
NON_PROPER_LOSSES = ("indefinite_quadratic",)
TEACHERS = ("direction", "cross_entropy", "squared_error")

# Few distinct sizes keep the number of distinct shapes, and so of compilations, small.
INPUT_DIMS = (2, 3)
# A network's hidden layers are all narrow or all wide, each kind drawn with the odds of
# WIDTH_KINDS: narrow ones (6 to 104 parameters) keep most cases cheap, and hypothesis
# shrinks toward them; wide ones (up to 3-64-64-64-4, 8,836 parameters) exercise the lemma
# where a step moves thousands of parameters and rounding accumulates over long sums. A
# wide network with two or more hidden layers has at least 1,316 parameters (3 of 4 with
# two, all with three over 2,000). The check's cost is that of compiling it, nearly
# independent of the width: one more hidden layer costs more than wider ones.
HIDDEN_WIDTHS = {"narrow": (3, 5), "wide": (32, 64)}
WIDTH_KINDS = ("narrow", "narrow", "wide")  # drawn uniformly: wide with probability 1/3
MAX_HIDDEN_LAYERS = 3
HIDDEN_LAYER_COUNTS = tuple(range(MAX_HIDDEN_LAYERS + 1))
OUTPUT_DIMS = (2, 3, 4)
# A subset loss over every logit is plain softmax cross-entropy; one over a proper subset
# (the paper's auxiliary logits) is the case the lemma is about. Where the output width
# allows both, a proper subset is drawn with probability 3/4 (an integer in 0..3 above
# 0): with outputs of 2 (always the full subset), 3 or 4 logits, half of the subset
# cases are proper.
PROPER_SUBSET_ODDS = 4
SAMPLE_COUNTS = (1, 3, 8)
# Seeds of a case's arrays come from a small range: hypothesis shrinks a failing seed
# toward 0 and can try every one of them, which it cannot in a range of 2**31.
SEEDS = 256


# Standard deviation of a standard normal truncated to [-2, 2], to rescale it to unit variance.
_TRUNCATED_NORMAL_STD = math.sqrt(
    1.0 - 4.0 * math.exp(-2.0) / math.sqrt(2.0 * math.pi) / math.erf(2.0 / math.sqrt(2.0))
)


@dataclasses.dataclass(frozen=True)
class MLP:
    r"""A fully connected network ``sizes[0] -> ... -> sizes[-1]`` with one activation.

    :math:`h_{k+1} = \sigma(h_k W_k + b_k)` for hidden layers, a linear last layer.
    Parameters are a list of ``{"kernel", "bias"}`` dicts. Hashable, so it can be a
    static argument of the compiled check.
    """

    sizes: tuple[int, ...]
    activation: str = "tanh"

    def __call__(
        self, params: list[dict[str, ArrayLike]], x: Float[Array | np.ndarray, "N d"]
    ) -> Float[Array | np.ndarray, "N n"]:
        act = ACTIVATIONS[self.activation]
        for k, layer in enumerate(params):
            x = x @ layer["kernel"] + layer["bias"][None, :]
            if k < len(params) - 1:
                x = act(x)
        return x

    def units_at_kink(self, params: list[dict[str, ArrayLike]], x: Float[Array | np.ndarray, "N d"]) -> int:
        """How many ReLU pre-activations over the sample are exactly 0 (always 0 for smooth activations).

        There the network is not differentiable in its parameters, so the lemma, a
        statement about a Taylor expansion, does not apply. Exact zeros are common:
        a ReLU that is off everywhere feeds exact zeros forward, and with zero biases
        so does a sparse input.
        """
        if self.activation != "relu":
            return 0
        count, act = 0, ACTIVATIONS[self.activation]
        for layer in params[:-1]:
            x = np.asarray(x, np.float64) @ np.asarray(layer["kernel"], np.float64) + np.asarray(
                layer["bias"], np.float64
            )
            count += int(np.sum(x == 0.0))
            x = act(x)
        return count


def init_mlp(
    mlp: MLP, rng: np.random.Generator, *, init: str = "normal", init_scale: float = 1.0, bias_scale: float = 0.0
) -> list[dict[str, np.ndarray]]:
    r"""Weights with standard deviation ``init_scale / sqrt(d_in)``, drawn from the ``init``
    distribution (one of :data:`INITS`); biases :math:`\mathcal N(0, \text{bias\_scale}^2)`.

    Returns float32 arrays, as a model's parameters usually are.
    """
    draw = {
        "normal": rng.standard_normal,
        "uniform": lambda shape: rng.uniform(-math.sqrt(3.0), math.sqrt(3.0), shape),
        "truncated_normal": lambda shape: _truncated_normal(rng, shape) / _TRUNCATED_NORMAL_STD,
    }[init]
    return [
        {
            "kernel": (init_scale / math.sqrt(d_in) * draw((d_in, d_out))).astype(np.float32),
            "bias": (bias_scale * rng.standard_normal(d_out)).astype(np.float32),
        }
        for d_in, d_out in zip(mlp.sizes[:-1], mlp.sizes[1:])
    ]


def _truncated_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal draws conditioned on [-2, 2] (redrawn until inside)."""
    x = rng.standard_normal(shape)
    while (outside := np.abs(x) > 2.0).any():
        x[outside] = rng.standard_normal(int(outside.sum()))
    return x


def sample_inputs(rng: np.random.Generator, distribution: str, n: int, d: int) -> np.ndarray:
    """``n`` float32 inputs of dimension ``d`` from a named distribution."""
    shape = (n, d)
    if distribution == "normal":
        x = rng.standard_normal(shape)
    elif distribution == "uniform":
        x = rng.uniform(0.0, 1.0, shape)
    elif distribution == "rademacher":
        x = rng.choice([-1.0, 1.0], shape)
    elif distribution == "sparse":
        x = rng.standard_normal(shape) * (rng.uniform(size=shape) < 0.3)
    elif distribution == "shifted":  # far from the origin: large pre-activations, saturated units
        x = 3.0 + 0.5 * rng.standard_normal(shape)
    else:
        raise ValueError(f"unknown input distribution {distribution!r}; choose from {INPUT_DISTRIBUTIONS}")
    return x.astype(np.float32)


def make_student_loss(name: str, n_out: int, subset: tuple[int, ...] = ()) -> StudentLoss:
    """The student loss called ``name`` for ``n_out`` outputs (``subset`` for the subset loss)."""
    if name == "squared_error":
        return squared_error
    if name == "softmax_cross_entropy":
        return softmax_cross_entropy
    if name == "subset_softmax_cross_entropy":
        if not subset or max(subset) >= n_out:
            raise ValueError(f"subset {subset} must be non-empty indices below {n_out}")
        return SubsetSoftmaxCrossEntropy(subset)
    if name == "indefinite_quadratic":
        return QuadraticLoss.from_matrix(np.diag([(-1.0) ** k for k in range(n_out)]))
    raise ValueError(f"unknown student loss {name!r}; choose from {STUDENT_LOSSES + NON_PROPER_LOSSES}")


@dataclasses.dataclass(frozen=True)
class CaseSpec:
    """The choices that define one random case; arrays come from ``seed``."""

    mlp: MLP
    init: str
    init_scale: float
    bias_scale: float
    inputs: str
    n_samples: int
    student_loss: str
    teacher: str
    seed: int
    subset: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Case:
    """Arrays and functions for one check: pass to :func:`theory.numerical.check_alignment`."""

    spec: CaseSpec
    model: MLP
    params: Any
    other_params: Any  # an independent initialization of the same scheme
    inputs: ArrayLike
    student_loss: StudentLoss
    direction: Any  # None when the teacher follows a loss
    teacher_loss: SupervisedLoss | None

    def units_at_kink(self) -> int:
        """ReLU pre-activations exactly at 0 on the check's inputs and on the teacher loss's
        own data (:meth:`MLP.units_at_kink`): at either, the check's Taylor expansion (of
        the alignment, or of the teacher's loss) does not exist."""
        count = self.model.units_at_kink(self.params, self.inputs)
        if self.teacher_loss is not None:
            count += self.model.units_at_kink(self.params, self.teacher_loss.inputs)
        return count

    def moves_only_last_bias(self) -> bool:
        """Whether the teacher's step moves the outputs of both initializations only through
        the last layer's bias, on the check's inputs.

        Then the student's Jacobian along the step equals the teacher's whatever the
        student's weights, and the cross term of a different initialization equals A. ReLU
        networks do this when every hidden unit is off, at its kink (jax takes the
        derivative 0 there), or the teacher's own loss sees only such units: a sparse
        input of zeros with zero biases.
        """
        with jax.enable_x64(True):
            params, other = (
                jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), p) for p in (self.params, self.other_params)
            )
            x = jnp.asarray(self.inputs, jnp.float64)
            step = self.direction if self.teacher_loss is None else jax.grad(self.teacher_loss)(params)
            step = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), step)
            bias = [jax.tree.map(jnp.zeros_like, layer) for layer in step[:-1]]
            bias.append({"kernel": jnp.zeros_like(step[-1]["kernel"]), "bias": step[-1]["bias"]})
            moved = [jax.jvp(lambda p: self.model(p, x), (p,), (v,))[1] for p in (params, other) for v in (step, bias)]
            return bool(jnp.array_equal(moved[0], moved[1]) and jnp.array_equal(moved[2], moved[3]))

    def check_kwargs(self, *, shared_init: bool = True) -> dict[str, Any]:
        """Keyword arguments of ``check_alignment`` for this case (student at the teacher's init or not)."""
        kwargs = dict(student_loss=self.student_loss, direction=self.direction, teacher_loss=self.teacher_loss)
        if not shared_init:
            kwargs["student_params"] = self.other_params
        return kwargs


def build_case(spec: CaseSpec) -> Case:
    """Draw the arrays of ``spec``, each from its own stream of ``numpy.random.SeedSequence(spec.seed)``."""
    mlp, d_in, n_out, n = spec.mlp, spec.mlp.sizes[0], spec.mlp.sizes[-1], spec.n_samples
    teacher, other, inputs, direction_rng, lt_inputs, lt_targets = (
        np.random.default_rng(s) for s in np.random.SeedSequence(spec.seed).spawn(6)
    )
    init = dict(init=spec.init, init_scale=spec.init_scale, bias_scale=spec.bias_scale)
    params = init_mlp(mlp, teacher, **init)
    direction, teacher_loss = None, None
    if spec.teacher == "direction":
        direction = jax.tree.map(lambda x: direction_rng.standard_normal(x.shape).astype(np.float32), params)
    elif spec.teacher == "cross_entropy":
        labels = lt_targets.integers(0, n_out, n)
        teacher_loss = SupervisedLoss(mlp, label_cross_entropy, sample_inputs(lt_inputs, spec.inputs, n, d_in), labels)
    elif spec.teacher == "squared_error":
        targets = lt_targets.standard_normal((n, n_out)).astype(np.float32)
        teacher_loss = SupervisedLoss(
            mlp, target_squared_error, sample_inputs(lt_inputs, spec.inputs, n, d_in), targets
        )
    else:
        raise ValueError(f"unknown teacher {spec.teacher!r}; choose from {TEACHERS}")
    return Case(
        spec=spec,
        model=mlp,
        params=params,
        other_params=init_mlp(mlp, other, **init),
        inputs=sample_inputs(inputs, spec.inputs, n, d_in),
        student_loss=make_student_loss(spec.student_loss, n_out, spec.subset),
        direction=direction,
        teacher_loss=teacher_loss,
    )


@runtime_checkable
class Chooser(Protocol):
    """Where the random choices of a case come from: hypothesis's ``draw`` or a numpy generator."""

    def choice(self, options: Sequence[T]) -> T: ...

    def integer(self, low: int, high: int) -> int:  # inclusive bounds
        ...

    def uniform(self, low: float, high: float) -> float: ...


@dataclasses.dataclass
class NumpyChooser:
    """Choices from a seeded ``numpy.random.Generator`` (the ``sublearn theory`` command)."""

    rng: np.random.Generator

    def choice(self, options: Sequence[T]) -> T:
        return options[int(self.rng.integers(len(options)))]

    def integer(self, low: int, high: int) -> int:
        return int(self.rng.integers(low, high + 1))

    def uniform(self, low: float, high: float) -> float:
        return float(self.rng.uniform(low, high))


def choose_mlp(c: Chooser, hidden_layers: Sequence[int] = HIDDEN_LAYER_COUNTS) -> MLP:
    """An architecture: input and output sizes, one of ``hidden_layers`` hidden layers
    (0 to ``MAX_HIDDEN_LAYERS``) of one width kind (:data:`HIDDEN_WIDTHS`,
    :data:`WIDTH_KINDS`), an activation."""
    depth = c.choice(tuple(hidden_layers))
    widths = HIDDEN_WIDTHS[c.choice(WIDTH_KINDS)]
    sizes = (c.choice(INPUT_DIMS), *(c.choice(widths) for _ in range(depth)), c.choice(OUTPUT_DIMS))
    return MLP(sizes, c.choice(tuple(ACTIVATIONS)))


def n_parameters(mlp: MLP) -> int:
    """How many weights and biases ``mlp`` has."""
    return sum(d_in * d_out + d_out for d_in, d_out in zip(mlp.sizes[:-1], mlp.sizes[1:]))


def choose_subset(c: Chooser, n: int, sizes: tuple[int, int] = (2, 0)) -> tuple[int, ...]:
    """A subset of ``range(n)``, sorted, with ``sizes[0]`` to ``sizes[1]`` elements (0: up to ``n``).

    At least two by default: softmax over one logit is constant, so ``M = 0`` and ``A = 0``
    exactly, a case with nothing to check at first order (draw it with ``sizes=(1, 1)``).
    Where both a proper subset and all ``n`` are allowed, the subset is proper with
    probability ``1 - 1/PROPER_SUBSET_ODDS``, its size then uniform below ``n``: drawn
    uniformly in size, the full subset would take a third to a half of the draws.
    """
    low, high = min(sizes[0], n), min(sizes[1] or n, n)
    if low < high == n:
        if c.integer(0, PROPER_SUBSET_ODDS - 1) > 0:
            high = n - 1  # proper
        else:
            low = n  # every logit
    remaining = list(range(n))
    chosen = [remaining.pop(c.integer(0, len(remaining) - 1)) for _ in range(c.integer(low, high))]
    return tuple(sorted(chosen))


def choose_init(c: Chooser) -> dict[str, Any]:
    """Keyword arguments of :func:`init_mlp` (and fields of :class:`CaseSpec`)."""
    return dict(init=c.choice(INITS), init_scale=c.uniform(0.5, 2.0), bias_scale=c.choice((0.0, 0.5)))


def choose_student_loss(
    c: Chooser, n_out: int, names: Sequence[str] = STUDENT_LOSSES, subset_sizes: tuple[int, int] = (2, 0)
) -> tuple[str, tuple[int, ...]]:
    """A student loss name and, for the subset loss, its logit indices among ``n_out`` (:func:`choose_subset`)."""
    name = c.choice(tuple(names))
    return name, choose_subset(c, n_out, subset_sizes) if name == "subset_softmax_cross_entropy" else ()


def choose_spec(
    c: Chooser,
    *,
    losses: Sequence[str] = STUDENT_LOSSES,
    teachers: Sequence[str] = TEACHERS,
    subset_sizes: tuple[int, int] = (2, 0),
    hidden_layers: Sequence[int] = HIDDEN_LAYER_COUNTS,
) -> CaseSpec:
    """A whole case: architecture, initialization, inputs, student loss, teacher, seed (below :data:`SEEDS`)."""
    mlp = choose_mlp(c, hidden_layers)
    loss, subset = choose_student_loss(c, mlp.sizes[-1], losses, subset_sizes)
    return CaseSpec(
        mlp=mlp,
        **choose_init(c),
        inputs=c.choice(INPUT_DISTRIBUTIONS),
        n_samples=c.choice(SAMPLE_COUNTS),
        student_loss=loss,
        teacher=c.choice(tuple(teachers)),
        seed=c.integer(0, SEEDS - 1),
        subset=subset,
    )


def case_kinds(spec: CaseSpec) -> dict[str, Any]:
    """What kind of case ``spec`` is along each axis the chooser varies.

    ``"subset"`` is ``"proper"`` or ``"every logit"`` for the subset loss and None for
    other losses; ``"widths"`` is ``"narrow"`` or ``"wide"`` (:data:`HIDDEN_WIDTHS`) and
    None without a hidden layer.
    """
    hidden = spec.mlp.sizes[1:-1]
    subset = None
    if spec.student_loss == "subset_softmax_cross_entropy":
        subset = "proper" if len(spec.subset) < spec.mlp.sizes[-1] else "every logit"
    return {
        "student loss": spec.student_loss,
        "teacher": spec.teacher,
        "activation": spec.mlp.activation,
        "inputs": spec.inputs,
        "hidden layers": len(hidden),
        "widths": None if not hidden else "narrow" if set(hidden) <= set(HIDDEN_WIDTHS["narrow"]) else "wide",
        "subset": subset,
    }


def case_shares(specs: Sequence[CaseSpec]) -> dict[str, dict[Any, float]]:
    """For each axis of :func:`case_kinds`, the share of each kind among the specs that have one.

    Example:
        >>> specs = [CaseSpec(MLP((2, 3, 2)), "normal", 1.0, 0.0, "normal", 4, loss, "direction", 0)
        ...          for loss in ("squared_error", "squared_error", "softmax_cross_entropy")]
        >>> case_shares(specs)["student loss"]
        {'softmax_cross_entropy': 0.3333333333333333, 'squared_error': 0.6666666666666666}
    """
    kinds = [case_kinds(spec) for spec in specs]
    shares = {}
    for axis in kinds[0] if kinds else ():
        values = [k[axis] for k in kinds if k[axis] is not None]
        shares[axis] = {value: values.count(value) / len(values) for value in sorted(set(values), key=str)}
    return shares


def format_shares(groups: dict[str, Sequence[CaseSpec]]) -> str:
    """A Markdown table, one column per group of specs: :func:`case_shares` and the range of :func:`n_parameters`.

    Example:
        >>> spec = CaseSpec(MLP((2, 3, 2)), "normal", 1.0, 0.0, "normal", 4, "squared_error", "direction", 0)
        >>> print(format_shares({"one case": [spec]}).splitlines()[-1])
        | parameters | 17 (median 17); under 50: 100%, 2,000 or more: 0% |
    """
    shares = {name: case_shares(specs) for name, specs in groups.items()}
    axes = list(next(iter(shares.values()), {}))
    among = {"widths": " (with a hidden layer)", "subset": " (subset-loss cases)"}
    rows = ["| " + " | ".join(["axis", *groups]) + " |", "|---" * (len(groups) + 1) + "|"]
    for axis in axes:
        cells = [", ".join(f"{kind} {share:.0%}" for kind, share in group[axis].items()) for group in shares.values()]
        rows.append(f"| {axis}{among.get(axis, '')} | " + " | ".join(cells) + " |")
    cells = []
    for specs in groups.values():
        counts = sorted(n_parameters(spec.mlp) for spec in specs)
        span = f"{counts[0]}" if counts[0] == counts[-1] else f"{counts[0]} to {counts[-1]}"
        cells.append(
            f"{span} (median {counts[len(counts) // 2]}); under 50: {sum(c < 50 for c in counts) / len(counts):.0%}, "
            f"2,000 or more: {sum(c >= 2000 for c in counts) / len(counts):.0%}"
        )
    rows.append("| parameters | " + " | ".join(cells) + " |")
    return "\n".join(rows)
