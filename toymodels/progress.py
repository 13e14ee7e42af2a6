"""Progress reporting for long runs: plain lines for terminals and logs, a bar for notebooks.

A run is a fixed amount of work, counted in units (for the MNIST experiment, one teacher
epoch of one chunk of seeds is one unit and a student epoch counts by its relative cost),
so both reporters can show how far along it is and estimate what is left.
"""

from __future__ import annotations

import sys
import time
from typing import Protocol, TextIO, runtime_checkable


@runtime_checkable
class Progress(Protocol):
    def start(self, total_units: float, description: str) -> None: ...

    def advance(self, description: str, units: float = 1.0) -> None: ...

    def note(self, message: str) -> None: ...

    def close(self) -> None: ...


class TextProgress:
    """One line per step of work on ``stream`` (stderr): ``[ 12% 12.5s, ~94s left] teacher epoch 3/5``."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.total = 0
        self.done = 0
        self.t0 = time.perf_counter()

    def start(self, total_units: float, description: str) -> None:
        self.total, self.done, self.t0 = total_units, 0.0, time.perf_counter()
        self.note(description)

    def advance(self, description: str, units: float = 1.0) -> None:
        self.done += units
        elapsed = time.perf_counter() - self.t0
        left = elapsed / self.done * max(self.total - self.done, 0.0)
        self.note(f"[{100 * self.done / self.total:3.0f}% {elapsed:.1f}s, ~{_duration(left)} left] {description}")

    def note(self, message: str) -> None:
        print(message, file=self.stream, flush=True)

    def close(self) -> None:
        pass


class BarProgress:
    """A ``tqdm`` bar (notebook widget where available); falls back to text without tqdm."""

    def __init__(self):
        try:
            import ipywidgets  # noqa: F401  (tqdm.auto needs it for the notebook widget)
            from tqdm.auto import tqdm
        except ImportError:
            try:
                from tqdm.std import tqdm
            except ImportError:
                self._fallback: TextProgress | None = TextProgress()
                return
        self._fallback = None
        self._tqdm = tqdm
        self.bar = None

    def start(self, total_units: float, description: str) -> None:
        if self._fallback:
            return self._fallback.start(total_units, description)
        self.bar = self._tqdm(total=total_units, desc=description, bar_format="{l_bar}{bar}| {elapsed}<{remaining}")

    def advance(self, description: str, units: float = 1.0) -> None:
        if self._fallback:
            return self._fallback.advance(description, units)
        self.bar.set_description(description, refresh=False)
        self.bar.update(min(units, self.bar.total - self.bar.n))  # float sums must not overshoot

    def note(self, message: str) -> None:
        if self._fallback:
            return self._fallback.note(message)
        self.bar.write(message) if self.bar is not None else print(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class SilentProgress:
    def start(self, total_units: float, description: str) -> None:
        pass

    def advance(self, description: str, units: float = 1.0) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def close(self) -> None:
        pass


def _duration(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m"
