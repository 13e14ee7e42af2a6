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
    "student_optimizer": "signsgd",
    "student_learning_rate": 1e-2,
    "momentum": 0.9,
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
    base = MnistConfig(optimizer="sgd") if field == "momentum" else MnistConfig()  # momentum is sgd's
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


def _student_inputs(config):
    """Two seeds' teachers and four students each, started away from their teachers."""
    from toymodels.experiment import _student_masks
    from toymodels.noise import noise_words

    spec = spec_of(config)
    keys = jax.random.split(jax.random.key(0), config.seeds)
    teachers = jax.vmap(lambda k: init_params(spec, k))(keys)
    starts = jax.random.split(jax.random.key(1), config.seeds * 4).reshape(config.seeds, 4)
    students = jax.vmap(jax.vmap(lambda k: init_params(spec, k)))(starts)
    opt_states = jax.vmap(jax.vmap(make_optimizer(config).init))(students)
    words = jax.vmap(noise_words)(keys)
    return students, opt_states, teachers, words, keys, jnp.asarray(_student_masks(config))


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)  # the compiled epoch donates its inputs


def test_the_student_epoch_learns_and_keeps_the_four_conditions_independent():
    from toymodels.train import student_epoch

    config = tiny(seeds=2, seeds_per_chunk=2)
    epoch = student_epoch(config)
    students, opt_states, teachers, words, keys, masks = _student_inputs(config)
    after, after_opt, first = epoch(_copy(students), _copy(opt_states), teachers, words, keys, masks)
    _, _, second = epoch(_copy(after), _copy(after_opt), teachers, words, keys, masks)
    assert first.shape == (2, 4) and np.all(np.asarray(second) < np.asarray(first))
    # Every condition moves toward its own seed's teacher on the auxiliary logits (which all
    # four imitate), measured apart from the training loss: log-softmax distance on noise.
    from toymodels.model import apply
    from toymodels.noise import noise_images

    spec = spec_of(config)

    def aux_distance(students):
        def one_seed(students, teacher, w):
            x = noise_images(w, jnp.arange(256), spec.d_in, config.student_data)
            target = jax.nn.log_softmax(apply(spec, teacher, x)[:, 10:])
            own = jax.vmap(lambda s: jax.nn.log_softmax(apply(spec, s, x)[:, 10:]))(students)
            return jnp.mean((own - target[None]) ** 2, axis=(1, 2))

        return np.asarray(jax.vmap(one_seed)(students, teachers, words))

    assert np.all(aux_distance(after) < 0.9 * aux_distance(students))

    # Change condition 1's student and its optimizer state: nothing else may move.
    def poke(tree, scale):
        def one(a):
            return a.at[:, 1].add(scale) if a.ndim >= 2 and jnp.issubdtype(a.dtype, jnp.floating) else a

        return jax.tree.map(one, tree)

    poked, poked_opt, poked_loss = epoch(
        poke(_copy(students), 0.1), poke(_copy(opt_states), 1e-3), teachers, words, keys, masks
    )
    for leaf, ref in zip(jax.tree.leaves((poked, poked_opt)), jax.tree.leaves((after, after_opt))):
        if leaf.ndim >= 2:
            np.testing.assert_array_equal(np.delete(np.asarray(leaf), 1, axis=1), np.delete(np.asarray(ref), 1, axis=1))
    np.testing.assert_array_equal(np.delete(np.asarray(poked_loss), 1, axis=1), np.delete(np.asarray(first), 1, axis=1))
    assert not np.array_equal(np.asarray(poked_loss)[:, 1], np.asarray(first)[:, 1])
