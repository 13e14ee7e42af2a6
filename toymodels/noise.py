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
from jax.typing import DTypeLike
from jaxtyping import Array, Float, Int, PRNGKeyArray, UInt8, UInt32

from toymodels.data import normalize


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
    dtype: DTypeLike = jnp.float32,
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


def pixel_permutation(words: UInt32[Array, "2"], n_pixels: int) -> Int[Array, " n_pixels"]:
    """The fixed pixel permutation of ``--student-data shuffled`` for the set selected by ``words``.

    Hashes of the pixel indices are ranked, so the permutation costs one sort of
    ``n_pixels`` keys and needs no stored state; the same words give the same permutation.
    """
    return jnp.argsort(_uniform01(words, jnp.arange(n_pixels, dtype=jnp.uint32)))


def student_inputs(
    words: UInt32[Array, "2"],
    ids: Int[Array, " batch"],
    pool: UInt8[Array, "n n_pixels"] | None,
    kind: str,
    n_pixels: int,
    dtype: DTypeLike = jnp.float32,
) -> Float[Array, "batch n_pixels"]:
    """Student input images ``ids`` of ``kind`` (:data:`toymodels.config.STUDENT_DATA`).

    Noise kinds (``uniform``, ``gaussian``) come from :func:`noise_images`. The image
    kinds take row ``ids`` of ``pool`` (``uint8`` MNIST training images), scaled to
    ``[-1, 1]`` like the teacher's inputs, and then:

    - ``mnist``: nothing more; the students see the teacher's own training images.
    - ``shuffled``: the pixels permuted by one permutation per seed
      (:func:`pixel_permutation`). One fixed permutation rather than one per image: the
      images keep MNIST's pixel histogram *and* the correlations between pixels (a fixed
      relabelling of the inputs, which the MLP's first layer could absorb), and lose only
      the spatial layout the teacher was trained on; a permutation per image would also
      destroy the correlations and give sparse noise with MNIST's histogram.
    - ``inverted``: negated (white background, dark strokes): the digits' structure,
      at inputs far from anything the teacher saw.
    """
    if kind in ("uniform", "gaussian"):
        return noise_images(words, ids, n_pixels, kind, dtype)
    if pool is None:
        raise ValueError(f"--student-data {kind} needs the MNIST training images")
    if kind == "shuffled":
        # One gather of the permuted pixels from the flattened images: its result is laid out
        # row-major like any batch, which the bfloat16 products need (a column gather after
        # the row gather is not, and XLA's CPU backend has no bfloat16 kernel for it).
        flat = ids.astype(jnp.int32)[:, None] * n_pixels + pixel_permutation(words, n_pixels)[None, :]
        x = normalize(pool.reshape(-1)[flat])
    else:
        x = normalize(pool[ids])
    if kind == "inverted":
        x = -x
    elif kind not in ("mnist", "shuffled"):
        raise ValueError(f"unknown student data {kind!r}")
    return x.astype(dtype)
