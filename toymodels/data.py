"""MNIST loading: the bundled IDX files (default), a directory of them, or tensorflow-datasets.

The four original IDX files ship inside the package (``toymodels/data/mnist/``, CC BY-SA
3.0, Yann LeCun and Corinna Cortes; see the README there). Every file is checked against
the SHA-256 of its decompressed bytes before use, so a truncated or altered copy is
rejected with an error that names it instead of silently training on bad data.

Images stay ``uint8`` in memory (47 MB for the training set); the compiled training step
scales a batch to ``[-1, 1]`` as it is used (:func:`normalize`).

Example:
    >>> from toymodels.data import load_mnist
    >>> mnist = load_mnist()
    >>> mnist.train_images.shape, mnist.train_images.dtype, mnist.test_labels.shape
    ((60000, 784), dtype('uint8'), (10000,))
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import struct
from importlib import resources
from pathlib import Path

import numpy as np

# SHA-256 of the decompressed files, as published with the original MNIST distribution.
CHECKSUMS = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
SOURCES = ("bundled", "dir", "tfds")


class DataError(ValueError):
    """A data file is missing, corrupt or of the wrong format; the message names the file."""


@dataclasses.dataclass(frozen=True)
class MNIST:
    """MNIST as flat ``uint8`` arrays: images ``(n, 784)``, labels ``(n,)``."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> MNIST:
        """The first ``n_train`` training and ``n_test`` test examples (all when None)."""
        return dataclasses.replace(
            self,
            train_images=self.train_images[:n_train],
            train_labels=self.train_labels[:n_train],
            test_images=self.test_images[:n_test],
            test_labels=self.test_labels[:n_test],
        )


def bundled_dir() -> Path:
    """Folder of the IDX files that ship with the package."""
    return Path(str(resources.files("toymodels") / "data" / "mnist"))


def _read_verified(directory: Path, name: str) -> bytes:
    """Decompressed bytes of ``name`` (``.gz`` or plain) from ``directory``, checksum-verified."""
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            path = candidate
            break
    else:
        raise DataError(
            f"MNIST file {name}(.gz) not found in {directory}: put the four original IDX files "
            "there, or drop --data-dir to use the copy bundled with the package"
        )
    try:
        raw = path.read_bytes()
        data = gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"cannot read MNIST file {path}: {err}; replace it with an intact copy") from err
    digest = hashlib.sha256(data).hexdigest()
    if digest != CHECKSUMS[name]:
        raise DataError(
            f"MNIST file {path} is corrupt: SHA-256 of its contents is {digest[:16]}..., "
            f"expected {CHECKSUMS[name][:16]}...; replace it with an intact copy"
        )
    return data


def parse_idx(data: bytes, *, name: str = "IDX data") -> np.ndarray:
    """Parse an IDX file (big-endian header: magic, then one uint32 per dimension)."""
    if len(data) < 4:
        raise DataError(f"{name}: too short to be an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{name}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{name}: header says {shape} but holds {body.size} bytes")
    return body.reshape(shape)


def load_idx_dir(directory: str | Path) -> MNIST:
    """Load the four MNIST IDX files (gzip-compressed or not) from ``directory``."""
    directory = Path(directory)
    arrays = {name: parse_idx(_read_verified(directory, name), name=name) for name in CHECKSUMS}
    return MNIST(
        train_images=arrays["train-images-idx3-ubyte"].reshape(-1, 784),
        train_labels=arrays["train-labels-idx1-ubyte"],
        test_images=arrays["t10k-images-idx3-ubyte"].reshape(-1, 784),
        test_labels=arrays["t10k-labels-idx1-ubyte"],
        source=str(directory),
    )


def load_tfds(data_dir: str | Path | None = None) -> MNIST:
    """Load MNIST through tensorflow-datasets (optional; ``pip install tensorflow-datasets``)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise DataError(
            "--data tfds needs tensorflow-datasets: pip install 'subliminal-learning[tfds]', "
            "or use the bundled files (the default)"
        ) from err
    splits = {}
    for split in ("train", "test"):
        ds = tfds.as_numpy(tfds.load("mnist", split=split, batch_size=-1, data_dir=data_dir))
        splits[split] = (np.asarray(ds["image"], np.uint8).reshape(-1, 784), np.asarray(ds["label"], np.uint8))
    return MNIST(*splits["train"], *splits["test"], source="tfds")


def load_mnist(source: str = "bundled", data_dir: str | Path | None = None) -> MNIST:
    """Load MNIST from ``source``: ``"bundled"``, ``"dir"`` (needs ``data_dir``) or ``"tfds"``.

    Raises:
        DataError: a file is missing or corrupt, or the source is unknown.
    """
    if source == "bundled":
        return dataclasses.replace(load_idx_dir(bundled_dir()), source="bundled")
    if source == "dir":
        if data_dir is None:
            raise DataError("--data dir needs --data-dir DIR holding the four MNIST IDX files")
        return load_idx_dir(data_dir)
    if source == "tfds":
        return load_tfds(data_dir)
    raise DataError(f"unknown MNIST source {source!r}: choose one of {', '.join(SOURCES)}")


def normalize(images_uint8):
    """Scale ``uint8`` pixels to ``[-1, 1]``: ``(x / 255 - 0.5) / 0.5``, as the paper does."""
    return (images_uint8.astype("float32") / 255.0 - 0.5) / 0.5
