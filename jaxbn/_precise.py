"""Precise batch norm (Wu & Johnson, 2021): exact population statistics.

The exponential moving average kept during training is a poor estimate of
the population statistics when the weights still move or when training is
short: it over-weights the last batches, computed with older weights for the
earlier ones. Precise BN recomputes the statistics after training, with the
final weights, as a true average over ``N`` batches.

Per layer, with batch means ``mu_b`` and (biased) variances ``var_b`` from
the forward pass in training mode, the result is the statistics of all
``N`` batches pooled, which is the paper's estimate:

    mean = E_b[mu_b]
    var  = E_b[var_b] + Var_b(mu_b)  ( = E_b[var_b + mu_b^2] - mean^2 )

i.e. the exact mean and biased variance of every sample seen (for batches of
equal size). Note it is not the plain average ``E_b[var_b]`` (which misses
the spread of the batch means, ``Var_b(mu_b)``, about ``var / batch_size``).
Batches are pooled exactly, with Chan et al.'s formula, count-weighted when
the counts are known (:func:`precise_batch_stats` with ``Moments``,
:func:`precise_bn_nnx`, :func:`precise_bn_linen`) and equally weighted
otherwise.

Which inputs the layers see: later layers see earlier ones normalized with
batch statistics (training mode), as during training.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp

from jaxbn._flax_common import bool_mask, floating_input
from jaxbn._functional import _running_variance, moments
from jaxbn._moments import Moments
from jaxbn._moments import pool_moments
from jaxbn._native import stats_dtype


def merge_moments(a: Moments, b: Moments) -> Moments:
  """Statistics of two sample sets pooled: exact, count-weighted.

  ``var`` is the biased variance of the union. A set with ``count == 0``
  leaves the other unchanged.

  Example:
    >>> import jax.numpy as jnp, jaxbn
    >>> a = jaxbn.moments(jnp.array([[1.0], [3.0]]))
    >>> b = jaxbn.moments(jnp.array([[5.0], [7.0], [9.0]]))
    >>> m = jaxbn.merge_moments(a, b)
    >>> m.mean, m.var, m.count
    (Array([5.], dtype=float32), Array([8.], dtype=float32), Array([5.], dtype=float32))
  """
  return pool_moments(jax.tree.map(lambda u, v: jnp.stack([u, v]), a, b))


def precise_batch_stats(batch_stats_fn: Callable[[Any], Any], batches: Iterable,
                        *, num_batches: int | None = None):
  """Pools per-layer batch statistics over ``num_batches`` batches.

  The functional core of precise BN: ``batch_stats_fn(batch)`` returns a
  pytree whose nodes are per-layer statistics of that batch (``Moments``,
  e.g. from :func:`jaxbn.moments`, are pooled count-weighted; anything else
  with ``mean`` and ``var``, e.g. the ``BatchNormState`` returned by a
  ``batch_norm(..., training=True, momentum=0.0)``, counts once per batch).
  Returns the same tree with ``Moments`` of the pooled statistics; write them
  into the states with ``state._replace(mean=m.mean, var=m.var)``.

  Args:
    batch_stats_fn: ``batch -> pytree of statistics``; jit it for speed.
    batches: an iterable of batches, e.g. the training data loader.
    num_batches: use at most this many batches (default: all).

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> data = [jax.random.normal(jax.random.key(i), (16, 3)) for i in range(4)]
    >>> stats = jaxbn.precise_batch_stats(lambda x: {'bn': jaxbn.moments(x)}, data)
    >>> bool(jnp.allclose(stats['bn'].mean, jnp.concatenate(data).mean(0), atol=1e-6))
    True
  """
  total = None
  for batch in _take(batches, num_batches):
    stats = jax.tree.map(_as_moments, batch_stats_fn(batch), is_leaf=_is_stats)
    total = stats if total is None else jax.tree.map(
        merge_moments, total, stats, is_leaf=_is_stats)
  if total is None:
    raise ValueError('precise_batch_stats got no batches; pass a non-empty iterable.')
  return total


def _is_stats(node) -> bool:
  return hasattr(node, 'mean') and hasattr(node, 'var') and not isinstance(node, dict)


def _as_moments(node) -> Moments:
  if isinstance(node, Moments):
    return node
  var = jnp.asarray(node.var)
  return Moments(mean=jnp.asarray(node.mean), var=var, count=jnp.ones(var.shape, var.dtype))


def _take(batches, num_batches):
  if num_batches is not None:
    if not isinstance(num_batches, int) or num_batches < 1:
      raise ValueError(f'num_batches must be a positive int or None, got {num_batches!r}.')
    return itertools.islice(batches, num_batches)
  return batches


# ------------------------------------------------------------------ Flax NNX


def precise_bn_nnx(model, batches: Iterable, *, num_batches: int | None = None,
                   call: Callable | None = None, jit: bool = True):
  """Replaces the running statistics of an NNX model by precise ones.

  Runs ``call(model, batch)`` (default ``model(batch)``; under ``jax.jit``
  unless ``jit=False``, e.g. for batches holding non-arrays) over
  ``num_batches`` batches with every batch norm in training mode, on a copy
  of the model whose variables stay as trained (so a batch renorm corrects
  towards its trained running statistics, as in training). Each batch
  norm's inputs are recorded as it is called, inside the model's own
  transforms (``nnx.jit``, ``nnx.remat``, ``nnx.scan``, ``nnx.vmap``) too: it
  gets the exact mean and variance of all of them (with its ``mask``),
  whatever the batch sizes.
  The variance is biased unless the layer keeps ``running_var='unbiased'``.
  Other modules keep their mode, so put dropout in the mode you want first
  (``model.eval()`` disables it; the batch norms are switched to training
  mode here anyway). A batch norm is any module whose ``mean`` and ``var``
  are ``nnx.BatchStat`` and that has ``axis`` and ``use_running_average``
  attributes (``flax.nnx.BatchNorm``, ``jaxbn.nnx.BatchNorm`` and
  ``BatchRenorm``). Layers that are not called, and features that see no
  valid entry, keep their statistics; so do step counts. On an error the
  model is left as it was. Returns ``model`` (changed in place).

  Data parallel: a batch norm with an ``axis_name`` pools what it records
  over that mapped axis (within its ``axis_index_groups``), as it pools its
  statistics in training. Run the model as it trains, inside ``shard_map``
  or ``pmap``, through ``call``, each batch split across the devices: every
  device then records the statistics of the whole batch, and the result is
  precise BN on the unsplit data. Such a layer cannot run in training mode
  outside its mapped axis; under plain ``jax.jit`` with a sharded batch no
  ``axis_name`` is needed, the statistics are global already.

  Example:
    >>> import jax, jaxbn
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
    ...                        nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
    >>> batches = (jax.random.normal(jax.random.key(i), (32, 3)) for i in range(10))
    >>> model = jaxbn.precise_bn_nnx(model, batches, num_batches=8)
    >>> model.layers[1].momentum, model.layers[1].use_running_average
    (0.99, False)
  """
  from flax import nnx

  if not isinstance(model, nnx.Module):
    raise TypeError(
        f'precise_bn_nnx needs an NNX model, got {type(model).__name__}; for '
        'Linen use precise_bn_linen(module, variables, batches).')
  layers = _nnx_batch_norms(model, nnx)
  if not layers:
    raise ValueError(
        'the model has no batch norm (a module with nnx.BatchStat mean and var '
        'and an axis attribute); nothing to recompute.')
  call = call or (lambda m, batch: m(batch))
  originals = [(type(bn), bn.use_running_average) for bn in layers]
  totals, seen = None, 0
  try:
    for bn in layers:
      bn.__class__ = _recording(type(bn))
      bn.use_running_average = False
      for name in _RECORDED:
        setattr(bn, name, nnx.BatchStat(_no_moments(bn.mean[...])))
    graphdef, state = nnx.split(model)

    def batch_stats(state, batch):
      # A fresh copy per batch: without jit, merging would reuse the model's
      # own variables.
      copy = nnx.merge(graphdef, state, copy=True)
      call(copy, batch)
      return [_recorded(bn) for bn in _nnx_batch_norms(copy, nnx)]

    if jit:
      batch_stats = jax.jit(batch_stats)
    for batch in _take(batches, num_batches):
      seen += 1
      stats = batch_stats(state, batch)
      totals = stats if totals is None else list(map(merge_moments, totals, stats))
  finally:
    for bn, (cls, use_running_average) in zip(layers, originals):
      bn.__class__, bn.use_running_average = cls, use_running_average
      for name in _RECORDED:
        if hasattr(bn, name):
          delattr(bn, name)
  if not seen or not any(bool(jnp.any(t.count > 0)) for t in totals):
    raise ValueError('precise_bn_nnx got no batches (or no batch norm was called in '
                     'training mode); pass a non-empty iterable.')
  for bn, total in zip(layers, totals):
    var = _running_variance(total, getattr(bn, 'running_var', 'biased'))
    bn.mean[...] = _measured(total, total.mean, bn.mean[...])
    bn.var[...] = _measured(total, var, bn.var[...])
  return model


# Each batch norm pools the moments of its inputs into these variables of
# its own during precise BN: the model's transforms (jit, remat, scan,
# vmap) carry them out as they carry its running statistics.
_RECORDED = ('precise_mean', 'precise_var', 'precise_count')


def _no_moments(stored):
  """Zeros for one ``_RECORDED`` variable of a layer whose statistics are ``stored``."""
  return jnp.zeros(jnp.shape(stored), stats_dtype(jnp.result_type(stored)))


def _pool_into(recorded: Moments, bn, x, mask) -> Moments:
  """``recorded`` pooled with the moments of batch norm ``bn``'s input."""
  m = _input_moments(bn, x, mask)
  m = jax.tree.map(lambda v: jnp.reshape(v, jnp.shape(recorded.mean)), m)
  return jax.tree.map(lambda v, old: v.astype(old.dtype), merge_moments(recorded, m), recorded)


