"""Frozen batch norm for fine-tuning: fixed statistics and fixed scale/bias.

Fine-tuning a pretrained network on a small or differently distributed data
set usually works best with its batch norms frozen: the running statistics
are used (not the batch's) and not updated, and ``scale``/``bias`` are not
trained. Two independent pieces do that:

* statistics: :func:`freeze_stats` puts every batch norm of an NNX model in
  inference mode (``use_running_average=True``); in Linen, call the model
  with ``use_running_average=True`` for its batch norms and do not mark
  ``batch_stats`` mutable.
* parameters: :func:`bn_param_labels` labels the batch norms' parameters
  ``'frozen'`` and the rest ``'trainable'`` for ``optax.multi_transform``,
  with ``optax.set_to_zero()`` for the frozen ones.

Recipe (NNX)::

    model.train()                    # dropout etc. in training mode ...
    jaxbn.freeze_stats(model)        # ... but batch norms use running stats
    tx = optax.multi_transform(
        {'trainable': optax.adamw(1e-4), 'frozen': optax.set_to_zero()},
        jaxbn.bn_param_labels(model))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    # train as usual: optimizer.update(model, grads)

Recipe (Linen)::

    labels = jaxbn.bn_param_labels(variables['params'],
                                   batch_stats=variables['batch_stats'])
    tx = optax.multi_transform(
        {'trainable': optax.adamw(1e-4), 'frozen': optax.set_to_zero()}, labels)
    # in the loss: model.apply(variables, x, train=False) for the batch norms,
    # without mutable=['batch_stats'].

``optax.masked(tx, mask)`` alone is not a freeze: it passes the masked-out
gradients through unchanged. Use ``optax.set_to_zero()`` as above, or
``optax.chain(tx, optax.masked(optax.set_to_zero(),
freeze_batch_norm_mask(...)))``.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
from flax import nnx

TRAINABLE = 'trainable'
FROZEN = 'frozen'


def bn_param_labels(params_or_model, *, batch_stats=None):
  """Labels batch-norm parameters ``'frozen'`` and all others ``'trainable'``.

  Args:
    params_or_model: a Linen ``params`` tree (``variables['params']``) or an
      NNX model.
    batch_stats: Linen only, optional: ``variables['batch_stats']``. Without
      it batch norms are recognized by their auto-generated names
      (``BatchNorm_0``, ``BatchRenorm_0``, ...; any name starting with
      ``BatchNorm`` or ``BatchRenorm`` holding only ``scale``/``bias``); with
      it also custom names like ``'bn1'``: every
      params entry of only ``scale``/``bias`` whose module has ``mean`` and
      ``var`` in ``batch_stats``.

  Returns:
    Linen: a tree of labels with the structure of ``params``. NNX: a function
    ``params -> labels`` that ``optax.multi_transform`` calls on the state it
    is given (``nnx.state(model, nnx.Param)`` for ``nnx.Optimizer(..., wrt=
    nnx.Param)``); a batch norm is any module whose ``mean`` and ``var`` are
    ``nnx.BatchStat`` (``flax.nnx.BatchNorm``, ``jaxbn.nnx.BatchNorm``).

  Example:
    >>> import jax, jax.numpy as jnp, optax, jaxbn
    >>> import flax.linen as nn
    >>> model = nn.Sequential([nn.Dense(4), nn.BatchNorm(use_running_average=True)])
    >>> variables = model.init(jax.random.key(0), jnp.ones((2, 3)))
    >>> labels = jaxbn.bn_param_labels(variables['params'],
    ...                                batch_stats=variables['batch_stats'])
    >>> labels['layers_0'], labels['layers_1']
    ({'kernel': 'trainable', 'bias': 'trainable'}, {'scale': 'frozen', 'bias': 'frozen'})
    >>> tx = optax.multi_transform(
    ...     {'trainable': optax.sgd(0.1), 'frozen': optax.set_to_zero()}, labels)
  """
  return _labels(params_or_model, batch_stats, FROZEN, TRAINABLE)


def freeze_batch_norm_mask(params_or_model, *, batch_stats=None):
  """Like :func:`bn_param_labels` with ``True`` for batch-norm parameters.

  For ``optax.chain(tx, optax.masked(optax.set_to_zero(), mask))``.

  Example:
    >>> import jax, jax.numpy as jnp, jaxbn
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
    ...                        nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
    >>> mask = jaxbn.freeze_batch_norm_mask(model)
    >>> jax.tree.leaves(mask(nnx.state(model, nnx.Param)))
    [False, False, True, True]
  """
  return _labels(params_or_model, batch_stats, True, False)


def freeze_stats(model, frozen: bool = True):
  """Sets ``use_running_average=frozen`` on every batch norm of an NNX model.

  With ``frozen=True`` the batch norms normalize with their running
  statistics and never update them, also while the rest of the model is in
  training mode. ``model.train()`` resets the flag on every module, so call
  this after it; an explicit ``use_running_average=`` argument in a call
  also overrides it. Returns ``model`` (changed in place).

  Example:
    >>> import jaxbn
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
    ...                        nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
    >>> model.train()
    >>> jaxbn.freeze_stats(model).layers[1].use_running_average
    True
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(
        f'freeze_stats needs an NNX model, got {type(model).__name__}; in Linen '
        'call the model with use_running_average=True for its batch norms and '
        "without mutable=['batch_stats'].")
  for _, module in _nnx_batch_norms(model):
    if not hasattr(module, 'use_running_average'):
      raise TypeError(
          f'{type(module).__name__} has BatchStat mean/var but no '
          'use_running_average attribute to freeze its statistics with.')
    module.use_running_average = bool(frozen)
  return model


