"""Alignment of the students with their teacher along training (``sublearn mnist --track N``).

With ``config.track = N``, the compiled student epoch (:mod:`toymodels.train`) records,
every ``N`` steps, four numbers per seed and student condition (:data:`METRICS`), with
``theta_0`` the teacher's initialization (the reference), ``theta_T`` the trained teacher,
``theta_S(t)`` a student after ``t`` steps and ``theta_S(0)`` its start:

- ``displacement_cos``: :math:`\\cos(\\theta_S(t) - \\theta_S(0),\\ \\theta_T - \\theta_0)`,
  whether the student has moved the way its teacher moved from the reference;
- ``step_cos``: :math:`\\cos(\\theta_S(t) - \\theta_S(t-1),\\ \\theta_T - \\theta_0)`, the
  alignment of the single optimizer step that arrived at ``t`` (the paper's lemma is about
  this per-step quantity, the displacement is its running sum);
- ``teacher_loss``: the teacher's loss evaluated at the student,
  :math:`\\mathcal L_T(\\theta_S(t))`, the digit cross-entropy on the probe batch;
- ``probe_accuracy``: the student's digit accuracy on the probe batch.

Cosines are over the whole parameter vector (every layer's kernel and bias, flattened),
:math:`\\cos(a, b) = \\langle a, b\\rangle / (\\lVert a\\rVert\\,\\lVert b\\rVert)`. A zero
vector has no direction, and its cosine with anything is defined as 0: at ``t = 0`` no
step has been taken and ``theta_S = theta_S(0)``, so both cosines are exactly 0 there
(rather than NaN, which would poison means over seeds and is not valid JSON).

Tracked points: ``t = 0`` and, in every epoch of ``S`` steps, the parameters after
in-epoch step ``i`` (counted from 0) when ``(i + 1) % N == 0`` or ``i = S - 1``. Ending each
epoch on a point makes the last point the final students, and gives every epoch the same
``ceil(S / N)`` points whatever the data, so the compiled epoch has one output shape.
Points sit every ``N`` steps within an epoch; the gap across an epoch boundary is
``S mod N`` when ``N`` does not divide ``S``.

The probe batch is the first :data:`PROBE_SIZE` test images (fewer if ``n_test`` is
smaller), the same for every seed, condition and point, so the curves differ only by the
parameters. Its forward pass costs 2 FLOPs per weight and image, against about 4.5 per
weight and example for a training step of this MLP (4 in the first layer, 6 above), so
at ``N = 10`` and the paper's batch of 1024 a point adds about
``2 * 1000 / (4.5 * 1024 * 10)``, 4%, to the ``N`` steps before it; the cosines are a few
passes over the parameters and cost far less. Evaluation is float32 whatever the
training precision, as for the test accuracies.

Tracking changes no trained number: the measurement only reads the parameters, so a
tracked run's students are bit-identical to an untracked run's. The recorded values
themselves are sums (over parameters, over probe images) whose last bits can depend on
how many threads XLA gives a device, so a run sharded over several devices reproduces
them to float32 rounding rather than bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Integer, UInt8

from sublearn import _common
from toymodels.data import MNIST
from toymodels.losses import digit_cross_entropy
from toymodels.model import N_DIGITS, MLPSpec, Params, apply
from toymodels.stats import summarize

METRICS = ("displacement_cos", "step_cos", "teacher_loss", "probe_accuracy")
PROBE_SIZE = 1000


def tree_cosine(a: Params, b: Params) -> Float[Array, ""]:
    """Cosine between two parameter pytrees flattened into one vector; 0 if either is zero.

    Products are elementwise sums rather than ``vdot``, so no accelerator lowers them to
    reduced-precision matrix units.
    """
    dot = sum(jnp.sum(x * y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    sq_a = sum(jnp.sum(x * x) for x in jax.tree.leaves(a))
    sq_b = sum(jnp.sum(y * y) for y in jax.tree.leaves(b))
    norms = jnp.sqrt(sq_a) * jnp.sqrt(sq_b)
    return jnp.where(norms > 0, dot / jnp.where(norms > 0, norms, 1.0), 0.0)


def tree_sub(a: Params, b: Params) -> Params:
    return jax.tree.map(jnp.subtract, a, b)


def probe_size(data: MNIST) -> int:
    """Images in the probe batch: :data:`PROBE_SIZE`, or all test images if there are fewer."""
    return min(PROBE_SIZE, len(data.test_labels))


def probe_batch(data: MNIST) -> tuple[UInt8[Array, "n 784"], Integer[Array, " n"]]:
    """The fixed probe batch: the first :func:`probe_size` test images and their labels."""
    n = probe_size(data)
    return jnp.asarray(data.test_images[:n]), jnp.asarray(data.test_labels[:n], dtype=jnp.int32)


def probe_metrics(
    spec: MLPSpec, params: Params, x: Float[Array, "n 784"], labels: Integer[Array, " n"]
) -> Float[Array, "2"]:
    """``[L_T, accuracy]`` of one model on normalized probe images ``x``, in float32."""
    logits = apply(dataclasses.replace(spec, precision="float32"), params, x)
    weights = jnp.full(labels.shape, 1.0 / labels.shape[0], jnp.float32)
    accuracy = jnp.mean(jnp.argmax(logits[:, :N_DIGITS], axis=-1) == labels)
    return jnp.stack([digit_cross_entropy(logits, labels, weights), accuracy])


def track_point(
    spec: MLPSpec,
    student: Params,
    start: Params,
    direction: Params,
    step: Params | None,
    x: Float[Array, "n 784"],
    labels: Integer[Array, " n"],
) -> Float[Array, " metrics"]:
    """The :data:`METRICS` of one student at one point.

    Args:
        spec: the architecture.
        student: ``theta_S(t)``.
        start: ``theta_S(0)``.
        direction: ``theta_T - theta_0``.
        step: ``theta_S(t) - theta_S(t-1)``, or None at a point no step arrived at (its
            cosine is then 0, like a zero step's).
        x, labels: the normalized probe batch.
    """
    step_cos = jnp.zeros((), jnp.float32) if step is None else tree_cosine(step, direction)
    loss, accuracy = probe_metrics(spec, student, x, labels)
    return jnp.stack([tree_cosine(tree_sub(student, start), direction), step_cos, loss, accuracy])


def tracked_steps(steps_per_epoch: int, every: int) -> np.ndarray:
    """In-epoch step indices after which a point is recorded: ``(i + 1) % every == 0`` or the last
    (:func:`sublearn._common.tracked_steps`, as an array).

    Example:
        >>> tracked_steps(25, 10).tolist()
        [9, 19, 24]
    """
    return np.asarray(_common.tracked_steps(steps_per_epoch, every), dtype=int)


def trajectory_steps(steps_per_epoch: int, every: int, epochs: int) -> list[int]:
    """Global step ``t`` (updates taken so far) of every point of a run, starting with 0.

    Example:
        >>> trajectory_steps(25, 10, 2)
        [0, 10, 20, 25, 35, 45, 50]
    """
    within = tracked_steps(steps_per_epoch, every) + 1
    return [0] + [int(e * steps_per_epoch + t) for e in range(epochs) for t in within]


def steps_per_epoch(n_noise: int, batch_size: int) -> int:
    return math.ceil(n_noise / batch_size)


def per_condition(tracks: np.ndarray, conditions: tuple[str, ...]) -> dict[str, dict[str, list[float]]]:
    """One seed's ``[conditions, points, metrics]`` array as ``{condition: {metric: [points]}}``."""
    return {
        c: {m: tracks[i, :, j].astype(float).tolist() for j, m in enumerate(METRICS)} for i, c in enumerate(conditions)
    }


def trajectory_section(
    per_seed: list[dict[str, dict[str, list[float]]]],
    teacher: dict[str, list[float]],
    *,
    every: int,
    steps_per_epoch: int,
    epochs: int,
    probe_size: int,
) -> dict[str, Any]:
    """The ``"trajectory"`` section of the results: steps, per-seed curves and their summaries.

    Args:
        per_seed: one :func:`per_condition` dict per seed, in seed order.
        teacher: the teachers' ``teacher_loss`` and ``probe_accuracy`` on the probe batch,
            one value per seed (the level a student would reach by copying its teacher).
        every, steps_per_epoch, epochs, probe_size: how the points were taken.

    Returns:
        ``{"every", "steps", "probe", "metrics", "teacher", "conditions"}`` where
        ``conditions[c][m]`` holds ``values`` (seeds x points) and the per-point ``mean``
        and ``ci95`` of :func:`toymodels.stats.summarize`.
    """
    conditions = {c: {m: {"values": [seed[c][m] for seed in per_seed]} for m in METRICS} for c in per_seed[0]}
    return summarize_trajectory(
        {
            "every": every,
            "steps_per_epoch": steps_per_epoch,
            "steps": trajectory_steps(steps_per_epoch, every, epochs),
            "probe": {"images": f"the first {probe_size} MNIST test images", "n": probe_size},
            "metrics": list(METRICS),
            "teacher": {m: {"values": v} for m, v in teacher.items()},
            "conditions": conditions,
        }
    )


def summarize_trajectory(trajectory: dict[str, Any]) -> dict[str, Any]:
    """``trajectory`` with every summary (each point's ``mean`` and ``ci95``, the teachers'
    :func:`toymodels.stats.summarize`) computed afresh from the per-seed ``values``: the
    summaries are derived data, so results read back show today's statistics."""
    conditions = {}
    for c, metrics in trajectory["conditions"].items():
        conditions[c] = {}
        for m, curve in metrics.items():
            points = [summarize(column) for column in zip(*curve["values"])]
            conditions[c][m] = {
                "values": curve["values"],
                "mean": [p["mean"] for p in points],
                "ci95": [p["ci95"] for p in points],
            }
    teacher = {m: {"values": t["values"], **summarize(t["values"])} for m, t in trajectory["teacher"].items()}
    return {**trajectory, "teacher": teacher, "conditions": conditions}
