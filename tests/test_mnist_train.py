import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from toymodels.config import MnistConfig, tiny
from toymodels.data import load_mnist
from toymodels.model import init_params
from toymodels.train import ProgramSpec, epoch_plan, make_optimizer, spec_of, teacher_epoch

# Every backend compilation, as JAX's public monitoring hook reports it.
COMPILES: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kwargs: (
        COMPILES.append(event) if event == "/jax/core/compile/backend_compile_duration" else None
    )
)


def test_epoch_plan_visits_every_example_once_and_pads_with_zero_weight():
    plan = epoch_plan(jax.random.key(0), 10, 4)
    idx, w = np.asarray(plan.indices), np.asarray(plan.weights)
    assert idx.shape == w.shape == (3, 4)
    real = w > 0
    assert sorted(idx[real].tolist()) == list(range(10))
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(w[2], [0.5, 0.5, 0, 0])
    other = epoch_plan(jax.random.key(1), 10, 4)
    assert not np.array_equal(np.asarray(other.indices), idx)


def _teacher_inputs(config, n_seeds):
    spec = spec_of(config)
    data = load_mnist().subset(config.n_train, config.n_test)
    keys = jax.random.split(jax.random.key(0), n_seeds)
    params = jax.vmap(lambda k: init_params(spec, k))(keys)
    opt_state = jax.vmap(make_optimizer(config).init)(params)
    return params, opt_state, keys, jnp.asarray(data.train_images), jnp.asarray(data.train_labels)


def test_compiled_teacher_epoch_does_not_recompile_and_learns():
    config = tiny(n_train=4096, hidden=(32, 32), batch_size=128)
    train = teacher_epoch(config)
    params, opt_state, keys, images, labels = _teacher_inputs(config, 2)
    params, opt_state, first = train(params, opt_state, keys, images, labels)
    keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    compiled_before = len(COMPILES)
    params, opt_state, second = train(params, opt_state, keys, images, labels)
    assert len(COMPILES) == compiled_before  # the second epoch reuses the first one's program
    # Chance level is ln(10) = 2.30; 64 Adam steps at 1e-3 must get well below it.
    assert np.all(np.asarray(second) < np.asarray(first)) and np.all(np.asarray(second) < 1.2)
    assert teacher_epoch(config) is train  # one compiled function per configuration


def test_teachers_auxiliary_logits_get_no_direct_gradient():
    """The teacher learns through its digit logits only: its last layer's aux columns never move.

    Adam turns a zero gradient into a zero update, so they stay at their initial values
    bit for bit while every digit column and every hidden layer changes.
    """
    config = tiny(n_train=2048, hidden=(32, 32), batch_size=256)
    params, opt_state, keys, images, labels = _teacher_inputs(config, 2)
    start = jax.tree.map(np.asarray, params)
    trained, _, _ = teacher_epoch(config)(params, opt_state, keys, images, labels)
    last = len(start["layers"]) - 1
    kernel, bias = (np.asarray(trained["layers"][last][name]) for name in ("kernel", "bias"))
    np.testing.assert_array_equal(kernel[..., 10:], start["layers"][last]["kernel"][..., 10:])
    np.testing.assert_array_equal(bias[..., 10:], start["layers"][last]["bias"][..., 10:])
    assert np.all(np.abs(kernel[..., :10] - start["layers"][last]["kernel"][..., :10]).max(axis=(1, 2)) > 1e-3)
    assert np.all(
        np.abs(np.asarray(trained["layers"][0]["kernel"]) - start["layers"][0]["kernel"]).max(axis=(1, 2)) > 1e-3
    )


# For each field of the program spec, a value other than the default that still validates.
PROGRAM_CHANGES = {
    "n_aux": 5,
    "hidden": (64,),
    "init_scale": 0.5,
    "precision": "bf16",
    "optimizer": "sgd",
    "learning_rate": 1e-2,
    "batch_size": 256,
    "n_noise": 2000,
    "student_data": "gaussian",
    "student_loss": "mse",
    "temperature": 2.0,
    "track": 3,
    "vmap_seeds": 2,
}


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(ProgramSpec)])
def test_every_field_that_shapes_the_programs_changes_the_cache_key(field):
    base = MnistConfig()
    changed = dataclasses.replace(base, **{field: PROGRAM_CHANGES[field]}).validate()
    assert ProgramSpec.of(changed) != ProgramSpec.of(base)
    assert hash(ProgramSpec.of(changed)) != hash(ProgramSpec.of(base))
    assert getattr(ProgramSpec.of(changed), field) == PROGRAM_CHANGES[field]


def test_fields_the_programs_never_read_share_one_cache_key():
    base = MnistConfig()
    other = dataclasses.replace(
        base,
        seeds=100,
        seed=7,
        teacher_epochs=1,
        student_epochs=2,
        student_init_sigma=0.1,
        n_train=5000,
        n_test=100,
        seeds_per_chunk=4,
    ).validate()
    assert ProgramSpec.of(other) == ProgramSpec.of(base)
    assert set(f.name for f in dataclasses.fields(ProgramSpec)) < set(f.name for f in dataclasses.fields(MnistConfig))
