"""A 2x2 max pool whose gradient XLA:CPU computes fast.

:func:`max_pool` is ``nnx.max_pool(x, (2, 2), strides=(2, 2),
padding='SAME')`` with the same gradient (all of it to the first maximum
of each window) but computed with elementwise ops: XLA:CPU's gradient of a
windowed max builds index arrays and scatters, which costs more than both
convolutions of a small CNN together.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


@jax.custom_vjp
def max_pool(x):
    """``nnx.max_pool(x, (2, 2), strides=(2, 2), padding='SAME')`` for NHWC ``x``.

    Example:
      >>> import jax.numpy as jnp
      >>> from train.pool import max_pool
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
