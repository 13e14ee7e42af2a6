"""Files in a run folder: atomic writes, JSONL, resumable row logs and stage records.

Every finished artifact appears at its final name in one ``os.replace``, so a reader sees
either the previous version or the complete new one, never a half-written file. Long
row-by-row work (sampling thousands of completions) appends to ``<name>.partial.jsonl``
instead, next to ``<name>.partial.json`` holding the config hash it belongs to; a rerun
with the same hash keeps the complete batches and continues after them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

# The run folder's files follow the package-wide rules (fsync, file modes, NaN as null).
from sublearn._common import (  # noqa: F401  (re-exported: the pipeline writes through them)
    atomic_path,
    dumps,
    environment,
    fsync_path,
    read_json,
    write_json,
    write_text,
)


def versions() -> dict[str, str]:
    """Versions of Python and of the libraries that shape a run's results (installed ones)."""
    env = environment(
        ("subliminal-learning", "torch", "transformers", "peft", "vllm", "jax", "flax", "optax", "gguf", "numpy")
    )
    return {"python": env["python"], **{dist: v for dist, v in env["versions"].items() if v is not None}}


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    write_text(path, "".join(dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All rows of a JSONL file; a malformed line raises ``ValueError`` naming its number."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
    return rows


def _complete_rows(path: Path) -> list[dict]:
    """Rows of a partial log up to the first truncated or malformed line."""
    rows: list[dict] = []
    if not path.exists():
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


class RowLog:
    """An append-only JSONL log of completed batches that survives interruption.

    Args:
        path: the final JSONL path; work in progress lives beside it as
            ``<stem>.partial.jsonl`` and ``<stem>.partial.json``.
        config_hash: identifies the work; a partial log with another hash is discarded.
        batch_size: rows per batch; only whole batches are kept on resume, so that batch
            ``i`` is always sampled from the same seed and the same prompts.

    Example:

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> log = RowLog(d / "rows.jsonl", "abc", batch_size=2)
    >>> log.append_batch([{"i": 0}, {"i": 1}]); log.done_batches
    1
    >>> RowLog(d / "rows.jsonl", "abc", batch_size=2).done_batches  # a new process resumes
    1
    >>> _ = log.finish(); [r["i"] for r in read_jsonl(d / "rows.jsonl")]
    [0, 1]
    """

    def __init__(self, path: str | os.PathLike, config_hash: str, batch_size: int):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.stem + ".partial.jsonl")
        self.meta = self.path.with_name(self.path.stem + ".partial.json")
        self.batch_size = batch_size
        meta = read_json(self.meta) if self.meta.exists() else None
        expected = {"config_hash": config_hash, "batch_size": batch_size}
        rows = _complete_rows(self.partial) if meta == expected else []
        keep = len(rows) - len(rows) % batch_size
        self.rows = rows[:keep]
        # Rewrite the kept prefix so a torn last line or a partial batch disappears.
        write_jsonl(self.partial, self.rows)
        write_json(self.meta, expected)

    @property
    def done_batches(self) -> int:
        return len(self.rows) // self.batch_size

    def append_batch(self, rows: list[dict]) -> None:
        with open(self.partial, "a", encoding="utf-8") as f:
            f.write("".join(dumps(row, ensure_ascii=False) + "\n" for row in rows))
            f.flush()
            os.fsync(f.fileno())
        self.rows.extend(rows)

    def finish(self) -> list[dict]:
        """Move the log to its final name and remove the bookkeeping file."""
        os.replace(self.partial, self.path)
        self.meta.unlink()
        fsync_path(self.path.parent)
        return self.rows
