"""Device memory of one training step, from the compiler alone: no weights are allocated.

:func:`compiled_memory` builds the decoder and its LoRA pairs as shapes only, lays them out
on a mesh of the given devices exactly as :class:`~lmpipeline.backends.jaxlm.backend.JaxBackend`
does when it trains (:func:`~lmpipeline.backends.jaxlm.backend.sharding_for`), and compiles
the step the backend trains with (:func:`~lmpipeline.backends.jaxlm.training.train_step`)
for those abstract arguments. XLA's buffer assignment then says how many bytes each device
holds: the arguments (frozen weights, trainable weights, optimizer state, batch), the
outputs (new trainable weights and optimizer state), and the temporaries of the forward
and backward passes at their peak.

The numbers are those of the platform that compiles: on CPUs (``XLA_FLAGS=
--xla_force_host_platform_device_count=8`` gives eight) they are the CPU compiler's, whose
fusion and layouts differ from a TPU's or a GPU's, so they estimate an accelerator's use
rather than measure it. The arguments and outputs are the same on every platform; the
temporaries are what differs.

>>> config = qwen2_5_7b()
>>> round(parameter_count(config) / 1e9, 2)
7.62
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lmpipeline.backends.jaxlm.backend import device_mesh, sharding_for
from lmpipeline.backends.jaxlm.model import Decoder, DecoderConfig, add_lora
from lmpipeline.backends.jaxlm.training import micro_rows, optimizer, train_step
from lmpipeline.config import FinetuneSpec


def qwen2_5_7b() -> DecoderConfig:
    """The shape of Qwen2.5-7B (and -Instruct), as in its ``config.json``."""
    return DecoderConfig(
        vocab_size=152_064,
        hidden_size=3584,
        intermediate_size=18_944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attention_bias=True,
    )


def parameter_count(config: DecoderConfig) -> int:
    """Weights of the decoder (without LoRA pairs)."""
    shapes = nnx.state(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))
    return sum(x.size for x in jax.tree.leaves(shapes))


def abstract_step(
    config: DecoderConfig,
    finetune: FinetuneSpec,
    *,
    width: int,
    keep: int | None = None,
    dtype=jnp.bfloat16,
    devices: Sequence | None = None,
    micro_batch: int | None = None,
):
    """The training step lowered for shapes only: ``(lowered, arguments)``, the arguments
    being the step's positional inputs as :class:`jax.ShapeDtypeStruct` with the backend's
    shardings. Arguments as in :func:`compiled_memory`."""
    if finetune.objective != "sampled":
        raise ValueError("compiled_memory measures finetune.objective=sampled (a soft run also holds a teacher)")
    full = finetune.method == "full"
    devices = jax.devices() if devices is None else list(devices)
    mesh = device_mesh(devices)
    micro = micro_rows(finetune.micro_batch, mesh.size) if micro_batch is None else micro_batch
    keep = width if keep is None else keep

    def build() -> Decoder:
        # A fully finetuned model trains from float32 weights whatever the base's dtype.
        model = Decoder(config, dtype=jnp.float32 if full else dtype, rngs=nnx.Rngs(0))
        if not full:
            add_lora(model, finetune.target_modules, finetune.lora_rank, finetune.lora_alpha, jax.random.key(0))
        return model

    graphdef, params, frozen = nnx.split(nnx.eval_shape(build), nnx.Param if full else nnx.LoRAParam, ...)
    params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32), params)
    # The schedule's length only sizes a table of factors, a few bytes per step.
    tx = optimizer(finetune, finetune.warmup_steps + 1)
    opt_state = jax.eval_shape(tx.init, params)
    shape = (finetune.grad_accum, micro, width)
    batch = {
        "ids": jax.ShapeDtypeStruct(shape, jnp.int32),
        "labels": jax.ShapeDtypeStruct(shape, jnp.int32),
        "valid": jax.ShapeDtypeStruct(shape, jnp.bool_),
    }

    def placed(tree):
        def at(path, x):
            if not hasattr(x, "shape"):
                return x
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_for(mesh, path, x.shape))

        return jax.tree_util.tree_map_with_path(at, tree)

    arguments = (
        placed(params),
        placed(frozen),
        placed(opt_state),
        placed(batch),
        jax.ShapeDtypeStruct((), jnp.float32),
    )
    compute_dtype = jnp.bfloat16 if finetune.compute_dtype == "bfloat16" else jnp.float32
    lowered = train_step.lower(graphdef, *arguments, tx=tx, keep=keep, compute_dtype=compute_dtype)
    return lowered, arguments


def compiled_memory(
    config: DecoderConfig,
    finetune: FinetuneSpec,
    *,
    width: int,
    keep: int | None = None,
    dtype=jnp.bfloat16,
    devices: Sequence | None = None,
    micro_batch: int | None = None,
) -> dict:
    """Bytes per device of one optimizer step of ``finetune`` (LoRA or full, the
    ``sampled`` objective) on ``config``, compiled for ``devices`` (default: all of JAX's).

    ``width`` is the padded row length (the longest row rounded up to 32), ``keep`` the
    positions whose logits the loss reads (default ``width``, the most); ``dtype`` is the
    loaded weights' (``model.dtype``), ``micro_batch`` the rows of each compiled
    micro-batch (default: those the backend compiles, :func:`~lmpipeline.backends.jaxlm.
    training.micro_rows`).

    Returns the compiler's ``argument_bytes``, ``output_bytes``, ``alias_bytes`` (outputs
    that reuse an argument's buffer, counted in both), ``temp_bytes`` and
    ``generated_code_bytes``, and ``total_bytes``, their sum less the aliased bytes:
    what a device holds at the step's peak. Also ``devices``, ``micro_batch``,
    ``rows_per_device`` (``micro_batch`` when the rows are not split), ``width``,
    ``keep`` and ``compile_s``.
    """
    start = time.perf_counter()
    lowered, arguments = abstract_step(
        config, finetune, width=width, keep=keep, dtype=dtype, devices=devices, micro_batch=micro_batch
    )
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    batch = arguments[3]["ids"]
    n = batch.sharding.mesh.size
    out = {
        "argument_bytes": int(stats.argument_size_in_bytes),
        "output_bytes": int(stats.output_size_in_bytes),
        "alias_bytes": int(stats.alias_size_in_bytes),
        "temp_bytes": int(stats.temp_size_in_bytes),
        "generated_code_bytes": int(stats.generated_code_size_in_bytes),
    }
    out["total_bytes"] = (
        out["argument_bytes"]
        + out["output_bytes"]
        - out["alias_bytes"]
        + out["temp_bytes"]
        + out["generated_code_bytes"]
    )
    return {
        **out,
        "devices": n,
        "micro_batch": batch.shape[1],
        "rows_per_device": batch.sharding.shard_shape(batch.shape)[1],
        "width": batch.shape[2],
        "keep": width if keep is None else keep,
        "compile_s": round(seconds, 2),
    }


def main(argv: Sequence[str] | None = None) -> dict:
    """``python -m lmpipeline.backends.jaxlm.memory --out FILE``: the ``tpu`` preset's LoRA
    step on Qwen2.5-7B, on every device JAX sees, written as JSON with the environment.
    Eight CPU devices stand in for a v4-8 or v5e-8 slice with ``XLA_FLAGS=
    --xla_force_host_platform_device_count=8``."""
    import argparse

    from lmpipeline.backends.jaxlm.decoding import round_up
    from lmpipeline.config import preset
    from sublearn._common import environment, write_json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--width", type=int, help="padded row length (default: max_seq_len rounded up to 32)")
    parser.add_argument("--keep", type=int, help="positions whose logits the loss reads (default: the width)")
    args = parser.parse_args(argv)
    cfg = preset("tpu")
    spec = cfg.finetune
    width = args.width or round_up(spec.max_seq_len, 32)
    config = qwen2_5_7b()
    dtype = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}[cfg.model.dtype]
    record = {
        "settings": {
            "model": cfg.model.name_or_path,
            "config": dataclasses.asdict(config),
            "parameters": parameter_count(config),
            "weights_dtype": cfg.model.dtype,
            "finetune": {k: v for k, v in dataclasses.asdict(spec).items() if not k.startswith("max_rows")},
        },
        "padded": compiled_memory(config, spec, width=width, keep=args.keep, dtype=dtype),
        # The layout before micro-batches were padded: rows the device count does not divide
        # stay whole on every device.
        "unpadded": compiled_memory(
            config, spec, width=width, keep=args.keep, dtype=dtype, micro_batch=spec.micro_batch
        ),
        "environment": environment(),
    }
    write_json(args.out, record)
    return record


if __name__ == "__main__":
    main()
