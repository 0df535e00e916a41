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
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.core import frozen_dict
from flax.linen import dtypes
from flax.typing import Axes, Dtype, Initializer
from jax.nn import initializers

from jaxbn import _checks
from jaxbn import _flax_common
from jaxbn._functional import batch_norm
from jaxbn._functional import moments
from jaxbn._functional import normalize
from jaxbn._norms import instance_norm
from jaxbn._norms import layer_norm
from jaxbn._renorm import batch_renorm
from jaxbn._state import BatchNormState

__all__ = ['BatchNorm', 'BatchRenorm', 'GroupNorm', 'InstanceNorm', 'LayerNorm',
           'apply_train']


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
    use_fast_variance: accepted for compatibility and ignored: jaxbn's
      variance is always the stable one.
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
    # Checked in every mode: an evaluation-only init or apply would otherwise
    # accept a size that fails at the first training call.
    _checks.virtual_batch_size(self.virtual_batch_size)
    mask = _flax_common.bool_mask(mask)

    def train(x, state, scale, bias, *, axes, out_dtype, sync):
      return batch_norm(
          x, state, scale, bias, training=True, axis=axes,
          momentum=self.momentum, epsilon=self.epsilon,
          **_sync_kwargs(self, sync), mask=mask, running_var=self.running_var,
          virtual_batch_size=self.virtual_batch_size, dtype=out_dtype)

    return _batch_stats_call(self, x, use_running_average, mask, train,
                             with_count=self.momentum is None)


class BatchRenorm(nn.Module):
  """Batch renormalization (Ioffe, 2017) with ``flax.linen.BatchNorm``'s fields.

  Same fields and variables as :class:`BatchNorm` (``params/{scale,bias}``,
  ``batch_stats/{mean,var}``), plus the correction limits ``r_max`` and
  ``d_max`` of :func:`jaxbn.batch_renorm` (keyword only). In training the
  batch statistics are corrected towards the running ones; evaluation is
  plain batch norm with the running statistics.

  A limit may be a schedule ``step -> value`` such as
  :func:`jaxbn.r_max_schedule`: then ``batch_stats/count`` holds the number
  of training steps taken (it also exists with ``momentum=None``) and the
  warm-up advances by itself inside ``jit``. With plain numbers no extra
  variable exists.

  Attributes:
    r_max: bound of the variance correction ``r`` in ``[1/r_max, r_max]``
      (``>= 1``), or a schedule ``step -> r_max``.
    d_max: bound of the mean correction ``d`` in ``[-d_max, d_max]``
      (``>= 0``), or a schedule ``step -> d_max``. ``r_max=1, d_max=0`` is
      batch norm.
    running_var: ``'biased'`` (Flax) or ``'unbiased'`` (PyTorch) running
      variance.

    The other fields are :class:`BatchNorm`'s.

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> from jaxbn.linen import BatchRenorm, apply_train
    >>> layer = BatchRenorm(use_running_average=False,
    ...                     d_max=jaxbn.d_max_schedule(5.0, warmup_steps=1, end_step=3))
    >>> x = jax.random.normal(jax.random.key(0), (16, 4))
    >>> variables = layer.init(jax.random.key(1), x)
    >>> sorted(variables['batch_stats'])
    ['count', 'mean', 'var']
    >>> for _ in range(2):
    ...   y, variables = apply_train(layer, variables, x)
    >>> int(variables['batch_stats']['count'])
    2
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
  r_max: float | Callable[[jax.Array], jax.Array] = dataclasses.field(default=3.0, kw_only=True)
  d_max: float | Callable[[jax.Array], jax.Array] = dataclasses.field(default=5.0, kw_only=True)
  running_var: str = dataclasses.field(default='biased', kw_only=True)

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
        statistics.

    Returns:
      The normalized input, same shape as ``x``.
    """
    _flax_common.check_renorm_limits(self.r_max, self.d_max)
    mask = _flax_common.bool_mask(mask)

    def train(x, state, scale, bias, *, axes, out_dtype, sync):
      r_max, d_max = _flax_common.renorm_limits(self.r_max, self.d_max, state.count)
      return batch_renorm(
          x, state, scale, bias, training=True, r_max=r_max, d_max=d_max,
          axis=axes, momentum=self.momentum, epsilon=self.epsilon,
          **_sync_kwargs(self, sync), mask=mask, running_var=self.running_var,
          dtype=out_dtype)

    # The step count drives the cumulative average and the schedules.
    with_count = self.momentum is None or _flax_common.uses_schedule(self)
    return _batch_stats_call(self, x, use_running_average, mask, train,
                             with_count=with_count)


