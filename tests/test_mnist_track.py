"""``--track N``: the students' alignment with their teacher, measured inside the compiled epoch.

The tracker is checked against numbers computed independently (plain NumPy on the
parameters the epoch returns, the loss and accuracy from ``apply``), so a tracker that
measures the wrong parameters, the wrong direction or the wrong step fails here.
"""

import copy
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_mnist_cli import TINY

from sublearn.cli import main
from toymodels.config import MnistConfig, tiny
from toymodels.data import load_mnist, normalize
from toymodels.experiment import ExperimentResult, _student_masks, run_experiment
from toymodels.model import N_DIGITS, apply, init_params, perturb_params
from toymodels.noise import noise_words
from toymodels.stats import summarize
from toymodels.track import METRICS, PROBE_SIZE, probe_batch, trajectory_steps, tree_cosine
from toymodels.train import make_optimizer, spec_of, student_epoch

COS, STEP_COS, LOSS, ACC = (METRICS.index(m) for m in METRICS)


def _flat(tree):
    return np.concatenate([np.asarray(leaf, np.float64).ravel() for leaf in jax.tree.leaves(tree)])


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_tree_cosine_is_the_cosine_of_all_parameters_flattened_and_zero_for_a_zero_vector():
    spec = spec_of(tiny(hidden=(8, 8)))
    a = init_params(spec, jax.random.key(0))
    b = perturb_params(spec, init_params(spec, jax.random.key(1)), jax.random.key(2), 1.0)  # non-zero biases too
    assert float(tree_cosine(a, b)) == pytest.approx(_cos(_flat(a), _flat(b)), abs=1e-6)
    assert float(tree_cosine(a, a)) == pytest.approx(1.0, abs=1e-6)
    assert float(tree_cosine(a, jax.tree.map(jnp.negative, a))) == pytest.approx(-1.0, abs=1e-6)
    zero = jax.tree.map(jnp.zeros_like, a)
    assert float(tree_cosine(zero, b)) == 0.0 and float(tree_cosine(b, zero)) == 0.0


def test_trajectory_steps_end_every_epoch_and_start_at_zero():
    assert trajectory_steps(8, 3, 2) == [0, 3, 6, 8, 11, 14, 16]
    assert trajectory_steps(59, 10, 5)[-1] == 295 and len(trajectory_steps(59, 10, 5)) == 1 + 5 * 6
    assert trajectory_steps(4, 1, 1) == [0, 1, 2, 3, 4]


# ---- one compiled epoch, checked against an independent computation ----------------------

CONFIG = tiny(hidden=(32, 32), batch_size=128, n_noise=1024, track=3, seeds=2)  # 8 steps per epoch


def _setup(config, n_seeds=2):
    """Seeds' references, teachers (references moved by noise) and stacked students [seeds, 4]."""
    spec = spec_of(config)
    keys = jax.random.split(jax.random.key(0), n_seeds)
    reference = jax.vmap(lambda k: init_params(spec, k))(keys)
    teacher = jax.vmap(lambda p, k: perturb_params(spec, p, jax.random.fold_in(k, 1), 0.5))(reference, keys)
    cross = jax.vmap(lambda k: init_params(spec, jax.random.fold_in(k, 2)))(keys)
    students = jax.tree.map(lambda r, c: jnp.stack([r, r, c, c], axis=1), reference, cross)
    opt = jax.vmap(jax.vmap(make_optimizer(config).init))(students)
    words = jax.vmap(noise_words)(keys)
    return reference, teacher, students, opt, words, keys


def _independent(spec, params, images, labels):
    """Digit cross-entropy and accuracy of one model on the probe batch, from ``apply`` alone."""
    logits = np.asarray(apply(spec, params, normalize(images)), np.float64)[:, :N_DIGITS]
    logits = logits - logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    labels = np.asarray(labels)
    return -log_probs[np.arange(labels.size), labels].mean(), (logits.argmax(axis=1) == labels).mean()


def _per_model(tree, s, c):
    return jax.tree.map(lambda a: a[s, c], tree)


@pytest.fixture(scope="module")
def tracked_epochs():
    """Two tracked epochs and, from the same start, one untracked epoch."""
    spec = spec_of(CONFIG)
    reference, teacher, students, opt, words, keys = _setup(CONFIG)
    probe = probe_batch(load_mnist().subset(None, CONFIG.n_test))
    masks = jnp.asarray(_student_masks(CONFIG))
    starts = jax.tree.map(jnp.copy, students)
    untracked, _, _ = student_epoch(dataclasses.replace(CONFIG, track=0))(
        jax.tree.map(jnp.copy, students), jax.tree.map(jnp.copy, opt), teacher, words, keys, masks
    )
    train = student_epoch(CONFIG)
    after_1, opt, _, tracks_1 = train(students, opt, teacher, words, keys, starts, reference, masks, *probe)
    after_1_copy = jax.tree.map(jnp.copy, after_1)
    keys_2 = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    after_2, _, _, tracks_2 = train(after_1, opt, teacher, words, keys_2, starts, reference, masks, *probe)
    return dict(
        spec=spec,
        reference=reference,
        teacher=teacher,
        starts=starts,
        probe=probe,
        untracked=untracked,
        after_1=after_1_copy,
        after_2=after_2,
        tracks_1=np.asarray(tracks_1),
        tracks_2=np.asarray(tracks_2),
    )


