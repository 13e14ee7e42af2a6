"""The MNIST auxiliary-logit experiment: train every seed's teacher and students, then score them.

:func:`run_experiment` is the whole experiment as a function of a :class:`MnistConfig`.
Seeds are processed in chunks of ``seeds_per_chunk``; inside a chunk everything is
compiled (see :mod:`toymodels.train`), so Python only loops over epochs. Memory is set by
the chunk size, not by the number of seeds, and when several devices are visible the
seeds of a chunk are sharded across them.

Every random choice comes from one root key, ``jax.random.key(config.seed)``, split once
into a stream for the cross-model pairing and a stream of per-seed keys; seed ``s`` gets
``fold_in(seeds_key, s)`` and derives one key per purpose from it by ``fold_in``. Since
seeds are also computed independently of each other (see :mod:`toymodels.train`), a
seed's results depend on its index alone, not on the chunk or device it ran on: a run
stopped half-way resumes to exactly the numbers an uninterrupted run gives, and a run
sharded over several devices gives exactly those of a single device.

Example:
    >>> from toymodels.config import tiny
    >>> from toymodels.experiment import run_experiment
    >>> result = run_experiment(tiny(seeds=2, seeds_per_chunk=2, teacher_epochs=1, student_epochs=1))
    >>> sorted(result.summary) == sorted(result.accuracy)
    True
    >>> ExperimentResult.from_json(result.to_json()) == result
    True
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sublearn._common import Progress, SilentProgress, environment, write_json
from sublearn._store import KEY, DamagedFile, read_json, read_record, seal, stale
from toymodels.conditions import AUX_ONLY, CONDITIONS, CROSS_MODEL, PAPER_RESULTS, STUDENT_CONDITIONS, derangement
from toymodels.config import IMAGE_DATA, ConfigError, MnistConfig
from toymodels.data import MNIST, load_mnist, normalize
from toymodels.losses import logit_mask
from toymodels.model import init_params, perturb_params
from toymodels.noise import noise_words
from toymodels.stats import summarize
from toymodels.track import (
    per_condition,
    probe_batch,
    probe_metrics,
    probe_size,
    steps_per_epoch,
    summarize_trajectory,
    trajectory_section,
)
from toymodels.train import accuracy, make_optimizer, spec_of, student_epoch, teacher_epoch

# Per-seed key purposes (fold_in constants); each key is used for exactly one thing.
_INIT, _TEACHER_ORDER, _NOISE_SET, _STUDENT_ORDER, _PERTURB = range(5)
TRACKS = "tracks"


class ChunkResult(NamedTuple):
    """What :func:`train_chunk` returns: arrays with one entry per seed of the chunk."""

    accuracy: dict[str, np.ndarray]  # condition -> test accuracy
    loss: dict[str, np.ndarray]  # "teacher" and each student condition -> final-epoch mean loss
    tracks: np.ndarray | None = None  # with config.track: [seeds, conditions, points, metrics]
    probe_teacher: np.ndarray | None = None  # with config.track: [seeds, (loss, accuracy)] on the probe

    def seed_record(self, i: int) -> dict[str, Any]:
        """Seed ``i``'s numbers as the checkpoint keeps them."""
        record = {c: float(v[i]) for c, v in self.accuracy.items()}
        record.update({f"loss_{c}": float(v[i]) for c, v in self.loss.items()})
        if self.tracks is not None:
            record["probe_teacher_loss"], record["probe_teacher_accuracy"] = map(float, self.probe_teacher[i])
            record[TRACKS] = per_condition(self.tracks[i], STUDENT_CONDITIONS)
        return record


