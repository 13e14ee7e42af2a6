import io
import json
import math
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats as scipy_stats

from sublearn import _common
from sublearn._common import (
    BarProgress,
    ConfigError,
    Progress,
    SilentProgress,
    TextProgress,
    atomic_path,
    environment,
    mean_interval,
    read_json,
    write_json,
)


def test_the_module_loads_no_heavy_library():
    code = "import sys, sublearn._common; print(sorted({'jax', 'numpy', 'scipy', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_json_writes_non_finite_numbers_as_null_everywhere(tmp_path):
    path = write_json(tmp_path / "r.json", {"a": [1.5, math.nan], "b": {"c": (math.inf, -math.inf)}})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert read_json(path) == {"a": [1.5, None], "b": {"c": [None, None]}}


def test_the_packages_write_through_the_one_json_rule(tmp_path):
    from lmpipeline.artifacts import write_json as lm_write_json
    from lmpipeline.artifacts import write_jsonl

    lm_write_json(tmp_path / "a.json", {"x": math.nan})
    write_jsonl(tmp_path / "b.jsonl", [{"x": math.nan}])
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": None}
    assert (tmp_path / "b.jsonl").read_text() == '{"x": null}\n'


def test_files_get_ordinary_modes_and_are_synced_before_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    umask = os.umask(0o022)
    try:
        path = write_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    # First the temporary file (inside a private folder beside the target), then the folder.
    assert len(synced) == 2
    assert synced[0].startswith(str(tmp_path / ".r.json.")) and synced[0].endswith("/r.json")
    assert synced[1] == str(tmp_path)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_json(tmp_path / "a.json", {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text('{"v": 2')
            raise RuntimeError("killed")
    assert read_json(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_every_config_error_is_the_shared_one():
    import lmpipeline.config
    import toymodels.config

    assert toymodels.config.ConfigError is ConfigError is lmpipeline.config.ConfigError
    assert issubclass(ConfigError, ValueError)


def test_every_error_a_user_can_fix_is_reported_once_by_the_dispatcher(tmp_path, monkeypatch, capsys):
    import importlib

    from lmpipeline.pipeline import PipelineError
    from lmpipeline.transfer import StudyError
    from sublearn import cli
    from sublearn._store import DamagedFile, FolderBusy
    from toymodels.data import DataError

    for error in (ConfigError, DataError, PipelineError, StudyError, DamagedFile, FolderBusy):
        assert issubclass(error, _common.UserError), error
    monkeypatch.chdir(tmp_path)  # nothing kept from earlier runs
    arguments = {"lm": ["config", "--preset", "tiny"]}
    for name, (module_name, _) in cli.SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        prog = f"sublearn {name}"
        for raised, status, line in [
            (
                _common.UserError("--x 3 is too large: use at most 2"),
                2,
                f"{prog}: error: --x 3 is too large: use at most 2",
            ),
            (KeyboardInterrupt(), 130, f"{prog}: interrupted; nothing was kept"),
        ]:

            def run(args, raised=raised):
                raise raised

            monkeypatch.setattr(module, "run", run)
            assert cli.main([name, *arguments.get(name, [])]) == status, name
            assert capsys.readouterr().err.strip().splitlines() == [line]


def test_former_names_still_work_and_say_once_when_they_go(monkeypatch, capsys):
    import argparse

    from sublearn import cli
    from toymodels import cli as mnist_cli

    monkeypatch.setattr(_common, "_noticed", set())
    notice = "sublearn: `sublearn llm` is the former name of `sublearn lm`; it goes in version 0.2.0"
    for _ in range(2):
        assert cli.main(["llm", "config", "--preset", "tiny"]) == 0
    assert capsys.readouterr().err.strip().splitlines() == [notice]  # once per process
    parser = argparse.ArgumentParser()
    mnist_cli.add_arguments(parser)
    assert parser.parse_args(["--noise", "gaussian"]).student_data == "gaussian"
    assert parser.parse_args(["--student-data", "mnist"]).student_data == "mnist"
    assert capsys.readouterr().err.strip().splitlines() == [
        "sublearn: --noise is the former name of --student-data; it goes in version 0.2.0"
    ]


def test_the_readme_names_a_home_for_every_module_and_every_home_exists():
    root = Path(__file__).resolve().parents[1]
    section = (root / "README.md").read_text().split("## Where things live", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([\w/]+(?:\.py|/))`", section))
    assert len(named) > 40
    missing = sorted(path for path in named if not (root / path).exists())
    assert missing == []
    modules = {
        str(path.relative_to(root))
        for package in ("sublearn", "toymodels", "theory", "lmpipeline")
        for path in (root / package).rglob("*.py")
        if path.name not in ("__init__.py", "__main__.py")
    }
    homeless = sorted(
        m for m in modules if m not in named and not any(m.startswith(n) for n in named if n.endswith("/"))
    )
    assert homeless == []


def test_environment_records_versions_and_jax_devices_once_jax_is_loaded():
    import jax  # noqa: F401

    env = environment(("numpy", "no-such-distribution"))
    assert env["versions"]["numpy"] == __import__("numpy").__version__
    assert env["versions"]["no-such-distribution"] is None
    assert env["device_kind"] and env["devices"] and env["cpu_count"] == os.cpu_count()


@pytest.mark.parametrize("n", [2, 4, 10])
def test_t_interval_matches_scipy_and_is_wider_than_z(n):
    values = [0.1 * i**2 for i in range(n)]
    t = mean_interval(values)
    z = mean_interval(values, method="z")
    sem = scipy_stats.sem(values)
    assert t.high - t.mean == pytest.approx(scipy_stats.t.ppf(0.975, n - 1) * sem, rel=1e-9)
    assert z.high - z.mean == pytest.approx(1.959963984540054 * sem, rel=1e-9)
    if n == 4:  # the seed count of a quick run: z would be 1.6 times too narrow
        assert (t.high - t.mean) / (z.high - z.mean) == pytest.approx(3.182446 / 1.959964, rel=1e-6)
    with pytest.raises(ValueError, match="choose one of t, z"):
        mean_interval(values, method="normal")


def test_one_value_has_no_interval():
    assert mean_interval([0.3]) == _common.Interval(0.3, None, None, 1)


def test_every_reporter_is_a_progress():
    for reporter in (TextProgress(io.StringIO()), SilentProgress(), BarProgress()):
        assert isinstance(reporter, Progress)
    assert not isinstance(object(), Progress)


def test_text_progress_lines(monkeypatch):
    clock = iter([0.0, 0.0, 10.0, 20.0, 25.0, 40.0])
    monkeypatch.setattr(_common.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    progress = TextProgress(out, label="teacher", unit="rows", every=10.0, done_before=2)
    progress.start(10, "sampling")
    progress(4, 10, tokens=50)  # 2 new rows in 10 s: 6 left take 30 s
    progress(5, 10, tokens=60)  # 10 s after the last line: printed
    progress(6, 10, tokens=70)  # 5 s after it: skipped
    progress(10, 10, tokens=100)  # the last line always shows
    assert out.getvalue().splitlines() == [
        "[teacher] sampling",
        "[teacher] [ 40% 0:10, ~0:30 left] 4/10 rows | 5.0 tok/s",
        "[teacher] [ 50% 0:20, ~0:33 left] 5/10 rows | 3.0 tok/s",
        "[teacher] [100% 0:40] 10/10 rows | 2.5 tok/s",
    ]


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Module -> the package modules it imports, at the top or inside functions."""
    import ast

    modules = {
        ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): path
        for package in packages
        for path in (root / package).rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph``, or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    return next((c for node in sorted(graph) if node not in state and (c := visit(node))), None)


def test_no_module_of_the_package_imports_itself_back():
    # Imports inside functions count too: they hide a cycle rather than remove it.
    root = Path(__file__).resolve().parents[1]
    graph = import_graph(root, ("sublearn", "toymodels", "theory", "lmpipeline"))
    assert len(graph) > 50 and "lmpipeline.report" in graph["lmpipeline.pipeline"]
    assert cycle(graph) is None
    planted = cycle({**graph, "lmpipeline.report": graph["lmpipeline.report"] | {"lmpipeline.pipeline"}})
    assert planted[0] == planted[-1] and {"lmpipeline.pipeline", "lmpipeline.report"} <= set(planted), planted
