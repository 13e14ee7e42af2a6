"""Losses of the MNIST experiment: the teacher's digit cross-entropy and the students' imitation losses.

Every loss takes per-example ``weights`` that sum to one over a batch. A full batch has
``1/B`` everywhere; the last, shorter batch of an epoch is padded to ``B`` rows with
weight zero, so every step of ``lax.scan`` has the same shape and the mean is still over
the real examples only (as a PyTorch ``DataLoader`` without ``drop_last`` would give).

Students imitate the teacher over a subset of the logits, chosen by a boolean ``mask``
over the ``10 + m`` outputs: the ``m`` auxiliary logits ("aux only") or all of them ("all
logits"). Masked-out logits enter neither softmax, so they get exactly zero gradient.

Example:
    >>> import jax.numpy as jnp
    >>> from toymodels.losses import student_kl, logit_mask
    >>> z = jnp.array([[0.0, 1.0, 2.0]])
    >>> float(student_kl(z, z, jnp.ones(1), logit_mask(3, 1, aux_only=True), 1.0))
    0.0
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Integer

from toymodels.model import N_DIGITS

# Stands in for -inf at masked logits: exp() of it is exactly 0 in float32 and, unlike -inf,
# it never produces inf - inf = nan in a difference or its gradient.
_MASKED = -1e30


def logit_mask(n_out: int, n_aux: int, *, aux_only: bool) -> np.ndarray:
    """Boolean mask over the ``n_out = 10 + n_aux`` logits: the auxiliary ones, or all."""
    mask = np.ones(n_out, dtype=bool)
    if aux_only:
        mask[: n_out - n_aux] = False
    return mask


def digit_cross_entropy(
    logits: Float[Array, "batch n_out"], labels: Integer[Array, " batch"], weights: Float[Array, " batch"]
) -> Float[Array, ""]:
    """Teacher loss: weighted mean cross-entropy of the ten digit logits; aux logits unused.

    .. math:: \\mathcal L_T = -\\sum_i w_i \\log \\operatorname{softmax}(z_{i,0:10})_{y_i}
    """
    log_probs = jax.nn.log_softmax(logits[:, :N_DIGITS], axis=-1)
    picked = jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return -jnp.sum(weights * picked)


def student_kl(
    student_logits: Float[Array, "batch n_out"],
    teacher_logits: Float[Array, "batch n_out"],
    weights: Float[Array, " batch"],
    mask: Bool[Array | np.ndarray, " n_out"],
    temperature: float,
) -> Float[Array, ""]:
    """Weighted mean ``KL(p_T || p_S)`` of the softmaxes over the masked logits at ``temperature``.

    .. math::
        \\mathcal L_S = \\sum_i w_i \\sum_{k \\in S} p_{T,ik} (\\log p_{T,ik} - \\log p_{S,ik}),
        \\quad p_{\\cdot,i} = \\operatorname{softmax}(z_{\\cdot,i,S} / \\tau)
    """
    mask = mask[None, :]
    log_p_student = jax.nn.log_softmax(jnp.where(mask, student_logits / temperature, _MASKED), axis=-1)
    log_p_teacher = jax.nn.log_softmax(jnp.where(mask, teacher_logits / temperature, _MASKED), axis=-1)
    per_logit = jnp.where(mask, jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), 0.0)
    return jnp.sum(weights * jnp.sum(per_logit, axis=-1))


def student_mse(
    student_logits: Float[Array, "batch n_out"],
    teacher_logits: Float[Array, "batch n_out"],
    weights: Float[Array, " batch"],
    mask: Bool[Array | np.ndarray, " n_out"],
    temperature: float,
) -> Float[Array, ""]:
    """Weighted mean over examples of the mean squared logit difference over the masked logits.

    ``temperature`` is accepted for a common signature and not used.
    """
    del temperature
    squared = jnp.where(mask[None, :], (student_logits - teacher_logits) ** 2, 0.0)
    return jnp.sum(weights * jnp.sum(squared, axis=-1)) / jnp.sum(mask)


STUDENT_LOSSES = {"kl": student_kl, "mse": student_mse}
