"""Argument validation shared by every public entry point.

All checks run at trace time on static information (shapes, dtypes, Python
options), so a mistake surfaces as a ``TypeError``/``ValueError`` naming the
fix rather than as a NaN or an XLA error.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

RUNNING_VAR_CHOICES = ('biased', 'unbiased')


def feature_shape_arg(num_features) -> tuple[int, ...]:
  shape = (num_features,) if isinstance(num_features, numbers.Integral) else num_features
  if not isinstance(shape, Sequence) or isinstance(shape, str) or not all(
      isinstance(n, numbers.Integral) for n in shape):
    raise TypeError(
        f'num_features must be an int or a tuple of ints, got {num_features!r}.')
  if not shape or any(n < 1 for n in shape):
    raise ValueError(
        f'num_features must be >= 1, got {num_features!r}; pass the size of '
        'the feature axis, e.g. x.shape[-1].')
  return tuple(int(n) for n in shape)


def float_array(x, name: str = 'x') -> jax.Array:
  """Returns ``x`` as a JAX array, refusing non-floating dtypes."""
  # NumPy arrays too: float64 ones then take JAX's default precision once,
  # not with a truncation warning at every later cast.
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    raise TypeError(
        f'{name} must be a floating-point (or complex) array, got dtype '
        f'{x.dtype}; convert it first, e.g. {name}.astype(jnp.float32).')
  return x


def canonical_axes(axis, ndim: int, what: str = 'axis') -> tuple[int, ...]:
  """Normalizes an int or a sequence of ints to sorted non-negative axes."""
  axes = (axis,) if isinstance(axis, numbers.Integral) else axis
  if not isinstance(axes, Sequence) or not all(
      isinstance(a, numbers.Integral) for a in axes):
    raise TypeError(f'{what} must be an int or a tuple of ints, got {axis!r}.')
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(
          f'{what}={axis!r} is out of range for an input with {ndim} '
          f'dimensions; use a value in [{-ndim}, {ndim - 1}].')
    out.append(int(a) % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f'{what}={axis!r} names the same axis twice.')
  return tuple(sorted(out))


def training_flag(training) -> bool:
  if not isinstance(training, (bool, np.bool_)):
    raise TypeError(
        'training must be a Python bool (it selects the code path at trace '
        f'time), got {type(training).__name__}; for a traced flag use '
        'jax.lax.cond over two calls.')
  return bool(training)


def momentum(value) -> None:
  if value is None or isinstance(value, jax.core.Tracer):
    return
  v = _real_scalar(value, 'momentum')
  if v is None or not 0.0 <= v <= 1.0:
    raise ValueError(
        f'momentum must be in [0, 1] (new = momentum * old + (1 - momentum) '
        f'* batch) or None for a cumulative average, got {value!r}. '
        "PyTorch's momentum=0.1 is momentum=0.9 here.")


def epsilon(value) -> None:
  if isinstance(value, jax.core.Tracer):
    return
  v = _real_scalar(value, 'epsilon')
  if v is None or not v >= 0.0:
    raise ValueError(f'epsilon must be a number >= 0, got {value!r}.')


def _real_scalar(value, name: str) -> float | None:
  """``value`` as a float: a real number or a concrete 0-d real array (what
  a traced option is outside ``jit``); None for anything else."""
  if isinstance(value, numbers.Real):
    return float(value)
  if isinstance(value, (np.ndarray, jax.Array)) and (
      jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)):
    if value.ndim != 0:
      raise ValueError(
          f'{name} must be a scalar, got an array of shape {value.shape}; pass '
          'one value for all features.')
    return float(value)
  return None


def running_var(value) -> None:
  if value not in RUNNING_VAR_CHOICES:
    raise ValueError(
        f'running_var must be one of {RUNNING_VAR_CHOICES}, got {value!r}; '
        '"unbiased" stores the n/(n-1)-corrected variance like PyTorch.')


def state_type(state) -> None:
  for field in ('mean', 'var', 'count'):
    if not hasattr(state, field):
      raise TypeError(
          'state must be a jaxbn.BatchNormState (from jaxbn.init_state), got '
          f'{type(state).__name__}.')


def state_floating(state) -> None:
  """The running statistics keep their dtypes through an update, so an
  integer one would be truncated every step (a variance below 1 becomes 0)."""
  for field in ('mean', 'var'):
    dtype = jnp.result_type(getattr(state, field))
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(
          f'state.{field} has dtype {dtype}, but running statistics need a '
          'floating dtype (an update would truncate them); create the state '
          'with jaxbn.init_state(...) or convert it, e.g. '
          f'state._replace({field}=jnp.asarray(state.{field}, jnp.float32)).')


def state_matches(state, feature_shape: tuple[int, ...]) -> None:
  state_type(state)
  for field in ('mean', 'var'):
    shape = tuple(jnp.shape(getattr(state, field)))
    if shape != feature_shape:
      raise ValueError(
          f'state.{field} has shape {shape} but the input has feature shape '
          f'{feature_shape}; create the state with '
          f'jaxbn.init_state({_shape_literal(feature_shape)}) or fix `axis`.')


def moments_match(batch, state) -> None:
  """``update_state``'s batch moments have the running statistics' shape."""
  for field in ('mean', 'var'):
    got, want = tuple(jnp.shape(getattr(batch, field))), tuple(jnp.shape(getattr(state, field)))
    if got != want:
      raise ValueError(
          f'the batch moments have {field} of shape {got} but state.{field} has '
          f'shape {want}; compute them over the same feature axes '
          '(jaxbn.moments(x, axis=...)) or create the state with that shape.')


def virtual_batch_size(v) -> None:
  """``None`` (no ghost batches) or an int of at least 2."""
  if v is None:
    return
  if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 2:
    raise ValueError(
        f'virtual_batch_size must be an int >= 2, got {v!r}; a chunk of one '
        'example has no batch statistics.')


def param_matches(value, name: str, feature_shape: tuple[int, ...]) -> None:
  """``value`` has ``feature_shape``, or holds those values flattened (NNX
  stores ``(num_features,)``), size-1 axes aside. An equal size is not
  enough: a ``(4, 3)`` array for features ``(3, 4)`` would be reshaped, its
  values landing on the wrong features."""
  if value is None:
    return
  shape = tuple(jnp.shape(value))
  size = math.prod(feature_shape)
  if _without_ones(shape) not in (_without_ones(feature_shape), _without_ones((size,))):
    flat = f' or ({size},)' if len(feature_shape) > 1 else ''
    raise ValueError(
        f'{name} has shape {shape} but the input has feature shape '
        f'{feature_shape}; pass one value per feature, of shape '
        f'{feature_shape}{flat}.')


def _without_ones(shape) -> tuple[int, ...]:
  return tuple(d for d in shape if d != 1)


def mask_for(mask, x_shape: tuple[int, ...]) -> jax.Array:
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise TypeError(
        f'mask must be a boolean array, got dtype {mask.dtype}; use '
        'mask.astype(bool) or a comparison such as `lengths > t`.')
  try:
    return jnp.broadcast_to(mask, x_shape)
  except ValueError:
    raise ValueError(
        f'mask of shape {mask.shape} does not broadcast to the input shape '
        f'{x_shape}; give it the input shape or size-1 axes where it is '
        'constant.') from None


def axis_groups(axis_name, axis_index_groups) -> None:
  if axis_index_groups is not None and axis_name is None:
    raise ValueError(
        'axis_index_groups needs axis_name: name the mapped axis the groups '
        'index into.')


def one_value_per_feature(shape, reduction_axes) -> bool:
  """Whether ``reduction_axes`` hold at most one value, as far as the shape
  tells: a symbolic size (a shape-polymorphic export) is known at run time."""
  n = math.prod(shape[a] for a in reduction_axes)
  return isinstance(n, int) and n <= 1


def more_than_one_value(shape, reduction_axes):
  if one_value_per_feature(shape, reduction_axes):
    raise ValueError(
        f'expected more than 1 value per feature in training, got input shape '
        f'{shape}: batch statistics of a single value are meaningless. Use a '
        'batch of 2 or more, or training=False to normalize with the running '
        'statistics.')


def complement_axes(axes, ndim):
  return tuple(i for i in range(ndim) if i not in axes)


def _shape_literal(shape: tuple[int, ...]) -> str:
  return str(shape[0]) if len(shape) == 1 else str(shape)
