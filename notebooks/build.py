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
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

NOTEBOOKS_DIR = Path(__file__).resolve().parent
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


def execute(
    source: Path, *, quick: bool, cwd: Path, env: dict[str, str] | None = None, timeout: int = CELL_TIMEOUT_S
) -> tuple[nbformat.NotebookNode, float]:
    """Run ``source`` top to bottom in a new kernel; return the executed notebook and its wall time.

    The kernel is this interpreter (``sys.executable``), registered in a temporary folder,
    so a ``python3`` kernelspec registered elsewhere on the machine cannot substitute
    another environment. The kernel inherits this process's environment plus ``env``.

    Raises:
        nbclient.exceptions.CellExecutionError: a cell raised; the message shows the traceback.
    """
    from ipykernel.kernelspec import install
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    nb = jupytext.read(source)
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
