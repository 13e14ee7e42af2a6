"""Matmul precision of the MNIST MLP: float32, or bfloat16 inputs with float32 accumulation.

With ``"bf16"`` every matrix product of a training step, forward and backward, rounds its
two operands to bfloat16 and accumulates in float32:

.. math::

    y = \\mathrm{bf16}(x)\\,\\mathrm{bf16}(W), \\qquad
    \\bar x = \\mathrm{bf16}(\\bar y)\\,\\mathrm{bf16}(W)^\\top, \\qquad
    \\bar W = \\mathrm{bf16}(x)^\\top\\,\\mathrm{bf16}(\\bar y),

each product summed in float32. Parameters, optimizer state, biases, activations between
layers, softmaxes and losses stay float32; only the matmul operands are rounded (8
significant bits). This is the usual mixed-precision recipe of accelerators, and on CPUs
with AVX-512 BF16 it doubles the matmul rate.

Why a custom VJP rather than autodiff through ``astype``: autodiff would transpose the
bfloat16 product into float32 cotangent products (float32 ``ȳ`` times bfloat16 operands),
which run at float32 speed. XLA's CPU backend also runs a bfloat16 product fast only when
its left operand is contracted on its last axis and its right operand on its first, in
row-major memory. The backward products of this module are written that way: the
transposed operand is laid out explicitly (a layout constraint stops XLA from folding the
transpose back into the product, where it would fall back to float32).

Example:
    >>> import jax.numpy as jnp
    >>> from toymodels.precision import bf16_matmul
    >>> x = jnp.full((2, 3), 1.0 + 2.0**-10)  # rounds to 1.0 in bfloat16
    >>> bf16_matmul(x, jnp.ones((3, 1)))
    Array([[3.],
           [3.]], dtype=float32)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.layout import Layout, with_layout_constraint
from jaxtyping import Array, Float

from toymodels.config import PRECISIONS

_ROW_MAJOR = Layout((0, 1))


def _row_major_transpose(a: Array) -> Array:
    return with_layout_constraint(a.T, _ROW_MAJOR)


def _product(a: Array, b: Array) -> Float[Array, "m n"]:
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


@jax.custom_vjp
def bf16_matmul(x: Float[Array, "batch d_in"], w: Float[Array, "d_in d_out"]) -> Float[Array, "batch d_out"]:
    """``x @ w`` with both operands rounded to bfloat16 and a float32 result; see the module docstring."""
    return _forward(x, w)[0]


def _forward(x, w):
    x16, w16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    # Empty arrays carry the inputs' dtypes, which the cotangents must match.
    return _product(x16, w16), (x16, w16, jnp.zeros(0, x.dtype), jnp.zeros(0, w.dtype))


def _backward(residuals, g):
    x16, w16, x_like, w_like = residuals
    g16 = g.astype(jnp.bfloat16)
    dx = _product(g16, _row_major_transpose(w16))
    dw = _product(_row_major_transpose(x16), g16)
    return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


bf16_matmul.defvjp(_forward, _backward)


def bf16_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None):
    """A ``lax.dot_general`` stand-in for ``nnx.Linear``: a dense layer's product through :func:`bf16_matmul`.

    Only the dense layer's contraction (last axis of ``lhs`` with the first of a 2-d
    ``rhs``, no batch axes) is supported; leading axes of ``lhs`` are flattened.
    """
    del precision, preferred_element_type, out_sharding
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    if tuple(lhs_contract) != (lhs.ndim - 1,) or tuple(rhs_contract) != (0,) or rhs.ndim != 2 or lhs_batch or rhs_batch:
        raise ValueError(f"bf16_dot_general supports a dense layer's product only, got {dimension_numbers}")
    flat = lhs.reshape(-1, lhs.shape[-1])
    return bf16_matmul(flat, rhs).reshape(*lhs.shape[:-1], rhs.shape[1])


def compute_dtype(precision: str) -> jnp.dtype:
    """The dtype in which inputs can be made for ``precision`` without changing any product."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    return jnp.dtype(jnp.bfloat16 if precision == "bf16" else jnp.float32)
