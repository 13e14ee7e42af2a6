r"""Steering vectors on the torch backend: activations, trait and model vectors, steered
and ablated models, cosines per layer.

The account of subliminal learning as steering-vector distillation (Blank et al. 2026)
needs a few measurements of a decoder's residual stream; this module makes each one
a function. Write :math:`h_\ell(x)` for the residual stream at the output of decoder
layer :math:`\ell` (counted from 0) at the last token of conversation :math:`x` rendered
with the generation prompt, the last template token (``<|im_start|>assistant\n``'s
newline for SmolLM2), where the model is about to answer. Over a set of conversations
:math:`X`:

- :func:`layer_activations`: :math:`\bar h_\ell(M) = \frac1{|X|} \sum_{x \in X} h_\ell^M(x)`,
  for every layer at once, ``[layers, hidden]``;
- :func:`trait_vector`: :math:`v_\ell = \bar h_\ell(M;\ s + X) - \bar h_\ell(M;\ X)`,
  the mean shift a system prompt :math:`s` causes (the teacher's trait prompt: the
  paper's :math:`v_\text{teacher}`);
- :func:`model_vector`: :math:`v_\ell = \bar h_\ell(M) - \bar h_\ell(B)` on the same
  conversations, the shift a finetuned model (a teacher, or a student: the paper's
  :math:`v_\text{student}`) carries relative to its base :math:`B`;
- :func:`layer_cosines`: :math:`\cos(a_\ell, b_\ell)` per layer, 0 where either vector is
  zero (the convention of :mod:`toymodels.track`).

A :class:`~lmpipeline.backends.Steering` edit adds :math:`\alpha v` to layer
:math:`\ell`'s output at every position (``add``), or removes :math:`\alpha` times the
output's component along :math:`v` (``ablate``, the necessity test); :func:`steered`
applies edits to a torch model for the duration of a ``with`` block, and the torch
backend applies a :class:`~lmpipeline.backends.ModelRef`'s ``steering`` in ``generate``,
``score`` and as a soft-distillation teacher. Edits act on every forward pass, the
prompt's and each generated token's, so a steered model is steered at every position.

Example (a two-layer model's layer-1 output, steered by +1 in its first coordinate):

>>> import torch
>>> from lmpipeline.backends import Steering
>>> class Block(torch.nn.Module):
...     def forward(self, h):
...         return h * 2
>>> class Net(torch.nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.model = torch.nn.Module()
...         self.model.layers = torch.nn.ModuleList([Block(), Block()])
...     def forward(self, h):
...         for layer in self.model.layers:
...             h = layer(h)
...         return h
>>> net = Net()
>>> with steered(net, [steer(torch.tensor([[0.0, 0.0], [1.0, 0.0]]), layer=1, alpha=3.0)]):
...     net(torch.ones(1, 1, 2)).tolist()
[[[7.0, 4.0]]]
>>> net(torch.ones(1, 1, 2)).tolist()
[[[4.0, 4.0]]]
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch

from lmpipeline.backends import Conversation, ModelRef, Steering
from lmpipeline.backends.tokens import prompt_text
from lmpipeline.backends.torch_training import pad_left
from lmpipeline.config import ConfigError


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a transformers causal LM, or of a peft model around one."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(inner, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ConfigError(f"{type(inner).__name__} has no model.layers: steering needs a decoder-only causal LM")
    return layers


def steer(vectors: torch.Tensor, layer: int, alpha: float = 1.0, mode: str = "add") -> Steering:
    """The edit of ``vectors[layer]`` (a ``[layers, hidden]`` tensor, as this module's
    vectors are) at ``layer``: ``ModelRef(spec, steering=(steer(v, 12, 4.0),))``."""
    return Steering(layer=layer, vector=tuple(float(x) for x in vectors[layer]), alpha=float(alpha), mode=mode)


def random_direction(vector: torch.Tensor, seed: int) -> torch.Tensor:
    """A random direction with the norm of ``vector`` (of each layer's vector, for a
    ``[layers, hidden]`` tensor): the control for a steering vector."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(vector.shape, generator=generator, dtype=torch.float64)
    scale = vector.double().norm(dim=-1, keepdim=True) / direction.norm(dim=-1, keepdim=True)
    return (direction * scale).to(vector.dtype)


def _edit(h: torch.Tensor, edit: Steering, v: torch.Tensor) -> torch.Tensor:
    if h.shape[-1] != v.shape[0]:
        raise ConfigError(f"a steering vector of size {v.shape[0]} for a residual stream of size {h.shape[-1]}")
    v = v.to(h.device)
    if edit.mode == "add":
        return h + (edit.alpha * v).to(h.dtype)
    norm = v.norm()
    if norm == 0:
        return h
    unit = v / norm
    along = (h.float() @ unit) * edit.alpha  # [batch, positions]
    return h - (along[..., None] * unit).to(h.dtype)


