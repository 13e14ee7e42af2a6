"""Optional vLLM backend: fast sampling on GPUs; scoring and training use the torch backend.

vLLM is imported only when this backend is made (``model.backend=vllm``, or ``auto`` on a
CUDA machine where it is installed); nothing else in the package needs it. LoRA students
are served with ``LoRARequest``; fully finetuned students get an engine of their own.
Grammar-constrained number lists use vLLM's regex-structured outputs with the regular
expression of :class:`lmpipeline.grammar.NumberListGrammar`.

The engine takes ``model.vllm_gpu_memory_utilization`` of the GPU, leaving the rest to the
torch backend that trains the students in the same process.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lmpipeline.backends import Conversation, Generation, ModelRef, ProgressFn, TrainExample
from lmpipeline.backends.hf import HFBackend, locate_model
from lmpipeline.config import FinetuneSpec, ModelSpec, derive_seed
from lmpipeline.grammar import NumberListGrammar


def _structured(regex: str) -> dict:
    """SamplingParams keyword for a regex constraint, across vLLM versions."""
    try:
        from vllm.sampling_params import StructuredOutputsParams  # vLLM >= 0.11

        return {"structured_outputs": StructuredOutputsParams(regex=regex)}
    except ImportError:
        from vllm.sampling_params import GuidedDecodingParams

        return {"guided_decoding": GuidedDecodingParams(regex=regex)}


class VLLMBackend:
    name = "vllm"

    def __init__(self, spec: ModelSpec):
        import vllm  # noqa: F401  (fail now, with the install hint, if it is missing)

        self.spec = spec
        self._engines: dict[str, object] = {}
        self._lora_ids: dict[str, int] = {}
        self._torch = HFBackend(spec)

    def _engine(self, ref: ModelRef):
        from vllm import LLM

        source = ref.weights or locate_model(ref.base)[0]
        if source not in self._engines:
            self._engines.clear()  # one engine on the GPU at a time
            self._engines[source] = LLM(
                model=source,
                dtype=ref.base.dtype,
                enable_lora=ref.weights is None,
                max_lora_rank=64,
                gpu_memory_utilization=ref.base.vllm_gpu_memory_utilization,
                seed=0,
            )
        return self._engines[source]

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
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        extra = {}
        if number_grammar is not None:
            grammar = NumberListGrammar(max_count=number_grammar[0], max_digits=number_grammar[1])
            extra = _structured(grammar.regex())
            max_new_tokens = max(max_new_tokens, grammar.max_chars + 1)
        params = [
            SamplingParams(temperature=temperature, top_p=1.0, top_k=-1, max_tokens=max_new_tokens, seed=derive_seed(seed, i), **extra)
            for i in range(len(conversations))
        ]
        lora = None
        if model.adapter is not None:
            lora_id = self._lora_ids.setdefault(model.adapter, len(self._lora_ids) + 1)
            lora = LoRARequest(f"adapter{lora_id}", lora_id, model.adapter)
        outputs = self._engine(model).chat(list(conversations), params, lora_request=lora, use_tqdm=False)
        return [Generation(o.outputs[0].text, len(o.outputs[0].token_ids)) for o in outputs]

    def score(self, model: ModelRef, conversations: Sequence[Conversation], continuations: Sequence[str]) -> list[float]:
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
    ) -> dict:
        return self._torch.finetune(base, examples, spec, out_dir, seed=seed, progress=progress)

    def close(self) -> None:
        self._engines.clear()
        self._torch.close()
