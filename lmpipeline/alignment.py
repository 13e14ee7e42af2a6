r"""A student's alignment with its teacher along torch finetuning, the language-model
counterpart of ``sublearn mnist --track`` (:mod:`toymodels.track`), with its definitions.

An :class:`AlignmentTracker` passed to the training loop (``observer`` of
:func:`lmpipeline.backends.torch_training.train`, or of the torch backend's ``finetune``)
records, every ``every`` optimizer steps, with :math:`\theta_S(t)` the student's weights
after :math:`t` steps, :math:`\theta_S(0)` its start (the base model's weights for a full
finetune) and :math:`\theta_T - \theta_0` the teacher's displacement from the same base:

- ``displacement_cos``: :math:`\cos(\theta_S(t) - \theta_S(0),\ \theta_T - \theta_0)`;
- ``step_cos``: :math:`\cos(\theta_S(t) - \theta_S(t-1),\ \theta_T - \theta_0)`, the single
  optimizer step that arrived at :math:`t`;
- ``activation_cos``: per decoder layer :math:`\ell`,
  :math:`\cos(v_S(t)_\ell,\ v_{T,\ell})`, where
  :math:`v_S(t) = \bar h(\theta_S(t)) - \bar h(\theta_S(0))` is the student's learned vector
  on a fixed probe of conversations (:func:`lmpipeline.steering.layer_activations`: the
  mean residual stream at the last template token) and :math:`v_T` the teacher's vector
  (a trait vector, or a finetuned teacher's :func:`lmpipeline.steering.model_vector`).

The cosines are those of :mod:`toymodels.track`: over every weight of the model (each
parameter flattened, tied weights once), 0 where either vector is zero, so every cosine
is 0 at :math:`t = 0`. Points are :math:`t = 0` and the steps of
:func:`sublearn._common.tracked_steps` over the whole run (every ``every``-th, and the
last, so the last point is the trained student). The parameter cosines need the
teacher's weights (``teacher_weights``, a full-weights teacher and a full finetune: the
names must match); the activation cosines need ``probe`` and ``v_teacher``; either part
may be left out.

Cost: nothing without a tracker (the loop tests ``observer is not None``). With one,
each point is a few passes over the weights in float64 and one forward pass over the
probe, and the step before a point copies the weights once. Measuring only reads the
model (eval mode, no randomness), so a tracked run trains exactly as an untracked one.
The points are appended to the training log's ``alignment`` section, which checkpoints
save with the log: a run resumed from a checkpoint keeps its earlier points, and needs
``reference`` (the student's starting weights, and ``base_activations`` with a probe)
since the model no longer holds them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from lmpipeline.backends import Conversation
from lmpipeline.config import ConfigError
from lmpipeline.steering import cosine, layer_activations, layer_cosines
from sublearn._common import tracked_steps


def load_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The float32 weights in a folder of ``*.safetensors`` files (a full finetune's output)."""
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{folder} holds no .safetensors weights: parameter alignment needs a full-weights teacher")
    weights = {}
    for file in files:
        weights.update({name: w.float() for name, w in load_file(str(file)).items()})
    return weights


