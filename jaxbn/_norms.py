"""Layer, group and instance normalization on the same stable moments.

These differ from batch norm only in which axes the statistics cover, so
they reuse ``reduce_moments`` (shifted sums: right even when ``|mean|/std``
is large, where ``E[x^2] - E[x]^2`` fails) and ``normalize``. They have no
running state: training and inference compute the same function.

Semantics follow ``flax.linen.LayerNorm``, ``GroupNorm`` and
``InstanceNorm`` (same axes, defaults and parameter shapes), except that the
output has ``x``'s dtype unless ``dtype`` is given (Flax promotes it with
the parameters' dtype). With ``axis_name`` the statistics also cover the
other devices of a mapped axis (e.g. features split over a model-parallel
axis), pooled exactly by count like batch norm's.
"""

from __future__ import annotations

import numbers

import jax.numpy as jnp

from jaxbn import _checks
from jaxbn._functional import normalize_by_own_moments
from jaxbn._native import stats_dtype


def layer_norm(x, scale=None, bias=None, *, reduction_axes=-1, feature_axes=-1,
               epsilon=1e-6, mask=None, dtype=None, axis_name=None,
               axis_index_groups=None):
  """Layer normalization: statistics over ``reduction_axes`` of each example.

  ``y = (x - mean) / sqrt(var + epsilon) * scale + bias`` with ``mean`` and
  biased ``var`` over ``reduction_axes`` (like ``flax.linen.LayerNorm``),
  and ``scale``/``bias`` of shape ``[x.shape[a] for a in feature_axes]``.

  Args:
    x: input, float (or complex); statistics accumulate in float32 or wider.
    scale, bias: optional affine parameters over ``feature_axes``.
    reduction_axes: axis or axes the statistics are taken over.
    feature_axes: axis or axes ``scale`` and ``bias`` vary along.
    epsilon: added to the variance before the square root.
    mask: boolean, broadcastable to ``x``; ``False`` entries take no part in
      the statistics (they may hold NaN) and get no gradient.
    dtype: dtype of the result (default ``x.dtype``).
    axis_name: name of a mapped axis (``shard_map``, ``pmap``, ``vmap``)
      whose devices hold other parts of the reduced axes; the statistics
      cover all of them.
    axis_index_groups: sub-groups of ``axis_name`` that pool separately.

  Example:
    >>> import jax.numpy as jnp, jaxbn
    >>> x = jnp.array([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]])
    >>> jaxbn.layer_norm(x).round(3)
    Array([[-1.225,  0.   ,  1.225],
           [-1.225,  0.   ,  1.225]], dtype=float32)
  """
  x = _checks.float_array(x)
  reduction_axes = _checks.canonical_axes(reduction_axes, x.ndim, 'reduction_axes')
  feature_axes = _checks.canonical_axes(feature_axes, x.ndim, 'feature_axes')
  mask = _prepare(x, scale, bias, feature_axes, epsilon, mask, axis_name,
                  axis_index_groups)
  return _normalize_over(x, reduction_axes, scale, bias, feature_axes,
                         epsilon=epsilon, mask=mask, dtype=dtype,
                         axis_name=axis_name, axis_index_groups=axis_index_groups)


def instance_norm(x, scale=None, bias=None, *, feature_axes=-1, epsilon=1e-6,
                  mask=None, dtype=None, axis_name=None, axis_index_groups=None):
  """Instance normalization: statistics per example and per feature.

  Reduces every axis but the batch axis (0) and ``feature_axes``, e.g. the
  spatial axes of an NHWC image, like ``flax.linen.InstanceNorm``. Other
  arguments as in :func:`layer_norm`.

  Example:
    >>> import jax, jaxbn
    >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3)) * 5.0 + 2.0
    >>> y = jaxbn.instance_norm(x)
    >>> bool(abs(y.mean(axis=(1, 2))).max() < 1e-5)
    True
  """
  x = _checks.float_array(x)
  feature_axes = _checks.canonical_axes(feature_axes, x.ndim, 'feature_axes')
  if x.ndim < 2 or 0 in feature_axes:
    raise ValueError(
        f'instance_norm needs a batch axis 0 and feature_axes={feature_axes} '
        f'elsewhere, got an input of shape {x.shape}; put the batch first '
        '(e.g. NHWC with feature_axes=-1).')
  reduction_axes = tuple(a for a in range(1, x.ndim) if a not in feature_axes)
  mask = _prepare(x, scale, bias, feature_axes, epsilon, mask, axis_name,
                  axis_index_groups)
  return _normalize_over(x, reduction_axes, scale, bias, feature_axes,
                         epsilon=epsilon, mask=mask, dtype=dtype,
                         axis_name=axis_name, axis_index_groups=axis_index_groups)


