"""Precise BN: pooled statistics against float64 NumPy over the same batches."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxbn
from jaxbn._moments import Moments
from jaxbn._precise import (merge_moments, precise_batch_stats, precise_bn_linen,
                            precise_bn_nnx)

# Means and variances of O(1)-O(10) activations pooled over <= 1e3 samples in
# float32: a few ulps per op, well below 2e-5 relative.
F32_TOL = dict(rtol=2e-5, atol=2e-5)

MU = np.array([3.0, -2.0, 5.0])
STD = np.array([2.0, 0.5, 1.0])


def _batches(n, size=32, seed=0):
  rng = np.random.default_rng(seed)
  return [(MU + STD * rng.standard_normal((size, 3))).astype(np.float32)
          for _ in range(n)]


def np_pooled(xs, axes=(0,)):
  """Mean and biased variance of every sample of every batch, float64."""
  x = np.concatenate([np.asarray(b, np.float64) for b in xs])
  return x.mean(axis=axes), x.var(axis=axes)


# ------------------------------------------------------------- functional core


def test_merge_moments_is_exact_and_count_weighted():
  rng = np.random.default_rng(1)
  parts = [rng.standard_normal((n, 4)) * 3 + 7 for n in (1, 5, 17, 40)]
  total = None
  for p in parts:
    m = jaxbn.moments(p.astype(np.float32))
    total = m if total is None else merge_moments(total, m)
  mean, var = np_pooled(parts)
  np.testing.assert_allclose(total.mean, mean, **F32_TOL)
  np.testing.assert_allclose(total.var, var, **F32_TOL)
  np.testing.assert_array_equal(total.count, 63.0)
  empty = Moments(jnp.zeros(4), jnp.zeros(4), jnp.zeros(4))
  same = merge_moments(empty, total)
  # An empty set adds nothing: (63 * m) / 63 gives m back up to the rounding
  # of the product and of the quotient (bit for bit on CPU, 1 ulp on GPU).
  np.testing.assert_allclose(same.mean, total.mean, rtol=2 * np.finfo(np.float32).eps)
  np.testing.assert_allclose(same.var, total.var, rtol=2 * np.finfo(np.float32).eps)


def test_precise_batch_stats_with_masks_and_states():
  xs = _batches(6)
  rng = np.random.default_rng(2)
  masks = [rng.random((32, 1)) > 0.3 for _ in xs]

  def stats(batch):
    x, mask = batch
    _, state = jaxbn.batch_norm(x, jaxbn.init_state(3), training=True, momentum=0.0)
    return {'moments': jaxbn.moments(x, mask=mask), 'state': state}

  out = precise_batch_stats(jax.jit(stats), list(zip(xs, masks)))
  mean, var = np_pooled([x[m[:, 0]] for x, m in zip(xs, masks)])
  np.testing.assert_allclose(out['moments'].mean, mean, **F32_TOL)
  np.testing.assert_allclose(out['moments'].var, var, **F32_TOL)
  # States count once per batch: equal batches give the exact pooled stats.
  mean, var = np_pooled(xs)
  np.testing.assert_allclose(out['state'].mean, mean, **F32_TOL)
  np.testing.assert_allclose(out['state'].var, var, **F32_TOL)
  first = precise_batch_stats(stats, iter(zip(xs, masks)), num_batches=2)
  np.testing.assert_allclose(first['state'].mean, np_pooled(xs[:2])[0], **F32_TOL)
  with pytest.raises(ValueError, match='no batches'):
    precise_batch_stats(stats, [])
  with pytest.raises(ValueError, match='num_batches'):
    precise_batch_stats(stats, xs, num_batches=0)


# ------------------------------------------------------------------------ NNX


def _mlp(rngs):
  return nnx.Sequential(nnx.Linear(3, 6, rngs=rngs), nnx.BatchNorm(6, rngs=rngs),
                        nnx.relu, nnx.Linear(6, 4, rngs=rngs),
                        nnx.BatchNorm(4, rngs=rngs))


def np_mlp_stats(model_weights, xs, eps=1e-5):
  """Training-mode forward in float64; pooled inputs of both batch norms."""
  (w1, b1, s1, c1), (w2, b2) = model_weights
  h1s, h2s = [], []
  for x in xs:
    h1 = np.asarray(x, np.float64) @ w1 + b1
    y1 = (h1 - h1.mean(0)) / np.sqrt(h1.var(0) + eps) * s1 + c1
    h1s.append(h1)
    h2s.append(np.maximum(y1, 0) @ w2 + b2)
  return np_pooled(h1s), np_pooled(h2s)


def _nnx_weights(model):
  f = lambda v: np.asarray(v[...], np.float64)
  l1, bn1, _, l2, _ = model.layers
  return ((f(l1.kernel), f(l1.bias), f(bn1.scale), f(bn1.bias)),
          (f(l2.kernel), f(l2.bias)))


def test_nnx_precise_stats_equal_float64_population_stats():
  model = _mlp(nnx.Rngs(0))
  model.layers[1].scale[...] = jnp.array([0.5, 1.0, 2.0, 1.5, 0.7, 1.2])
  xs = _batches(10)
  precise_bn_nnx(model, iter(xs))
  (m1, v1), (m2, v2) = np_mlp_stats(_nnx_weights(model), xs)
  np.testing.assert_allclose(model.layers[1].mean[...], m1, **F32_TOL)
  np.testing.assert_allclose(model.layers[1].var[...], v1, **F32_TOL)
  np.testing.assert_allclose(model.layers[4].mean[...], m2, **F32_TOL)
  np.testing.assert_allclose(model.layers[4].var[...], v2, **F32_TOL)
  # Settings restored.
  assert model.layers[1].momentum == 0.99
  assert model.layers[1].use_running_average is False


def test_nnx_conv_and_custom_call():
  rngs = nnx.Rngs(1)
  model = nnx.Sequential(nnx.Conv(3, 5, (3, 3), rngs=rngs), nnx.BatchNorm(5, rngs=rngs))
  rng = np.random.default_rng(3)
  xs = [(rng.standard_normal((4, 6, 6, 3)) + 2).astype(np.float32) for _ in range(5)]
  model.eval()  # the batch norms are switched to training mode anyway
  precise_bn_nnx(model, [(x, 'label') for x in xs], num_batches=4,
                 call=lambda m, batch: m(batch[0]), jit=False)
  conv = model.layers[0]
  hs = [conv(x) for x in xs[:4]]
  mean, var = np_pooled(hs, axes=(0, 1, 2))
  np.testing.assert_allclose(model.layers[1].mean[...], mean, **F32_TOL)
  np.testing.assert_allclose(model.layers[1].var[...], var, **F32_TOL)
  assert model.layers[1].use_running_average is True


def test_nnx_precise_beats_ema_after_a_short_training():
  model = _mlp(nnx.Rngs(2))
  optimizer = nnx.Optimizer(model, optax.sgd(0.05), wrt=nnx.Param)
  target = np.ones((32, 4), np.float32)

  @nnx.jit
  def step(model, optimizer, x):
    grads = nnx.grad(lambda m: jnp.mean((m(x) - target) ** 2))(model)
    optimizer.update(model, grads)

  for x in _batches(20, seed=4):
    step(model, optimizer, x)
  ema_mean = np.array(model.layers[1].mean[...])
  ema_var = np.array(model.layers[1].var[...])
  # True population statistics of the first batch norm's input x @ W + b,
  # x ~ N(MU, diag(STD^2)), under the final weights.
  (w1, b1, _, _), _ = _nnx_weights(model)
  true_mean = MU @ w1 + b1
  true_var = (STD[:, None] ** 2 * w1 ** 2).sum(0)
  precise_bn_nnx(model, _batches(20, seed=5))
  err = lambda m, v: (np.abs(m - true_mean).max() / np.sqrt(true_var).max(),
                      np.abs(v / true_var - 1).max())
  ema_err = err(ema_mean, ema_var)
  precise_err = err(np.asarray(model.layers[1].mean[...]), np.asarray(model.layers[1].var[...]))
  # 640 samples: relative sampling error of a variance ~ sqrt(2/640) = 6%
  # (max over 6 features ~ 12%); the EMA has seen 20 steps of its
  # 0.99-momentum horizon and is mostly its initialization (errors > 2).
  assert precise_err[0] < 0.1 and precise_err[1] < 0.2
  assert precise_err[0] < ema_err[0] / 10 and precise_err[1] < ema_err[1] / 10


def test_nnx_error_leaves_the_model_unchanged():
  model = _mlp(nnx.Rngs(0))
  before = jax.tree.map(np.array, nnx.state(model, nnx.BatchStat))

  def bad_batches():
    yield _batches(1)[0]
    yield np.ones((32, 7), np.float32)  # wrong feature size

  with pytest.raises(Exception):
    precise_bn_nnx(model, bad_batches())
  after = nnx.state(model, nnx.BatchStat)
  chex.assert_trees_all_equal(after, before)
  assert model.layers[1].momentum == 0.99


@pytest.mark.parametrize('momentum', [0.9, None])
def test_jaxbn_nnx_batch_norm(momentum):
  import jaxbn.nnx as jnnx
  rngs = nnx.Rngs(0)
  model = nnx.Sequential(nnx.Linear(3, 6, rngs=rngs),
                         jnnx.BatchNorm(6, momentum=momentum, rngs=rngs))
  model(_batches(1, seed=9)[0])  # one training step: count 1 if tracked
  xs = _batches(4, seed=10)
  precise_bn_nnx(model, xs)
  lin = model.layers[0]
  mean, var = np_pooled([lin(x) for x in xs])
  np.testing.assert_allclose(model.layers[1].mean[...], mean, **F32_TOL)
  np.testing.assert_allclose(model.layers[1].var[...], var, **F32_TOL)
  assert model.layers[1].momentum == momentum
  if momentum is None:
    assert int(model.layers[1].count[...]) == 1


def test_nnx_several_feature_axes_keep_the_flat_statistics():
  # jaxbn.nnx.BatchNorm stores (num_features,) statistics also for a tuple
  # `axis`; the pooled ones must be written back in that layout, unchanged
  # in value (element (i, j) of the (4, 5) features is entry 5 * i + j).
  import jaxbn.nnx as jnnx
  layer = jnnx.BatchNorm(20, axis=(1, 2), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(18)
  xs = [(3.0 + 2.0 * rng.standard_normal((8, 4, 5))).astype(np.float32) for _ in range(3)]
  precise_bn_nnx(layer, xs)
  mean, var = np_pooled(xs)
  assert layer.mean[...].shape == layer.var[...].shape == (20,)
  np.testing.assert_allclose(layer.mean[...], mean.reshape(20), **F32_TOL)
  np.testing.assert_allclose(layer.var[...], var.reshape(20), **F32_TOL)
  layer(xs[0])  # the layer still trains with its statistics


def test_nnx_counts_every_sample_and_skips_masked_ones():
  import jaxbn.nnx as jnnx
  layer = jnnx.BatchNorm(3, rngs=nnx.Rngs(0))
  xs = _batches(3, size=8, seed=16) + _batches(1, size=40, seed=17)
  masks = [np.random.default_rng(i).random((len(x), 1)) > 0.3 for i, x in enumerate(xs)]
  precise_bn_nnx(layer, list(zip(xs, masks)), call=lambda m, b: m(b[0], mask=b[1]))
  kept = [x[m[:, 0]] for x, m in zip(xs, masks)]
  mean, var = np_pooled(kept)
  np.testing.assert_allclose(layer.mean[...], mean, **F32_TOL)
  np.testing.assert_allclose(layer.var[...], var, **F32_TOL)


def test_nnx_renorm_corrects_towards_its_trained_statistics():
  import jaxbn.nnx as jnnx
  rngs = nnx.Rngs(0)
  model = nnx.Sequential(
      nnx.Linear(3, 4, rngs=rngs),
      jnnx.BatchRenorm(4, r_max=3.0, d_max=5.0, running_var='unbiased', rngs=rngs),
      nnx.Linear(4, 3, rngs=rngs), nnx.BatchNorm(3, rngs=rngs))
  # Running statistics far from the batches' (shifted data), so that the
  # corrections r and d are far from 1 and 0 and clip.
  for x in _batches(3, seed=13):
    model(4.0 * x + 10.0)
  trained = nnx.clone(model)
  xs = _batches(4, size=16, seed=14) + _batches(1, size=48, seed=15)
  precise_bn_nnx(model, xs)
  # What the layers see in training mode with the trained variables.
  hs, zs = [], []
  for x in xs:
    copy = nnx.clone(trained)
    h = copy.layers[0](x)
    hs.append(np.asarray(h, np.float64))
    zs.append(np.asarray(copy.layers[2](copy.layers[1](h)), np.float64))
  mean, var = np_pooled(hs)
  n = sum(len(h) for h in hs)
  np.testing.assert_allclose(model.layers[1].mean[...], mean, **F32_TOL)
  np.testing.assert_allclose(model.layers[1].var[...], var * n / (n - 1), **F32_TOL)
  mean, var = np_pooled(zs)
  np.testing.assert_allclose(model.layers[3].mean[...], mean, **F32_TOL)
  np.testing.assert_allclose(model.layers[3].var[...], var, **F32_TOL)
  # The parameters as trained, the layers as they were.
  chex.assert_trees_all_equal(nnx.state(model, nnx.Param), nnx.state(trained, nnx.Param))
  assert type(model.layers[1]) is jnnx.BatchRenorm
  assert model.layers[1].use_running_average is False


@pytest.mark.parametrize('jit', [True, False])
def test_nnx_each_batch_runs_on_the_trained_variables(jit):
  # The running statistics the renorm corrects towards (momentum 0.5 would
  # move them far between batches) and the step count stay as trained.
  import jaxbn.nnx as jnnx
  rngs = nnx.Rngs(0)
  model = nnx.Sequential(jnnx.BatchRenorm(3, momentum=0.5, rngs=rngs),
                         jnnx.BatchNorm(3, momentum=None, rngs=rngs))
  # Corrections inside the limits: r ~ 1 / 1.2, d ~ -0.4.
  model.layers[0].mean[...] = jnp.asarray(MU + 0.5 * STD, jnp.float32)
  model.layers[0].var[...] = jnp.asarray((1.2 * STD) ** 2, jnp.float32)
  model.layers[1].count[...] = jnp.asarray(7)
  trained = nnx.clone(model)
  xs = _batches(4, size=16, seed=16)
  precise_bn_nnx(model, xs, jit=jit)
  mean, var = np_pooled([np.asarray(nnx.clone(trained).layers[0](x), np.float64) for x in xs])
  np.testing.assert_allclose(model.layers[1].mean[...], mean, **F32_TOL)
  np.testing.assert_allclose(model.layers[1].var[...], var, **F32_TOL)
  assert int(model.layers[1].count[...]) == 7


def test_nnx_errors():
  with pytest.raises(ValueError, match='no batch norm'):
    precise_bn_nnx(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), _batches(1))
  with pytest.raises(TypeError, match='precise_bn_linen'):
    precise_bn_nnx({'params': {}}, _batches(1))
  with pytest.raises(ValueError, match='no batches'):
    precise_bn_nnx(_mlp(nnx.Rngs(0)), [])


# ---------------------------------------------------------------------- Linen


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(6)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name='bn1')(x)
    x = nn.Dense(4)(nn.relu(x))
    x = nn.BatchNorm(use_running_average=not train)(x)
    return x


def test_linen_precise_stats_equal_float64_population_stats():
  model = LinenMLP()
  variables = model.init(jax.random.key(0), jnp.ones((2, 3)))
  params = jax.tree.map(lambda p: p + 0.1, variables['params'])
  variables = {'params': params, 'batch_stats': variables['batch_stats']}
  xs = _batches(10, seed=6)
  new = precise_bn_linen(model, variables, iter(xs), train=True)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  weights = ((p['Dense_0']['kernel'], p['Dense_0']['bias'], p['bn1']['scale'],
              p['bn1']['bias']), (p['Dense_1']['kernel'], p['Dense_1']['bias']))
  (m1, v1), (m2, v2) = np_mlp_stats(weights, xs)
  stats = new['batch_stats']
  np.testing.assert_allclose(stats['bn1']['mean'], m1, **F32_TOL)
  np.testing.assert_allclose(stats['bn1']['var'], v1, **F32_TOL)
  np.testing.assert_allclose(stats['BatchNorm_0']['mean'], m2, **F32_TOL)
  np.testing.assert_allclose(stats['BatchNorm_0']['var'], v2, **F32_TOL)
  assert new['params'] is params
  # The input variables are not modified.
  np.testing.assert_array_equal(variables['batch_stats']['bn1']['var'], np.ones(6))


def test_linen_uncalled_layers_keep_their_stats_and_errors():
  class TwoHeads(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False, both: bool = True):
      y = nn.BatchNorm(use_running_average=not train, name='bn0')(x)
      if both:
        y = y + nn.BatchNorm(use_running_average=not train, name='bn1')(x)
      return y

  model = TwoHeads()
  variables = model.init(jax.random.key(0), jnp.ones((2, 3)))
  stats = variables['batch_stats']
  stats['bn1']['mean'] = jnp.full(3, 7.0)
  xs = _batches(3)
  new = precise_bn_linen(model, variables, xs, train=True, both=False)
  np.testing.assert_allclose(new['batch_stats']['bn0']['mean'], np_pooled(xs)[0], **F32_TOL)
  np.testing.assert_array_equal(new['batch_stats']['bn1']['mean'], np.full(3, 7.0))
  with pytest.raises(ValueError, match="no 'batch_stats'"):
    precise_bn_linen(model, {'params': variables.get('params', {})}, xs)
  with pytest.raises(TypeError, match='drop mutable'):
    precise_bn_linen(model, variables, xs, mutable=True)


@pytest.mark.parametrize('momentum', [0.9, None])
def test_jaxbn_linen_batch_norm(momentum):
  import jaxbn.linen as jlinen

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      return jlinen.BatchNorm(use_running_average=not train, momentum=momentum)(nn.Dense(5)(x))

  net = Net()
  variables = net.init(jax.random.key(0), jnp.ones((2, 3)))
  _, upd = net.apply(variables, _batches(1, seed=11)[0], train=True, mutable=['batch_stats'])
  variables = {**variables, **upd}
  xs = _batches(4, seed=12)
  new = precise_bn_linen(net, variables, xs, train=True)
  k = np.asarray(variables['params']['Dense_0']['kernel'], np.float64)
  b = np.asarray(variables['params']['Dense_0']['bias'], np.float64)
  mean, var = np_pooled([np.asarray(x, np.float64) @ k + b for x in xs])
  stats = new['batch_stats']['BatchNorm_0']
  np.testing.assert_allclose(stats['mean'], mean, **F32_TOL)
  np.testing.assert_allclose(stats['var'], var, **F32_TOL)
  if momentum is None:
    assert int(stats['count']) == 1


def test_linen_renorm_corrects_towards_its_trained_statistics():
  import jaxbn.linen as jlinen

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      h = jlinen.BatchRenorm(use_running_average=not train, r_max=3.0, d_max=5.0,
                             running_var='unbiased', name='renorm')(nn.Dense(4)(x))
      z = nn.Dense(3)(h)
      self.sow('intermediates', 'z', z)
      return nn.BatchNorm(use_running_average=not train, name='bn')(z)

  net = Net()
  variables = net.init(jax.random.key(0), jnp.ones((2, 3)))
  # Running statistics far from the batches' (shifted data), so that the
  # corrections r and d are far from 1 and 0 and clip.
  for x in _batches(3, seed=13):
    _, upd = net.apply(variables, 4.0 * x + 10.0, train=True, mutable=['batch_stats'])
    variables = {**variables, **upd}
  xs = _batches(4, size=16, seed=14) + _batches(1, size=48, seed=15)
  new = precise_bn_linen(net, variables, xs, train=True)
  # What the layers see in training mode with the trained variables.
  zs, hs = [], []
  for x in xs:
    _, state = net.apply(variables, x, train=True, mutable=['batch_stats', 'intermediates'])
    zs.append(np.asarray(state['intermediates']['z'][0], np.float64))
    k = np.asarray(variables['params']['Dense_0']['kernel'], np.float64)
    hs.append(np.asarray(x, np.float64) @ k + np.asarray(variables['params']['Dense_0']['bias']))
  stats = new['batch_stats']
  mean, var = np_pooled(zs)
  np.testing.assert_allclose(stats['bn']['mean'], mean, **F32_TOL)
  np.testing.assert_allclose(stats['bn']['var'], var, **F32_TOL)
  mean, var = np_pooled(hs)
  n = sum(len(h) for h in hs)
  np.testing.assert_allclose(stats['renorm']['mean'], mean, **F32_TOL)
  np.testing.assert_allclose(stats['renorm']['var'], var * n / (n - 1), **F32_TOL)



# ---------------------------------- batch norms inside the model's transforms


def _stacked_stats(tree):
  """Every batch norm's mean and var in path order, one row per layer."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  keys = lambda path: [getattr(k, 'key', getattr(k, 'name', None)) for k in path]
  rows = lambda name: np.concatenate([np.reshape(v, (-1, 3)) for path, v in leaves
                                      if name in keys(path)])
  return rows('mean'), rows('var')