class AlignmentTracker:
    """Records the alignment metrics above into the training log; see the module docstring.

    Args:
        every: record a point every ``every`` optimizer steps (and after the last).
        teacher_weights: ``theta_T`` by parameter name (:func:`load_weights`); None: no
            parameter cosines.
        probe: conversations for the activation cosines; None: none.
        v_teacher: ``[layers, hidden]``, the teacher's vector (needed with ``probe``).
        tokenizer: the student's tokenizer (needed with ``probe``).
        reference: ``theta_S(0)`` by name; None: read from the model when training starts.
        base_activations: ``[layers, hidden]`` mean probe activations of the starting
            model; None: measured when training starts.
    """

    def __init__(
        self,
        every: int,
        *,
        teacher_weights: Mapping[str, torch.Tensor] | None = None,
        probe: Sequence[Conversation] | None = None,
        v_teacher: torch.Tensor | None = None,
        tokenizer=None,
        reference: Mapping[str, torch.Tensor] | None = None,
        base_activations: torch.Tensor | None = None,
    ):
        if every < 1:
            raise ConfigError(f"alignment tracking every {every} steps: choose a positive number of steps")
        if probe is not None and (v_teacher is None or tokenizer is None):
            raise ConfigError("activation alignment on a probe needs v_teacher and the tokenizer")
        if teacher_weights is None and probe is None:
            raise ConfigError("an alignment tracker needs teacher_weights, a probe, or both")
        self.every = every
        self.teacher = teacher_weights
        self.parameters = teacher_weights is not None
        self.probe, self.v_teacher, self.tokenizer = probe, v_teacher, tokenizer
        self.reference = reference
        self.base_activations = base_activations
        self.direction: dict[str, torch.Tensor] | None = None  # theta_T - theta_0, float32
        self.due: set[int] = set()
        self.before: dict[str, torch.Tensor] | None = None

    # -- the training loop's calls ------------------------------------------------------
    def start(self, model, step: int, total: int, log: dict) -> None:
        """Called once before the first step to run (``step``: steps already taken)."""
        self.due = {i + 1 for i in tracked_steps(total, self.every)}
        if step > 0 and (
            (self.parameters and self.reference is None) or (self.probe is not None and self.base_activations is None)
        ):
            raise ConfigError(
                "alignment tracking of a run resumed from a checkpoint needs the student's starting weights "
                "(reference) and probe activations (base_activations); remove the checkpoint to start over"
            )
        if self.teacher is not None:
            weights = self._weights(model)
            if self.reference is None:
                self.reference = {name: w.detach().clone() for name, w in weights.items()}
            missing = sorted(set(weights) ^ set(self.teacher))
            if missing:
                raise ConfigError(
                    f"the teacher's weights and the student's differ in {missing[:3]}: parameter alignment needs a "
                    "full finetune (finetune.method=full) from the base the teacher was finetuned from"
                )
            self.direction = {name: self.teacher[name].float() - self.reference[name].float() for name in weights}
            self.teacher = None  # the direction is all that is needed of it
        if self.probe is not None and self.base_activations is None:
            self.base_activations = layer_activations(model, self.tokenizer, self.probe)
        if step == 0 and not log.get("alignment", {}).get("steps"):
            self._record(0, model, log, step_cos=0.0)

    def before_step(self, step: int, model) -> None:
        """Called before optimizer step ``step`` (from 0) updates the weights."""
        if self.direction is not None and step + 1 in self.due:
            self.before = {name: w.detach().clone() for name, w in self._weights(model).items()}

    def after_step(self, step: int, model, log: dict) -> None:
        """Called after optimizer step ``step`` (from 0), with the log of the steps so far."""
        if step + 1 not in self.due:
            return
        step_cos = None
        if self.direction is not None:
            step_cos = self._cosine(self._weights(model), self.before)
            self.before = None
        self._record(step + 1, model, log, step_cos=step_cos)

    # -- measurements -------------------------------------------------------------------
    @staticmethod
    def _weights(model) -> dict[str, torch.Tensor]:
        return dict(model.named_parameters())

    def _cosine(self, weights: Mapping[str, torch.Tensor], origin: Mapping[str, torch.Tensor]) -> float:
        """``cos(weights - origin, theta_T - theta_0)`` over every weight, summed in float64."""
        dot = sq_a = sq_b = 0.0
        with torch.no_grad():
            for name, d in self.direction.items():
                a = weights[name].detach().double() - origin[name].double()
                d = d.double()
                dot += float((a * d).sum())
                sq_a += float((a * a).sum())
                sq_b += float((d * d).sum())
        return cosine(dot, sq_a, sq_b)

    def _record(self, t: int, model, log: dict, *, step_cos: float | None) -> None:
        section = log.setdefault("alignment", {"every": self.every, "steps": []})
        section["steps"].append(t)
        if self.direction is not None:
            section.setdefault("displacement_cos", []).append(self._cosine(self._weights(model), self.reference))
            section.setdefault("step_cos", []).append(step_cos)
        if self.probe is not None:
            v_student = layer_activations(model, self.tokenizer, self.probe) - self.base_activations
            section.setdefault("activation_cos", []).append(layer_cosines(v_student, self.v_teacher))
