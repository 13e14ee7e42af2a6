"""The students' own optimizer: each update rule against a hand-computed step, the teacher
left on its optimizer, the fingerprints of existing runs unchanged, and bad input."""

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sublearn.cli import main
from toymodels.config import ConfigError, MnistConfig, tiny
from toymodels.sweep import lowest_final_loss
from toymodels.train import make_optimizer, student_epoch, teacher_epoch

THETA = np.array([0.5, -1.0, 2.0, 0.0], np.float32)
G1 = np.array([0.2, -0.4, 0.0, 3.0], np.float32)
G2 = np.array([-0.1, -0.3, 0.5, 1.0], np.float32)


def _two_steps(tx):
    params = {"w": jnp.asarray(THETA)}
    state = tx.init(params)
    out = []
    for g in (G1, G2):
        updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
        params = jax.tree.map(jnp.add, params, updates)
        out.append(np.asarray(params["w"]))
    return out


def _adam_by_hand(lr, b1=0.9, b2=0.999, eps=1e-8):
    theta, m, v, out = THETA.astype(np.float64), 0.0, 0.0, []
    for t, g in enumerate((G1, G2), start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        theta = theta - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        out.append(theta)
    return out


def _sgd_by_hand(lr, momentum):
    b1 = G1
    theta1 = THETA - lr * b1
    b2 = momentum * b1 + G2
    return [theta1, theta1 - lr * b2]


def _signsgd_by_hand(lr):
    theta1 = THETA - lr * np.sign(G1)
    return [theta1, theta1 - lr * np.sign(G2)]


@pytest.mark.parametrize(
    "student, rate, momentum, expected",
    [
        ("adam", 0.01, 0.0, _adam_by_hand(0.01)),
        ("sgd", 0.1, 0.0, _sgd_by_hand(0.1, 0.0)),
        ("sgd", 0.1, 0.9, _sgd_by_hand(0.1, 0.9)),
        ("signsgd", 0.05, 0.0, _signsgd_by_hand(0.05)),
    ],
)
def test_each_students_optimizer_takes_the_hand_computed_steps(student, rate, momentum, expected):
    config = MnistConfig(student_optimizer=student, student_learning_rate=rate, momentum=momentum).validate()
    for got, want in zip(_two_steps(make_optimizer(config, students=True)), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # The teacher's optimizer is still the paper's Adam at its own rate.
    for got, want in zip(_two_steps(make_optimizer(config)), _adam_by_hand(config.learning_rate)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_students_default_to_the_teachers_optimizer_and_rate():
    config = MnistConfig(optimizer="sgd", learning_rate=0.1, momentum=0.9).validate()
    for got, want in zip(_two_steps(make_optimizer(config, students=True)), _sgd_by_hand(0.1, 0.9)):
        np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.slow
def test_the_compiled_epochs_train_the_teacher_and_the_students_with_their_own_optimizers():
    from test_mnist_train import _copy, _student_inputs, _teacher_inputs

    base = tiny(seeds=2, seeds_per_chunk=2, n_train=512, n_noise=256, batch_size=128, hidden=(16, 16))
    own = dataclasses.replace(base, student_optimizer="sgd", student_learning_rate=0.5, momentum=0.9)
    everyone = dataclasses.replace(base, optimizer="sgd", learning_rate=0.5, momentum=0.9)

    def teacher(config):
        return np.asarray(teacher_epoch(config)(*_teacher_inputs(config, 2))[0]["layers"][0]["kernel"])

    np.testing.assert_array_equal(teacher(own), teacher(base))  # the teacher stays on Adam

    def students(config):
        students, _, teachers, words, keys, masks = _student_inputs(config)
        opt_states = jax.vmap(jax.vmap(make_optimizer(config, students=True).init))(students)
        trained, _, _ = student_epoch(config)(_copy(students), opt_states, teachers, words, keys, masks)
        return np.asarray(trained["layers"][0]["kernel"])

    with_sgd = students(own)
    np.testing.assert_array_equal(with_sgd, students(everyone))  # SGD with momentum in both
    assert not np.allclose(with_sgd, students(base), atol=1e-4)


def test_fingerprints_of_runs_without_the_new_options_are_unchanged():
    # Values from before the options existed: the atlas and checkpoints find their points by them.
    assert MnistConfig().fingerprint() == "cf793d42c28d4f41"
    assert MnistConfig(seeds=4, seeds_per_chunk=4, precision="bf16").fingerprint() == "06ad98af4fc77289"
    base = MnistConfig()
    changed = [
        dataclasses.replace(base, student_optimizer="adam"),
        dataclasses.replace(base, student_learning_rate=3e-4),
        dataclasses.replace(base, optimizer="sgd", momentum=0.9),
    ]
    assert len({c.fingerprint() for c in changed} | {base.fingerprint()}) == 4


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"student_optimizer": "lion"}, "unknown --student-optimizer 'lion'"),
        ({"student_learning_rate": 0.0}, "--student-learning-rate must be positive"),
        ({"student_learning_rate": float("nan")}, "--student-learning-rate must be a finite number"),
        ({"momentum": 1.0, "optimizer": "sgd"}, "--momentum must be in [0, 1)"),
        ({"momentum": 0.9}, "--momentum 0.9 applies to sgd only"),
        ({"momentum": 0.9, "student_optimizer": "signsgd"}, "--momentum 0.9 applies to sgd only"),
    ],
)
def test_bad_optimizer_settings_are_refused_with_one_clear_line(overrides, message, capsys):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        MnistConfig(**overrides).validate()
    flags = []
    for key, value in overrides.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    with pytest.raises(SystemExit) if "unknown" in message else contextlib.nullcontext():  # argparse's choices
        assert main(["mnist", "--quiet", "--out", "/nonexistent/never", *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message.split(" (")[0] in err[0]


def test_the_lowest_final_loss_skips_diverged_points():
    points = [
        {"value": 10.0, "final_loss": {"student_aux": [1e-5, float("nan")]}},
        {"value": 1.0, "final_loss": {"student_aux": [2e-4, 3e-4]}},
        {"value": 0.1, "final_loss": {"student_aux": [4e-4, 3e-4]}},
    ]
    assert lowest_final_loss(points, "student_aux") == 1.0


@pytest.mark.slow
def test_the_atlas_optimizer_curve_changes_the_students_and_keeps_the_teachers(tmp_path):
    from toymodels.atlas import STUDENT_LEARNING_RATES, curve_sweep, run_atlas

    atlas = run_atlas(tmp_path, preset="tiny", seeds=2, only=("optimizer",))
    records = [atlas["points"][p["fingerprint"]] for p in atlas["curves"]["optimizer"]["points"]]
    assert [r["config"]["student_optimizer"] for r in records] == [None, "adam", "sgd", "signsgd"]
    assert [r["config"]["student_learning_rate"] for r in records[1:]] == list(STUDENT_LEARNING_RATES.values())
    assert [r["config"]["momentum"] for r in records] == [0.0, 0.0, 0.9, 0.0]
    teachers = {tuple(r["accuracy"]["teacher"]) for r in records}
    assert len(teachers) == 1  # one teacher per seed, trained with Adam whatever the students use
    # Adam, SGD and signSGD students differ (the tiny preset's own rate is Adam's chosen 1e-3).
    assert len({tuple(records[i]["accuracy"]["student_all"]) for i in (0, 2, 3)}) == 3
    labels = [p["value"] for p in curve_sweep(atlas, "optimizer")["points"]]
    assert labels == ["adam 3e-4 (paper)", "adam 0.001", "sgd 0.3", "signsgd 0.0001"]
    assert (tmp_path / "atlas_optimizer.png").stat().st_size > 0
