"""MNIST loading: the bundled IDX files (default), a directory of them, or tensorflow-datasets.

The four original IDX files ship inside the package (``toymodels/data/mnist/``, CC BY-SA
3.0, Yann LeCun and Corinna Cortes; see the README there). Every file is checked against
the SHA-256 of its decompressed bytes before use, so a truncated or altered copy is
rejected with an error that names it instead of silently training on bad data. MNIST
loaded through tensorflow-datasets passes the same check, after it is put back into the
order of the IDX files (:func:`load_tfds`).

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
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np

from sublearn._common import UserError, check_writable

# SHA-256 of the decompressed files, as published with the original MNIST distribution.
CHECKSUMS = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
SOURCES = ("bundled", "dir", "tfds")
# The IDX files (images, labels) behind each split of tensorflow-datasets' ``mnist``.
TFDS_SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DataError(UserError, ValueError):
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
    return _verified(data, name, what=f"MNIST file {path}", fix="replace it with an intact copy")


def _verified(data: bytes, name: str, *, what: str, fix: str) -> bytes:
    """``data`` if its SHA-256 is the published one of IDX file ``name``; else a DataError about ``what``."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != CHECKSUMS[name]:
        raise DataError(
            f"{what} is corrupt: SHA-256 of its contents is {digest[:16]}..., expected {CHECKSUMS[name][:16]}...; {fix}"
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


def idx_bytes(array: np.ndarray) -> bytes:
    """The unsigned-byte IDX file holding ``array``: the inverse of :func:`parse_idx`."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return struct.pack(f">HBB{array.ndim}I", 0, 0x08, array.ndim, *array.shape) + array.tobytes()


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


def load_tfds(
    idx_dir: str | Path | None = None, *, offline: bool = False, tfds_data_dir: str | Path | None = None
) -> MNIST:
    """Load MNIST through tensorflow-datasets (optional: ``pip install -e '.[tfds]'`` in the checkout).

    tfds's ``mnist`` dataset is read from the tfds data folder: ``tfds_data_dir``, else
    tfds's own default (``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``). If it is not
    prepared there yet, tfds downloads and prepares it as usual; with ``offline`` or an
    ``idx_dir`` it is prepared instead from the four IDX files in ``idx_dir`` (default:
    the bundled ones), without the network.

    tfds stores the examples in a fixed shuffled order (:func:`tfds_order`). They are put
    back into the order of the IDX files, so that ``n_train``/``n_test`` select the same
    images from every source, and the result must match :data:`CHECKSUMS` byte for byte.

    Raises:
        DataError: tensorflow or tensorflow-datasets is missing, the download or the
            preparation fails, or the data differs from the original MNIST.
    """
    tfds = _import_tfds()
    builder = tfds.builder("mnist", data_dir=tfds_data_dir)
    if not builder.is_prepared():
        root = Path(builder.data_dir_root)
        _check_writable(root)
        if offline or idx_dir is not None:
            _prepare_tfds_offline(tfds, builder, bundled_dir() if idx_dir is None else Path(idx_dir))
        else:
            try:
                builder.download_and_prepare()
            except OSError as err:  # requests' connection errors are OSErrors
                raise DataError(
                    f"tensorflow-datasets could not download MNIST into {root} ({type(err).__name__}): "
                    "connect to the internet, or add --offline to prepare it from the bundled IDX files"
                ) from err
        builder = tfds.builder("mnist", data_dir=root)
    arrays = []
    for split, names in TFDS_SPLITS.items():
        stored = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
        original = np.argsort(tfds_order(split, len(stored["label"])))
        images = stored["image"].reshape(-1, 28, 28)[original]
        labels = stored["label"][original]
        for array, name in zip((images, labels), names):
            _verified(
                idx_bytes(array),
                name,
                what=f"tensorflow-datasets' MNIST {split} split in {builder.data_path} ({name})",
                fix="delete that folder so that it is prepared again",
            )
        arrays += [images.reshape(-1, 784).astype(np.uint8), labels.astype(np.uint8)]
    return MNIST(*arrays, source="tfds")


def tfds_order(split: str, n: int) -> np.ndarray:
    """Indices, in the IDX files, of the ``n`` examples of ``split`` as tfds stores them.

    tfds's ``mnist`` builder keys example ``i`` by ``i``, and tfds writes a split sorted
    by the MD5 of its name followed by the key, a shuffle that is the same everywhere.
    """
    return np.array(sorted(range(n), key=lambda i: hashlib.md5(f"{split}{i}".encode()).digest()))


def _import_tfds():
    try:
        import tensorflow  # noqa: F401  # tfds imports it only when first reading data: fail early instead
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise DataError(
            f"--data tfds needs tensorflow and tensorflow-datasets ({err.name} is missing): "
            "pip install -e '.[tfds]' in the package's checkout, or use the bundled files (the default)"
        ) from err
    return tfds


def _check_writable(root: Path) -> None:
    """Fail with the fix before tfds starts a download or preparation it could not store."""
    try:
        check_writable(root)
    except OSError as err:
        raise DataError(
            f"cannot prepare MNIST in the tfds data folder {root} ({err.strerror}): "
            "set TFDS_DATA_DIR to a writable folder"
        ) from err


def _prepare_tfds_offline(tfds, builder, idx_dir: Path) -> None:
    """Prepare tfds's ``mnist`` in ``builder``'s data folder from the IDX files in ``idx_dir``.

    tfds takes the four ``.gz`` files from a download config's ``manual_dir``, but only if
    their SHA-256 is the one it registered for the original downloads. Any recompressed
    copy (the bundled files are one) fails that check although its decompressed bytes are
    identical, and tfds's own escape, ``register_checksums=True``, records the new
    checksums by rewriting ``url_checksums/mnist.txt`` inside the installed tfds package,
    after which genuine downloads fail. Instead the decompressed bytes are checked here
    against :data:`CHECKSUMS`, recompressed into a temporary ``manual_dir``, and prepared by
    a subclass of the builder that carries these files' checksums in memory only.
    """
    from tensorflow_datasets.core.download.checksums import compute_url_info

    builder_cls = type(builder)
    with tempfile.TemporaryDirectory(prefix="sublearn-tfds-") as tmp:
        manual_dir = Path(tmp) / "manual"
        manual_dir.mkdir()
        local_infos = {}
        for url, info in builder_cls.url_infos.items():
            name = info.filename.removesuffix(".gz")
            if name not in CHECKSUMS:
                raise DataError(
                    f"this tensorflow-datasets' mnist expects a file {info.filename} that is not MNIST's: "
                    "prepare it online (drop --offline and --data-dir)"
                )
            path = manual_dir / info.filename
            path.write_bytes(gzip.compress(_read_verified(idx_dir, name), compresslevel=1))
            local_infos[url] = compute_url_info(path)

        class LocalMNIST(builder_cls, skip_registration=True):
            name = builder_cls.name  # the same dataset folder, so tfds.load("mnist") finds it
            url_infos = local_infos

        LocalMNIST(data_dir=builder.data_dir_root).download_and_prepare(
            download_dir=Path(tmp) / "downloads",
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
        )


def load_mnist(source: str = "bundled", data_dir: str | Path | None = None, *, offline: bool = False) -> MNIST:
    """Load MNIST from ``source``: ``"bundled"``, ``"dir"`` (needs ``data_dir``) or ``"tfds"``.

    For ``"tfds"``, ``data_dir`` and ``offline`` say where MNIST is prepared from if the
    tfds data folder lacks it (see :func:`load_tfds`); the other sources never use the network.

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
        return load_tfds(data_dir, offline=offline)
    raise DataError(f"unknown MNIST source {source!r}: choose one of {', '.join(SOURCES)}")


def normalize(images_uint8):
    """Scale ``uint8`` pixels to ``[-1, 1]``: ``(x / 255 - 0.5) / 0.5``, as the paper does."""
    return (images_uint8.astype("float32") / 255.0 - 0.5) / 0.5
