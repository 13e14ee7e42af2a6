"""Device memory of the JAX backend's training step, from the compiler on eight CPU devices.

Each test runs in a subprocess that sees eight CPU devices (``XLA_FLAGS=
--xla_force_host_platform_device_count=8``), the size of a v4-8 or v5e-8 TPU slice. On a
tiny model, :func:`~lmpipeline.backends.jaxlm.memory.compiled_memory`'s argument bytes are
the hand count of each device's shards, and the step's temporaries grow with the row
width; a micro-batch the device count does not divide is padded with rows that carry no
loss, which leaves the losses, gradient norms and trained weights as they were. On the
shapes of Qwen2.5-7B with the ``tpu`` preset's LoRA settings, the per-device peak is
recorded and compared with a v4 chip's 32 GB and a v5e chip's 16 GB of memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")

# Each subprocess compiles for eight devices: 30 s of CPU and more.
pytestmark = pytest.mark.slow

GB = 1e9

TINY = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from dataclasses import replace
from flax import nnx
from lmpipeline.backends import TrainExample
from lmpipeline.backends.jaxlm.backend import JaxBackend
from lmpipeline.backends.jaxlm.memory import compiled_memory
from lmpipeline.backends.jaxlm.model import Decoder, DecoderConfig, add_lora, lora_weights
from lmpipeline.backends.jaxlm.training import train
from lmpipeline.config import FinetuneSpec, ModelSpec
from tiny_lm import smollm2_tokenizer

assert jax.device_count() == 8
out = {}

# -- memory of a tiny model whose every dimension splits in eight ------------------------
config = DecoderConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, tie_word_embeddings=False, attention_bias=True)
spec = FinetuneSpec(micro_batch=22, grad_accum=3, lora_rank=8, lora_alpha=8)
h, i, q, kv, L, r = 64, 128, 64, 32, 2, 8
frozen = 256 * h * 2 + h + L * (2 * h + h * q + q + 2 * (h * kv + kv) + q * h + 3 * h * i)  # weights
lora = L * r * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h))  # A and B of seven projections
out["hand"] = {"frozen_bytes": 2 * frozen, "lora_bytes": 4 * lora}
out["tiny"] = {w: compiled_memory(config, spec, width=w) for w in (32, 64)}

# -- padding a micro-batch of 3 rows to 8 on eight devices changes nothing but the layout --
tokenizer = smollm2_tokenizer()
small = DecoderConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, attention_bias=True)
examples = [TrainExample([{"role": "user", "content": f"Count on from {k}."}], ", ".join(map(str, range(k, 2 * k + 2))))
            for k in range(6)]
ft = FinetuneSpec(epochs=2, micro_batch=3, grad_accum=2, warmup_steps=0, learning_rate=1e-2)
backend = JaxBackend(ModelSpec(device="cpu"))
runs = {}
for devices in (1, 8):
    model = Decoder(small, rngs=nnx.Rngs(0))
    add_lora(model, ft.target_modules, ft.lora_rank, ft.lora_alpha, jax.random.key(1))
    seen = []

    def place(tree):
        placed = backend._place(tree)
        if isinstance(placed, dict) and "ids" in placed:
            seen.append(list(placed["ids"].sharding.shard_shape(placed["ids"].shape)))
        return placed

    log = train(model, tokenizer, examples, ft, seed=0, place=place, devices=devices)
    weights = {k: [np.asarray(a).tolist(), np.asarray(b).tolist()] for k, (a, b, _) in lora_weights(model).items()}
    runs[devices] = {"loss": log["loss"], "grad_norm": log["grad_norm"], "batch_shard": seen[0], "lora": weights}
out["padding"] = runs
print(json.dumps(out))
"""

SEVEN_B = r"""
import json, sys
import jax
from lmpipeline.backends.jaxlm.memory import compiled_memory, parameter_count, qwen2_5_7b
from lmpipeline.backends.jaxlm.decoding import round_up
from lmpipeline.config import preset

assert jax.device_count() == 8
spec = preset("tpu").finetune
width = round_up(spec.max_seq_len, 32)
result = compiled_memory(qwen2_5_7b(), spec, width=width)
result["parameters"] = parameter_count(qwen2_5_7b())
print(json.dumps(result))
"""