def test_tracks_have_one_start_point_and_one_point_per_tracked_step(tracked_epochs):
    # 8 steps, every 3: after steps 3, 6 and 8, plus the epoch's start.
    assert tracked_epochs["tracks_1"].shape == (2, 4, 4, len(METRICS))


def test_the_start_point_has_zero_cosines_and_the_start_parameters_loss(tracked_epochs):
    t, spec = tracked_epochs["tracks_1"], tracked_epochs["spec"]
    assert np.all(t[:, :, 0, COS] == 0.0) and np.all(t[:, :, 0, STEP_COS] == 0.0)
    for s in range(2):
        for c in range(4):
            loss, acc = _independent(spec, _per_model(tracked_epochs["starts"], s, c), *tracked_epochs["probe"])
            assert t[s, c, 0, LOSS] == pytest.approx(loss, rel=1e-5) and t[s, c, 0, ACC] == pytest.approx(acc, abs=1e-6)


def test_the_last_point_is_measured_on_the_final_students(tracked_epochs):
    """Loss, accuracy and displacement cosine of the last point, recomputed from the returned parameters."""
    e, spec = tracked_epochs, tracked_epochs["spec"]
    for tracks, final in ((e["tracks_1"], e["after_1"]), (e["tracks_2"], e["after_2"])):
        for s in range(2):
            direction = _flat(jax.tree.map(lambda a: a[s], e["teacher"])) - _flat(
                jax.tree.map(lambda a: a[s], e["reference"])
            )
            for c in range(4):
                student = _per_model(final, s, c)
                loss, acc = _independent(spec, student, *e["probe"])
                assert tracks[s, c, -1, LOSS] == pytest.approx(loss, rel=1e-5)
                assert tracks[s, c, -1, ACC] == pytest.approx(acc, abs=1e-6)
                displacement = _flat(student) - _flat(_per_model(e["starts"], s, c))
                assert tracks[s, c, -1, COS] == pytest.approx(_cos(displacement, direction), abs=2e-5)