def np_two_steps(xs):
  """Pooled inputs of two batch norms run as y -> 2 * bn(y) + 1 in training
  mode (scale 1, bias 0): the batches, then 2 * their normalization + 1."""
  first = [np.asarray(x, np.float64) for x in xs]
  second = [2.0 * (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) + 1.0 for h in first]
  return [np.stack(s) for s in zip(np_pooled(first), np_pooled(second))]


@pytest.mark.parametrize('transform', ['remat', 'jit', 'scan'])
def test_nnx_batch_norms_inside_the_models_transforms(transform):
  # nnx.remat, nnx.jit and nnx.scan trace the batch norms apart from the
  # model: what they measure has to leave through the model's state.
  import jaxbn.nnx as jnnx
  step = lambda x, bn: 2.0 * bn(x) + 1.0

  class Model(nnx.Module):
    def __init__(self, rngs):
      if transform == 'scan':
        make = nnx.vmap(lambda rngs: jnnx.BatchNorm(3, rngs=rngs), in_axes=0, out_axes=0)
        self.bns = nnx.split_rngs(splits=2)(make)(rngs)
      else:
        self.bns = nnx.Sequential(jnnx.BatchNorm(3, rngs=rngs), jnnx.BatchNorm(3, rngs=rngs))

    def __call__(self, x):
      if transform == 'scan':
        return nnx.scan(step, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, self.bns)
      for bn in self.bns.layers:
        x = (nnx.remat if transform == 'remat' else nnx.jit)(step)(x, bn)
      return x

  model = Model(nnx.Rngs(0))
  xs = _batches(4, size=16, seed=20)
  precise_bn_nnx(model, xs)
  mean, var = _stacked_stats(nnx.state(model, nnx.BatchStat))
  want_mean, want_var = np_two_steps(xs)
  np.testing.assert_allclose(mean, want_mean, **F32_TOL)
  np.testing.assert_allclose(var, want_var, **F32_TOL)
  # Nothing of the recording is left in the model.
  assert jax.tree.structure(nnx.state(model)) == jax.tree.structure(
      nnx.state(Model(nnx.Rngs(0))))


