"""``sublearn._store``: finished work is reused only while it is intact, a damaged file is one
line naming its rebuild, and a run folder has one process and one command at a time.

The lock is tested with real concurrent processes: a child process holds a folder while
this one tries to take it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from sublearn._common import ConfigError, read_json, write_json
from sublearn._store import (
    FOLDER_RECORD,
    DamagedFile,
    FolderBusy,
    claim,
    config_hash,
    folder_owner,
    once,
    reusable,
    seal,
    stale,
)
from sublearn._store import read_json as read_json_or_damaged

# -- the one hash -------------------------------------------------------------------------


def test_config_hash_reads_dataclasses_and_is_the_one_behind_every_fingerprint():
    from lmpipeline.backends.checkpoints import fingerprint
    from lmpipeline.config import FinetuneSpec, result_fields, to_dict
    from toymodels.config import MnistConfig

    spec = FinetuneSpec()
    assert config_hash({"spec": spec, "n": (1, 2)}) == config_hash({"spec": to_dict(spec), "n": [1, 2]})
    # the options left at their defaults stay out, so older runs keep their fingerprint
    unset = ("seeds_per_chunk", "track", "student_optimizer", "student_learning_rate", "momentum")
    fields = {k: v for k, v in MnistConfig().to_dict().items() if k not in unset}
    fields["noise"] = fields.pop("student_data")
    assert MnistConfig().fingerprint() == config_hash(fields)
    # The bytes hashed are json.dumps's with sorted keys: every fingerprint written so far keeps its value.
    assert config_hash(fields) == hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    rows = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}]
    # A stream of rows hashes as their concatenation would, one piece at a time.
    assert fingerprint(spec, 3, rows, "lora") == config_hash(
        [result_fields(spec), 3, "lora"], [[1, 2, 3], [-100, 2, 3]], [[4], [4]]
    )
    assert fingerprint(spec, 3, rows[:1], "lora") != fingerprint(spec, 3, rows, "lora")
    with pytest.raises(TypeError):
        config_hash({"a": object()})


def test_the_committed_atlas_points_are_found_under_todays_fingerprints():
    from toymodels.atlas import base_config, curves, point_config

    committed = read_json(os.path.join(os.path.dirname(__file__), "..", "docs", "atlas", "atlas.json"))
    base = base_config("full", 4, "bf16")
    keys = {point_config(base, c, o).fingerprint() for c in curves("full") for _, o in c.points}
    assert keys == set(committed["points"])  # a rerun into docs/atlas runs nothing again


# -- records --------------------------------------------------------------------------------


def test_a_record_holds_the_counts_and_checksums_of_what_it_wrote(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"i": 0}\n{"i": 1}\n{"i": 2}\n')
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(b"\x00" * 10)
    record = seal({"n": 3, "loss": float("nan")}, "k", tmp_path, outputs=["rows.jsonl", "model"])
    assert record["outputs"]["rows.jsonl"]["rows"] == 3 and record["outputs"]["model"]["files"] == 1
    assert record["loss"] is None  # as the JSON file will read back
    write_json(tmp_path / "unit.json", record)
    assert stale(read_json(tmp_path / "unit.json"), "k", tmp_path) is None


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda d: (d / "rows.jsonl").write_text('{"i": 0}\n{"i": 1}\n{"i"'), "rows.jsonl holds 2 complete rows"),
        (lambda d: (d / "rows.jsonl").write_text('{"i": 0}\n{"i": 1}\n{"i": 9}\n'), "rows.jsonl differs"),
        (lambda d: (d / "rows.jsonl").unlink(), "rows.jsonl is missing"),
        (lambda d: (d / "model" / "extra.bin").write_bytes(b"1"), "model holds 2 files where its record says 1"),
        (lambda d: (d / "prompts.jsonl").write_text("{}\n"), "its input prompts.jsonl changed"),
        (
            lambda d: write_json(d / "unit.json", read_json(d / "unit.json") | {"n": 4}),
            "its record does not match its checksum",
        ),
    ],
)
def test_a_damaged_or_outdated_unit_is_not_reused_and_says_why(tmp_path, damage, why):
    (tmp_path / "prompts.jsonl").write_text('{"p": 1}\n')
    (tmp_path / "rows.jsonl").write_text('{"i": 0}\n{"i": 1}\n{"i": 2}\n')
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(b"\x00" * 10)
    record = seal({"n": 3}, "k", tmp_path, outputs=["rows.jsonl", "model"], inputs=["prompts.jsonl"])
    write_json(tmp_path / "unit.json", record)
    expected = dict(outputs=["rows.jsonl", "model"], inputs=["prompts.jsonl"])
    assert reusable(tmp_path / "unit.json", "k", **expected)[0] == record
    damage(tmp_path)
    assert reusable(tmp_path / "unit.json", "k", **expected)[0] is None
    assert why in reusable(tmp_path / "unit.json", "k", **expected)[1]


def test_a_record_of_other_settings_or_without_the_expected_outputs_is_not_reused(tmp_path):
    (tmp_path / "rows.jsonl").write_text("{}\n")
    write_json(tmp_path / "unit.json", seal({"n": 1}, "k", tmp_path))
    assert reusable(tmp_path / "unit.json", "other") == (None, "its settings changed since it ran")
    assert "lists no checksum for rows.jsonl" in reusable(tmp_path / "unit.json", "k", outputs=["rows.jsonl"])[1]
    assert reusable(tmp_path / "none.json", "k") == (None, None)  # nothing to explain
    (tmp_path / "torn.json").write_text('{"config_hash": "k", "n"')
    assert "torn.json cannot be read" in reusable(tmp_path / "torn.json", "k")[1]
    # Records written before checksums existed are reused as they are.
    write_json(tmp_path / "old.json", {"config_hash": "k", "n": 1})
    assert reusable(tmp_path / "old.json", "k")[0] == {"config_hash": "k", "n": 1}


def test_once_computes_once_and_recomputes_damaged_work_with_one_line(tmp_path):
    calls, notes = [], []

    def compute():
        calls.append(1)
        (tmp_path / "out.jsonl").write_text('{"x": 1}\n{"x": 2}\n')
        return {"rows": 2}

    path = tmp_path / "unit.json"
    record, computed = once(path, "k", compute, outputs=["out.jsonl"], note=notes.append)
    assert computed and record["rows"] == 2 and record["wall_s"] >= 0 and notes == []
    assert once(path, "k", compute, outputs=["out.jsonl"], note=notes.append) == (record, False)
    (tmp_path / "out.jsonl").write_text('{"x": 1}\n')
    again, computed = once(path, "k", compute, outputs=["out.jsonl"], note=notes.append)
    assert computed and len(calls) == 2
    assert notes == ["out.jsonl holds 1 complete rows where its record says 2"]


def test_a_damaged_file_is_one_error_naming_the_file_and_its_rebuild(tmp_path):
    path = tmp_path / "atlas.json"
    path.write_text('{"points": {"a": 1')
    with pytest.raises(DamagedFile) as caught:
        read_json_or_damaged(path, "rebuild it with `sublearn atlas --out X`")
    message = str(caught.value)
    assert isinstance(caught.value, ConfigError) and "\n" not in message
    assert message.startswith(f"{path} is damaged (not valid JSON: ") and message.endswith("`sublearn atlas --out X`")
    with pytest.raises(FileNotFoundError):
        read_json_or_damaged(tmp_path / "missing.json", "")


# -- folders --------------------------------------------------------------------------------


def test_a_folder_held_by_another_process_is_refused_naming_its_pid(tmp_path, folder_holder):
    child = folder_holder(tmp_path / "run", "sublearn atlas")
    with pytest.raises(FolderBusy) as caught:
        with claim(tmp_path / "run", "sublearn atlas"):
            pytest.fail("the folder was taken twice")
    message = str(caught.value)
    assert f"is in use by pid {child.pid} (sublearn atlas)" in message and "\n" not in message
    child.stdin.close()
    child.wait(timeout=30)
    with claim(tmp_path / "run", "sublearn atlas"):  # free once the holder has ended
        pass


def test_the_lock_is_released_when_the_block_ends_however_it_ends(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with claim(tmp_path, "sublearn mnist"):
            raise KeyboardInterrupt
    probe = "import sys; from sublearn._store import claim\nwith claim(sys.argv[1], 'sublearn mnist'): print('ok')"
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


def test_a_folder_records_its_command_and_another_command_is_refused(tmp_path):
    with claim(tmp_path / "run", "sublearn mnist", {"seeds": 2}) as folder:
        (folder / "results.json").write_text("{}")
    saved = read_json(tmp_path / "run" / FOLDER_RECORD)
    assert saved["command"] == "sublearn mnist" and saved["config"] == {"seeds": 2} and saved["pid"] == os.getpid()
    with pytest.raises(ConfigError, match=r"holds the results of `sublearn mnist`, not `sublearn atlas`"):
        with claim(tmp_path / "run", "sublearn atlas"):
            pytest.fail("an atlas ran in an mnist folder")
    with claim(tmp_path / "run", "sublearn mnist", {"seeds": 3}):  # the same command may come back
        pass


def test_folders_from_before_folder_records_are_known_by_their_files(tmp_path):
    for name, owner in [("atlas.json", "sublearn atlas"), ("prompts.jsonl", "sublearn lm run")]:
        (tmp_path / name.split(".")[0]).mkdir()
        (tmp_path / name.split(".")[0] / name).write_text("{}")
        assert folder_owner(tmp_path / name.split(".")[0]) == owner
    (tmp_path / "empty").mkdir()
    with claim(tmp_path / "empty", "sublearn lm run"):
        pass  # claimed, but nothing written: still free for any command
    assert folder_owner(tmp_path / "empty") is None
    with claim(tmp_path / "empty", "sublearn mnist"):
        pass
