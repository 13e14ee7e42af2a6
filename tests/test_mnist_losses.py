import jax
import jax.numpy as jnp
import numpy as np

from toymodels.losses import digit_cross_entropy, logit_mask, student_kl, student_mse
from toymodels.model import MLPSpec, apply, init_params

SPEC = MLPSpec(hidden=(32, 32), n_aux=3)
X = jax.random.uniform(jax.random.key(0), (16, 784), minval=-1, maxval=1)
W = jnp.full(16, 1 / 16)


def _last_layer_grads(loss):
    params = init_params(SPEC, jax.random.key(1))
    grads = jax.grad(loss)(params)
    return np.asarray(grads["layers"][2]["kernel"]), np.asarray(grads["layers"][2]["bias"])


def test_aux_only_kl_gives_no_gradient_to_digit_rows():
    teacher = init_params(SPEC, jax.random.key(2))
    target = apply(SPEC, teacher, X)
    mask = logit_mask(13, 3, aux_only=True)
    kernel, bias = _last_layer_grads(lambda p: student_kl(apply(SPEC, p, X), target, W, mask, 1.0))
    assert np.all(kernel[:, :10] == 0) and np.all(bias[:10] == 0)
    assert np.abs(kernel[:, 10:]).max() > 1e-4  # the aux rows do learn


def test_all_logits_kl_reaches_every_row():
    teacher = init_params(SPEC, jax.random.key(2))
    target = apply(SPEC, teacher, X)
    kernel, _ = _last_layer_grads(
        lambda p: student_kl(apply(SPEC, p, X), target, W, logit_mask(13, 3, aux_only=False), 1.0)
    )
    assert np.all(np.abs(kernel).max(axis=0) > 0)


def test_teacher_cross_entropy_gives_no_gradient_to_aux_rows():
    labels = jnp.arange(16) % 10
    kernel, bias = _last_layer_grads(lambda p: digit_cross_entropy(apply(SPEC, p, X), labels, W))
    assert np.all(kernel[:, 10:] == 0) and np.all(bias[10:] == 0)
    assert np.abs(kernel[:, :10]).max() > 1e-4


def test_kl_matches_its_definition_and_is_zero_only_at_equality():
    rng = np.random.default_rng(0)
    zs, zt = rng.normal(size=(5, 13)), rng.normal(size=(5, 13))
    mask = logit_mask(13, 3, aux_only=True)
    tau = 2.0

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    ps, pt = softmax(zs[:, 10:] / tau), softmax(zt[:, 10:] / tau)
    expected = np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), axis=-1))
    w = jnp.full(5, 0.2)
    got = float(student_kl(jnp.asarray(zs), jnp.asarray(zt), w, mask, tau))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert got > 0
    assert abs(float(student_kl(jnp.asarray(zt), jnp.asarray(zt), w, mask, tau))) < 1e-7


def test_mse_averages_over_masked_logits():
    zs, zt = jnp.zeros((2, 13)), jnp.ones((2, 13)) * 2.0
    mask = logit_mask(13, 3, aux_only=True)
    assert float(student_mse(zs, zt, jnp.full(2, 0.5), mask, 1.0)) == 4.0


def test_weighted_padding_equals_the_mean_over_real_rows():
    rng = np.random.default_rng(1)
    logits, labels = jnp.asarray(rng.normal(size=(6, 13))), jnp.asarray(rng.integers(0, 10, 6))
    real = digit_cross_entropy(logits[:4], labels[:4], jnp.full(4, 0.25))
    padded = digit_cross_entropy(logits, labels, jnp.array([0.25] * 4 + [0.0] * 2))
    np.testing.assert_allclose(float(real), float(padded), rtol=1e-6)