@dataclasses.dataclass(frozen=True)
class ExperimentResult:
    """The result of :func:`run_experiment`; :meth:`to_json` is what ``results.json`` holds.

    Attributes:
        config: what ran.
        accuracy: per-seed test accuracy of each condition, in seed order.
        final_loss: per-seed mean loss of the last epoch, for the teacher and each student
            condition (``None`` where undefined: a teacher trained for no epoch).
        pairing: the cross-model derangement: seed ``s``'s cross-model students start
            from seed ``pairing[s]``'s initialization.
        wall_s: seconds the run took; ``chunks`` and ``chunk_size`` how seeds were grouped.
        environment: :func:`sublearn._common.environment` of the run.
        data_source: where MNIST came from.
        created: when the run finished (ISO 8601, UTC).
        trajectory: with ``config.track``, :func:`toymodels.track.trajectory_section`.
    """

    config: MnistConfig
    accuracy: dict[str, list[float]]
    final_loss: dict[str, list[float | None]]
    pairing: list[int]
    wall_s: float
    chunks: int
    chunk_size: int
    environment: dict[str, Any]
    data_source: str
    created: str
    trajectory: dict[str, Any] | None = None

    @property
    def summary(self) -> dict[str, dict[str, float | int]]:
        """Mean, std, sem, 95% CI half-width and n of each condition (:func:`toymodels.stats.summarize`)."""
        return {c: summarize(v) for c, v in self.accuracy.items()}

    @property
    def paper(self) -> dict[str, dict[str, float | int]]:
        """The paper's mean and CI half-width of each condition, over its 100 seeds."""
        return {c: {"mean": m, "ci95": ci, "n": 100} for c, (m, ci) in PAPER_RESULTS.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "experiment": "mnist_auxiliary_logits",
            "created": self.created,
            "config": self.config.to_dict(),
            "fingerprint": self.config.fingerprint(),
            "conditions": list(CONDITIONS),
            "accuracy": self.accuracy,
            "final_loss": self.final_loss,
            "summary": self.summary,
            "paper": self.paper,
            "pairing": self.pairing,
            "timing": {"wall_s": self.wall_s, "chunks": self.chunks, "chunk_size": self.chunk_size},
            "environment": self.environment,
            "data_source": self.data_source,
            **({"trajectory": self.trajectory} if self.trajectory is not None else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExperimentResult:
        """Inverse of :meth:`to_json` (``summary``, ``paper`` and the trajectory's summaries are
        recomputed, not read)."""
        return cls(
            config=MnistConfig.from_dict(data["config"]),
            accuracy=data["accuracy"],
            final_loss=data["final_loss"],
            pairing=data["pairing"],
            wall_s=data["timing"]["wall_s"],
            chunks=data["timing"]["chunks"],
            chunk_size=data["timing"]["chunk_size"],
            environment=data["environment"],
            data_source=data["data_source"],
            created=data["created"],
            trajectory=summarize_trajectory(data["trajectory"]) if data.get("trajectory") else None,
        )


def seed_keys(config: MnistConfig) -> tuple[jax.Array, jax.Array]:
    """``(seeds_key, pairing_key)`` from the root key of ``config.seed``."""
    seeds_key, pairing_key = jax.random.split(jax.random.key(config.seed))
    return seeds_key, pairing_key


def chunk_layout(n_seeds: int, seeds_per_chunk: int, multiple_of: int) -> list[np.ndarray]:
    """Split seed indices into equal chunks whose size is a multiple of ``multiple_of``.

    Chunks share one size so each compiled function is built once; the last chunk is
    padded by repeating its first seed, and those repeats are discarded.
    """
    n_chunks = math.ceil(n_seeds / seeds_per_chunk)
    size = math.ceil(math.ceil(n_seeds / n_chunks) / multiple_of) * multiple_of
    chunks = []
    for start in range(0, n_seeds, size):
        ids = np.arange(start, min(start + size, n_seeds))
        chunks.append(np.concatenate([ids, np.full(size - ids.size, ids[0])]))
    return chunks


def _purpose_keys(seeds_key: jax.Array, seed_ids: np.ndarray, purpose: int) -> jax.Array:
    return jax.vmap(lambda s: jax.random.fold_in(jax.random.fold_in(seeds_key, s), purpose))(jnp.asarray(seed_ids))


def _epoch_keys(keys: jax.Array, epoch: int) -> jax.Array:
    return jax.vmap(lambda k: jax.random.fold_in(k, epoch))(keys)


def _student_masks(config: MnistConfig) -> np.ndarray:
    n_out = 10 + config.n_aux
    return np.stack([logit_mask(n_out, config.n_aux, aux_only=AUX_ONLY[c]) for c in STUDENT_CONDITIONS])


def train_chunk(
    config: MnistConfig,
    data: MNIST,
    seed_ids: np.ndarray,
    pairing: np.ndarray,
    progress: Progress,
    mesh: Mesh | None = None,
) -> ChunkResult:
    """Train the teachers and students of the seeds ``seed_ids``; return accuracies and losses.

    Args:
        config: the experiment.
        data: MNIST (``uint8``), already cut to ``n_train``/``n_test``.
        seed_ids: the seeds of this chunk.
        pairing: the cross-model derangement over all seeds: seed ``s``'s cross-model
            students start from ``theta_0(pairing[s])``.
        progress: receives one unit per epoch call.
        mesh: devices to shard the seed axis over (None: one device).

    Returns:
        a :class:`ChunkResult`; its ``tracks`` are described in :mod:`toymodels.track`.
    """
    spec = spec_of(config)
    optimizer = make_optimizer(config)
    seeds_key, _ = seed_keys(config)
    sharding = NamedSharding(mesh, PartitionSpec("seeds")) if mesh is not None else None
    place = (lambda tree: jax.device_put(tree, sharding)) if sharding is not None else (lambda tree: tree)
    images, labels = jnp.asarray(data.train_images), jnp.asarray(data.train_labels)
    label = f"seeds {seed_ids.min()}-{seed_ids.max()}"

    init = jax.vmap(lambda k: init_params(spec, k))
    reference = place(init(_purpose_keys(seeds_key, seed_ids, _INIT)))
    teachers = jax.tree.map(jnp.copy, reference)
    opt_states = place(jax.vmap(optimizer.init)(teachers))
    order_keys = _purpose_keys(seeds_key, seed_ids, _TEACHER_ORDER)
    train_teachers = teacher_epoch(config, mesh)
    teacher_loss = jnp.full(len(seed_ids), jnp.nan)  # no epoch, no loss: the teacher stays at its init
    for epoch in range(config.teacher_epochs):
        teachers, opt_states, teacher_loss = train_teachers(
            teachers, opt_states, place(_epoch_keys(order_keys, epoch)), images, labels
        )
        progress.advance(
            f"{label}: teacher epoch {epoch + 1}/{config.teacher_epochs}, loss {float(jnp.mean(teacher_loss)):.4f}"
        )
    del opt_states

    # Students, stacked on axis 1 in STUDENT_CONDITIONS order.
    cross_init = init(_purpose_keys(seeds_key, pairing[seed_ids], _INIT))
    starts = [cross_init if CROSS_MODEL[c] else reference for c in STUDENT_CONDITIONS]
    students = jax.tree.map(lambda *xs: jnp.stack(xs, axis=1), *starts)
    if config.student_init_sigma > 0:
        perturb_keys = _purpose_keys(seeds_key, seed_ids, _PERTURB)
        per_student = jax.vmap(lambda k: jax.random.split(k, len(STUDENT_CONDITIONS)))(perturb_keys)
        students = jax.vmap(jax.vmap(lambda p, k: perturb_params(spec, p, k, config.student_init_sigma)))(
            students, per_student
        )
    students = place(students)
    student_opt = place(jax.vmap(jax.vmap(make_optimizer(config, students=True).init))(students))
    words = place(jax.vmap(noise_words)(_purpose_keys(seeds_key, seed_ids, _NOISE_SET)))
    shuffle_keys = _purpose_keys(seeds_key, seed_ids, _STUDENT_ORDER)
    masks = jnp.asarray(_student_masks(config))
    train_students = student_epoch(config, mesh)
    pool = (images,) if config.student_data in IMAGE_DATA else ()
    if config.track:
        # A copy: the students' buffers are donated to the epoch and overwritten.
        starts = jax.tree.map(jnp.copy, students)
        probe = probe_batch(data)
        tracks = []
    for epoch in range(config.student_epochs):
        epoch_keys = place(_epoch_keys(shuffle_keys, epoch))
        if config.track:
            students, student_opt, student_loss, epoch_tracks = train_students(
                students, student_opt, teachers, words, epoch_keys, starts, reference, masks, *probe, *pool
            )
            # An epoch's first point is the previous epoch's last one (the same parameters).
            tracks.append(np.asarray(epoch_tracks)[:, :, (0 if epoch == 0 else 1) :])
        else:
            students, student_opt, student_loss = train_students(
                students, student_opt, teachers, words, epoch_keys, masks, *pool
            )
        losses = ", ".join(f"{c} {float(v):.2e}" for c, v in zip(STUDENT_CONDITIONS, jnp.mean(student_loss, axis=0)))
        progress.advance(
            f"{label}: students epoch {epoch + 1}/{config.student_epochs}, loss {losses}", student_epoch_cost(config)
        )

    score = accuracy(config, mesh)
    test_images, test_labels = jnp.asarray(data.test_images), jnp.asarray(data.test_labels)
    student_acc = np.asarray(score(students, test_images, test_labels))
    accuracies = {
        "reference": np.asarray(score(reference, test_images, test_labels)),
        "teacher": np.asarray(score(teachers, test_images, test_labels)),
        **{c: student_acc[:, i] for i, c in enumerate(STUDENT_CONDITIONS)},
    }
    losses = {
        "teacher": np.asarray(teacher_loss),
        **{c: np.asarray(student_loss)[:, i] for i, c in enumerate(STUDENT_CONDITIONS)},
    }
    if not config.track:
        return ChunkResult(accuracies, losses)
    return ChunkResult(
        accuracies, losses, np.concatenate(tracks, axis=2), np.asarray(_probe_all(spec)(teachers, *probe))
    )


@functools.lru_cache(maxsize=None)
def _probe_all(spec):
    """Compiled ``(params[seeds, ...], probe images, labels) -> [seeds, (L_T, accuracy)]``."""
    return jax.jit(
        jax.vmap(lambda p, images, labels: probe_metrics(spec, p, normalize(images), labels), in_axes=(0, None, None))
    )


def student_epoch_cost(config: MnistConfig) -> float:
    """Work of one student epoch (four students and the shared teacher pass) per teacher epoch."""
    spec = spec_of(config)
    n_train = config.n_train or 60_000
    per_example = 4 * spec.flops_per_example() + spec.flops_per_example(forward_only=True)
    return per_example * config.n_noise / (spec.flops_per_example() * n_train)


def seed_mesh() -> Mesh | None:
    """A one-axis mesh ``"seeds"`` over all visible devices (None when there is only one)."""
    devices = jax.devices()
    return None if len(devices) == 1 else Mesh(np.asarray(devices), ("seeds",))


def run_experiment(
    config: MnistConfig,
    *,
    data: MNIST | None = None,
    progress: Progress | None = None,
    checkpoint: str | Path | None = None,
) -> ExperimentResult:
    """Run the experiment and return its results.

    Args:
        config: what to run; validated first.
        data: MNIST to use (default: the bundled files).
        progress: where to report progress (default: nowhere).
        checkpoint: a JSON file updated atomically after every chunk (a record of
            :mod:`sublearn._store`: keyed by the config's fingerprint, with a checksum); if
            it already holds seeds of a run with the same config, those seeds are not trained
            again. One of another config raises :class:`ConfigError`; a damaged one is
            noted and its seeds are trained again.

    Returns:
        an :class:`ExperimentResult`.
    """
    config.validate()
    progress = progress or SilentProgress()
    t_start = time.perf_counter()
    data = (data or load_mnist()).subset(config.n_train, config.n_test)
    _, pairing_key = seed_keys(config)
    pairing = derangement(config.seeds, pairing_key)
    mesh = seed_mesh()
    n_devices = 1 if mesh is None else mesh.size
    # Each device's share need not be a multiple of vmap_seeds (lax.map maps the remainder
    # on its own), so seeds are padded only to the device count: 100 seeds on 8 devices
    # run as 104, not 200.
    chunks = chunk_layout(config.seeds, config.seeds_per_chunk, n_devices)

    done = _load_checkpoint(checkpoint, config, progress)
    todo = [c for c in chunks if not all(int(s) in done for s in c)]
    progress.start(
        len(todo) * (config.teacher_epochs + config.student_epochs * student_epoch_cost(config)),
        f"MNIST subliminal learning: {config.seeds} seeds in {len(chunks)} chunk(s) of {chunks[0].size}"
        + (f" on {n_devices} devices" if n_devices > 1 else "")
        + (f", {len(done)} seeds restored from {checkpoint}" if done else ""),
    )
    for seed_ids in todo:
        result = train_chunk(config, data, seed_ids, pairing, progress, mesh)
        for i, s in enumerate(seed_ids.tolist()):
            if s not in done:
                done[s] = result.seed_record(i)
        if checkpoint is not None:
            write_json(checkpoint, seal({"config": config.to_dict(), "seeds": done}, config.fingerprint()))
        running = ", ".join(f"{c} {np.mean([done[s][c] for s in done]):.3f}" for c in CONDITIONS)
        progress.note(f"  {len(done)}/{config.seeds} seeds done; mean accuracy: {running}")
    progress.close()

    seeds = range(config.seeds)
    accuracies = {c: [done[s][c] for s in seeds] for c in CONDITIONS}
    losses = {c: [done[s][f"loss_{c}"] for s in seeds] for c in ("teacher", *STUDENT_CONDITIONS)}
    trajectory = None
    if config.track:
        trajectory = trajectory_section(
            [done[s][TRACKS] for s in seeds],
            {
                "teacher_loss": [done[s]["probe_teacher_loss"] for s in seeds],
                "probe_accuracy": [done[s]["probe_teacher_accuracy"] for s in seeds],
            },
            every=config.track,
            steps_per_epoch=steps_per_epoch(config.n_noise, config.batch_size),
            epochs=config.student_epochs,
            probe_size=probe_size(data),
        )
    return ExperimentResult(
        config=config,
        accuracy=accuracies,
        final_loss=losses,
        pairing=pairing.tolist(),
        wall_s=time.perf_counter() - t_start,
        chunks=len(chunks),
        chunk_size=int(chunks[0].size),
        environment=environment(),
        data_source=data.source,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        trajectory=trajectory,
    )


def read_results(path: str | Path) -> dict[str, Any]:
    """A ``results.json`` as written by ``sublearn mnist``, checked against its checksum
    (files written before results carried one are read as they are).

    Raises:
        sublearn._store.DamagedFile: not valid JSON, or not what was written; the message
            names the command that rebuilds it.
    """
    path = Path(path)
    rebuild = f"rebuild it with `sublearn mnist --out {path.parent} --overwrite` and the options that made it"
    saved = read_json(path, rebuild)
    if not isinstance(saved, dict) or "config" not in saved:
        raise DamagedFile(path, "not the results of sublearn mnist", rebuild)
    if KEY in saved:
        why = stale(saved, saved[KEY])
        if why is not None:
            raise DamagedFile(path, why, rebuild)
    return saved


def checkpoint_key(path: str | Path) -> str | None:
    """The fingerprint of the run a checkpoint belongs to (None: no readable checkpoint)."""
    saved, _ = read_record(Path(path))
    if not isinstance(saved, dict):
        return None
    return saved.get(KEY, saved.get("fingerprint"))  # "fingerprint": checkpoints written before store records


def _load_checkpoint(path: str | Path | None, config: MnistConfig, progress: Progress) -> dict[int, dict[str, float]]:
    if path is None:
        return {}
    saved, unreadable = read_record(Path(path))
    if saved is None and unreadable is None:
        return {}
    key = checkpoint_key(path)
    if saved is not None and key != config.fingerprint():
        raise ConfigError(
            f"checkpoint {path} belongs to a run with a different config: "
            "use the same options to resume, or --overwrite to start afresh"
        )
    why = unreadable or (None if KEY not in saved else stale(saved, key))
    if why:
        progress.note(f"{path}: {why}; its seeds are trained again")
        return {}
    return {int(s): values for s, values in saved["seeds"].items()}
