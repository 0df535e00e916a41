"""Functional batch norm: ``batch_norm`` and the pieces it is made of."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxbn import _checks
from jaxbn._moments import Moments, psum_in_groups, reduce_moments
from jaxbn._native import centred_affine, separate_reads, stats_dtype
from jaxbn._state import BatchNormState


def moments(x, axis=-1, *, mask=None, axis_name=None, axis_index_groups=None) -> Moments:
  """Per-feature batch statistics of ``x``: mean, biased variance and count.

  Everything but ``axis`` is reduced. Accumulates in float32 or wider with a
  numerically stable algorithm (see ``jaxbn._moments``), skips masked-out
  entries (they may hold NaN), and with ``axis_name`` pools the statistics of
  all devices exactly, weighted by their counts.

  Example:
    >>> import jax.numpy as jnp, jaxbn
    >>> m = jaxbn.moments(jnp.array([[1.0, 10.0], [3.0, 30.0]]))
    >>> m.mean, m.var
    (Array([ 2., 20.], dtype=float32), Array([  1., 100.], dtype=float32))
  """
  x = _checks.float_array(x)
  feature_axes = _checks.canonical_axes(axis, x.ndim)
  _checks.axis_groups(axis_name, axis_index_groups)
  if mask is not None:
    mask = _checks.mask_for(mask, x.shape)
  return reduce_moments(
      x, _checks.complement_axes(feature_axes, x.ndim), mask=mask,
      axis_name=axis_name, axis_index_groups=axis_index_groups)


def normalize(x, mean, var, scale=None, bias=None, *, axis=-1, epsilon=1e-5, dtype=None):
  """``(x - mean) * scale / sqrt(var + epsilon) + bias`` along feature ``axis``.

  ``mean``, ``var``, ``scale`` and ``bias`` have one entry per feature. The
  arithmetic runs in float32 or wider (the promoted dtype of ``x`` and the
  per-feature arrays, each widened first: bfloat16 ones too), and the result
  is rounded once to ``dtype`` (default: ``x.dtype``). ``x - mean`` is formed
  before scaling so a large mean does not cancel.
  """
  x = _checks.float_array(x)
  feature_axes = _checks.canonical_axes(axis, x.ndim)
  feature_shape = tuple(x.shape[a] for a in feature_axes)
  for name, value in (('mean', mean), ('var', var)):
    if value is None:
      raise TypeError(f'normalize needs the {name} to normalize with, got None; pass '
                      f'e.g. state.{name} or jaxbn.moments(x, axis).{name}.')
  for name, value in (('mean', mean), ('var', var), ('scale', scale), ('bias', bias)):
    _checks.param_matches(value, name, feature_shape)
  _checks.epsilon(epsilon)
  return normalize_checked(x, mean, var, scale, bias, feature_axes, epsilon, dtype or x.dtype)


def normalize_checked(x, mean, var, scale, bias, feature_axes, epsilon, dtype, narrow=None):
  """``normalize`` on checked arguments (``feature_axes`` canonical).

  ``narrow``: as in ``reduce_moments``, ``x`` before widening; the backward
  pass's reduction over ``x - mean`` reads it instead of ``x``.
  """
  shape = _broadcast_shape(x.shape, feature_axes)
  # Widened: narrow statistics (Flax NNX promotes them to a bfloat16 dtype)
  # would otherwise make XLA:CPU round after every operation, which is both
  # less accurate and, emulated, twice as slow as float32.
  per_feature = [None if v is None else jnp.reshape(v, shape).astype(stats_dtype(v.dtype))
                 for v in (mean, var, scale, bias)]
  # In the variance's dtype: an int epsilon would have no tangent to add.
  epsilon = jnp.asarray(epsilon, per_feature[1].dtype)
  return _affine_normalize(x, x if narrow is None else narrow, *per_feature, epsilon,
                           jnp.dtype(dtype))


@functools.partial(jax.custom_jvp, nondiff_argnums=(7,))
def _affine_normalize(x, reads, mean, var, scale, bias, epsilon, dtype):
  """``normalize`` on per-feature arrays already shaped to broadcast against ``x``.

  ``reads`` holds ``x``'s values, maybe in a narrower dtype: the derivative
  rule's ``x - mean`` term is formed from it, so the backward pass keeps
  (and, rematerializing, reads) the narrow array, and higher derivatives
  of that term flow through it. ``epsilon`` is an operand, not a static
  argument: it may be traced (a jit argument), and then it has a derivative.
  """
  y = (x - mean) * _multiplier(var, scale, epsilon)
  return (y if bias is None else y + bias).astype(dtype)


def _multiplier(var, scale, epsilon):
  inv = lax.rsqrt(var + epsilon)
  return inv if scale is None else inv * scale


@_affine_normalize.defjvp
def _affine_normalize_jvp(dtype, primals, tangents):
  # The derivative autodiff would give, arranged so that its transpose
  # (the backward pass) reduces the cotangent once per per-feature input:
  # the per-feature tangents are combined before they are broadcast, so
  # XLA never materializes a full-size ``cotangent * multiplier`` just to
  # sum it (one array pass fewer than autodiff of the forward).
  x, reads, mean, var, scale, bias, epsilon = primals
  dx, _, dmean, dvar, dscale, dbias, depsilon = tangents
  inv = lax.rsqrt(var + epsilon)
  mul = _multiplier(var, scale, epsilon)
  y = (x - mean) * mul
  dmul = -0.5 * inv * inv * (dvar + depsilon) * mul  # d rsqrt(var + eps) * scale
  if scale is not None:
    dmul = dmul + inv * dscale
  offset = -dmean * mul
  if bias is not None:
    y = y + bias
    offset = offset + dbias
  tangent = lax.platform_dependent(dx, reads, mean, mul, dmul, offset,
                                   cpu=functools.partial(_tangent_on_cpu, dtype=dtype),
                                   default=functools.partial(_tangent, dtype=dtype))
  return y.astype(dtype), tangent


def _tangent(dx, reads, mean, mul, dmul, offset, *, dtype):
  # Rematerialized, so the backward pass keeps x (which it reads anyway), not
  # a full-size centred copy.
  product = jax.checkpoint(lambda x, mean, dmul: (x - mean) * dmul, prevent_cse=False)
  return (dx * mul + product(reads, mean, dmul) + offset).astype(dtype)


def _tangent_on_cpu(dx, reads, mean, mul, dmul, offset, *, dtype):
  # The transpose of ``centred_affine`` makes the backward pass's two
  # reductions, ``sum(cotangent * (x - mean))`` and ``sum(cotangent)``, in one
  # read (see jaxbn._native), from the cotangent as it comes (in ``dtype``):
  # each part is rounded to ``dtype`` on its own, ~1 ulp more.
  reads = separate_reads(reads, 1)[0]
  return (dx * mul).astype(dtype) + centred_affine(reads, mean, dmul, offset, dtype)


def update_state(state: BatchNormState, batch: Moments, *, momentum=0.99,
                 running_var='biased') -> BatchNormState:
  """Folds one batch's moments into the running statistics.

  ``momentum`` follows Flax/Keras: ``new = momentum * old + (1 - momentum) *
  batch``; PyTorch's ``momentum=0.1`` is ``momentum=0.9`` here. ``None`` is a
  cumulative average over all updates (PyTorch's ``momentum=None``).
  ``running_var='unbiased'`` stores ``var * n / (n - 1)`` as PyTorch does.
  A feature whose batch had no valid entry keeps its running values.
  The new state keeps ``state``'s dtypes, so it threads through
  ``lax.scan``, except that a real mean turns complex for a complex batch.
  """
  _checks.momentum(momentum)
  _checks.running_var(running_var)
  _checks.state_type(state)
  _checks.state_floating(state)
  _checks.moments_match(batch, state)
  count = jnp.asarray(state.count)
  var = _running_variance(batch, running_var)
  if momentum is None:
    keep = 1.0 - 1.0 / (count + 1).astype(state.var.dtype)
  else:
    keep = momentum
  has_data = batch.count > 0
  mean = jnp.where(has_data, _ema(state.mean, batch.mean, keep), state.mean)
  var = jnp.where(has_data, _ema(state.var, var, keep), state.var)
  mean_dtype = jnp.result_type(state.mean)
  if jnp.iscomplexobj(batch.mean) and not jnp.iscomplexobj(state.mean):
    mean_dtype = jnp.result_type(state.mean, batch.mean)
  return BatchNormState(
      mean=mean.astype(mean_dtype),
      var=var.astype(jnp.result_type(state.var)),
      count=count + 1,
  )


def batch_norm(
    x,
    state: BatchNormState,
    scale=None,
    bias=None,
    *,
    training: bool,
    axis=-1,
    momentum=0.99,
    epsilon=1e-5,
    axis_name=None,
    axis_index_groups=None,
    mask=None,
    running_var='biased',
    virtual_batch_size: int | None = None,
    dtype=None,
) -> tuple[jax.Array, BatchNormState]:
  """Batch normalization with explicit state: returns ``(y, new_state)``.

  In training, ``x`` is normalized with its own batch statistics (mean and
  biased variance over every axis but ``axis``) and the running statistics in
  ``state`` are updated; in inference (``training=False``) the running
  statistics normalize ``x`` and ``state`` is returned unchanged.

  Args:
    x: input, any float (or complex) dtype; statistics accumulate in float32
      or wider and ``y`` has ``x``'s dtype unless ``dtype`` says otherwise.
    state: running statistics from :func:`jaxbn.init_state`.
    scale, bias: optional per-feature affine parameters (gamma, beta).
    training: required; ``True`` uses batch statistics and updates ``state``.
    axis: feature axis or axes (``-1`` for NHWC, ``1`` for NCHW).
    momentum: ``new = momentum * old + (1 - momentum) * batch``; PyTorch's
      ``momentum=0.1`` is ``0.9`` here. ``None``: cumulative average.
    epsilon: added to the variance before the square root.
    axis_name: name of a mapped axis (``shard_map``, ``pmap``,
      ``vmap(axis_name=...)``) whose devices share statistics, pooled
      exactly and count-weighted. Not needed under ``jax.jit`` with a sharded
      batch: there the statistics are global already.
    axis_index_groups: sub-groups of ``axis_name`` that sync separately
      (sizes may differ; every index in one group). Under ``shard_map`` and
      ``pmap``; JAX's ``vmap`` does not support them.
    mask: boolean, broadcastable to ``x``; ``False`` entries take no part in
      the statistics and may hold NaN or Inf. They are still normalized in
      ``y`` (like Flax), so keep them out of your loss.
    running_var: ``'biased'`` (Flax) or ``'unbiased'`` (PyTorch) running
      variance estimate.
    virtual_batch_size: ghost batch norm: normalize each consecutive chunk of
      this many examples (axis 0) with its own statistics; the running
      statistics take the average of the chunk statistics.
    dtype: dtype of ``y`` (default ``x.dtype``).

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> x = jax.random.normal(jax.random.key(0), (32, 8)) * 3.0 + 1.0
    >>> state = jaxbn.init_state(8)
    >>> y, state = jaxbn.batch_norm(x, state, training=True)
    >>> bool(jnp.allclose(y.mean(0), 0.0, atol=1e-5))
    True
    >>> y_eval, _ = jaxbn.batch_norm(x, state, training=False)
  """
  x = _checks.float_array(x)
  training = _checks.training_flag(training)
  feature_axes, mask = check_call(
      x, state, scale, bias, axis=axis, momentum=momentum, epsilon=epsilon,
      running_var=running_var, axis_name=axis_name,
      axis_index_groups=axis_index_groups, mask=mask)

  if not training:
    y = normalize_masked(x, mask, state.mean, state.var, scale, bias,
                          axis=feature_axes, epsilon=epsilon, dtype=dtype)
    return y, state

  if virtual_batch_size is not None:
    return _ghost_batch_norm(
        x, state, scale, bias, feature_axes=feature_axes,
        virtual_batch_size=virtual_batch_size, momentum=momentum,
        epsilon=epsilon, axis_name=axis_name,
        axis_index_groups=axis_index_groups, mask=mask,
        running_var=running_var, dtype=dtype)

  y, batch = normalize_with_batch_moments(
      x, lambda batch: (scale, bias), feature_axes=feature_axes, epsilon=epsilon, mask=mask,
      axis_name=axis_name, axis_index_groups=axis_index_groups, dtype=dtype)
  new_state = update_state(state, batch, momentum=momentum, running_var=running_var)
  return y, new_state


def normalize_with_batch_moments(x, affine, *, feature_axes, epsilon, mask, axis_name,
                                 axis_index_groups, dtype) -> tuple[jax.Array, Moments]:
  """Batch-norm training: ``(y, batch moments)``, ``y`` normalized with the
  moments over every axis but ``feature_axes`` and the ``(scale, bias)`` that
  ``affine(batch)`` returns."""
  reduction_axes = _checks.complement_axes(feature_axes, x.ndim)
  if mask is None and axis_name is None:
    _checks.more_than_one_value(x.shape, reduction_axes)
  return normalize_by_own_moments(
      x, reduction_axes, affine, lambda y: y, epsilon=epsilon, mask=mask, axis_name=axis_name,
      axis_index_groups=axis_index_groups, dtype=dtype or x.dtype)


def normalize_by_own_moments(x, reduction_axes, affine, finish, *, epsilon, mask, axis_name,
                             axis_index_groups, dtype) -> tuple[jax.Array, Moments]:
  """``(finish(y), moments)``: ``x`` normalized with its moments over
  ``reduction_axes`` and the per-kept-position ``(scale, bias)`` of
  ``affine(moments)``, as ``dtype``; ``finish`` runs inside the masking
  (masked entries differentiate nothing).

  One widened ``x`` serves the statistics and the normalization, so the parts
  of dx from both are summed in float32 and rounded once, while the sums
  read the narrow ``x`` (``reduce_moments``' ``narrow``).
  """
  wide = x.astype(stats_dtype(x.dtype))
  moments = reduce_moments(wide, reduction_axes, mask=mask, axis_name=axis_name,
                           axis_index_groups=axis_index_groups, narrow=x)
  scale, bias = affine(moments)
  kept = tuple(a for a in range(x.ndim) if a not in reduction_axes)
  y = masked_apply(lambda wide: finish(normalize_checked(
      wide, moments.mean, moments.var, scale, bias, kept, epsilon, dtype,
      narrow=x if mask is None else None)), wide, mask)
  return y, moments


def masked_apply(apply, x, mask):
  """``apply(x)`` where masked-out entries cannot reach any gradient.

  Their outputs are still computed (as in Flax), but behind
  ``stop_gradient``; the differentiable branch sees a zero instead, so a NaN
  there never meets a zero cotangent (``0 * NaN`` is NaN).
  """
  if mask is None:
    return apply(x)
  live = apply(jnp.where(mask, x, 0))
  return jnp.where(mask, live, lax.stop_gradient(apply(x)))


def normalize_masked(x, mask, mean, var, scale, bias, **kwargs):
  """``normalize`` through :func:`masked_apply`."""
  return masked_apply(lambda x: normalize(x, mean, var, scale, bias, **kwargs), x, mask)


def check_call(x, state, scale, bias, *, axis, momentum, epsilon, running_var,
               axis_name, axis_index_groups, mask):
  """Validates what every batch-norm flavour shares, at trace time.

  Returns the sorted feature axes and the mask broadcast to ``x`` (or None).
  """
  feature_axes = _checks.canonical_axes(axis, x.ndim)
  feature_shape = tuple(x.shape[a] for a in feature_axes)
  _checks.state_matches(state, feature_shape)
  _checks.param_matches(scale, 'scale', feature_shape)
  _checks.param_matches(bias, 'bias', feature_shape)
  _checks.momentum(momentum)
  _checks.epsilon(epsilon)
  _checks.running_var(running_var)
  _checks.axis_groups(axis_name, axis_index_groups)
  return feature_axes, None if mask is None else _checks.mask_for(mask, x.shape)


def _ghost_batch_norm(x, state, scale, bias, *, feature_axes, virtual_batch_size,
                      momentum, epsilon, axis_name, axis_index_groups, mask,
                      running_var, dtype):
  """Ghost batch norm: statistics per chunk of ``virtual_batch_size`` examples."""
  v = virtual_batch_size
  _checks.virtual_batch_size(v)
  if 0 in feature_axes:
    raise ValueError(
        'virtual_batch_size splits axis 0 into chunks, but axis 0 is a '
        'feature axis here; put the batch first.')
  batch_size = x.shape[0]
  if batch_size % v:
    raise ValueError(
        f'the batch size {batch_size} is not divisible by virtual_batch_size='
        f'{v}; pick a divisor of the batch size or drop the last partial batch.')
  chunks = batch_size // v
  xs = x.reshape((chunks, v) + x.shape[1:])
  chunk_mask = None if mask is None else mask.reshape(xs.shape)
  chunk_features = tuple(a + 1 for a in feature_axes)
  reduction_axes = _checks.complement_axes((0,) + chunk_features, xs.ndim)
  if mask is None:
    _checks.more_than_one_value(xs.shape, reduction_axes)
  # Ghost batches are local by definition: no sync of the chunk statistics.
  y, per_chunk = normalize_by_own_moments(
      xs, reduction_axes, lambda moments: (_chunked(scale, chunks), _chunked(bias, chunks)),
      lambda y: y, epsilon=epsilon, mask=chunk_mask, axis_name=None, axis_index_groups=None,
      dtype=dtype or x.dtype)
  estimate = _average_chunks(per_chunk, running_var, axis_name, axis_index_groups)
  new_state = update_state(state, estimate, momentum=momentum, running_var='biased')
  return y.reshape(x.shape), new_state


def _average_chunks(per_chunk: Moments, running_var, axis_name, axis_index_groups) -> Moments:
  """Average of the chunks' statistics (Keras' rule for ghost batches)."""
  has_data = per_chunk.count > 0
  weight = has_data.astype(per_chunk.var.dtype)
  sums = (jnp.sum(weight, 0), jnp.sum(per_chunk.mean * weight, 0),
          jnp.sum(_running_variance(per_chunk, running_var) * weight, 0))
  if axis_name is not None:
    sums = psum_in_groups(sums, axis_name, axis_index_groups)
  n, mean_sum, var_sum = sums
  safe = jnp.maximum(n, 1.0)
  return Moments(mean=mean_sum / safe, var=var_sum / safe, count=n)


def _running_variance(batch: Moments, running_var):
  if running_var == 'unbiased':
    n = batch.count
    return jnp.where(n > 1, batch.var * n / jnp.maximum(n - 1.0, 1.0), batch.var)
  return batch.var


def _ema(old, new, keep):
  return keep * old + (1.0 - keep) * new


def _chunked(param, chunks):
  return None if param is None else jnp.broadcast_to(param, (chunks,) + jnp.shape(param))


def _broadcast_shape(x_shape, feature_axes):
  return tuple(d if i in feature_axes else 1 for i, d in enumerate(x_shape))


__all__ = ['batch_norm', 'moments', 'normalize', 'update_state', 'stats_dtype']
