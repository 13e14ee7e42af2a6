"""End to end on the tiny configuration: the effect's sign, determinism, resume, sharding."""

import json
from pathlib import Path

import numpy as np
import pytest

from sublearn._common import dumps, read_json, write_json
from toymodels import experiment
from toymodels.config import tiny
from toymodels.experiment import ChunkResult, ExperimentResult, chunk_layout, run_experiment

pytestmark = pytest.mark.slow
CONFIG = tiny(seeds_per_chunk=2)  # two chunks, so resuming after the first one is tested


@pytest.fixture(scope="module")
def result():
    return run_experiment(CONFIG)


def test_shared_init_aux_students_beat_cross_model_aux_students(result):
    """The paper's effect, at toy scale: only a shared initialization transmits digits via aux logits."""
    acc = {c: np.asarray(v) for c, v in result.accuracy.items()}
    assert acc["teacher"].mean() > 0.75
    assert acc["student_aux"].mean() > acc["cross_aux"].mean() + 0.05
    assert acc["student_all"].mean() > acc["cross_all"].mean()
    assert abs(acc["reference"].mean() - 0.1) < 0.1 and abs(acc["cross_aux"].mean() - 0.1) < 0.1


def test_results_record_config_versions_and_pairing(result):
    assert result.config == CONFIG
    assert result.environment["versions"]["jax"]
    assert all(p != i for i, p in enumerate(result.pairing))
    assert {s["n"] for s in result.summary.values()} == {CONFIG.seeds}


def test_the_result_round_trips_through_its_json_file(result, tmp_path):
    path = write_json(tmp_path / "results.json", result.to_json())
    loaded = ExperimentResult.from_json(read_json(path))
    assert loaded == result
    assert loaded.to_json() == result.to_json()
    assert loaded.summary["student_aux"]["mean"] == pytest.approx(np.mean(result.accuracy["student_aux"]))
    assert result.to_json()["timing"]["wall_s"] == result.wall_s > 0


@pytest.mark.parametrize("name", ["mnist_results_100_seeds.json", "trajectory/results.json"])
def test_the_json_form_is_the_committed_files_format(result, name):
    committed = read_json(Path(__file__).parents[1] / "docs" / name)
    # sublearn mnist seals the file (sublearn._store.seal): its key and checksum come last.
    assert list(result.to_json()) == [k for k in committed if k not in ("trajectory", "config_hash", "checksum")]
    assert list(result.to_json()["timing"]) == list(committed["timing"])
    again = json.loads(dumps(ExperimentResult.from_json(committed).to_json()))
    # The summaries are recomputed with the current intervals, and an older file's config is
    # written with the current field names and the fields added since; everything else
    # reads back unchanged.
    recomputed = {"summary", "config", "fingerprint", "trajectory"}
    if "precision" in committed["config"]:  # no field added since that changes the fingerprint
        assert again["fingerprint"] == committed["fingerprint"]
    assert {k: v for k, v in again.items() if k not in recomputed} == {
        k: v for k, v in committed.items() if k not in recomputed
    }
    assert {c: s["mean"] for c, s in again["summary"].items()} == {
        c: s["mean"] for c, s in committed["summary"].items()
    }
    if "trajectory" in committed:  # its per-seed values read back unchanged; its summaries are recomputed
        for c, metrics in committed["trajectory"]["conditions"].items():
            for m, curve in metrics.items():
                assert again["trajectory"]["conditions"][c][m]["values"] == curve["values"]
                assert again["trajectory"]["conditions"][c][m]["mean"] == pytest.approx(curve["mean"], abs=1e-12)


def test_train_chunk_returns_per_seed_arrays(result):
    data = experiment.load_mnist().subset(CONFIG.n_train, CONFIG.n_test)
    pairing = np.asarray(result.pairing)
    chunk = experiment.train_chunk(CONFIG, data, np.arange(2), pairing, experiment.SilentProgress())
    assert isinstance(chunk, ChunkResult) and chunk.tracks is None
    assert set(chunk.accuracy) == set(result.accuracy) and set(chunk.loss) == set(result.final_loss)
    for condition, values in chunk.accuracy.items():
        assert values.tolist() == result.accuracy[condition][:2]
    # The checkpoint's record of seed 1 holds seed 1's numbers (the two seeds' losses differ).
    assert chunk.loss["student_aux"][0] != chunk.loss["student_aux"][1]
    assert chunk.seed_record(1) == {
        **{c: float(v[1]) for c, v in chunk.accuracy.items()},
        **{f"loss_{c}": float(v[1]) for c, v in chunk.loss.items()},
    }


