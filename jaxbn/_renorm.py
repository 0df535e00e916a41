"""Batch renormalization (Ioffe, 2017) and its warm-up schedules.

Batch renorm corrects the batch statistics towards the running ones so that
training and inference compute the same function in expectation:

    r = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))
    d = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))
    y = ((x - mu_B) / sigma_B * r + d) * scale + bias

with ``sigma_B = sqrt(var_B + epsilon)`` from the batch and ``mu``,
``sigma = sqrt(var + epsilon)`` from the running state. Since ``r`` and ``d``
are per-feature constants for differentiation, the layer is ``normalize``
with the effective affine parameters ``scale * r`` and ``bias + scale * d``;
the statistics and the normalization are the batch-norm ones.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxbn import _checks
from jaxbn._functional import check_call
from jaxbn._functional import normalize_masked
from jaxbn._functional import normalize_with_batch_moments
from jaxbn._functional import update_state
from jaxbn._state import BatchNormState


def batch_renorm(
    x,
    state: BatchNormState,
    scale=None,
    bias=None,
    *,
    training: bool,
    r_max=3.0,
    d_max=5.0,
    axis=-1,
    momentum=0.99,
    epsilon=1e-5,
    axis_name=None,
    mask=None,
    axis_index_groups=None,
    running_var='biased',
    dtype=None,
) -> tuple[jax.Array, BatchNormState]:
  """Batch renormalization with explicit state: returns ``(y, new_state)``.

  In training, ``x`` is normalized with its batch statistics and corrected by
  ``r`` and ``d`` (see the module docstring) towards the running statistics,
  which are then updated exactly as :func:`jaxbn.batch_norm` updates them. In
  inference (``training=False``) it is plain normalization with the running
  statistics and ``state`` is returned unchanged.

  ``r_max=1, d_max=0`` is batch norm exactly (outputs and gradients). The
  paper starts there and relaxes the limits during training; use
  :func:`r_max_schedule` and :func:`d_max_schedule`, whose values may be
  traced (they can be computed from the step inside ``jit``).

  Args:
    x: input, float dtype; statistics accumulate in float32 or wider.
    state: running statistics from :func:`jaxbn.init_state`.
    scale, bias: optional per-feature affine parameters (gamma, beta).
    training: required; ``True`` uses corrected batch statistics and updates
      ``state``.
    r_max: bound of the variance correction ``r`` in ``[1/r_max, r_max]``;
      ``>= 1``. A Python number, or a scalar array (possibly traced).
    d_max: bound of the mean correction ``d`` in ``[-d_max, d_max]``;
      ``>= 0``. A Python number, or a scalar array (possibly traced).
    axis: feature axis or axes (``-1`` for NHWC, ``1`` for NCHW).
    momentum: ``new = momentum * old + (1 - momentum) * batch``.
    epsilon: added to both variances before the square root.
    axis_name: mapped axis whose devices share the batch statistics.
    mask: boolean, broadcastable to ``x``; ``False`` entries take no part in
      the statistics.
    axis_index_groups: sub-groups of ``axis_name`` that sync separately.
    running_var: ``'biased'`` (Flax) or ``'unbiased'`` (PyTorch) running
      variance; ``r`` and ``d`` always use the stored value as is.
    dtype: dtype of ``y`` (default ``x.dtype``).

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> x = jax.random.normal(jax.random.key(0), (32, 4)) * 2.0 + 1.0
    >>> state = jaxbn.init_state(4)
    >>> y, state = jaxbn.batch_renorm(x, state, training=True, r_max=1.5, d_max=0.5)
    >>> y.shape, int(state.count)
    ((32, 4), 1)
    >>> y_bn, _ = jaxbn.batch_norm(x, jaxbn.init_state(4), training=True)
    >>> y_rn, _ = jaxbn.batch_renorm(x, jaxbn.init_state(4), training=True,
    ...                              r_max=1.0, d_max=0.0)
    >>> bool(jnp.array_equal(y_bn, y_rn))
    True
  """
  x = _checks.float_array(x)
  if jnp.iscomplexobj(x):
    raise TypeError(
        'batch_renorm needs a real input: the clipped corrections r and d '
        'have no complex meaning; use jaxbn.batch_norm for complex inputs.')
  training = _checks.training_flag(training)
  feature_axes, mask = check_call(
      x, state, scale, bias, axis=axis, momentum=momentum, epsilon=epsilon,
      running_var=running_var, axis_name=axis_name,
      axis_index_groups=axis_index_groups, mask=mask)
  _check_limit(r_max, 'r_max', 1.0,
               'r_max=1 disables the variance correction (plain batch norm)')
  _check_limit(d_max, 'd_max', 0.0,
               'd_max=0 disables the mean correction (plain batch norm)')

  if not training:
    y = normalize_masked(x, mask, state.mean, state.var, scale, bias,
                         axis=feature_axes, epsilon=epsilon, dtype=dtype)
    return y, state

  feature_shape = tuple(x.shape[a] for a in feature_axes)

  def corrected_affine(batch):
    r, d = _corrections(batch.mean, batch.var, state.mean, state.var,
                        r_max=r_max, d_max=d_max, epsilon=epsilon)
    return _effective_affine(scale, bias, r, d, feature_shape)

  y, batch = normalize_with_batch_moments(
      x, corrected_affine, feature_axes=feature_axes, epsilon=epsilon, mask=mask,
      axis_name=axis_name, axis_index_groups=axis_index_groups, dtype=dtype)
  return y, update_state(state, batch, momentum=momentum, running_var=running_var)


def _corrections(batch_mean, batch_var, mean, var, *, r_max, d_max,
                       epsilon=1e-5):
  """The batch-renorm corrections ``(r, d)``, behind ``stop_gradient``.

  ``r = clip(sigma_B / sigma, 1/r_max, r_max)`` and
  ``d = clip((mu_B - mu) / sigma, -d_max, d_max)``, per feature.
  """
  sigma_b = jnp.sqrt(batch_var + epsilon)
  inv_sigma = lax.rsqrt(var + epsilon)
  r_max = jnp.asarray(r_max, sigma_b.dtype)
  d_max = jnp.asarray(d_max, sigma_b.dtype)
  r = jnp.clip(sigma_b * inv_sigma, 1.0 / r_max, r_max)
  d = jnp.clip((batch_mean - mean) * inv_sigma, -d_max, d_max)
  return lax.stop_gradient(r), lax.stop_gradient(d)


def _effective_affine(scale, bias, r, d, feature_shape):
  """``(scale * r, bias + scale * d)``, exact when ``r == 1`` and ``d == 0``."""
  if scale is None:
    return r, d if bias is None else jnp.reshape(bias, feature_shape) + d
  scale = jnp.reshape(scale, feature_shape)
  shift = scale * d
  return scale * r, shift if bias is None else jnp.reshape(bias, feature_shape) + shift


def _check_limit(value, name, lowest, hint):
  if isinstance(value, jax.core.Tracer):
    if jnp.ndim(value) != 0:
      raise ValueError(f'{name} must be a scalar, got shape {jnp.shape(value)}.')
    return
  if isinstance(value, numbers.Real):
    v = float(value)
  else:
    arr = np.asarray(value)
    if arr.ndim != 0 or not np.issubdtype(arr.dtype, np.number):
      raise ValueError(
          f'{name} must be a scalar number, got {value!r}; pass a float or a '
          'scalar array (e.g. from jaxbn.r_max_schedule(step)).')
    v = float(arr)
  if not v >= lowest:
    raise ValueError(f'{name} must be >= {lowest:g}, got {value!r}; {hint}.')


def r_max_schedule(r_max=3.0, *, warmup_steps=5_000, end_step=40_000):
  """Schedule ``step -> r_max``: 1 until ``warmup_steps``, then linear to ``r_max``.

  The paper's default: ``r_max = 1`` for the first 5k steps, reaching 3 at
  40k steps. Works with Python ints and traced steps (e.g. inside ``jit``
  with the step from the optimizer state), like an optax schedule.

  Example:
    >>> import jaxbn
    >>> sched = jaxbn.r_max_schedule(3.0, warmup_steps=10, end_step=30)
    >>> [float(sched(s)) for s in (0, 10, 20, 30, 100)]
    [1.0, 1.0, 2.0, 3.0, 3.0]
  """
  _check_limit(r_max, 'r_max', 1.0, 'the ramp goes from 1 up to r_max')
  return _linear_ramp(1.0, r_max, warmup_steps, end_step)


def d_max_schedule(d_max=5.0, *, warmup_steps=5_000, end_step=25_000):
  """Schedule ``step -> d_max``: 0 until ``warmup_steps``, then linear to ``d_max``.

  The paper's default: ``d_max = 0`` for the first 5k steps, reaching 5 at
  25k steps.

  Example:
    >>> import jaxbn
    >>> sched = jaxbn.d_max_schedule(5.0, warmup_steps=10, end_step=20)
    >>> [float(sched(s)) for s in (0, 10, 15, 20, 100)]
    [0.0, 0.0, 2.5, 5.0, 5.0]
  """
  _check_limit(d_max, 'd_max', 0.0, 'the ramp goes from 0 up to d_max')
  return _linear_ramp(0.0, d_max, warmup_steps, end_step)


def _linear_ramp(start, end, begin_step, end_step):
  for name, v in (('warmup_steps', begin_step), ('end_step', end_step)):
    if not isinstance(v, numbers.Integral) or v < 0:
      raise ValueError(f'{name} must be an int >= 0, got {v!r}.')
  if end_step < begin_step:
    raise ValueError(
        f'end_step={end_step} is before warmup_steps={begin_step}; the ramp '
        'must end after it starts (equal values give a jump).')
  length = end_step - begin_step

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    if length == 0:
      t = (step >= end_step).astype(jnp.float32)
    else:
      t = jnp.clip((step - begin_step) / length, 0.0, 1.0)
    return start + (end - start) * t

  return schedule
