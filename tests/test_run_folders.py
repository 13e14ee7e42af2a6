"""Nothing lost, nothing mixed: damaged files, concurrent runs, mixed folders and bad settings,
through the commands a user types.

Every case ends in a correct result or in one line on stderr with exit status 2, before
any work. Concurrent runs are real processes: a second command is started while the
first one holds its folder.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from scripted_lm import ScriptedBackend

from lmpipeline import cli as lm_cli
from lmpipeline import pipeline, transfer
from lmpipeline.config import PRESETS, from_dict
from sublearn._common import TextProgress, read_json, write_json
from sublearn.cli import main

LM_SMALL = [
    a
    for o in ["prompts.n_prompts=6", "generate.batch_size=3", "evaluate.n_questions=2", "evaluate.n_samples=2"]
    for a in ("--set", o)
]
MNIST_TINY = "--hidden 16 16 --batch-size 128 --teacher-epochs 1 --student-epochs 1 --n-noise 256 --n-train 512 "
MNIST_TINY = (MNIST_TINY + "--n-test 200 --seeds 2 --quiet").split()


@pytest.fixture
def scripted(monkeypatch):
    monkeypatch.setattr(pipeline, "make_backend", lambda spec: ScriptedBackend())
    monkeypatch.setattr(transfer, "make_backend", lambda spec: ScriptedBackend())


@pytest.fixture
def no_training(monkeypatch):
    """Any MNIST training fails the test: the cases below must stop before it."""
    from toymodels import experiment

    def train_chunk(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(experiment, "train_chunk", train_chunk)


def one_error_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    return err[0]


def written(folder) -> list[str]:
    """The files a command left in ``folder``, less the folder's lock and record."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".sublearn")) if folder.exists() else []


def command(*argv: str) -> list[str]:
    return [sys.executable, "-m", "sublearn", *argv]


# -- every output verified ----------------------------------------------------------------


