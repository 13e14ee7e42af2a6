"""Finetuning checkpoints: an interrupted run, started again, ends where an uninterrupted one does.

Both backends, LoRA and full finetuning, on a tiny random Llama (2 layers, width 64). The
torch LoRA run uses dropout, so its random stream must be restored too.
"""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("jax")

from safetensors.numpy import load_file  # noqa: E402
from tiny_lm import tiny_checkpoint  # noqa: E402

from lmpipeline.backends import TrainExample, make_backend  # noqa: E402
from lmpipeline.config import FinetuneSpec, ModelSpec  # noqa: E402

EXAMPLES = [TrainExample([{"role": "user", "content": f"Count from {k}"}], f"{k}, {k + 1}, {k + 2}") for k in range(12)]
# 12 rows in steps of 4: 3 steps an epoch, 6 in all; checkpoints after steps 2 and 4.
FT = FinetuneSpec(epochs=2, micro_batch=2, grad_accum=2, warmup_steps=1, learning_rate=1e-2, checkpoint_every=2)


class Interrupted(Exception):
    pass


def stop_after(step: int):
    def progress(done: int, total: int, tokens: int) -> None:
        if done == step:
            raise Interrupted

    return progress


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("llama"))


def saved_weights(folder) -> dict[str, np.ndarray]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    assert out, f"no weights saved in {folder}"
    return out


@pytest.mark.parametrize("backend, method", [("hf", "lora"), ("hf", "full"), ("jax", "lora"), ("jax", "full")])
def test_an_interrupted_finetune_resumes_to_the_uninterrupted_result(tiny, tmp_path, backend, method):
    spec = ModelSpec(str(tiny), dtype="float32", device="cpu", backend=backend)
    ft = replace(FT, method=method, lora_dropout=0.2 if (backend, method) == ("hf", "lora") else 0.0)
    straight = make_backend(spec).finetune(spec, EXAMPLES, ft, tmp_path / "straight", seed=3)
    checkpoint = tmp_path / "checkpoint"
    with pytest.raises(Interrupted):
        make_backend(spec).finetune(
            spec, EXAMPLES, ft, tmp_path / "cut", seed=3, checkpoint=checkpoint, progress=stop_after(5)
        )
    assert [p.name for p in checkpoint.iterdir()] == ["step-000004"]  # the older one is gone
    steps = []
    resumed = make_backend(spec).finetune(
        spec,
        EXAMPLES,
        ft,
        tmp_path / "resumed",
        seed=3,
        checkpoint=checkpoint,
        progress=lambda d, t, n: steps.append(d),
    )
    assert resumed["resumed_at_step"] == 4 and steps == [4, 5, 6]
    np.testing.assert_allclose(resumed["loss"], straight["loss"], rtol=1e-5)
    assert resumed["n_tokens"] == straight["n_tokens"]
    ours, theirs = saved_weights(tmp_path / "resumed"), saved_weights(tmp_path / "straight")
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], atol=1e-6, err_msg=name)


@pytest.mark.parametrize("backend", ["hf", "jax"])
def test_only_a_checkpoint_of_the_same_run_is_resumed(tiny, tmp_path, backend):
    spec = ModelSpec(str(tiny), dtype="float32", device="cpu", backend=backend)
    saved = tmp_path / "saved"
    with pytest.raises(Interrupted):
        make_backend(spec).finetune(
            spec, EXAMPLES, FT, tmp_path / "a", seed=3, checkpoint=saved, progress=stop_after(3)
        )
    variants = {
        "seed": (EXAMPLES, FT, 4, None),
        "rows": (EXAMPLES[:8], FT, 3, None),
        "learning rate": (EXAMPLES, replace(FT, learning_rate=2e-2), 3, None),
        "checkpoint_every (speed only)": (EXAMPLES, replace(FT, checkpoint_every=5), 3, 2),
    }
    for k, (name, (examples, ft, seed, expected)) in enumerate(variants.items()):
        checkpoint = shutil.copytree(saved, tmp_path / f"copy{k}")
        log = make_backend(spec).finetune(spec, examples, ft, tmp_path / f"out{k}", seed=seed, checkpoint=checkpoint)
        assert log.get("resumed_at_step") == expected, name
        assert len(log["loss"]) == log["steps"], name
