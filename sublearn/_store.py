"""Run folders and the work kept in them: compute once, keyed by what it reads; verify
before reuse; one process and one command per folder.

Every command that resumes (the MNIST chunks, the atlas points, the language pipeline's
stages, the transfer study's units, the finetuning checkpoints) keeps its finished work
under a key, :func:`config_hash` of the settings the work reads, and reuses it only while
the key is unchanged and the work is intact.

**Records.** A unit of finished work is a JSON object (a file, or an entry of a larger
file such as ``atlas.json``) built by :func:`seal`:

- ``config_hash``: the key;
- the work's own fields (the payload);
- ``outputs``: for each file or folder the work wrote beside its record, its ``bytes``,
  its ``sha256``, and its ``rows`` (JSONL) or ``files`` (a folder);
- ``inputs``: the ``sha256`` of each file the work read from other records' outputs, so
  that work built on an input that has since changed is not reused;
- ``checksum``: :func:`config_hash` of everything above, so a record edited or damaged
  after it was written is noticed.

:func:`stale` says why a record cannot be reused (``None`` when it can), and
:func:`once` computes a unit unless its record is reusable, printing one line saying why
an existing record was not. Records written before checksums existed (no ``checksum``
field) are reused as they are.

**Damaged files.** A file that cannot be read raises :class:`DamagedFile`, a
:class:`ConfigError` whose one-line message names the file and the command that
rebuilds it; the commands print it and exit with status 2.

**Folders.** :func:`claim` takes a command's output folder for the duration of the
command: an exclusive lock (``fcntl.flock`` on ``.sublearn.lock``, released by the
operating system when the process ends, however it ends), so a second process writing
the same folder stops at once with one line naming the first one's pid; and the folder
record ``.sublearn.json`` (the command and config that write the folder), so that another
command's results are never mixed into it.

Example:

>>> import tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> _ = (folder / "rows.jsonl").write_text('{"i": 0}\\n{"i": 1}\\n')
>>> record = seal({"n": 2}, "k1", folder, outputs=["rows.jsonl"])
>>> record["outputs"]["rows.jsonl"]["rows"], stale(record, "k1", folder)
(2, None)
>>> _ = (folder / "rows.jsonl").write_text('{"i": 0}\\n{"i"')
>>> stale(record, "k1", folder)
'rows.jsonl holds 1 complete rows where its record says 2'
>>> stale(record, "k2", folder)
'its settings changed since it ran'
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from sublearn._common import ConfigError, dumps, output_folder, write_json

try:
    import fcntl
except ImportError:  # Windows: folders are not locked there
    fcntl = None

KEY = "config_hash"
CHECKSUM = "checksum"
LOCK = ".sublearn.lock"
FOLDER_RECORD = ".sublearn.json"
# Folders written before folder records existed: a file that only one command writes
# tells which command wrote the folder.
OWNER_MARKERS = {
    "results.json": "sublearn mnist",
    "checkpoint.json": "sublearn mnist",
    "sweep.json": "sublearn mnist --sweep",
    "atlas.json": "sublearn atlas",
    "prompts.jsonl": "sublearn lm run",
    "base.json": "sublearn lm transfer",
    "entanglement.json": "sublearn lm transfer",
}


# --- the one hash of settings ------------------------------------------------------------


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    raise TypeError(f"config_hash cannot hash a {type(value).__name__}")


def config_hash(value: Any, *stream: Any) -> str:
    """A short stable hash (16 hex digits) of settings: any JSON-ready value, dataclasses
    included, serialized with sorted keys; then each value of ``stream`` in turn, for
    large inputs (rows of token ids) that need not be held as one string.

    The package's one key for finished work: stage records, study units, MNIST
    fingerprints, atlas points and finetuning checkpoints all use it.

    >>> config_hash({"b": 1, "a": (2, 3)}) == config_hash({"a": [2, 3], "b": 1})
    True
    >>> config_hash({"a": 1}) == hashlib.sha256(b'{"a": 1}').hexdigest()[:16]  # json.dumps's separators
    True
    """
    digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=_plain).encode())
    for part in stream:
        digest.update(json.dumps(part, sort_keys=True, default=_plain).encode())
    return digest.hexdigest()[:16]


# --- what a unit wrote -------------------------------------------------------------------

_SUMS: dict[tuple, dict] = {}  # (path, inode, size, mtime) -> summary: a file is hashed once per process


def _file_sum(path: Path) -> dict:
    info = path.stat()
    key = (str(path), info.st_ino, info.st_size, info.st_mtime_ns)
    if key not in _SUMS:
        digest, rows = hashlib.sha256(), 0
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
                rows += block.count(b"\n")
        _SUMS[key] = {"bytes": info.st_size, "sha256": digest.hexdigest(), "lines": rows}
    return _SUMS[key]


def summarize(path: Path) -> dict:
    """``bytes`` and ``sha256`` of a file or folder, with ``rows`` (complete lines) for JSONL
    and ``files`` for a folder (its files' relative names and contents are hashed)."""
    path = Path(path)
    if path.is_dir():
        digest, size = hashlib.sha256(), 0
        files = sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            one = _file_sum(file)
            digest.update(f"{file.relative_to(path).as_posix()}\0{one['sha256']}\n".encode())
            size += one["bytes"]
        return {"files": len(files), "bytes": size, "sha256": digest.hexdigest()}
    one = _file_sum(path)
    out = {"bytes": one["bytes"], "sha256": one["sha256"]}
    if path.suffix == ".jsonl":
        out = {"rows": one["lines"], **out}
    return out


def _difference(name: str, saved: dict, now: dict) -> str | None:
    """How ``now`` differs from ``saved`` (both :func:`summarize`), in words; None if it does not."""
    for count in ("rows", "files"):
        if count in saved and saved[count] != now.get(count):
            what = "complete rows" if count == "rows" else "files"
            return f"{name} holds {now.get(count)} {what} where its record says {saved[count]}"
    if saved.get("sha256") != now.get("sha256"):
        return f"{name} differs from what its record says was written (checksum)"
    return None


# --- records -----------------------------------------------------------------------------


def _canonical(record: dict) -> dict:
    """``record`` as it reads back from its JSON file (tuples as lists, NaN as null)."""
    return json.loads(dumps(record))


def seal(
    payload: dict, key: str, folder: Path | None = None, *, outputs: Sequence[str] = (), inputs: Sequence[str] = ()
) -> dict:
    """A record of finished work: ``payload`` under ``key``, with the summaries of the
    ``outputs`` it wrote and the checksums of the ``inputs`` it read (names relative to
    ``folder``), and the record's own checksum (see the module docstring)."""
    record = {KEY: key, **payload}
    if outputs:
        record["outputs"] = {name: summarize(Path(folder) / name) for name in outputs}
    if inputs:
        record["inputs"] = {name: summarize(Path(folder) / name)["sha256"] for name in inputs}
    record = _canonical(record)
    record[CHECKSUM] = config_hash(record)
    return record


def stale(record: dict | None, key: str, folder: Path | None = None) -> str | None:
    """Why ``record`` cannot be reused as the work keyed ``key``, or None if it can: the
    settings changed, the record or an output it lists no longer matches, or an input it
    read changed since. Names in the record are relative to ``folder``."""
    if not isinstance(record, dict):
        return "there is no record of it"
    if record.get(KEY) != key:
        return "its settings changed since it ran"
    if CHECKSUM in record:
        body = {k: v for k, v in record.items() if k != CHECKSUM}
        if config_hash(body) != record[CHECKSUM]:
            return "its record does not match its checksum (edited or damaged)"
    for name, saved in record.get("outputs", {}).items():
        path = Path(folder) / name
        if not path.exists():
            return f"{name} is missing"
        why = _difference(name, saved, summarize(path))
        if why:
            return why
    for name, digest in record.get("inputs", {}).items():
        path = Path(folder) / name
        if not path.exists() or summarize(path)["sha256"] != digest:
            return f"its input {name} changed since it ran"
    return None


def read_record(path: Path) -> tuple[dict | None, str | None]:
    """``(record, None)``; ``(None, None)`` if there is no file; ``(None, why)`` if it is unreadable."""
    path = Path(path)
    if not path.exists():
        return None, None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f), None
    except (OSError, ValueError) as error:
        return None, f"{path.name} cannot be read ({error})"


