"""The backend interface: everything the stages ask of a model library.

The stages only build prompts, read and write files and call these methods, with
plain Python values (conversations are lists of ``{"role", "content"}`` dicts), so a new
backend (JAX on TPUs, say) is one class registered in :data:`BACKENDS`.

- ``generate``: sample one completion per conversation, the chat template applied with a
  generation prompt, optionally constrained to number lists (:mod:`lmpipeline.grammar`).
- ``score``: the log-probability of a continuation right after the generation prompt.
- ``finetune``: train on (conversation, completion) pairs, loss on completion tokens only,
  and save the result (a LoRA adapter or full weights) to a folder.
- ``tokenize``: token ids of texts, so callers can tell which continuations overlap.
- ``prepare``: load a model ahead of use; ``close``: release models and memory.

Implementations: :class:`lmpipeline.backends.hf.HFBackend` (transformers, peft, torch;
everything), :class:`lmpipeline.backends.vllm.VLLMBackend` (vLLM for fast sampling on
GPUs; scoring and training go to the torch backend) and
:class:`lmpipeline.backends.jaxlm.backend.JaxBackend` (JAX, Flax NNX and optax; everything,
on CPUs, GPUs and TPUs, without torch) and
:class:`lmpipeline.backends.openai_api.OpenAIBackend` (an OpenAI-compatible API: sampling
and finetuning jobs, no scoring).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lmpipeline.config import ConfigError, FinetuneSpec, ModelSpec

Message = dict[str, str]
Conversation = list[Message]
# progress(done, total, tokens): called as work advances (rows or steps, and tokens).
ProgressFn = Callable[[int, int, int], None]


STEERING_MODES = ("add", "ablate")


@dataclass(frozen=True)
class Steering:
    """An edit of the residual stream at the output of decoder layer ``layer`` (counted from
    0), at every position of every forward pass (:mod:`lmpipeline.steering`). With the
    layer's output ``h`` and ``u = vector / |vector|``:

    - ``add``: ``h + alpha * vector`` (a steered model);
    - ``ablate``: ``h - alpha * (h . u) u``, the component along ``vector`` projected out
      (``alpha = 1``: all of it). A zero vector has no direction and ablates nothing.
    """

    layer: int
    vector: tuple[float, ...]
    alpha: float = 1.0
    mode: str = "add"

    def __post_init__(self) -> None:
        if self.mode not in STEERING_MODES:
            raise ConfigError(f"steering mode {self.mode!r} is not one of {', '.join(STEERING_MODES)}")


@dataclass(frozen=True)
class ModelRef:
    """A model to run: the base model, optionally with a LoRA adapter or replaced weights,
    and residual-stream edits applied in order (torch backend only)."""

    base: ModelSpec
    adapter: str | None = None  # folder of a peft adapter
    weights: str | None = None  # folder of fully finetuned weights (and tokenizer)
    steering: tuple[Steering, ...] = ()


@dataclass(frozen=True)
class Generation:
    text: str
    n_tokens: int  # generated tokens, end of sequence included when it was produced


@dataclass(frozen=True)
class TrainExample:
    messages: Conversation  # what the student sees
    completion: str
    # What the teacher sees when the objective is soft distillation (its trait system
    # prompt, say); None: the same messages as the student.
    teacher_messages: Conversation | None = None


class Backend(Protocol):
    name: str
    # True for a backend that batches requests itself (vLLM's continuous batching): the
    # pipeline then passes all of a sampling stage's prompts in one ``generate`` call.
    # Optional; a backend without the attribute gets ``generate.batch_size`` at a time.
    stage_at_once: bool

    def prepare(self, model: ModelRef) -> None:
        """Load what ``model`` needs now, so that later timings exclude loading."""
        ...

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
        """One sample per conversation, by pure temperature sampling (greedy at 0): no
        top-k, top-p or penalties, whatever the model's own generation config says.
        ``number_grammar=(max_count, max_digits)`` constrains the output to a number list
        of those limits."""
        ...

    def score(
        self, model: ModelRef, conversations: Sequence[Conversation], continuations: Sequence[str]
    ) -> list[float]:
        """Natural-log probability of each continuation after its conversation's generation prompt."""
        ...

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
        """Train a student of ``base`` and save it to ``out_dir`` (a peft adapter for LoRA, full
        weights and tokenizer otherwise); returns the training log (losses, steps, timing).
        ``spec.objective=soft`` distils ``teacher``'s next-token distributions instead of
        fitting the completion tokens. With ``checkpoint`` (a folder), the trainer's state is
        saved there every ``spec.checkpoint_every`` steps and a matching saved state is
        resumed (:mod:`lmpipeline.backends.checkpoints`); the caller removes the folder."""
        ...

    def tokenize(self, model: ModelRef, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text as a continuation (no special tokens)."""
        ...

    def close(self) -> None: ...


BACKENDS = {
    "hf": "lmpipeline.backends.hf:HFBackend",
    "vllm": "lmpipeline.backends.vllm:VLLMBackend",
    "jax": "lmpipeline.backends.jaxlm.backend:JaxBackend",
    "openai": "lmpipeline.backends.openai_api:OpenAIBackend",
}
EXTRAS = {"hf": "lm", "vllm": "vllm", "jax": "jax-lm", "openai": "openai"}  # the install extra each backend needs


def resolve_backend_name(spec: ModelSpec) -> str:
    """``auto`` picks vLLM on CUDA when it is installed, JAX when torch is not installed and
    JAX sees a TPU (or ``model.device=tpu``), else transformers."""
    if spec.backend != "auto":
        return spec.backend
    if spec.device == "tpu" or (importlib.util.find_spec("torch") is None and _jax_platform() == "tpu"):
        return "jax"
    if spec.device in ("cuda", "auto") and importlib.util.find_spec("vllm") is not None:
        import torch

        if torch.cuda.is_available():
            return "vllm"
    return "hf"


def make_backend(spec: ModelSpec) -> Backend:
    """Instantiate the backend that ``spec.backend`` names (imports it only now)."""
    name = resolve_backend_name(spec)
    module_name, _, cls_name = BACKENDS[name].partition(":")
    try:  # a backend imports its library when made, so a missing one surfaces here
        return getattr(importlib.import_module(module_name), cls_name)(spec)
    except ImportError as error:
        extra = EXTRAS[name]
        raise ConfigError(
            f"model.backend={name}: the backend needs {error.name}; "
            f"install it with `pip install -e '.[{extra}]'` in the package's checkout"
        ) from None


def _jax_platform() -> str:
    import jax

    return jax.default_backend()
