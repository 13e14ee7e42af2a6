"""The teaching notebooks: each source runs top to bottom in quick mode, and its executed twin
matches it and is not stale.

The sources are jupytext percent-format ``notebooks/NN_*.py`` files; ``notebooks/build.py``
executes them and writes the ``.ipynb`` twins that readers open, each with a record of the
repository files and package sources it read. The twin checks are fast and run always;
executing the notebooks is marked slow.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient.exceptions import CellExecutionError

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"


def _load_build():
    spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOKS_DIR / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load_build()
# The suite's strict numerics (tests/conftest.py), in the notebook kernels too.
STRICT_JAX = {"JAX_NUMPY_RANK_PROMOTION": "raise"}
SOURCES = build.sources()
IDS = [path.stem for path in SOURCES]
# Inputs each notebook must be seen to read when it runs: a committed result and a package source.
READS = {
    "01": ["docs/atlas/atlas.json", "docs/atlas/atlas_teacher_epochs.png", "toymodels/atlas.py"],
    "02": ["theory/numerical.py"],
    "03": ["docs/transfer/report.json", "lmpipeline/pipeline.py"],
    "04": ["docs/mechanism/report.json", "docs/mechanism/sweep/owl.json", "lmpipeline/mechanism.py"],
}


def test_the_four_notebooks_exist():
    assert [name[:2] for name in IDS] == ["01", "02", "03", "04"], IDS


@pytest.mark.parametrize("source", SOURCES, ids=IDS)
def test_source_is_percent_format_and_documents_quick_mode(source):
    text = source.read_text()
    assert "format_name: percent" in text
    first_markdown = next(cell for cell in jupytext.read(source).cells if cell.cell_type == "markdown")
    assert build.QUICK_ENV in first_markdown.source, (
        f"{source.name}: the first markdown cell must document {build.QUICK_ENV}"
    )


@pytest.mark.parametrize("source", SOURCES, ids=IDS)
def test_executed_twin_matches_source(source):
    twin = build.twin(source)
    assert twin.is_file(), f"{twin.name} is missing: run python notebooks/build.py {source.stem}"
    executed = nbformat.read(twin, as_version=4)
    assert build.cells(executed) == build.cells(jupytext.read(source)), (
        f"{twin.name} is out of date with {source.name}: run python notebooks/build.py {source.stem}"
    )
    code = [cell for cell in executed.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code), f"{twin.name} has cells that never ran"
    errors = [out for cell in code for out in cell.outputs if out.output_type == "error"]
    assert not errors, f"{twin.name} holds an error output: {errors[0].get('ename')}"
    assert "Mode: " in "".join(out.get("text", "") for out in code[0].outputs), "the first cell must say which mode ran"
    images = sum("image/png" in out.get("data", {}) for cell in code for out in cell.outputs)
    assert images >= 2, f"{twin.name} shows {images} figures; readers should see the figures without running it"


@pytest.mark.parametrize("source", SOURCES, ids=IDS)
def test_executed_twin_shows_what_the_package_and_the_committed_results_hold_now(source):
    twin = build.twin(source)
    changed = build.stale_inputs(nbformat.read(twin, as_version=4))
    assert not changed, (
        f"{twin.name} is stale, these changed since it was built: {', '.join(changed)}; "
        f"run python notebooks/build.py {source.stem}"
    )


def test_the_staleness_check_sees_code_and_results_but_not_comments_or_docstrings(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "docs").mkdir()
    module, result = tmp_path / "pkg" / "m.py", tmp_path / "docs" / "r.json"
    module.write_text('"""A module."""\n\n\ndef f():\n    """Doc."""\n    return 1  # one\n')
    result.write_text('{"mean": 0.5}')
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "lib.py").write_text("X = 1\n")
    seen = [str(module), str(result), str(tmp_path / ".venv" / "lib.py"), "/elsewhere/x.py", str(tmp_path)]
    nb = nbformat.v4.new_notebook(metadata={"sublearn": {"inputs": build.record_inputs(seen, root=tmp_path)}})
    assert list(nb.metadata["sublearn"]["inputs"]) == ["docs/r.json", "pkg/m.py"]
    assert build.stale_inputs(nb, root=tmp_path) == []
    module.write_text('"""Reworded."""\n\n\ndef f():\n    """Reworded."""\n\n    return 1\n')
    assert build.stale_inputs(nb, root=tmp_path) == []  # the code is the same
    module.write_text('"""A module."""\n\n\ndef f():\n    return 2\n')
    assert build.stale_inputs(nb, root=tmp_path) == ["pkg/m.py"]
    result.unlink()
    assert build.stale_inputs(nb, root=tmp_path) == ["docs/r.json (gone)", "pkg/m.py"]
    assert "records no inputs" in build.stale_inputs(nbformat.v4.new_notebook(), root=tmp_path)[0]


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES, ids=IDS)
def test_notebook_runs_in_quick_mode(source, tmp_path):
    repo_files_before = sorted(p.name for p in NOTEBOOKS_DIR.iterdir())
    nb, _ = build.execute(source, quick=True, cwd=tmp_path, env=STRICT_JAX)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert "Mode: quick" in "".join(out.get("text", "") for out in code[0].outputs)
    assert all(cell.execution_count is not None for cell in code)
    assert code[0].execution_count == 1 and build.cells(nb) == build.cells(jupytext.read(source))
    assert sorted(p.name for p in NOTEBOOKS_DIR.iterdir()) == repo_files_before, "a notebook wrote into notebooks/"
    inputs = nb.metadata["sublearn"]["inputs"]
    assert set(READS[source.stem[:2]]) <= set(inputs), sorted(inputs)
    assert build.stale_inputs(nb) == []


@pytest.mark.slow
def test_a_failing_cell_fails_the_run(tmp_path):
    source = tmp_path / "broken.py"
    source.write_text('# %%\nprint("before")\n\n# %%\nraise ValueError("this cell fails")\n\n# %%\nprint("never")\n')
    with pytest.raises(CellExecutionError, match="this cell fails"):
        build.execute(source, quick=True, cwd=tmp_path)


def test_the_trace_prints_short_lines(capsys):
    # nbclient cleans stream output with a regex that is quadratic in a line's length: the
    # trace of a notebook that imports torch took minutes as one line.
    exec(build._TRACE_END, {"_sublearn_read": {f"/repo/file_{i}.py" for i in range(500)}, "_sublearn_sys": sys})
    text = capsys.readouterr().out
    assert len(json.loads(text)["read"]) == 500
    assert max(map(len, text.splitlines())) < 200