def reusable(
    path: Path, key: str, *, outputs: Sequence[str] = (), inputs: Sequence[str] = ()
) -> tuple[dict | None, str | None]:
    """The record at ``path`` if it is the intact work keyed ``key``: ``(record, None)``;
    else ``(None, why)``, with ``why`` None when there is no record at all (nothing to
    explain). ``outputs`` and ``inputs`` are checked in the folder of ``path``; outputs the
    record lists must be the ones expected."""
    record, why = read_record(path)
    if record is None:
        return None, why
    why = stale(record, key, Path(path).parent)
    if why is None and CHECKSUM in record:
        missing = sorted(set(outputs) - set(record.get("outputs", {})) | set(inputs) - set(record.get("inputs", {})))
        if missing:
            why = f"its record lists no checksum for {', '.join(missing)}"
    return (record, None) if why is None else (None, why)


def once(
    path: Path,
    key: str,
    compute: Callable[[], dict],
    *,
    outputs: Sequence[str] = (),
    inputs: Sequence[str] = (),
    note: Callable[[str], None] | None = None,
) -> tuple[dict, bool]:
    """Compute once, keyed by what it reads, resumable after a crash: the record at ``path``
    if :func:`reusable`, else ``compute()`` (which writes ``outputs`` beside ``path``) sealed
    with its ``wall_s`` and written atomically. ``note(why)`` hears why an existing record
    was not reused. Returns ``(record, computed)``.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "unit.json"
    >>> once(path, "k", lambda: {"answer": 42})[0]["answer"], once(path, "k", lambda: {})[1]
    (42, False)
    """
    record, why = reusable(path, key, outputs=outputs, inputs=inputs)
    if record is not None:
        return record, False
    if why is not None and note is not None:
        note(why)
    start = time.perf_counter()
    payload = compute()
    payload["wall_s"] = round(time.perf_counter() - start, 3)
    record = seal(payload, key, Path(path).parent, outputs=outputs, inputs=inputs)
    write_json(path, record)
    return record, True


