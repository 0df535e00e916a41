"""``jaxbn.nnx.BatchNorm``: a drop-in replacement for ``flax.nnx.BatchNorm``.

Same constructor, variables (``scale``/``bias`` Params, ``mean``/``var``
BatchStats), train/eval switching (``model.train()``, ``model.eval()``,
``nnx.view``) and outputs as Flax's layer; the statistics come from
:func:`jaxbn.batch_norm`, which is exact where Flax's default fast variance
cancels (inputs with a large mean). Change one import::

  from jaxbn.nnx import BatchNorm   # instead of nnx.BatchNorm

Example:
  >>> import jax, jax.numpy as jnp
  >>> from flax import nnx
  >>> import jaxbn.nnx
  >>> bn = jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
  >>> x = 1e4 + jax.random.normal(jax.random.key(0), (64, 3))
  >>> y = bn(x)                       # training mode: batch statistics
  >>> bool(jnp.allclose(y.std(0), 1.0, atol=1e-3))
  True
  >>> bn.eval()                       # running statistics from now on
  >>> bn(x).shape
  (64, 3)
"""

from __future__ import annotations

import numbers
import typing as tp
from types import MappingProxyType

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.module import first_from
from flax.nnx.nn import dtypes
from flax.nnx.nn import initializers
from flax.typing import Axes, Dtype, Initializer, PromoteDtypeFn

from jaxbn import _checks
from jaxbn import _flax_common
from jaxbn._functional import batch_norm
from jaxbn._norms import instance_norm
from jaxbn._norms import layer_norm
from jaxbn._renorm import batch_renorm
from jaxbn._state import BatchNormState

__all__ = ['BatchNorm', 'BatchRenorm', 'GroupNorm', 'InstanceNorm', 'LayerNorm']


