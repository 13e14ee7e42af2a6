"""``sublearn atlas``: the tiny preset end to end, resuming, the anchors on every figure, bad input."""

import io
import json
import re

import matplotlib

matplotlib.use("Agg")
import numpy as np
import pytest

from sublearn._common import TextProgress
from sublearn.cli import main
from toymodels import sweep
from toymodels.atlas import ATLAS, base_config, curve_sweep, curves, format_atlas, plot_curve, point_config, run_atlas
from toymodels.stats import summarize


def _hollow_markers(fig):
    """``(x, y)`` of every anchor marker drawn (hollow: white face) on the figure's axes."""
    ax = fig.axes[0]
    points = []
    for line in ax.lines:
        if line.get_markerfacecolor() == "white" and line.get_marker() in ("*", "D"):
            xs, ys = line.get_xdata(), line.get_ydata()
            points += list(zip(xs, ys))
    return points


def _synthetic_atlas(preset="full"):
    """An atlas dict for every curve of ``preset`` with made-up accuracies (no training)."""
    base = base_config(preset, 3, "bf16")
    rng = np.random.default_rng(0)
    atlas = {"points": {}, "curves": {}}
    for curve in curves(preset):
        entries = []
        for x, overrides in curve.points:
            config = point_config(base, curve, overrides)
            acc = {c: rng.uniform(0, 1, 3).tolist() for c in ("student_aux", "cross_aux")}
            record = {"config": config.to_dict(), "accuracy": acc, "summary": {c: summarize(v) for c, v in acc.items()}}
            if curve.tracked_epochs:
                steps = list(range(0, 60 * (curve.tracked_epochs + 1), 60))
                record["trajectory"] = {
                    "steps": steps,
                    "steps_per_epoch": 60,
                    "probe": {"images": "probe", "n": 3},
                    "probe_accuracy": {c: rng.uniform(0, 1, (3, len(steps))).tolist() for c in acc},
                }
            atlas["points"][config.fingerprint()] = record
            entries.append({"x": x, "fingerprint": config.fingerprint()})
        atlas["curves"][curve.name] = {
            "xlabel": curve.xlabel,
            "scale": curve.scale,
            "tracked_epochs": curve.tracked_epochs,
            "points": entries,
            "anchors": [a.__dict__ for a in curve.anchors],
        }
    return atlas


@pytest.mark.parametrize("name", [c.name for c in curves("full")])
def test_every_full_curve_plots_its_points_and_marks_every_anchor(name):
    atlas = _synthetic_atlas()
    fig = plot_curve(atlas, name)
    anchors = atlas["curves"][name]["anchors"]
    assert len(anchors) >= 2
    drawn = _hollow_markers(fig)
    assert len(drawn) == len(anchors)
    for a in anchors:
        assert any(y == pytest.approx(a["y"]) for _, y in drawn), a
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert all(any(a["source"] in label for label in labels) for a in anchors)
    points = curve_sweep(atlas, name)["points"]
    if atlas["curves"][name]["tracked_epochs"]:
        assert [p["value"] for p in points] == list(range(1, 41))
    if name == "student_init_sigma":  # sigma = 0 stays on the log axis
        assert fig.axes[0].get_xscale() == "symlog" and points[0]["value"] == 0.0


def test_tracked_curve_reads_the_probe_at_each_epochs_end():
    atlas = _synthetic_atlas()
    curve = atlas["curves"]["student_epochs"]
    t = atlas["points"][curve["points"][0]["fingerprint"]]["trajectory"]
    points = curve_sweep(atlas, "student_epochs")["points"]
    for p in (points[0], points[9], points[-1]):
        column = [seed[p["value"]] for seed in t["probe_accuracy"]["student_aux"]]  # step index = epoch here
        assert p["summary"]["student_aux"]["mean"] == pytest.approx(np.mean(column))


@pytest.mark.slow
def test_tiny_atlas_end_to_end_resumes_and_agrees_with_itself(tmp_path, monkeypatch):
    stream = io.StringIO()
    atlas = run_atlas(
        tmp_path, preset="tiny", seeds=2, only=("student_epochs", "teacher_epochs"), progress=TextProgress(stream)
    )
    # Progress counts the four points of the run: it ends at 100%, never past it.
    percents = [int(p) for p in re.findall(r"^\[\s*(\d+)%", stream.getvalue(), flags=re.M)]
    assert percents == sorted(percents) and percents[-1] == 100, percents
    assert "4/4 teacher_epochs=2: " in stream.getvalue()
    saved = json.loads((tmp_path / ATLAS).read_text())
    assert len(saved["points"]) == 4  # the tracked 3-epoch run and teacher epochs 0, 1, 2
    assert {p["config"]["precision"] for p in saved["points"].values()} == {"bf16"}
    assert saved["environment"]["versions"]["jax"] and saved["timing"]["wall_s_points"] > 0
    for name in ("student_epochs", "teacher_epochs"):
        assert (tmp_path / f"atlas_{name}.png").stat().st_size > 0
    # Epoch 1 of the tracked run is the 1-epoch run of the teacher curve (the probe is the whole
    # 500-image test set here), so the two must agree exactly.
    epoch_1 = curve_sweep(saved, "student_epochs")["points"][0]
    assert epoch_1["value"] == 1
    one_epoch = curve_sweep(saved, "teacher_epochs")["points"][1]
    assert one_epoch["value"] == 1
    for c, s in epoch_1["summary"].items():
        assert s["mean"] == pytest.approx(one_epoch["summary"][c]["mean"], abs=1e-6)
        assert s["ci95"] == pytest.approx(one_epoch["summary"][c]["ci95"], abs=1e-6)
    # An untrained teacher teaches nothing: its aux-only students stay at chance.
    assert curve_sweep(saved, "teacher_epochs")["points"][0]["summary"]["student_aux"]["mean"] < 0.2

    def no_training(*args, **kwargs):
        raise AssertionError("a point already in atlas.json was run again")

    monkeypatch.setattr(sweep, "run_experiment", no_training)
    # A stored summary is derived data: a stale one (an older interval rule, say) is recomputed.
    stale = json.loads((tmp_path / ATLAS).read_text())
    for record in stale["points"].values():
        record["summary"]["student_aux"]["ci95"] = 9.0
    (tmp_path / ATLAS).write_text(json.dumps(stale))
    again = run_atlas(tmp_path, preset="tiny", seeds=2, only=("student_epochs", "teacher_epochs"))
    assert again["points"] == json.loads(json.dumps(atlas["points"]))
    assert "teacher_epochs:" in format_atlas(again)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--curves", "nope"], "unknown atlas curve(s) nope"),
        (["--seeds", "1"], "--seeds must be at least 2"),
        (["--preset", "huge"], "unknown atlas preset 'huge'"),
        (["--precision", "fp8"], "unknown --precision 'fp8'"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message, tmp_path, capsys):
    assert main(["atlas", "--out", str(tmp_path / "out"), "--preset", "tiny", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("sublearn atlas: error:")
