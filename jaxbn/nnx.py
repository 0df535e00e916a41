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
from flax.typing import Dtype, Initializer, PromoteDtypeFn

from jaxbn import _checks
from jaxbn import _flax_common
from jaxbn._functional import batch_norm
from jaxbn._state import BatchNormState

__all__ = ['BatchNorm']


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
    use_fast_variance: accepted for compatibility; jaxbn's variance is always
      the stable one, at the same speed.
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
    use_running_average = first_from(
        use_running_average,
        self.use_running_average,
        error_msg=(
            'No `use_running_average` argument was provided to BatchNorm. '
            'Pass it to the constructor (BatchNorm(..., '
            'use_running_average=True/False)), to the call (bn(x, '
            'use_running_average=True/False)), or switch the whole model with '
            'model.train() / model.eval() or nnx.view(model, '
            'use_running_average=True/False).'),
    )
    axes = _flax_common.feature_axes(self.axis, jnp.ndim(x))
    _flax_common.check_num_features(self.num_features, jnp.shape(x), axes, self.axis)
    feature_shape = tuple(jnp.shape(x)[a] for a in axes)

    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    x, mean, var, scale, bias = self.promote_dtype(
        (x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype)
    out_dtype = dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
    count = self.count[...] if _has_count(self) else jnp.zeros((), jnp.int32)

    if use_running_average:
      # Flax normalizes with the promoted statistics in evaluation.
      state = BatchNormState(mean.reshape(feature_shape), var.reshape(feature_shape), count)
      y, _ = batch_norm(x, state, scale, bias, training=False, axis=axes,
                        epsilon=self.epsilon, mask=mask, dtype=out_dtype)
      return y

    if self.momentum is None and not _has_count(self):
      raise ValueError(
          'momentum=None (cumulative average) needs the `count` BatchStat, '
          'which is created only when the layer is built with momentum=None; '
          'rebuild the layer instead of changing `momentum` afterwards.')
    _flax_common.check_batch(jnp.shape(x), axes, mask=mask, axis_name=self.axis_name)
    # The running statistics are updated from the stored float32 values, not
    # the promoted ones, as in Flax.
    state = BatchNormState(self.mean[...].reshape(feature_shape),
                           self.var[...].reshape(feature_shape), count)
    y, new = batch_norm(
        x, state, scale, bias, training=True, axis=axes,
        momentum=self.momentum, epsilon=self.epsilon, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups, mask=mask,
        running_var=self.running_var,
        virtual_batch_size=self.virtual_batch_size, dtype=out_dtype)
    new = jax.lax.stop_gradient(new)
    self.mean[...] = new.mean.reshape(self.mean.shape)
    self.var[...] = new.var.reshape(self.var.shape)
    if _has_count(self):
      self.count[...] = new.count
    return y

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


# Helpers are plain functions, not methods: nnx.tabulate records every method
# call of a module.


def _has_count(layer) -> bool:
  return isinstance(getattr(layer, 'count', None), nnx.BatchStat)


def _check_num_features(num_features) -> None:
  if not isinstance(num_features, numbers.Integral) or isinstance(num_features, bool):
    raise TypeError(
        f'num_features must be an int (the size of the feature axis), got '
        f'{num_features!r}; for several feature axes pass the product of '
        'their sizes.')
  if num_features < 1:
    raise ValueError(f'num_features must be >= 1, got {num_features}.')