class BatchNorm(nnx.Module):
  """Batch normalization layer, argument-for-argument ``flax.nnx.BatchNorm``.

  In training mode (``use_running_average=False``, the default, or after
  ``model.train()``) the input is normalized with its batch statistics and
  ``mean``/``var`` are updated as ``new = momentum * old + (1 - momentum) *
  batch``. In evaluation mode (``model.eval()``) the running statistics are
  used and nothing changes.

  Args:
    num_features: size of the feature axis (the product of the sizes when
      ``axis`` is a tuple).
    use_running_average: if True, normalize with the stored statistics.
    axis: the feature axis (or axes) of the input.
    momentum: decay of the running averages. ``None``: cumulative average
      over all training steps (adds a ``count`` BatchStat).
    epsilon: added to the variance before the square root.
    dtype: dtype of the result (default: inferred from input and params).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias: if True, add the learned ``bias`` (beta).
    use_scale: if True, multiply by the learned ``scale`` (gamma).
    bias_init: initializer for ``bias``.
    scale_init: initializer for ``scale``.
    axis_name: mapped axis (``nnx.vmap``, ``shard_map``, ``pmap``) whose
      members share statistics; pooled exactly, weighted by counts.
    axis_index_groups: sub-groups of ``axis_name`` that sync separately.
    use_fast_variance: accepted for compatibility and ignored: jaxbn's
      variance is always the stable one.
    promote_dtype: Flax's hook that promotes ``(x, mean, var, scale, bias)``
      to a common dtype.
    rngs: random streams for the initializers.
    bias_metadata: metadata for the ``bias`` Param.
    scale_metadata: metadata for the ``scale`` Param.
    running_var: ``'biased'`` (Flax) or ``'unbiased'`` (PyTorch) running
      variance.
    virtual_batch_size: ghost batch norm: statistics per chunk of this many
      examples along axis 0 in training.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxbn.nnx import BatchNorm
    >>> layer = BatchNorm(6, momentum=0.9, rngs=nnx.Rngs(0))
    >>> sorted(nnx.state(layer).keys())
    ['bias', 'mean', 'scale', 'var']
    >>> y = layer(jax.random.normal(jax.random.key(0), (5, 6)))
    >>> layer.eval(); layer.use_running_average
    True
  """

  def __init__(
      self,
      num_features: int,
      *,
      use_running_average: bool | None = False,
      axis: int = -1,
      momentum: float | None = 0.99,
      epsilon: float = 1e-5,
      dtype: tp.Optional[Dtype] = None,
      param_dtype: Dtype = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = initializers.zeros_init(),
      scale_init: Initializer = initializers.ones_init(),
      axis_name: tp.Optional[str] = None,
      axis_index_groups: tp.Any = None,
      use_fast_variance: bool = True,
      promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
      scale_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
      running_var: str = 'biased',
      virtual_batch_size: int | None = None,
  ):
    _check_num_features(num_features)
    _checks.momentum(momentum)
    _checks.epsilon(epsilon)
    _checks.running_var(running_var)
    _checks.axis_groups(axis_name, axis_index_groups)
    _checks.virtual_batch_size(virtual_batch_size)
    feature_shape = (num_features,)
    # Same variables, creation order and dtypes as Flax, so that state dicts
    # are interchangeable and initializers draw the same keys.
    self.mean = nnx.BatchStat(jnp.zeros(feature_shape, jnp.float32))
    self.var = nnx.BatchStat(jnp.ones(feature_shape, jnp.float32))
    if momentum is None:
      self.count = nnx.BatchStat(jnp.zeros((), jnp.int32))

    self.scale: nnx.Param[jax.Array] | None
    if use_scale:
      self.scale = nnx.Param(
          scale_init(rngs.params(), feature_shape, param_dtype), **scale_metadata)
    else:
      self.scale = nnx.data(None)
    self.bias: nnx.Param[jax.Array] | None
    if use_bias:
      self.bias = nnx.Param(
          bias_init(rngs.params(), feature_shape, param_dtype), **bias_metadata)
    else:
      self.bias = nnx.data(None)

    # Initializers and metadata are not stored: the graphdef must not depend
    # on them (as in Flax).
    self.num_features = num_features
    self.use_running_average = use_running_average
    self.axis = axis
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype
    self.running_var = running_var
    self.virtual_batch_size = virtual_batch_size

  def __call__(
      self,
      x,
      use_running_average: tp.Optional[bool] = None,
      *,
      mask: tp.Optional[jax.Array] = None,
  ):
    """Normalizes ``x``; in training mode also updates ``mean`` and ``var``.

    Args:
      x: the input.
      use_running_average: overrides the attribute of the same name for this
        call (True: use the stored statistics).
      mask: boolean, broadcastable to ``x``; False entries take no part in
        the statistics (they may hold NaN).

    Returns:
      The normalized input, same shape as ``x``.
    """
    def train(x, state, scale, bias, *, axes, out_dtype):
      return batch_norm(
          x, state, scale, bias, training=True, axis=axes,
          momentum=self.momentum, epsilon=self.epsilon, axis_name=self.axis_name,
          axis_index_groups=self.axis_index_groups, mask=mask,
          running_var=self.running_var,
          virtual_batch_size=self.virtual_batch_size, dtype=out_dtype)

    return _batch_stats_call(self, x, use_running_average, mask, train)

  def set_view(
      self,
      use_running_average: bool | None = None,
  ):
    """Sets the mode; called by ``nnx.view``.

    Args:
      use_running_average: if True, the stored batch statistics will be
        used instead of computing the batch statistics on the input.
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average


class BatchRenorm(BatchNorm):
  """Batch renormalization (Ioffe, 2017) with ``flax.nnx.BatchNorm``'s interface.

  Same arguments and variables as :class:`BatchNorm` (``scale``/``bias``
  Params, ``mean``/``var`` BatchStats), plus the correction limits
  ``r_max`` and ``d_max`` of :func:`jaxbn.batch_renorm`. In training the
  batch statistics are corrected towards the running ones, so that training
  and evaluation compute the same function in expectation; evaluation is
  plain batch norm with the running statistics (so folding, precise BN and
  freezing treat it as a batch norm).

  A limit may be a schedule ``step -> value`` such as
  :func:`jaxbn.r_max_schedule`: then a ``count`` BatchStat holds the number
  of training steps taken (it also exists with ``momentum=None``) and the
  warm-up advances by itself, inside ``nnx.jit`` too. With plain numbers no
  extra variable exists.

  Args:
    num_features: size of the feature axis (the product of the sizes when
      ``axis`` is a tuple).
    r_max: bound of the variance correction ``r`` in ``[1/r_max, r_max]``
      (``>= 1``), or a schedule ``step -> r_max``.
    d_max: bound of the mean correction ``d`` in ``[-d_max, d_max]``
      (``>= 0``), or a schedule ``step -> d_max``. ``r_max=1, d_max=0`` is
      batch norm.
    running_var: ``'biased'`` (Flax) or ``'unbiased'`` (PyTorch) running
      variance.

    The other arguments are :class:`BatchNorm`'s.

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> from flax import nnx
    >>> layer = jaxbn.nnx.BatchRenorm(
    ...     4, r_max=jaxbn.r_max_schedule(3.0, warmup_steps=2, end_step=4),
    ...     d_max=5.0, rngs=nnx.Rngs(0))
    >>> sorted(nnx.state(layer).keys())
    ['bias', 'count', 'mean', 'scale', 'var']
    >>> step = nnx.jit(lambda m, x: m(x))
    >>> for i in range(3):
    ...   y = step(layer, jax.random.normal(jax.random.key(i), (16, 4)))
    >>> int(layer.count[...])
    3
  """

  def __init__(
      self,
      num_features: int,
      *,
      use_running_average: bool | None = False,
      axis: int = -1,
      momentum: float | None = 0.99,
      epsilon: float = 1e-5,
      dtype: tp.Optional[Dtype] = None,
      param_dtype: Dtype = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = initializers.zeros_init(),
      scale_init: Initializer = initializers.ones_init(),
      axis_name: tp.Optional[str] = None,
      axis_index_groups: tp.Any = None,
      use_fast_variance: bool = True,
      promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
      scale_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
      r_max: float | tp.Callable[[jax.Array], jax.Array] = 3.0,
      d_max: float | tp.Callable[[jax.Array], jax.Array] = 5.0,
      running_var: str = 'biased',
  ):
    _flax_common.check_renorm_limits(r_max, d_max)
    super().__init__(
        num_features, use_running_average=use_running_average, axis=axis,
        momentum=momentum, epsilon=epsilon, dtype=dtype,
        param_dtype=param_dtype, use_bias=use_bias, use_scale=use_scale,
        bias_init=bias_init, scale_init=scale_init, axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        use_fast_variance=use_fast_variance, promote_dtype=promote_dtype,
        rngs=rngs, bias_metadata=bias_metadata, scale_metadata=scale_metadata,
        running_var=running_var)
    if momentum is not None and (callable(r_max) or callable(d_max)):
      # The training-step count drives the schedules.
      self.count = nnx.BatchStat(jnp.zeros((), jnp.int32))
    # Numbers and schedule functions are static (part of the graph
    # definition); a schedule's value comes from the `count` BatchStat.
    self.r_max = float(r_max) if not callable(r_max) else r_max
    self.d_max = float(d_max) if not callable(d_max) else d_max

  def __call__(
      self,
      x,
      use_running_average: tp.Optional[bool] = None,
      *,
      mask: tp.Optional[jax.Array] = None,
  ):
    """Normalizes ``x``; in training also updates ``mean``, ``var`` (``count``).

    Args:
      x: the input.
      use_running_average: overrides the attribute of the same name for this
        call (True: use the stored statistics).
      mask: boolean, broadcastable to ``x``; False entries take no part in
        the statistics.

    Returns:
      The normalized input, same shape as ``x``.
    """

    def train(x, state, scale, bias, *, axes, out_dtype):
      r_max, d_max = _flax_common.renorm_limits(self.r_max, self.d_max, state.count)
      return batch_renorm(
          x, state, scale, bias, training=True, r_max=r_max, d_max=d_max,
          axis=axes, momentum=self.momentum, epsilon=self.epsilon,
          axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
          mask=mask, running_var=self.running_var, dtype=out_dtype)

    return _batch_stats_call(self, x, use_running_average, mask, train)

class LayerNorm(nnx.Module):
  """Layer normalization, argument-for-argument ``flax.nnx.LayerNorm``.

  Statistics over ``reduction_axes`` of each example, from
  :func:`jaxbn.layer_norm`: exact where Flax's fast variance cancels
  (activations with a large mean). ``scale``/``bias`` Params of shape
  ``(num_features,)`` vary along ``feature_axes``. ``use_fast_variance`` is
  accepted and changes nothing; ``axis_name`` pools the statistics over a
  mapped axis, exactly (by count).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxbn.nnx import LayerNorm
    >>> layer = LayerNorm(6, rngs=nnx.Rngs(0))
    >>> x = 1e4 + jax.random.normal(jax.random.key(0), (2, 6))
    >>> bool(jnp.allclose(layer(x).std(-1), 1.0, atol=1e-3))
    True
  """

  def __init__(
      self,
      num_features: int,
      *,
      epsilon: float = 1e-6,
      dtype: tp.Optional[Dtype] = None,
      param_dtype: Dtype = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = initializers.zeros_init(),
      scale_init: Initializer = initializers.ones_init(),
      reduction_axes: Axes = -1,
      feature_axes: Axes = -1,
      axis_name: tp.Optional[str] = None,
      axis_index_groups: tp.Any = None,
      use_fast_variance: bool = True,
      promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
      scale_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
  ):
    _checks.epsilon(epsilon)
    _checks.axis_groups(axis_name, axis_index_groups)
    self.scale, self.bias = _affine_params(
        (num_features,), use_scale, use_bias, scale_init, bias_init,
        param_dtype, rngs, scale_metadata, bias_metadata)
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.reduction_axes = reduction_axes
    self.feature_axes = feature_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype

  def __call__(self, x, *, mask: tp.Optional[jax.Array] = None):
    """Normalizes each example of ``x`` over ``reduction_axes``.

    Args:
      x: the input.
      mask: broadcastable to ``x``; False entries take no part in the
        statistics.

    Returns:
      The normalized input, same shape and (promoted) dtype as Flax's.
    """
    x, scale, bias, out_dtype = _promoted(self, x)
    return layer_norm(x, scale, bias, reduction_axes=self.reduction_axes,
                      feature_axes=self.feature_axes, epsilon=self.epsilon,
                      mask=_flax_common.bool_mask(mask), dtype=out_dtype,
                      axis_name=self.axis_name,
                      axis_index_groups=self.axis_index_groups)


class GroupNorm(nnx.Module):
  """Group normalization, argument-for-argument ``flax.nnx.GroupNorm``.

  Channels last; statistics per example and per group of channels, from
  :func:`jaxbn.group_norm` (exact where Flax's fast variance cancels). Give
  ``num_groups`` or ``group_size`` (then ``num_groups=None``);
  ``reduction_axes`` limits the statistics to some axes (it must include the
  last). ``axis_name`` pools the statistics over a mapped axis, exactly (by count).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxbn.nnx import GroupNorm
    >>> layer = GroupNorm(6, num_groups=3, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 4, 4, 6))).shape
    (2, 4, 4, 6)
    >>> layer.num_groups, layer.group_size
    (3, 2)
  """

  def __init__(
      self,
      num_features: int,
      num_groups: tp.Optional[int] = 32,
      group_size: tp.Optional[int] = None,
      *,
      epsilon: float = 1e-6,
      dtype: tp.Optional[Dtype] = None,
      param_dtype: Dtype = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = initializers.zeros_init(),
      scale_init: Initializer = initializers.ones_init(),
      reduction_axes: tp.Optional[Axes] = None,
      axis_name: tp.Optional[str] = None,
      axis_index_groups: tp.Any = None,
      use_fast_variance: bool = True,
      promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
      scale_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
  ):
    _checks.epsilon(epsilon)
    _checks.axis_groups(axis_name, axis_index_groups)
    self.feature_axis = -1
    groups, _ = _flax_common.group_norm_layout(
        (num_features,), num_groups, group_size, None)
    self.num_groups = groups
    self.group_size = num_features // groups
    self.scale, self.bias = _affine_params(
        (num_features,), use_scale, use_bias, scale_init, bias_init,
        param_dtype, rngs, scale_metadata, bias_metadata)
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.reduction_axes = reduction_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype

  def __call__(self, x, *, mask: tp.Optional[jax.Array] = None):
    """Normalizes each group of channels of each example of ``x``.

    Args:
      x: the input, channels last.
      mask: broadcastable to ``x``; False entries take no part in the
        statistics.

    Returns:
      The normalized input, same shape and (promoted) dtype as Flax's.
    """
    x, scale, bias, out_dtype = _promoted(self, x)
    return _flax_common.group_norm_call(
        x, scale, bias, num_groups=self.num_groups, group_size=None,
        reduction_axes=self.reduction_axes, epsilon=self.epsilon,
        mask=_flax_common.bool_mask(mask), dtype=out_dtype, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups)


class InstanceNorm(nnx.Module):
  """Instance normalization, argument-for-argument ``flax.nnx.InstanceNorm``.

  Statistics per example and per feature over every other axis but the
  batch axis 0, from :func:`jaxbn.instance_norm` (exact where Flax's fast
  variance cancels). ``axis_name`` pools the statistics over a mapped axis,
  exactly (by count).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxbn.nnx import InstanceNorm
    >>> layer = InstanceNorm(3, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3)) + 100.0
    >>> bool(abs(layer(x).mean(axis=(1, 2))).max() < 1e-4)
    True
  """

  def __init__(
      self,
      num_features: int,
      *,
      epsilon: float = 1e-6,
      dtype: tp.Optional[Dtype] = None,
      param_dtype: Dtype = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = initializers.zeros,
      scale_init: Initializer = initializers.ones,
      feature_axes: Axes = -1,
      axis_name: tp.Optional[str] = None,
      axis_index_groups: tp.Any = None,
      use_fast_variance: bool = True,
      promote_dtype: PromoteDtypeFn = dtypes.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
      scale_metadata: tp.Mapping[str, tp.Any] = MappingProxyType({}),
  ):
    _checks.epsilon(epsilon)
    _checks.axis_groups(axis_name, axis_index_groups)
    # Flax's InstanceNorm stores a plain (static) None for a missing param.
    self.scale, self.bias = _affine_params(
        (num_features,), use_scale, use_bias, scale_init, bias_init,
        param_dtype, rngs, scale_metadata, bias_metadata, missing=lambda: None)
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.feature_axes = feature_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype

  def __call__(self, x, *, mask: tp.Optional[jax.Array] = None):
    """Normalizes each feature of each example of ``x``.

    Args:
      x: the input, batch axis first.
      mask: broadcastable to ``x``; False entries take no part in the
        statistics.

    Returns:
      The normalized input, same shape and (promoted) dtype as Flax's.
    """
    x, scale, bias, out_dtype = _promoted(self, x)
    return instance_norm(x, scale, bias, feature_axes=self.feature_axes,
                         epsilon=self.epsilon, mask=_flax_common.bool_mask(mask),
                         dtype=out_dtype, axis_name=self.axis_name,
                         axis_index_groups=self.axis_index_groups)


# Helpers are plain functions, not methods: nnx.tabulate records every method
# call of a module.


def _batch_stats_call(layer, x, use_running_average, mask, train):
  """The part of ``__call__`` shared by BatchNorm and BatchRenorm.

  Resolves the mode, promotes dtypes as Flax does and threads the
  ``mean``/``var``(/``count``) BatchStats through ``train(x, state, scale,
  bias, axes=..., out_dtype=...) -> (y, new_state)``; evaluation is plain
  normalization with the running statistics for both layers.
  """
  name = type(layer).__name__
  use_running_average = first_from(
      use_running_average,
      layer.use_running_average,
      error_msg=(
          f'No `use_running_average` argument was provided to {name}. '
          f'Pass it to the constructor ({name}(..., '
          'use_running_average=True/False)), to the call (bn(x, '
          'use_running_average=True/False)), or switch the whole model with '
          'model.train() / model.eval() or nnx.view(model, '
          'use_running_average=True/False).'),
  )
  axes = _flax_common.feature_axes(layer.axis, jnp.ndim(x))
  _flax_common.check_num_features(layer.num_features, jnp.shape(x), axes, layer.axis,
                                  layer=name)
  feature_shape = tuple(jnp.shape(x)[a] for a in axes)

  scale = layer.scale[...] if layer.scale is not None else None
  bias = layer.bias[...] if layer.bias is not None else None
  x, mean, var, scale, bias = layer.promote_dtype(
      (x, layer.mean[...], layer.var[...], scale, bias), dtype=layer.dtype)
  out_dtype = dtypes.canonicalize_dtype(x, scale, bias, dtype=layer.dtype)
  count = layer.count[...] if _has_count(layer) else jnp.zeros((), jnp.int32)

  if use_running_average:
    # Flax normalizes with the promoted statistics in evaluation.
    state = BatchNormState(mean.reshape(feature_shape), var.reshape(feature_shape), count)
    y, _ = batch_norm(x, state, scale, bias, training=False, axis=axes,
                      epsilon=layer.epsilon, mask=mask, dtype=out_dtype)
    return y

  if _needs_count(layer) and not _has_count(layer):
    raise ValueError(
        f'{_count_reason(layer)} needs the `count` BatchStat, which is '
        f'created only when the layer is built that way; rebuild the {name} '
        'instead of changing the attribute afterwards.')
  _flax_common.check_batch(jnp.shape(x), axes, mask=mask, axis_name=layer.axis_name,
                           layer=name)
  # The running statistics are updated from the stored float32 values, not
  # the promoted ones, as in Flax.
  state = BatchNormState(layer.mean[...].reshape(feature_shape),
                         layer.var[...].reshape(feature_shape), count)
  y, new = train(x, state, scale, bias, axes=axes, out_dtype=out_dtype)
  new = jax.lax.stop_gradient(new)
  layer.mean[...] = new.mean.reshape(layer.mean.shape)
  layer.var[...] = new.var.reshape(layer.var.shape)
  if _has_count(layer):
    layer.count[...] = new.count
  return y


def _has_count(layer) -> bool:
  return isinstance(getattr(layer, 'count', None), nnx.BatchStat)


def _needs_count(layer) -> bool:
  return layer.momentum is None or _flax_common.uses_schedule(layer)


def _count_reason(layer) -> str:
  if layer.momentum is None:
    return 'momentum=None (cumulative average)'
  return 'an r_max/d_max schedule (a function of the step)'


def _check_num_features(num_features) -> None:
  if not isinstance(num_features, numbers.Integral) or isinstance(num_features, bool):
    raise TypeError(
        f'num_features must be an int (the size of the feature axis), got '
        f'{num_features!r}; for several feature axes pass the product of '
        'their sizes.')
  if num_features < 1:
    raise ValueError(f'num_features must be >= 1, got {num_features}.')


def _affine_params(shape, use_scale, use_bias, scale_init, bias_init,
                   param_dtype, rngs, scale_metadata, bias_metadata,
                   missing=lambda: nnx.data(None)):
  """``scale`` then ``bias`` Params (Flax's order: same rng keys)."""
  scale, bias = missing(), missing()
  if use_scale:
    scale = nnx.Param(scale_init(rngs.params(), shape, param_dtype), **scale_metadata)
  if use_bias:
    bias = nnx.Param(bias_init(rngs.params(), shape, param_dtype), **bias_metadata)
  return scale, bias


def _promoted(layer, x):
  """Flax's dtype handling: promote ``(x, scale, bias)``, infer the output dtype."""
  scale = layer.scale[...] if layer.scale is not None else None
  bias = layer.bias[...] if layer.bias is not None else None
  x, scale, bias = layer.promote_dtype((x, scale, bias), dtype=layer.dtype)
  return x, scale, bias, dtypes.canonicalize_dtype(x, scale, bias, dtype=layer.dtype)
