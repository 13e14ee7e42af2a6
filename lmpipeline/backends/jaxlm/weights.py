"""Checkpoints for the JAX decoder: Hugging Face safetensors folders and GGUF files, in and out.

Loading reads the same files the torch backend reads and produces the decoder's state as a
nested dict (``nnx.to_pure_dict`` layout), with per-layer tensors stacked on a leading layer
axis and kernels transposed to ``[d_in, d_out]``:

- a folder with ``config.json`` and ``*.safetensors`` (sharded or not), tokenizer included;
- a GGUF file, dequantized with ``gguf`` (numpy). llama.cpp stores the query and key
  projections of Llama models with their rows interleaved for its rotary layout; they are
  put back in the Hugging Face order here, as transformers does. The tokenizer is rebuilt
  from the file's vocabulary and merges with ``tokenizers`` (no torch needed): byte-level
  BPE, the file's control tokens kept whole, its chat template.

Saving writes Hugging Face names and layouts, so a folder or adapter written by one backend
loads in the other: full weights as ``model.safetensors`` with ``config.json`` and the
tokenizer, LoRA adapters in peft's format (``adapter_config.json`` and
``adapter_model.safetensors``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from lmpipeline.backends.jaxlm.model import PROJECTIONS, DecoderConfig

# Hugging Face per-layer tensor name -> (decoder module, parameter).
_LAYER_NAMES = {
    **{f"self_attn.{p}": p for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
    **{f"mlp.{p}": p for p in ("gate_proj", "up_proj", "down_proj")},
    "input_layernorm": "input_norm",
    "post_attention_layernorm": "post_attention_norm",
}
# GGUF tensor names (llama.cpp's standard names) -> Hugging Face ones.
_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GGUF_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def hf_to_state(tensors: dict[str, np.ndarray], config: DecoderConfig, dtype) -> dict:
    """Hugging Face tensors (``model.layers.3.self_attn.q_proj.weight`` ...) -> decoder state."""
    layers: dict[str, dict[str, list]] = {}
    state: dict = {}
    for name, value in tensors.items():
        match = _LAYER.match(name)
        if match:
            index, module, kind = int(match[1]), _LAYER_NAMES.get(match[2]), match[3]
            if module is None:
                raise ValueError(f"unexpected tensor {name!r} in the checkpoint")
            if module.endswith("norm"):
                leaf = "scale"
            else:
                leaf = "kernel" if kind == "weight" else "bias"
                value = value.T if kind == "weight" else value
            layers.setdefault(module, {}).setdefault(leaf, [None] * config.num_layers)[index] = value
        elif name == "model.embed_tokens.weight":
            state["embed"] = value
        elif name == "model.norm.weight":
            state["norm"] = {"scale": value}
        elif name == "lm_head.weight":
            if not config.tie_word_embeddings:
                state["lm_head"] = {"kernel": value.T}
        elif not name.endswith("rotary_emb.inv_freq"):
            raise ValueError(f"unexpected tensor {name!r} in the checkpoint")
    state["layers"] = {}
    for module, leaves in layers.items():
        for leaf, values in leaves.items():
            missing = [i for i, v in enumerate(values) if v is None]
            if missing:
                raise ValueError(f"the checkpoint lacks {module}.{leaf} of layers {missing}")
            state["layers"].setdefault(module, {})[leaf] = np.stack(values)
    return _cast(state, dtype)


def state_to_hf(state: dict, config: DecoderConfig) -> dict[str, np.ndarray]:
    """The inverse of :func:`hf_to_state` (float32 numpy arrays)."""
    inverse = {v: k for k, v in _LAYER_NAMES.items()}
    out = {"model.embed_tokens.weight": state["embed"], "model.norm.weight": state["norm"]["scale"]}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = np.asarray(state["lm_head"]["kernel"]).T
    for module, leaves in state["layers"].items():
        for leaf, stacked in leaves.items():
            for i in range(config.num_layers):
                value = np.asarray(stacked[i])
                if leaf == "kernel":
                    out[f"model.layers.{i}.{inverse[module]}.weight"] = value.T
                elif leaf == "bias":
                    out[f"model.layers.{i}.{inverse[module]}.bias"] = value
                else:
                    out[f"model.layers.{i}.{inverse[module]}.weight"] = value
    return {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in out.items()}


def _cast(tree, dtype):
    """Cast on the host (numpy knows bfloat16 through ml_dtypes): the arrays go to the
    devices only when the backend places them, each device receiving its shard, so no one
    device ever holds the whole model."""
    if isinstance(tree, dict):
        return {k: _cast(v, dtype) for k, v in tree.items()}
    return np.asarray(tree, dtype=dtype)


# -- safetensors folders ------------------------------------------------------------------
def load_folder(folder: Path, dtype) -> tuple[DecoderConfig, dict, dict]:
    """``(config, state, hf_config)`` of a Hugging Face folder (``config.json`` and safetensors)."""
    from safetensors import safe_open

    hf_config = json.loads((folder / "config.json").read_text())
    config = DecoderConfig.from_hf(hf_config)
    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if not f.name.startswith("adapter_model")]
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights (the jax backend reads safetensors only)")
    tensors = {}
    for file in files:
        with safe_open(str(file), framework="flax") as f:
            for name in f.keys():
                tensors[name] = np.asarray(f.get_tensor(name).astype(jnp.float32))
    return config, hf_to_state(tensors, config, dtype), hf_config


def save_folder(state: dict, config: DecoderConfig, hf_config: dict, tokenizer, folder: Path) -> None:
    """Full weights as a Hugging Face folder (float32 safetensors, config, tokenizer)."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(state_to_hf(state, config), str(folder / "model.safetensors"), metadata={"format": "pt"})
    saved = {**hf_config, "torch_dtype": "float32", "dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
    tokenizer.save_pretrained(str(folder))


# -- GGUF ---------------------------------------------------------------------------------
def _gguf_value(field):
    """A metadata field as a Python value (strings decoded, one-element arrays unwrapped)."""
    return field.contents()


def load_gguf(path: Path, dtype) -> tuple[DecoderConfig, dict, dict, object]:
    """``(config, state, hf_config, tokenizer)`` of a GGUF file (Llama, Mistral or Qwen2)."""
    from gguf import GGUFReader, dequantize

    reader = GGUFReader(str(path))
    meta = {name: field for name, field in reader.fields.items()}
    arch = _gguf_value(meta["general.architecture"])
    if arch not in ("llama", "qwen2", "mistral"):
        raise ValueError(f"{path.name}: GGUF architecture {arch!r} is not supported by the jax backend")

    def get(key, default=None):
        return _gguf_value(meta[f"{arch}.{key}"]) if f"{arch}.{key}" in meta else default

    names = {t.name for t in reader.tensors}
    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    vocab = len(meta["tokenizer.ggml.tokens"].data)
    hf_config = {
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "rope_theta": float(get("rope.freq_base", 10_000.0)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "max_position_embeddings": int(get("context_length", 2048)),
    }
    config = DecoderConfig.from_hf(hf_config)
    tensors = {}
    for tensor in reader.tensors:
        base, _, kind = tensor.name.rpartition(".")
        parts = base.split(".")
        if parts[0] == "blk":
            hf = f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{kind}"
        else:
            hf = f"{_GGUF_GLOBAL_NAMES[base]}.{kind}"
        value = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        value = value.reshape([int(d) for d in reversed(tensor.shape)])
        if arch != "qwen2" and parts[0] == "blk" and parts[2] in ("attn_q", "attn_k"):
            groups = config.num_heads if parts[2] == "attn_q" else config.num_kv_heads
            value = _unpermute_rope_rows(value, groups)
        tensors[hf] = value
    return config, hf_to_state(tensors, config, dtype), hf_config, gguf_tokenizer(meta)


def _unpermute_rope_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleaving of rotary rows (its ``permute`` at conversion)."""
    rows = weight.shape[0]
    w = weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


def gguf_tokenizer(meta: dict):
    """A ``PreTrainedTokenizerFast`` for a GGUF file's byte-level BPE vocabulary (``gpt2`` model)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    kind = _gguf_value(meta["tokenizer.ggml.model"])
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer {kind!r}: the jax backend builds byte-level BPE (gpt2) tokenizers only")
    tokens = _gguf_value(meta["tokenizer.ggml.tokens"])
    types = _gguf_value(meta["tokenizer.ggml.token_type"])
    merges = [tuple(m.split(" ", 1)) for m in _gguf_value(meta["tokenizer.ggml.merges"])]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3]
    backend.add_special_tokens(control)

    def token(key):
        index = meta.get(f"tokenizer.ggml.{key}")
        return None if index is None else tokens[int(_gguf_value(index))]

    template = meta.get("tokenizer.chat_template")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id") or token("eos_token_id"),
        chat_template=None if template is None else _gguf_value(template),
    )


