r"""A compact Flax NNX decoder for the Llama and Qwen2 families (SmolLM2, Qwen2.5).

Both are the same pre-norm decoder: token embedding, ``L`` blocks of

.. math::

    h \leftarrow h + W_o\,\mathrm{attn}(\mathrm{rope}(W_q \bar h), \mathrm{rope}(W_k \bar h), W_v \bar h),
    \qquad h \leftarrow h + W_d\,(\mathrm{silu}(W_g \bar h) \odot W_u \bar h),

with :math:`\bar h = \mathrm{rmsnorm}(h)` before each half, a final RMSNorm and a vocabulary
projection (the embedding itself when the weights are tied, as in SmolLM2). Attention is
grouped-query (``num_kv_heads`` key/value heads shared by ``num_heads`` query heads) with
rotary position embeddings in the half-split layout of the Hugging Face checkpoints;
Qwen2 adds biases to the query, key and value projections.

The blocks' parameters are stacked on a leading layer axis and run with ``lax.scan``, so a
30-layer model compiles one block, not thirty. Every kernel is ``[d_in, d_out]``; a
:class:`LoRA` pair may be attached to any projection (``lora`` attribute), and its
parameters are :class:`flax.nnx.LoRAParam`, so training selects them by type.

The key/value cache is a plain pair of arrays ``[L, B, S, kv_heads, head_dim]`` passed in
and returned, slot ``s`` of every row holding the token fed at step ``s``. Rows are padded on
the left; ``key_valid`` marks real tokens, and a query at slot ``t`` sees the valid keys at
slots ``<= t``. Normalization, softmax and logits are float32 whatever the weights' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

ARCHITECTURES = ("llama", "qwen2", "mistral")  # the model types this decoder reproduces


@dataclass(frozen=True)
class DecoderConfig:
    """The shape of a decoder; read from a checkpoint's ``config.json`` or GGUF metadata."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: biases on the query, key and value projections

    @classmethod
    def from_hf(cls, config: dict) -> DecoderConfig:
        """From a Hugging Face ``config.json`` of a Llama, Mistral or Qwen2 model."""
        model_type = config.get("model_type")
        if model_type not in ARCHITECTURES:
            raise ValueError(
                f"model type {model_type!r} is not supported by the jax backend (it runs {', '.join(ARCHITECTURES)})"
            )
        # transformers 5 writes rope settings under rope_parameters; earlier files at the top level.
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError("the jax backend does not implement rope scaling; use model.backend=hf for this model")
        if config.get("use_sliding_window"):
            raise ValueError("the jax backend does not implement sliding-window attention; use model.backend=hf")
        heads = config["num_attention_heads"]
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10_000.0))),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", model_type == "qwen2")),
        )


class Cache(NamedTuple):
    """Keys and values of every layer, ``[L, B, S, kv_heads, head_dim]`` each."""

    k: Float[Array, "L B S kv D"]
    v: Float[Array, "L B S kv D"]

    @classmethod
    def zeros(cls, config: DecoderConfig, batch: int, length: int, dtype) -> Cache:
        shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


class LoRA(nnx.Module):
    r"""A low-rank update :math:`x \mapsto \frac{\alpha}{r} (x A) B` added to a projection's output."""

    def __init__(self, a: jax.Array, b: jax.Array, scale: float):
        self.a = nnx.LoRAParam(a)  # [..., d_in, r]
        self.b = nnx.LoRAParam(b)  # [..., r, d_out]
        self.scale = scale

    def __call__(self, x: jax.Array) -> jax.Array:
        return (x @ self.a[...].astype(x.dtype)) @ self.b[...].astype(x.dtype) * self.scale


