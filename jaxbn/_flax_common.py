"""Checks and messages shared by the Flax wrappers (``jaxbn.nnx``, ``jaxbn.linen``).

Only argument handling and axis bookkeeping live here; the math is in the
functional core (``_functional``, ``_renorm``, ``_norms``).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from jaxbn import _checks
from jaxbn import _norms
from jaxbn import _renorm


def floating_input(x):
  """``x`` as an array; integer and boolean inputs become float32 (or wider),
  as Flax's Linen layers take them."""
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return x
  return x.astype(jnp.promote_types(jnp.float32, x.dtype))


def bool_mask(mask):
  """``mask`` as booleans (None stays None): Flax takes 0/1 masks as well."""
  return None if mask is None else jnp.asarray(mask, dtype=bool)


def feature_axes(axis, ndim: int) -> tuple[int, ...]:
  return _checks.canonical_axes(axis, ndim)


def check_batch(shape, axes: tuple[int, ...], *, mask, axis_name, layer: str) -> None:
  """Refuses a training call that sees a single value per feature.

  Flax silently returns ``bias`` there (the variance of one value is 0).
  With a mask or a mapped axis the count is only known at run time, so
  those cases are left to the statistics themselves.
  """
  if mask is not None or axis_name is not None:
    return
  if _checks.one_value_per_feature(shape, _checks.complement_axes(axes, len(shape))):
    raise ValueError(
        f'{layer} in training mode got input shape {tuple(shape)}, i.e. '
        'one value per feature: its batch statistics are meaningless. Use a '
        'batch of 2 or more, or evaluation mode (use_running_average=True, '
        "e.g. model.eval() in NNX) to normalize with the running statistics.")


def check_num_features(num_features: int, shape, axes: tuple[int, ...], axis,
                       layer: str) -> None:
  """NNX stores ``num_features`` statistics; the input must have as many."""
  feature_shape = tuple(shape[a] for a in axes)
  if math.prod(feature_shape) == num_features:
    return
  raise ValueError(
      f'{layer} was built with num_features={num_features} but the input '
      f'of shape {tuple(shape)} has {math.prod(feature_shape)} features on '
      f'axis={axis!r}; build it with num_features={math.prod(feature_shape)} '
      '(the size of the feature axis) or set `axis` to the feature axis.')


# ------------------------------------------------------------- batch renorm


def check_renorm_limits(r_max, d_max) -> None:
  """A limit is a number (checked now) or a schedule ``step -> value``."""
  # The core's own check, so the messages match jaxbn.batch_renorm's.
  for value, name, lowest, hint in (
      (r_max, 'r_max', 1.0, 'r_max=1 disables the variance correction'),
      (d_max, 'd_max', 0.0, 'd_max=0 disables the mean correction')):
    if not callable(value):
      _renorm._check_limit(value, name, lowest, hint)


def uses_schedule(layer) -> bool:
  return callable(getattr(layer, 'r_max', None)) or callable(getattr(layer, 'd_max', None))


def renorm_limits(r_max, d_max, step):
  """``(r_max, d_max)`` at ``step`` (the number of training updates so far).

  Schedules run on the stored step count, so the paper's warm-up advances
  inside ``jit`` without the caller passing the step.
  """
  return (r_max(step) if callable(r_max) else r_max,
          d_max(step) if callable(d_max) else d_max)


# ------------------------------------------------ layer, group, instance norm


def group_norm_layout(shape, num_groups, group_size, reduction_axes):
  """Flax's GroupNorm axes: returns ``(groups, custom_reduction_axes)``.

  ``custom_reduction_axes`` is None for the default (every axis but the
  batch axis 0), which is :func:`jaxbn.group_norm`'s own layout; otherwise it
  lists the axes of the grouped input ``shape[:-1] + (groups, size)`` to
  reduce, the last one being the within-group axis.
  """
  ndim = len(shape)
  channels = shape[-1]
  if (num_groups is None) == (group_size is None):
    raise ValueError(
        'GroupNorm needs exactly one of num_groups and group_size; to give '
        'group_size pass num_groups=None (its default is 32).')
  groups = _norms._num_groups(channels, num_groups, group_size)
  if reduction_axes is None:
    return groups, None
  axes = _checks.canonical_axes(reduction_axes, ndim, 'reduction_axes')
  if axes[-1] != ndim - 1:
    raise ValueError(
        f'GroupNorm reduction_axes={reduction_axes!r} must include the last '
        'axis: the channels, which the groups split.')
  default = tuple(range(1, ndim))
  if axes == default:
    return groups, None
  return groups, axes[:-1] + (ndim,)


def group_norm_call(x, scale, bias, *, num_groups, group_size, reduction_axes,
                    epsilon, mask, dtype, axis_name, axis_index_groups):
  """Flax's GroupNorm on jaxbn's functions.

  The default axes are :func:`jaxbn.group_norm`'s. Other ``reduction_axes``
  are :func:`jaxbn.layer_norm` of the grouped input ``(..., groups, size)``
  over those axes, with ``scale``/``bias`` laid out as ``(groups, size)``.
  """
  groups, axes = group_norm_layout(jnp.shape(x), num_groups, group_size, reduction_axes)
  if axes is None:
    return _norms.group_norm(x, scale, bias, num_groups=groups, epsilon=epsilon,
                             mask=mask, dtype=dtype, axis_name=axis_name,
                             axis_index_groups=axis_index_groups)
  shape = jnp.shape(x)
  grouped = shape[:-1] + (groups, shape[-1] // groups)
  as_grouped = lambda a: None if a is None else jnp.reshape(a, grouped[-2:])
  if mask is not None:
    mask = jnp.broadcast_to(mask, shape).reshape(grouped)
  y = _norms.layer_norm(jnp.reshape(x, grouped), as_grouped(scale), as_grouped(bias),
                 reduction_axes=axes, feature_axes=(len(shape) - 1, len(shape)),
                 epsilon=epsilon, mask=mask, dtype=dtype, axis_name=axis_name,
                 axis_index_groups=axis_index_groups)
  return y.reshape(shape)
