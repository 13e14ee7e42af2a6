"""Progress lines on stderr for long stages: count done, rate, tokens per second, time left."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """Prints ``[label] done/total unit (pct) | tok/s | elapsed, left`` at most every ``every`` s.

    Call it as ``progress(done, total, tokens)`` (the backends' progress signature); the
    last update (``done == total``) is always printed.
    """

    def __init__(
        self, label: str, unit: str = "rows", every: float = 5.0, stream: TextIO | None = None, done_before: int = 0
    ):
        self.label = label
        self.unit = unit
        self.every = every
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.perf_counter()
        self.last_print = -float("inf")
        self.done_before = done_before  # work a resumed stage found finished

    def __call__(self, done: int, total: int, tokens: int = 0) -> None:
        """Report progress; ``tokens`` counts the tokens processed since ``start``."""
        now = time.perf_counter()
        if now - self.last_print < self.every and done < total:
            return
        self.last_print = now
        elapsed = now - self.start
        parts = [f"[{self.label}] {done}/{total} {self.unit} ({100 * done / max(total, 1):.0f}%)"]
        if tokens and elapsed > 0:
            parts.append(f"{tokens / elapsed:.1f} tok/s")
        left = ""
        new = done - self.done_before
        if 0 < new and done < total:
            left = f", ~{_clock(elapsed / new * (total - done))} left"
        parts.append(f"{_clock(elapsed)} elapsed{left}")
        print(" | ".join(parts), file=self.stream, flush=True)

    def note(self, text: str) -> None:
        print(f"[{self.label}] {text}", file=self.stream, flush=True)
