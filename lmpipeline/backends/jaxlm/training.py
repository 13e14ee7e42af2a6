r"""Supervised finetuning of the JAX decoder with optax: the torch loop's objective, compiled.

The objective, batching and schedule are those of
:mod:`lmpipeline.backends.torch_training` (the same labels from
:func:`~lmpipeline.backends.tokens.completion_example`, the same shuffled order for a seed,
the same left padding, the same mean over the completion tokens of an effective batch):

.. math::

    L = \frac{1}{\sum_{b \in B} |C_b|} \sum_{b \in B} \sum_{t \in C_b} \ell_{b,t},

with :math:`\ell` the token's negative log-likelihood (``objective=sampled``) or
:math:`\mathrm{KL}(p_T \| p_S)` of the next-token distributions (``objective=soft``,
optionally over the number tokens only, renormalized).

One optimizer step is one compiled call: ``lax.scan`` accumulates the gradients of the
step's ``grad_accum`` micro-batches (a short last step is filled with rows that carry no
loss, so every step has the same shape, and so is each micro-batch up to a multiple of the
device count, so its rows split evenly over the devices), then ``optax`` clips the global
norm and applies ``finetune.optimizer`` (the torch loop's update rules) at the linear
schedule's learning rate. Which parameters train is a type filter: :class:`flax.nnx.LoRAParam` for LoRA, every
:class:`flax.nnx.Param` for full finetuning.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lmpipeline.backends import ProgressFn, TrainExample
from lmpipeline.backends.checkpoints import Checkpoints, TrainState, fingerprint, step_batches
from lmpipeline.backends.jaxlm.decoding import left_pad, positions_of, round_up
from lmpipeline.backends.jaxlm.model import Decoder
from lmpipeline.backends.tokens import IGNORE, linear_schedule, training_rows, training_summary
from lmpipeline.config import SGD_MOMENTUM, FinetuneSpec


@functools.lru_cache(maxsize=8)  # one object per setting, so compiled steps that take it are reused
def optimizer(spec: FinetuneSpec, total_steps: int) -> optax.GradientTransformation:
    """Clip to ``max_grad_norm``, then ``spec.optimizer`` with decoupled weight decay: the
    torch loop's rules (:mod:`lmpipeline.backends.torch_optim`), AdamW with torch's
    defaults (betas 0.9/0.999, eps 1e-8), SGD with heavy-ball momentum
    :data:`~lmpipeline.config.SGD_MOMENTUM`, or signSGD."""

    # The schedule's own values, tabulated: one formula for the torch loop, this one and the log.
    factors = jnp.asarray([linear_schedule(s, spec.warmup_steps, total_steps) for s in range(total_steps)])

    def schedule(count):
        return spec.learning_rate * factors[jnp.minimum(count, total_steps - 1)]

    if spec.optimizer == "adamw":
        rule = optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=spec.weight_decay)
    elif spec.optimizer in ("sgd", "signsgd"):
        direction = optax.trace(decay=SGD_MOMENTUM) if spec.optimizer == "sgd" else optax.scale_by_sign()
        # optax's -lr * (direction + decay * theta) is torch's decoupled decay followed by the step.
        rule = optax.chain(
            direction, optax.add_decayed_weights(spec.weight_decay), optax.scale_by_learning_rate(schedule)
        )
    else:
        raise ValueError(f"unknown finetune.optimizer {spec.optimizer!r}")
    return optax.chain(optax.clip_by_global_norm(spec.max_grad_norm), rule)


def micro_rows(micro_batch: int, devices: int) -> int:
    """Rows of each compiled micro-batch on ``devices`` devices: ``micro_batch`` rounded up
    to a multiple of the device count. A count that does not divide the rows would leave
    the batch whole on every device, each computing every row (22 rows on 8 devices: 22
    rows' activations per device instead of 3)."""
    return round_up(micro_batch, devices)


def _stack(rows: list[dict], micro: int, n_micro: int, width: int, pad_id: int) -> dict[str, np.ndarray]:
    """``[n_micro, micro, width]`` arrays of left-padded rows; missing rows carry no label."""
    ids, valid = left_pad([row["input_ids"] for row in rows], width, n_micro * micro, pad_id)
    labels = np.full(ids.shape, IGNORE, np.int32)
    for r, row in enumerate(rows):
        labels[r, width - len(row["labels"]) :] = row["labels"]
    return {k: v.reshape(n_micro, micro, width) for k, v in {"ids": ids, "labels": labels, "valid": valid}.items()}


def completion_logits(model: Decoder, ids, valid, keep: int) -> jax.Array:
    """Logits predicting the last ``keep - 1`` tokens of each left-padded row: ``[B, keep-1, V]``."""
    logits, _ = model(ids, positions_of(valid), valid, keep=keep)
    return logits[:, :-1]


def soft_kl(teacher_logits, student_logits, mask, tokens=None) -> jax.Array:
    r"""Summed :math:`\mathrm{KL}(p_T \| p_S)` over ``mask``ed positions (see the torch twin).

    >>> t = jnp.array([[[2.0, 0.0, -1.0]]])
    >>> float(soft_kl(t, t, jnp.ones((1, 1))))
    0.0
    >>> round(float(soft_kl(t, jnp.zeros((1, 1, 3)), jnp.ones((1, 1)), tokens=jnp.array([0, 1]))), 4)
    0.3278
    """
    if tokens is not None:
        teacher_logits, student_logits = teacher_logits[..., tokens], student_logits[..., tokens]
    log_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1) * mask)


