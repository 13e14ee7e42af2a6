"""The transformers + peft + torch backend: sampling, scoring and finetuning.

Models load by hub name, local folder, or ``wheel:<distribution>`` (a GGUF file inside an
installed package, found through its metadata and dequantized by transformers). The base
model is loaded once per backend; a LoRA student is attached to it with peft for as long
as it is used and detached afterwards (``unload``), so the teacher, the base model and
both students share one copy of the weights. A :class:`~lmpipeline.backends.ModelRef`'s
``steering`` edits apply for the duration of each call that runs it
(:func:`lmpipeline.steering.steered`).

Generation applies the chat template with a generation prompt, pads on the left, samples
with pure temperature sampling, and seeds torch's generator per call, so a batch's samples
depend only on its prompts and its seed. Pure means the model's own generation config is
set aside: Qwen2.5-7B-Instruct's asks for top-k 20, top-p 0.8 and a repetition penalty of
1.05, which transformers would otherwise apply to every call that leaves them unset (the
penalty would lower the seed numbers' odds in the teacher's answers and the target word's
in the evaluation). See :func:`pure_sampling`.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import inspect
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessor, LogitsProcessorList

from lmpipeline.backends import Conversation, Generation, ModelRef, ProgressFn, TrainExample
from lmpipeline.backends.tokens import eos_ids, generations, locate_model, prompt_text, token_texts
from lmpipeline.backends.torch_training import completion_logits, cuda_devices, train
from lmpipeline.config import FinetuneSpec, ModelSpec
from lmpipeline.grammar import NumberListGrammar, TokenGrammar
from lmpipeline.steering import steered
from sublearn._common import ConfigError

# The oldest transformers that the package's CI runs the torch backend's tests on (beside
# the newest, and one inside vLLM's pin); it is also the floor in pyproject.toml.
OLDEST_TRANSFORMERS = (4, 56)


def check_transformers(version: str) -> None:
    """Raise :class:`ConfigError` (one line) for a transformers older than the oldest tested."""
    parts = [int(p) for p in version.split(".")[:2] if p.isdigit()]
    if len(parts) == 2 and tuple(parts) < OLDEST_TRANSFORMERS:
        oldest = ".".join(map(str, OLDEST_TRANSFORMERS))
        raise ConfigError(
            f"transformers {version} is older than {oldest}, the oldest the torch backend supports; "
            f"run `pip install 'transformers>={oldest}'`"
        )


# Bytes per parameter that finetune.method=full holds on the device: float32 weights of the
# trained copy and of the kept template (:meth:`HFBackend._float32_copy`), float32
# gradients, and AdamW's two float32 moments.
FULL_FINETUNE_BYTES_PER_PARAMETER = 4 + 4 + 4 + 8


def check_full_finetune_fits(n_params: int, device_bytes: int) -> None:
    """Raise :class:`ConfigError` (one line) if full finetuning cannot fit ``device_bytes``."""
    need = FULL_FINETUNE_BYTES_PER_PARAMETER * n_params
    if need > device_bytes:
        raise ConfigError(
            f"finetune.method=full needs about {need / 1e9:.0f} GB for {n_params / 1e9:.2f}B parameters "
            f"({FULL_FINETUNE_BYTES_PER_PARAMETER} bytes each: float32 weights, a kept copy, gradients and "
            f"AdamW's two moments) and the GPU has {device_bytes / 1e9:.0f} GB; use finetune.method=lora"
        )


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: ModelSpec) -> torch.device:
    if spec.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device=cuda but torch sees no CUDA device; use model.device=cpu")
    return torch.device(spec.device)


def load_model(spec: ModelSpec, dtype: torch.dtype | None = None, source: str | None = None):
    """Load ``(model, tokenizer)``; ``source`` (a saved folder) replaces the base's location."""
    name, gguf_file = (source, None) if source else locate_model(spec)
    kwargs: dict = {"dtype": dtype or DTYPES[spec.dtype]}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
        gguf_config = getattr(__import__("transformers"), "GgufConfig", None)
        if gguf_config is not None:  # unpack once at load: packed weights cannot be trained
            kwargs["quantization_config"] = gguf_config(dequantize=True)
    if resolve_device(spec).type == "cpu":
        # Plain attention beats torch's CPU flash kernel on the short rows used here: a
        # SmolLM2 training step of 4 rows of about 150 tokens took 10% less time.
        kwargs["attn_implementation"] = "eager"
    tokenizer = AutoTokenizer.from_pretrained(name, **({"gguf_file": gguf_file} if gguf_file else {}))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    model.to(resolve_device(spec)).eval()
    return model, tokenizer


