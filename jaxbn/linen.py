"""``jaxbn.linen.BatchNorm``: a drop-in replacement for ``flax.linen.BatchNorm``.

Same fields in the same order (``BatchNorm(True)`` still means
``use_running_average=True``), same variables (``params/{scale,bias}``,
``batch_stats/{mean,var}``) and outputs as Flax's layer; the statistics come
from :func:`jaxbn.batch_norm`, which is exact where Flax's default fast
variance cancels (inputs with a large mean). Change one import::

  from jaxbn.linen import BatchNorm   # instead of nn.BatchNorm

:func:`apply_train` runs a training step without the
``mutable=['batch_stats']`` boilerplate.

Example:
  >>> import jax, jax.numpy as jnp
  >>> import jaxbn.linen
  >>> bn = jaxbn.linen.BatchNorm(use_running_average=False)
  >>> x = 1e4 + jax.random.normal(jax.random.key(0), (64, 3))
  >>> variables = bn.init(jax.random.key(1), x)
  >>> y, variables = jaxbn.linen.apply_train(bn, variables, x)
  >>> bool(jnp.allclose(y.std(0), 1.0, atol=1e-3))
  True
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.core import frozen_dict
from flax.linen import dtypes
from flax.typing import Dtype, Initializer
from jax.nn import initializers

from jaxbn import _flax_common
from jaxbn._functional import batch_norm
from jaxbn._functional import moments
from jaxbn._functional import normalize
from jaxbn._state import BatchNormState

__all__ = ['BatchNorm', 'apply_train']


class BatchNorm(nn.Module):
  """Batch normalization layer, field-for-field ``flax.linen.BatchNorm``.

  In training (``use_running_average=False``) the input is normalized with
  its batch statistics and ``batch_stats`` is updated, which needs
  ``mutable=['batch_stats']`` in ``apply`` (or :func:`apply_train`). During
  ``init`` the statistics are not updated and ``axis_name`` is ignored, so
  ``init`` works outside the mapped axis and with a dummy batch of one.

  Attributes:
    use_running_average: if True, normalize with the stored statistics.
    axis: the feature axis (or axes) of the input.
    momentum: decay of the running averages. ``None``: cumulative average
      over all training steps (adds ``batch_stats/count``).
    epsilon: added to the variance before the square root.
    dtype: dtype of the result (default: inferred from input and params).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias: if True, add the learned ``bias`` (beta).
    use_scale: if True, multiply by the learned ``scale`` (gamma).
    bias_init: initializer for ``bias``.
    scale_init: initializer for ``scale``.
    axis_name: mapped axis (``nn.vmap``, ``shard_map``, ``pmap``) whose
      members share statistics; pooled exactly, weighted by counts.
    axis_index_groups: sub-groups of ``axis_name`` that sync separately.
    use_fast_variance: accepted for compatibility; jaxbn's variance is always
      the stable one, at the same speed.
    force_float32_reductions: if False the statistics are stored in
      ``param_dtype`` (as Flax does); they are still reduced in float32.
    running_var: ``'biased'`` (Flax) or ``'unbiased'`` (PyTorch) running
      variance. Keyword only.
    virtual_batch_size: ghost batch norm: statistics per chunk of this many
      examples along axis 0 in training. Keyword only.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxbn.linen import BatchNorm
    >>> x = jax.random.normal(jax.random.key(0), (5, 6))
    >>> bn = BatchNorm(momentum=0.9)
    >>> variables = bn.init(jax.random.key(1), x, use_running_average=False)
    >>> jax.tree.map(jnp.shape, variables)
    {'batch_stats': {'mean': (6,), 'var': (6,)}, 'params': {'bias': (6,), 'scale': (6,)}}
    >>> y, updates = bn.apply(variables, x, use_running_average=False,
    ...                       mutable=['batch_stats'])
    >>> y_eval = bn.apply(variables | updates, x, use_running_average=True)
  """

  use_running_average: bool | None = None
  axis: int = -1
  momentum: float | None = 0.99
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  running_var: str = dataclasses.field(default='biased', kw_only=True)
  virtual_batch_size: int | None = dataclasses.field(default=None, kw_only=True)

  @nn.compact
  def __call__(
      self,
      x,
      use_running_average: bool | None = None,
      *,
      mask: jax.Array | None = None,
  ):
    """Normalizes ``x``; in training also updates ``batch_stats``.

    Args:
      x: the input.
      use_running_average: if True, use the stored statistics; must be given
        here or as the field of the same name (not both).
      mask: broadcastable to ``x``; False entries take no part in the
        statistics (they may hold NaN).

    Returns:
      The normalized input, same shape as ``x``.
    """
    use_running_average = nn.merge_param(
        'use_running_average', self.use_running_average, use_running_average)
    x = jnp.asarray(x)
    axes = _flax_common.feature_axes(self.axis, x.ndim)
    feature_shape = tuple(x.shape[a] for a in axes)
    if mask is not None:
      mask = jnp.asarray(mask, dtype=bool)  # Flax accepts 0/1 masks too

    # Variables in Flax's order (the order decides the params' rng keys).
    stored = jnp.float32 if self.force_float32_reductions else self.param_dtype
    ra_mean = self.variable('batch_stats', 'mean', lambda s: jnp.zeros(s, stored), feature_shape)
    ra_var = self.variable('batch_stats', 'var', lambda s: jnp.ones(s, stored), feature_shape)
    ra_count = None
    if self.momentum is None:
      ra_count = self.variable('batch_stats', 'count', lambda: jnp.zeros((), jnp.int32))
    scale = bias = None
    if self.use_scale:
      scale = self.param('scale', self.scale_init, feature_shape, self.param_dtype)
    if self.use_bias:
      bias = self.param('bias', self.bias_init, feature_shape, self.param_dtype)
    out_dtype = dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
    count = ra_count.value if ra_count is not None else jnp.zeros((), jnp.int32)

    state = BatchNormState(ra_mean.value, ra_var.value, count)

    if use_running_average:
      if not self.force_float32_reductions:
        state = state._replace(mean=jnp.asarray(state.mean, self.param_dtype),
                               var=jnp.asarray(state.var, self.param_dtype))
      y, _ = batch_norm(x, state, scale, bias, training=False, axis=axes,
                        epsilon=self.epsilon, mask=mask, dtype=out_dtype)
      return y

    if self.is_initializing():
      # Statistics are computed for the output but not stored, and the mapped
      # axis need not exist yet. A dummy batch of one is fine here.
      return _init_output(self, x, state, axes, scale, bias, mask, out_dtype)

    if not self.is_mutable_collection('batch_stats'):
      raise ValueError(
          'BatchNorm in training mode (use_running_average=False) updates its '
          "running statistics, but the 'batch_stats' collection is not "
          "mutable. Pass mutable=['batch_stats'] to apply (and keep the "
          'returned updates), use jaxbn.linen.apply_train, or set '
          'use_running_average=True for evaluation.')
    _flax_common.check_batch(x.shape, axes, mask=mask, axis_name=self.axis_name)
    y, new = batch_norm(
        x, state, scale, bias, training=True, axis=axes,
        momentum=self.momentum, epsilon=self.epsilon, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups, mask=mask,
        running_var=self.running_var,
        virtual_batch_size=self.virtual_batch_size, dtype=out_dtype)
    # Store with the dtypes Flax would produce (float32 stats by default).
    ra_mean.value = new.mean.astype(_stored_dtype(self, ra_mean.value, new.mean, x))
    ra_var.value = new.var.astype(_stored_dtype(self, ra_var.value, new.var, x))
    if ra_count is not None:
      ra_count.value = new.count
    return y


def apply_train(model: nn.Module, variables, *args, mutable=('batch_stats',), **kwargs):
  """Applies ``model`` with ``batch_stats`` mutable and merges the updates.

  Replaces the boilerplate
  ``y, updates = model.apply(variables, x, mutable=['batch_stats'])`` followed
  by ``variables = {**variables, **updates}``. Extra positional and keyword
  arguments (``rngs=``, ``method=``, the model's own) go to ``model.apply``.

  Args:
    model: a Linen module.
    variables: its variables, e.g. from ``model.init``.
    *args: positional arguments of the model's call.
    mutable: collections to update (``batch_stats`` by default; ``True``
      for all).
    **kwargs: keyword arguments for ``model.apply``.

  Returns:
    ``(output, new_variables)`` where ``new_variables`` holds the updated
    collections and every other collection of ``variables`` unchanged.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxbn.linen import BatchNorm, apply_train
    >>> model = BatchNorm(use_running_average=False)
    >>> x = jnp.arange(12.0).reshape(4, 3)
    >>> variables = model.init(jax.random.key(0), x)
    >>> y, variables = apply_train(model, variables, x)
    >>> variables['batch_stats']['mean']
    Array([0.045, 0.055, 0.065], dtype=float32)
  """
  if isinstance(mutable, str):
    mutable = [mutable]
  elif not isinstance(mutable, bool):
    mutable = list(mutable)
  out, updates = model.apply(variables, *args, mutable=mutable, **kwargs)
  if isinstance(variables, frozen_dict.FrozenDict):
    return out, variables.copy(updates)
  return out, {**variables, **updates}


# Helpers are plain functions, not methods: Linen's summary and interceptors
# record and replay every method call of a module.

def _init_output(mdl, x, state, axes, scale, bias, mask, out_dtype):
  ghost = mdl.virtual_batch_size
  one_value = mask is None and _flax_common.values_per_feature(x.shape, axes) <= 1
  ragged = isinstance(ghost, int) and ghost > 0 and x.shape[0] % ghost != 0
  if not (one_value or ragged):
    y, _ = batch_norm(
        x, state, scale, bias, training=True, axis=axes,
        momentum=mdl.momentum, epsilon=mdl.epsilon, mask=mask,
        running_var=mdl.running_var, virtual_batch_size=ghost,
        dtype=out_dtype)
    return y
  # Shape inference with a batch the layer cannot train on: plain batch
  # statistics, as Flax would compute them.
  m = moments(x, axes, mask=mask)
  return normalize(x, m.mean, m.var, scale, bias, axis=axes,
                   epsilon=mdl.epsilon, dtype=out_dtype)


def _stored_dtype(mdl, old, new, x):
  if not mdl.force_float32_reductions:
    # Flax keeps these statistics in the input's (or `dtype`'s) precision.
    kind = jnp.dtype(mdl.dtype or x.dtype)
    if not jnp.issubdtype(new.dtype, jnp.complexfloating):
      kind = jnp.finfo(kind).dtype
    return jnp.result_type(old.dtype, kind)
  return new.dtype