@pytest.mark.parametrize('transform', ['remat', 'jit', 'scan'])
def test_linen_batch_norms_inside_the_models_transforms(transform):
  class Step(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
      return 2.0 * nn.BatchNorm(use_running_average=False)(x) + 1.0, None

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      if transform == 'scan':
        body = nn.scan(Step, variable_axes={'params': 0, 'batch_stats': 0},
                       split_rngs={'params': True}, length=2)
        return body()(x, None)[0]
      for _ in range(2):
        x = (nn.remat if transform == 'remat' else nn.jit)(Step)()(x)[0]
      return x

  xs = _batches(4, size=16, seed=21)
  variables = Net().init(jax.random.key(0), xs[0])
  new = precise_bn_linen(Net(), variables, xs)
  mean, var = _stacked_stats(new['batch_stats'])
  want_mean, want_var = np_two_steps(xs)
  np.testing.assert_allclose(mean, want_mean, **F32_TOL)
  np.testing.assert_allclose(var, want_var, **F32_TOL)
  assert jax.tree.structure(new) == jax.tree.structure(variables)


class LinenInputBN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(2)(nn.BatchNorm(use_running_average=not train)(x))


def test_integer_inputs_like_the_layers_take_them():
  # Flax's batch norms (and jaxbn's) normalize an integer input as float32,
  # e.g. uint8 pixels fed straight to a first batch norm; precise BN must
  # measure the same values. Sums of <= 64 integers < 256 are exact in
  # float32, so only the final divisions round (F32_TOL).
  import jaxbn.nnx as jnnx
  rng = np.random.default_rng(19)
  xs = [rng.integers(0, 256, (16, 3), dtype=np.uint8) for _ in range(4)]
  mean, var = np_pooled(xs)
  for bn in (nnx.BatchNorm, jnnx.BatchNorm):
    model = nnx.Sequential(bn(3, rngs=nnx.Rngs(0)), nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    model(xs[0])  # trains on integers
    precise_bn_nnx(model, xs)
    np.testing.assert_allclose(model.layers[0].mean[...], mean, **F32_TOL)
    np.testing.assert_allclose(model.layers[0].var[...], var, **F32_TOL)
  variables = LinenInputBN().init(jax.random.key(0), xs[0])
  new = precise_bn_linen(LinenInputBN(), variables, xs, train=True)
  np.testing.assert_allclose(new['batch_stats']['BatchNorm_0']['mean'], mean, **F32_TOL)
  np.testing.assert_allclose(new['batch_stats']['BatchNorm_0']['var'], var, **F32_TOL)
  # 0/1 integer masks, which the Linen layers also take.
  masks = [(rng.random((16, 1)) > 0.3).astype(np.int32) for _ in xs]
  model = LinenMaskedBN()
  variables = model.init(jax.random.key(0), (xs[0], masks[0]))
  new = precise_bn_linen(model, variables, list(zip(xs, masks)), train=True)
  mean, var = np_pooled([x[m[:, 0] == 1] for x, m in zip(xs, masks)])
  np.testing.assert_allclose(new['batch_stats']['BatchNorm_0']['mean'], mean, **F32_TOL)
  np.testing.assert_allclose(new['batch_stats']['BatchNorm_0']['var'], var, **F32_TOL)


class LinenMaskedBN(nn.Module):
  @nn.compact
  def __call__(self, batch, train: bool = False):
    from jaxbn.linen import BatchNorm
    x, mask = batch
    return BatchNorm(use_running_average=not train)(x, mask=mask)


def test_linen_layers_pool_over_their_axis_name_like_training():
  # A batch norm inside the model's nn.vmap over a split batch syncs over
  # 'batch' in training; what precise BN records is pooled the same way.
  import jaxbn.linen

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      bn = nn.vmap(jaxbn.linen.BatchNorm, variable_axes={'params': None, 'batch_stats': None},
                   split_rngs={'params': False}, axis_name='batch')
      return bn(use_running_average=False, axis_name='batch')(x)

  xs = [np.reshape(x, (4, 8, 3)) for x in _batches(3, seed=22)]
  variables = Net().init(jax.random.key(0), xs[0])
  new = precise_bn_linen(Net(), variables, xs)
  mean, var = np_pooled([x.reshape(-1, 3) for x in xs])
  np.testing.assert_allclose(new['batch_stats']['VmapBatchNorm_0']['mean'], mean, **F32_TOL)
  np.testing.assert_allclose(new['batch_stats']['VmapBatchNorm_0']['var'], var, **F32_TOL)
