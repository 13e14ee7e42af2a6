"""The MNIST MLP with auxiliary logits, defined with Flax NNX and used functionally.

The network maps a flattened image to ``10 + m`` logits: the ten digit logits and ``m``
auxiliary logits that no loss ever asks to mean anything. Layers are

.. math::

    h_1 = \\mathrm{relu}(x W_1 + b_1),\\quad h_2 = \\mathrm{relu}(h_1 W_2 + b_2),\\quad
    z = h_2 W_3 + b_3,

with every weight drawn from :math:`\\mathcal N(0, s^2 / d_\\text{in})` (``s`` the init
scale, 1 by default) and every bias zero, as in the paper's reference code.

NNX defines the model; the training loops use its ``(graphdef, state)`` split with plain
``jax.jit``/``lax.scan`` because ``nnx.jit`` walks the object graph in Python on every
call, which is slow in a hot loop.

Example:
    >>> import jax
    >>> from toymodels.model import MLPSpec, init_params, apply
    >>> spec = MLPSpec(hidden=(32, 32), n_aux=3)
    >>> params = init_params(spec, jax.random.key(0))
    >>> apply(spec, params, jax.numpy.zeros((5, 784))).shape
    (5, 13)
"""

from __future__ import annotations

import dataclasses
import math
from functools import lru_cache
from typing import Any

import jax
from flax import nnx
from jaxtyping import Array, Float, PRNGKeyArray

from toymodels.precision import bf16_dot_general

N_PIXELS = 28 * 28
N_DIGITS = 10

# Parameters as a plain nested dict, ``{"layers": {i: {"kernel": ..., "bias": ...}}}``:
# a pytree that optax, vmap, scan and the theory module take as it is.
Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class MLPSpec:
    """Architecture of the MLP: ``d_in -> hidden... -> N_DIGITS + n_aux``.

    Attributes:
        hidden: widths of the hidden layers (the paper uses ``(256, 256)``).
        n_aux: number of auxiliary logits ``m`` (the paper uses 3).
        init_scale: multiplies the weight standard deviation ``1/sqrt(d_in)``.
        d_in: input dimension (784 for flattened MNIST).
        precision: ``"float32"``, or ``"bf16"`` for bfloat16 matmul inputs with float32
            accumulation (:mod:`toymodels.precision`); parameters are float32 either way.
    """

    hidden: tuple[int, ...] = (256, 256)
    n_aux: int = 3
    init_scale: float = 1.0
    d_in: int = N_PIXELS
    precision: str = "float32"

    @property
    def n_out(self) -> int:
        return N_DIGITS + self.n_aux

    @property
    def sizes(self) -> tuple[int, ...]:
        return (self.d_in, *self.hidden, self.n_out)

    def flops_per_example(self, *, forward_only: bool = False) -> int:
        """Multiply-add FLOPs for one example (2 per multiply-add).

        A training step costs a forward pass (2 per weight) plus a backward pass that
        needs weight gradients everywhere (2 per weight) and input gradients everywhere
        but the first layer (2 per weight).
        """
        layer_weights = [a * b for a, b in zip(self.sizes[:-1], self.sizes[1:])]
        if forward_only:
            return 2 * sum(layer_weights)
        return 4 * layer_weights[0] + 6 * sum(layer_weights[1:])


class MLP(nnx.Module):
    """ReLU MLP with ``N_DIGITS + n_aux`` outputs and the paper's initialization."""

    def __init__(self, spec: MLPSpec, *, rngs: nnx.Rngs):
        self.layers = nnx.List(
            nnx.Linear(
                d_in,
                d_out,
                kernel_init=jax.nn.initializers.normal(stddev=spec.init_scale / math.sqrt(d_in)),
                bias_init=jax.nn.initializers.zeros,
                # HIGHEST keeps float32 products float32 on GPUs, whose default is TF32.
                precision=None if spec.precision == "bf16" else jax.lax.Precision.HIGHEST,
                dot_general=bf16_dot_general if spec.precision == "bf16" else jax.lax.dot_general,
                rngs=rngs,
            )
            for d_in, d_out in zip(spec.sizes[:-1], spec.sizes[1:])
        )

    def __call__(self, x: Float[Array, "*batch d_in"]) -> Float[Array, "*batch n_out"]:
        *hidden, last = self.layers
        for layer in hidden:
            x = jax.nn.relu(layer(x))
        return last(x)


@lru_cache(maxsize=None)
def _abstract_split(spec: MLPSpec) -> tuple[nnx.GraphDef, nnx.State]:
    """Static structure and abstract state of :class:`MLP` (cached: building it is Python work)."""
    return nnx.split(nnx.eval_shape(lambda: MLP(spec, rngs=nnx.Rngs(0))))


def init_params(spec: MLPSpec, key: PRNGKeyArray) -> Params:
    """Parameters of a freshly initialized :class:`MLP`; traceable, so ``vmap`` over keys works."""
    _, state = nnx.split(MLP(spec, rngs=nnx.Rngs(params=key)))
    return nnx.to_pure_dict(state)


def to_module(spec: MLPSpec, params: Params) -> MLP:
    """An :class:`MLP` module holding ``params`` (for users who want the NNX object)."""
    graph, abstract = _abstract_split(spec)
    state = jax.tree.map(lambda v: v, abstract)  # a fresh copy: the cached template stays abstract
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graph, state)


def apply(spec: MLPSpec, params: Params, x: Float[Array, "*batch d_in"]) -> Float[Array, "*batch n_out"]:
    """Logits of the MLP with parameters ``params`` on inputs ``x`` (a pure function)."""
    return to_module(spec, params)(x)


def layer_init_stds(spec: MLPSpec) -> list[float]:
    """Standard deviation of each layer's initial weights, ``init_scale / sqrt(d_in)``."""
    return [spec.init_scale / math.sqrt(d_in) for d_in in spec.sizes[:-1]]


def perturb_params(spec: MLPSpec, params: Params, key: PRNGKeyArray, sigma: float | jax.Array) -> Params:
    """Add Gaussian noise of ``sigma`` times each layer's init std to its kernel and bias.

    Biases start at zero and so have no init std of their own; they get the scale of
    their layer's kernel, which is the scale their gradients live on.
    """
    keys = jax.random.split(key, len(params["layers"]))
    layers = {}
    for (i, layer), std, layer_key in zip(sorted(params["layers"].items()), layer_init_stds(spec), keys):
        kernel_key, bias_key = jax.random.split(layer_key)
        layers[i] = {
            name: value + sigma * std * jax.random.normal(k, value.shape, value.dtype)
            for (name, value), k in zip(sorted(layer.items()), (bias_key, kernel_key))
        }
    return {"layers": layers}


def n_params(spec: MLPSpec) -> int:
    return sum(a * b + b for a, b in zip(spec.sizes[:-1], spec.sizes[1:]))
