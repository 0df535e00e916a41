"""Moments (mean, variance, count) that are stable, masked and syncable.

This module holds the statistics math for every normalization in jaxbn.

Algorithm: shifted sums. For a per-feature constant ``c`` close to the mean,
``M2 = sum((x - c)^2) - sum(x - c)^2 / n`` loses only the bits of
``(mean - c)^2 / var``, whatever the offset of the data, whereas
``E[x^2] - E[x]^2`` (Flax's default ``use_fast_variance=True``) loses
``2 * log2(|mean| / std)`` bits and is wrong by more than 1e-3 in float32
from ``|mean| / std`` of about 100 (``tests/test_moments.py`` measures it).
Without a mask ``c`` is the first sample of each feature, a few standard
deviations from the mean at worst, so the statistics need one read of ``x``.
With a mask the first sample may be masked out (and hold NaN), so ``c`` is
the masked mean from a first pass: the corrected two-pass algorithm, whose
``sum(x - c)`` term also cancels the rounding error of that first mean.
Narrow inputs (bfloat16, float16) are widened and centred on ``c`` in one
step (:func:`centre`), and that copy is normalized too.

Cross-device. Each device reduces its own ``(n_i, mean_i, M2_i)``; a single
``all_gather`` of that small per-feature triple lets every device combine
them with Chan et al.'s pairwise formula
``M2 = sum(M2_i + n_i * (mean_i - mean)^2)``, which is exact and
count-weighted: devices holding different numbers of valid entries combine
to the global statistics (a ``pmean`` of per-device means does not).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class Moments(NamedTuple):
  """Statistics over the reduced axes, one entry per kept position.

  Attributes:
    mean: mean of the valid entries (0 where there are none).
    var: biased variance ``mean(|x - mean|^2)`` (real; 0 where no entry).
    count: number of valid entries, float, same shape as ``var``.
  """

  mean: jax.Array
  var: jax.Array
  count: jax.Array


def stats_dtype(dtype) -> jnp.dtype:
  """Accumulation dtype: at least float32 (complex64 for complex inputs)."""
  dtype = jnp.dtype(dtype)
  floor = jnp.complex64 if jnp.issubdtype(dtype, jnp.complexfloating) else jnp.float32
  return jnp.promote_types(dtype, floor)


def reduce_moments(
    x: jax.Array,
    reduction_axes: tuple[int, ...],
    *,
    mask: jax.Array | None = None,
    axis_name=None,
    axis_index_groups=None,
    origin=None,
) -> Moments:
  """Moments of ``x`` over ``reduction_axes``; the kept axes stay in order.

  ``mask`` must already have ``x``'s shape. With ``axis_name`` the result
  covers every device of the named axis (or of its group). ``origin``
  (unmasked only) says ``x`` is already centred, as :func:`centre` returns
  it: the sums need no shift, and the mean has ``origin`` added back.
  """
  kept_shape = tuple(d for i, d in enumerate(x.shape) if i not in reduction_axes)
  x = x.astype(stats_dtype(x.dtype))
  real = jnp.finfo(x.dtype).dtype
  if origin is not None:
    local = _moments_of_sums(jnp.sum(x, axis=reduction_axes),
                             jnp.sum(_abs2(x), axis=reduction_axes),
                             _size(x.shape, reduction_axes), origin)
    return _maybe_pool(local, axis_name, axis_index_groups)
  if mask is None:
    count = jnp.full(kept_shape, _size(x.shape, reduction_axes), real)
    shift = _first_sample(x, reduction_axes)
  else:
    count = jnp.sum(mask, axis=reduction_axes, dtype=real)
    masked_sum = jnp.sum(jnp.where(mask, x, 0), axis=reduction_axes, keepdims=True)
    shift = masked_sum / jnp.maximum(_expand(count, reduction_axes), 1.0)
  # The variance does not depend on the shift, so it is a constant for
  # differentiation and the gradients stay exact.
  shift = lax.stop_gradient(shift)
  if mask is None:
    # Two subtractions XLA cannot merge into one: each then fuses into its
    # own reduction and the centred array is never written to memory.
    s1 = jnp.sum(x - shift, axis=reduction_axes)
    s2 = jnp.sum(_abs2(x - lax.optimization_barrier(shift)), axis=reduction_axes)
  else:
    centred = jnp.where(mask, x - shift, 0)
    s1 = jnp.sum(centred, axis=reduction_axes)
    s2 = jnp.sum(_abs2(centred), axis=reduction_axes)
  local = _moments_of_sums(s1, s2, count, shift.reshape(kept_shape))
  return _maybe_pool(local, axis_name, axis_index_groups)


def centre(x, reduction_axes):
  """``(x - c, c)`` in the statistics dtype, ``c`` the first sample of each feature.

  For inputs narrower than their statistics (bfloat16, float16): the one
  widened copy every reduction needs is then also centred, so it serves the
  moments (``reduce_moments(..., origin=c)``) and the normalization alike
  instead of sitting beside a second, centred copy. The difference of two
  narrow numbers of similar magnitude is exact in the wider dtype. ``c`` is
  constant for differentiation.
  """
  x = x.astype(stats_dtype(x.dtype))
  origin = lax.stop_gradient(_first_sample(x, reduction_axes))
  kept_shape = tuple(d for i, d in enumerate(x.shape) if i not in reduction_axes)
  return x - origin, origin.reshape(kept_shape)


def _moments_of_sums(s1, s2, count, shift) -> Moments:
  """Moments from the sums of ``x - shift`` and of its squares."""
  safe_count = jnp.maximum(count, 1.0)
  mean = shift + s1 / safe_count
  m2 = jnp.maximum(s2 - _abs2(s1) / safe_count, 0.0)
  count = jnp.broadcast_to(jnp.asarray(count, m2.dtype), m2.shape)
  return Moments(mean=mean, var=m2 / safe_count, count=count)


def _maybe_pool(local: Moments, axis_name, axis_index_groups) -> Moments:
  if axis_name is None:
    return local
  return _pool_across(local, axis_name, axis_index_groups)


def pool_moments(stacked: Moments, axis: int = 0) -> Moments:
  """Pools statistics of disjoint sample sets stacked along ``axis``.

  Exact and count-weighted (Chan et al.): ``var = sum(n_i * (var_i +
  |mean_i - mean|^2)) / n``. A set with ``count == 0`` contributes nothing.
  """
  counts = stacked.count
  total = jnp.sum(counts, axis=axis)
  safe = jnp.maximum(total, 1.0)
  mean = jnp.sum(counts * stacked.mean, axis=axis) / safe
  spread = _abs2(stacked.mean - jnp.expand_dims(mean, axis))
  var = jnp.sum(counts * (stacked.var + spread), axis=axis) / safe
  return Moments(mean=mean, var=var, count=total)


def _pool_across(local: Moments, axis_name, axis_index_groups) -> Moments:
  """Global moments over a mapped axis with one collective."""
  is_complex = jnp.iscomplexobj(local.mean)
  parts = [local.count, local.mean.real, local.var]
  if is_complex:
    parts.insert(2, local.mean.imag)
  gathered = lax.all_gather(
      jnp.stack(parts), axis_name, axis_index_groups=axis_index_groups)
  mean = gathered[:, 1] + 1j * gathered[:, 2] if is_complex else gathered[:, 1]
  return pool_moments(Moments(mean=mean, var=gathered[:, -1], count=gathered[:, 0]))


def _first_sample(x, reduction_axes):
  index = tuple(slice(0, 1) if i in reduction_axes else slice(None)
                for i in range(x.ndim))
  return x[index]


def _expand(v, reduction_axes):
  """Re-inserts the reduced axes as size-1 dims so ``v`` broadcasts."""
  return jnp.expand_dims(v, reduction_axes)


def _abs2(z):
  if jnp.iscomplexobj(z):
    return lax.square(z.real) + lax.square(z.imag)
  return lax.square(z)


def _size(shape, axes) -> int:
  n = 1
  for a in axes:
    n *= shape[a]
  return n
