r"""What the three subpackages share: result files, the run environment, progress, the
errors a user can fix and confidence intervals.

This module imports only the standard library (scipy, jax and tqdm are imported inside the
functions that need them), so ``sublearn lm`` loads no jax and ``sublearn mnist`` no torch.

**Files.** Every result appears at its final name in one ``os.replace``: a reader sees the
previous version or the complete new one, never half a file. The rules:

- the contents are fsynced before the rename and the folder after it, so a crash right
  after a write cannot leave an empty file at the final name;
- files get the ordinary mode the umask gives (``0644`` under umask 022), not
  ``mkstemp``'s private ``0600``: results are meant to be read by others;
- JSON has no NaN: a non-finite float is written as ``null`` (strict JSON, which other
  tools read; an undefined number reads back as ``None``).

**Intervals.** :func:`mean_interval` gives ``mean +- q * s / sqrt(n)`` with ``s`` the
sample standard deviation (``ddof=1``) and ``q`` either Student's t quantile with ``n - 1``
degrees of freedom (``method="t"``, the default) or the normal quantile (``method="z"``,
1.96 at 95%). The t interval is exact for normal data and right for the few seeds or
questions used here; the z interval is its large-``n`` limit and is too narrow for small
``n``: at 4 values ``t_{0.975, 3} = 3.18`` against 1.96, 1.6 times wider.

Example:

>>> ci = mean_interval([0.0, 1.0])
>>> (ci.mean, round(ci.high, 3))  # t_{0.975, 1} = 12.706, s / sqrt(2) = 0.5
(0.5, 6.853)
>>> round(mean_interval([0.0, 1.0], method="z").high, 3)  # 0.5 + 1.96 * 0.5
1.48
"""

from __future__ import annotations

import inspect
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol, TextIO, runtime_checkable


class UserError(Exception):
    """Something the user gave or asked for cannot be used (an option, a file, a model name).

    ``sublearn`` prints the message as one line, ``PROG: error: MESSAGE``, and exits 2
    (:func:`sublearn.cli.main`); the message names the problem and the fix. Every such error
    of the package derives from it: :class:`ConfigError`, :class:`toymodels.data.DataError`,
    :class:`lmpipeline.pipeline.PipelineError` and :class:`lmpipeline.transfer.StudyError`.
    """


class ConfigError(UserError, ValueError):
    """An option or config value that cannot be used; the message names it and the fix."""


# Former names still accepted, each with a one-line notice; they go in this version.
FORMER_NAMES_REMOVED_IN = "0.2.0"
_noticed: set[str] = set()


def former_name(old: str, new: str, stream: TextIO | None = None) -> None:
    """Say once per process, on stderr, that ``old`` is the former name of ``new`` and when it goes."""
    if old not in _noticed:
        _noticed.add(old)
        print(
            f"sublearn: {old} is the former name of {new}; it goes in version {FORMER_NAMES_REMOVED_IN}",
            file=stream or sys.stderr,
        )


def field_docs(cls: type) -> dict[str, str]:
    r"""Each field's entry under ``Attributes:`` in the docstring of ``cls``, on one line,
    as plain text for a terminal (``literal`` and :role:`target` lose their markup).

    Configs document their fields there, and command-line help is read from it, so a
    setting is documented in one place.

    >>> doc = "A spec.\n\nAttributes:\n    rate: the step size, see :func:`step`; ``0`` stops.\n"
    >>> field_docs(type("Spec", (), {"__doc__": doc + "    width: hidden units,\n        per layer.\n"}))
    {'rate': 'the step size, see step; 0 stops.', 'width': 'hidden units, per layer.'}
    """
    docs: dict[str, list[str]] = {}
    lines = inspect.cleandoc(cls.__doc__ or "").partition("Attributes:")[2].splitlines()
    for line in lines:
        name, colon, text = line.strip().partition(": ")
        if line.startswith("    ") and not line.startswith("        ") and colon and name.isidentifier():
            docs[name] = [text]
        elif line.strip() and docs:
            docs[next(reversed(docs))].append(line.strip())
    return {name: re.sub(r":\w+:`([^`]*)`", r"\1", " ".join(parts)).replace("``", "") for name, parts in docs.items()}


# --- files -------------------------------------------------------------------------------


def check_writable(folder: str | Path) -> None:
    """Create ``folder`` if needed and prove a file can be written there; raises ``OSError`` if not.

    Called before long work, so that a folder that cannot take the results fails at once.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / ".sublearn-write-test"
    probe.write_text("")
    probe.unlink()


def output_folder(folder: str | Path, option: str = "--out") -> Path:
    """Check that ``folder`` can hold a command's results before any work starts; raise
    :class:`ConfigError` naming ``option`` and the fix if it cannot.

    >>> import tempfile, pathlib
    >>> afile = pathlib.Path(tempfile.mkdtemp()) / "afile"
    >>> _ = afile.write_text("")
    >>> output_folder(afile)
    Traceback (most recent call last):
    ...
    sublearn._common.ConfigError: --out ... is a file, not a folder: choose another --out
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{option} {folder} is a file, not a folder: choose another {option}")
    try:
        check_writable(folder)
    except OSError as err:
        raise ConfigError(f"cannot write to output folder {folder} ({err.strerror}): choose another {option}") from err
    return folder


