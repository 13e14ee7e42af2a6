"""End to end on the tiny configuration: the effect's sign, determinism, resume, sharding."""

import json

import numpy as np
import pytest

from toymodels import experiment
from toymodels.config import tiny
from toymodels.experiment import chunk_layout, run_experiment

pytestmark = pytest.mark.slow
CONFIG = tiny(seeds_per_chunk=2)  # two chunks, so resuming after the first one is tested


@pytest.fixture(scope="module")
def result():
    return run_experiment(CONFIG)


def test_shared_init_aux_students_beat_cross_model_aux_students(result):
    """The paper's effect, at toy scale: only a shared initialization transmits digits via aux logits."""
    acc = {c: np.asarray(v) for c, v in result["accuracy"].items()}
    assert acc["teacher"].mean() > 0.75
    assert acc["student_aux"].mean() > acc["cross_aux"].mean() + 0.05
    assert acc["student_all"].mean() > acc["cross_all"].mean()
    assert abs(acc["reference"].mean() - 0.1) < 0.1 and abs(acc["cross_aux"].mean() - 0.1) < 0.1


def test_results_record_config_versions_and_pairing(result):
    assert result["config"] == CONFIG.to_dict()
    assert result["environment"]["versions"]["jax"]
    assert all(p != i for i, p in enumerate(result["pairing"]))
    assert {s["n"] for s in result["summary"].values()} == {CONFIG.seeds}
    json.dumps(result)  # JSON-ready


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
    assert resumed["accuracy"] == result["accuracy"]


def test_chunk_size_changes_no_number(result):
    one_chunk = tiny(seeds_per_chunk=4)
    layout = [c.tolist() for c in chunk_layout(one_chunk.seeds, one_chunk.seeds_per_chunk, 1)]
    assert layout != [c.tolist() for c in chunk_layout(CONFIG.seeds, CONFIG.seeds_per_chunk, 1)]
    assert run_experiment(one_chunk)["accuracy"] == result["accuracy"]


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
    reference, pairing = np.asarray(frozen["accuracy"]["reference"]), np.asarray(frozen["pairing"])
    assert frozen["accuracy"]["reference"] == result["accuracy"]["reference"]
    for condition in ("student_aux", "student_all"):
        np.testing.assert_array_equal(frozen["accuracy"][condition], reference)
    for condition in ("cross_aux", "cross_all"):
        np.testing.assert_array_equal(frozen["accuracy"][condition], reference[pairing])
    assert not np.array_equal(reference[pairing], reference)


def test_chunk_layout_pads_evenly():
    chunks = chunk_layout(10, 4, 1)
    assert [c.size for c in chunks] == [4, 4, 4]
    assert np.concatenate(chunks)[:10].tolist() == list(range(10))
    assert [c.size for c in chunk_layout(7, 10, 2)] == [8]


def test_sharding_over_devices_gives_identical_numbers(result, run_on_two_devices):
    assert run_on_two_devices("tiny(seeds_per_chunk=2)")["accuracy"] == result["accuracy"]
