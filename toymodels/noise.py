"""Noise images made on the fly inside the compiled training step.

A student sees ``n_noise`` fixed noise images, reshuffled every epoch. Storing them costs
``seeds x n_noise x 784`` floats (18.8 GB for 100 seeds at the paper's 60,000 images), so
instead image ``i`` of a seed is recomputed from ``(key, i)`` whenever a batch needs it.

``jax.random`` draws cost about 10 ns per number on a CPU, which would make noise the most
expensive part of the whole experiment. Pixel values here come from a keyed counter hash:
two rounds of the 32-bit MurmurHash3 finalizer, each after mixing in one 32-bit word drawn
from the seed's JAX key. That is a handful of integer operations per pixel (about 0.1 ns on
a CPU core), deterministic in ``(key, image, pixel)``, and statistically uniform enough for
noise inputs (tests check moments and independence between images and seeds).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from toymodels.noise import noise_words, noise_images
    >>> words = noise_words(jax.random.key(0))
    >>> x = noise_images(words, jnp.arange(4), 784, "uniform")
    >>> x.shape, bool(x.min() >= -1.0), bool(x.max() <= 1.0)
    ((4, 784), True, True)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray, UInt32


def noise_words(key: PRNGKeyArray) -> UInt32[Array, "2"]:
    """The two 32-bit words that select one noise set, drawn from a JAX key."""
    return jax.random.bits(key, (2,), jnp.uint32)


def _fmix32(x: UInt32[Array, "..."]) -> UInt32[Array, "..."]:
    """MurmurHash3's 32-bit finalizer: a bijection whose output bits each depend on all input bits."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _uniform01(words: UInt32[Array, "2"], counters: UInt32[Array, "..."]) -> Float[Array, "..."]:
    """Uniform floats in ``[0, 1)`` (23 random mantissa bits) keyed by ``words``."""
    bits = _fmix32(_fmix32(counters ^ words[0]) ^ words[1])
    return jax.lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000), jnp.float32) - 1.0


def noise_images(
    words: UInt32[Array, "2"],
    ids: Int[Array, " batch"],
    n_pixels: int,
    distribution: str,
    dtype: jnp.dtype = jnp.float32,
) -> Float[Array, "batch n_pixels"]:
    """Noise images ``ids`` of the set selected by ``words``.

    Args:
        words: from :func:`noise_words`.
        ids: image indices in ``[0, n_noise)``; the same id always gives the same image.
        n_pixels: pixels per image.
        distribution: ``"uniform"`` on ``[-1, 1)`` or ``"gaussian"`` (standard normal,
            by the Box-Muller transform).
        dtype: the images' dtype. Pixels are computed in float32 and rounded once, so a
            ``bfloat16`` image is exactly what a bfloat16 matmul would make of the
            float32 one, at half the memory traffic.

    Returns:
        Images of ``dtype``, one row per id.
    """
    ids = ids.astype(jnp.uint32)[:, None]
    if distribution == "uniform":
        counters = ids * jnp.uint32(n_pixels) + jnp.arange(n_pixels, dtype=jnp.uint32)[None, :]
        return (2.0 * _uniform01(words, counters) - 1.0).astype(dtype)
    if distribution == "gaussian":
        counters = ids * jnp.uint32(2 * n_pixels) + 2 * jnp.arange(n_pixels, dtype=jnp.uint32)[None, :]
        radius = jnp.sqrt(-2.0 * jnp.log1p(-_uniform01(words, counters)))  # log of (0, 1]
        return (radius * jnp.cos(2.0 * jnp.pi * _uniform01(words, counters + 1))).astype(dtype)
    raise ValueError(f"unknown noise distribution {distribution!r}: choose uniform or gaussian")