class _StopAfterFirstChunk:
    def __init__(self):
        self.notes = 0

    def start(self, total_units, description):
        pass

    def advance(self, description, units=1.0):
        pass

    def note(self, message):
        raise KeyboardInterrupt  # notes come after a chunk is checkpointed

    def close(self):
        pass


def test_an_interrupted_run_resumes_to_the_same_numbers(result, tmp_path):
    checkpoint = tmp_path / "checkpoint.json"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(CONFIG, progress=_StopAfterFirstChunk(), checkpoint=checkpoint)
    saved = json.loads(checkpoint.read_text())
    assert sorted(saved["seeds"]) == ["0", "1"]
    resumed = run_experiment(CONFIG, checkpoint=checkpoint)
    assert resumed.accuracy == result.accuracy


def test_chunk_size_changes_no_number(result):
    one_chunk = tiny(seeds_per_chunk=4)
    layout = [c.tolist() for c in chunk_layout(one_chunk.seeds, one_chunk.seeds_per_chunk, 1)]
    assert layout != [c.tolist() for c in chunk_layout(CONFIG.seeds, CONFIG.seeds_per_chunk, 1)]
    assert run_experiment(one_chunk).accuracy == result.accuracy


def test_students_start_from_their_stated_initialization(result, monkeypatch):
    """With distillation replaced by "change nothing", each student must score as its start.

    Shared-initialization students start at their own seed's reference initialization,
    cross-model ones at the reference of the seed the derangement pairs them with; a
    student started from the trained teacher, or from its own init in the cross-model
    condition, fails this.
    """

    def frozen_student_epoch(config, mesh=None):
        def epoch(students, opt_states, *rest):
            n_seeds, n_conditions = students["layers"][0]["bias"].shape[:2]
            return students, opt_states, np.zeros((n_seeds, n_conditions))

        return epoch

    monkeypatch.setattr(experiment, "student_epoch", frozen_student_epoch)
    frozen = run_experiment(CONFIG)
    reference, pairing = np.asarray(frozen.accuracy["reference"]), np.asarray(frozen.pairing)
    assert frozen.accuracy["reference"] == result.accuracy["reference"]
    for condition in ("student_aux", "student_all"):
        np.testing.assert_array_equal(frozen.accuracy[condition], reference)
    for condition in ("cross_aux", "cross_all"):
        np.testing.assert_array_equal(frozen.accuracy[condition], reference[pairing])
    assert not np.array_equal(reference[pairing], reference)


def test_chunk_layout_pads_evenly():
    chunks = chunk_layout(10, 4, 1)
    assert [c.size for c in chunks] == [4, 4, 4]
    assert np.concatenate(chunks)[:10].tolist() == list(range(10))
    assert [c.size for c in chunk_layout(7, 10, 2)] == [8]
    assert [c.size for c in chunk_layout(100, 100, 8)] == [104]  # 100 seeds on 8 devices


def test_seeds_are_padded_to_the_device_count_not_to_vmap_seeds():
    mapped = run_experiment(tiny(vmap_seeds=3))  # 4 seeds: a batch of 3 and a remainder of 1
    assert mapped.chunks == 1 and mapped.chunk_size == 4
    assert all(len(a) == 4 and np.isfinite(a).all() for a in mapped.accuracy.values())


def test_sharding_over_devices_gives_identical_numbers(result, run_on_two_devices):
    assert run_on_two_devices("tiny(seeds_per_chunk=2)")["accuracy"] == result.accuracy


def test_seeds_are_padded_to_the_device_count_on_two_devices(run_on_two_devices):
    # 3 seeds, vmap_seeds=3: padded to 4 (two per device), not to 2 devices x 3 = 6.
    assert run_on_two_devices("tiny(seeds=3, seeds_per_chunk=3, vmap_seeds=3)")["timing"]["chunk_size"] == 4
