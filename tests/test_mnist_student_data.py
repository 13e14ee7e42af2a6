"""``--student-data``: what each kind of student input is, and that noise runs are unchanged."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from toymodels.config import IMAGE_DATA, STUDENT_DATA, ConfigError, MnistConfig, tiny
from toymodels.data import load_mnist, normalize
from toymodels.experiment import run_experiment
from toymodels.noise import noise_images, noise_words, pixel_permutation, student_inputs

WORDS = noise_words(jax.random.key(7))
IDS = jnp.arange(0, 4000, 8)


@pytest.fixture(scope="module")
def pool():
    return jnp.asarray(load_mnist().train_images)


def inputs(kind, pool, words=WORDS, ids=IDS):
    return np.asarray(student_inputs(words, ids, pool, kind, 784), np.float64)


@pytest.mark.parametrize("kind", ["uniform", "gaussian"])
def test_noise_kinds_are_the_noise_images_bit_for_bit(kind, pool):
    expected = np.asarray(noise_images(WORDS, IDS, 784, kind), np.float64)
    np.testing.assert_array_equal(inputs(kind, None), expected)
    np.testing.assert_array_equal(inputs(kind, pool), expected)  # a pool, if given, is ignored


def test_mnist_is_the_training_images_scaled_like_the_teachers_inputs(pool):
    x = inputs("mnist", pool)
    assert x.shape == (IDS.size, 784)
    np.testing.assert_array_equal(x, np.asarray(normalize(pool[IDS]), np.float64))
    # MNIST's published pixel mean 0.1307 and std 0.3081 on [0, 1], here on [-1, 1].
    assert abs(x.mean() - (2 * 0.1307 - 1)) < 0.02
    assert abs(x.std() - 2 * 0.3081) < 0.02


def test_shuffled_permutes_every_images_pixels_by_one_fixed_permutation(pool):
    x, shuffled = inputs("mnist", pool), inputs("shuffled", pool)
    perm = np.asarray(pixel_permutation(WORDS, 784))
    assert sorted(perm.tolist()) == list(range(784)) and np.mean(perm == np.arange(784)) < 0.01
    np.testing.assert_array_equal(shuffled, x[:, perm])
    # The same image id gives the same image in every batch; another seed's words another permutation.
    again = np.asarray(student_inputs(WORDS, IDS[::-1], pool, "shuffled", 784), np.float64)[::-1]
    np.testing.assert_array_equal(again, shuffled)
    other = np.asarray(pixel_permutation(noise_words(jax.random.key(8)), 784))
    assert np.mean(other == perm) < 0.01
    # Pixel statistics survive; the spatial layout does not (the mean image is scrambled).
    assert shuffled.mean() == pytest.approx(x.mean())
    assert np.corrcoef(shuffled.mean(axis=0), x.mean(axis=0))[0, 1] < 0.5


def test_inverted_is_the_negated_images(pool):
    np.testing.assert_array_equal(inputs("inverted", pool), -inputs("mnist", pool))
    assert inputs("inverted", pool).mean() > 0.7  # a white background


def test_image_kinds_need_the_images():
    for kind in IMAGE_DATA:
        with pytest.raises(ValueError, match="needs the MNIST training images"):
            student_inputs(WORDS, IDS, None, kind, 784)


def test_default_is_uniform_and_old_results_load_with_their_fingerprint():
    assert MnistConfig().student_data == "uniform" and set(STUDENT_DATA) >= {"uniform", "gaussian", "mnist", "shuffled"}
    old = dict(MnistConfig(student_data="gaussian").to_dict())
    old["noise"] = old.pop("student_data")
    loaded = MnistConfig.from_dict(old)
    assert loaded == MnistConfig(student_data="gaussian")
    assert loaded.fingerprint() != MnistConfig().fingerprint()


def test_image_kinds_cannot_ask_for_more_images_than_there_are():
    with pytest.raises(ConfigError, match="at most 2048"):
        tiny(student_data="mnist", n_train=2048, n_noise=4096).validate()
    with pytest.raises(ConfigError, match="unknown --student-data 'pink'"):
        tiny(student_data="pink").validate()


@pytest.mark.slow
def test_an_image_kinds_numbers_do_not_depend_on_the_chunk_size():
    config = tiny(
        hidden=(32, 32),
        seeds=4,
        seeds_per_chunk=4,
        teacher_epochs=1,
        student_epochs=1,
        n_noise=1024,
        n_train=2048,
        n_test=500,
        student_data="shuffled",
    )
    chunked = run_experiment(dataclasses.replace(config, seeds_per_chunk=2))
    whole = run_experiment(config)
    assert chunked.accuracy == whole.accuracy
    assert whole.config.student_data == "shuffled"
