import gzip
import hashlib
import shutil

import numpy as np
import pytest

from toymodels.data import CHECKSUMS, DataError, bundled_dir, idx_bytes, load_mnist, normalize, parse_idx


@pytest.fixture(scope="module")
def mnist():
    return load_mnist()


def test_bundled_mnist_shapes_and_labels(mnist):
    assert mnist.train_images.shape == (60000, 784) and mnist.train_images.dtype == np.uint8
    assert mnist.test_images.shape == (10000, 784)
    assert np.bincount(mnist.train_labels, minlength=10).tolist() == [
        5923,
        6742,
        5958,
        6131,
        5842,
        5421,
        5918,
        6265,
        5851,
        5949,
    ]
    assert mnist.train_images.max() == 255 and mnist.train_images.min() == 0


def test_normalize_maps_pixels_to_minus_one_one():
    np.testing.assert_allclose(normalize(np.array([0, 255, 51], np.uint8)), [-1.0, 1.0, -0.6], rtol=1e-6)


def test_attribution_ships_with_the_data():
    text = (bundled_dir() / "README.md").read_text()
    assert "CC BY-SA 3.0" in text and "LeCun" in text


@pytest.fixture
def data_copy(tmp_path):
    for name in CHECKSUMS:
        shutil.copy(bundled_dir() / f"{name}.gz", tmp_path / f"{name}.gz")
    return tmp_path


def test_a_directory_of_uncompressed_files_loads(data_copy, mnist):
    name = "t10k-labels-idx1-ubyte"
    (data_copy / name).write_bytes(gzip.decompress((data_copy / f"{name}.gz").read_bytes()))
    (data_copy / f"{name}.gz").unlink()
    loaded = load_mnist("dir", data_copy)
    np.testing.assert_array_equal(loaded.test_labels, mnist.test_labels)


def test_a_corrupted_file_is_rejected_by_name(data_copy):
    name = "t10k-labels-idx1-ubyte"
    raw = bytearray(gzip.decompress((data_copy / f"{name}.gz").read_bytes()))
    raw[100] ^= 1  # one flipped bit: a label changes, the format stays valid
    (data_copy / f"{name}.gz").write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match=f"{name}.gz is corrupt"):
        load_mnist("dir", data_copy)


def test_a_truncated_gzip_is_rejected(data_copy):
    path = data_copy / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
        load_mnist("dir", data_copy)


def test_missing_file_and_unknown_source(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_mnist("dir", tmp_path)
    with pytest.raises(DataError, match="unknown MNIST source"):
        load_mnist("web")
    with pytest.raises(DataError, match="--data-dir"):
        load_mnist("dir")


def test_parse_idx_rejects_bad_headers():
    with pytest.raises(DataError, match="not an unsigned-byte"):
        parse_idx(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(DataError, match="header says"):
        parse_idx(b"\x00\x00\x08\x01\x00\x00\x00\x05" + b"\x01\x02")
    np.testing.assert_array_equal(parse_idx(b"\x00\x00\x08\x01\x00\x00\x00\x02" + b"\x07\x09"), [7, 9])


def test_idx_bytes_rebuilds_the_original_files(mnist):
    """The check of MNIST loaded through tfds rests on this: arrays back to the exact IDX bytes."""
    labels, images = idx_bytes(mnist.test_labels), idx_bytes(mnist.test_images.reshape(-1, 28, 28))
    assert hashlib.sha256(labels).hexdigest() == CHECKSUMS["t10k-labels-idx1-ubyte"]
    assert hashlib.sha256(images).hexdigest() == CHECKSUMS["t10k-images-idx3-ubyte"]
    np.testing.assert_array_equal(parse_idx(labels), mnist.test_labels)
    assert idx_bytes(mnist.test_labels[::-1]) != labels