# --- damaged files -----------------------------------------------------------------------


class DamagedFile(ConfigError):
    """A file that cannot be read; the message names it and the command that rebuilds it."""

    def __init__(self, path: str | os.PathLike, problem: str, rebuild: str):
        self.path = Path(path)
        super().__init__(f"{path} is damaged ({problem}): {rebuild}")


def read_json(path: str | os.PathLike, rebuild: str) -> Any:
    """The JSON in ``path``; :class:`DamagedFile` (naming ``rebuild``, the way to rebuild
    it) if it is not valid JSON. A missing file raises ``FileNotFoundError`` as usual."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DamagedFile(path, f"not valid JSON: {error}", rebuild) from None


# --- run folders -------------------------------------------------------------------------


class FolderBusy(ConfigError):
    """Another process is writing the folder."""


def _has_results(folder: Path) -> bool:
    return any(not p.name.startswith(".sublearn") for p in folder.iterdir())


def folder_owner(folder: Path) -> str | None:
    """The command whose results ``folder`` holds: its folder record's, else the one whose
    files it holds (folders written before folder records existed); None for an empty or
    unknown folder."""
    folder = Path(folder)
    if not folder.is_dir() or not _has_results(folder):
        return None
    record, _ = read_record(folder / FOLDER_RECORD)
    if isinstance(record, dict) and record.get("command"):
        return record["command"]
    return next((command for name, command in OWNER_MARKERS.items() if (folder / name).exists()), None)


@contextmanager
def claim(folder: str | os.PathLike, command: str, config: Any = None, option: str = "--out") -> Iterator[Path]:
    """Hold ``folder`` for ``command`` until the block ends: create it (see
    :func:`sublearn._common.output_folder`), lock it, refuse it if it holds another
    command's results, and record ``command`` and ``config`` in ``.sublearn.json``.

    Raises :class:`FolderBusy` naming the pid of the process that holds the folder, or
    :class:`ConfigError` naming the command whose results it holds; both before anything
    is written.
    """
    folder = output_folder(folder, option)
    with _lock(folder, command, option):
        owner = folder_owner(folder)
        if owner is not None and owner != command:
            raise ConfigError(
                f"{option} {folder} holds the results of `{owner}`, not `{command}`: choose another {option}"
            )
        write_json(
            folder / FOLDER_RECORD,
            {
                "command": command,
                "config": config,
                "argv": sys.argv,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )
        yield folder


@contextmanager
def _lock(folder: Path, command: str, option: str) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").split()
            who = f"pid {holder[0]} ({' '.join(holder[1:])})" if holder else "another process"
            raise FolderBusy(
                f"{option} {folder} is in use by {who}: wait for it to finish, or choose another {option}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {command}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
