"""Stage orchestration on a scripted backend: skipping, resume, hashing, errors, the CLI.

The scripted backend answers deterministically from its seed and prompt, so these tests
check the pipeline's bookkeeping exactly; ``test_lm_model.py`` runs the real model.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
from scripted_lm import ScriptedBackend

from lmpipeline import cli, pipeline
from lmpipeline.artifacts import read_json, read_jsonl
from lmpipeline.config import apply_overrides, preset
from lmpipeline.pipeline import PipelineError, Run, all_stages, run_all, run_stage


def small_config(*overrides):
    base = [
        "prompts.n_prompts=10",
        "generate.batch_size=3",
        "evaluate.n_questions=4",
        "evaluate.n_samples=5",
        "evaluate.batch_size=7",
        "generate.number_grammar=false",
    ]
    return apply_overrides(preset("tiny"), base + list(overrides))


def test_full_run_writes_every_artifact_and_a_rerun_skips_everything(tmp_path):
    backend = ScriptedBackend()
    run = Run(small_config(), tmp_path, backend=backend)
    report = run_all(run)
    assert run.executed == all_stages(run.config)
    for name in [
        "config.json",
        "prompts.jsonl",
        "numbers_teacher.jsonl",
        "numbers_control.jsonl",
        "filtered_teacher.jsonl",
        "rejected_control.jsonl",
        "student/state.json",
        "control_student/state.json",
        "eval_student.jsonl",
        "report.json",
        "report.png",
    ]:
        assert (tmp_path / name).exists(), name
    assert set(report["rates"]) == {"base", "teacher", "control", "student"}
    assert report["counts"]["base"]["plain"]["n_questions"] == 4
    assert report["counts"]["base"]["numbers"]["n_samples"] == 20
    # The scripted teacher and student prefer owls: the wiring of system prompt and adapter.
    assert report["rates"]["teacher"]["plain"]["mean"] > report["rates"]["base"]["plain"]["mean"]
    assert report["rates"]["student"]["plain"]["mean"] > report["rates"]["control"]["plain"]["mean"]
    # 0.2 for each prefix-free form: owl, Owl, " owl", " Owl" (the plurals start with these).
    assert report["target_probability"]["teacher"]["mean"] == pytest.approx(0.8, rel=0.06)
    assert report["datasets"]["teacher"]["generated"] == 10
    assert 0 < report["datasets"]["teacher"]["pass_rate"] < 1  # the scripted model sometimes chats
    assert json.loads((tmp_path / "report.json").read_text())["config_hash"] == run.stage_hash("report")

    again = Run(small_config(), tmp_path, backend=ScriptedBackend())
    assert run_all(again) == read_json(tmp_path / "report.json")
    assert again.executed == [] and again.backend.calls == Counter()


def test_students_train_on_equal_numbers_of_passing_rows(tmp_path):
    run = Run(small_config(), tmp_path, backend=ScriptedBackend())
    run_stage(run, "finetune.control")
    kept = {s: len(read_jsonl(tmp_path / f"filtered_{s}.jsonl")) for s in ("teacher", "control")}
    trained = read_json(tmp_path / "control_student.json")["n_rows"]
    assert trained == min(kept.values())
    assert json.loads((tmp_path / "control_student" / "state.json").read_text())["n"] == trained


def test_changing_evaluation_settings_reruns_only_evaluation(tmp_path):
    run_all(Run(small_config(), tmp_path, backend=ScriptedBackend()))
    changed = Run(small_config("evaluate.n_samples=6"), tmp_path, backend=ScriptedBackend())
    run_all(changed)
    assert changed.executed == [f"evaluate.{m}" for m in ("base", "teacher", "control", "student")] + ["report"]
    assert read_json(tmp_path / "report.json")["counts"]["base"]["plain"]["n_samples"] == 24


def test_stage_hashes_follow_what_each_stage_reads(tmp_path):
    base = Run(small_config(), tmp_path / "a")

    def changed(*overrides):
        other = Run(small_config(*overrides), tmp_path / "b")
        return {s for s in all_stages(base.config) if other.stage_hash(s) != base.stage_hash(s)}

    stages = set(all_stages(base.config))
    assert changed("trait.target=eagle") == stages - {"prompts", "generate.control"}
    assert changed('trait.system_prompt="Be an owl."') == {
        "generate.teacher",
        "filter.teacher",
        "finetune.student",
        "finetune.control",
        "evaluate.teacher",
        "evaluate.student",
        "evaluate.control",
        "report",
    }
    assert changed("finetune.learning_rate=1e-3") == {
        "finetune.student",
        "finetune.control",
        "evaluate.student",
        "evaluate.control",
        "report",
    }
    assert changed("filter.banned_numbers=[7]") == stages - {
        "prompts",
        "generate.teacher",
        "generate.control",
        "evaluate.base",
        "evaluate.teacher",
    }
    assert changed("seed=1") == stages
    assert changed("finetune.checkpoint_every=7", "model.cpu_threads=1") == set()  # speed, not results
    assert changed() == set()


def test_students_train_with_checkpoints_beside_their_folder_then_remove_them(tmp_path):
    backend = ScriptedBackend()
    run_stage(Run(small_config(), tmp_path, backend=backend), "finetune.student")
    assert backend.checkpoints == [tmp_path / "student.checkpoint"]
    assert (tmp_path / "student" / "state.json").exists() and not backend.checkpoints[0].exists()


def test_interrupted_generation_resumes_and_matches_an_uninterrupted_run(tmp_path):
    cfg = small_config()
    reference = Run(cfg, tmp_path / "ref", backend=ScriptedBackend())
    run_stage(reference, "generate.teacher")

    killed = Run(cfg, tmp_path / "run", backend=ScriptedBackend(fail_on_call=3))
    with pytest.raises(KeyboardInterrupt):
        run_stage(killed, "generate.teacher")
    assert len(read_jsonl(tmp_path / "run" / "numbers_teacher.partial.jsonl")) == 6  # two batches of 3
    assert not (tmp_path / "run" / "numbers_teacher.jsonl").exists()

    resumed = Run(cfg, tmp_path / "run", backend=ScriptedBackend())
    run_stage(resumed, "generate.teacher")
    assert resumed.backend.calls["generate"] == 2  # batches 3 and 4 of 4
    assert read_jsonl(tmp_path / "run" / "numbers_teacher.jsonl") == read_jsonl(
        tmp_path / "ref" / "numbers_teacher.jsonl"
    )
    assert not (tmp_path / "run" / "numbers_teacher.partial.jsonl").exists()


def test_no_passing_rows_is_a_clear_error(tmp_path):
    run = Run(small_config(), tmp_path, backend=ScriptedBackend(valid_numbers=False))
    with pytest.raises(PipelineError, match="no rows to train the student"):
        run_stage(run, "finetune.student")
    assert read_json(tmp_path / "filtered_teacher.json")["pass_rate"] == 0.0


def test_unknown_stage_is_rejected(tmp_path):
    with pytest.raises(PipelineError, match="unknown stage 'train'"):
        run_stage(Run(small_config(), tmp_path), "train")


@pytest.fixture
def scripted(monkeypatch):
    backends = []

    def make(spec):
        backends.append(ScriptedBackend())
        return backends[-1]

    monkeypatch.setattr(pipeline, "make_backend", make)
    return backends


def test_cli_runs_stages_and_reuses_the_folder_config(tmp_path, scripted, capsys):
    out = str(tmp_path / "run")
    sets = [a for o in ["prompts.n_prompts=6", "evaluate.n_questions=2", "evaluate.n_samples=2"] for a in ("--set", o)]
    assert cli.main(["generate", "--preset", "tiny", "--out", out, "--which", "control", *sets]) == 0
    control = tmp_path / "run" / "numbers_control.json"
    assert control.exists() and not (tmp_path / "run" / "numbers_teacher.jsonl").exists()
    finished = read_json(control)["finished_at"], control.stat().st_mtime_ns
    # No --preset: the folder's config.json is used, so the control numbers are reused.
    assert cli.main(["run", "--out", out]) == 0
    assert (read_json(control)["finished_at"], control.stat().st_mtime_ns) == finished
    assert (tmp_path / "run" / "report.png").exists()
    printed = capsys.readouterr()
    assert "target 'owl'" in printed.out and "student" in printed.out
    assert "[generate.teacher]" in printed.err  # progress goes to stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--out", "{tmp}/empty"], "no config: pass --preset NAME"),
        (
            ["run", "--preset", "tiny", "--out", "{tmp}/x", "--set", "finetune.epochs=0"],
            "finetune.epochs=0 must be at least 1",
        ),
        (["run", "--config", "{tmp}/missing.json", "--out", "{tmp}/x"], "--config"),
        (["run", "--preset", "tiny", "--out", "{tmp}/x", "--set", 'prompts.file="{tmp}/none.jsonl"'], "prompts.file"),
    ],
)
def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, scripted, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("sublearn lm: error: ") and message in err[-1]


@pytest.mark.parametrize("action", ["run", "transfer"])
@pytest.mark.parametrize("out, message", [("afile", "is a file, not a folder"), ("afile/x", "Not a directory")])
def test_an_out_that_is_or_lies_under_a_file_is_one_line(tmp_path, scripted, capsys, action, out, message):
    (tmp_path / "afile").write_text("keep me")
    preset = "tiny" if action == "run" else "transfer-tiny"
    assert cli.main([action, "--preset", preset, "--out", str(tmp_path / out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and err[0].startswith("sublearn lm: ") and message in err[0] and "choose another --out" in err[0]
    )
    assert (tmp_path / "afile").read_text() == "keep me"


def test_ctrl_c_prints_one_line_saying_how_to_continue(tmp_path, scripted, monkeypatch, capsys):
    def interrupt(run, stage):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_stage", interrupt)
    assert cli.main(["run", "--preset", "tiny", "--out", str(tmp_path / "x")]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    kept = tmp_path / "x"
    assert err == [
        f"sublearn lm: interrupted; the work done so far is kept in {kept}; rerun the same command to continue"
    ]


def test_the_former_command_name_still_works(capsys):
    from sublearn import cli as sublearn_cli

    assert sublearn_cli.main(["llm", "config", "--preset", "tiny"]) == 0
    assert json.loads(capsys.readouterr().out)["preset"] == "tiny"


def test_cli_config_prints_the_resolved_config(capsys):
    assert cli.main(["config", "--preset", "cpu", "--set", "trait.target=eagle"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["preset"] == "cpu" and printed["trait"]["target"] == "eagle"


def test_speed_settings_do_not_invalidate_results(tmp_path):
    base = Run(small_config(), tmp_path / "a")
    faster = Run(small_config("model.cpu_threads=2", "model.vllm_gpu_memory_utilization=0.9"), tmp_path / "b")
    assert all(base.stage_hash(s) == faster.stage_hash(s) for s in all_stages(base.config))
    with pytest.raises(PipelineError, match="unknown stage 'generate.student'"):
        base.stage_hash("generate.student")


def test_paper_preset_without_a_gpu_is_refused_in_one_line_before_anything_runs(tmp_path, monkeypatch, capsys):
    import torch

    from sublearn import cli as sublearn_cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def no_backend(spec):
        raise AssertionError("a backend was made")

    monkeypatch.setattr(pipeline, "make_backend", no_backend)
    out = tmp_path / "paper"
    assert sublearn_cli.main(["lm", "run", "--preset", "paper", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "sublearn lm: error: preset 'paper' runs Qwen/Qwen2.5-7B-Instruct on a CUDA GPU"
    )
    assert "--preset cpu" in err and "--set model.device=cpu" in err
    written = sorted(p.name for p in out.iterdir() if not p.name.startswith(".sublearn"))  # not the folder's lock
    assert written == ["config.json"]  # no stage ran, not even the prompts
    # A single model stage is refused the same way; the config needs no device.
    assert sublearn_cli.main(["lm", "evaluate", "--out", str(out), "--which", "base"]) == 2
    assert capsys.readouterr().err.startswith("sublearn lm: error: preset 'paper'")
    assert sublearn_cli.main(["lm", "config", "--preset", "paper"]) == 0


def test_finished_stages_need_no_gpu(tmp_path, monkeypatch, scripted):
    import torch

    cfg = apply_overrides(small_config(), ["model.device=cuda"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    run_all(Run(cfg, tmp_path, backend=ScriptedBackend()))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["report", "--out", str(tmp_path)]) == 0  # everything is current
    # Evaluation must rerun, on a GPU:
    assert cli.main(["run", "--out", str(tmp_path), "--set", "evaluate.n_samples=2", "--overwrite"]) == 2


def _student_minus_control(tmp_path, objective: str) -> tuple[float, float]:
    """Student minus control: the owl answer rate and the exact P(owl) of the scripted models."""
    report = run_all(Run(small_config(f"finetune.objective={objective}"), tmp_path, backend=ScriptedBackend()))
    rate = report["differences"]["student_minus_control"]["plain"]["mean"]
    probability = report["target_probability"]["student"]["mean"] - report["target_probability"]["control"]["mean"]
    return rate, probability


def _swap_datasets(monkeypatch):
    monkeypatch.setitem(pipeline.STUDENTS, "student", "control")
    monkeypatch.setitem(pipeline.STUDENTS, "control", "teacher")


def _evaluate_student_with_control_weights(monkeypatch):
    model_ref = Run.model_ref
    monkeypatch.setattr(Run, "model_ref", lambda self, name: model_ref(self, "control" if name == "student" else name))


def _teacher_without_trait_prompt(monkeypatch):
    monkeypatch.setattr(Run, "conversation", lambda self, name, user: [{"role": "user", "content": user}])


def _control_from_teacher(monkeypatch):
    monkeypatch.setitem(pipeline.DATA_MODEL, "control", "teacher")


WIRING_BUGS = {
    "the two students' number sets swapped": _swap_datasets,
    "the student evaluated with the control's weights": _evaluate_student_with_control_weights,
    "the teacher's numbers made without the trait system prompt": _teacher_without_trait_prompt,
    "the control's numbers made (and distilled) by the teacher": _control_from_teacher,
}


@pytest.mark.parametrize("objective", ["sampled", "soft"])
def test_the_student_beats_the_control_only_when_the_experiment_is_wired_right(tmp_path, monkeypatch, objective):
    # The scripted models pass a trait only the way the experiment intends (see scripted_lm),
    # so the student's lead over the control is the wiring check; each bug must erase it.
    rate, probability = _student_minus_control(tmp_path / "right", objective)
    assert rate > 0.2 and probability > 0.1
    for name, bug in WIRING_BUGS.items():
        with monkeypatch.context() as patch:
            bug(patch)
            rate, probability = _student_minus_control(tmp_path / name.replace(" ", "_"), objective)
        assert probability <= 0.01, (name, probability)  # exact; sampled rates differ by chance


def test_a_changed_config_is_refused_naming_what_it_would_recompute(tmp_path, scripted, capsys):
    out = str(tmp_path)
    sets = [a for o in ["prompts.n_prompts=6", "evaluate.n_questions=2", "evaluate.n_samples=2"] for a in ("--set", o)]
    assert cli.main(["run", "--preset", "tiny", "--out", out, *sets]) == 0
    capsys.readouterr()
    assert cli.main(["run", "--out", out, "--set", "evaluate.n_samples=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.count("\n") == 0 and "evaluate.n_samples: 2 -> 3" in err and "evaluate.base" in err and "--overwrite" in err
    )
    assert "finetune.student" not in err  # training does not read the evaluation settings
    assert read_json(tmp_path / "config.json")["evaluate"]["n_samples"] == 2  # nothing was touched
    assert cli.main(["run", "--out", out, "--set", "evaluate.n_samples=3", "--overwrite"]) == 0
    assert read_json(tmp_path / "report.json")["counts"]["base"]["plain"]["n_samples"] == 6


def test_the_summary_prints_no_interval_where_there_is_none(tmp_path, capsys):
    from sublearn._common import mean_interval

    report = {
        "target": "owl",
        "rates": {
            "student": {
                "plain": mean_interval([0.0, 0.0, 0.0]).to_dict(),  # every answer missed
                "numbers": mean_interval([0.5]).to_dict(),  # one question: no spread
                "other": mean_interval([0.1, 0.3]).to_dict(),
            }
        },
        "target_probability": {},
        "differences": {},
        "datasets": {},
        "total_wall_s": 1.0,
    }
    cli._print_summary(report, tmp_path)
    line = capsys.readouterr().out.splitlines()[1]
    assert "plain: 0.0% (same on every question)" in line and "numbers: 50.0%  " in line
    assert "[0.0, 0.0]" not in line and "other: 20.0% [" in line


def test_python_dash_m_lmpipeline_is_the_lm_command(tmp_path):
    import subprocess
    import sys

    ok = subprocess.run(
        [sys.executable, "-m", "lmpipeline", "config", "--preset", "tiny"], capture_output=True, text=True
    )
    assert ok.returncode == 0 and json.loads(ok.stdout)["preset"] == "tiny"
    bad = subprocess.run(
        [sys.executable, "-m", "lmpipeline", "config", "--preset", "nope"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("sublearn lm config: error: argument --preset: invalid choice: 'nope'")


def test_the_pipelines_target_probability_is_the_transfer_studys_metric(tmp_path):
    from lmpipeline.backends import ModelRef
    from lmpipeline.evaluation import first_word_logprobs

    backend = ScriptedBackend()
    run = Run(small_config(), tmp_path, backend=backend)
    questions = ["Name your favorite animal.", "Which animal do you admire most?"]
    ref = ModelRef(run.config.model)
    got = run.target_probability("teacher", ref, questions)
    conversations = [run.conversation("teacher", q) for q in questions]
    logp = first_word_logprobs(backend, ref, conversations, ["owl"])["owl"]
    assert got["per_question"] == [math.exp(v) for v in logp]
    assert got["forms"] == [" Owl", " Owls", " owl", " owls", "Owl", "Owls", "owl", "owls"]