def group_norm(x, scale=None, bias=None, *, num_groups=32, group_size=None,
               epsilon=1e-6, mask=None, dtype=None, axis_name=None,
               axis_index_groups=None):
  """Group normalization (Wu & He, 2018), channels last.

  The last axis (``C`` channels) is split into ``num_groups`` groups of
  ``group_size = C // num_groups`` consecutive channels; statistics cover one
  group of one example: every axis but the batch axis 0. ``scale`` and
  ``bias`` have shape ``(C,)``. Like ``flax.linen.GroupNorm``, give either
  ``num_groups`` or ``group_size`` (then ``num_groups=None``). Other
  arguments as in :func:`layer_norm`.

  Example:
    >>> import jax, jaxbn
    >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 6))
    >>> y = jaxbn.group_norm(x, num_groups=3)
    >>> y.reshape(2, 16, 3, 2).std(axis=(1, 3)).round(2)
    Array([[1., 1., 1.],
           [1., 1., 1.]], dtype=float32)
  """
  x = _checks.float_array(x)
  if x.ndim < 2:
    raise ValueError(
        f'group_norm needs a batch axis 0 and channels last, got an input of '
        f'shape {x.shape}; add the batch axis, e.g. x[None].')
  channels = x.shape[-1]
  groups = _num_groups(channels, num_groups, group_size)
  mask = _prepare(x, scale, bias, (x.ndim - 1,), epsilon, mask, axis_name,
                  axis_index_groups)
  grouped_shape = x.shape[:-1] + (groups, channels // groups)
  mg = None if mask is None else mask.reshape(grouped_shape)
  # Statistics per (example, group): reduce all but axis 0 and the group axis.
  reduction_axes = tuple(a for a in range(1, x.ndim + 1) if a != x.ndim - 1)
  # scale and bias (C,) fill the (group, channel in group) axes in order.
  y = _normalized(x.reshape(grouped_shape), reduction_axes,
                  lambda y: _affine(y, scale, bias, (x.ndim - 1, x.ndim)),
                  epsilon=epsilon, mask=mg, axis_name=axis_name,
                  axis_index_groups=axis_index_groups)
  return y.reshape(x.shape).astype(dtype or x.dtype)


def _normalize_over(x, reduction_axes, scale, bias, feature_axes, *, epsilon,
                    mask, dtype, axis_name, axis_index_groups):
  y = _normalized(x, reduction_axes, lambda y: _affine(y, scale, bias, feature_axes),
                  epsilon=epsilon, mask=mask, axis_name=axis_name,
                  axis_index_groups=axis_index_groups)
  return y.astype(dtype or x.dtype)


def _normalized(x, reduction_axes, finish, *, epsilon, mask, axis_name, axis_index_groups):
  """``finish(x normalized over reduction_axes)``, in the statistics dtype."""
  return normalize_by_own_moments(
      x, reduction_axes, lambda moments: (None, None), finish, epsilon=epsilon, mask=mask,
      axis_name=axis_name, axis_index_groups=axis_index_groups,
      dtype=stats_dtype(x.dtype))[0]


def _affine(y, scale, bias, feature_axes):
  shape = tuple(d if i in feature_axes else 1 for i, d in enumerate(y.shape))
  if scale is not None:
    y = y * jnp.reshape(scale, shape)
  if bias is not None:
    y = y + jnp.reshape(bias, shape)
  return y


def _prepare(x, scale, bias, feature_axes, epsilon, mask, axis_name,
             axis_index_groups):
  feature_shape = tuple(x.shape[a] for a in feature_axes)
  _checks.param_matches(scale, 'scale', feature_shape)
  _checks.param_matches(bias, 'bias', feature_shape)
  _checks.epsilon(epsilon)
  _checks.axis_groups(axis_name, axis_index_groups)
  return None if mask is None else _checks.mask_for(mask, x.shape)


def _num_groups(channels, num_groups, group_size) -> int:
  for name, v in (('num_groups', num_groups), ('group_size', group_size)):
    if v is not None and (not isinstance(v, numbers.Integral) or v < 1):
      raise ValueError(f'{name} must be a positive int or None, got {v!r}.')
  if num_groups is None and group_size is None:
    raise ValueError('group_norm needs num_groups or group_size; give one of them.')
  if group_size is not None:
    if channels % group_size:
      raise ValueError(
          f'group_size={group_size} does not divide the {channels} channels '
          f'(last axis); use a divisor of {channels}: {_divisors(channels)}.')
    if num_groups is not None and num_groups * group_size != channels:
      raise ValueError(
          f'num_groups={num_groups} and group_size={group_size} disagree for '
          f'{channels} channels; pass num_groups=None to use group_size.')
    return channels // group_size
  if channels % num_groups:
    raise ValueError(
        f'num_groups={num_groups} does not divide the {channels} channels '
        f'(last axis); use a divisor of {channels}: {_divisors(channels)}, '
        'or give group_size=... with num_groups=None.')
  return num_groups


def _divisors(n):
  return [d for d in range(1, n + 1) if n % d == 0]
