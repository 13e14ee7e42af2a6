r"""The torch loop's optimizers, ``finetune.optimizer`` (:class:`lmpipeline.config.FinetuneSpec`).

With gradient :math:`g_t` (after clipping), learning rate :math:`\eta_t` (the schedule's)
and decoupled weight decay :math:`\lambda`, every optimizer first shrinks the weights,
:math:`\theta \leftarrow (1 - \eta_t \lambda)\,\theta`, then steps:

- ``adamw``: ``torch.optim.AdamW`` (betas 0.9/0.999, eps 1e-8), whose decay is this one;
- ``sgd``: heavy-ball momentum :math:`\mu` = :data:`lmpipeline.config.SGD_MOMENTUM`,
  :math:`b_t = \mu b_{t-1} + g_t` (:math:`b_1 = g_1`), :math:`\theta \leftarrow \theta - \eta_t b_t`
  (``torch.optim.SGD``'s rule without dampening or Nesterov);
- ``signsgd``: :math:`\theta \leftarrow \theta - \eta_t\,\mathrm{sign}(g_t)`, every weight
  moved by the same amount, the simplest update whose size does not follow the gradient's.

The JAX loop builds the same three rules with optax
(:func:`lmpipeline.backends.jaxlm.training.optimizer`).

Example (one step of signSGD from 1 with gradients 2, -3 and 0):

>>> import torch
>>> w = torch.nn.Parameter(torch.ones(3))
>>> opt = MomentumOrSignSGD([w], lr=0.1, momentum=0.0, sign=True)
>>> w.grad = torch.tensor([2.0, -3.0, 0.0])
>>> opt.step()
>>> [round(x, 6) for x in w.tolist()]
[0.9, 1.1, 1.0]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmpipeline.config import SGD_MOMENTUM, FinetuneSpec


class MomentumOrSignSGD(torch.optim.Optimizer):
    """SGD with heavy-ball ``momentum``, or with ``sign`` signSGD; decoupled ``weight_decay``."""

    def __init__(self, params, *, lr: float, momentum: float, sign: bool, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, sign=sign, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["weight_decay"]:
                    p.mul_(1 - lr * group["weight_decay"])
                if group["sign"]:
                    p.add_(torch.sign(p.grad), alpha=-lr)
                    continue
                direction = p.grad
                if momentum:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = p.grad.detach().clone()
                    else:
                        state["momentum_buffer"].mul_(momentum).add_(p.grad)
                    direction = state["momentum_buffer"]
                p.add_(direction, alpha=-lr)


def make_optimizer(params: Sequence[torch.nn.Parameter], spec: FinetuneSpec) -> torch.optim.Optimizer:
    """``spec.optimizer`` over ``params`` at ``spec.learning_rate`` (the loop sets each step's rate)."""
    if spec.optimizer == "adamw":
        # The fused update is one kernel over every tensor: 10% of a SmolLM2 step on a CPU core.
        fused = all(p.device.type in ("cpu", "cuda") for p in params)
        return torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay, fused=fused)
    if spec.optimizer in ("sgd", "signsgd"):
        return MomentumOrSignSGD(
            params,
            lr=spec.learning_rate,
            momentum=SGD_MOMENTUM if spec.optimizer == "sgd" else 0.0,
            sign=spec.optimizer == "signsgd",
            weight_decay=spec.weight_decay,
        )
    raise ValueError(f"unknown finetune.optimizer {spec.optimizer!r}")
