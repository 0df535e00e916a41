"""Folding inference-mode batch norm into the preceding Conv/Dense layer.

In inference a batch norm is a per-channel affine map
``y = z * m + (bn_bias - mean * m)`` with ``m = scale / sqrt(var + eps)``.
When ``z = conv(x, W) + b`` it can be merged into the layer:
``W' = W * m`` (per output channel) and ``b' = (b - mean) * m + bn_bias``.
This is exact for any layer that is linear in its kernel and adds its bias
per output channel (Dense, Conv with any padding, strides, dilation or
groups): zero padding stays zero after scaling the kernel.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import jax.numpy as jnp
from jax import lax

from flax import nnx

from jaxbn import _checks
from jaxbn._native import stats_dtype


def fold_batch_norm(kernel, bias, state, scale=None, bn_bias=None, *,
                    epsilon=1e-5):
  """Merges an inference-mode batch norm into the layer before it.

  Returns ``(kernel, bias)`` of a layer computing
  ``batch_norm(layer(x), state, scale, bn_bias, training=False)``.

  Args:
    kernel: weights whose LAST axis is the output features: Flax ``Dense``
      ``(in, out)``, ``Conv`` ``(*window, in // groups, out)`` (HWIO). For
      PyTorch's ``(out, in, kh, kw)`` move the axis first, e.g.
      ``jnp.moveaxis(w, 0, -1)``.
    bias: the layer's bias ``(out,)``, or ``None`` for a layer without one
      (the folded layer needs a bias then).
    state: the batch norm's running statistics (``mean``, ``var``), e.g. a
      :class:`jaxbn.BatchNormState`.
    scale, bn_bias: the batch norm's affine parameters, ``None`` if unused.
    epsilon: the batch norm's epsilon.

  The arithmetic runs in float32 or wider; the results have the dtypes of
  ``kernel`` and ``bias`` (``kernel``'s if ``bias`` is ``None``).

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> k1, k2 = jax.random.split(jax.random.key(0))
    >>> w = jax.random.normal(k1, (3, 3, 2, 4))      # HWIO conv kernel
    >>> x = jax.random.normal(k2, (1, 5, 5, 2))      # NHWC input
    >>> state = jaxbn.BatchNormState(mean=jnp.arange(4.0), var=jnp.full(4, 2.0),
    ...                              count=jnp.array(1))
    >>> conv = lambda x, w: jax.lax.conv_general_dilated(
    ...     x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    >>> y_ref, _ = jaxbn.batch_norm(conv(x, w), state, training=False)
    >>> w_f, b_f = jaxbn.fold_batch_norm(w, None, state)
    >>> bool(jnp.allclose(conv(x, w_f) + b_f, y_ref, atol=1e-5))
    True
  """
  kernel = _checks.float_array(kernel, 'kernel')
  _checks.epsilon(epsilon)
  if kernel.ndim < 1:
    raise ValueError('kernel must have at least one axis (the output features).')
  features = kernel.shape[-1]
  mean, var = _stats_of(state, features)
  for name, value in (('bias', bias), ('scale', scale), ('bn_bias', bn_bias)):
    _check_vector(value, name, features)
  dtype = stats_dtype(jnp.result_type(kernel, mean, var))
  mul = lax.rsqrt(jnp.asarray(var, dtype) + epsilon)
  if scale is not None:
    mul = mul * jnp.reshape(jnp.asarray(scale, dtype), (features,))
  new_kernel = (kernel.astype(dtype) * mul).astype(kernel.dtype)
  old_bias = 0.0 if bias is None else jnp.reshape(jnp.asarray(bias, dtype), (features,))
  new_bias = (old_bias - jnp.asarray(mean, dtype)) * mul
  if bn_bias is not None:
    new_bias = new_bias + jnp.reshape(jnp.asarray(bn_bias, dtype), (features,))
  bias_dtype = kernel.dtype if bias is None else jnp.asarray(bias).dtype
  return new_kernel, new_bias.astype(bias_dtype)


def _stats_of(state, features):
  if not (hasattr(state, 'mean') and hasattr(state, 'var')):
    raise TypeError(
        'state must hold the running statistics as .mean and .var, e.g. a '
        f'jaxbn.BatchNormState; got {type(state).__name__}.')
  for name in ('mean', 'var'):
    shape = tuple(jnp.shape(getattr(state, name)))
    if shape != (features,):
      raise ValueError(
          f'state.{name} has shape {shape} but the kernel has {features} output '
          'features on its last axis; pass the batch norm that directly '
          'follows this layer, and put the output features last (Flax HWIO / '
          'IO layout; for a PyTorch kernel use jnp.moveaxis(w, 0, -1)).')
  return state.mean, state.var


def _check_vector(value, name, features):
  if value is None:
    return
  shape = tuple(jnp.shape(value))
  if shape not in ((features,), (1,) * (len(shape) - 1) + (features,)):
    raise ValueError(
        f'{name} has shape {shape} but the kernel has {features} output '
        f'features on its last axis; {name} needs shape ({features},).')


# --------------------------------------------------------------------------
# Flax NNX models


def fold_batch_norm_nnx(model, pairs: Iterable[tuple] | None = None):
  """Returns a copy of an NNX model with batch norms folded into their layers.

  The result computes what ``model`` computes in inference mode (running
  statistics) with each folded batch norm replaced by an identity and its
  Conv/Linear layer rescaled (a layer without bias gets one). ``model`` is
  not modified.

  Which batch norms are folded:

  * ``pairs=None``: every ``nnx.Linear``, ``nnx.Conv`` or ``nnx.ConvTranspose``
    directly followed by a batch norm inside an ``nnx.Sequential`` (at any
    depth). The order of calls is only known inside a Sequential.
  * ``pairs=[(layer_path, bn_path), ...]``: exactly these, for models whose
    ``__call__`` applies ``layer`` then ``bn`` with nothing in between.
    A path is a string of attribute names and list indices separated by
    ``'.'`` or ``'/'`` (``'block1.conv'``, ``'layers/0'``) or a tuple of
    them (``('layers', 0)``), as in ``nnx.iter_graph``.

  A batch norm is any module with ``scale``, ``bias``, ``mean``, ``var``,
  ``epsilon`` and ``use_running_average`` attributes (``flax.nnx.BatchNorm``
  and ``jaxbn.nnx.BatchNorm``); a layer is any
  module with a ``kernel`` whose last axis is its output features and a
  per-feature ``bias`` attribute (possibly ``None``). The batch norm's
  ``axis`` must name the layer's output features: ``-1``, or that axis
  counted from the front on an output with one batch axis (``3`` after a
  2-D conv on NHWC, ``1`` after a Linear on ``(batch, features)``). Batch
  norms that are not folded stay, so put the result in eval mode
  (``model.eval()``) to use it.

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> from flax import nnx
    >>> rngs = nnx.Rngs(0)
    >>> model = nnx.Sequential(
    ...     nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs),
    ...     nnx.BatchNorm(8, use_running_average=True, rngs=rngs), nnx.relu)
    >>> folded = jaxbn.fold_batch_norm_nnx(model)
    >>> type(folded.layers[1]).__name__
    'FoldedBatchNorm'
    >>> x = jax.random.normal(jax.random.key(1), (2, 6, 6, 3))
    >>> bool(jnp.allclose(folded(x), model(x), atol=1e-5))
    True
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(
        f'fold_batch_norm_nnx needs a flax.nnx.Module, got {type(model).__name__}; '
        'for raw arrays use jaxbn.fold_batch_norm.')
  model = nnx.clone(model)
  if pairs is None:
    found = _sequential_pairs(model)
    if not found:
      raise ValueError(
          'found no nnx.Linear/nnx.Conv directly followed by a batch norm '
          'inside an nnx.Sequential; for other models name the pairs: '
          "fold_batch_norm_nnx(model, pairs=[('conv1', 'bn1'), ...]).")
  else:
    found = [(_path(a), _path(b)) for a, b in pairs]
    _check_distinct(found)
  for layer_path, bn_path in found:
    layer = _resolve(model, layer_path)
    bn = _resolve(model, bn_path)
    _check_layer(layer, layer_path)
    _check_batch_norm(bn, bn_path, layer)
    _fold_into(layer, bn)
    _replace(model, bn_path, FoldedBatchNorm())
  return model


class FoldedBatchNorm(nnx.Module):
  """Identity left where a batch norm was folded into the previous layer."""

  def __call__(self, x, *args, **kwargs):
    del args, kwargs  # e.g. use_running_average=..., mask=...
    return x


def _fold_into(layer, bn):
  state = _BNStats(_value(bn.mean), _value(bn.var))
  new_kernel, new_bias = fold_batch_norm(
      _value(layer.kernel), _value(layer.bias), state, _value(bn.scale),
      _value(bn.bias), epsilon=bn.epsilon)
  layer.kernel[...] = new_kernel
  if layer.bias is None:
    layer.bias = nnx.Param(new_bias)
  else:
    layer.bias[...] = new_bias.astype(layer.bias[...].dtype)
  if hasattr(layer, 'use_bias'):
    layer.use_bias = True


class _BNStats:
  def __init__(self, mean, var):
    self.mean, self.var = mean, var


def _value(v):
  return None if v is None else v[...]


def _is_batch_norm(m) -> bool:
  return all(hasattr(m, a) for a in ('scale', 'bias', 'mean', 'var', 'epsilon',
                                     'use_running_average'))


def _is_foldable_layer(m) -> bool:
  return (isinstance(m, (nnx.Linear, nnx.Conv, nnx.ConvTranspose))
          and not getattr(m, 'transpose_kernel', False))


def _sequential_pairs(model):
  pairs = []
  for path, node in nnx.iter_graph(model):
    if not isinstance(node, nnx.Sequential):
      continue
    layers = list(node.layers)
    for i in range(len(layers) - 1):
      if _is_foldable_layer(layers[i]) and _is_batch_norm(layers[i + 1]):
        pairs.append((tuple(path) + ('layers', i), tuple(path) + ('layers', i + 1)))
  _check_distinct(pairs)
  return pairs


def _check_distinct(pairs):
  seen = set()
  for layer_path, bn_path in pairs:
    for p in (layer_path, bn_path):
      if p in seen:
        raise ValueError(
            f'{_show(p)} appears in two fold pairs; each layer and each batch '
            'norm can be folded once (a shared module would change every use).')
      seen.add(p)


def _path(p) -> tuple:
  if isinstance(p, str):
    parts = p.replace('/', '.').split('.')
    return tuple(int(s) if s.isdigit() else s for s in parts if s)
  if isinstance(p, Sequence):
    return tuple(p)
  raise TypeError(f'a module path is a str like "block.conv" or a tuple, got {p!r}.')


def _resolve(model, path):
  node = model
  for i, key in enumerate(path):
    try:
      node = node[key] if isinstance(key, int) else getattr(node, key)
    except (AttributeError, IndexError, KeyError, TypeError):
      raise ValueError(
          f'the model has no submodule at {_show(path)} (failed at '
          f'{_show(path[:i + 1])}); use attribute names and list indices as '
          'printed by nnx.iter_graph(model).') from None
  return node


def _replace(model, path, new):
  parent = _resolve(model, path[:-1])
  key = path[-1]
  if isinstance(key, int):
    parent[key] = new
  else:
    setattr(parent, key, new)


def _check_layer(layer, path):
  if not hasattr(layer, 'kernel') or not hasattr(layer, 'bias'):
    raise TypeError(
        f'{_show(path)} is a {type(layer).__name__}, not a layer with a kernel '
        'and a bias attribute (nnx.Linear, nnx.Conv); the first path of a '
        'pair names the layer, the second its batch norm.')
  if getattr(layer, 'transpose_kernel', False):
    raise ValueError(
        f'{_show(path)} stores its kernel transposed (transpose_kernel=True), '
        'so its last axis is not the output features; fold by hand with '
        'jaxbn.fold_batch_norm on jnp.swapaxes(kernel, -1, -2).')


def _check_batch_norm(bn, path, layer):
  if not _is_batch_norm(bn):
    raise TypeError(
        f'{_show(path)} is a {type(bn).__name__}, not a batch norm (needs '
        'scale, bias, mean, var, epsilon and use_running_average attributes).')
  axis = getattr(bn, 'axis', -1)
  # The kernel fixes the rank of the layer's output for one batch axis:
  # (batch, *window, features), e.g. NHWC for a 2-D conv, so axis=3 there.
  last = jnp.ndim(_value(layer.kernel)) - 1
  if axis not in (-1, (-1,), last, (last,)):
    raise ValueError(
        f'the batch norm at {_show(path)} normalizes axis={axis!r}, but folding '
        f'needs it on the output features of the {type(layer).__name__} before '
        f'it, the last axis, where Flax layers put them: axis=-1, or axis={last} '
        'for an output with one batch axis.')


def _show(path) -> str:
  return '/'.join(str(k) for k in path) or '<root>'
