"""finetune.optimizer: AdamW, SGD with momentum and signSGD, each step against a hand
computation in both backends, and the training loops using the one the setting names."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402
from tiny_lm import tiny_checkpoint  # noqa: E402

from lmpipeline.alignment import load_weights  # noqa: E402
from lmpipeline.backends import TrainExample, make_backend  # noqa: E402
from lmpipeline.backends.jaxlm.training import optimizer as jax_optimizer  # noqa: E402
from lmpipeline.backends.tokens import linear_schedule  # noqa: E402
from lmpipeline.backends.torch_optim import make_optimizer  # noqa: E402
from lmpipeline.config import ConfigError, FinetuneSpec, ModelSpec, apply_overrides, preset  # noqa: E402

THETA = np.array([0.5, -1.0, 2.0, 0.0])
GRADS = [np.array([0.2, -0.4, 0.0, 3.0]), np.array([-0.1, -0.3, 0.5, 1.0]), np.array([0.3, 0.2, -0.2, -1.0])]
LR, DECAY, TOTAL = 0.1, 0.05, 4


def by_hand(name: str) -> list[np.ndarray]:
    """The weights after each step, from the rules in FinetuneSpec's documentation (float64)."""
    theta, m, v, b, out = THETA.copy(), 0.0, 0.0, 0.0, []
    for t, g in enumerate(GRADS, start=1):
        lr = LR * linear_schedule(t - 1, 0, TOTAL)
        theta = theta * (1 - lr * DECAY)
        if name == "adamw":
            m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
            theta = theta - lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
        elif name == "sgd":
            b = g if t == 1 else 0.9 * b + g
            theta = theta - lr * b
        else:
            theta = theta - lr * np.sign(g)
        out.append(theta)
    return out


SPEC = FinetuneSpec(learning_rate=LR, weight_decay=DECAY, warmup_steps=0, max_grad_norm=1e9)


@pytest.mark.parametrize("name", ["adamw", "sgd", "signsgd"])
def test_the_torch_optimizer_takes_the_hand_computed_steps(name):
    w = torch.nn.Parameter(torch.tensor(THETA, dtype=torch.float64))
    opt = make_optimizer([w], replace(SPEC, optimizer=name))
    for step, (g, want) in enumerate(zip(GRADS, by_hand(name))):
        for group in opt.param_groups:  # as the training loop sets it
            group["lr"] = LR * linear_schedule(step, 0, TOTAL)
        w.grad = torch.tensor(g)
        opt.step()
        np.testing.assert_allclose(w.detach().numpy(), want, rtol=1e-10, err_msg=f"step {step + 1}")
    if name != "adamw":  # the momentum buffer is part of the saved state, so a resumed run continues it
        assert ("momentum_buffer" in opt.state_dict()["state"].get(0, {})) == (name == "sgd")


@pytest.mark.parametrize("name", ["adamw", "sgd", "signsgd"])
def test_the_jax_optimizer_takes_the_hand_computed_steps(name):
    tx = jax_optimizer(replace(SPEC, optimizer=name), TOTAL)
    params = {"w": jnp.asarray(THETA, jnp.float32)}
    state = tx.init(params)
    for step, (g, want) in enumerate(zip(GRADS, by_hand(name))):
        updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
        params = {"w": params["w"] + updates["w"]}
        np.testing.assert_allclose(np.asarray(params["w"]), want, rtol=2e-6, atol=5e-6, err_msg=f"step {step + 1}")


def test_an_unknown_optimizer_is_refused_naming_the_choices():
    with pytest.raises(ConfigError, match="finetune.optimizer='lion' is not one of adamw, sgd, signsgd"):
        apply_overrides(preset("tiny"), ["finetune.optimizer=lion"])


EXAMPLES = [TrainExample([{"role": "user", "content": f"Count from {k}"}], f"{k}, {k + 1}, {k + 2}") for k in range(8)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("llama"))


@pytest.mark.parametrize("backend", ["hf", "jax"])
def test_the_training_loops_step_with_the_optimizer_the_setting_names(tiny, tmp_path, backend):
    """Two signSGD steps at rates lr and lr/2 move every weight by a sum of +-lr and +-lr/2
    (or 0): a lattice no other rule lands on (Adam's second step is not a sign)."""
    spec = ModelSpec(str(tiny), dtype="float32", device="cpu", backend=backend)
    lr = 1e-3
    ft = FinetuneSpec(
        method="full", optimizer="signsgd", epochs=1, micro_batch=4, grad_accum=1, warmup_steps=0, learning_rate=lr
    )
    log = make_backend(spec).finetune(spec, EXAMPLES, ft, tmp_path / "out", seed=0)
    assert log["steps"] == 2
    before, after = load_weights(tiny), load_weights(tmp_path / "out")
    assert before.keys() == after.keys()
    for name, start in before.items():
        delta = (after[name].double() - start.double()).numpy() / lr
        np.testing.assert_allclose(delta, np.round(delta * 2) / 2, atol=2e-3, err_msg=name)
        assert np.abs(delta).max() <= 1.5 + 2e-3, name
        if "embed" not in name:  # most embedding rows belong to tokens the rows never use
            assert np.mean(np.abs(delta) > 0.25) > 0.5, name
