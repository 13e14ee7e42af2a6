"""``--precision bf16``: bfloat16 matmul operands, float32 accumulation, float32 everything else."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from toymodels.config import ConfigError, MnistConfig, tiny
from toymodels.experiment import _student_masks, run_experiment
from toymodels.model import MLPSpec, apply, init_params
from toymodels.noise import noise_images, noise_words
from toymodels.precision import bf16_dot_general, bf16_matmul
from toymodels.train import make_optimizer, spec_of, student_epoch


def _round(a):
    return a.astype(jnp.bfloat16).astype(jnp.float32)


@pytest.fixture(scope="module")
def operands():
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    return (
        jax.random.normal(kx, (64, 48), jnp.float32),
        jax.random.normal(kw, (48, 32), jnp.float32),
        jax.random.normal(kg, (64, 32), jnp.float32),
    )


def test_forward_rounds_both_operands_and_accumulates_in_float32(operands):
    x, w, _ = operands
    y = bf16_matmul(x, w)
    assert y.dtype == jnp.float32
    exact = np.asarray(_round(x), np.float64) @ np.asarray(_round(w), np.float64)
    np.testing.assert_allclose(y, exact, rtol=1e-5, atol=1e-5)
    # Without rounding the product differs at the 1e-3 level: the rounding really happens.
    assert np.max(np.abs(np.asarray(y) - np.asarray(x, np.float64) @ np.asarray(w, np.float64))) > 1e-3


def test_backward_products_round_the_cotangent_too(operands):
    x, w, g = operands
    _, vjp = jax.vjp(bf16_matmul, x, w)
    dx, dw = vjp(g)
    assert dx.dtype == dw.dtype == jnp.float32
    g64, x64, w64 = (np.asarray(_round(a), np.float64) for a in (g, x, w))
    np.testing.assert_allclose(dx, g64 @ w64.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, x64.T @ g64, rtol=1e-5, atol=1e-5)


def test_dot_general_stand_in_flattens_leading_axes_and_rejects_other_contractions(operands):
    x, w, _ = operands
    stacked = x.reshape(4, 16, 48)
    out = bf16_dot_general(stacked, w, (((2,), (0,)), ((), ())))
    np.testing.assert_array_equal(out.reshape(64, 32), bf16_matmul(x, w))
    with pytest.raises(ValueError, match="dense layer"):
        bf16_dot_general(x.T, w, (((0,), (0,)), ((), ())))


def test_bf16_model_stays_close_to_float32_and_keeps_float32_parameters():
    spec = MLPSpec(hidden=(64, 64))
    params = init_params(spec, jax.random.key(1))
    x = noise_images(noise_words(jax.random.key(2)), jnp.arange(128), 784, "uniform")
    z32 = apply(spec, params, x)
    z16 = apply(MLPSpec(hidden=(64, 64), precision="bf16"), params, x)
    assert z16.dtype == jnp.float32
    relative = float(jnp.linalg.norm(z16 - z32) / jnp.linalg.norm(z32))
    assert 1e-4 < relative < 2e-2  # bfloat16 has 8 significant bits: error about 2^-8 per product


def test_bf16_noise_is_the_rounded_float32_noise():
    words = noise_words(jax.random.key(3))
    for distribution in ("uniform", "gaussian"):
        x32 = noise_images(words, jnp.arange(8), 784, distribution)
        x16 = noise_images(words, jnp.arange(8), 784, distribution, jnp.bfloat16)
        assert x16.dtype == jnp.bfloat16
        np.testing.assert_array_equal(x16, x32.astype(jnp.bfloat16))


def _dot_operand_types(hlo: str) -> list[tuple[str, str]]:
    """(lhs, rhs) element types of every dot in a compiled module's text."""
    types = {}
    for match in re.finditer(r"%(\S+) = (\w+)\[", hlo):
        types[match.group(1)] = match.group(2)
    operands = re.findall(r"= \w+\[[\d,]*\]\{[\d,]*\} dot\(%(\S+), %(\S+)\)", hlo)
    return [(types[a], types[b]) for a, b in operands]


@pytest.mark.parametrize("precision, expected", [("bf16", "bf16"), ("float32", "f32")])
def test_every_product_of_the_compiled_student_epoch_has_the_chosen_operand_type(precision, expected):
    config = tiny(seeds=2, seeds_per_chunk=2, precision=precision)
    spec = spec_of(config)
    optimizer = make_optimizer(config)
    keys = jax.random.split(jax.random.key(0), 2)
    teachers = jax.vmap(lambda k: init_params(spec, k))(keys)
    students = jax.tree.map(lambda a: jnp.stack([a] * 4, axis=1), teachers)
    opt_states = jax.vmap(jax.vmap(optimizer.init))(students)
    words = jax.vmap(noise_words)(keys)
    compiled = student_epoch(config).lower(
        students, opt_states, teachers, words, keys, jnp.asarray(_student_masks(config))
    )
    dots = _dot_operand_types(compiled.compile().as_text())
    # Forward, input-gradient and weight-gradient products of three layers, teacher pass included.
    assert len(dots) >= 9
    assert set(dots) == {(expected, expected)}


def test_precision_is_validated_and_part_of_the_fingerprint():
    with pytest.raises(ConfigError, match="--precision"):
        MnistConfig(precision="fp8").validate()
    assert MnistConfig(precision="bf16").fingerprint() != MnistConfig().fingerprint()


@pytest.mark.slow
def test_a_bf16_run_learns_like_float32_and_evaluates_in_float32():
    runs = {p: run_experiment(tiny(precision=p)) for p in ("float32", "bf16")}
    f32, bf16 = (runs[p].accuracy for p in ("float32", "bf16"))
    # The untrained reference is scored in float32 in both runs: identical.
    assert f32["reference"] == bf16["reference"]
    assert f32["teacher"] != bf16["teacher"]
    np.testing.assert_allclose(np.mean(bf16["teacher"]), np.mean(f32["teacher"]), atol=0.02)
    np.testing.assert_allclose(np.mean(bf16["student_all"]), np.mean(f32["student_all"]), atol=0.05)
    assert np.mean(bf16["student_all"]) > np.mean(bf16["cross_all"]) + 0.1
