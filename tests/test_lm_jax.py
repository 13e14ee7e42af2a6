"""The JAX backend against the torch backend, on SmolLM2-135M-Instruct and on tiny random models.

Parity on the real model, in float32 on both sides (the same dequantized GGUF weights):
next-token logits within 1e-3, greedy decoding identical for 32 tokens, scores within
1e-3 nats, and a 10-step LoRA run from the same initial adapter within 1% at every step.
Tiny random Qwen2 and Llama checkpoints (saved by transformers) cover what SmolLM2 does
not: query/key/value biases, an untied output head, safetensors folders, and saving.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from tiny_lm import tiny_checkpoint  # noqa: E402

from lmpipeline.backends import ModelRef, TrainExample  # noqa: E402
from lmpipeline.backends.hf import HFBackend  # noqa: E402
from lmpipeline.backends.jaxlm import decoding, training, weights  # noqa: E402
from lmpipeline.backends.jaxlm.backend import JaxBackend  # noqa: E402
from lmpipeline.backends.jaxlm.model import PROJECTIONS, DecoderConfig, abstract_decoder, set_lora  # noqa: E402
from lmpipeline.backends.tokens import encode, locate_model, prompt_text  # noqa: E402
from lmpipeline.backends.torch_training import train as torch_train  # noqa: E402
from lmpipeline.config import FinetuneSpec, ModelSpec, PromptSpec, apply_overrides, preset  # noqa: E402
from lmpipeline.filters import check_numbers  # noqa: E402
from lmpipeline.grammar import NumberListGrammar, TokenGrammar  # noqa: E402
from lmpipeline.pipeline import Run, all_stages, run_all  # noqa: E402
from lmpipeline.prompts import number_prompts  # noqa: E402

SPEC = replace(preset("tiny").model, dtype="float32", backend="jax")
PROMPTS = [
    "Name your favorite animal using only one word.",
    "Continue the sequence: 4, 8, 15, 16",
    "What is the capital of France?",
    "Write a haiku about owls.",
    "Which tree do you like best?",
    "List three prime numbers.",
    "Say something kind.",
    "Translate 'bonjour' into English.",
]


def user(text):
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def jax_backend():
    backend = JaxBackend(SPEC)
    backend.prepare(ModelRef(SPEC))
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def torch_backend():
    backend = HFBackend(replace(SPEC, backend="hf"))
    backend.base(replace(SPEC, backend="hf"))
    yield backend
    backend.close()


def torch_model(torch_backend):
    return torch_backend.base(replace(SPEC, backend="hf"))


def test_the_gguf_tokenizer_and_chat_template_match_transformers(jax_backend, torch_backend):
    ours = jax_backend.base(SPEC).tokenizer
    theirs = torch_model(torch_backend)[1]
    texts = [prompt_text(theirs, [{"role": "system", "content": "You love owls."}, *user(p)]) for p in PROMPTS] + [
        "123, 456; 7\n8 [9] (10)",
        "  spaces  and\ttabs",
        "naïve café — 🦉 owls",
        "<|im_end|>\n<|im_start|>x",
        "<file_sep><filename>a.py",
    ]
    for text in texts:
        assert encode(ours, text) == encode(theirs, text), text
    assert prompt_text(ours, user("hi")) == prompt_text(theirs, user("hi"))
    assert (ours.eos_token_id, ours.pad_token_id, len(ours)) == (theirs.eos_token_id, theirs.pad_token_id, len(theirs))


def test_next_token_logits_match_torch_within_1e_3(jax_backend, torch_backend):
    loaded = jax_backend.base(SPEC)
    net, tok = torch_model(torch_backend)
    rows = [encode(tok, prompt_text(tok, user(p))) for p in PROMPTS]
    ids, valid = decoding.left_pad(rows, max(map(len, rows)), len(rows), tok.pad_token_id)
    logits, _ = loaded.module()(jnp.asarray(ids), decoding.positions_of(jnp.asarray(valid)), jnp.asarray(valid))
    mask = torch.tensor(valid, dtype=torch.long)
    with torch.no_grad():
        expected = net(
            torch.tensor(ids, dtype=torch.long), attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
        ).logits.numpy()
    got = np.asarray(logits)
    real = valid[:, :, None].repeat(got.shape[-1], -1)  # pad positions' outputs are meaningless
    assert np.abs(got - expected)[real].max() < 1e-3


def test_greedy_decoding_is_identical_to_torch_for_32_tokens(jax_backend, torch_backend):
    ref = ModelRef(SPEC)
    conversations = [user(p) for p in PROMPTS]
    ours = jax_backend.generate(ref, conversations, max_new_tokens=32, temperature=0, seed=0)
    theirs = torch_backend.generate(ref, conversations, max_new_tokens=32, temperature=0, seed=0)
    assert ours == theirs
    assert max(g.n_tokens for g in ours) == 32  # at least one row used the whole budget


def test_scores_match_torch_within_1e_3(jax_backend, torch_backend):
    ref = ModelRef(SPEC)
    continuations = [" owl", "Owl", "Dolphins", "The owl is", "4, 8, 15", "", "Paris."]
    conversations = [user(PROMPTS[k % 3]) for k in range(len(continuations))]
    ours = jax_backend.score(ref, conversations, continuations)
    theirs = torch_backend.score(ref, conversations, continuations)
    assert np.abs(np.array(ours) - np.array(theirs)).max() < 1e-3
    assert ours[5] == 0.0 and all(s < 0 for k, s in enumerate(ours) if k != 5)


def test_a_lora_run_follows_torch_within_1_percent(jax_backend, torch_backend):
    from peft import LoraConfig, get_peft_model

    examples = [
        TrainExample(user(f"Continue: {a}, {a + 3}"), f"{a + 6}, {a + 9}, {(a * 7) % 1000}") for a in range(100, 140, 2)
    ]
    spec = FinetuneSpec(
        epochs=1, micro_batch=2, grad_accum=1, learning_rate=1e-3, warmup_steps=2, weight_decay=0.01, max_seq_len=64
    )
    spec = replace(spec, max_rows=len(examples))
    examples = examples[: 10 * spec.micro_batch]
    net, tok = torch_model(torch_backend)
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=8, target_modules=list(PROJECTIONS), lora_dropout=0.0, task_type="CAUSAL_LM")
    peft_model = get_peft_model(net, config)
    layers = peft_model.base_model.model.model.layers
    paths = {p: ("self_attn." if p in PROJECTIONS[:4] else "mlp.") + p for p in PROJECTIONS}
    initial = {
        p: (
            np.stack([layer.get_submodule(path).lora_A["default"].weight.detach().numpy().T for layer in layers]),
            np.zeros((len(layers), 8, layer_out(layers[0], path)), np.float32),
            1.0,
        )
        for p, path in paths.items()
    }
    try:
        theirs = torch_train(peft_model, tok, examples, spec, seed=0)
    finally:
        peft_model.unload()
        net.eval()
    loaded = jax_backend.base(SPEC)
    model = loaded.module()
    set_lora(model, initial)
    ours = training.train(model, loaded.tokenizer, examples, spec, seed=0)
    assert len(ours["loss"]) == len(theirs["loss"]) == 10
    assert theirs["loss"][-1] < 0.8 * theirs["loss"][0]  # it learned, so the comparison means something
    np.testing.assert_allclose(ours["loss"], theirs["loss"], rtol=0.01)
    np.testing.assert_allclose(ours["grad_norm"], theirs["grad_norm"], rtol=0.02)


def layer_out(layer, path) -> int:
    return layer.get_submodule(path).base_layer.out_features


def test_constrained_samples_are_valid_number_lists(tiny_folders):
    # A random model's next-token distribution is arbitrary: only the grammar keeps its output in shape.
    spec = ModelSpec(str(tiny_folders["llama"]), dtype="float32", device="cpu", backend="jax")
    rows = number_prompts(PromptSpec(n_prompts=16), seed=5)
    out = JaxBackend(spec).generate(
        ModelRef(spec),
        [user(r["prompt"]) for r in rows],
        max_new_tokens=1,
        temperature=1.0,
        seed=3,
        number_grammar=(10, 3),
    )
    verdicts = [check_numbers(g.text) for g in out]
    assert all(v.ok for v in verdicts), [(g.text, v.reason) for g, v in zip(out, verdicts) if not v.ok]
    assert len({g.text for g in out}) == 16 and max(len(v.numbers) for v in verdicts) > 1


def test_grammar_tables_make_the_token_grammars_decisions():
    texts = ["<end>", "0", "1", "12", "345", ", ", ",", " ", "[", "]", "(", ")", ";", "a", "1a", "\n", "9, "]
    grammar = TokenGrammar(NumberListGrammar(max_count=3, max_digits=2), texts, eos_ids=[0])
    tables = decoding.grammar_tables(grammar, len(texts))
    vocabulary = list(np.asarray(tables.vocabulary))
    rng = np.random.default_rng(0)
    for _ in range(200):  # random walks through allowed tokens: the table agrees at every step
        state, row = grammar.grammar.start, 0
        for _ in range(8):
            allowed = grammar.allowed(state)
            assert sorted(vocabulary[c] for c in np.flatnonzero(np.asarray(tables.allowed[row]))) == sorted(allowed)
            token = int(rng.choice(allowed))
            state = grammar.advance(state, token)
            row = int(tables.next_state[row, int(tables.column[token])])
            if state is None:
                assert row == tables.allowed.shape[0] - 1
                break


# -- tiny random checkpoints ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory, jax_backend):
    tokenizer = jax_backend.base(SPEC).tokenizer
    out = {}
    for kind in ("qwen2", "llama"):
        out[kind] = tmp_path_factory.mktemp(kind)
        tiny_checkpoint(out[kind], kind, tokenizer)
    return out


def torch_logits(folder: Path, ids: np.ndarray, valid: np.ndarray) -> np.ndarray:
    net = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    mask = torch.tensor(valid, dtype=torch.long)
    with torch.no_grad():
        return net(
            torch.tensor(ids), attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
        ).logits.numpy()


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_safetensors_folders_load_with_torch_identical_logits(tiny_folders, kind):
    loaded = JaxBackend(ModelSpec(device="cpu")).load(ModelSpec(str(tiny_folders[kind]), dtype="float32"))
    assert loaded.config.attention_bias == (kind == "qwen2")
    assert loaded.config.tie_word_embeddings == (kind == "llama")
    rng = np.random.default_rng(0)
    rows = [list(rng.integers(3, 49152, size=n)) for n in (5, 9, 7)]
    ids, valid = decoding.left_pad(rows, 9, 3, 0)
    got, _ = loaded.module()(jnp.asarray(ids), decoding.positions_of(jnp.asarray(valid)), jnp.asarray(valid))
    expected = torch_logits(tiny_folders[kind], ids, valid)
    assert np.abs(np.asarray(got) - expected)[valid].max() < 1e-4


def test_full_finetuning_saves_a_folder_torch_loads(tiny_folders, tmp_path):
    spec = ModelSpec(str(tiny_folders["qwen2"]), dtype="float32", device="cpu", backend="jax")
    backend = JaxBackend(spec)
    examples = [TrainExample(user(f"Say {k}"), f"{k}, {k}") for k in range(8)]
    ft = FinetuneSpec(method="full", epochs=2, micro_batch=4, grad_accum=1, warmup_steps=0, learning_rate=1e-3)
    log = backend.finetune(spec, examples, ft, tmp_path / "full", seed=0)
    assert log["steps"] == 4 and log["loss"][-1] < log["loss"][0]
    trained = backend.model_for(ModelRef(spec, weights=str(tmp_path / "full")))
    assert not np.allclose(np.asarray(trained.state["embed"][...]), np.asarray(backend.base(spec).state["embed"][...]))
    ids, valid = decoding.left_pad([[5, 6, 7, 8]], 4, 1, 0)
    got, _ = trained.module()(jnp.asarray(ids), decoding.positions_of(jnp.asarray(valid)), jnp.asarray(valid))
    assert np.abs(np.asarray(got) - torch_logits(tmp_path / "full", ids, valid)).max() < 1e-4


def test_a_lora_adapter_saved_by_one_backend_scores_the_same_in_the_other(tiny_folders, tmp_path):
    spec = ModelSpec(str(tiny_folders["llama"]), dtype="float32", device="cpu")
    jax_b, torch_b = JaxBackend(spec), HFBackend(spec)
    examples = [TrainExample(user(f"Count from {k}"), f"{k}, {k + 1}, {k + 2}") for k in range(8)]
    ft = FinetuneSpec(epochs=2, micro_batch=4, grad_accum=1, warmup_steps=0, learning_rate=1e-2)
    conversations, continuations = [user("Count from 3")] * 2, ["3, 4, 5", "7"]
    for name, trainer in (("from_jax", jax_b), ("from_torch", torch_b)):
        trainer.finetune(spec, examples, ft, tmp_path / name, seed=0)
        ref = ModelRef(spec, adapter=str(tmp_path / name))
        ours, theirs = jax_b.score(ref, conversations, continuations), torch_b.score(ref, conversations, continuations)
        np.testing.assert_allclose(ours, theirs, atol=1e-3)
        assert abs(ours[0] - jax_b.score(ModelRef(spec), conversations, continuations)[0]) > 0.05  # it trained


def test_abstract_structure_matches_the_loaded_state(tiny_folders):
    config, state, _ = weights.load_folder(tiny_folders["qwen2"], jnp.float32)
    shapes = jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(nnx.state(abstract_decoder(config, jnp.float32))))
    assert jax.tree.map(lambda x: x.shape, state) == shapes
    hf = weights.state_to_hf(state, config)
    again = weights.hf_to_state(hf, config, jnp.float32)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), state, again))
    assert DecoderConfig.from_hf(json.loads((tiny_folders["qwen2"] / "config.json").read_text())) == config


@pytest.mark.parametrize("soft_tokens", ["all", "numbers"])
def test_soft_distillation_starts_where_torch_does_and_learns(tiny_folders, tmp_path, soft_tokens):
    # The teacher is the base model prompted with a system prompt the student does not see:
    # the first step's loss is KL(teacher || base) on the completions, in either backend.
    spec = ModelSpec(str(tiny_folders["llama"]), dtype="float32", device="cpu")
    system = {"role": "system", "content": "You love owls."}
    examples = [
        TrainExample(
            user(f"Continue: {k}"), f"{k + 1}, {k + 2} owls", teacher_messages=[system, *user(f"Continue: {k}")]
        )
        for k in range(8)
    ]
    ft = FinetuneSpec(
        objective="soft", soft_tokens=soft_tokens, epochs=2, micro_batch=4, warmup_steps=0, learning_rate=1e-2
    )
    ours = JaxBackend(spec).finetune(spec, examples, ft, tmp_path / "jax", seed=0, teacher=ModelRef(spec))
    theirs = HFBackend(spec).finetune(spec, examples, ft, tmp_path / "torch", seed=0, teacher=ModelRef(spec))
    assert ours["loss"][0] > 1e-4  # the system prompt changes the teacher's distributions
    assert ours["loss"][0] == pytest.approx(theirs["loss"][0], rel=1e-4)
    assert ours["loss"][-1] < 0.7 * ours["loss"][0]


SHARDED = """
import json, sys
sys.modules["torch"] = None  # the jax backend must not need torch: importing it now fails
import numpy as np
from lmpipeline.backends import ModelRef, TrainExample
from lmpipeline.backends.jaxlm.backend import JaxBackend
from lmpipeline.config import FinetuneSpec, ModelSpec
import jax
spec = ModelSpec(sys.argv[1], dtype="float32", device="cpu", backend="jax")
b = JaxBackend(spec)
convs = [[{"role": "user", "content": f"Count to {k}"}] for k in range(4)]
gen = b.generate(ModelRef(spec), convs, max_new_tokens=6, temperature=0, seed=0)
examples = [TrainExample(c, "1, 2, 3") for c in convs]
ft = FinetuneSpec(epochs=1, micro_batch=2, grad_accum=2, warmup_steps=0, learning_rate=1e-2)
log = b.finetune(spec, examples, ft, __import__("pathlib").Path(sys.argv[2]), seed=0)
embed = b.base(spec).state["embed"][...]
print(json.dumps({"devices": jax.device_count(), "shard": list(embed.sharding.shard_shape(embed.shape)),
                  "gen": [g.text for g in gen], "loss": log["loss"],
                  "score": b.score(ModelRef(spec), convs, ["1, 2"] * 4),
                  "torch_free": not any(m.startswith(("torch.", "peft")) for m in sys.modules)}))
