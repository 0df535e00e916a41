"""Converting batch-norm weights from and to PyTorch and Keras.

Conventions, i.e. what to pass to :func:`jaxbn.batch_norm` to continue
training the way the source framework would:

* PyTorch ``BatchNorm{1,2,3}d(momentum=m)`` is ``momentum=1 - m`` (its
  default 0.1 is 0.9 here; ``None``, a cumulative average, is ``None`` here),
  ``running_var='unbiased'`` (PyTorch stores the n/(n-1)-corrected batch
  variance), ``axis=1`` for NCHW inputs and the same ``epsilon=1e-5``.
  ``num_batches_tracked`` is ``state.count``.
* Keras ``BatchNormalization(momentum=m)`` is ``momentum=m`` (same
  convention, default 0.99), biased running variance (the default here),
  ``axis=-1``, but ``epsilon=1e-3``: pass it. Keras keeps no update counter,
  so ``state.count`` starts at 0.

Names: ``weight``/``gamma`` is ``scale``, ``bias``/``beta`` is ``bias``,
``running_mean``/``moving_mean`` is ``state.mean`` and
``running_var``/``moving_variance`` is ``state.var``. Neither PyTorch nor
Keras is imported here: tensors are read through ``.detach().cpu().numpy()``;
:func:`from_torch` and :func:`from_keras` return JAX arrays, :func:`to_torch`
and :func:`to_keras` NumPy arrays.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from jaxbn import _checks
from jaxbn._state import BatchNormState

def from_torch(state_dict_or_module, prefix: str = ''):
  """Reads a PyTorch batch norm into ``(state, scale, bias)``.

  Args:
    state_dict_or_module: a ``torch.nn.BatchNorm{1,2,3}d`` (or any module
      holding one), or a state dict of tensors or arrays.
    prefix: where the layer sits in the state dict, e.g. ``'layer1.0.bn1'``
      (a trailing ``'.'`` is optional); empty for the layer itself.

  Returns:
    ``(BatchNormState, scale, bias)``; ``scale`` and ``bias`` are ``None``
    for ``affine=False``. Statistics are float32 (or wider).

  Example:
    >>> import torch, jaxbn
    >>> bn = torch.nn.BatchNorm2d(4)
    >>> _ = bn(torch.randn(8, 4, 5, 5))          # one training step in torch
    >>> state, scale, bias = jaxbn.from_torch(bn)
    >>> state.mean.shape, int(state.count)
    ((4,), 1)
    >>> x = torch.randn(2, 4, 5, 5)
    >>> y, _ = jaxbn.batch_norm(x.numpy(), state, scale, bias, training=False,
    ...                         axis=1, epsilon=bn.eps)
    >>> bool(abs(y - bn.eval()(x).detach().numpy()).max() < 1e-5)
    True
  """
  sd = _state_dict(state_dict_or_module)
  prefix = prefix + '.' if prefix and not prefix.endswith('.') else prefix
  get = lambda k: sd.get(prefix + k)
  if get('running_mean') is None or get('running_var') is None:
    raise ValueError(_missing_stats_message(sd, prefix))
  mean, var = _stat_array(get('running_mean')), _stat_array(get('running_var'))
  count = get('num_batches_tracked')
  count = 0 if count is None else int(_numpy(count))
  state = BatchNormState(mean=jnp.asarray(mean), var=jnp.asarray(var),
                         count=jnp.asarray(count, jnp.int32))
  scale, bias = (None if get(k) is None else jnp.asarray(_numpy(get(k)))
                 for k in ('weight', 'bias'))
  _check_shapes(state, scale, bias)
  return state, scale, bias


def to_torch(state, scale=None, bias=None, *, prefix: str = '') -> dict:
  """The ``state_dict`` of a PyTorch batch norm, as NumPy arrays.

  Keys are ``weight`` and ``bias`` (only when given: ``affine=False``
  layers have none), ``running_mean``, ``running_var`` and
  ``num_batches_tracked``, each behind ``prefix``. PyTorch's
  ``load_state_dict`` wants tensors, so convert on loading. bfloat16 arrays
  come out as float32 (the same values), which ``torch.from_numpy`` takes.

  Example:
    >>> import torch, jax.numpy as jnp, jaxbn
    >>> state = jaxbn.init_state(3)
    >>> sd = jaxbn.to_torch(state, jnp.ones(3), jnp.zeros(3))
    >>> bn = torch.nn.BatchNorm1d(3)
    >>> bn.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    <All keys matched successfully>
  """
  _check_shapes(state, scale, bias)
  if np.ndim(state.mean) != 1:
    raise ValueError(
        f'PyTorch batch norm has one feature axis, but state.mean has shape '
        f'{np.shape(state.mean)}; reshape the statistics to one axis first.')
  prefix = prefix + '.' if prefix and not prefix.endswith('.') else prefix
  out = {}
  if scale is not None:
    out['weight'] = _torch_readable(scale)
  if bias is not None:
    out['bias'] = _torch_readable(bias)
  out['running_mean'] = _torch_readable(state.mean)
  out['running_var'] = _torch_readable(state.var)
  out['num_batches_tracked'] = np.array(int(state.count), np.int64)
  return {prefix + k: v for k, v in out.items()}


def from_keras(weights, *, scale: bool = True, center: bool = True):
  """Reads Keras ``BatchNormalization`` weights into ``(state, scale, bias)``.

  Args:
    weights: ``layer.get_weights()``: ``[gamma, beta, moving_mean,
      moving_variance]``, without ``gamma`` for ``scale=False`` layers and
      without ``beta`` for ``center=False`` ones; or a mapping with those
      names as keys.
    scale, center: the Keras layer's flags, needed to read a list of three.

  Keras' momentum means the same as jaxbn's; its epsilon defaults to 1e-3.

  Example:
    >>> import numpy as np, jaxbn
    >>> w = [np.ones(3), np.zeros(3), np.full(3, 0.5), np.full(3, 2.0)]
    >>> state, gamma, beta = jaxbn.from_keras(w)
    >>> state.var
    Array([2., 2., 2.], dtype=float32)
  """
  if isinstance(weights, Mapping):
    named = {k.split('/')[-1].split(':')[0]: v for k, v in weights.items()}
    missing = [k for k in ('moving_mean', 'moving_variance') if k not in named]
    if missing:
      raise ValueError(
          f'Keras weights need {missing}; got keys {sorted(weights)}. Pass '
          'layer.get_weights() or a dict with gamma, beta, moving_mean, '
          'moving_variance.')
    gamma, beta = named.get('gamma'), named.get('beta')
    mean, var = named['moving_mean'], named['moving_variance']
  else:
    weights = list(weights)
    expected = 2 + bool(scale) + bool(center)
    if len(weights) != expected:
      raise ValueError(
          f'expected {expected} Keras weights for scale={scale}, center='
          f'{center} ([gamma] [beta] moving_mean moving_variance), got '
          f'{len(weights)}; pass the layer\'s scale= and center= flags.')
    gamma = weights.pop(0) if scale else None
    beta = weights.pop(0) if center else None
    mean, var = weights
  state = BatchNormState(mean=jnp.asarray(_stat_array(mean)),
                         var=jnp.asarray(_stat_array(var)),
                         count=jnp.zeros((), jnp.int32))
  gamma, beta = (None if v is None else jnp.asarray(_numpy(v)) for v in (gamma, beta))
  _check_shapes(state, gamma, beta)
  return state, gamma, beta


def to_keras(state, scale=None, bias=None) -> list:
  """Keras ``set_weights`` list: ``[gamma, beta, moving_mean, moving_variance]``.

  ``gamma`` is left out when ``scale`` is ``None`` (a Keras layer with
  ``scale=False``), ``beta`` when ``bias`` is ``None`` (``center=False``).

  Example:
    >>> import jax.numpy as jnp, jaxbn
    >>> [w.shape for w in jaxbn.to_keras(jaxbn.init_state(3), jnp.ones(3))]
    [(3,), (3,), (3,)]
  """
  _check_shapes(state, scale, bias)
  params = [v for v in (scale, bias) if v is not None]
  return [_writable(v) for v in (*params, state.mean, state.var)]


def _state_dict(obj) -> Mapping:
  if hasattr(obj, 'state_dict') and callable(obj.state_dict):
    return obj.state_dict()
  if isinstance(obj, Mapping):
    return obj
  raise TypeError(
      'from_torch needs a torch.nn.Module or its state_dict(), got '
      f'{type(obj).__name__}.')


def _missing_stats_message(sd, prefix) -> str:
  found = sorted({k[:-len('running_mean')] for k in sd if k.endswith('running_mean')})
  where = f' under prefix {prefix!r}' if prefix else ''
  if found:
    return (f'no running_mean/running_var{where}; the state dict holds batch '
            f'norms at prefixes {found}: pass one as prefix=...')
  return (f'no running_mean/running_var{where}: the layer has no running '
          'statistics (track_running_stats=False?) or is not a batch norm.')


def _numpy(v) -> np.ndarray:
  if hasattr(v, 'detach'):  # torch.Tensor, without importing torch
    v = v.detach().cpu()
    if str(v.dtype) == 'torch.bfloat16':
      # Tensor.numpy() refuses bfloat16 (NumPy has none of its own); every
      # bfloat16 is a float32, so go through float32 to JAX's bfloat16, exactly.
      return v.float().numpy().astype(jnp.bfloat16)
    v = v.numpy()
  return np.asarray(v)


def _stat_array(v) -> np.ndarray:
  v = _numpy(v)
  # Statistics accumulate in float32 or wider whatever the layer's dtype.
  return v.astype(np.promote_types(v.dtype, np.float32))


def _writable(v) -> np.ndarray:
  return np.array(v, copy=True)


def _torch_readable(v) -> np.ndarray:
  """A copy that ``torch.from_numpy`` takes: dtypes NumPy only knows through
  ml_dtypes (bfloat16) widen to float32, exactly; ``load_state_dict`` casts
  them to the layer's dtype."""
  v = _writable(v)
  return v.astype(np.float32) if v.dtype.kind == 'V' else v


def _check_shapes(state, scale, bias) -> None:
  _checks.state_type(state)
  shape = np.shape(state.mean)
  for name, v in (('var', state.var), ('scale', scale), ('bias', bias)):
    if v is not None and np.shape(v) != shape:
      raise ValueError(
          f'{name} has shape {np.shape(v)} but the running mean has shape '
          f'{shape}; all batch-norm tensors need one entry per feature.')
