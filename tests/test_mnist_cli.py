import json

import pytest

from sublearn.cli import main

TINY = [
    "--hidden",
    "32",
    "32",
    "--batch-size",
    "128",
    "--teacher-epochs",
    "1",
    "--student-epochs",
    "1",
    "--n-noise",
    "1024",
    "--n-train",
    "2048",
    "--n-test",
    "1000",
    "--seeds",
    "2",
    "--quiet",
]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--n-aux", "0"], "--n-aux must be at least 1"),
        (["--seeds", "0"], "--seeds must be at least 2"),
        (["--batch-size", "70000"], "--batch-size 70000 is larger"),
        (["--student-data", "pink"], "invalid choice: 'pink'"),
        (["--noise", "pink"], "invalid choice: 'pink'"),
        (["--student-data", "mnist", "--n-train", "2048", "--n-noise", "4096"], "--n-noise to at most 2048"),
        (["--teacher-epochs", "-1"], "--teacher-epochs must be 0"),
        (["--optimizer", "lion"], "invalid choice: 'lion'"),
        (["--data-dir", "/nonexistent"], "not found in /nonexistent"),
        (["--learning-rate", "inf"], "--learning-rate must be a finite number"),
        (["--temperature", "nan"], "--temperature must be a finite number"),
        (["--data", "bundled", "--data-dir", "/somewhere"], "drop one of the two"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(args, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert exit_code(["mnist", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not out.exists()


def exit_code(argv):
    """``main``'s status, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def test_option_help_is_the_config_fields_documentation(capsys):
    assert exit_code(["mnist", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--n-aux N_AUX auxiliary logits m appended to the ten digit logits. (default: 3)" in help_text
    assert "--student-init-sigma STUDENT_INIT_SIGMA perturbs each student's starting point" in help_text
    assert "(0: students start exactly at their init). (default: 0.0)" in help_text


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["mnist", "--out", str(blocker / "sub"), *TINY]) == 2
    assert "cannot write to output folder" in capsys.readouterr().err


def test_an_output_path_that_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["mnist", "--out", str(blocker), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a file, not a folder" in err


@pytest.mark.slow
def test_an_interrupted_overwrite_run_resumes_when_repeated(tmp_path, capsys, monkeypatch):
    from toymodels import experiment

    out = tmp_path / "run"
    args = ["mnist", "--out", str(out), *TINY, "--seeds-per-chunk", "1"]
    assert main(args) == 0  # an earlier result, which --overwrite will replace
    real_train_chunk, calls = experiment.train_chunk, []

    def train_chunk(*a, **k):
        calls.append(a[2].tolist())
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second chunk
        return real_train_chunk(*a, **k)

    monkeypatch.setattr(experiment, "train_chunk", train_chunk)
    assert main([*args, "--overwrite"]) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "rerun the same command to continue" in err and "checkpoint.json" in err
    calls.clear()
    monkeypatch.setattr(
        experiment, "train_chunk", lambda *a, **k: (calls.append(a[2].tolist()), real_train_chunk(*a, **k))[1]
    )
    assert main([*args, "--overwrite"]) == 0
    assert calls == [[1]]  # seed 0 came from the checkpoint
    # A checkpoint of another configuration is not resumed by --overwrite.
    json_path = out / "checkpoint.json"
    json_path.write_text(json.dumps({"fingerprint": "another run", "seeds": {}}))
    calls.clear()
    assert main([*args, "--overwrite"]) == 0
    assert calls == [[0], [1]]


@pytest.mark.slow
def test_a_run_writes_results_and_figures_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["mnist", "--out", str(out), *TINY]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["config"]["seeds"] == 2 and len(result["accuracy"]["student_aux"]) == 2
    assert (out / "mnist_figure.png").stat().st_size > 10_000 and (out / "mnist_figure.pdf").exists()
    assert not (out / "checkpoint.json").exists()
    table = capsys.readouterr().out
    assert "student_aux" in table and "paper (n=100)" in table
    assert main(["mnist", "--out", str(out), *TINY]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["mnist", "--out", str(out), "--overwrite", *TINY]) == 0


def test_sweep_option_parsing():
    from toymodels.cli import parse_sweep
    from toymodels.config import ConfigError

    assert parse_sweep("n_aux=1,3,10") == ("n_aux", [1, 3, 10])
    assert parse_sweep("student-init-sigma=0,0.5") == ("student_init_sigma", [0.0, 0.5])
    assert parse_sweep("student_data=uniform,mnist") == ("student_data", ["uniform", "mnist"])
    for bad in ("depth=1,2", "n_aux", "n_aux=one"):
        with pytest.raises(ConfigError):
            parse_sweep(bad)


@pytest.mark.slow
def test_a_sweep_writes_its_json_and_figure(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["mnist", "--out", str(out), *TINY, "--sweep", "n_aux=1,2"]) == 0
    sweep = json.loads((out / "sweep.json").read_text())
    assert [p["value"] for p in sweep["points"]] == [1, 2]
    assert (out / "sweep_figure.png").exists()
    assert "n_aux=2:" in capsys.readouterr().out
    assert exit_code(["mnist", "--out", str(out), *TINY, "--sweep", "n_aux=0,2"]) == 2
