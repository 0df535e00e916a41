"""Running-statistics state, threaded explicitly through every call."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxbn import _checks


class BatchNormState(NamedTuple):
  """Running statistics of a batch-norm layer.

  A plain pytree: it passes through ``jit``, ``grad``, ``vmap``, ``scan``,
  ``shard_map`` and checkpointing libraries unchanged.

  Attributes:
    mean: running mean, one entry per feature.
    var: running variance (real even for complex inputs), one per feature.
    count: number of training updates applied so far (PyTorch's
      ``num_batches_tracked``); drives the cumulative average when
      ``momentum=None``.
  """

  mean: jax.Array
  var: jax.Array
  count: jax.Array


def init_state(num_features, dtype=jnp.float32) -> BatchNormState:
  """Returns the initial state: zero mean, unit variance, zero count.

  Args:
    num_features: number of features ``C``, or a tuple for several feature
      axes (``axis=(1, 2)`` with ``x.shape[1:3] == (4, 5)`` needs ``(4, 5)``).
    dtype: dtype of the statistics. Keep float32 (or wider) even for
      low-precision models; a complex dtype keeps a complex mean and a real
      variance.

  Example:
    >>> import jaxbn
    >>> jaxbn.init_state(3).var
    Array([1., 1., 1.], dtype=float32)
  """
  shape = _checks.feature_shape_arg(num_features)
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.inexact):
    raise TypeError(
        f'init_state needs a floating dtype for the statistics, got {dtype}; '
        'use dtype=jnp.float32.')
  real_dtype = jnp.finfo(dtype).dtype
  return BatchNormState(
      mean=jnp.zeros(shape, dtype),
      var=jnp.ones(shape, real_dtype),
      count=jnp.zeros((), jnp.int32),
  )