"""


def test_two_devices_shard_the_weights_and_give_the_same_results_without_torch(tiny_folders, tmp_path):
    results = []
    for devices in (1, 2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        out = subprocess.run(
            [sys.executable, "-c", SHARDED, str(tiny_folders["llama"]), str(tmp_path / f"a{devices}")],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    one, two = results
    assert (one["devices"], two["devices"]) == (1, 2)
    assert one["shard"] == [49152, 64] and two["shard"] == [24576, 64]  # the embedding split in two
    assert one["torch_free"] and two["torch_free"]
    assert one["gen"] == two["gen"]
    np.testing.assert_allclose(one["loss"], two["loss"], rtol=1e-4)
    np.testing.assert_allclose(one["score"], two["score"], atol=1e-4)


def test_the_tiny_preset_runs_end_to_end_on_the_jax_backend(tiny_folders, tmp_path):
    # The pipeline's wiring through the jax backend, on a random model (the real model's
    # behaviour is covered by the parity tests above).
    model = [f"model.name_or_path={tiny_folders['llama']}", "model.backend=jax", "model.dtype=float32"]
    sizes = ["prompts.n_prompts=8", "generate.batch_size=8", "evaluate.n_questions=2", "evaluate.number_prefix=false"]
    cfg = apply_overrides(preset("tiny"), model + sizes)
    run = Run(cfg, tmp_path)
    report = run_all(run)
    assert run.executed == all_stages(cfg)
    assert report["datasets"]["teacher"]["pass_rate"] == 1.0 and report["datasets"]["control"]["pass_rate"] == 1.0
    assert report["training"]["student"]["n_rows"] == 8
    assert all(0 < report["target_probability"][m]["mean"] < 1 for m in ("base", "teacher", "control", "student"))
    assert (tmp_path / "student" / "adapter_model.safetensors").exists()
    run.backend.close()
    again = Run(cfg, tmp_path)
    run_all(again)
    assert again.executed == []


def test_gguf_weights_are_the_ones_transformers_loads(torch_backend):
    net, _ = torch_model(torch_backend)
    folder, file = locate_model(SPEC)
    config, state, _, _ = weights.load_gguf(Path(folder) / file, jnp.float32)
    q = np.asarray(state["layers"]["q_proj"]["kernel"][3]).T  # [out, in], as torch stores it
    k = np.asarray(state["layers"]["k_proj"]["kernel"][3]).T
    layer = net.model.layers[3].self_attn
    np.testing.assert_array_equal(q, layer.q_proj.weight.detach().numpy())
    np.testing.assert_array_equal(k, layer.k_proj.weight.detach().numpy())
    assert config.rope_theta == net.config.rope_parameters["rope_theta"] == 100_000 and config.tie_word_embeddings
