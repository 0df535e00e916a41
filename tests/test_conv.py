"""train.conv: Conv and max_pool against flax.nnx.Conv and nnx.max_pool."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from train import conv as conv_module
from train.conv import Conv, conv, explicit_pads, kernel_grad, max_pool, xla_kernel_grad

# (input shape, out features, kernel size, strides, padding): the CNN's and
# ResNet's layers (3x3 'SAME' on one channel and more, stride 1 and 2, 1x1
# projections), plus VALID, explicit and asymmetric padding, a non-square
# kernel and a 1-D conv.
CASES = [
    ((4, 9, 9, 1), 5, (3, 3), 1, "SAME"),
    ((4, 9, 9, 1), 5, (3, 3), 2, "VALID"),
    ((4, 9, 9, 3), 5, (3, 3), 1, "SAME"),
    ((4, 9, 9, 3), 5, (3, 3), 2, "SAME"),
    ((3, 8, 7, 2), 4, (1, 1), 2, "SAME"),
    ((3, 8, 7, 2), 4, (3, 2), 1, "VALID"),
    ((3, 8, 7, 2), 4, (3, 3), (2, 1), ((2, 0), (1, 1))),
    ((5, 11, 3), 4, (3,), 1, "SAME"),
]


def _normal(seed, shape, dtype=np.float32):
    # NumPy draws: jax.random would compile a program for every shape.
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _pair(shape, cout, kernel_size, strides, padding, use_bias=True, seed=0):
    kwargs = dict(strides=strides, padding=padding, use_bias=use_bias)
    ref = nnx.Conv(shape[-1], cout, kernel_size, rngs=nnx.Rngs(seed), **kwargs)
    new = Conv(shape[-1], cout, kernel_size, rngs=nnx.Rngs(seed), **kwargs)
    return ref, new


def _loss(model, x, g):
    return jnp.sum(model(x) * g)


# Jitted: one compilation per test instead of one per eager op.
_grads = nnx.jit(nnx.grad(_loss, argnums=(0, 1)))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("use_bias", [True, False])
def test_same_parameters_and_outputs_as_flax(case, use_bias):
    ref, new = _pair(*case, use_bias=use_bias)
    assert jax.tree.map(jnp.shape, nnx.state(ref, nnx.Param)) == \
        jax.tree.map(jnp.shape, nnx.state(new, nnx.Param))
    np.testing.assert_array_equal(ref.kernel[...], new.kernel[...])
    if use_bias:
        np.testing.assert_array_equal(ref.bias[...], new.bias[...])
    else:
        assert new.bias is None
    x = _normal(1, case[0])
    if case[0][-1] > 1:
        # The forward pass is the same lax call: bit-identical.
        np.testing.assert_array_equal(ref(x), new(x))
        return
    # One input channel: a matmul of patches on CPU, which sums the same
    # window products in another order. Against the float64 convolution
    # with the rounding bound of a float32 sum of n terms, n * eps * sum|terms|.
    exact, magnitude = _exact_output(ref, x)
    n = math.prod(case[2])
    bound = n * np.finfo(np.float32).eps * magnitude
    assert np.all(np.abs(np.asarray(new(x), np.float64) - exact) <= bound)


def _exact_output(layer, x):
    """``layer(x)`` in float64, and the same with |x| and |kernel| (sum of |terms|)."""
    kernel = np.asarray(layer.kernel[...], np.float64)
    bias = None if layer.bias is None else np.asarray(layer.bias[...], np.float64)
    with jax.enable_x64(True):
        f64 = nnx.Conv(x.shape[-1], kernel.shape[-1], layer.kernel_size, strides=layer.strides,
                       padding=layer.padding, use_bias=False, param_dtype=jnp.float64,
                       rngs=nnx.Rngs(0))
        f64.kernel[...] = jnp.asarray(kernel)
        exact = np.asarray(f64(jnp.asarray(x, jnp.float64)))
        f64.kernel[...] = jnp.asarray(np.abs(kernel))
        magnitude = np.asarray(f64(jnp.asarray(np.abs(x), jnp.float64)))
    if bias is not None:
        exact, magnitude = exact + bias, magnitude + np.abs(bias)
    return exact, magnitude


@pytest.mark.parametrize("case", CASES)
def test_gradients_match_flax(case):
    ref, new = _pair(*case)
    x = _normal(1, case[0])
    g = _normal(2, ref(x).shape)
    ref_grads, ref_dx = _grads(ref, x, g)
    new_grads, new_dx = _grads(new, x, g)
    # Input and bias gradients come from the same XLA ops as Flax's: identical.
    np.testing.assert_array_equal(ref_dx, new_dx)
    np.testing.assert_array_equal(ref_grads.bias[...], new_grads.bias[...])
    # The kernel gradient sums the same products in another order. Rounding
    # a float32 sum of n terms errs by at most about n * eps * sum|terms|
    # (sequential summation; blocked sums do better); check against the
    # exact (float64) sum with that bound, and that the error is of the same
    # size as Flax's own.
    exact, magnitude, n = _exact_kernel_grad(x, g, case)
    eps = np.finfo(np.float32).eps
    new_err = np.abs(np.asarray(new_grads.kernel[...], np.float64) - exact)
    ref_err = np.abs(np.asarray(ref_grads.kernel[...], np.float64) - exact)
    assert np.all(new_err <= n * eps * magnitude)
    assert new_err.max() <= 4 * ref_err.max() + 4 * eps * magnitude.max()


def _exact_kernel_grad(x, g, case):
    """Float64 kernel gradient, the same with |x| and |g| (sum of |terms|), and terms per entry."""
    shape, cout, kernel_size, strides, padding = case
    x64, g64 = np.asarray(x, np.float64), np.asarray(g, np.float64)
    with jax.enable_x64(True):
        # The kernel gradient does not depend on the kernel: zeros need no RNG.
        ref = nnx.Conv(shape[-1], cout, kernel_size, strides=strides, padding=padding,
                       param_dtype=jnp.float64, kernel_init=nnx.initializers.zeros,
                       rngs=nnx.Rngs(0))
        grad = nnx.jit(nnx.grad(_loss))
        exact = grad(ref, jnp.asarray(x64), jnp.asarray(g64)).kernel[...]
        magnitude = grad(ref, jnp.asarray(np.abs(x64)), jnp.asarray(np.abs(g64))).kernel[...]
    n = math.prod(g.shape[:-1])
    return np.asarray(exact), np.asarray(magnitude), n


@pytest.mark.parametrize("case,order", [(case, 1) for case in CASES] + [(CASES[1], 2)])
def test_check_grads_float64_reverse_mode(case, order):
    shape, cout, kernel_size, strides, padding = case
    with jax.enable_x64(True):
        x = _normal(1, shape, np.float64)
        kernel = _normal(2, kernel_size + (shape[-1], cout), np.float64)
        strides = (strides,) * len(kernel_size) if isinstance(strides, int) else strides
        f = jax.jit(lambda x, k: jnp.sin(conv(x, k, strides, padding)))
        check_grads(f, (x, kernel), order=order, modes=["rev"])


@pytest.mark.parametrize("chunk", [1, 3, 4, 7, 100])
def test_kernel_grad_chunking_is_exact(chunk):
    # Chunks that do not divide the batch leave a remainder handled apart.
    x, dy = _normal(1, (7, 6, 5, 3)), _normal(2, (7, 6, 5, 4))
    pads = ((1, 1), (1, 1))
    whole = jax.jit(kernel_grad, static_argnums=(2, 3, 4, 5))(x, dy, (3, 3), (1, 1), pads, 7)
    chunked = jax.jit(kernel_grad, static_argnums=(2, 3, 4, 5))(x, dy, (3, 3), (1, 1), pads, chunk)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,bytes_per_example,expected", [
    (128, conv_module.PATCH_CHUNK_BYTES // 18, 16),  # 16 divides 128: a free reshape
    (127, conv_module.PATCH_CHUNK_BYTES // 18, 18),  # prime: no divisor near 18
    (128, 1, 128),  # the whole batch fits
    (5, 2 * conv_module.PATCH_CHUNK_BYTES, 1),  # one example is over budget
])
def test_chunk_size_prefers_a_nearby_divisor_of_the_batch(n, bytes_per_example, expected):
    assert conv_module._chunk_size(bytes_per_example, n) == expected


@pytest.mark.parametrize("case", CASES)
def test_both_kernel_gradients_are_within_the_rounding_bound(case):
    # CPU uses kernel_grad (im2col), other platforms xla_kernel_grad; both
    # against the float64 sum with the bound of test_gradients_match_flax.
    shape, cout, kernel_size, strides, padding = case
    x = _normal(1, shape)
    kernel = _normal(2, kernel_size + (shape[-1], cout))
    strides = (strides,) * len(kernel_size) if isinstance(strides, int) else tuple(strides)
    pads = explicit_pads(shape[1:-1], kernel_size, strides, padding)
    g = _normal(3, conv(x, kernel, strides, padding).shape)
    exact, magnitude, n = _exact_kernel_grad(x, g, case)
    bound = n * np.finfo(np.float32).eps * magnitude
    im2col = jax.jit(kernel_grad, static_argnums=(2, 3, 4))(x, g, kernel_size, strides, pads)
    xla = jax.jit(xla_kernel_grad, static_argnums=(3, 4))(x, g, kernel, strides, pads)
    for name, dk in (("im2col", im2col), ("xla", xla)):
        assert dk.dtype == jnp.float32, name
        assert np.all(np.abs(np.asarray(dk, np.float64) - exact) <= bound), name


def _lowered_ops(platforms, channels=3):
    """Convolutions and dot products in the gradient program lowered for ``platforms``."""
    x, kernel = jnp.ones((4, 9, 9, channels)), jnp.ones((3, 3, channels, 5))
    grad = jax.jit(jax.grad(lambda x, k: jnp.sum(conv(x, k, (1, 1), "SAME") ** 2),
                            argnums=(0, 1)))
    text = jax.export.export(grad, platforms=platforms)(x, kernel).mlir_module()
    return text.count("stablehlo.convolution"), text.count("stablehlo.dot_general")


def test_kernel_gradient_path_is_chosen_per_platform():
    # CPU: forward and input gradient are convolutions, the kernel gradient a
    # matmul; GPU and TPU: all three are XLA's convolutions (cuDNN's kernels).
    assert _lowered_ops(("cpu",)) == (2, 1)
    assert _lowered_ops(("cuda",)) == (3, 0)
    assert _lowered_ops(("tpu",)) == (3, 0)
    # One input channel: on CPU the forward pass is a matmul as well.
    assert _lowered_ops(("cpu",), channels=1) == (1, 2)
    assert _lowered_ops(("cuda",), channels=1) == (3, 0)


def test_bfloat16_inputs():
    ref, new = _pair((4, 8, 8, 3), 5, (3, 3), 1, "SAME")
    x = jnp.asarray(_normal(1, (4, 8, 8, 3)), jnp.bfloat16)
    g = jnp.asarray(_normal(2, (4, 8, 8, 5)), jnp.bfloat16)
    np.testing.assert_array_equal(ref(x), new(x))
    ref_grads, _ = _grads(ref, x, g)
    new_grads, _ = _grads(new, x, g)
    assert new_grads.kernel[...].dtype == jnp.float32
    np.testing.assert_allclose(new_grads.kernel[...], ref_grads.kernel[...], rtol=2e-2, atol=2e-1)


def test_bfloat16_single_channel_forward_rounds_once():
    # The patch matmul accumulates in float32 and rounds the sum to bfloat16
    # once: within bfloat16's unit roundoff (2^-8 relative, half an ulp) of
    # the exact sum, plus the float32 summation bound.
    layer = Conv(1, 5, (3, 3), padding="SAME", use_bias=False, param_dtype=jnp.bfloat16,
                 rngs=nnx.Rngs(0))
    x = jnp.asarray(_normal(1, (4, 8, 8, 1)), jnp.bfloat16)
    y = layer(x)
    assert y.dtype == jnp.bfloat16
    exact, magnitude = _exact_output(layer, np.asarray(x, np.float32))
    bound = 2.0 ** -8 * np.abs(exact) + 9 * np.finfo(np.float32).eps * magnitude
    assert np.all(np.abs(np.asarray(y, np.float64) - exact) <= bound)


def test_works_under_jit_in_a_model():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = Conv(1, 4, (3, 3), rngs=rngs)
            self.norm = nnx.BatchNorm(4, rngs=rngs)

        def __call__(self, x):
            return jax.nn.relu(self.norm(self.conv(x))).mean()

    model = Net(nnx.Rngs(0))
    grads = nnx.jit(nnx.grad(lambda m, x: m(x)))(model, jnp.ones((2, 6, 6, 1)))
    assert grads.conv.kernel[...].shape == (3, 3, 1, 4)
    assert np.all(np.isfinite(grads.conv.kernel[...]))


def test_rejects_unsupported_padding_and_shapes():
    with pytest.raises(ValueError, match="not supported by train.conv.Conv"):
        Conv(1, 2, (3, 3), padding="CIRCULAR", rngs=nnx.Rngs(0))
    layer = Conv(1, 2, (3, 3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="one batch axis"):
        layer(jnp.ones((2, 3, 5, 5, 1)))


# --------------------------------------------------------------------------
# max_pool


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
