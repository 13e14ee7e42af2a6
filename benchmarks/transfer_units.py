"""Each unit of a finished transfer study against its FLOP floor on this CPU.

The study (``sublearn lm transfer``) spends its time in four kinds of unit: finetuning a
teacher, evaluating it, distilling a student and evaluating the student. For each kind
this script counts the floating-point work the unit cannot avoid, from the model's shapes
and the unit's own token counts, and divides it by the bfloat16 matrix-multiply rate of one
core measured here, in this process (``torch.mm`` at the shapes of the model's
projections, one thread): that is the unit's floor, the time it would take if every
cycle did useful matrix work. The ratio floor / measured wall time is the share of one
core's peak the unit reaches (1.0 is the floor).

Work counted, with :math:`N` the parameters of the decoder blocks (attention and MLP
projections), :math:`d` the width and :math:`V` the vocabulary:

- a forward pass over :math:`T` tokens: :math:`2NT`, plus :math:`2dV` for each position
  whose next-token logits are needed;
- training: three times the forward (forward, and backward for activations and weights),
  the logits only at the completion positions; soft distillation adds the teacher's
  forward pass;
- evaluation: each question's prompt once, the tokens of every multi-token answer form
  but the last (one pass per distinct prefix), logits at the prompt's last position and
  after each prefix; and the sampled answers, prompt and new tokens.

Attention's own products (a few percent at these lengths) and elementwise work are left
out, so the floor is a lower bound. Unit times come from the study's records, which it
measured as it ran (with ``transfer.workers`` units at a time, one per core).

Usage::

    python benchmarks/transfer_units.py --study runs/transfer --out docs/benchmarks/transfer_units_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

from lmpipeline.artifacts import versions
from lmpipeline.config import from_dict
from lmpipeline.words import prefix_free, surface_forms
from sublearn._common import write_json


def matmul_peak_gflops(shapes: list[tuple[int, int, int]], seconds: float = 1.0) -> float:
    """bfloat16 ``torch.mm`` rate of one thread at ``shapes`` (mean over them), in GFLOP/s."""
    import torch

    torch.set_num_threads(1)
    rates = []
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(k, n, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            reps += 1
        rates.append(2 * m * k * n * reps / (time.perf_counter() - start) / 1e9)
    return statistics.fmean(rates)


def model_shapes(config) -> dict:
    """Width, vocabulary and decoder-block parameters of a Llama-family config."""
    d, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    kv = config.num_key_value_heads * head_dim
    block = d * heads * head_dim * 2 + 2 * d * kv + 3 * d * config.intermediate_size
    return {"width": d, "vocab": config.vocab_size, "block_params": config.num_hidden_layers * block}


def training_flops(log: dict, shapes: dict, soft: bool) -> float:
    n, head = shapes["block_params"], 2 * shapes["width"] * shapes["vocab"]
    tokens, positions = log["n_tokens"], log["n_completion_tokens"]
    student = 3 * (2 * n * tokens + head * positions)
    return student + (2 * n * tokens + head * positions if soft else 0.0)


def evaluation_flops(tokenizer, conversations, words, answers: int, new_tokens: int, shapes: dict) -> float:
    from lmpipeline.backends.tokens import prompt_text

    n, head = shapes["block_params"], 2 * shapes["width"] * shapes["vocab"]
    forms = sorted({f for w in words for f in surface_forms(w)})
    ids = {f: tokenizer(f, add_special_tokens=False)["input_ids"] for f in forms}
    kept = {f for w in words for f in prefix_free({f: ids[f] for f in surface_forms(w)})}
    bodies = {tuple(ids[f][:-1]) for f in kept if len(ids[f]) > 1}
    body_tokens = sum(len(b) for b in bodies)
    total = 0.0
    for conversation in conversations:
        prompt = len(tokenizer(prompt_text(tokenizer, conversation), add_special_tokens=False)["input_ids"])
        total += 2 * n * (prompt + body_tokens) + head * (1 + body_tokens)
        total += answers * (2 * n * (prompt + new_tokens) + head * new_tokens)
    return total


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, required=True, help="a finished study folder")
    parser.add_argument("--out", type=Path, help="write the report here (JSON)")
    args = parser.parse_args(argv)

    from transformers import AutoConfig, AutoTokenizer

    from lmpipeline.backends.tokens import locate_model
    from lmpipeline.transfer import Study

    config = from_dict(json.loads((args.study / "config.json").read_text()))
    name, gguf = locate_model(config.model)
    extra = {"gguf_file": gguf} if gguf else {}
    shapes = model_shapes(AutoConfig.from_pretrained(name, **extra))
    tokenizer = AutoTokenizer.from_pretrained(name, **extra)
    study = Study(config, args.study)
    report = json.loads((args.study / "report.json").read_text())
    d, ff = shapes["width"], AutoConfig.from_pretrained(name, **extra).intermediate_size
    rows = 4 * 150  # a training micro-batch's tokens
    peak = matmul_peak_gflops([(rows, d, ff), (rows, ff, d), (rows, d, d)])

    units: dict[str, list[dict]] = {
        "teacher_training": [],
        "teacher_evaluation": [],
        "student": [],
        "student_training": [],
    }
    conversations = [[{"role": "user", "content": q}] for q in study.questions]
    e, t = config.evaluate, config.transfer
    for path in sorted(args.study.glob("seed-*/*.json")):
        record = json.loads(path.read_text())
        name = path.stem
        if name.startswith("teacher-") and "train" in record:
            flops = training_flops(record["train"], shapes, soft=False)
            units["teacher_training"].append({"unit": name, "wall_s": record["wall_s"], "flops": flops})
        elif name.startswith("teacher-") and name.endswith("-eval"):
            flops = evaluation_flops(tokenizer, conversations, t.targets, t.sampled_answers, e.max_new_tokens, shapes)
            units["teacher_evaluation"].append({"unit": name, "wall_s": record["wall_s"], "flops": flops})
        elif name.startswith(("student-", "control-")):
            soft = record["train"].get("objective", "soft") == "soft"
            train = training_flops(record["train"], shapes, soft)
            evaluation = evaluation_flops(
                tokenizer, conversations, t.animals, t.sampled_answers, e.max_new_tokens, shapes
            )
            units["student"].append({"unit": name, "wall_s": record["wall_s"], "flops": train + evaluation})
            units["student_training"].append({"unit": name, "wall_s": record["train"]["wall_s"], "flops": train})
    summary = {}
    for kind, items in units.items():
        if not items:
            continue
        wall = statistics.fmean(u["wall_s"] for u in items)
        flops = statistics.fmean(u["flops"] for u in items)
        floor = flops / (peak * 1e9)
        summary[kind] = {
            "n": len(items),
            "mean_wall_s": wall,
            "mean_gflop": flops / 1e9,
            "floor_s": floor,
            "ratio_floor_to_wall": floor / wall,
        }
    unit_seconds = report["wall_s"]["total"]
    out = {
        "study": str(args.study),
        "preset": config.preset,
        "workers": t.workers,
        "model_shapes": shapes,
        "one_core_bf16_matmul_gflops": peak,
        "units": summary,
        "study_wall_s": report.get("wall_s_this_session"),
        "unit_seconds": unit_seconds,
        "units_per_wall_second": unit_seconds / report["wall_s_this_session"]
        if report.get("wall_s_this_session")
        else None,
        "versions": versions(),
    }
    for kind, s in summary.items():
        print(
            f"{kind:20s} n={s['n']:3d}  {s['mean_wall_s']:7.1f} s  {s['mean_gflop']:8.0f} GFLOP  "
            f"floor {s['floor_s']:6.1f} s  floor/wall {s['ratio_floor_to_wall']:.2f}"
        )
    print(f"one core's bf16 matmul: {peak:.0f} GFLOP/s; unit-seconds per wall second: {out['units_per_wall_second']}")
    if not math.isfinite(peak):
        raise SystemExit("benchmarks/transfer_units.py: the matmul rate could not be measured")
    if args.out:
        write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
