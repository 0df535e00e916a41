"""Checks and messages shared by the Flax wrappers (``jaxbn.nnx``, ``jaxbn.linen``).

Only argument handling lives here; the math is in ``jaxbn._functional``.
"""

from __future__ import annotations

import math

from jaxbn import _checks


def feature_axes(axis, ndim: int) -> tuple[int, ...]:
  return _checks.canonical_axes(axis, ndim)


def values_per_feature(shape, axes: tuple[int, ...]) -> int:
  return math.prod(d for i, d in enumerate(shape) if i not in axes)


def check_batch(shape, axes: tuple[int, ...], *, mask, axis_name) -> None:
  """Refuses a training call that sees a single value per feature.

  Flax silently returns ``bias`` there (the variance of one value is 0).
  With a mask or a mapped axis the count is only known at run time, so
  those cases are left to the statistics themselves.
  """
  if mask is not None or axis_name is not None:
    return
  if values_per_feature(shape, axes) <= 1:
    raise ValueError(
        f'BatchNorm in training mode got input shape {tuple(shape)}, i.e. '
        'one value per feature: its batch statistics are meaningless. Use a '
        'batch of 2 or more, or evaluation mode (use_running_average=True, '
        "e.g. model.eval() in NNX) to normalize with the running statistics.")


def check_num_features(num_features: int, shape, axes: tuple[int, ...], axis) -> None:
  """NNX stores ``num_features`` statistics; the input must have as many."""
  feature_shape = tuple(shape[a] for a in axes)
  if math.prod(feature_shape) == num_features:
    return
  raise ValueError(
      f'BatchNorm was built with num_features={num_features} but the input '
      f'of shape {tuple(shape)} has {math.prod(feature_shape)} features on '
      f'axis={axis!r}; build it with num_features={math.prod(feature_shape)} '
      '(the size of the feature axis) or set `axis` to the feature axis.')