# -- LoRA adapters in peft's format --------------------------------------------------------
_MODULE_PATH = {
    p: (f"self_attn.{p}" if p in ("q_proj", "k_proj", "v_proj", "o_proj") else f"mlp.{p}") for p in PROJECTIONS
}


def save_adapter(weights: dict[str, tuple], rank: int, alpha: float, base_name: str, folder: Path) -> None:
    """LoRA pairs (:func:`~lmpipeline.backends.jaxlm.model.lora_weights`) as a peft adapter folder."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (a, b, _) in weights.items():
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        for i in range(a.shape[0]):
            prefix = f"base_model.model.model.layers.{i}.{_MODULE_PATH[name]}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].T)  # peft: [r, d_in]
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].T)  # peft: [d_out, r]
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(weights),
        "base_model_name_or_path": base_name,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_adapter(folder: Path, num_layers: int) -> dict[str, tuple]:
    """A peft LoRA adapter folder as ``{projection: (A [L, d_in, r], B [L, r, d_out], scale)}``."""
    from safetensors import safe_open

    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora") or config.get("use_rslora"):
        raise ValueError(f"{folder}: only plain LoRA adapters load in the jax backend")
    scale = config["lora_alpha"] / config["r"]
    pattern = re.compile(r"\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")
    pairs: dict[str, dict[str, list]] = {}
    with safe_open(str(folder / "adapter_model.safetensors"), framework="flax") as f:
        for name in f.keys():
            match = pattern.search(name)
            if match is None:
                raise ValueError(f"{folder}: unexpected adapter tensor {name!r}")
            value = np.asarray(f.get_tensor(name).astype(jnp.float32)).T
            slot = pairs.setdefault(match[2], {"A": [None] * num_layers, "B": [None] * num_layers})
            slot[match[3]][int(match[1])] = value
    out = {}
    for name, slot in pairs.items():
        if any(v is None for v in slot["A"] + slot["B"]):
            raise ValueError(f"{folder}: the adapter covers {name} in only some layers; the jax backend needs all")
        out[name] = (np.stack(slot["A"]), np.stack(slot["B"]), scale)
    return out