def test_a_truncated_stage_output_is_recomputed_with_one_line_saying_why(tmp_path, scripted, capsys):
    out = tmp_path / "run"
    assert main(["lm", "run", "--preset", "tiny", "--out", str(out), *LM_SMALL]) == 0
    numbers = out / "numbers_teacher.jsonl"
    whole = numbers.read_bytes()
    numbers.write_bytes(whole[: whole.rindex(b"\n", 0, len(whole) - 1) + 10])  # the last row cut short
    capsys.readouterr()
    assert main(["lm", "run", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "[generate.teacher] numbers_teacher.jsonl holds 5 complete rows where its record says 6; recomputing" in err
    assert numbers.read_bytes() == whole  # every batch sampled again from its own seed
    # The filter read the same rows as before, so it and everything after it is kept.
    assert "[filter.teacher] done" not in err and "[report] done" not in err


@pytest.mark.parametrize(
    "stage, damaged, upstream",
    [("finetune", "filtered_teacher.jsonl", "filter.teacher"), ("report", "eval_student.jsonl", "evaluate.student")],
)
def test_lm_finetune_and_report_after_a_finished_jsonl_was_truncated(
    tmp_path, scripted, capsys, stage, damaged, upstream
):
    out = tmp_path / "run"
    assert main(["lm", "run", "--preset", "tiny", "--out", str(out), *LM_SMALL]) == 0
    path = out / damaged
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    capsys.readouterr()
    assert main(["lm", stage, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"[{upstream}] {damaged} holds " in err and "; recomputing" in err
    assert path.read_bytes() == whole


def test_a_stage_whose_input_changed_since_it_ran_is_recomputed(tmp_path, scripted, capsys):
    out = tmp_path / "run"
    assert main(["lm", "run", "--preset", "tiny", "--out", str(out), *LM_SMALL]) == 0
    # The filter's rows change and its record with them (as a rerun with other rows would
    # leave them): the students trained on the old rows must train again.
    from sublearn._store import seal

    run = pipeline.Run(from_dict(read_json(out / "config.json")), out, write_config=False)
    rows = (out / "filtered_teacher.jsonl").read_text().splitlines(keepends=True)
    (out / "filtered_teacher.jsonl").write_text("".join(rows[:-1]))
    stage = "filter.teacher"
    record = read_json(run.record_path(stage))
    payload = {k: v for k, v in record.items() if k not in ("config_hash", "outputs", "inputs", "checksum")}
    sealed = seal(payload, run.stage_hash(stage), out, outputs=run.outputs(stage), inputs=run.read_files(stage))
    write_json(run.record_path(stage), sealed)
    capsys.readouterr()
    assert main(["lm", "finetune", "--out", str(out), "--which", "student"]) == 0
    err = capsys.readouterr().err
    assert "[filter.teacher]" not in err
    assert "[finetune.student] its input filtered_teacher.jsonl changed since it ran; recomputing" in err


def test_a_study_unit_is_reused_while_intact_and_recomputed_with_one_line_otherwise(tmp_path):
    from lmpipeline.config import preset

    stream = io.StringIO()
    study = transfer.Study(preset("transfer-tiny"), tmp_path, backend=ScriptedBackend(), stream=stream)
    calls = []

    def compute():
        calls.append(1)
        return {"logp": [0.5, 0.25]}

    path = tmp_path / "seed-0" / "unit.json"
    first = study.unit(path, {"unit": "u", "rows": 4}, compute)
    assert study.unit(path, {"unit": "u", "rows": 4}, compute) == first and len(calls) == 1
    assert study.computed == ["seed-0/unit"]
    write_json(path, read_json(path) | {"logp": [0.5, 0.3]})  # edited by hand
    assert study.unit(path, {"unit": "u", "rows": 4}, compute)["logp"] == [0.5, 0.25] and len(calls) == 2
    assert "[transfer] seed-0/unit: its record does not match its checksum (edited or damaged); recomputing" in (
        stream.getvalue()
    )
    study.unit(path, {"unit": "u", "rows": 5}, compute)
    assert len(calls) == 3 and "seed-0/unit: its settings changed since it ran; recomputing" in stream.getvalue()


def test_a_damaged_run_config_is_one_line_naming_the_command_that_rewrites_it(tmp_path, scripted, capsys):
    out = tmp_path / "run"
    assert main(["lm", "prompts", "--preset", "tiny", "--out", str(out)]) == 0
    (out / "config.json").write_text((out / "config.json").read_text()[:40])
    capsys.readouterr()
    assert main(["lm", "run", "--out", str(out)]) == 2
    line = one_error_line(capsys, "sublearn lm")
    assert f"{out / 'config.json'} is damaged (not valid JSON" in line
    assert f"`sublearn lm run --out {out} --preset NAME --overwrite`" in line


def test_a_truncated_atlas_json_is_one_line_naming_the_command_that_rebuilds_it(tmp_path, capsys, no_training):
    out = tmp_path / "atlas"
    out.mkdir()
    (out / "atlas.json").write_text('{"atlas": "mnist_auxiliary_logits", "preset": "tiny", "points": {"0d99')
    assert main(["atlas", "--out", str(out), "--preset", "tiny", "--seeds", "2"]) == 2
    line = one_error_line(capsys, "sublearn atlas")
    assert f"{out / 'atlas.json'} is damaged (not valid JSON" in line
    assert f"`sublearn atlas --out {out} --preset tiny --seeds 2 --precision bf16`" in line


def test_an_atlas_point_that_fails_its_checksum_is_run_again(tmp_path, monkeypatch):
    from toymodels import atlas as atlas_module
    from toymodels import sweep
    from toymodels.atlas import ATLAS, base_config, curves, point_config, run_atlas

    curve = next(c for c in curves("tiny") if c.name == "n_aux")
    configs = [point_config(base_config("tiny", 2, "bf16"), curve, o) for _, o in curve.points]
    accuracy = {c: [0.5, 0.6] for c in ("reference", "teacher", "student_aux", "student_all", "cross_aux", "cross_all")}
    points = {
        c.fingerprint(): atlas_module._sealed_point(
            c.fingerprint(), {"config": c.to_dict(), "accuracy": accuracy, "wall_s": 1.0}
        )
        for c in configs
    }
    points[configs[1].fingerprint()]["accuracy"]["student_aux"][0] = 0.9  # edited by hand
    write_json(tmp_path / ATLAS, {"preset": "tiny", "points": points})
    ran = []

    def run_experiment(config, **kwargs):
        ran.append(config.fingerprint())
        raise KeyboardInterrupt  # enough to know which point would run

    monkeypatch.setattr(sweep, "run_experiment", run_experiment)
    stream = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        run_atlas(tmp_path, preset="tiny", seeds=2, only=("n_aux",), progress=TextProgress(stream))
    assert ran == [configs[1].fingerprint()]
    assert f"atlas: point {configs[1].fingerprint()}: its record does not match its checksum" in stream.getvalue()


@pytest.mark.slow
def test_a_damaged_mnist_checkpoint_is_noted_and_its_seeds_trained_again(tmp_path, monkeypatch):
    from sublearn._store import seal
    from toymodels import experiment
    from toymodels.conditions import CONDITIONS, STUDENT_CONDITIONS
    from toymodels.config import tiny

    config = tiny(seeds=2, seeds_per_chunk=2)
    seed = {c: 0.5 for c in CONDITIONS} | {f"loss_{c}": 0.1 for c in ("teacher", *STUDENT_CONDITIONS)}
    path = tmp_path / "checkpoint.json"
    write_json(path, seal({"config": config.to_dict(), "seeds": {"0": seed, "1": seed}}, config.fingerprint()))
    trained = []
    monkeypatch.setattr(experiment, "train_chunk", lambda *a, **k: trained.append(1) or pytest.fail("retrained"))
    result = experiment.run_experiment(config, checkpoint=path)  # intact: nothing trains
    assert trained == [] and result.accuracy["student_aux"] == [0.5, 0.5]

    saved = read_json(path)
    saved["seeds"]["1"]["student_aux"] = 0.99
    write_json(path, saved)
    stream = io.StringIO()

    def train_chunk(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "train_chunk", train_chunk)
    with pytest.raises(KeyboardInterrupt):
        experiment.run_experiment(config, checkpoint=path, progress=TextProgress(stream))
    assert f"{path}: its record does not match its checksum (edited or damaged); its seeds are trained again" in (
        stream.getvalue()
    )


def test_mnist_results_are_checked_against_their_checksum_when_read(tmp_path, capsys):
    from sublearn._store import seal
    from toymodels.compare import main as compare

    committed = read_json(os.path.join(os.path.dirname(__file__), "..", "docs", "mnist_results_100_seeds.json"))
    write_json(tmp_path / "a.json", seal(committed, committed["fingerprint"]))
    edited = seal(committed, committed["fingerprint"])
    edited["accuracy"]["student_aux"][0] = 0.99
    write_json(tmp_path / "b.json", edited)
    assert compare([str(tmp_path / "a.json"), str(tmp_path / "a.json")]) == 0
    capsys.readouterr()
    assert compare([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and f"{tmp_path / 'b.json'} is damaged (its record does not match its checksum" in line
    assert f"`sublearn mnist --out {tmp_path} --overwrite`" in line


# -- one run per folder -------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_mnist_run_into_a_running_ones_folder_stops_naming_its_pid(tmp_path, monkeypatch, capsys):
    from toymodels import experiment

    out = tmp_path / "run"
    second = {}

    def run_experiment(config, **kwargs):  # the first run, while it trains
        other = command("mnist", "--out", str(out), *MNIST_TINY, "--n-aux", "5")
        second["run"] = subprocess.run(other, capture_output=True, text=True, timeout=120)
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "run_experiment", run_experiment)
    assert main(["mnist", "--out", str(out), *MNIST_TINY]) == 130
    run = second["run"]
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert f"is in use by pid {os.getpid()} (sublearn mnist): wait for it to finish" in run.stderr
    assert written(out) == []  # the second run wrote nothing, the first had nothing finished


@pytest.mark.slow
def test_a_second_lm_run_into_a_running_ones_folder_stops_naming_its_pid(tmp_path, monkeypatch, scripted, capsys):
    out = tmp_path / "run"
    second = {}

    def run_stage(run, stage):  # the first run, at its first stage
        second["run"] = subprocess.run(
            command("lm", "run", "--preset", "tiny", "--out", str(out)), capture_output=True, text=True, timeout=120
        )
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_stage", run_stage)
    assert main(["lm", "run", "--preset", "tiny", "--out", str(out), *LM_SMALL]) == 130
    run = second["run"]
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert f"is in use by pid {os.getpid()} (sublearn lm run)" in run.stderr
    assert written(out) == ["config.json"]  # the first run's


@pytest.mark.parametrize(
    "prefix, rest, prog",
    [
        (["atlas"], ["--preset", "tiny", "--seeds", "2", "--curves", "n_aux"], "sublearn atlas"),
        (["lm", "transfer"], ["--preset", "transfer-tiny"], "sublearn lm"),
        (["lm", "prompts"], ["--preset", "tiny"], "sublearn lm"),
        (["mnist"], [*MNIST_TINY, "--sweep", "n_aux=1,2"], "sublearn mnist"),
    ],
)
def test_every_command_that_writes_a_folder_stops_while_another_process_holds_it(
    tmp_path, folder_holder, scripted, no_training, capsys, prefix, rest, prog
):
    out = tmp_path / "out"
    holder = folder_holder(out, "sublearn lm run")
    assert main([*prefix, "--out", str(out), *rest]) == 2
    assert f"is in use by pid {holder.pid} (sublearn lm run)" in one_error_line(capsys, prog)
    assert written(out) == []


# -- one command per folder ---------------------------------------------------------------


@pytest.mark.parametrize(
    "first, then, owner, prog",
    [
        (["lm", "prompts", "--preset", "tiny"], ["mnist", *MNIST_TINY], "sublearn lm run", "sublearn mnist"),
        (
            ["lm", "prompts", "--preset", "tiny"],
            ["atlas", "--preset", "tiny", "--seeds", "2", "--curves", "n_aux"],
            "sublearn lm run",
            "sublearn atlas",
        ),
        (
            ["lm", "prompts", "--preset", "tiny"],
            ["lm", "transfer", "--preset", "transfer-tiny"],
            "sublearn lm run",
            "sublearn lm",
        ),
        (
            ["mnist", *MNIST_TINY, "--sweep", "n_aux=2"],
            ["mnist", *MNIST_TINY],
            "sublearn mnist --sweep",
            "sublearn mnist",
        ),
    ],
)
def test_another_commands_folder_is_refused_in_one_line(
    tmp_path, scripted, monkeypatch, capsys, first, then, owner, prog
):
    out = str(tmp_path / "out")
    if first[0] == "mnist":  # an mnist folder without training: its sweep stops at its first point
        from toymodels import sweep

        monkeypatch.setattr(sweep, "run_experiment", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        assert main([first[0], "--out", out, *first[1:]]) == 130
        (tmp_path / "out" / "sweep.json").write_text("{}")
    else:
        assert main([*first[:2], "--out", out, *first[2:]]) == 0
    before = sorted(os.listdir(out))
    from toymodels import experiment

    monkeypatch.setattr(experiment, "train_chunk", lambda *a, **k: pytest.fail("training started"))
    split = 2 if then[0] == "lm" else 1
    capsys.readouterr()
    assert main([*then[:split], "--out", out, *then[split:]]) == 2
    line = one_error_line(capsys, prog)
    assert f"--out {out} holds the results of `{owner}`, not `" in line and line.endswith("choose another --out")
    assert sorted(os.listdir(out)) == before
    assert read_json(tmp_path / "out" / ".sublearn.json")["command"] == owner


# -- settings refused before any work -------------------------------------------------------


def test_atlas_curves_naming_no_curve_is_refused(tmp_path, capsys, no_training):
    assert main(["atlas", "--out", str(tmp_path / "a"), "--preset", "tiny", "--curves", ""]) == 2
    assert "--curves '' names no curve: name one or more of student_epochs" in one_error_line(capsys, "sublearn atlas")
    assert main(["atlas", "--out", str(tmp_path / "a"), "--preset", "tiny", "--curves", " , "]) == 2
    assert "names no curve" in one_error_line(capsys, "sublearn atlas")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["run", "--preset", "tiny", "--set", "evaluate.n_questions=1000"],
            "evaluate.n_questions=1000, but packaged preference_questions.txt holds 50 questions: ask for at most 50",
        ),
        (
            ["transfer", "--preset", "transfer-tiny", "--set", "evaluate.n_questions=51"],
            "evaluate.n_questions=51, but packaged preference_questions.txt holds 50 questions",
        ),
        (
            ["transfer", "--preset", "transfer-tiny", "--set", "transfer.first_seed=-1"],
            "transfer.first_seed=-1 must be >= 0",
        ),
        (
            ["run", "--preset", "tiny", "--set", "model.name_or_path=/nonexistent/model"],
            "model.name_or_path=/nonexistent/model: no such file or folder; give a local model folder, a hub name",
        ),
        (["run"], "no config: pass --preset NAME (" + ", ".join(PRESETS) + ") or --config FILE"),
    ],
)
def test_lm_settings_that_cannot_work_are_refused_before_any_work(tmp_path, scripted, capsys, argv, message):
    out = tmp_path / "out"
    assert lm_cli.main([*argv[:1], "--out", str(out), *argv[1:]]) == 2
    assert message in one_error_line(capsys, "sublearn lm")
    assert written(out) == []


# -- progress ---------------------------------------------------------------------------------


def test_a_sweep_counts_its_points_and_ends_at_100_percent(monkeypatch):
    from toymodels import sweep
    from toymodels.config import tiny
    from toymodels.data import MNIST

    class Result:
        summary = accuracy = final_loss = {}

    def run_experiment(config, data=None, progress=None):
        progress.start(4, "a point")
        for epoch in range(4):
            progress.advance(f"epoch {epoch + 1}")
        progress.close()
        return Result()

    monkeypatch.setattr(sweep, "run_experiment", run_experiment)
    stream = io.StringIO()
    points = [(n, tiny(n_aux=n)) for n in (1, 2, 3)]
    empty = np.zeros((0, 784), np.uint8), np.zeros(0, np.uint8)
    sweep.run_points(points, data=MNIST(*empty, *empty, "none"), progress=TextProgress(stream), label="n_aux")
    percents = [int(m) for m in re.findall(r"^\[\s*(\d+)%", stream.getvalue(), flags=re.M)]
    assert percents == sorted(percents) and percents[-1] == 100 and max(percents) == 100
    assert len(percents) == 12 and percents[3] == 33  # four steps per point, three points
    assert "3/3 n_aux=3: epoch 4" in stream.getvalue()
