"""Drop-in ``nnx.Conv`` and 2x2 max pool with faster gradients on CPU.

XLA:CPU lowers a convolution's kernel gradient to another convolution whose
window spans the whole image and whose "batch" is the input channels, a
shape its convolution kernels handle poorly. :class:`Conv` keeps Flax's
forward pass (the very same ``lax.conv_general_dilated`` call, so outputs
are bit-identical) and, on CPU, computes the kernel gradient as a matmul of
im2col patches with the output cotangent; other platforms keep XLA's own
kernel gradient (cuDNN's on GPU), chosen when the program is lowered. One
exception on CPU: with a single input channel (grey-scale images) the
forward pass is a matmul of the patches too, since XLA:CPU's convolution
handles that shape poorly (1.4x slower on the CNN's first layer, ~5% of its
train step); its outputs then differ from Flax's by rounding. The
batch is processed in chunks inside a ``lax.scan``: the patch buffer is
then small, stays in cache, and is reused across chunks instead of being a
fresh multi-megabyte allocation whose pages are faulted in on every step.
The input gradient is XLA's own transposed convolution, which is already
fast.

:func:`max_pool` is ``nnx.max_pool(x, (2, 2), strides=(2, 2),
padding='SAME')`` with the same gradient (all of it to the first maximum
of each window) but computed with elementwise ops: XLA:CPU's gradient of a
windowed max builds index arrays and scatters, which costs more than both
convolutions of a small CNN together.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from flax.nnx.nn.linear import canonicalize_padding, default_bias_init, default_kernel_init
from flax.typing import Dtype, Initializer
from jax import lax

# Patch bytes per chunk of the batch. On the CNN's layers, with python -m
# train's malloc settings: conv2 (225 KiB of patches per image) took the same
# time in chunks of 4 to 16 images and 6-8% longer in one of 128; conv1 (28
# KiB per image) took 2.5 ms in one chunk of 128 (3.4 MiB) against 4.7 ms in
# chunks of 37 (1 MiB): each chunk costs a few XLA ops, whose launches add up.
# With this size both run 2.5-2.7x faster than XLA's own kernel gradient.
PATCH_CHUNK_BYTES = 4 << 20


class Conv(nnx.Module):
    """``flax.nnx.Conv`` for channels-last inputs, with an im2col kernel gradient.

    Same arguments (the subset below), parameters (``kernel`` with shape
    ``kernel_size + (in_features, out_features)``, ``bias``), initializers
    and random-key use as ``flax.nnx.Conv``, so a model built from the same
    seed has the same parameters. Inputs have one batch axis:
    ``(batch, *spatial, features)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from train.conv import Conv
      >>> conv = Conv(3, 8, (3, 3), padding='SAME', rngs=nnx.Rngs(0))
      >>> conv(jnp.ones((2, 5, 5, 3))).shape
      (2, 5, 5, 8)
    """

    def __init__(self, in_features: int, out_features: int,
                 kernel_size: int | Sequence[int], strides: int | Sequence[int] = 1, *,
                 padding='SAME', use_bias: bool = True, dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32,
                 kernel_init: Initializer = default_kernel_init,
                 bias_init: Initializer = default_bias_init, rngs: nnx.Rngs):
        kernel_size = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
        padding = canonicalize_padding(padding, len(kernel_size))
        if isinstance(padding, str) and padding not in ("SAME", "VALID"):
            raise ValueError(
                f"padding {padding!r} is not supported by train.conv.Conv; use 'SAME', "
                f"'VALID' or explicit (low, high) pairs, or flax.nnx.Conv")
        # Keys are drawn in flax.nnx.Conv's order: kernel, then bias.
        self.kernel = nnx.Param(kernel_init(
            rngs.params(), kernel_size + (in_features, out_features), param_dtype))
        if use_bias:
            self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
        else:
            self.bias = nnx.data(None)
        self.kernel_size = kernel_size
        self.strides = (strides,) * len(kernel_size) if isinstance(strides, int) else tuple(strides)
        self.padding = padding
        self.dtype = dtype

    def __call__(self, x):
        rank = len(self.kernel_size)
        if x.ndim != rank + 2:
            raise ValueError(
                f"train.conv.Conv expects inputs (batch, {rank} spatial axes, features), got "
                f"shape {x.shape}; reshape to one batch axis")
        bias = None if self.bias is None else self.bias[...]
        x, kernel, bias = dtypes.promote_dtype((x, self.kernel[...], bias), dtype=self.dtype)
        y = conv(x, kernel, self.strides, self.padding)
        return y if bias is None else y + bias


def conv(x, kernel, strides: Sequence[int], padding):
    """Channels-last convolution (``x``: N...C, ``kernel``: ...IO), im2col kernel gradient."""
    pads = explicit_pads(x.shape[1:-1], kernel.shape[:-2], strides, padding)
    return _conv(x, kernel, tuple(strides), pads)


def explicit_pads(spatial, window, strides, padding) -> tuple[tuple[int, int], ...]:
    """``padding`` ('SAME', 'VALID' or (low, high) pairs) as (low, high) pairs."""
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(spatial, window, strides, padding)
    return tuple(tuple(p) for p in padding)


def _dimension_numbers(ndim):
    spatial = "".join("DHW"[-(ndim - 2):])
    return lax.conv_dimension_numbers(
        (1,) * ndim, (1,) * ndim, (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))


def _forward(x, kernel, strides, pads):
    return lax.conv_general_dilated(x, kernel, strides, pads,
                                    dimension_numbers=_dimension_numbers(x.ndim))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, strides, pads):
    return _primal(x, kernel, strides, pads)


def _conv_fwd(x, kernel, strides, pads):
    return _primal(x, kernel, strides, pads), (x, kernel)


def _primal(x, kernel, strides, pads):
    if x.shape[-1] != 1:
        return _forward(x, kernel, strides, pads)
    return lax.platform_dependent(
        x, kernel, cpu=lambda x, k: _patch_forward(x, k, strides, pads),
        default=lambda x, k: _forward(x, k, strides, pads))


def _patch_forward(x, kernel, strides, pads):
    """The convolution as im2col patches @ kernel."""
    window, cout = kernel.shape[:-2], kernel.shape[-1]
    out_spatial = tuple((size + lo + hi - k) // s + 1 for size, (lo, hi), k, s
                        in zip(x.shape[1:-1], pads, window, strides))
    patches = _patches(x, window, strides, pads, out_spatial)
    y = lax.dot_general(patches, kernel.reshape(-1, cout), (((1,), (0,)), ((), ())),
                        preferred_element_type=jnp.promote_types(x.dtype, jnp.float32))
    return y.astype(x.dtype).reshape(x.shape[:1] + out_spatial + (cout,))


def _conv_bwd(strides, pads, residuals, dy):
    x, kernel = residuals
    # The convolution is linear in x: its transpose is XLA's input gradient.
    (dx,) = jax.linear_transpose(lambda x: _forward(x, kernel, strides, pads), x)(dy)
    dk = lax.platform_dependent(
        x, dy, cpu=lambda x, dy: kernel_grad(x, dy, kernel.shape[:-2], strides, pads),
        default=lambda x, dy: xla_kernel_grad(x, dy, kernel, strides, pads))
    return dx, dk.astype(kernel.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def xla_kernel_grad(x, dy, kernel, strides, pads):
    """XLA's own kernel gradient (the transpose of the convolution in the kernel)."""
    (dk,) = jax.linear_transpose(lambda k: _forward(x, k, strides, pads), kernel)(dy)
    return dk.astype(jnp.promote_types(dk.dtype, jnp.float32))