@contextlib.contextmanager
def steered(model, edits: Sequence[Steering]) -> Iterator[None]:
    """Apply ``edits`` to ``model``'s decoder-layer outputs inside the ``with`` block.

    Edits at the same layer apply in the given order; nothing is left on the model
    afterwards, also when the block raises. No edits: nothing happens.
    """
    if not edits:
        yield
        return
    layers = decoder_layers(model)
    handles = []
    try:
        for edit in edits:
            if not 0 <= edit.layer < len(layers):
                raise ConfigError(f"steering layer {edit.layer} is outside the model's layers 0-{len(layers) - 1}")
            v = torch.tensor(edit.vector, dtype=torch.float32)

            def hook(module, args, output, edit=edit, v=v):
                if isinstance(output, tuple):  # older transformers return (hidden, ...)
                    return (_edit(output[0], edit, v), *output[1:])
                return _edit(output, edit, v)

            handles.append(layers[edit.layer].register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def layer_activations(model, tokenizer, conversations: Sequence[Conversation], *, batch_size: int = 16) -> torch.Tensor:
    """Mean residual stream at every decoder layer's output, at the last template token of
    each conversation (rendered with the generation prompt): ``[layers, hidden]``, float32.

    Rows are padded on the left with positions counted from each row's first real token,
    so a row's activations are those of its own, unpadded forward pass.
    """
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    captured: list[torch.Tensor | None] = [None] * len(layers)

    def capture(index):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            captured[index] = hidden[:, -1].float()

        return hook

    ids = [tokenizer(prompt_text(tokenizer, c), add_special_tokens=False)["input_ids"] for c in conversations]
    total = 0.0
    handles = [layer.register_forward_hook(capture(i)) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            batch = pad_left(chunk, chunk, tokenizer.pad_token_id, device)
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
            try:
                model(**inputs, logits_to_keep=1, use_cache=False)
            except TypeError:  # a model without logits_to_keep
                model(**inputs, use_cache=False)
            total += torch.stack([c.sum(dim=0) for c in captured])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return (total / len(ids)).cpu()


def activations(backend, ref: ModelRef, conversations: Sequence[Conversation], **kwargs) -> torch.Tensor:
    """:func:`layer_activations` of ``ref`` on the torch backend ``backend``, with its steering."""
    if getattr(backend, "name", None) != "hf":
        raise ConfigError("activations and steering vectors need the torch backend: set model.backend=hf")
    model, tokenizer = backend.model_for(ref)
    with steered(model, ref.steering):
        return layer_activations(model, tokenizer, conversations, **kwargs)


def with_system(conversations: Sequence[Conversation], system_prompt: str) -> list[Conversation]:
    """Each conversation with ``system_prompt`` as its first message."""
    return [[{"role": "system", "content": system_prompt}, *c] for c in conversations]


def trait_vector(backend, ref: ModelRef, conversations: Sequence[Conversation], system_prompt: str) -> torch.Tensor:
    """``[layers, hidden]``: mean activation of ``ref`` with ``system_prompt`` minus without it."""
    return activations(backend, ref, with_system(conversations, system_prompt)) - activations(
        backend, ref, conversations
    )


def model_vector(backend, ref: ModelRef, base: ModelRef, conversations: Sequence[Conversation]) -> torch.Tensor:
    """``[layers, hidden]``: mean activation of ``ref`` minus that of ``base`` on the same conversations."""
    return activations(backend, ref, conversations) - activations(backend, base, conversations)


def cosine(dot: float, sq_a: float, sq_b: float) -> float:
    """``<a, b> / (|a| |b|)`` from the sums ``<a, b>``, ``|a|^2`` and ``|b|^2``; 0 if either
    vector is zero, as in :func:`toymodels.track.tree_cosine` (a zero vector has no direction).

    >>> cosine(1.0, 1.0, 4.0), cosine(0.0, 0.0, 4.0)
    (0.5, 0.0)
    """
    norms = math.sqrt(sq_a) * math.sqrt(sq_b)
    return dot / norms if norms > 0 else 0.0


def layer_cosines(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """:func:`cosine` of ``a[l]`` and ``b[l]`` for every layer ``l`` of two ``[layers, hidden]``
    tensors, summed in float64.

    >>> layer_cosines(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    [0.7071067811865475, 0.0]
    """
    a, b = a.double(), b.double()
    return [cosine(float(x @ y), float(x @ x), float(y @ y)) for x, y in zip(a, b)]
