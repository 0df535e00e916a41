"""Frozen batch norm: optax labels/masks for Linen and NNX, frozen statistics."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxbn
from jaxbn._freeze import bn_param_labels, freeze_batch_norm_mask, freeze_stats


def _tx(labels):
  return optax.multi_transform(
      {'trainable': optax.adam(1e-2), 'frozen': optax.set_to_zero()}, labels)


def _batch(seed, shape=(8, 6, 6, 3)):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return jax.random.normal(k1, shape) * 2.0 + 1.0, jax.random.normal(k2, (shape[0], 4))


def _changed(a, b):
  return not np.allclose(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------- Linen


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(5, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)   # auto-named
    x = nn.relu(x).mean(axis=(1, 2))
    x = nn.Dense(6)(x)
    x = nn.BatchNorm(use_running_average=not train, name='bn_head')(x)
    x = nn.LayerNorm()(x)                                # scale/bias, no stats
    return nn.Dense(4)(x)


def test_linen_labels_by_name_and_by_batch_stats():
  variables = LinenNet().init(jax.random.key(0), _batch(0)[0], train=False)
  params, stats = variables['params'], variables['batch_stats']
  by_name = bn_param_labels(params)
  assert by_name['BatchNorm_0'] == {'scale': 'frozen', 'bias': 'frozen'}
  assert by_name['bn_head'] == {'scale': 'trainable', 'bias': 'trainable'}
  labels = bn_param_labels(params, batch_stats=stats)
  assert labels['bn_head'] == {'scale': 'frozen', 'bias': 'frozen'}
  assert labels['LayerNorm_0'] == {'scale': 'trainable', 'bias': 'trainable'}
  assert set(jax.tree.leaves(labels['Conv_0'])) == {'trainable'}
  assert jax.tree.structure(labels) == jax.tree.structure(params)


class RenormNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    return jaxbn.linen.BatchRenorm(use_running_average=True)(nn.Dense(4)(x))


def test_linen_labels_auto_named_batch_renorm():
  params = RenormNet().init(jax.random.key(0), jnp.ones((2, 3)))['params']
  labels = bn_param_labels(params)
  assert labels['BatchRenorm_0'] == {'scale': 'frozen', 'bias': 'frozen'}
  assert set(jax.tree.leaves(labels['Dense_0'])) == {'trainable'}


def test_linen_fine_tuning_leaves_batch_norm_untouched():
  model = LinenNet()
  variables = model.init(jax.random.key(0), _batch(0)[0], train=False)
  params, stats = variables['params'], variables['batch_stats']
  # Non-trivial running statistics, as from pretraining.
  stats = jax.tree.map(lambda s: s + 0.5, stats)
  tx = _tx(bn_param_labels(params, batch_stats=stats))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, t):
    def loss(p):  # statistics frozen: inference-mode batch norm, immutable stats
      return jnp.mean((model.apply({'params': p, 'batch_stats': stats}, x, train=False) - t) ** 2)
    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, grads

  new = params
  for i in range(4):
    new, opt_state, grads = step(new, opt_state, *_batch(i))
  for bn in ('BatchNorm_0', 'bn_head'):
    for k in ('scale', 'bias'):
      assert _changed(grads[bn][k], 0.0)  # they had gradients ...
      np.testing.assert_array_equal(new[bn][k], params[bn][k])  # ... and stayed
  for name in ('Conv_0', 'Dense_0', 'Dense_1', 'LayerNorm_0'):
    assert all(_changed(a, b) for a, b in zip(jax.tree.leaves(new[name]),
                                              jax.tree.leaves(params[name])))


def test_linen_frozendict_keeps_its_structure():
  params = nn.FrozenDict({'BatchNorm_0': {'scale': jnp.ones(2), 'bias': jnp.zeros(2)},
                          'Dense_0': {'kernel': jnp.ones((2, 2))}})
  labels = bn_param_labels(params)
  assert jax.tree.structure(labels) == jax.tree.structure(params)
  optax.multi_transform({'trainable': optax.sgd(1.0), 'frozen': optax.set_to_zero()},
                        labels).init(params)


def test_linen_name_prefix_needs_only_scale_and_bias():
  params = {'BatchNormBlock_0': {'Conv_0': {'kernel': jnp.ones((3, 3))},
                                 'BatchNorm_0': {'scale': jnp.ones(3)}}}
  labels = bn_param_labels(params)
  assert labels['BatchNormBlock_0']['Conv_0']['kernel'] == 'trainable'
  assert labels['BatchNormBlock_0']['BatchNorm_0']['scale'] == 'frozen'


def test_mask_with_chain_and_masked_set_to_zero():
  variables = LinenNet().init(jax.random.key(0), _batch(0)[0], train=False)
  params = variables['params']
  mask = freeze_batch_norm_mask(params, batch_stats=variables['batch_stats'])
  assert mask['bn_head']['scale'] is True and mask['Dense_0']['kernel'] is False
  tx = optax.chain(optax.sgd(0.1), optax.masked(optax.set_to_zero(), mask))
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(jnp.abs(updates['bn_head']['bias']).max()) == 0.0
  assert float(jnp.abs(updates['Dense_0']['kernel']).min()) > 0.0


def test_linen_errors_name_the_fix():
  variables = LinenNet().init(jax.random.key(0), _batch(0)[0], train=False)
  with pytest.raises(TypeError, match=r"pass that: bn_param_labels\(variables\['params'\]"):
    bn_param_labels(variables)
  with pytest.raises(TypeError, match='Linen params tree'):
    bn_param_labels([1, 2])
  with pytest.raises(TypeError, match='use_running_average=True'):
    freeze_stats(variables)


# ------------------------------------------------------------------------ NNX


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 5, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(5, rngs=rngs)
    self.head = nnx.Sequential(nnx.Linear(5, 6, rngs=rngs), nnx.BatchNorm(6, rngs=rngs))
    self.norm = nnx.LayerNorm(6, rngs=rngs)
    self.out = nnx.Linear(6, 4, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv(x))).mean(axis=(1, 2))
    return self.out(self.norm(self.head(x)))


def _pretrained_nnx():
  model = NnxNet(nnx.Rngs(0))
  for i in range(3):  # a few training-mode calls: non-trivial statistics
    model(_batch(100 + i)[0])
  return model


def test_nnx_labels_match_the_param_state():
  model = _pretrained_nnx()
  labels = bn_param_labels(model)(nnx.state(model, nnx.Param))
  leaves = jax.tree_util.tree_flatten_with_path(labels)[0]
  got = {tuple(getattr(k, 'key', getattr(k, 'name', None)) for k in p)[:-1]: v
         for p, v in leaves}
  assert got[('bn', 'scale')] == got[('head', 'layers', 1, 'bias')] == 'frozen'
  assert got[('conv', 'kernel')] == got[('norm', 'scale')] == 'trainable'
  assert len(got) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_nnx_fine_tuning_leaves_batch_norm_untouched():
  model = _pretrained_nnx()
  model.train()
  freeze_stats(model)
  before = jax.tree.map(np.array, nnx.state(model))
  optimizer = nnx.Optimizer(model, _tx(bn_param_labels(model)), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, t):
    loss = lambda m: jnp.mean((m(x) - t) ** 2)
    grads = nnx.grad(loss)(model)
    optimizer.update(model, grads)
    return grads

  for i in range(4):
    grads = step(model, optimizer, *_batch(i))
  after = nnx.state(model)
  for bn in (('bn',), ('head', 'layers', 1)):
    b, a, g = before, after, grads
    for k in bn:
      b, a, g = b[k], a[k], g[k]
    for k in ('scale', 'bias', 'mean', 'var'):
      np.testing.assert_array_equal(a[k][...], b[k][...])
    assert _changed(g['scale'][...], 0.0)
  for path in (('conv', 'kernel'), ('head', 'layers', 0, 'kernel'),
               ('norm', 'scale'), ('out', 'bias')):
    b, a = before, after
    for k in path:
      b, a = b[k], a[k]
    assert _changed(a[...], b[...])


def test_freeze_stats_is_what_keeps_the_statistics():
  model = _pretrained_nnx()
  model.train()
  mean = np.array(model.bn.mean[...])
  model(_batch(7)[0])
  assert _changed(model.bn.mean[...], mean)  # training mode updates them
  freeze_stats(model)
  mean = np.array(model.bn.mean[...])
  x = _batch(8)[0]
  y = model(x)
  np.testing.assert_array_equal(model.bn.mean[...], mean)
  model.eval()
  np.testing.assert_array_equal(model(x), y)  # = inference-mode outputs
  freeze_stats(model, frozen=False)
  assert model.bn.use_running_average is False


def test_jaxbn_nnx_batch_norm_is_recognized():
  import jaxbn.nnx as jnnx
  model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
                         jnnx.BatchNorm(4, rngs=nnx.Rngs(0)))
  labels = bn_param_labels(model)(nnx.state(model, nnx.Param))
  assert jax.tree.leaves(labels) == ['trainable', 'trainable', 'frozen', 'frozen']
  model.train()
  assert freeze_stats(model).layers[1].use_running_average is True


def test_jaxbn_linen_batch_norm_is_recognized():
  import jaxbn.linen as jlinen
  model = nn.Sequential([nn.Dense(4), jlinen.BatchNorm(use_running_average=True)])
  variables = model.init(jax.random.key(0), jnp.ones((2, 3)))
  labels = bn_param_labels(variables['params'], batch_stats=variables['batch_stats'])
  assert labels['layers_1'] == {'scale': 'frozen', 'bias': 'frozen'}


def test_nnx_errors():
  model = NnxNet(nnx.Rngs(0))
  with pytest.raises(TypeError, match='not its state'):
    bn_param_labels(nnx.state(model))
  with pytest.raises(TypeError, match='NNX model carries its own'):
    bn_param_labels(model, batch_stats={})