def test_an_epoch_starts_where_the_previous_one_ended_and_tracking_changes_no_parameter(tracked_epochs):
    e = tracked_epochs
    np.testing.assert_array_equal(e["tracks_2"][:, :, 0, [COS, LOSS, ACC]], e["tracks_1"][:, :, -1, [COS, LOSS, ACC]])
    for a, b in zip(jax.tree.leaves(e["untracked"]), jax.tree.leaves(e["after_1"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_step_cosine_is_the_cosine_of_the_last_step():
    """With one step per epoch, epoch 2's point is ``theta(2)`` and its step is ``theta(2) - theta(1)``.

    Adam's first steps are nearly parallel, so ``theta(1)`` is moved by ``theta_T - theta_0``
    between the epochs: the displacement cosine is then near 1 while the step's stays near
    0, which tells a tracker that reports the displacement (or the first step) apart from
    a correct one.
    """
    config = dataclasses.replace(CONFIG, n_noise=128, track=1)
    reference, teacher, students, opt, words, keys = _setup(config)
    probe = probe_batch(load_mnist().subset(None, 1000))
    masks = jnp.asarray(_student_masks(config))
    starts = jax.tree.map(jnp.copy, students)
    train = student_epoch(config)
    theta_1, opt, _, _ = train(students, opt, teacher, words, keys, starts, reference, masks, *probe)
    theta_1 = jax.tree.map(lambda a, t, r: a + (t - r)[:, None], theta_1, teacher, reference)
    theta_1_copy = jax.tree.map(jnp.copy, theta_1)
    theta_2, _, _, tracks = train(theta_1, opt, teacher, words, keys, starts, reference, masks, *probe)
    tracks = np.asarray(tracks)
    assert tracks.shape[2] == 2
    for s in range(2):
        direction = _flat(jax.tree.map(lambda a: a[s], teacher)) - _flat(jax.tree.map(lambda a: a[s], reference))
        for c in range(4):
            step = _flat(_per_model(theta_2, s, c)) - _flat(_per_model(theta_1_copy, s, c))
            displacement = _flat(_per_model(theta_2, s, c)) - _flat(_per_model(starts, s, c))
            assert tracks[s, c, 1, STEP_COS] == pytest.approx(_cos(step, direction), abs=2e-4)
            assert tracks[s, c, 1, COS] == pytest.approx(_cos(displacement, direction), abs=2e-5)
            assert abs(_cos(step, direction) - _cos(displacement, direction)) > 0.5  # the two are told apart


# ---- the whole experiment ------------------------------------------------------------------

TRACKED = tiny(track=8)  # 4 seeds, 2 epochs of 32 steps


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    checkpoint = tmp_path_factory.mktemp("track") / "checkpoint.json"
    return run_experiment(TRACKED, checkpoint=checkpoint), checkpoint


@pytest.mark.slow
def test_shared_init_students_move_along_their_teacher_and_cross_model_ones_do_not(tracked_run):
    """Final displacement cosine: clearly positive for every shared-init student, near 0 across models.

    At this scale (4 seeds x 64 steps) the aux-only shared-init cosine is about 0.26 and
    the cross-model ones within 0.02 of zero, on every seed.
    """
    conditions = tracked_run[0].trajectory["conditions"]
    final = {c: np.asarray(conditions[c]["displacement_cos"]["values"])[:, -1] for c in conditions}
    assert np.all(final["student_aux"] > 0.15) and np.all(final["student_all"] > final["student_aux"] + 0.2)
    assert np.all(np.abs(final["cross_aux"]) < 0.03) and np.all(np.abs(final["cross_all"]) < 0.03)
    aux_step = np.asarray(conditions["student_aux"]["step_cos"]["values"])[:, 1:]
    assert np.all(aux_step > 0.01)  # every tracked step of a shared-init aux student points along the teacher
    loss = np.asarray(conditions["student_all"]["teacher_loss"]["mean"])
    assert loss[-1] < loss[0] - 0.5  # imitating all logits teaches digits


@pytest.mark.slow
def test_the_trajectory_section_has_the_steps_values_and_summaries(tracked_run):
    result, _ = tracked_run
    trajectory = json.loads(json.dumps(result.to_json(), allow_nan=False))["trajectory"]  # JSON-ready, no NaN
    assert trajectory["steps"] == trajectory_steps(32, 8, 2) == [0, 8, 16, 24, 32, 40, 48, 56, 64]
    assert trajectory["probe"]["n"] == PROBE_SIZE and trajectory["metrics"] == list(METRICS)
    for curves in trajectory["conditions"].values():
        for metric in METRICS:
            values = np.asarray(curves[metric]["values"])
            assert values.shape == (TRACKED.seeds, len(trajectory["steps"]))
            assert curves[metric]["mean"] == pytest.approx(values.mean(axis=0).tolist())
            assert curves[metric]["ci95"][-1] == pytest.approx(summarize(values[:, -1])["ci95"])
    assert trajectory["teacher"]["probe_accuracy"]["mean"] > 0.75


@pytest.mark.slow
def test_tracking_changes_no_result_and_track_0_keeps_the_fingerprint(tracked_run):
    result, checkpoint = tracked_run
    plain = run_experiment(dataclasses.replace(TRACKED, track=0))
    assert plain.trajectory is None and "trajectory" not in plain.to_json()
    assert plain.accuracy == result.accuracy and plain.final_loss == result.final_loss
    # The fingerprint this configuration had before ``track`` existed.
    assert tiny(seeds=3, seeds_per_chunk=3).fingerprint() == "0d99f617f4d5122f"
    assert TRACKED.fingerprint() != plain.config.fingerprint()
    # Every seed is restored from the checkpoint, trajectory included.
    restored = run_experiment(TRACKED, checkpoint=checkpoint)
    assert restored.trajectory == result.trajectory


def test_negative_track_is_rejected():
    with pytest.raises(ValueError, match="--track must be 0"):
        MnistConfig(track=-1).validate()


@pytest.mark.slow
def test_the_cli_writes_the_trajectory_figure_and_section(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["mnist", "--out", str(out), *TINY, "--track", "4"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["trajectory"]["steps"] == [0, 4, 8]
    assert len(result["trajectory"]["conditions"]["cross_aux"]["step_cos"]["values"]) == 2
    assert (out / "trajectory.png").stat().st_size > 10_000 and (out / "trajectory.pdf").exists()
    assert "at student step 8" in capsys.readouterr().out


@pytest.mark.slow
def test_a_sharded_tracked_run_trains_identically_and_tracks_to_rounding(tracked_run, run_on_two_devices):
    """Over two devices the students are bit-identical; the tracked sums agree to float32 rounding.

    The parameter-space sums of the cosines and the probe loss are reduced by XLA in an
    order that depends on the threads a device gets, so their last bits may differ.
    """
    sharded = run_on_two_devices("tiny(track=8, seeds_per_chunk=2)")
    accuracy, trajectory = sharded["accuracy"], sharded["trajectory"]
    assert accuracy == tracked_run[0].accuracy
    assert trajectory["steps"] == tracked_run[0].trajectory["steps"]
    for condition, curves in tracked_run[0].trajectory["conditions"].items():
        for metric, curve in curves.items():
            np.testing.assert_allclose(
                trajectory["conditions"][condition][metric]["values"], curve["values"], atol=2e-6, rtol=0
            )


@pytest.mark.slow
def test_trajectory_summaries_read_back_are_recomputed_from_the_per_seed_values(tracked_run):
    result = tracked_run[0]
    stale = copy.deepcopy(result.to_json())
    stale["trajectory"]["conditions"]["student_aux"]["probe_accuracy"]["ci95"][1] = 9.0
    stale["trajectory"]["teacher"]["teacher_loss"]["ci95"] = 9.0
    assert ExperimentResult.from_json(stale).trajectory == result.trajectory
