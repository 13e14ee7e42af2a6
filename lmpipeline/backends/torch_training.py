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
not contribute. Soft distillation (``objective=soft``) replaces the token's negative
log-likelihood by :func:`soft_kl` at the same positions and averages it the same way.
The learning rate follows :func:`lmpipeline.backends.tokens.linear_schedule`.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from lmpipeline.backends import ProgressFn, TrainExample
from lmpipeline.backends.checkpoints import Checkpoints, TrainState, fingerprint, step_batches
from lmpipeline.backends.tokens import IGNORE, linear_schedule, training_rows, training_summary
from lmpipeline.backends.torch_optim import make_optimizer
from lmpipeline.config import FinetuneSpec


def cuda_devices(device: torch.device) -> list[int]:
    """The CUDA devices whose generator state to save and restore around seeded work."""
    return [device.index or 0] if device.type == "cuda" else []


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


def completion_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits that predict each labelled token, and those labels (``-100`` elsewhere).

    Returns ``(logits, targets)`` of shapes ``[rows, K, vocab]`` and ``[rows, K]``, where
    ``logits[:, k]`` is the model's prediction of ``targets[:, k]``. With a left-padded
    batch (``position_ids`` present) the labels sit in the last columns, so only those
    columns' logits are computed (``logits_to_keep``): the vocabulary projection and its
    gradient are a large share of a small model's step and memory. Two left-padded batches
    with the same completions (a teacher's prompt and a student's) give aligned outputs.
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
    return logits[:, :-1], labels[:, labels.shape[1] - keep + 1 :]