def kernel_grad(x, dy, window, strides, pads, chunk: int | None = None):
    """``d sum(conv(x, k) * dy) / dk`` as im2col patches^T @ dy, ``chunk`` examples at a time."""
    n, cin, cout = x.shape[0], x.shape[-1], dy.shape[-1]
    if chunk is None:
        chunk = _chunk_size(x.dtype.itemsize * math.prod(dy.shape[1:-1]) * math.prod(window) * cin, n)
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    steps = n // chunk
    split = steps * chunk

    def body(acc, xs):
        return acc + _patch_product(*xs, window, strides, pads, acc_dtype), None

    acc = jnp.zeros((math.prod(window) * cin, cout), acc_dtype)
    if steps:
        chunks = (x[:split].reshape((steps, chunk) + x.shape[1:]),
                  dy[:split].reshape((steps, chunk) + dy.shape[1:]))
        acc, _ = lax.scan(body, acc, chunks)
    if split < n:
        acc = acc + _patch_product(x[split:], dy[split:], window, strides, pads, acc_dtype)
    return acc.reshape(tuple(window) + (cin, cout))


def _chunk_size(bytes_per_example: int, n: int) -> int:
    """Examples per chunk: at most PATCH_CHUNK_BYTES of patches, a divisor of ``n`` if one is close.

    With a divisor the batch reshapes into chunks for free; otherwise the
    chunked part is a copy of x and dy (2.7 ms of the CNN's 50 ms step).
    """
    most = max(1, min(n, PATCH_CHUNK_BYTES // max(1, bytes_per_example)))
    divisor = max(d for d in range(1, most + 1) if n % d == 0)
    return divisor if 2 * divisor >= most else most


def _patch_product(x, dy, window, strides, pads, acc_dtype):
    patches = _patches(x, window, strides, pads, dy.shape[1:-1])
    return lax.dot_general(patches, dy.reshape(-1, dy.shape[-1]), (((0,), (0,)), ((), ())),
                           preferred_element_type=acc_dtype)


def _patches(x, window, strides, pads, out_spatial):
    """im2col: rows are output positions, columns (window offset, channel), HWIO order."""
    zero = jnp.zeros((), x.dtype)
    xp = lax.pad(x, zero, ((0, 0, 0),) + tuple((lo, hi, 0) for lo, hi in pads) + ((0, 0, 0),))
    n, cin = x.shape[0], x.shape[-1]
    columns = []
    for offset in itertools.product(*(range(k) for k in window)):
        start = (0,) + offset + (0,)
        limit = (n,) + tuple(o + s * (m - 1) + 1 for o, s, m in zip(offset, strides, out_spatial)) + (cin,)
        columns.append(lax.slice(xp, start, limit, (1,) + tuple(strides) + (1,)))
    return jnp.concatenate(columns, axis=-1).reshape(-1, math.prod(window) * cin)


@jax.custom_vjp
def max_pool(x):
    """``nnx.max_pool(x, (2, 2), strides=(2, 2), padding='SAME')`` for NHWC ``x``.

    Example:
      >>> import jax.numpy as jnp
      >>> from train.conv import max_pool
      >>> max_pool(jnp.arange(16.0).reshape(1, 4, 4, 1))[0, :, :, 0]
      Array([[ 5.,  7.],
             [13., 15.]], dtype=float32)
    """
    return jnp.max(_windows(x), axis=(2, 4))


def _windows(x):
    """(N, H, W, C) -> (N, H/2, 2, W/2, 2, C), odd sizes padded at the end like 'SAME'."""
    n, h, w, c = x.shape
    low = jnp.array(-jnp.inf, x.dtype)
    x = lax.pad(x, low, ((0, 0, 0), (0, h % 2, 0), (0, w % 2, 0), (0, 0, 0)))
    return x.reshape(n, x.shape[1] // 2, 2, x.shape[2] // 2, 2, c)


def _max_pool_fwd(x):
    y = max_pool(x)
    return y, (x, y)


def _max_pool_bwd(residuals, g):
    x, y = residuals
    hit = _windows(x) == y[:, :, None, :, None, :]
    h00, h01 = hit[:, :, 0, :, 0], hit[:, :, 0, :, 1]
    h10, h11 = hit[:, :, 1, :, 0], hit[:, :, 1, :, 1]
    # All of the gradient goes to the first maximum of each window in
    # row-major order, as with XLA's select-and-scatter.
    first = jnp.stack([
        jnp.stack([h00, h01 & ~h00], axis=3),
        jnp.stack([h10 & ~(h00 | h01), h11 & ~(h00 | h01 | h10)], axis=3),
    ], axis=2)
    dx = jnp.where(first, g[:, :, None, :, None, :], jnp.zeros((), g.dtype))
    n, h, w, c = x.shape
    return (dx.reshape(n, dx.shape[1] * 2, dx.shape[3] * 2, c)[:, :h, :w, :],)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