class Linear(nnx.Module):
    def __init__(self, d_in: int, d_out: int, *, bias: bool, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (d_in, d_out), dtype) * d_in**-0.5)
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None
        self.lora: LoRA | None = nnx.data(None)  # data, not structure: a pair may be attached later

    def __call__(self, x: jax.Array) -> jax.Array:
        # Accumulate in float32 whatever the weights' dtype: the fast bfloat16 kernels of
        # CPUs and accelerators take bfloat16 inputs and produce float32 sums.
        y = jnp.matmul(x, self.kernel[...], preferred_element_type=jnp.float32).astype(x.dtype)
        if self.bias is not None:
            y = y + self.bias[...].reshape((1,) * (y.ndim - 1) + (-1,))
        if self.lora is not None:
            y = y + self.lora(x)
        return y


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].reshape((1,) * (x.ndim - 1) + (-1,)) * x32.astype(x.dtype)


def rope(x: Float[Array, "B T h D"], positions: Int[Array, "B T"], theta: float) -> Float[Array, "B T h D"]:
    """Rotary embedding in the half-split layout (dimension ``i`` pairs with ``i + D/2``)."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / theta ** (jnp.arange(0, half, dtype=jnp.float32) / half)
    angles = positions[..., None].astype(jnp.float32) * inv_freq[None, None, :]  # [B, T, D/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :].astype(x.dtype)
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :].astype(x.dtype)
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class Block(nnx.Module):
    """One decoder block: grouped-query self-attention and a SwiGLU MLP, each after an RMSNorm."""

    def __init__(self, config: DecoderConfig, dtype, rngs: nnx.Rngs):
        c = config
        self.config = c
        h, d, bias = c.hidden_size, c.head_dim, c.attention_bias
        self.input_norm = RMSNorm(h, c.rms_norm_eps, dtype)
        self.q_proj = Linear(h, c.num_heads * d, bias=bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(h, c.num_kv_heads * d, bias=bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(h, c.num_kv_heads * d, bias=bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(c.num_heads * d, h, bias=False, dtype=dtype, rngs=rngs)
        self.post_attention_norm = RMSNorm(h, c.rms_norm_eps, dtype)
        self.gate_proj = Linear(h, c.intermediate_size, bias=False, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(h, c.intermediate_size, bias=False, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(c.intermediate_size, h, bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x, positions, key_valid, cache, layer, write_at):
        c = self.config
        b, t, _ = x.shape
        y = self.input_norm(x)
        q = rope(self.q_proj(y).reshape(b, t, c.num_heads, c.head_dim), positions, c.rope_theta)
        k = rope(self.k_proj(y).reshape(b, t, c.num_kv_heads, c.head_dim), positions, c.rope_theta)
        v = self.v_proj(y).reshape(b, t, c.num_kv_heads, c.head_dim)
        if cache is None:  # a full pass: the keys are this call's tokens
            k_all, v_all, query_slots = k, v, jnp.arange(t)
        else:
            # Written in place into the whole cache (a loop-carried buffer), then this layer's
            # slice read back: stacking per-layer caches as scan outputs would copy all of it.
            at = (layer, 0, write_at, 0, 0)
            cache = Cache(
                jax.lax.dynamic_update_slice(cache.k, k[None].astype(cache.k.dtype), at),
                jax.lax.dynamic_update_slice(cache.v, v[None].astype(cache.v.dtype), at),
            )
            k_all = jax.lax.dynamic_index_in_dim(cache.k, layer, keepdims=False)
            v_all = jax.lax.dynamic_index_in_dim(cache.v, layer, keepdims=False)
            query_slots = write_at + jnp.arange(t)
        groups = c.num_heads // c.num_kv_heads
        q = q.reshape(b, t, c.num_kv_heads, groups, c.head_dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k_all.astype(q.dtype), preferred_element_type=jnp.float32)
        scores = scores * c.head_dim**-0.5
        visible = key_valid[:, None, :] & (jnp.arange(k_all.shape[1])[None, None, :] <= query_slots[None, :, None])
        # A query with no visible key (a pad row's left pad) gets uniform weights, not NaN.
        scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(v_all.dtype)
        attended = jnp.einsum("bkgts,bskd->btkgd", weights, v_all).reshape(b, t, c.num_heads * c.head_dim)
        x = x + self.o_proj(attended.astype(x.dtype))
        y = self.post_attention_norm(x)
        x = x + self.down_proj(jax.nn.silu(self.gate_proj(y)) * self.up_proj(y))
        return x, cache


class Decoder(nnx.Module):
    """The whole model. ``__call__`` returns float32 logits (of the last ``keep`` positions
    when ``keep`` is given) and the updated cache (``None`` without one)."""

    def __init__(self, config: DecoderConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        scale = 1.0 / config.hidden_size**0.5
        self.embed = nnx.Param(jax.random.normal(rngs.params(), (config.vocab_size, config.hidden_size), dtype) * scale)

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(config, dtype, rngs)

        self.layers = make_blocks(rngs)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype, rngs=rngs)

    def __call__(
        self,
        ids: Int[Array, "B T"],
        positions: Int[Array, "B T"],
        key_valid: Bool[Array, "B S"],
        cache: Cache | None = None,
        write_at: Int[Array, ""] | int = 0,
        keep: int | None = None,
    ) -> tuple[Float[Array, "B K V"], Cache | None]:
        x = self.embed[...][ids]
        graphdef, state = nnx.split(self.layers)

        def body(carry, xs):
            x, cache = carry
            layer_state, layer = xs
            x, cache = nnx.merge(graphdef, layer_state)(x, positions, key_valid, cache, layer, write_at)
            return (x, cache), None

        (x, cache), _ = jax.lax.scan(body, (x, cache), (state, jnp.arange(self.config.num_layers)))
        if keep is not None:
            x = x[:, -keep:]
        x = self.norm(x)
        if self.config.tie_word_embeddings:
            logits = jnp.einsum("btd,vd->btv", x, self.embed[...], preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("btd,dv->btv", x, self.lm_head.kernel[...], preferred_element_type=jnp.float32)
        return logits, cache


def abstract_decoder(config: DecoderConfig, dtype) -> Decoder:
    """The model's structure with shapes only (no memory), to be filled with loaded weights."""
    return nnx.eval_shape(lambda: Decoder(config, dtype=dtype, rngs=nnx.Rngs(0)))


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(model: Decoder, targets, rank: int, alpha: int | float, key: jax.Array) -> None:
    """Attach a LoRA pair to each projection named in ``targets`` (of :data:`PROJECTIONS`).

    As in peft: ``A`` uniform on :math:`\\pm 1/\\sqrt{d_{in}}` (Kaiming-uniform with
    :math:`a=\\sqrt 5`), ``B`` zero, scale ``alpha / rank``; the model is unchanged until trained.
    """
    unknown = set(targets) - set(PROJECTIONS)
    if unknown:
        raise ValueError(f"finetune.target_modules: {sorted(unknown)} are not projections of this model {PROJECTIONS}")
    for name, key_i in zip(PROJECTIONS, jax.random.split(key, len(PROJECTIONS))):
        if name not in targets:
            continue
        linear: Linear = getattr(model.layers, name)
        layers, d_in, d_out = linear.kernel[...].shape
        bound = d_in**-0.5
        a = jax.random.uniform(key_i, (layers, d_in, rank), jnp.float32, -bound, bound)
        linear.lora = LoRA(a, jnp.zeros((layers, rank, d_out), jnp.float32), alpha / rank)


def remove_lora(model: Decoder) -> None:
    for name in PROJECTIONS:
        getattr(model.layers, name).lora = None


def lora_weights(model: Decoder) -> dict[str, tuple[jax.Array, jax.Array, float]]:
    """``{projection: (A [L, d_in, r], B [L, r, d_out], scale)}`` for the attached pairs."""
    out = {}
    for name in PROJECTIONS:
        lora = getattr(model.layers, name).lora
        if lora is not None:
            out[name] = (lora.a[...], lora.b[...], lora.scale)
    return out


def set_lora(model: Decoder, weights: dict[str, tuple]) -> None:
    """Attach LoRA pairs given as in :func:`lora_weights` (after :func:`remove_lora`)."""
    remove_lora(model)
    for name, (a, b, scale) in weights.items():
        getattr(model.layers, name).lora = LoRA(jnp.asarray(a), jnp.asarray(b), scale)
