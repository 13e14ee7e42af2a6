"""Execute the teaching notebooks and write their executed ``.ipynb`` copies.

Each notebook's source is a jupytext percent-format ``NN_name.py`` file in this folder;
its executed twin ``NN_name.ipynb`` sits beside it so that readers see the figures
without running anything. This script runs each source top to bottom in a fresh Python
kernel of the current interpreter (working directory: a temporary folder, so nothing is
written into the repository) and writes the twin atomically.

Usage::

    python notebooks/build.py                      # every notebook, full mode
    python notebooks/build.py --quick              # every notebook, quick mode
    python notebooks/build.py 01_mnist_toy_model   # one notebook

Quick mode sets ``SUBLEARN_QUICK=1`` in the kernel's environment; each notebook reads it
and shrinks its seeds, data and samples (same code paths, smaller numbers).

Each executed copy records what it shows: ``metadata["sublearn"]["inputs"]`` maps every
file of the repository the kernel read (committed results such as ``docs/atlas/atlas.json``
and its figures, the bundled data) and the source of every package module it imported to
a hash of its contents (for Python sources, of the code without comments, docstrings and
formatting). :func:`stale_inputs` lists the ones that have changed since, and the test
suite fails on them, so an executed copy cannot silently show what the package no longer
does.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

NOTEBOOKS_DIR = Path(__file__).resolve().parent
REPO = NOTEBOOKS_DIR.parent
QUICK_ENV = "SUBLEARN_QUICK"
KERNEL_NAME = "sublearn-notebooks"
CELL_TIMEOUT_S = 900


def sources() -> list[Path]:
    """The notebook sources, in reading order (``NN_*.py``)."""
    return sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.py"))


def twin(source: Path) -> Path:
    """The executed copy that belongs to ``source``."""
    return source.with_suffix(".ipynb")


def cells(nb: nbformat.NotebookNode) -> list[tuple[str, str]]:
    """``(cell_type, source)`` of every cell: what must agree between a source and its twin."""
    return [(cell.cell_type, cell.source) for cell in nb.cells]


# Run before and after a notebook's own cells, in its kernel: which files does it read, and
# which modules does it import? The audit hook sees every open(), imports included.
_TRACE_START = """\
import os as _sublearn_os, sys as _sublearn_sys
_sublearn_read = set()
def _sublearn_audit(event, args):
    if event == "open" and isinstance(args[0], str):
        _sublearn_read.add(_sublearn_os.path.abspath(args[0]))
_sublearn_sys.addaudithook(_sublearn_audit)
"""
# One path a line: nbclient's carriage-return clean-up of stream output is quadratic in the
# length of a line, and one line of every path read took minutes.
_TRACE_END = """\
import json as _sublearn_json
print(_sublearn_json.dumps({"read": sorted(_sublearn_read), "modules": sorted(
    {getattr(m, "__file__", None) or "" for m in list(_sublearn_sys.modules.values())} - {""})}, indent=0))