def _measured(total: Moments, value, stored):
  """``value`` where the layer saw data, ``stored`` (as it was) elsewhere."""
  return jnp.where(total.count > 0, value, stored).astype(stored.dtype)


def _recorded(bn) -> Moments:
  return Moments(*(getattr(bn, name)[...] for name in _RECORDED))


def _recording(cls):
  """``cls`` whose calls in training mode pool their input's moments into ``_RECORDED``."""

  def __call__(self, x, *args, **kwargs):
    if _training(self, args, kwargs):
      total = _pool_into(_recorded(self), self, x, kwargs.get('mask'))
      for name, value in zip(_RECORDED, total):
        getattr(self, name)[...] = value
    return super(recording, self).__call__(x, *args, **kwargs)

  recording = type(cls.__name__, (cls,), {'__call__': __call__, '__module__': cls.__module__})
  return recording


def _nnx_batch_norms(model, nnx):
  found = []
  for _, node in nnx.iter_graph(model):
    if (isinstance(node, nnx.Module)
        and all(isinstance(getattr(node, a, None), nnx.BatchStat) for a in ('mean', 'var'))
        and hasattr(node, 'axis') and hasattr(node, 'use_running_average')):
      found.append(node)
  return found


# ------------------------------------------------------------------ Flax Linen