class LayerNorm(nn.Module):
  """Layer normalization, field-for-field ``flax.linen.LayerNorm``.

  Statistics over ``reduction_axes`` of each example, from
  :func:`jaxbn.layer_norm`: exact where Flax's fast variance cancels
  (activations with a large mean). ``params/{scale,bias}`` have the shape of
  ``feature_axes``. ``use_fast_variance`` is accepted and changes nothing;
  ``force_float32_reductions=False`` keeps float32 statistics all the same;
  ``axis_name`` pools the statistics over a mapped axis, exactly (by count).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxbn.linen import LayerNorm
    >>> x = 1e4 + jax.random.normal(jax.random.key(0), (2, 6))
    >>> layer = LayerNorm()
    >>> variables = layer.init(jax.random.key(1), x)
    >>> jax.tree.map(jnp.shape, variables)
    {'params': {'bias': (6,), 'scale': (6,)}}
    >>> bool(jnp.allclose(layer.apply(variables, x).std(-1), 1.0, atol=1e-3))
    True
  """

  epsilon: float = 1e-6
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  reduction_axes: Axes = -1
  feature_axes: Axes = -1
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True

  @nn.compact
  def __call__(self, x, *, mask: jax.Array | None = None):
    """Normalizes each example of ``x`` over ``reduction_axes``."""
    x = _flax_common.floating_input(x)
    axes = _checks.canonical_axes(self.feature_axes, x.ndim, 'feature_axes')
    scale, bias, out_dtype = _affine_params(self, x, tuple(x.shape[a] for a in axes))
    return layer_norm(x, scale, bias, reduction_axes=self.reduction_axes,
                      feature_axes=axes, epsilon=self.epsilon,
                      mask=_flax_common.bool_mask(mask), dtype=out_dtype,
                      axis_name=self.axis_name,
                      axis_index_groups=self.axis_index_groups)


class GroupNorm(nn.Module):
  """Group normalization, field-for-field ``flax.linen.GroupNorm``.

  Channels last; statistics per example and per group of channels, from
  :func:`jaxbn.group_norm` (exact where Flax's fast variance cancels). Give
  ``num_groups`` or ``group_size`` (then ``num_groups=None``);
  ``reduction_axes`` limits the statistics to some axes (it must include the
  last). ``axis_name`` pools the statistics over a mapped axis, exactly (by count).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxbn.linen import GroupNorm
    >>> x = jax.random.normal(jax.random.key(0), (2, 4, 4, 6))
    >>> layer = GroupNorm(num_groups=3)
    >>> variables = layer.init(jax.random.key(1), x)
    >>> layer.apply(variables, x).shape
    (2, 4, 4, 6)
  """

  num_groups: int | None = 32
  group_size: int | None = None
  epsilon: float = 1e-6
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  reduction_axes: Axes | None = None
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True

  @nn.compact
  def __call__(self, x, *, mask: jax.Array | None = None):
    """Normalizes each group of channels of each example of ``x``."""
    x = _flax_common.floating_input(x)
    # Check the group layout before creating parameters, as Flax does.
    _flax_common.group_norm_layout(x.shape, self.num_groups, self.group_size,
                                   self.reduction_axes)
    scale, bias, out_dtype = _affine_params(self, x, (x.shape[-1],))
    return _flax_common.group_norm_call(
        x, scale, bias, num_groups=self.num_groups, group_size=self.group_size,
        reduction_axes=self.reduction_axes, epsilon=self.epsilon,
        mask=_flax_common.bool_mask(mask), dtype=out_dtype, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups)


class InstanceNorm(nn.Module):
  """Instance normalization, field-for-field ``flax.linen.InstanceNorm``.

  Statistics per example and per feature over every other axis but the
  batch axis 0, from :func:`jaxbn.instance_norm` (exact where Flax's fast
  variance cancels). ``axis_name`` pools the statistics over a mapped axis,
  exactly (by count).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxbn.linen import InstanceNorm
    >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3)) + 100.0
    >>> layer = InstanceNorm()
    >>> y, _ = layer.init_with_output(jax.random.key(1), x)
    >>> bool(abs(y.mean(axis=(1, 2))).max() < 1e-4)
    True
  """

  epsilon: float = 1e-6
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  feature_axes: Axes = -1
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True

  @nn.compact
  def __call__(self, x, *, mask: jax.Array | None = None):
    """Normalizes each feature of each example of ``x``."""
    x = _flax_common.floating_input(x)
    axes = _checks.canonical_axes(self.feature_axes, x.ndim, 'feature_axes')
    if 0 in axes:
      raise ValueError(
          'InstanceNorm feature_axes must not include axis 0, the batch axis; '
          'put the batch first (e.g. NHWC with feature_axes=-1).')
    scale, bias, out_dtype = _affine_params(self, x, tuple(x.shape[a] for a in axes))
    return instance_norm(x, scale, bias, feature_axes=axes, epsilon=self.epsilon,
                         mask=_flax_common.bool_mask(mask), dtype=out_dtype,
                         axis_name=self.axis_name,
                         axis_index_groups=self.axis_index_groups)


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