def pure_sampling(model, temperature: float, max_new_tokens: int) -> GenerationConfig:
    """A generation config for plain sampling at ``temperature`` (greedy at 0), nothing else.

    Every setting that shapes the next-token distribution is given its neutral value, and
    the config carries only the model's special-token ids, so nothing from the model's
    generation config (top-k, top-p, min-p, repetition penalty, banned words, ...) can
    reach the logits. :func:`sample` installs it as the model's config for the call.
    """
    own = model.generation_config
    ids = {k: getattr(own, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    neutral = dict(
        top_k=0,
        top_p=1.0,
        min_p=None,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        bad_words_ids=None,
        suppress_tokens=None,
        begin_suppress_tokens=None,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
        sequence_bias=None,
        min_length=0,
        min_new_tokens=None,
        renormalize_logits=False,
        num_beams=1,
    )
    if temperature > 0:
        sampling = dict(do_sample=True, temperature=temperature)
    else:
        sampling = dict(do_sample=False, temperature=None)
    return GenerationConfig(**ids, **neutral, **sampling, max_new_tokens=max_new_tokens)


@contextlib.contextmanager
def _generation_config(net, config: GenerationConfig):
    """Make ``config`` the generation config of the transformers model inside ``net``.

    ``generate`` fills every setting left unset by the call from the model's own config,
    so replacing that config (rather than passing ours next to it) is what guarantees that
    none of the model's settings apply. ``net`` may be a peft model around the base model.
    """
    model = net.get_base_model() if hasattr(net, "get_base_model") else net
    saved = model.generation_config
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = saved


def sample(
    net,
    batch: dict,
    *,
    temperature: float,
    max_new_tokens: int,
    processors: LogitsProcessorList | None = None,
    **kwargs,
):
    """``net.generate`` on a tokenized batch with :func:`pure_sampling`; kwargs pass through."""
    config = pure_sampling(net, temperature, max_new_tokens)
    # Only the ids and the mask: some saved tokenizers also return token_type_ids, which
    # decoder-only models refuse in generate on transformers before 5.
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
    with _generation_config(net, config):
        return net.generate(**inputs, logits_processor=processors or LogitsProcessorList(), **kwargs)


class NumberListProcessor(LogitsProcessor):
    """Masks every token that would take a row out of the number-list language.

    Tracks one grammar state per row from the tokens generate appends after the prompt.
    """

    def __init__(self, grammar: TokenGrammar, batch_size: int, prompt_len: int):
        self.grammar = grammar
        self.states = [grammar.grammar.start] * batch_size
        self.prompt_len = prompt_len
        self._index_cache: dict = {}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] > self.prompt_len:
            last = input_ids[:, -1].tolist()
            self.states = [self.grammar.advance(s, t) for s, t in zip(self.states, last)]
        mask = torch.full_like(scores, float("-inf"))
        for row, state in enumerate(self.states):
            index = self._index_cache.get(state)
            if index is None:
                allowed = self.grammar.allowed(state) or self.grammar.eos_ids
                index = self._index_cache[state] = torch.tensor(allowed, dtype=torch.long, device=scores.device)
            mask[row, index] = 0.0
        return scores + mask


class HFBackend:
    """Backend on transformers, peft and torch (CPU or GPU)."""

    name = "hf"
    stage_at_once = False

    def __init__(self, spec: ModelSpec | None = None):
        check_transformers(transformers.__version__)
        if spec is not None and spec.cpu_threads is not None:
            torch.set_num_threads(spec.cpu_threads)
        self._base: dict[ModelSpec, tuple] = {}
        self._attached: tuple[str, object] | None = None  # (adapter folder, peft model)
        self._weights: tuple[str, object, object] | None = None  # (folder, model, tokenizer)
        self._grammars: dict[tuple, TokenGrammar] = {}
        self._float32: tuple | None = None  # (spec, model, tokenizer): see _float32_copy

    # -- models -----------------------------------------------------------------------
    def base(self, spec: ModelSpec):
        """The cached ``(model, tokenizer)`` of a base model (loaded on first use)."""
        if spec not in self._base:
            self._base[spec] = load_model(spec)
        return self._base[spec]

    def _detach(self) -> None:
        if self._attached is not None:
            self._attached[1].unload()  # removes the LoRA layers, the base weights untouched
            self._attached = None

    def model_for(self, ref: ModelRef):
        """``(model, tokenizer)`` ready to run ``ref``."""
        if ref.weights:
            if self._weights is None or self._weights[0] != ref.weights:
                self._weights = None
                self._weights = (ref.weights, *load_model(ref.base, source=ref.weights))
            return self._weights[1], self._weights[2]
        model, tokenizer = self.base(ref.base)
        if ref.adapter is None:
            self._detach()
            return model, tokenizer
        if self._attached is None or self._attached[0] != ref.adapter:
            from peft import PeftModel

            self._detach()
            with _quiet_peft():
                self._attached = (ref.adapter, _unfreeze(PeftModel.from_pretrained(model, ref.adapter).eval()))
        return self._attached[1], tokenizer

    def _token_grammar(self, tokenizer, model, limits: tuple[int, int]) -> TokenGrammar:
        key = (id(tokenizer), limits)
        if key not in self._grammars:
            grammar = NumberListGrammar(max_count=limits[0], max_digits=limits[1])
            self._grammars[key] = TokenGrammar(
                grammar, token_texts(tokenizer), eos_ids(tokenizer, model.generation_config.eos_token_id)
            )
        return self._grammars[key]

    # -- the interface ----------------------------------------------------------------
    def prepare(self, model: ModelRef) -> None:
        self.model_for(model)

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
        net, tokenizer = self.model_for(model)
        texts = [prompt_text(tokenizer, c) for c in conversations]
        tokenizer.padding_side = "left"
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(net.device)
        prompt_len = batch["input_ids"].shape[1]
        stop = eos_ids(tokenizer, net.generation_config.eos_token_id)
        processors = LogitsProcessorList()
        if number_grammar is not None:
            grammar = self._token_grammar(tokenizer, net, number_grammar)
            processors.append(NumberListProcessor(grammar, len(texts), prompt_len))
            # The language is finite: leave room for its longest string and the end token.
            max_new_tokens = max(max_new_tokens, grammar.grammar.max_chars + 1)
        with torch.random.fork_rng(devices=cuda_devices(net.device)), torch.no_grad(), steered(net, model.steering):
            torch.manual_seed(seed)
            out = sample(
                net,
                batch,
                temperature=temperature,
                max_new_tokens=max_new_tokens,
                processors=processors,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stop,
            )
        return generations(out[:, prompt_len:].tolist(), tokenizer, stop)

    def tokenize(self, model: ModelRef, texts: Sequence[str]) -> list[list[int]]:
        _, tokenizer = self.model_for(model)
        return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    def score(
        self, model: ModelRef, conversations: Sequence[Conversation], continuations: Sequence[str], batch_size: int = 64
    ) -> list[float]:
        """Log-probabilities by teacher forcing. Continuations of the same conversation
        share one pass over its prompt: the prompt's key-value cache is repeated for them,
        so scoring 100 answers to a question costs about one prompt and 100 short tails
        (``batch_size`` tails at a time)."""
        net, tokenizer = self.model_for(model)
        prompts = [prompt_text(tokenizer, c) for c in conversations]
        groups: dict[str, list[int]] = {}
        for i, text in enumerate(prompts):
            groups.setdefault(text, []).append(i)
        scores = [0.0] * len(prompts)
        with steered(net, model.steering):
            for text, rows in groups.items():
                prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                tails = [tokenizer(continuations[i], add_special_tokens=False)["input_ids"] for i in rows]
                for i, lp in zip(rows, _score_tails(net, prompt_ids, tails, batch_size)):
                    scores[i] = lp
        return scores

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
        observer=None,
    ) -> dict:
        """See :meth:`lmpipeline.backends.Backend.finetune`; ``observer`` goes to the training
        loop (:class:`lmpipeline.alignment.AlignmentTracker`)."""
        self._detach()
        if spec.objective == "soft" and teacher is None:
            raise ValueError("finetune.objective=soft needs a teacher model to distil from")
        tokens = None
        if spec.objective == "soft" and spec.soft_tokens == "numbers":
            model, tokenizer = self.base(base)
            ids = self._token_grammar(tokenizer, model, (10, 3)).vocabulary
            tokens = torch.tensor(ids, dtype=torch.long, device=model.device)

        def fit(model, tokenizer, teacher_fn) -> dict:
            return train(
                model,
                tokenizer,
                examples,
                spec,
                seed=seed,
                progress=progress,
                teacher=teacher_fn,
                tokens=tokens,
                checkpoint=checkpoint,
                observer=observer,
            )

        if spec.method == "full":
            # Full finetuning changes every weight: train a fresh float32 copy, keep the base.
            teacher_fn = self._teacher_fn(teacher, None) if spec.objective == "soft" else None
            device = resolve_device(base)
            if device.type == "cuda":  # refuse before loading, not with an out-of-memory error mid-way
                n_params = sum(p.numel() for p in self.base(base)[0].parameters())
                check_full_finetune_fits(n_params, torch.cuda.get_device_properties(device).total_memory)
            model, tokenizer = self._float32_copy(base)
            log = fit(model, tokenizer, teacher_fn)
            _save_full(model, tokenizer, out_dir)
            del model
            return log
        from peft import LoraConfig, get_peft_model

        if teacher is not None and teacher.adapter is not None and spec.objective == "soft":
            raise ValueError(
                "soft distillation into a LoRA student from a LoRA teacher is not supported; "
                "use finetune.method=full or a teacher with full weights"
            )
        teacher_fn = self._teacher_fn(teacher, None) if spec.objective == "soft" and teacher.weights else None
        model, tokenizer = self.base(base)
        config = LoraConfig(
            r=spec.lora_rank,
            lora_alpha=spec.lora_alpha,
            lora_dropout=spec.lora_dropout,
            target_modules=list(spec.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        with torch.random.fork_rng(devices=cuda_devices(model.device)), _quiet_peft():
            torch.manual_seed(seed)  # LoRA's A matrices are initialized randomly
            peft_model = get_peft_model(model, config)
        if spec.objective == "soft" and teacher_fn is None:  # the base model is the teacher
            teacher_fn = self._teacher_fn(teacher, peft_model)
        try:
            log = fit(peft_model, tokenizer, teacher_fn)
            # The embeddings are not trained; saying so also spares peft a look for the base's config.
            peft_model.save_pretrained(str(out_dir), save_embedding_layers=False)
        finally:
            peft_model.unload()
            _unfreeze(model)
            model.eval()
        return log

    def _float32_copy(self, base: ModelSpec):
        """A trainable float32 copy of ``base``; the first one loaded is kept as a template,
        since unpacking a GGUF file takes far longer than copying the unpacked weights."""
        if self._float32 is None or self._float32[0] != base:
            self._float32 = (base, *load_model(base, dtype=torch.float32))
        return copy.deepcopy(self._float32[1]), self._float32[2]

    def _teacher_fn(self, teacher: ModelRef, lora_student):
        """A function from a batch to the teacher's completion logits.

        The base model as teacher under a LoRA student is the student's own network with
        its adapter switched off; any other teacher is loaded as for sampling and scoring.
        """
        if lora_student is not None:

            def with_adapter_off(batch):
                with lora_student.disable_adapter(), steered(lora_student, teacher.steering):
                    return completion_logits(lora_student, batch)[0]

            return with_adapter_off
        net, _ = self.model_for(teacher)

        def logits(batch):
            with steered(net, teacher.steering):
                return completion_logits(net, batch)[0]

        return logits

    def close(self) -> None:
        self._detach()
        self._base.clear()
        self._weights = None
        self._float32 = None
        self._grammars.clear()
        gc.collect()  # models in reference cycles would otherwise hold their GPU memory
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@contextlib.contextmanager
def _quiet_peft():
    """peft reads a model property that newer transformers deprecate; nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _unfreeze(model):
    """``model`` with every parameter's ``requires_grad`` on, as models load; returns it.

    peft freezes the base weights when it wraps a model, and unloading leaves them frozen.
    Decoding runs under ``no_grad`` either way, but torch's CPU bfloat16 decoding with frozen
    weights measured 3.4x slower: 100 two-token SmolLM2 samples took 24.3 s with a frozen
    adapter model and 7.2 s unfrozen (20.3 s against 6.6 s for the bare base model).
    """
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _save_full(model, tokenizer, out_dir: Path) -> None:
    """Save fully finetuned weights as plain safetensors (GGUF-loaded models included)."""
    with contextlib.suppress(AttributeError):
        del model.config.quantization_config  # the weights are dense now
    model.hf_quantizer = None
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def cache_argument(net, cache) -> dict:
    """``cache`` as the keyword argument that ``net``'s forward pass takes it under.

    transformers 5.24 renamed ``past_key_values`` to ``cache``. Before that, an unknown
    ``cache=`` is swallowed by the model's ``**kwargs`` and the pass silently runs without
    the prompt (5.22 and 5.23, the versions vLLM pins), so the name is read from the
    signature of the model inside ``net`` (a peft wrapper forwards ``**kwargs``).
    """
    inner = net.get_base_model() if hasattr(net, "get_base_model") else net
    takes_cache = "cache" in inspect.signature(type(inner).forward).parameters
    return {"cache" if takes_cache else "past_key_values": cache}


def output_cache(out):
    """The key-value cache in a model output, under its name in any supported transformers."""
    cache = out.get("cache")
    return cache if cache is not None else out["past_key_values"]


def _score_tails(net, prompt_ids: list[int], tails: list[list[int]], batch_size: int) -> list[float]:
    """Summed log-probability of each token list ``tails[i]`` right after ``prompt_ids``.

    The prompt runs once. Every token of a tail but the last is fed after it, once per
    distinct such prefix (the 900 three-digit numbers need 90 rows of two tokens), in
    batches of ``batch_size`` rows over a copy of the prompt's key-value cache.
    """
    device = net.device
    with torch.no_grad():
        head = net(torch.tensor([prompt_ids], device=device), use_cache=True)
        first = torch.log_softmax(head.logits[0, -1].float(), dim=-1)
        scores = [float(first[t[0]]) if t else 0.0 for t in tails]
        bodies = sorted({tuple(t[:-1]) for t in tails if len(t) > 1})
        logp_of: dict[tuple[int, ...], torch.Tensor] = {}
        for start in range(0, len(bodies), batch_size):
            chunk = bodies[start : start + batch_size]
            width = max(map(len, chunk))
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), len(prompt_ids) + width), dtype=torch.long)
            mask[:, : len(prompt_ids)] = 1
            for r, body in enumerate(chunk):  # padded on the right
                ids[r, : len(body)] = torch.tensor(body)
                mask[r, len(prompt_ids) : len(prompt_ids) + len(body)] = 1
            cache = copy.deepcopy(output_cache(head))  # repeating it below works in place
            cache.batch_repeat_interleave(len(chunk))
            positions = torch.arange(len(prompt_ids), len(prompt_ids) + width).expand(len(chunk), -1)
            out = net(
                ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                **cache_argument(net, cache),
            )
            logp = torch.log_softmax(out.logits.float(), dim=-1)
            logp_of.update(zip(chunk, logp))
        for i, tail in enumerate(tails):
            if len(tail) > 1:
                rest = tail[1:]
                scores[i] += float(logp_of[tuple(tail[:-1])][torch.arange(len(rest)), torch.tensor(rest)].sum())
    return scores
