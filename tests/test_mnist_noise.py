import jax
import jax.numpy as jnp
import numpy as np

from toymodels.noise import noise_images, noise_words

IDS = jnp.arange(512)


def test_uniform_noise_range_and_moments():
    x = np.asarray(noise_images(noise_words(jax.random.key(0)), IDS, 784, "uniform"), np.float64)
    n = x.size
    assert x.min() >= -1 and x.max() < 1
    # U(-1,1): mean 0 (sd 1/sqrt(3n)), variance 1/3 (sd of the sample variance sqrt(4/45/n)).
    assert abs(x.mean()) < 5 / np.sqrt(3 * n)
    assert abs(x.var() - 1 / 3) < 5 * np.sqrt(4 / 45 / n)
    hist, _ = np.histogram(x, bins=10, range=(-1, 1))
    expected = n / 10
    assert np.max(np.abs(hist - expected)) < 5 * np.sqrt(expected)


def test_gaussian_noise_moments():
    x = np.asarray(noise_images(noise_words(jax.random.key(1)), IDS, 784, "gaussian"), np.float64)
    n = x.size
    assert abs(x.mean()) < 5 / np.sqrt(n)
    assert abs(x.var() - 1) < 5 * np.sqrt(2 / n)
    assert abs(np.mean(x**4) - 3) < 5 * np.sqrt(96 / n)  # kurtosis of a normal


def test_an_image_depends_only_on_its_id_and_key():
    words = noise_words(jax.random.key(2))
    a = noise_images(words, jnp.array([5, 9, 5]), 784, "uniform")
    np.testing.assert_array_equal(a[0], a[2])
    assert not np.array_equal(a[0], a[1])
    b = noise_images(words, jnp.array([9]), 784, "uniform")
    np.testing.assert_array_equal(a[1], b[0])


def test_images_of_different_ids_and_keys_are_uncorrelated():
    x = np.asarray(noise_images(noise_words(jax.random.key(3)), IDS, 784, "uniform"))
    y = np.asarray(noise_images(noise_words(jax.random.key(4)), IDS, 784, "uniform"))
    corr_ids = np.corrcoef(x)[np.triu_indices(len(x), 1)]
    corr_keys = np.array([np.corrcoef(a, b)[0, 1] for a, b in zip(x, y)])
    bound = 5 / np.sqrt(784)  # sd of a sample correlation of independent vectors is ~1/sqrt(d)
    assert np.abs(corr_ids).max() < bound * 1.6  # max over ~130k pairs: allow the extreme-value tail
    assert np.abs(corr_keys).max() < bound
    assert abs(corr_ids.mean()) < 5 / np.sqrt(784 * corr_ids.size)