def row_nll(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per row, the summed next-token negative log-likelihood of the labelled positions."""
    logits, targets = completion_logits(model, batch)
    nll = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="none"
    )
    return nll.view(targets.shape).sum(dim=1)


def soft_kl(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor | None = None
) -> torch.Tensor:
    r"""Summed :math:`\mathrm{KL}(p_T \| p_S)` of next-token distributions over ``mask``ed positions.

    With ``tokens`` (a 1-D tensor of ids) both distributions are softmaxes over those
    logits only, renormalized: the language analogue of the MNIST students' loss on the
    auxiliary logits alone. Computed in float32 at least, whatever the logits' dtype.

    Example:

    >>> t = torch.tensor([[[2.0, 0.0, -1.0]]])
    >>> float(soft_kl(t, t, torch.ones(1, 1)))
    0.0
    >>> round(float(soft_kl(t, torch.zeros(1, 1, 3), torch.ones(1, 1), tokens=torch.tensor([0, 1]))), 4)
    0.3278
    """
    if tokens is not None:
        teacher_logits, student_logits = teacher_logits[..., tokens], student_logits[..., tokens]
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # float64 stays float64
    log_t = torch.log_softmax(teacher_logits.to(dtype), dim=-1)
    log_s = torch.log_softmax(student_logits.to(dtype), dim=-1)
    per_position = (log_t.exp() * (log_t - log_s)).sum(dim=-1)
    return (per_position * mask).sum()


def soft_mask(targets: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
    """The positions soft distillation trains on: labelled ones, and with ``tokens``, only
    those whose actual next token is among them (a trailing newline after the end-of-turn
    marker is not a number token)."""
    mask = targets != IGNORE
    if tokens is not None:
        mask &= torch.isin(targets, tokens)
    return mask.float()


def summed_token_nll(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """:func:`row_nll` summed over the batch (the numerator of the training loss)."""
    return row_nll(model, batch).sum()


TeacherFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]  # batch -> completion logits


@contextlib.contextmanager
def gradient_checkpointing(model, on: bool):
    """Recompute each decoder layer's activations in the backward pass while inside, if ``on``.

    Non-reentrant checkpointing, so that frozen base weights with LoRA adapters need no
    inputs that require gradients; switched off again on the way out, since the base
    model is shared with scoring and sampling.
    """
    if not on:
        yield
        return
    # transformers 5.25 renamed the switches (the old names warn); older releases have only those.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        disable = model.activation_checkpointing_disable
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        disable = model.gradient_checkpointing_disable
    try:
        yield
    finally:
        disable()


def train(
    model,
    tokenizer,
    examples: Sequence[TrainExample],
    spec: FinetuneSpec,
    *,
    seed: int,
    progress: ProgressFn | None = None,
    teacher: TeacherFn | None = None,
    tokens: torch.Tensor | None = None,
    checkpoint: Path | None = None,
    observer=None,
) -> dict:
    """Train the parameters of ``model`` that require gradients; returns the training log.

    ``spec.objective`` picks the loss: ``sampled`` is the cross-entropy above; ``soft`` is
    :func:`soft_kl` against ``teacher`` (called without gradients on each micro-batch of
    the teacher's view of the examples, ``TrainExample.teacher_messages``), over the
    positions :func:`soft_mask` selects with ``tokens``, averaged over those positions.
    With ``checkpoint``, the trainable weights, the optimizer's state and torch's random state are
    saved there every ``spec.checkpoint_every`` steps, and a run with the same inputs
    resumes from them (:mod:`lmpipeline.backends.checkpoints`). An ``observer`` (an
    :class:`lmpipeline.alignment.AlignmentTracker`) is called before the first step and
    around every optimizer step, and writes into the log.
    """
    soft = spec.objective == "soft"
    if soft and teacher is None:
        raise ValueError("finetune.objective=soft needs a teacher to distil from")
    device = next(model.parameters()).device
    encoded, teacher_rows = training_rows(tokenizer, examples, spec)
    n_label = [int(soft_mask(torch.tensor(e["labels"][1:]), tokens if soft else None).sum()) for e in encoded]
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optimizer = make_optimizer(params, spec)
    steps = step_batches(len(encoded), spec, seed)
    trainable = [(name, list(p.shape), str(p.dtype)) for name, p in named]
    saver = Checkpoints(
        checkpoint,
        spec.checkpoint_every,
        fingerprint(
            spec, seed, encoded + teacher_rows, json.dumps([trainable, tokens is not None and tokens.tolist()])
        ),
    )

    def save(folder: Path) -> None:
        state = {"params": [p.detach().cpu() for p in params], "optimizer": optimizer.state_dict()}
        cuda = [torch.cuda.get_rng_state(d) for d in cuda_devices(device)]
        torch.save({**state, "rng": torch.random.get_rng_state(), "cuda_rng": cuda}, folder / "state.pt")

    def load(folder: Path) -> None:
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
        with torch.no_grad():
            for p, saved in zip(params, state["params"]):
                p.copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
        torch.random.set_rng_state(state["rng"])
        for d, rng in zip(cuda_devices(device), state["cuda_rng"]):
            torch.cuda.set_rng_state(rng, d)

    # Dropout masks follow the seed, and a resumed run continues the saved stream.
    with (
        torch.random.fork_rng(devices=cuda_devices(device)),
        gradient_checkpointing(model, spec.gradient_checkpointing),
    ):
        torch.manual_seed(seed)
        state = saver.resume(load, objective=spec.objective, total=len(steps), progress=progress)
        log, tokens_seen = state.log, state.tokens_seen
        start = time.perf_counter()
        model.train()
        pad = tokenizer.pad_token_id
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.compute_dtype == "bfloat16")
        if observer is not None:
            observer.start(model, state.step, len(steps), log)
        for step in range(state.step, len(steps)):
            chosen = steps[step]
            denom = max(1, sum(n_label[i] for i in chosen))
            loss_sum = 0.0
            for m in range(0, len(chosen), spec.micro_batch):
                micro = chosen[m : m + spec.micro_batch]
                batch = pad_left(
                    [encoded[i]["input_ids"] for i in micro], [encoded[i]["labels"] for i in micro], pad, device
                )
                with autocast:
                    if soft:
                        rows = [teacher_rows[i] for i in micro]
                        with torch.no_grad():
                            teacher_batch = pad_left(
                                [r["input_ids"] for r in rows], [r["labels"] for r in rows], pad, device
                            )
                            target_logits = teacher(teacher_batch)
                        logits, targets = completion_logits(model, batch)
                        loss = soft_kl(target_logits, logits, soft_mask(targets, tokens), tokens)
                    else:
                        loss = summed_token_nll(model, batch)
                (loss / denom).backward()
                loss_sum += loss.item()
                tokens_seen += int(batch["attention_mask"].sum())
            lr = spec.learning_rate * linear_schedule(step, spec.warmup_steps, len(steps))
            for group in optimizer.param_groups:
                group["lr"] = lr
            grad_norm = torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
            if observer is not None:
                observer.before_step(step, model)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            log["loss"].append(loss_sum / denom)
            log["lr"].append(lr)
            log["grad_norm"].append(float(grad_norm))
            if observer is not None:
                observer.after_step(step, model, log)
            saver.save(
                TrainState(step + 1, tokens_seen, log, state.wall_s + time.perf_counter() - start),
                total=len(steps),
                write=save,
            )
            if progress is not None:  # tokens since this process started, as progress counts them
                progress(step + 1, len(steps), tokens_seen - state.tokens_seen)
    model.eval()
    wall = state.wall_s + time.perf_counter() - start
    log.update(training_summary(spec, encoded, n_label, tokens_seen, sum(p.numel() for p in params), wall))
    if state.step:
        log["resumed_at_step"] = state.step
    return log
