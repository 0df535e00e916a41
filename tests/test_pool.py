"""train.pool.max_pool against flax.nnx.max_pool: outputs and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from train.pool import max_pool


def _normal(seed, shape, dtype=np.float32):
    # NumPy draws: jax.random would compile a program for every shape.
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _flax_pool(x):
    return nnx.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")


@pytest.mark.parametrize("shape", [(2, 8, 6, 3), (2, 7, 9, 3), (1, 1, 1, 2)])
def test_max_pool_matches_flax_including_ties(shape):
    x = _normal(3, shape)
    inputs = {
        "continuous": x,
        # Rounded values and a ReLU give many tied maxima, including all-zero
        # windows: the whole gradient must go to the first maximum.
        "ties": np.round(x),
        "relu ties": np.maximum(np.round(x), 0),
    }
    g = _normal(4, _flax_pool(x).shape)
    pool_and_grad = lambda pool: jax.jit(jax.value_and_grad(lambda x: jnp.sum(pool(x) * g)))
    ref, new = pool_and_grad(_flax_pool), pool_and_grad(max_pool)
    for name, x in inputs.items():
        np.testing.assert_array_equal(_flax_pool(x), max_pool(x), err_msg=name)
        np.testing.assert_array_equal(ref(x)[1], new(x)[1], err_msg=name)


def test_max_pool_check_grads_float64():
    with jax.enable_x64(True):
        x = _normal(5, (2, 6, 5, 3), np.float64)
        check_grads(jax.jit(lambda x: jnp.sin(max_pool(x))), (x,), order=1, modes=["rev"])