def fsync_path(path: Path) -> None:
    """Flush a file's contents, or a folder's entries, to disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # nor fsync them
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same name, so the same suffix); on success it
    replaces ``path``.

    Works for files and folders (a folder target is swapped in after the old one is
    removed, the only step that is not atomic). The temporary path lies inside a private
    temporary folder, so the file itself is created with the ordinary mode.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        files = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
        for file in files:
            fsync_path(file)
        if target.is_dir() and path.exists():
            shutil.rmtree(path)
        os.replace(target, path)
        fsync_path(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Have ``write(tmp_path)`` fill a temporary file beside ``path``, then move it into place."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-inf) replaced by ``None``, recursively.

    >>> finite_or_none({"a": [1.0, float("nan")], "b": (float("inf"), 2)})
    {'a': [1.0, None], 'b': [None, 2]}
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` with the NaN rule: non-finite floats become ``null``."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_text(path, dumps(data, indent=2) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# --- environment -------------------------------------------------------------------------

PACKAGES = ("subliminal-learning", "jax", "jaxlib", "flax", "optax", "numpy", "matplotlib")


def environment(packages: Sequence[str] = PACKAGES) -> dict[str, Any]:
    """Versions of the packages that produced a result, and the machine it ran on.

    The devices are jax's when jax is already loaded; this function never loads it.
    """
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    record: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
    }
    if "jax" in sys.modules:
        jax = sys.modules["jax"]
        record["devices"] = [str(d) for d in jax.devices()]
        record["device_kind"] = jax.devices()[0].device_kind
    record["cpu_count"] = os.cpu_count()
    return record


# --- progress ----------------------------------------------------------------------------


@runtime_checkable
class Progress(Protocol):
    """A fixed amount of work, counted in units, reported as it goes.

    ``start`` announces the total, ``advance`` adds done units, ``note`` prints a line.
    The reporters below also take ``update(done, total, tokens)``, which sets the units
    done; calling a reporter is ``update`` (the language backends' progress callback).
    """

    def start(self, total_units: float, description: str) -> None: ...

    def advance(self, description: str, units: float = 1.0) -> None: ...

    def note(self, message: str) -> None: ...

    def close(self) -> None: ...


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class TextProgress:
    """Lines on ``stream`` (stderr): ``[label] [ 30% 0:12, ~0:28 left] 3/10 rows | 5.0 tok/s | teacher epoch 3``.

    Args:
        stream: where lines go (default stderr).
        label: prefixed to every line, e.g. the stage's name.
        unit: with a unit, lines show ``done/total unit``.
        every: at most one progress line per ``every`` seconds; the last one always shows.
        done_before: units a resumed job found done; the time left counts only new ones.

    Calling the reporter, ``progress(done, total, tokens)``, is :meth:`update`.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        label: str = "",
        unit: str = "",
        every: float = 0.0,
        done_before: float = 0,
    ):
        self.stream = stream if stream is not None else sys.stderr
        self.prefix = f"[{label}] " if label else ""
        self.unit = unit
        self.every = every
        self.total = 0.0
        self.done = self.done_before = done_before
        self.t0 = time.perf_counter()
        self.last_line = -math.inf

    def start(self, total_units: float, description: str = "") -> None:
        """Start the clock (after any loading, so that the rate counts only the work)."""
        self.total, self.t0, self.last_line = total_units, time.perf_counter(), -math.inf
        if description:
            self.note(description)

    def advance(self, description: str, units: float = 1.0) -> None:
        self.done += units
        self._line(description)

    def update(self, done: float, total: float, tokens: int = 0) -> None:
        """Set the units done; ``tokens`` counts the tokens processed since :meth:`start`."""
        self.done, self.total = done, total
        self._line("", tokens)

    __call__ = update

    def note(self, message: str) -> None:
        print(self.prefix + message, file=self.stream, flush=True)

    def close(self) -> None:
        pass

    def _line(self, description: str, tokens: int = 0) -> None:
        now = time.perf_counter()
        if now - self.last_line < self.every and self.done < self.total:
            return
        self.last_line = now
        elapsed = now - self.t0
        head = f"{100 * self.done / self.total if self.total else 100:3.0f}% {_clock(elapsed)}"
        new = self.done - self.done_before
        if new > 0 and self.done < self.total:
            head += f", ~{_clock(elapsed / new * (self.total - self.done))} left"
        parts = [f"{self.done:g}/{self.total:g} {self.unit}"] if self.unit else []
        if tokens and elapsed > 0:
            parts.append(f"{tokens / elapsed:.1f} tok/s")
        if description:
            parts.append(description)
        self.note(f"[{head}] " + " | ".join(parts))


