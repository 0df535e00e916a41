"""Moments (mean, variance, count) that are stable, masked and syncable.

This module holds the statistics math for every normalization in jaxbn.

Algorithm: shifted sums. For a per-feature constant ``c`` close to the mean,
``M2 = sum((x - c)^2) - sum(x - c)^2 / n`` loses only the bits of
``(mean - c)^2 / var``, whatever the offset of the data, whereas
``E[x^2] - E[x]^2`` (Flax's default ``use_fast_variance=True``, ``c = 0``)
loses ``log2(1 + mean^2 / var)`` bits and is wrong by more than 1e-3 in
float32 from ``|mean| / std`` of about 100 (``tests/test_moments.py``
measures it). Without a mask, the shift depends on the backend:

- CPU: ``c = 0`` where that is safe. Plain sums are the fastest (both in
  one read of ``x``: ``jaxbn._native``), so they come first; if any
  feature has ``|mean| > 4 std`` (more than ~4 bits lost), a second pass
  redoes the sums about that mean (``lax.cond``: it costs nothing on
  centred data).
- GPU/TPU: ``c`` is the median of three samples of each feature, a few
  standard deviations from the mean unless two of the three are outliers:
  one read of ``x``, as a branch would cost a host round trip there.

Either way the derivative is the exact one (a ``custom_jvp``), not that of
the algorithm. With a mask the first sample may be masked out (and hold
NaN), so ``c`` is the masked mean from a first pass: the corrected two-pass
algorithm, whose ``sum(x - c)`` term also cancels the rounding error of
that first mean. Narrow inputs (bfloat16, float16) are widened inside each
reduction, never as a stored copy (see ``jaxbn._native.separate_reads``).

Cross-device. Each device reduces its own ``(n_i, mean_i, M2_i)``, and
they combine with Chan et al.'s pairwise formula
``M2 = sum(M2_i + n_i * (mean_i - mean)^2)``, which is exact and
count-weighted: devices holding different numbers of valid entries combine
to the global statistics (a ``pmean`` of per-device means does not). Two
per-feature ``psum`` calls compute it: ``n`` and ``sum(n_i * mean_i)``, then the
``M2`` sum about the global mean (see :func:`_pool_across`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from jaxbn._native import shifted_sums, widened


# Plain sums serve features with |mean|^2 <= CONDITION_LIMIT * var.
CONDITION_LIMIT = 16.0


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


def reduce_moments(
    x: jax.Array,
    reduction_axes: tuple[int, ...],
    *,
    mask: jax.Array | None = None,
    axis_name=None,
    axis_index_groups=None,
    narrow=None,
) -> Moments:
  """Moments of ``x`` over ``reduction_axes``; the kept axes stay in order.

  ``mask`` must already have ``x``'s shape. With ``axis_name`` the result
  covers every device of the named axis (or of its group). ``narrow``: when
  ``x`` is a widened narrow array (``x == narrow.astype(stats dtype)``), the
  unmasked sums read ``narrow`` and widen it themselves, while derivatives
  still flow through ``x``; a caller that uses ``x`` elsewhere too then gets
  every part of its gradient summed in the wide dtype. Narrow inputs
  without it are widened here.
  """
  reduction_axes = tuple(reduction_axes)
  kept_shape = tuple(d for i, d in enumerate(x.shape) if i not in reduction_axes)
  if narrow is None:
    x, narrow = widened(x), x
  real = jnp.finfo(x.dtype).dtype
  if mask is None:
    mean, var = _unmasked_moments(x, lax.stop_gradient(narrow), reduction_axes)
    count = jnp.full(kept_shape, _size(x.shape, reduction_axes), real)
    local = Moments(mean=mean, var=var, count=count)
  else:
    count = jnp.sum(mask, axis=reduction_axes, dtype=real)
    masked_sum = jnp.sum(jnp.where(mask, x, 0), axis=reduction_axes, keepdims=True)
    # The variance does not depend on the shift, so it is a constant for
    # differentiation and the gradients stay exact.
    shift = lax.stop_gradient(masked_sum / jnp.maximum(_expand(count, reduction_axes), 1.0))
    centred = jnp.where(mask, x - shift, 0)
    mean, var = _moments_of_sums(jnp.sum(centred, axis=reduction_axes),
                                 jnp.sum(_abs2(centred), axis=reduction_axes),
                                 count, shift.reshape(kept_shape))
    local = Moments(mean=mean, var=var, count=count)
  if axis_name is None:
    return local
  return _pool_across(local, axis_name, axis_index_groups)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _unmasked_moments(x, narrow, reduction_axes):
  """``(mean, biased variance)`` of every entry of ``x``, read from ``narrow``
  (see ``reduce_moments``); the algorithm suits the backend."""
  return lax.platform_dependent(
      narrow, cpu=functools.partial(_checked_fast_moments, reduction_axes=reduction_axes),
      default=functools.partial(_shifted_moments, reduction_axes=reduction_axes))


@_unmasked_moments.defjvp
def _unmasked_moments_jvp(reduction_axes, primals, tangents):
  # The exact derivative, whichever algorithm computed the primal:
  # d mean = mean(dx), d var = 2 mean(Re(conj(x - mean) dx)).
  (x, narrow), (dx, _) = primals, tangents
  mean, var = _unmasked_moments(x, narrow, reduction_axes)
  n = _size(x.shape, reduction_axes)
  centred = x - _expand(mean, reduction_axes)
  dmean = jnp.sum(dx, axis=reduction_axes) / n
  dvar = 2.0 * jnp.sum(jnp.real(jnp.conj(centred) * dx), axis=reduction_axes) / n
  return (mean, var), (dmean, dvar)


def _checked_fast_moments(x, reduction_axes):
  """Plain sums of ``x`` and ``|x|^2``; the shifted sums where they would lose bits.

  ``E[|x|^2] - |E[x]|^2`` loses ``log2(1 + |mean|^2 / var)`` bits, so it is
  kept only when every feature has ``|mean|^2 <= CONDITION_LIMIT * var``
  (at most ~4 bits lost) and a finite variance, and redone otherwise with
  the fast mean as the shift, which loses almost nothing. Plain sums are
  what the CPU computes fastest, and the second pass runs only for badly centred
  data (under ``vmap`` the branch becomes a select, and both run).
  """
  n = _size(x.shape, reduction_axes)
  mean, var = _moments_of_sums(*shifted_sums(x, None, reduction_axes), n, 0.0)
  # One max-reduction (not a compare, then any): fewer tiny kernels on small inputs.
  # A sum of |x|^2 that overflowed (|x| ~ 1e19 in float32) leaves an infinite
  # or NaN variance that the sums about the mean may still get right.
  excess = jnp.where(var < jnp.inf, _abs2(mean) - CONDITION_LIMIT * var, 1.0)
  ill_conditioned = jnp.max(excess) > 0
  recentred = lambda mean: _moments_about(x, _expand(mean, reduction_axes), reduction_axes)
  return lax.cond(ill_conditioned, recentred, lambda mean: (mean, var), mean)


def _shifted_moments(x, reduction_axes):
  """Moments about a median of three samples: one read of ``x``.

  Loses the bits of ``|mean - c|^2 / var``; a few at most unless two of
  the three samples are outliers (one outlier as the shift would cost
  ``log2(|outlier - mean|^2 / var)`` bits).
  """
  x = widened(x)
  return _moments_about(x, _median_of_three(x, reduction_axes), reduction_axes)


def _median_of_three(x, reduction_axes):
  """Per feature, the median of the first three entries along the first
  reduced axis (the first entry where that axis is shorter or of a symbolic
  length, in a shape-polymorphic export); real and imaginary parts apart."""
  if not reduction_axes:
    return x
  axis = min(reduction_axes)
  length = x.shape[axis]
  count = min(3, length) if isinstance(length, int) else 1
  head = _leading_block(x, {a: count if a == axis else 1 for a in reduction_axes})
  if count < 3:
    return lax.slice_in_dim(head, 0, 1, axis=axis)
  a, b, c = (lax.slice_in_dim(head, i, i + 1, axis=axis) for i in range(3))
  median = lambda a, b, c: jnp.maximum(jnp.minimum(a, b), jnp.minimum(jnp.maximum(a, b), c))
  if jnp.iscomplexobj(x):
    return lax.complex(median(a.real, b.real, c.real), median(a.imag, b.imag, c.imag))
  return median(a, b, c)


def _leading_block(x, lengths):
  """``x[:lengths[0], :lengths[1], ...]`` on the axes in ``lengths``.

  A batch sharded over a mesh with explicit axes cannot be sliced to fewer
  rows than devices in its own sharding type, so there the block is taken
  in automatic sharding mode (a few rows travel, not the batch) and comes
  back unsharded along those axes.
  """
  index = tuple(slice(0, lengths[i]) if i in lengths else slice(None) for i in range(x.ndim))
  take = lambda x: x[index]
  sharding = jax.typeof(x).sharding
  spec = getattr(sharding, 'spec', None)
  if spec is None or all(spec[i] is None for i in lengths if i < len(spec)):
    return take(x)
  unsharded = PartitionSpec(*(None if i in lengths else p for i, p in enumerate(spec)))
  return jax.sharding.auto_axes(take, out_sharding=NamedSharding(sharding.mesh, unsharded))(x)


def _moments_about(x, shift, reduction_axes):
  """``(mean, var)`` from the sums of ``x - shift`` and ``|x - shift|^2``, each
  of which reads (and widens) ``x`` itself."""
  s1, s2 = shifted_sums(x, shift, reduction_axes)
  return _moments_of_sums(s1, s2, _size(x.shape, reduction_axes), shift.reshape(s1.shape))


def _moments_of_sums(s1, s2, count, shift):
  """``(mean, biased variance)`` from the sums of ``x - shift`` and ``|x - shift|^2``."""
  safe_count = jnp.maximum(count, 1.0)
  mean = shift + s1 / safe_count
  m2 = jnp.maximum(s2 - _abs2(s1) / safe_count, 0.0)
  return mean, m2 / safe_count


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
  """Global moments over a mapped axis: Chan's formula, pooled by all devices.

  Without groups, two ``psum`` calls on per-feature values: their size does not
  grow with the number of devices, and their results are typed as equal on
  every device, so ``shard_map`` with its default ``check_vma`` can return
  the statistics as replicated (``out_specs=P()``), as with Flax's ``pmean``.
  ``shard_map`` takes no ``axis_index_groups`` in a ``psum``: groups gather
  every device's triple instead (:func:`_gather`) and pool it locally.
  """
  if axis_index_groups is None:
    count, weighted_mean = lax.psum((local.count, local.count * local.mean), axis_name)
    safe = jnp.maximum(count, 1.0)
    mean = weighted_mean / safe
    m2 = lax.psum(local.count * (local.var + _abs2(local.mean - mean)), axis_name)
    return Moments(mean=mean, var=m2 / safe, count=count)
  is_complex = jnp.iscomplexobj(local.mean)
  parts = [local.count, local.mean.real, local.var]
  if is_complex:
    parts.insert(2, local.mean.imag)
  gathered = _gather(jnp.stack(parts), axis_name, axis_index_groups)
  mean = gathered[:, 1] + 1j * gathered[:, 2] if is_complex else gathered[:, 1]
  return pool_moments(Moments(mean=mean, var=gathered[:, -1], count=gathered[:, 0]))


def _gather(local, axis_name, axis_index_groups):
  """``local`` of every device of this device's group, stacked on a new axis 0.

  ``all_gather`` only takes groups of one size. For groups of different
  sizes every device's ``local`` is gathered, and those of the other
  groups' devices are zeros (a count of 0, which pools as nothing).
  """
  if len({len(g) for g in axis_index_groups}) == 1:
    return lax.all_gather(local, axis_name, axis_index_groups=axis_index_groups)
  everyone = lax.all_gather(local, axis_name)
  group_of = jnp.asarray(_group_ids(axis_index_groups, everyone.shape[0], axis_name))
  same = group_of == group_of[lax.axis_index(axis_name)]
  return jnp.where(jnp.expand_dims(same, tuple(range(1, everyone.ndim))), everyone, 0)


def _group_ids(axis_index_groups, size, axis_name) -> np.ndarray:
  """The group of each index of a mapped axis of ``size`` devices."""
  indices = sorted(i for g in axis_index_groups for i in g)
  if indices != list(range(size)):
    raise ValueError(
        f'axis_index_groups={axis_index_groups!r} must split the indices 0 to '
        f'{size - 1} of axis_name={axis_name!r} into groups, each index in one '
        'group.')
  group_of = np.zeros(size, np.int32)
  for k, g in enumerate(axis_index_groups):
    group_of[list(g)] = k
  return group_of


def psum_in_groups(tree, axis_name, axis_index_groups):
  """``lax.psum`` within ``axis_index_groups``, which ``shard_map`` only takes
  in an ``all_gather`` (see :func:`_gather`)."""
  if axis_index_groups is None:
    return lax.psum(tree, axis_name)
  return jax.tree.map(lambda x: jnp.sum(_gather(x, axis_name, axis_index_groups), axis=0), tree)


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
