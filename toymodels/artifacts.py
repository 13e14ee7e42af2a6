"""Writing results safely: atomic files and a record of the software and hardware used."""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

PACKAGES = ("subliminal-learning", "jax", "jaxlib", "flax", "optax", "numpy", "matplotlib")


def check_writable(folder: str | Path) -> None:
    """Create ``folder`` if needed and prove a file can be written there; raises ``OSError`` if not.

    Called before long work, so that a folder that cannot take the results fails at once.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / ".sublearn-write-test"
    probe.write_text("")
    probe.unlink()


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Have ``write(tmp_path)`` fill a temporary file beside ``path``, then rename it into place.

    A crash or a full disk leaves either the old file or none, never half of a new one.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    # mkstemp makes the file private (0600); results are ordinary files, so apply the umask.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, data: Any) -> Path:
    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, allow_nan=True) + "\n")

    return write_atomic(path, write)


def environment() -> dict[str, Any]:
    """Versions of the packages that produced a result, and the devices it ran on."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    import jax

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
    }
