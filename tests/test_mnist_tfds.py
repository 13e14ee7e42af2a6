"""MNIST through tensorflow-datasets equals the bundled files, and trains to the same numbers.

Needs tensorflow and tensorflow-datasets (``pip install -e '.[tfds,test]'``); skipped
without them. tfds's ``mnist`` is prepared offline from the bundled IDX files into a
temporary tfds data folder, so the test never touches the network.
"""

import gzip
import hashlib
import shutil
import time

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="needs tensorflow: pip install -e '.[tfds]'")
tfds = pytest.importorskip("tensorflow_datasets", reason="needs tensorflow-datasets: pip install -e '.[tfds]'")

from toymodels.config import tiny  # noqa: E402
from toymodels.data import CHECKSUMS, DataError, bundled_dir, load_mnist, load_tfds  # noqa: E402
from toymodels.experiment import run_experiment  # noqa: E402

pytestmark = pytest.mark.tfds


@pytest.fixture(scope="module")
def tfds_data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tensorflow_datasets")
    start = time.perf_counter()
    load_tfds(offline=True, tfds_data_dir=root)
    print(f"tfds prepared mnist from the bundled files in {time.perf_counter() - start:.1f}s")
    return root


@pytest.fixture(scope="module")
def bundled():
    return load_mnist()


@pytest.fixture(scope="module")
def via_tfds(tfds_data_dir):
    return load_tfds(tfds_data_dir=tfds_data_dir)


def stored_split(tfds_data_dir, split):
    """A split exactly as tfds hands it out, before this package reorders anything."""
    builder = tfds.builder("mnist", data_dir=tfds_data_dir)
    stored = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    return stored["image"].reshape(-1, 784), stored["label"]


@pytest.mark.parametrize("split, n", [("train", 60_000), ("test", 10_000)])
def test_tfds_holds_the_bundled_examples_in_its_hash_order(tfds_data_dir, bundled, split, n):
    """tfds stores example i (key i) at the rank of md5(split + str(i)): a fixed permutation."""
    images, labels = stored_split(tfds_data_dir, split)
    assert images.shape == (n, 784) and labels.shape == (n,)
    order = sorted(range(n), key=lambda i: hashlib.md5(f"{split}{i}".encode()).digest())
    np.testing.assert_array_equal(images, getattr(bundled, f"{split}_images")[order])
    np.testing.assert_array_equal(labels, getattr(bundled, f"{split}_labels")[order])
    assert order[:3] != [0, 1, 2]  # the stored order really differs from the IDX order


def test_load_tfds_equals_the_bundled_arrays_in_the_original_order(via_tfds, bundled):
    assert via_tfds.source == "tfds"
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        ours, theirs = getattr(via_tfds, field), getattr(bundled, field)
        assert ours.dtype == theirs.dtype == np.uint8
        np.testing.assert_array_equal(ours, theirs)
    assert via_tfds.train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    mutated = via_tfds.train_images.copy()
    mutated[59_999, 400] ^= 1  # one pixel of the last image
    assert not np.array_equal(mutated, bundled.train_images)


def test_a_short_run_gives_the_same_accuracies_from_either_source(via_tfds, bundled):
    config = tiny(
        n_train=2000,
        n_test=1000,
        seeds=2,
        seeds_per_chunk=2,
        hidden=(32, 32),
        teacher_epochs=1,
        student_epochs=1,
        n_noise=2048,
    )
    from_tfds = run_experiment(config, data=via_tfds)
    from_bundled = run_experiment(config, data=bundled)
    assert from_tfds.data_source == "tfds" and from_bundled.data_source == "bundled"
    assert from_tfds.accuracy == from_bundled.accuracy
    assert min(from_tfds.accuracy["teacher"]) > 0.25  # trained well above chance (0.1) in 16 steps


def test_offline_preparation_rejects_a_corrupt_idx_file_by_name(tmp_path):
    idx_dir = tmp_path / "idx"
    idx_dir.mkdir()
    for name in CHECKSUMS:
        shutil.copy(bundled_dir() / f"{name}.gz", idx_dir / f"{name}.gz")
    name = "train-labels-idx1-ubyte"
    raw = bytearray(gzip.decompress((idx_dir / f"{name}.gz").read_bytes()))
    raw[8] = (raw[8] + 1) % 10  # the first label changes; the file stays a valid IDX file
    (idx_dir / f"{name}.gz").write_bytes(gzip.compress(bytes(raw)))
    root = tmp_path / "tensorflow_datasets"
    with pytest.raises(DataError, match=f"{name}.gz is corrupt"):
        load_tfds(idx_dir, tfds_data_dir=root)
    assert not tfds.builder("mnist", data_dir=root).is_prepared()