@partial(jax.jit, static_argnames=("graphdef", "teacher_graphdef", "tx", "keep", "compute_dtype"))
def train_step(
    graphdef,
    trainable,
    frozen,
    opt_state,
    batch,
    denom,
    teacher_graphdef=None,
    teacher_state=None,
    tokens=None,
    *,
    tx: optax.GradientTransformation,
    keep: int,
    compute_dtype,
):
    """One optimizer step over ``batch`` (``[n_micro, micro, width]`` arrays); returns the
    new trainable state, optimizer state, the step's mean loss and its pre-clip gradient norm."""
    soft = teacher_graphdef is not None

    def micro_loss(params, micro):
        cast = jax.tree.map(lambda p: p.astype(compute_dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)
        student = nnx.merge(graphdef, cast, frozen)
        logits = completion_logits(student, micro["ids"], micro["valid"], keep)
        targets = micro["labels"][:, micro["labels"].shape[1] - keep + 1 :]
        labelled = targets != IGNORE
        if soft:
            teacher = nnx.merge(teacher_graphdef, teacher_state)
            t_logits = completion_logits(teacher, micro["t_ids"], micro["t_valid"], keep)
            mask = labelled if tokens is None else labelled & jnp.isin(targets, tokens)
            return soft_kl(jax.lax.stop_gradient(t_logits), logits, mask, tokens)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(logp, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
        return -jnp.sum(jnp.where(labelled, picked, 0.0))

    def accumulate(carry, micro):
        grads, total = carry
        loss, g = jax.value_and_grad(micro_loss)(trainable, micro)
        return (jax.tree.map(jnp.add, grads, g), total + loss), None

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    (grads, loss_sum), _ = jax.lax.scan(accumulate, (zeros, jnp.zeros((), jnp.float32)), batch)
    grads = jax.tree.map(lambda g: g / denom, grads)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss_sum / denom, grad_norm


def train(
    model: Decoder,
    tokenizer,
    examples: Sequence[TrainExample],
    spec: FinetuneSpec,
    *,
    seed: int,
    trainable: type = nnx.LoRAParam,
    progress: ProgressFn | None = None,
    teacher: Decoder | None = None,
    tokens: Sequence[int] | None = None,
    place: Callable = lambda tree: tree,
    devices: int = 1,
    checkpoint: Path | None = None,
) -> dict:
    """Train ``model``'s parameters of type ``trainable`` in place; returns the training log
    (the keys of the torch loop's log). ``place`` puts a pytree on the devices (the backend's
    sharding), so every step's inputs are laid out as its outputs and the step compiles once;
    ``devices`` is the number of devices it splits a batch's rows over (see :func:`micro_rows`).
    With ``checkpoint``, the float32 weights and optimizer state are saved there every
    ``spec.checkpoint_every`` steps, and a run with the same inputs resumes from them."""
    soft = spec.objective == "soft"
    if soft and teacher is None:
        raise ValueError("finetune.objective=soft needs a teacher to distil from")
    encoded, teacher_rows = training_rows(tokenizer, examples, spec)
    token_set = set(tokens) if (soft and tokens is not None) else None
    n_label = [
        sum(1 for x in e["labels"][1:] if x != IGNORE and (token_set is None or x in token_set)) for e in encoded
    ]
    steps = step_batches(len(encoded), spec, seed)
    # One width and one kept span for every step, so the step compiles once.
    width = round_up(max(len(e["input_ids"]) for e in encoded + teacher_rows), 32)
    span = max(
        len(e["labels"]) - next((i for i, x in enumerate(e["labels"]) if x != IGNORE), len(e["labels"]))
        for e in encoded
    )
    keep = min(width, round_up(span + 1, 16))
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    params = place(jax.tree.map(lambda p: p.astype(jnp.float32), params))  # master weights in float32
    tx = optimizer(spec, len(steps))
    opt_state = place(tx.init(params))
    leaves, treedef = jax.tree.flatten((params, opt_state))
    layout = [str(treedef), [(list(x.shape), str(x.dtype)) for x in leaves], sorted(token_set or [])]
    saver = Checkpoints(checkpoint, spec.checkpoint_every, fingerprint(spec, seed, encoded + teacher_rows, str(layout)))

    def save(folder: Path) -> None:
        np.savez(folder / "state.npz", *[np.asarray(x) for x in jax.tree.leaves((params, opt_state))])

    def load(folder: Path) -> None:
        nonlocal params, opt_state
        with np.load(folder / "state.npz") as saved:
            arrays = [saved[f"arr_{i}"] for i in range(len(leaves))]
        params, opt_state = place(jax.tree.unflatten(treedef, arrays))

    state = saver.resume(load, objective=spec.objective, total=len(steps), progress=progress)
    log, tokens_seen = state.log, state.tokens_seen
    teacher_graphdef, teacher_state = nnx.split(teacher) if soft else (None, None)
    token_array = jnp.asarray(sorted(token_set), jnp.int32) if token_set is not None else None
    compute_dtype = jnp.bfloat16 if spec.compute_dtype == "bfloat16" else jnp.float32
    pad = tokenizer.pad_token_id
    micro = micro_rows(spec.micro_batch, devices)
    start = time.perf_counter()
    for step in range(state.step, len(steps)):
        chosen = steps[step]
        batch = _stack([encoded[i] for i in chosen], micro, spec.grad_accum, width, pad)
        if soft:
            t = _stack([teacher_rows[i] for i in chosen], micro, spec.grad_accum, width, pad)
            batch.update(t_ids=t["ids"], t_valid=t["valid"])
        denom = max(1, sum(n_label[i] for i in chosen))
        params, opt_state, loss, grad_norm = train_step(
            graphdef,
            params,
            frozen,
            opt_state,
            place(batch),
            jnp.float32(denom),
            teacher_graphdef,
            teacher_state,
            token_array,
            tx=tx,
            keep=keep,
            compute_dtype=compute_dtype,
        )
        tokens_seen += sum(len(encoded[i]["input_ids"]) for i in chosen)
        log["loss"].append(float(loss))
        log["lr"].append(spec.learning_rate * linear_schedule(step, spec.warmup_steps, len(steps)))
        log["grad_norm"].append(float(grad_norm))
        wall = state.wall_s + time.perf_counter() - start
        saver.save(TrainState(step + 1, tokens_seen, log, wall), total=len(steps), write=save)
        if progress is not None:  # tokens since this process started, as progress counts them
            progress(step + 1, len(steps), tokens_seen - state.tokens_seen)
    before = nnx.split(model, trainable, ...)[1]
    nnx.update(model, jax.tree.map(lambda new, old: new.astype(old.dtype), params, before))
    trainable_count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    wall = state.wall_s + time.perf_counter() - start
    log.update(training_summary(spec, encoded, n_label, tokens_seen, trainable_count, wall))
    if state.step:
        log["resumed_at_step"] = state.step
    return log
