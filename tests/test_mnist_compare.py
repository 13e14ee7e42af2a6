import json

import numpy as np
import pytest

from toymodels.compare import compare, main
from toymodels.config import ConfigError


def _run(values, seed=0):
    return {"config": {"seed": seed, "seeds": len(values)}, "accuracy": {"student_aux": list(values)}}


def test_the_paired_difference_removes_the_shared_seed_spread():
    rng = np.random.default_rng(0)
    shared = rng.normal(0.5, 0.1, 50)  # seed-to-seed spread both runs share
    a, b = shared + 0.01, shared + rng.normal(0, 0.001, 50)
    row = compare(_run(a), _run(b))["student_aux"]
    # The two runs' intervals overlap widely, yet pairing resolves the 0.01 shift.
    assert row["means_inside_each_others_ci"]
    assert not row["difference_inside_ci"]
    d = a - b
    assert row["difference"]["mean"] == pytest.approx(d.mean())
    assert row["difference"]["ci95"] == pytest.approx(2.009575 * d.std(ddof=1) / np.sqrt(50), rel=1e-6)  # t_{0.975, 49}


def test_identical_runs_differ_by_exactly_zero():
    row = compare(_run([0.1, 0.2, 0.3]), _run([0.1, 0.2, 0.3]))["student_aux"]
    assert row["difference"]["mean"] == row["difference"]["ci95"] == 0.0 and row["difference_inside_ci"]


def test_runs_over_different_seeds_are_refused():
    with pytest.raises(ConfigError, match="differ in seed"):
        compare(_run([0.1, 0.2]), _run([0.1, 0.2], seed=1))


def test_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    for name, values in (("a.json", [0.5, 0.6, 0.7]), ("b.json", [0.5, 0.6, 0.8])):
        (tmp_path / name).write_text(json.dumps(_run(values)))
    assert main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "c.json")]) == 0
    assert "student_aux" in capsys.readouterr().out
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["names"] == ["float32", "float32"]
    assert saved["comparison"]["student_aux"]["difference"]["mean"] == pytest.approx(-0.1 / 3)
    assert main([str(tmp_path / "a.json"), str(tmp_path / "missing.json")]) == 2
    assert "error: cannot compare" in capsys.readouterr().err