"""


def content_hash(path: Path) -> str:
    """A hash of what ``path`` holds; for Python sources, of the code alone (its syntax tree
    without docstrings), so that comments, docstrings and formatting do not count."""
    data = path.read_bytes()
    if path.suffix == ".py":
        tree = ast.parse(data)
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
                if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
        data = ast.dump(tree).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def record_inputs(paths: list[str], root: Path = REPO) -> dict[str, str]:
    """``{path relative to root: content_hash}`` of the files among ``paths`` that belong to
    the repository ``root``: not the virtual environment, compiled caches or the notebooks."""
    inputs = {}
    for name in paths:
        path = Path(name)
        try:
            relative = path.resolve().relative_to(root)
        except ValueError:
            continue
        if not path.is_file() or relative.parts[0].startswith(".") or relative.parts[0] == "notebooks":
            continue
        if "__pycache__" in relative.parts:
            continue
        inputs[relative.as_posix()] = content_hash(path)
    return dict(sorted(inputs.items()))


def stale_inputs(nb: nbformat.NotebookNode, root: Path = REPO) -> list[str]:
    """The recorded inputs of an executed notebook that have changed or gone since it ran."""
    inputs = nb.metadata.get("sublearn", {}).get("inputs")
    if not inputs:
        return ["(it records no inputs: it was built before inputs were recorded)"]
    changed = []
    for name, digest in inputs.items():
        path = root / name
        if not path.is_file():
            changed.append(f"{name} (gone)")
        elif content_hash(path) != digest:
            changed.append(name)
    return changed


def execute(
    source: Path, *, quick: bool, cwd: Path, env: dict[str, str] | None = None, timeout: int = CELL_TIMEOUT_S
) -> tuple[nbformat.NotebookNode, float]:
    """Run ``source`` top to bottom in a new kernel; return the executed notebook and its wall time.

    The kernel is this interpreter (``sys.executable``), registered in a temporary folder,
    so a ``python3`` kernelspec registered elsewhere on the machine cannot substitute
    another environment. The kernel inherits this process's environment plus ``env``.

    The notebook's ``metadata["sublearn"]["inputs"]`` records what it read (see the module
    docstring).

    Raises:
        nbclient.exceptions.CellExecutionError: a cell raised; the message shows the traceback.
    """
    from ipykernel.kernelspec import install
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    nb = jupytext.read(source)
    nb.cells.insert(0, nbformat.v4.new_code_cell(_TRACE_START))
    nb.cells.append(nbformat.v4.new_code_cell(_TRACE_END))
    kernel_env = {**os.environ, **(env or {})}
    kernel_env.pop(QUICK_ENV, None)
    if quick:
        kernel_env[QUICK_ENV] = "1"
    with tempfile.TemporaryDirectory() as prefix:
        install(kernel_name=KERNEL_NAME, prefix=prefix)
        specs = KernelSpecManager(kernel_dirs=[str(Path(prefix, "share", "jupyter", "kernels"))])
        manager = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)
        client = NotebookClient(
            nb,
            km=manager,
            timeout=timeout,
            resources={"metadata": {"path": str(cwd)}},
            coalesce_streams=True,
            record_timing=False,
        )
        t0 = time.perf_counter()
        client.execute(env=kernel_env)
        wall_s = time.perf_counter() - t0
    trace = json.loads("".join(out.get("text", "") for out in nb.cells.pop().outputs))
    nb.cells.pop(0)
    for cell in nb.cells:  # numbered as if the tracing cell had not run
        if cell.cell_type == "code":
            cell.execution_count -= 1
            for out in cell.outputs:
                if out.get("execution_count") is not None:
                    out.execution_count -= 1
    nb.metadata["sublearn"] = {"inputs": record_inputs(trace["read"] + trace["modules"])}
    # Readers open the twin with their own Python kernel, not the temporary one.
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    return nb, wall_s


def write_atomic(nb: nbformat.NotebookNode, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    nbformat.write(nb, tmp)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebook stems to build (default: all)")
    parser.add_argument("--quick", action="store_true", help=f"set {QUICK_ENV}=1: smaller runs, same code paths")
    args = parser.parse_args(argv)
    known = {path.stem: path for path in sources()}
    unknown = [name for name in args.names if name.removesuffix(".py") not in known]
    if unknown:
        print(f"build.py: error: no notebook {', '.join(unknown)}: choose from {', '.join(known)}", file=sys.stderr)
        return 2
    selected = [known[name.removesuffix(".py")] for name in args.names] or list(known.values())
    for source in selected:
        with tempfile.TemporaryDirectory() as cwd:
            print(f"{source.name}: running ({'quick' if args.quick else 'full'} mode)", flush=True)
            nb, wall_s = execute(source, quick=args.quick, cwd=Path(cwd))
        write_atomic(nb, twin(source))
        print(f"{source.name}: {wall_s:.0f}s, wrote {twin(source).relative_to(NOTEBOOKS_DIR.parent)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