class SilentProgress:
    def start(self, total_units: float, description: str = "") -> None:
        pass

    def advance(self, description: str, units: float = 1.0) -> None:
        pass

    def update(self, done: float, total: float, tokens: int = 0) -> None:
        pass

    __call__ = update

    def note(self, message: str) -> None:
        pass

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

    def start(self, total_units: float, description: str = "") -> None:
        if self._fallback:
            return self._fallback.start(total_units, description)
        self.bar = self._tqdm(total=total_units, desc=description, bar_format="{l_bar}{bar}| {elapsed}<{remaining}")

    def advance(self, description: str, units: float = 1.0) -> None:
        if self._fallback:
            return self._fallback.advance(description, units)
        self.bar.set_description(description, refresh=False)
        self.bar.update(min(units, self.bar.total - self.bar.n))  # float sums must not overshoot

    def update(self, done: float, total: float, tokens: int = 0) -> None:
        if self._fallback:
            return self._fallback.update(done, total, tokens)
        self.bar.total = total
        self.bar.update(done - self.bar.n)

    __call__ = update

    def note(self, message: str) -> None:
        if self._fallback:
            return self._fallback.note(message)
        self.bar.write(message) if self.bar is not None else print(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class PartsProgress:
    """Progress of a job made of ``parts`` smaller jobs (the runs of a sweep or an atlas),
    each of which counts its own units and calls :meth:`start`: every part is one unit of
    ``outer``, so ``outer`` counts the parts of the job and ends at 100%, never past it.

    Call :meth:`next_part` before each part and :meth:`finish_part` after it.

    >>> import io
    >>> stream = io.StringIO()
    >>> parts = PartsProgress(TextProgress(stream), 2)
    >>> for name in ("a", "b"):
    ...     parts.next_part(name)
    ...     parts.start(4)  # what each part's own code does
    ...     for _ in range(4):
    ...         parts.advance("epoch", 1)
    ...     parts.finish_part()
    >>> [line.split("%")[0].strip("[ ") for line in stream.getvalue().splitlines()]
    ['12', '25', '38', '50', '62', '75', '88', '100']
    """

    def __init__(self, outer: Progress, parts: int, description: str = ""):
        self.outer, self.parts = outer, parts
        self.part, self.label, self.units, self.done = 0, "", 1.0, 1.0
        outer.start(parts, description)

    def next_part(self, label: str) -> None:
        self.part, self.label, self.units, self.done = self.part + 1, label, 1.0, 0.0

    def start(self, total_units: float, description: str = "") -> None:
        self.units = total_units or 1.0
        if description:
            self.note(description)

    def advance(self, description: str, units: float = 1.0) -> None:
        share = min(units / self.units, 1.0 - self.done)  # a part's own count may overshoot; its share cannot
        self.done += share
        self.outer.advance(f"{self.part}/{self.parts} {self.label}: {description}", share)

    def finish_part(self) -> None:
        if self.done < 1.0:
            self.outer.advance(f"{self.part}/{self.parts} {self.label}: done", 1.0 - self.done)
            self.done = 1.0

    def note(self, message: str) -> None:
        self.outer.note(message)

    def close(self) -> None:
        pass  # a part ending is not the job ending; the job's owner closes ``outer``


# --- intervals ---------------------------------------------------------------------------

INTERVAL_METHODS = ("t", "z")


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float | None  # None when n < 2: one value gives no spread
    high: float | None
    n: int
    confidence: float = 0.95

    def to_dict(self) -> dict:
        return asdict(self)


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t  # imported here: only intervals need it

    return float(t.ppf(p, df))


def normal_quantile(p: float) -> float:
    """The ``p`` quantile of the standard normal (``normal_quantile(0.975)`` is 1.95996...)."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(p)


def interval_quantile(n: int, confidence: float = 0.95, method: str = "t") -> float:
    """The multiplier ``q`` of ``s / sqrt(n)`` in a two-sided interval of ``n`` values."""
    p = 0.5 + confidence / 2
    if method == "t":
        return t_quantile(p, n - 1)
    if method == "z":
        return normal_quantile(p)
    raise ValueError(f"interval method {method!r}: choose one of {', '.join(INTERVAL_METHODS)}")


def mean_interval(values: Sequence[float], confidence: float = 0.95, method: str = "t") -> Interval:
    """Mean of ``values`` with a two-sided t (default) or z interval (see the module docstring)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval needs at least one value")
    mean = math.fsum(values) / n
    if n < 2:
        return Interval(mean, None, None, n, confidence)
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    half = interval_quantile(n, confidence, method) * math.sqrt(var / n)
    return Interval(mean, mean - half, mean + half, n, confidence)


# --- alignment along training ------------------------------------------------------------


def tracked_steps(steps: int, every: int) -> list[int]:
    """Indices (from 0) of the steps after which a run tracked every ``every`` steps records a
    point: ``(i + 1) % every == 0``, and the last step, so the last point is the trained
    model (``sublearn mnist --track``, per epoch; :mod:`lmpipeline.alignment`, per run).

    >>> tracked_steps(25, 10)
    [9, 19, 24]
    """
    return [i for i in range(steps) if (i + 1) % every == 0 or i == steps - 1]