def on_eight_devices(script: str) -> dict:
    """Run ``script`` where JAX sees eight CPU devices; its last printed line, as JSON."""
    tests = str(Path(__file__).parent)
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        # The last two flags halve the compile time; they tune LLVM's code generation, which
        # runs after XLA has assigned the buffers, so the byte counts are unchanged.
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
        " --xla_llvm_disable_expensive_passes=true",
        "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny():
    return on_eight_devices(TINY)


def test_argument_bytes_are_each_devices_shards_of_weights_optimizer_state_and_batch(tiny):
    hand = tiny["hand"]
    for width, m in tiny["tiny"].items():
        width = int(width)
        assert (m["devices"], m["micro_batch"], m["rows_per_device"]) == (8, 24, 3)
        batch = 3 * 24 * width * (4 + 4 + 1)  # ids, labels (int32) and valid (bool)
        # Every array splits in eight; LoRA weights, Adam's two moments, and the batch.
        sharded = (hand["frozen_bytes"] + 3 * hand["lora_bytes"] + batch) // 8
        scalars = m["argument_bytes"] - sharded  # Adam's step count, the loss denominator
        assert 0 < scalars <= 64, (m["argument_bytes"], sharded)
        assert m["output_bytes"] >= 3 * hand["lora_bytes"] // 8  # new LoRA weights and moments
        total = m["argument_bytes"] + m["output_bytes"] - m["alias_bytes"] + m["temp_bytes"]
        assert m["total_bytes"] == total + m["generated_code_bytes"]


def test_temporaries_grow_with_the_row_width(tiny):
    narrow, wide = tiny["tiny"]["32"], tiny["tiny"]["64"]
    assert wide["temp_bytes"] > 1.5 * narrow["temp_bytes"]


def test_padding_the_micro_batch_to_the_device_count_splits_it_and_changes_no_number(tiny):
    plain, padded = tiny["padding"]["1"], tiny["padding"]["8"]
    assert plain["batch_shard"] == [2, 3, plain["batch_shard"][2]]  # 3 rows: on every device
    assert padded["batch_shard"] == [2, 1, plain["batch_shard"][2]]  # padded to 8: one row each
    assert len(plain["loss"]) == 2
    assert padded["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert padded["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-5)
    # Adam divides by the gradient's size: rounding in a near-zero gradient's sum (its rows
    # summed in other groups) moves that weight by up to about 1e-3 of a step (lr 1e-2).
    for name, pair in plain["lora"].items():
        for ours, theirs in zip(padded["lora"][name], pair):
            np.testing.assert_allclose(ours, theirs, atol=2e-5)
    assert plain["loss"][-1] < plain["loss"][0]  # it trained


@pytest.fixture(scope="module")
def qwen_7b():
    return on_eight_devices(SEVEN_B)


def test_qwen2_5_7b_lora_step_per_device_memory_on_eight_devices(qwen_7b, record_property):
    m = qwen_7b
    print(json.dumps(m))
    record_property("qwen2_5_7b_lora_total_gb_per_device", m["total_bytes"] / GB)
    assert (m["devices"], m["micro_batch"], m["rows_per_device"], m["width"]) == (8, 24, 3, 512)
    assert m["parameters"] == 7_615_616_512
    weights = 2 * m["parameters"] / 8  # bfloat16, split in eight
    assert weights <= m["argument_bytes"] < 1.1 * weights


# Measured with jax 0.10.2 on CPU devices (docs/benchmarks/jax_7b_memory.json): 45.0 GB per
# device, 43.0 GB of it temporaries. GSPMD keeps the frozen weights split and gathers the
# activations instead: each device computes every row of the micro-batch on its slice of the
# hidden features, and converts the whole 3584 x 152064 output head to float32 (2.2 GB).
@pytest.mark.xfail(strict=True, reason="measured 45.0 GB per device for width 512, over a v4 chip's 32 GB")
def test_qwen2_5_7b_lora_step_fits_a_v4_chip(qwen_7b):
    assert qwen_7b["total_bytes"] <= 32 * GB


@pytest.mark.xfail(strict=True, reason="measured 45.0 GB per device for width 512, over a v5e chip's 16 GB")
def test_qwen2_5_7b_lora_step_fits_a_v5e_chip(qwen_7b):
    assert qwen_7b["total_bytes"] <= 16 * GB
