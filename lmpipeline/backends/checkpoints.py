"""Finetuning checkpoints: an interrupted student resumes at its last saved step.

Every backend trains over the same plan of steps (:func:`step_batches`: one seeded shuffle
per epoch, cut into effective batches), so a resumed run replays nothing and skips
nothing: it continues at the saved step with the saved weights, optimizer state and
random state, and ends with the weights and log of an uninterrupted run.

A checkpoint is a folder ``step-NNNNNN`` inside the checkpoint folder, holding the
backend's state files and ``checkpoint.json`` (the step, the tokens seen, the log so far,
the seconds trained and a fingerprint). It appears in one rename, and the older one is
removed only after it. The fingerprint covers everything that decides the result: the
finetune settings (less ``checkpoint_every``), the seed, the encoded rows and the
backend's description of what trains. A checkpoint with another fingerprint is never
loaded, so a changed config or dataset starts over instead of resuming stale weights.

Example:

>>> import tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> saver = Checkpoints(folder, every=2, fingerprint="abc")
>>> saver.save(TrainState(2, 100, {"loss": [1.0, 0.5]}, 3.0), total=5, write=lambda d: None)
>>> Checkpoints(folder, every=2, fingerprint="abc").restore(load=lambda d: None)
TrainState(step=2, tokens_seen=100, log={'loss': [1.0, 0.5]}, wall_s=3.0)
>>> Checkpoints(folder, every=2, fingerprint="other").restore(load=lambda d: None) is None
True
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from lmpipeline.config import FinetuneSpec, result_fields
from sublearn._common import atomic_path, read_json, write_json
from sublearn._store import config_hash

META = "checkpoint.json"


class TrainState(NamedTuple):
    """Where a training run stands after ``step`` optimizer steps."""

    step: int
    tokens_seen: int
    log: dict  # the training log's per-step lists so far
    wall_s: float  # seconds spent training, over every process that worked on the run


def step_batches(n_rows: int, spec: FinetuneSpec, seed: int) -> list[list[int]]:
    """The row indices of every optimizer step, in order: each epoch shuffles all rows with
    one stream seeded by ``seed`` and cuts them into batches of ``micro_batch * grad_accum``
    (the last one shorter).

    >>> from lmpipeline.config import FinetuneSpec
    >>> step_batches(5, FinetuneSpec(epochs=2, micro_batch=2, grad_accum=1), seed=0)
    [[2, 1], [0, 4], [3], [0, 2], [1, 3], [4]]
    """
    size = spec.micro_batch * spec.grad_accum
    rng = random.Random(seed)
    steps = []
    for _ in range(spec.epochs):
        order = list(range(n_rows))
        rng.shuffle(order)
        steps += [order[first : first + size] for first in range(0, n_rows, size)]
    return steps


def fingerprint(spec: FinetuneSpec, seed: int, rows: Sequence[dict], trainable: str) -> str:
    """A hash of what decides a training run's result: the settings, the seed, the encoded
    ``rows`` (ids and labels, teacher rows included) and ``trainable``, the backend's
    description of the parameters it trains (names, shapes and optimizer layout)."""
    return config_hash([result_fields(spec), seed, trainable], *([row["input_ids"], row["labels"]] for row in rows))


class Checkpoints:
    """Saves a run's state every ``every`` steps into ``folder`` and restores the newest one
    whose fingerprint matches. ``folder=None`` or ``every <= 0`` saves nothing."""

    def __init__(self, folder: Path | None, every: int, fingerprint: str):
        self.folder = Path(folder) if folder is not None else None
        self.every = every
        self.fingerprint = fingerprint

    @property
    def enabled(self) -> bool:
        return self.folder is not None and self.every > 0

    def _saved(self) -> list[Path]:
        if self.folder is None or not self.folder.is_dir():
            return []
        return sorted(self.folder.glob("step-*[0-9]"), reverse=True)

    def restore(self, load: Callable[[Path], None]) -> TrainState | None:
        """Call ``load(folder)`` on the newest matching checkpoint and return its state, or
        return None (nothing saved, or saved by another config or dataset)."""
        for saved in self._saved():
            try:
                meta = read_json(saved / META)
            except (OSError, ValueError):
                continue
            if meta.get("fingerprint") == self.fingerprint:
                load(saved)
                return TrainState(meta["step"], meta["tokens_seen"], meta["log"], meta["wall_s"])
        return None

    def resume(
        self, load: Callable[[Path], None], *, objective: str, total: int, progress: Callable | None = None
    ) -> TrainState:
        """The state a run starts from: the newest matching checkpoint (see :meth:`restore`;
        its step is reported to ``progress(done, total, tokens)``), else step 0 with an empty log."""
        state = self.restore(load)
        if state is None:
            return TrainState(0, 0, {"objective": objective, "loss": [], "lr": [], "grad_norm": []}, 0.0)
        if progress is not None:
            progress(state.step, total, 0)
        return state

    def save(self, state: TrainState, *, total: int, write: Callable[[Path], None]) -> None:
        """After step ``state.step`` of ``total``: on every ``every``-th step before the last,
        have ``write(folder)`` write the backend's state and record ``state`` beside it."""
        if not self.enabled or state.step % self.every or state.step >= total:
            return
        name = f"step-{state.step:06d}"
        with atomic_path(self.folder / name) as tmp:
            tmp.mkdir()
            write(tmp)
            write_json(tmp / META, {"fingerprint": self.fingerprint, **state._asdict()})
        for old in self._saved():
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