def _labels(tree, batch_stats, bn_label, other_label):
  if isinstance(tree, nnx.Module):
    if batch_stats is not None:
      raise TypeError('batch_stats is for Linen params; an NNX model carries its own.')
    return _nnx_labeller(tree, bn_label, other_label)
  if isinstance(tree, nnx.State):
    raise TypeError(
        'pass the NNX model itself, not its state: the batch norms are found '
        'by module type.')
  if not isinstance(tree, Mapping):
    raise TypeError(
        'expected a Linen params tree (variables["params"]) or an NNX model, '
        f'got {type(tree).__name__}.')
  if 'params' in tree and ('batch_stats' in tree or len(tree) == 1):
    raise TypeError(
        'this looks like a whole Linen variables dict; the optimizer sees '
        "variables['params'], so pass that: bn_param_labels(variables['params'], "
        "batch_stats=variables['batch_stats']).")
  return _linen_labels(tree, (), batch_stats, bn_label, other_label)


def _linen_labels(node, path, batch_stats, bn_label, other_label):
  if not isinstance(node, Mapping):
    return other_label
  if path and _is_linen_batch_norm(node, path, batch_stats):
    labels = {k: bn_label for k in node}
  else:
    labels = {k: _linen_labels(v, path + (k,), batch_stats, bn_label, other_label)
              for k, v in node.items()}
  return labels if type(node) is dict else type(node)(labels)


def _is_linen_batch_norm(node, path, batch_stats) -> bool:
  if not node or not set(node) <= {'scale', 'bias'}:
    return False
  if any(isinstance(v, Mapping) for v in node.values()):
    return False
  if str(path[-1]).startswith(('BatchNorm', 'BatchRenorm')):
    return True
  stats = batch_stats
  for key in path:
    if not isinstance(stats, Mapping) or key not in stats:
      return False
    stats = stats[key]
  return isinstance(stats, Mapping) and {'mean', 'var'} <= set(stats)


def _nnx_batch_norms(model):
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module) and _is_nnx_batch_norm(node):
      yield tuple(path), node


def _is_nnx_batch_norm(module) -> bool:
  return all(isinstance(getattr(module, a, None), nnx.BatchStat) for a in ('mean', 'var'))


def _nnx_labeller(model, bn_label, other_label):
  bn_paths = [p for p, _ in _nnx_batch_norms(model)]

  def labels(params):
    def label(path, _):
      keys = tuple(_key(k) for k in path)
      inside = any(keys[:len(p)] == p for p in bn_paths)
      return bn_label if inside else other_label
    return jax.tree_util.tree_map_with_path(label, params)

  return labels


def _key(k):
  for attr in ('key', 'name', 'idx'):
    if hasattr(k, attr):
      return getattr(k, attr)
  return k