def precise_bn_linen(module, variables, batches: Iterable, *,
                     num_batches: int | None = None, call: Callable | None = None,
                     **apply_kwargs):
  """Returns ``variables`` with precise ``batch_stats`` for a Linen model.

  Runs ``apply(variables, batch)``, i.e. ``module.apply(variables, batch,
  mutable=['batch_stats'], **apply_kwargs)``, jitted, over ``num_batches``
  batches; pass what puts the batch norms in training mode, e.g.
  ``train=True``. ``call(apply, variables, batch)``, if given, runs it
  instead and returns what ``apply`` returns (e.g. ``apply`` under
  ``shard_map``). Each batch is the first positional argument: map
  ``(x, y)`` pairs to inputs first, e.g. ``(x for x, _ in loader)``.
  Batches may differ in size: every sample counts once.

  Every batch norm (a module with ``mean`` and ``var`` in ``batch_stats``:
  ``flax.linen.BatchNorm``, ``jaxbn.linen.BatchNorm``, ``BatchRenorm``)
  called in training mode, inside lifted transforms (``nn.jit``,
  ``nn.remat``, ``nn.scan``, ``nn.vmap``) too, gets the exact statistics of
  its inputs (with its ``mask``) over all batches; the model runs with its
  variables unchanged, so a batch renorm corrects towards its trained
  running statistics, as in training. The variance is biased unless the
  layer keeps ``running_var='unbiased'``. Layers that are not called, or
  only with running averages, and features that see no valid entry keep
  their statistics; so do step counts. A batch norm with an ``axis_name``
  pools what it records over that mapped axis (within its
  ``axis_index_groups``), as in training: run inside that axis, through
  ``call`` (``shard_map``, ``pmap``) or the model's own mapped transform
  (``nn.vmap(..., axis_name=...)``), over a split batch, it records the
  statistics of the whole batch.

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> import flax.linen as nn
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train: bool = False):
    ...     return nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
    >>> net = Net()
    >>> variables = net.init(jax.random.key(0), jnp.ones((2, 3)))
    >>> batches = [jax.random.normal(jax.random.key(i), (32, 3)) for i in range(8)]
    >>> new = jaxbn.precise_bn_linen(net, variables, batches, train=True)
    >>> new['batch_stats']['BatchNorm_0']['var'].shape
    (4,)
  """
  import flax.linen as nn

  if 'batch_stats' not in variables:
    raise ValueError(
        "variables has no 'batch_stats' collection: pass the full variables "
        "(with 'params' and 'batch_stats'), or the model has no batch norm.")
  if 'mutable' in apply_kwargs:
    raise TypeError("precise_bn_linen sets mutable=['batch_stats'] itself; drop mutable=.")
  stats = variables['batch_stats']
  paths = _linen_batch_norm_paths(stats)
  running_vars = {}

  def capture(next_fun, args, kwargs, context):
    mod, path = context.module, tuple(context.module.path)
    if context.method_name == '__call__' and path in paths and _training(mod, args[1:], kwargs):
      recorded = Moments(*(mod.get_variable('batch_stats', name) for name in _RECORDED))
      total = _pool_into(recorded, mod, args[0], kwargs.get('mask'))
      for name, value in zip(_RECORDED, total):
        mod.put_variable('batch_stats', name, value)
      running_vars[path] = getattr(mod, 'running_var', 'biased')
    return next_fun(*args, **kwargs)

  def apply(variables, batch):
    return module.apply(variables, batch, mutable=['batch_stats'], **apply_kwargs)

  @jax.jit
  def batch_stats(variables, batch):
    with nn.intercept_methods(capture):
      _, state = apply(variables, batch) if call is None else call(apply, variables, batch)
    return {path: Moments(*(_get_at(state['batch_stats'], path)[name] for name in _RECORDED))
            for path in paths}

  recording = {**variables, 'batch_stats': _set_at(stats, paths, lambda path, node: {
      **node, **{name: _no_moments(node['mean']) for name in _RECORDED}})}
  totals, seen = None, 0
  for batch in _take(batches, num_batches):
    seen += 1
    found = batch_stats(recording, batch)
    totals = found if totals is None else {
        path: merge_moments(totals[path], m) for path, m in found.items()}
  if not seen:
    raise ValueError('precise_bn_linen got no batches; pass a non-empty iterable.')

  def write(path, node):
    total = totals[path]
    var = _running_variance(total, running_vars.get(path, 'biased'))
    return {**node, 'mean': _measured(total, total.mean, node['mean']),
            'var': _measured(total, var, node['var'])}

  return {**variables, 'batch_stats': _set_at(stats, paths, write)}


