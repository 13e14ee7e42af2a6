"""Compiled training of teachers and students, many seeds at once.

One call of :func:`teacher_epoch` or :func:`student_epoch` runs a whole epoch for every
seed of a chunk as one XLA program: ``lax.scan`` over the steps, ``lax.map`` over the
seeds (vectorized ``vmap_seeds`` at a time) and, for students, ``vmap`` over the four
student conditions of a teacher. The four students of one teacher see the same noise
batch, so the teacher's forward pass on it is computed once per step and shared. With
several devices, ``shard_map`` gives each device its share of the seeds.

Why ``lax.map`` rather than one ``vmap`` over all seeds: a vmapped gradient's rounding
depends on how many seeds share the batched kernels, and training amplifies those last
bits into visibly different accuracies. Mapping ``vmap_seeds`` at a time makes every
seed's numbers independent of the chunk size and of the number of devices, so a sharded
or resumed run reproduces a plain one exactly. On a CPU it is also faster (the per-seed
matrix products are already large); on an accelerator, raise ``vmap_seeds``.

Leading axes: ``[seeds, ...]`` for teachers and their optimizer states,
``[seeds, conditions, ...]`` for students. Shapes never depend on the data (the last,
shorter batch of an epoch is padded and weighted out), so each function compiles once per
configuration and chunk size.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec
from jaxtyping import Array, Float, Int, PRNGKeyArray

from toymodels.conditions import STUDENT_CONDITIONS
from toymodels.config import MnistConfig
from toymodels.data import normalize
from toymodels.losses import STUDENT_LOSSES, digit_cross_entropy
from toymodels.model import N_DIGITS, MLPSpec, apply
from toymodels.noise import student_inputs
from toymodels.precision import compute_dtype
from toymodels.track import METRICS, steps_per_epoch, track_point, tracked_steps, tree_sub


def spec_of(config: MnistConfig | ProgramSpec) -> MLPSpec:
    return MLPSpec(
        hidden=tuple(config.hidden), n_aux=config.n_aux, init_scale=config.init_scale, precision=config.precision
    )


def make_optimizer(config: MnistConfig | ProgramSpec, *, students: bool = False) -> optax.GradientTransformation:
    """The teacher's optimizer (``config.optimizer`` at ``config.learning_rate``), or with
    ``students`` the students' (``student_optimizer``/``student_learning_rate``, each
    defaulting to the teacher's); PyTorch-default hyperparameters besides the rate.

    With gradient ``g``, rate ``lr`` and parameters ``theta``, one step of

    - ``adam``, ``adamw``: Adam (betas 0.9/0.999, eps 1e-8; ``adamw`` with decoupled weight
      decay 0.01);
    - ``sgd``: ``b <- momentum * b + g`` (``b`` starts at 0), ``theta <- theta - lr * b``;
    - ``signsgd``: ``theta <- theta - lr * sign(g)``.

    Example (the first signSGD step for gradients 2, -3 and 0.5):

    >>> import jax.numpy as jnp
    >>> from toymodels.config import MnistConfig
    >>> config = MnistConfig(student_optimizer="signsgd", student_learning_rate=0.1)
    >>> tx = make_optimizer(config, students=True)
    >>> g = {"w": jnp.array([2.0, -3.0, 0.5])}
    >>> updates, _ = tx.update(g, tx.init(g))
    >>> [round(u, 6) for u in updates["w"].tolist()]
    [-0.1, 0.1, -0.1]
    """
    name = config.optimizer
    rate = config.learning_rate
    if students:
        name = config.optimizer if config.student_optimizer is None else config.student_optimizer
        rate = config.learning_rate if config.student_learning_rate is None else config.student_learning_rate
    if name == "adam":
        return optax.adam(rate)
    if name == "adamw":
        return optax.adamw(rate, weight_decay=1e-2)
    if name == "sgd":
        return optax.sgd(rate, momentum=config.momentum or None)
    if name == "signsgd":
        return optax.chain(optax.scale_by_sign(), optax.scale_by_learning_rate(rate))
    raise ValueError(f"unknown optimizer {name!r}")


class EpochPlan(NamedTuple):
    """Example order of one epoch: ``steps x batch`` indices and their loss weights."""

    indices: Int[Array, "steps batch"]
    weights: Float[Array, "steps batch"]


def epoch_plan(key: PRNGKeyArray, n_examples: int, batch_size: int) -> EpochPlan:
    """Shuffle ``n_examples`` and cut them into batches; pad the last batch with weight-0 rows.

    Each batch's weights sum to one, so a weighted sum is the mean over its real examples.
    """
    steps = math.ceil(n_examples / batch_size)
    order = jax.random.permutation(key, n_examples)
    padded = jnp.zeros(steps * batch_size, order.dtype).at[:n_examples].set(order)
    real = (jnp.arange(steps * batch_size) < n_examples).reshape(steps, batch_size)
    weights = real / jnp.sum(real, axis=1, keepdims=True)
    return EpochPlan(padded.reshape(steps, batch_size), weights.astype(jnp.float32))


def over_seeds(one_seed, n_seeded: int, vmap_seeds: int, mesh: Mesh | None):
    """Lift ``one_seed(*seeded, *shared)`` to arguments whose first ``n_seeded`` carry a seed axis.

    Seeds are mapped ``vmap_seeds`` at a time; with a ``mesh``, the seed axis is split
    over its ``"seeds"`` devices and each device maps over its own seeds.
    """

    def mapped(*args):
        seeded, shared = args[:n_seeded], args[n_seeded:]
        return jax.lax.map(lambda a: one_seed(*a, *shared), seeded, batch_size=vmap_seeds if vmap_seeds > 1 else None)

    if mesh is None:
        return mapped

    def sharded(*args):
        # Seeds never exchange data, so there is no cross-device value to type-check.
        specs = (PartitionSpec("seeds"),) * n_seeded + (PartitionSpec(),) * (len(args) - n_seeded)
        return jax.shard_map(mapped, mesh=mesh, in_specs=specs, out_specs=PartitionSpec("seeds"), check_vma=False)(
            *args
        )

    return sharded


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
    """Everything the compiled programs read from a config, and nothing else.

    The compiled-function caches below are keyed on it, so runs that differ only in what
    the programs never see (seeds, epochs, data subsets, the students' perturbation,
    chunking) reuse one compilation. The programs are built from this object, not from
    the config: a config field read there without being listed here fails at once
    (``AttributeError``) instead of silently reusing a program built for another value.
    """

    # architecture
    n_aux: int
    hidden: tuple[int, ...]
    init_scale: float
    precision: str
    # optimizers, teacher and student batches
    optimizer: str
    learning_rate: float
    student_optimizer: str | None
    student_learning_rate: float | None
    momentum: float
    batch_size: int
    # the students' inputs and loss
    n_noise: int
    student_data: str
    student_loss: str
    temperature: float
    # in-program measurement and vectorization
    track: int
    vmap_seeds: int

    @classmethod
    def of(cls, config: MnistConfig) -> ProgramSpec:
        values = {f.name: getattr(config, f.name) for f in dataclasses.fields(cls)}
        return cls(**{**values, "hidden": tuple(values["hidden"])})  # a list would not hash


def teacher_epoch(config: MnistConfig, mesh: Mesh | None = None):
    """Compiled ``(params, opt_state, keys, images, labels) -> (params, opt_state, mean_loss)``.

    See :func:`_teacher_epoch`.
    """
    return _teacher_epoch(ProgramSpec.of(config), mesh)


def student_epoch(config: MnistConfig, mesh: Mesh | None = None):
    """Compiled epoch of the students of every seed in a chunk; see :func:`_student_epoch`."""
    return _student_epoch(ProgramSpec.of(config), mesh)


def accuracy(config: MnistConfig, mesh: Mesh | None = None):
    """Compiled ``(params[seeds, models...], images, labels) -> accuracy``; see :func:`_accuracy`."""
    return _accuracy(ProgramSpec.of(config), mesh)


@functools.lru_cache(maxsize=None)
def _teacher_epoch(program: ProgramSpec, mesh: Mesh | None = None):
    """Compiled ``(params, opt_state, keys, images, labels) -> (params, opt_state, mean_loss)``.

    ``params``/``opt_state``/``keys`` have a leading seed axis; ``images`` (``uint8``) and
    ``labels`` are shared. Teachers train on the digit cross-entropy only, so their
    auxiliary logits never receive a direct gradient.
    """
    spec = spec_of(program)
    optimizer = make_optimizer(program)

    def loss_fn(params, images, labels, weights):
        return digit_cross_entropy(apply(spec, params, normalize(images)), labels, weights)

    def one_seed(params, opt_state, key, images, labels):
        plan = epoch_plan(key, images.shape[0], program.batch_size)

        def step(carry, batch):
            params, opt_state = carry
            idx, weights = batch
            loss, grads = jax.value_and_grad(loss_fn)(params, images[idx], labels[idx], weights)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), plan)
        return params, opt_state, jnp.mean(losses)

    return jax.jit(over_seeds(one_seed, 3, program.vmap_seeds, mesh), donate_argnums=(0, 1))


@functools.lru_cache(maxsize=None)
def _student_epoch(program: ProgramSpec, mesh: Mesh | None = None):
    """Compiled epoch of the students of every seed in a chunk.

    Signature ``(students, opt_states, teachers, noise_words, keys, masks) ->
    (students, opt_states, mean_losses)`` with students ``[seeds, conditions, ...]``,
    teachers ``[seeds, ...]``, ``noise_words`` ``[seeds, 2]`` (the seed's fixed noise set),
    ``keys`` ``[seeds]`` (this epoch's shuffle) and ``masks`` ``[conditions, n_out]`` (the
    logits each condition imitates).

    With ``program.track = N > 0`` the epoch also measures the students every ``N`` steps
    (:mod:`toymodels.track`): ``(students, opt_states, teachers, noise_words, keys,
    starts, references, masks, probe_images, probe_labels) -> (students, opt_states,
    mean_losses, tracks)``, with ``starts`` ``[seeds, conditions, ...]`` the students'
    parameters before their first epoch, ``references`` ``[seeds, ...]`` the teachers'
    initializations, the probe batch shared, and ``tracks`` ``[seeds, conditions, 1 + P,
    metrics]``: the point at the epoch's start, then its ``P`` tracked points. The
    measurement sits in a ``lax.cond`` on a static per-step flag, so untracked steps pay
    nothing; without tracking the program is the one of a run that never tracks.

    With MNIST images as student data (``program.student_data`` in
    :data:`toymodels.config.IMAGE_DATA`), both signatures take one more, shared, last
    argument: the ``uint8`` training images the students' batches are gathered from
    (:func:`toymodels.noise.student_inputs`). Noise runs do not take it, so their
    program is unchanged.
    """
    spec = spec_of(program)
    optimizer = make_optimizer(program, students=True)
    imitation = STUDENT_LOSSES[program.student_loss]

    def loss_fn(params, x, teacher_logits, weights, mask):
        return imitation(apply(spec, params, x), teacher_logits, weights, mask, program.temperature)

    grad_all_conditions = jax.vmap(jax.value_and_grad(loss_fn), in_axes=(0, None, None, None, 0))
    update_all_conditions = jax.vmap(optimizer.update)

    def train_step(students, opt_states, teacher, words, masks, batch, pool):
        ids, weights = batch
        x = student_inputs(words, ids, pool, program.student_data, spec.d_in, compute_dtype(program.precision))
        teacher_logits = jax.lax.stop_gradient(apply(spec, teacher, x))
        losses, grads = grad_all_conditions(students, x, teacher_logits, weights, masks)
        updates, opt_states = update_all_conditions(grads, opt_states, students)
        return optax.apply_updates(students, updates), opt_states, updates, losses

    def one_seed(students, opt_states, teacher, words, key, masks, *pool):
        plan = epoch_plan(key, program.n_noise, program.batch_size)

        def step(carry, batch):
            students, opt_states, _, losses = train_step(*carry, teacher, words, masks, batch, *pool or (None,))
            return (students, opt_states), losses

        (students, opt_states), losses = jax.lax.scan(step, (students, opt_states), plan)
        return students, opt_states, jnp.mean(losses, axis=0)

    if not program.track:
        return jax.jit(over_seeds(one_seed, 5, program.vmap_seeds, mesh), donate_argnums=(0, 1))

    n_steps = steps_per_epoch(program.n_noise, program.batch_size)
    tracked = tracked_steps(n_steps, program.track)
    flags = np.zeros(n_steps, bool)
    flags[tracked] = True
    n_conditions = len(STUDENT_CONDITIONS)

    def one_seed_tracked(
        students, opt_states, teacher, words, key, starts, reference, masks, probe_images, probe_labels, *pool
    ):
        plan = epoch_plan(key, program.n_noise, program.batch_size)
        direction = jax.lax.stop_gradient(tree_sub(teacher, reference))
        x_probe = normalize(probe_images)
        measure = jax.vmap(
            lambda student, start, step: track_point(spec, student, start, direction, step, x_probe, probe_labels)
        )
        # The epoch's start has no step of its own; track_point gives it a step cosine of 0.
        at_start = jax.vmap(
            lambda student, start: track_point(spec, student, start, direction, None, x_probe, probe_labels)
        )(students, starts)

        def step(carry, batch_and_flag):
            batch, flag = batch_and_flag
            students, opt_states, updates, losses = train_step(*carry, teacher, words, masks, batch, *pool or (None,))
            point = jax.lax.cond(
                flag,
                lambda: measure(students, starts, updates),
                lambda: jnp.zeros((n_conditions, len(METRICS)), jnp.float32),
            )
            return (students, opt_states), (losses, point)

        (students, opt_states), (losses, points) = jax.lax.scan(
            step, (students, opt_states), (plan, jnp.asarray(flags))
        )
        tracks = jnp.concatenate([at_start[None], points[tracked]], axis=0)  # [1 + P, conditions, metrics]
        return students, opt_states, jnp.mean(losses, axis=0), jnp.swapaxes(tracks, 0, 1)

    return jax.jit(over_seeds(one_seed_tracked, 7, program.vmap_seeds, mesh), donate_argnums=(0, 1))


@functools.lru_cache(maxsize=None)
def _accuracy(program: ProgramSpec, mesh: Mesh | None = None, eval_batch: int = 1000):
    """Compiled ``(params[seeds, models...], images, labels) -> accuracy[seeds, models...]``.

    Accuracy is over the ten digit logits. After the seed axis ``params`` may carry more
    model axes; the test set is streamed in batches of ``eval_batch`` images so memory
    does not grow with the number of models. Evaluation is float32 whatever the
    training precision.
    """
    spec = dataclasses.replace(spec_of(program), precision="float32")

    def one_model(params, images, labels):
        n = images.shape[0]
        batch = min(eval_batch, n)
        steps = math.ceil(n / batch)
        pad = steps * batch - n
        images = jnp.pad(images, ((0, pad), (0, 0))).reshape(steps, batch, -1)
        labels = jnp.pad(labels.astype(jnp.int32), (0, pad), constant_values=-1).reshape(steps, batch)

        def count(total, chunk):
            x, y = chunk
            predicted = jnp.argmax(apply(spec, params, normalize(x))[:, :N_DIGITS], axis=-1)
            return total + jnp.sum(predicted == y), None

        correct, _ = jax.lax.scan(count, jnp.zeros((), jnp.int32), (images, labels))
        return correct / n

    def one_seed(params, images, labels):
        models = params["layers"][0]["kernel"].ndim - 2  # a kernel is rank 2 per model
        fn = one_model
        for _ in range(models):
            fn = jax.vmap(fn, in_axes=(0, None, None))
        return fn(params, images, labels)

    return jax.jit(over_seeds(one_seed, 1, program.vmap_seeds, mesh))
