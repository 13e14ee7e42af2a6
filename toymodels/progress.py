"""Progress reporting for long runs: plain lines for terminals and logs, a bar for notebooks.

A run is a fixed number of units (one unit is one compiled epoch call for one chunk of
seeds), so both reporters can show how far along it is and estimate what is left.
"""

from __future__ import annotations

import sys
import time
from typing import Protocol, TextIO


class Progress(Protocol):
    def start(self, total_units: int, description: str) -> None: ...

    def advance(self, description: str) -> None: ...

    def note(self, message: str) -> None: ...

    def close(self) -> None: ...


class TextProgress:
    """One line per unit on ``stream`` (stderr by default): ``[3/70 12.5s, ~4m left] teacher epoch 3/5``."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.total = 0
        self.done = 0
        self.t0 = time.perf_counter()

    def start(self, total_units: int, description: str) -> None:
        self.total, self.done, self.t0 = total_units, 0, time.perf_counter()
        self.note(description)

    def advance(self, description: str) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.t0
        left = elapsed / self.done * (self.total - self.done)
        self.note(f"[{self.done}/{self.total} {elapsed:.1f}s, ~{_duration(left)} left] {description}")

    def note(self, message: str) -> None:
        print(message, file=self.stream, flush=True)

    def close(self) -> None:
        pass


class BarProgress:
    """A ``tqdm`` bar (notebook widget where available); falls back to text without tqdm."""

    def __init__(self):
        try:
            from tqdm.auto import tqdm
        except ImportError:
            self._fallback: TextProgress | None = TextProgress()
            return
        self._fallback = None
        self._tqdm = tqdm
        self.bar = None

    def start(self, total_units: int, description: str) -> None:
        if self._fallback:
            return self._fallback.start(total_units, description)
        self.bar = self._tqdm(total=total_units, desc=description)

    def advance(self, description: str) -> None:
        if self._fallback:
            return self._fallback.advance(description)
        self.bar.set_description(description, refresh=False)
        self.bar.update(1)

    def note(self, message: str) -> None:
        if self._fallback:
            return self._fallback.note(message)
        self.bar.write(message) if self.bar is not None else print(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class SilentProgress:
    def start(self, total_units: int, description: str) -> None:
        pass

    def advance(self, description: str) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def close(self) -> None:
        pass


def _duration(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m"