def _batch_stats_call(mdl, x, use_running_average, mask, train, *, with_count):
  """The body of ``__call__`` shared by BatchNorm and BatchRenorm.

  Creates Flax's variables, handles modes, init and dtypes, and threads the
  ``batch_stats`` through ``train(x, state, scale, bias, axes=...,
  out_dtype=..., sync=...) -> (y, new_state)``; ``sync=False`` during
  ``init``, where the mapped axis need not exist. Evaluation is plain
  normalization with the running statistics for both layers.
  """
  name = type(mdl).__name__
  use_running_average = nn.merge_param(
      'use_running_average', mdl.use_running_average, use_running_average)
  x = _flax_common.floating_input(x)
  axes = _flax_common.feature_axes(mdl.axis, x.ndim)
  feature_shape = tuple(x.shape[a] for a in axes)

  # Variables in Flax's order (the order decides the params' rng keys).
  stored = jnp.float32 if mdl.force_float32_reductions else mdl.param_dtype
  ra_mean = mdl.variable('batch_stats', 'mean', lambda s: jnp.zeros(s, stored), feature_shape)
  ra_var = mdl.variable('batch_stats', 'var', lambda s: jnp.ones(s, stored), feature_shape)
  ra_count = None
  if with_count:
    ra_count = mdl.variable('batch_stats', 'count', lambda: jnp.zeros((), jnp.int32))
  scale = bias = None
  if mdl.use_scale:
    scale = mdl.param('scale', mdl.scale_init, feature_shape, mdl.param_dtype)
  if mdl.use_bias:
    bias = mdl.param('bias', mdl.bias_init, feature_shape, mdl.param_dtype)
  out_dtype = dtypes.canonicalize_dtype(x, scale, bias, dtype=mdl.dtype)
  count = ra_count.value if ra_count is not None else jnp.zeros((), jnp.int32)

  state = BatchNormState(ra_mean.value, ra_var.value, count)

  if use_running_average:
    if not mdl.force_float32_reductions:
      state = state._replace(mean=jnp.asarray(state.mean, mdl.param_dtype),
                             var=jnp.asarray(state.var, mdl.param_dtype))
    y, _ = batch_norm(x, state, scale, bias, training=False, axis=axes,
                      epsilon=mdl.epsilon, mask=mask, dtype=out_dtype)
    return y

  if mdl.is_initializing():
    # Statistics are computed for the output but not stored, and the mapped
    # axis need not exist yet. A dummy batch of one is fine here.
    return _init_output(mdl, x, state, axes, scale, bias, mask, out_dtype, train)

  if not mdl.is_mutable_collection('batch_stats'):
    raise ValueError(
        f'{name} in training mode (use_running_average=False) updates its '
        "running statistics, but the 'batch_stats' collection is not "
        "mutable. Pass mutable=['batch_stats'] to apply (and keep the "
        'returned updates), use jaxbn.linen.apply_train, or set '
        'use_running_average=True for evaluation.')
  _flax_common.check_batch(x.shape, axes, mask=mask, axis_name=mdl.axis_name, layer=name)
  # Updated in the dtypes they are stored in, so a narrow param_dtype does
  # not round the first update.
  state = state._replace(mean=_for_update(mdl, state.mean, x), var=_for_update(mdl, state.var, x))
  y, new = train(x, state, scale, bias, axes=axes, out_dtype=out_dtype, sync=True)
  ra_mean.value = new.mean
  ra_var.value = new.var
  if ra_count is not None:
    ra_count.value = new.count
  return y


def _init_output(mdl, x, state, axes, scale, bias, mask, out_dtype, train):
  ghost = getattr(mdl, 'virtual_batch_size', None)
  one_value = mask is None and _checks.one_value_per_feature(
      x.shape, _checks.complement_axes(axes, x.ndim))
  ragged = isinstance(ghost, int) and ghost > 0 and x.shape[0] % ghost != 0
  if not (one_value or ragged):
    y, _ = train(x, state, scale, bias, axes=axes, out_dtype=out_dtype, sync=False)
    return y
  # Shape inference with a batch the layer cannot train on: plain batch
  # statistics, as Flax would compute them.
  m = moments(x, axes, mask=mask)
  return normalize(x, m.mean, m.var, scale, bias, axis=axes,
                   epsilon=mdl.epsilon, dtype=out_dtype)


def _sync_kwargs(mdl, sync):
  if not sync:
    return dict(axis_name=None, axis_index_groups=None)
  return dict(axis_name=mdl.axis_name, axis_index_groups=mdl.axis_index_groups)


def _for_update(mdl, stat, x):
  """A running statistic in the dtype its updates are stored in: Flax's.

  That is float32 by default. With ``force_float32_reductions=False`` Flax
  stores ``param_dtype`` values updated with batch statistics in the input's
  (or ``dtype``'s) precision, so the wider of the two; a complex batch mean
  makes the mean complex (``update_state`` does that). Flax rounds
  ``momentum * old`` to ``param_dtype`` first; here the whole update runs in
  the wider dtype.
  """
  if mdl.force_float32_reductions:
    return stat
  return stat.astype(jnp.result_type(stat.dtype, jnp.finfo(mdl.dtype or x.dtype).dtype))


def _affine_params(mdl, x, shape):
  """``scale`` then ``bias`` params (Flax's order) and Flax's output dtype."""
  scale = bias = None
  if mdl.use_scale:
    scale = mdl.param('scale', mdl.scale_init, shape, mdl.param_dtype)
  if mdl.use_bias:
    bias = mdl.param('bias', mdl.bias_init, shape, mdl.param_dtype)
  return scale, bias, dtypes.canonicalize_dtype(x, scale, bias, dtype=mdl.dtype)
