r"""Supervised finetuning in plain torch: completion-only labels and a small training loop.

The loop depends only on ``model(input_ids, attention_mask, position_ids).logits`` (with
``logits_to_keep`` where the model takes it), a tokenizer with a chat template, and
``torch.optim.AdamW``, APIs that have been stable for years, rather than on trainer or
collator classes that come and go between library versions. Batches are padded on the
left, as in generation, so every completion ends in the last column.

Objective. For a step over examples :math:`B` (``micro_batch * grad_accum`` of them, fed in
micro-batches), with completion-token positions :math:`C_b` of example :math:`b`,

.. math::

    L = \frac{1}{\sum_{b \in B} |C_b|} \sum_{b \in B} \sum_{t \in C_b} -\log p_\theta(x_{b,t} \mid x_{b,<t}),

the mean over every completion token of the effective batch, whatever the micro-batching.
Prompt tokens (system and user turns, the assistant header) carry label ``-100`` and do
not contribute.

Learning rate. With :math:`W` warmup steps and :math:`T` steps in all, step :math:`s`
(from 0) uses :math:`\eta \cdot s/W` for :math:`s < W` and
:math:`\eta \cdot \max(0, (T - s)/(T - W))` after, the linear schedule of the paper's
open-model runs.

Example:

>>> [round(linear_schedule(s, warmup=2, total=6), 2) for s in range(6)]
[0.0, 0.5, 1.0, 0.75, 0.5, 0.25]
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence

import torch

from lmpipeline.backends import Conversation, ProgressFn, TrainExample
from lmpipeline.config import FinetuneSpec

IGNORE = -100


def continuation_ids(tokenizer, messages: Conversation, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt (chat template with generation prompt) and of ``continuation``.

    The two parts are tokenized separately, exactly as the model meets them when it
    generates: the prompt ends the assistant header, the continuation follows it.
    """
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return prompt_ids, tokenizer(continuation, add_special_tokens=False)["input_ids"]


def completion_example(tokenizer, messages: Conversation, completion: str, max_len: int) -> dict:
    """``input_ids`` and ``labels`` for one row; labels are ``-100`` outside the completion.

    The completion is rendered by the chat template as an assistant turn, so its labels
    include the end-of-turn marker that teaches the student to stop. Rows longer than
    ``max_len`` tokens are cut at ``max_len``.

    Raises:
        ValueError: if the template renders earlier turns differently once the assistant
            turn is added, which would make the prompt/completion boundary ambiguous.
    """
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": completion}], tokenize=False
    )
    if not full.startswith(prompt):
        raise ValueError("the chat template changes the prompt when an assistant turn follows; cannot mask it")
    prompt_ids, completion_ids = continuation_ids(tokenizer, messages, full[len(prompt) :])
    ids = prompt_ids + completion_ids
    labels = [IGNORE] * len(prompt_ids) + completion_ids
    return {"input_ids": ids[:max_len], "labels": labels[:max_len], "truncated": len(ids) > max_len}


def pad_right(ids: Sequence[list[int]], labels: Sequence[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Stack rows, padding on the right (ids with ``pad_id``, labels with ``-100``)."""
    return _pad(ids, labels, pad_id, device, left=False)


def pad_left(ids: Sequence[list[int]], labels: Sequence[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Stack rows, padding on the left, with ``position_ids`` that start at 0 on each row's
    first real token (as in generation), so that every completion ends at the last column."""
    batch = _pad(ids, labels, pad_id, device, left=True)
    batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return batch


def _pad(ids, labels, pad_id: int, device, left: bool) -> dict[str, torch.Tensor]:
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    label_t = torch.full((len(ids), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for r, (row, lab) in enumerate(zip(ids, labels)):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        input_ids[r, span] = torch.tensor(row, dtype=torch.long)
        label_t[r, span] = torch.tensor(lab, dtype=torch.long)
        mask[r, span] = 1
    return {"input_ids": input_ids.to(device), "labels": label_t.to(device), "attention_mask": mask.to(device)}


def linear_schedule(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor at optimizer step ``step`` (see the module docstring)."""
    if step < warmup:
        return step / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def row_nll(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per row, the summed next-token negative log-likelihood of the labelled positions.

    With a left-padded batch (``position_ids`` present) the labels sit in the last columns,
    so only those columns' logits are computed (``logits_to_keep``): the vocabulary
    projection and its gradient are a large share of a small model's step and memory.
    """
    labels = batch["labels"]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    keep = labels.shape[1]
    if "position_ids" in batch:
        labelled = (labels != IGNORE).any(dim=0).nonzero()
        keep = min(labels.shape[1], labels.shape[1] - int(labelled[0]) + 1) if len(labelled) else 1
        inputs["logits_to_keep"] = keep
    try:
        logits = model(**inputs).logits[:, -keep:]
    except TypeError:  # a model without `logits_to_keep`: compute every column
        inputs.pop("logits_to_keep", None)
        logits = model(**inputs).logits[:, -keep:]
    targets = labels[:, labels.shape[1] - keep + 1 :]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="none"
    )
    return nll.view(targets.shape).sum(dim=1)


def summed_token_nll(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """:func:`row_nll` summed over the batch (the numerator of the training loss)."""
    return row_nll(model, batch).sum()


def train(
    model,
    tokenizer,
    examples: Sequence[TrainExample],
    spec: FinetuneSpec,
    *,
    seed: int,
    progress: ProgressFn | None = None,
) -> dict:
    """Train the parameters of ``model`` that require gradients; returns the training log."""
    if not examples:
        raise ValueError("no training examples")
    device = next(model.parameters()).device
    encoded = [completion_example(tokenizer, ex.messages, ex.completion, spec.max_seq_len) for ex in examples]
    n_label = [sum(1 for x in e["labels"][1:] if x != IGNORE) for e in encoded]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    step_size = spec.micro_batch * spec.grad_accum
    steps_per_epoch = math.ceil(len(encoded) / step_size)
    total = spec.epochs * steps_per_epoch
    rng = random.Random(seed)
    log: dict = {"loss": [], "lr": [], "grad_norm": []}
    tokens = 0
    start = time.perf_counter()
    model.train()
    step = 0
    for _ in range(spec.epochs):
        order = list(range(len(encoded)))
        rng.shuffle(order)
        for first in range(0, len(order), step_size):
            chosen = order[first : first + step_size]
            denom = max(1, sum(n_label[i] for i in chosen))
            loss_sum = 0.0
            for m in range(0, len(chosen), spec.micro_batch):
                micro = [encoded[i] for i in chosen[m : m + spec.micro_batch]]
                batch = pad_left([e["input_ids"] for e in micro], [e["labels"] for e in micro], tokenizer.pad_token_id, device)
                nll = summed_token_nll(model, batch)
                (nll / denom).backward()
                loss_sum += nll.item()
                tokens += int(batch["attention_mask"].sum())
            lr = spec.learning_rate * linear_schedule(step, spec.warmup_steps, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            grad_norm = torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            log["loss"].append(loss_sum / denom)
            log["lr"].append(lr)
            log["grad_norm"].append(float(grad_norm))
            step += 1
            if progress is not None:
                progress(step, total, tokens)
    model.eval()
    wall = time.perf_counter() - start
    log.update(
        steps=total,
        epochs=spec.epochs,
        n_examples=len(encoded),
        n_tokens=tokens,
        n_completion_tokens=sum(n_label) * spec.epochs,
        n_truncated=sum(e["truncated"] for e in encoded),
        trainable_params=sum(p.numel() for p in params),
        wall_s=wall,
        tokens_per_s=tokens / wall if wall > 0 else None,
    )
    return log