def _input_moments(bn, x, mask) -> Moments:
  """Batch norm ``bn``'s input moments, with ``x`` and ``mask`` taken as the
  layers take them (integer inputs as float32, 0/1 masks as booleans) and
  pooled over its ``axis_name`` and ``axis_index_groups`` as in training."""
  return moments(floating_input(x), axis=getattr(bn, 'axis', -1), mask=bool_mask(mask),
                 axis_name=getattr(bn, 'axis_name', None),
                 axis_index_groups=getattr(bn, 'axis_index_groups', None))


def _training(mod, args_after_x, kwargs) -> bool:
  """Whether a batch norm's call uses batch statistics."""
  flag = args_after_x[0] if args_after_x else kwargs.get('use_running_average')
  if flag is None:
    flag = getattr(mod, 'use_running_average', None)
  return not flag


def _linen_batch_norm_paths(stats, path=()) -> set:
  if not hasattr(stats, 'items'):
    return set()
  if 'mean' in stats and 'var' in stats and not hasattr(stats['mean'], 'items'):
    return {path}
  found = set()
  for k, v in stats.items():
    found |= _linen_batch_norm_paths(v, path + (k,))
  return found


def _get_at(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set_at(tree, paths, fn, path=()):
  """``tree`` with each node at one of ``paths`` replaced by ``fn(path, node)``."""
  if path in paths:
    return fn(path, tree)
  if not hasattr(tree, 'items'):
    return tree
  return {k: _set_at(v, paths, fn, path + (k,)) for k, v in tree.items()}
