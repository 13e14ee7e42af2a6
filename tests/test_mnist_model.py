import jax
import jax.numpy as jnp
import numpy as np
import pytest

from toymodels.model import MLPSpec, apply, init_params, layer_init_stds, n_params, perturb_params, to_module

SPEC = MLPSpec()


def test_shapes_and_parameter_count():
    params = init_params(SPEC, jax.random.key(0))
    shapes = jax.tree.map(lambda a: a.shape, params)
    assert shapes == {
        "layers": {
            0: {"kernel": (784, 256), "bias": (256,)},
            1: {"kernel": (256, 256), "bias": (256,)},
            2: {"kernel": (256, 13), "bias": (13,)},
        }
    }
    assert (
        n_params(SPEC)
        == sum(a.size for a in jax.tree.leaves(params))
        == (784 * 256 + 256) + (256 * 256 + 256) + (256 * 13 + 13)
    )
    assert apply(SPEC, params, jnp.zeros((7, 784))).shape == (7, 13)


def test_init_statistics_match_the_paper():
    """Kernels ~ N(0, 1/d_in), biases zero.

    The sample std of k iid normals has relative standard error about 1/sqrt(2k); we allow
    five of those, so a correct init fails with probability ~1e-6 and a wrong scale (e.g.
    Kaiming's sqrt(2)) fails for sure.
    """
    params = init_params(SPEC, jax.random.key(1))
    for (i, layer), std in zip(sorted(params["layers"].items()), layer_init_stds(SPEC)):
        kernel = np.asarray(layer["kernel"])
        rel_err = 5 / np.sqrt(2 * kernel.size)
        assert abs(kernel.std() / std - 1) < rel_err, i
        assert abs(kernel.mean()) < 5 * std / np.sqrt(kernel.size), i
        assert np.all(np.asarray(layer["bias"]) == 0)


def test_init_is_a_function_of_the_key():
    a, b = init_params(SPEC, jax.random.key(3)), init_params(SPEC, jax.random.key(3))
    c = init_params(SPEC, jax.random.key(4))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert not np.array_equal(a["layers"][0]["kernel"], c["layers"][0]["kernel"])


def test_nnx_module_and_functional_apply_agree():
    params = init_params(SPEC, jax.random.key(2))
    x = jax.random.normal(jax.random.key(5), (4, 784))
    module = to_module(SPEC, params)
    np.testing.assert_array_equal(module(x), apply(SPEC, params, x))
    manual = x
    for i in range(2):
        manual = jax.nn.relu(manual @ params["layers"][i]["kernel"] + params["layers"][i]["bias"][None, :])
    manual = manual @ params["layers"][2]["kernel"] + params["layers"][2]["bias"][None, :]
    np.testing.assert_allclose(apply(SPEC, params, x), manual, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sigma", [0.1, 1.0])
def test_perturbation_scales_with_each_layers_init_std(sigma):
    params = init_params(SPEC, jax.random.key(0))
    moved = perturb_params(SPEC, params, jax.random.key(9), sigma)
    for (i, layer), std in zip(sorted(params["layers"].items()), layer_init_stds(SPEC)):
        for name in ("kernel", "bias"):
            delta = np.asarray(moved["layers"][i][name] - layer[name])
            assert abs(delta.std() / (sigma * std) - 1) < 5 / np.sqrt(2 * delta.size), (i, name)
    unmoved = perturb_params(SPEC, params, jax.random.key(9), 0.0)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(unmoved)))


def test_flop_count_agrees_with_the_compilers_cost_analysis():
    # XLA counts every operation of the compiled program; the matmuls dominate, and the
    # formula counts only them, so the two agree within the elementwise work (< 2%). The
    # training step is a gradient of a loss that needs no input gradient at the first layer.
    params = init_params(SPEC, jax.random.key(0))
    x = jnp.zeros((64, 784))

    def flops(fn, *args) -> float:
        cost = jax.jit(fn).lower(*args).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"] / 64

    forward = flops(lambda p, x: apply(SPEC, p, x), params, x)
    step = flops(jax.grad(lambda p, x: jnp.sum(apply(SPEC, p, x) ** 2)), params, x)
    assert forward == pytest.approx(SPEC.flops_per_example(forward_only=True), rel=0.02)
    assert step == pytest.approx(SPEC.flops_per_example(), rel=0.02)
