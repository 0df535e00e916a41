"""Cross-device statistics on 8 simulated CPU devices (see conftest.py)."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen
import pytest
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from jax.test_util import check_grads

import jaxbn
import jaxbn.linen
import jaxbn.nnx
from jaxbn import _moments

NDEV = 8
pytestmark = pytest.mark.skipif(
    jax.device_count() < NDEV, reason='needs 8 devices (XLA_FLAGS in conftest.py)')

# Pooling reorders float32 sums; agreement to a few ulps of O(1) values.
TOL = dict(rtol=1e-5, atol=1e-5)


def _batch(seed=0, per_device=6, features=5):
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal((NDEV, per_device, features)) * 3 + 1).astype(np.float32)
  # Uneven valid counts per device: device d keeps its first d + 1 rows.
  rows = np.arange(per_device)[None, :, None] <= np.arange(NDEV)[:, None, None]
  mask = np.broadcast_to(rows, x.shape)
  return x, mask


def _global_reference(x, mask, momentum=0.9):
  flat_x, flat_m = x.reshape(-1, x.shape[-1]), mask.reshape(-1, x.shape[-1])
  y, state = jaxbn.batch_norm(flat_x, jaxbn.init_state(x.shape[-1]), training=True,
                              mask=flat_m, momentum=momentum, running_var='unbiased')
  return y.reshape(x.shape), state


def _step(x, mask, **kw):
  return jaxbn.batch_norm(x, jaxbn.init_state(x.shape[-1]), training=True, mask=mask,
                          momentum=0.9, running_var='unbiased', **kw)


def test_shard_map_uneven_masks_equal_global_statistics():
  x, mask = _batch()
  mesh = Mesh(np.array(jax.devices()[:NDEV]), ('data',))
  f = jax.shard_map(
      lambda x, m: _step(x[0], m[0], axis_name='data'),
      mesh=mesh, in_specs=(P('data'), P('data')), out_specs=(P('data'), P()),
      check_vma=False)
  y, state = jax.jit(f)(x, mask)
  y_ref, ref = _global_reference(x, mask)
  np.testing.assert_allclose(np.asarray(y).reshape(x.shape)[mask], y_ref[mask], **TOL)
  np.testing.assert_allclose(state.mean, ref.mean, **TOL)
  np.testing.assert_allclose(state.var, ref.var, **TOL)


def test_pmean_of_device_means_would_be_wrong():
  """The naive pooling differs: the test above can tell the two apart."""
  x, mask = _batch()
  per_device = [x[d][mask[d]].reshape(-1, x.shape[-1]).mean(0) for d in range(NDEV)]
  _, ref = _global_reference(x, mask, momentum=0.0)
  assert np.max(np.abs(np.mean(per_device, 0) - ref.mean)) > 1e-2


def test_pmap_and_vmap_with_axis_name():
  x, mask = _batch(seed=1)
  y_ref, ref = _global_reference(x, mask)
  for transform in (functools.partial(jax.pmap, axis_name='i'),
                    functools.partial(jax.vmap, axis_name='i')):
    y, state = transform(lambda x, m: _step(x, m, axis_name='i'))(x, mask)
    np.testing.assert_allclose(np.asarray(y)[mask], y_ref[mask], **TOL)
    for d in range(NDEV):
      np.testing.assert_allclose(state.mean[d], ref.mean, **TOL)
      np.testing.assert_allclose(state.var[d], ref.var, **TOL)


def test_axis_index_groups_sync_within_groups():
  x, mask = _batch(seed=2)
  groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
  y, state = jax.pmap(lambda x, m: _step(x, m, axis_name='i', axis_index_groups=groups),
                      axis_name='i')(x, mask)
  for group in groups:
    y_ref, ref = _global_reference(x[group], mask[group])
    np.testing.assert_allclose(np.asarray(y)[group][mask[group]], y_ref[mask[group]], **TOL)
    for d in group:
      np.testing.assert_allclose(state.var[d], ref.var, **TOL)



def test_axis_index_groups_of_unequal_sizes():
  # all_gather needs equal groups, psum does not (Flax's pmean divides by the
  # first group's size there); the statistics must still be each group's own.
  x, mask = _batch(seed=4)
  mask = mask.copy()
  mask[5] = False  # a device without a single valid entry
  groups = [[1, 5], [0, 2, 3, 4, 6, 7]]
  y, state = jax.pmap(lambda x, m: _step(x, m, axis_name='i', axis_index_groups=groups),
                      axis_name='i')(x, mask)
  for group in groups:
    mean, var, n = _group_moments(x, mask, group)
    y_ref = (x[group] - mean) / np.sqrt(var + 1e-5)
    np.testing.assert_allclose(np.asarray(y)[group][mask[group]], y_ref[mask[group]], **TOL)
    for d in group:
      np.testing.assert_allclose(state.mean[d], 0.1 * mean, **TOL)
      np.testing.assert_allclose(state.var[d], 0.9 + 0.1 * var * n / (n - 1), **TOL)


def _group_moments(x, mask, group):
  """float64 mean, biased variance and count of the valid entries of ``group``'s devices."""
  vals = x[group].reshape(-1, x.shape[-1]).astype(np.float64)
  valid = mask[group].reshape(-1, x.shape[-1])
  mean = np.array([v[m].mean() for v, m in zip(vals.T, valid.T)])
  var = np.array([v[m].var() for v, m in zip(vals.T, valid.T)])
  return mean, var, valid.sum(0)


def test_unequal_groups_of_a_tuple_axis_under_shard_map():
  # shard_map takes axis_index_groups in no psum (JAX raises a bare
  # NotImplementedError): each group's statistics must still be its own, for
  # the moments and for ghost batch norm's average of chunk statistics.
  x, mask = _batch(seed=5)
  groups = [[1, 5], [0, 2, 3, 4, 6, 7]]  # linear indices over ('a', 'b')
  mesh = Mesh(np.array(jax.devices()[:NDEV]).reshape(2, 4), ('a', 'b'))
  spec = P(('a', 'b'))

  def per_device(x, m):
    y, state = _step(x[0], m[0], axis_name=('a', 'b'), axis_index_groups=groups)
    _, ghost = jaxbn.batch_norm(x[0], jaxbn.init_state(5), training=True, momentum=0.0,
                                axis_name=('a', 'b'), axis_index_groups=groups,
                                virtual_batch_size=3)
    return y[None], state.mean[None], state.var[None], ghost.mean[None], ghost.var[None]

  y, mean, var, ghost_mean, ghost_var = jax.jit(jax.shard_map(
      per_device, mesh=mesh, in_specs=(spec, spec), out_specs=spec))(x, mask)
  for group in groups:
    m, v, n = _group_moments(x, mask, group)
    y_ref = (x[group] - m) / np.sqrt(v + 1e-5)
    np.testing.assert_allclose(np.asarray(y)[group][mask[group]], y_ref[mask[group]], **TOL)
    chunks = x[group].reshape(-1, 3, x.shape[-1]).astype(np.float64)
    for d in group:
      np.testing.assert_allclose(mean[d], 0.1 * m, **TOL)
      np.testing.assert_allclose(var[d], 0.9 + 0.1 * v * n / (n - 1), **TOL)
      np.testing.assert_allclose(ghost_mean[d], chunks.mean(1).mean(0), **TOL)
      np.testing.assert_allclose(ghost_var[d], chunks.var(1).mean(0), **TOL)


def test_groups_that_miss_an_index_are_refused():
  x, mask = _batch()
  with pytest.raises(ValueError, match=r'split the indices 0 to 7 .* each index in one group'):
    jax.pmap(lambda x, m: _step(x, m, axis_name='i', axis_index_groups=[[0, 1], [2, 3, 4]]),
             axis_name='i')(x, mask)


@pytest.mark.parametrize('axis_type', [AxisType.Auto, AxisType.Explicit])
def test_jit_over_sharded_batch_needs_no_axis_name(axis_type):
  x, _ = _batch(seed=3)
  flat = x.reshape(-1, x.shape[-1]) + 1e3  # an offset the shift has to handle
  mesh = Mesh(np.array(jax.devices()[:NDEV]), ('data',), axis_types=(axis_type,))
  sharded = jax.device_put(flat, NamedSharding(mesh, P('data')))
  ref = np.asarray(flat, np.float64)
  ref_y = (ref - ref.mean(0)) / np.sqrt(ref.var(0) + 1e-5)
  f = jax.jit(lambda x: jaxbn.batch_norm(x, jaxbn.init_state(5), training=True, momentum=0.0))
  y, state = f(sharded)
  # A float32 mean near 1e3 is off by up to half its ulp (3e-5): y by 1e-5 for std 3.
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=3e-5)
  np.testing.assert_allclose(state.mean, ref.mean(0), rtol=1e-6)
  np.testing.assert_allclose(state.var, ref.var(0), rtol=1e-5)
  # The GPU/TPU algorithm (a median-of-three shift) is traced on every
  # backend; run it here too: with explicit axes its first rows must be
  # taken without slicing the sharded batch below one row per device.
  mean, var = jax.jit(lambda x: _moments._shifted_moments(x, (0,)))(sharded)
  np.testing.assert_allclose(mean, ref.mean(0), rtol=1e-6)
  np.testing.assert_allclose(var, ref.var(0), rtol=1e-5)


@pytest.mark.parametrize('axis_type', [AxisType.Auto, AxisType.Explicit])
def test_flax_modules_over_sharded_batch(axis_type):
  x, _ = _batch(seed=4)
  flat = jnp.asarray(x.reshape(-1, x.shape[-1]))
  mesh = Mesh(np.array(jax.devices()[:NDEV]), ('data',), axis_types=(axis_type,))
  sharded = jax.device_put(flat, NamedSharding(mesh, P('data')))
  ref = np.asarray(flat, np.float64)
  ref_y = (ref - ref.mean(0)) / np.sqrt(ref.var(0) + 1e-5)
  layer = jaxbn.nnx.BatchNorm(5, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(layer, sharded), ref_y, **TOL)
  module = jaxbn.linen.BatchNorm(use_running_average=False)
  variables = module.init(jax.random.key(0), flat)
  y, _ = jax.jit(lambda v, x: module.apply(v, x, mutable=['batch_stats']))(variables, sharded)
  np.testing.assert_allclose(y, ref_y, **TOL)


def test_shard_map_returns_the_statistics_as_replicated_with_its_check_on():
  # With shard_map's default check_vma, out_specs=P() needs values typed as
  # equal on every device. Flax's pmean gives that; an all_gather did not,
  # so the drop-in layer failed where Flax's ran ("out_specs ... require
  # replication which can't be statically inferred").
  x, mask = _batch(seed=5)
  mesh = Mesh(np.array(jax.devices()[:NDEV]), ('data',))
  step = jax.shard_map(lambda x, m: _step(x[0], m[0], axis_name='data'), mesh=mesh,
                       in_specs=(P('data'), P('data')), out_specs=(P('data'), P()))
  y, state = jax.jit(step)(x, mask)
  y_ref, ref = _global_reference(x, mask)
  np.testing.assert_allclose(np.asarray(y).reshape(x.shape)[mask], y_ref[mask], **TOL)
  np.testing.assert_allclose(state.mean, ref.mean, **TOL)
  np.testing.assert_allclose(state.var, ref.var, **TOL)

  # Its derivative: with the check on, JAX transposes the collective itself.
  w = np.random.default_rng(6).standard_normal(x.shape).astype(np.float32)

  def loss(step, x):
    y, state = step(x, mask)
    return jnp.sum(jnp.where(mask, y.reshape(x.shape), 0) * w) + jnp.sum(state.var)

  np.testing.assert_allclose(jax.grad(loss, argnums=1)(jax.jit(step), x),
                             jax.grad(loss, argnums=1)(lambda x, m: _global_reference(x, m), x),
                             **TOL)

  flat = x.reshape(-1, x.shape[-1])
  sharded = jax.device_put(flat, NamedSharding(mesh, P('data')))
  for cls in (flax.linen.BatchNorm, jaxbn.linen.BatchNorm):
    module = cls(use_running_average=False, axis_name='data', momentum=0.9)
    variables = module.init(jax.random.key(0), flat)
    apply = jax.shard_map(lambda v, x: module.apply(v, x, mutable=['batch_stats']), mesh=mesh,
                          in_specs=(P(), P('data')), out_specs=(P('data'), P()))
    _, updates = jax.jit(apply)(variables, sharded)
    np.testing.assert_allclose(updates['batch_stats']['mean'], 0.1 * flat.mean(0), **TOL)


def test_two_per_feature_all_reduces_per_call():
  # n and sum(n_i * mean_i), then M2 about the global mean: each all-reduce
  # carries per-feature values only, whatever the number of devices.
  x, mask = _batch()
  mesh = Mesh(np.array(jax.devices()[:NDEV]), ('data',))
  f = jax.shard_map(lambda x, m: _step(x[0], m[0], axis_name='data'), mesh=mesh,
                    in_specs=(P('data'), P('data')), out_specs=(P('data'), P()),
                    check_vma=False)
  hlo = jax.jit(f).lower(x, mask).compile().as_text()
  collectives = [line for line in hlo.splitlines()
                 if re.search(r' (all-gather|all-reduce|collective-permute|all-to-all)'
                              r'(-start)?\(', line)]
  assert len(collectives) == 2, collectives
  features = x.shape[-1]
  for line in collectives:
    shapes = re.findall(r'f32\[([\d,]*)\]', line.split('=', 1)[1].split(' all-reduce')[0])
    assert shapes and all(shape == str(features) for shape in shapes), line


def test_gradients_with_axis_name():
  with jax.enable_x64(True):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((4, 3, 2)))
    mask = jnp.asarray(rng.random((4, 3, 2)) > 0.2)
    w = jnp.asarray(rng.standard_normal((4, 3, 2)))

    def f(x):
      def per_device(x, m, w):
        y, s = jaxbn.batch_norm(x, jaxbn.init_state(2, jnp.float64), training=True,
                                mask=m, axis_name='i')
        return jnp.sum(jnp.where(m, y, 0) * w) + jnp.sum(s.var)
      return jnp.sum(jax.vmap(per_device, axis_name='i')(x, mask, w))

    check_grads(jax.jit(f), (x,), order=2, modes=('fwd', 'rev'))


def test_precise_bn_pools_over_the_axis_name_like_training():
  # Data-parallel precise BN: each device runs its shard of every batch; the
  # layers pool what they record over 'data' as they pool in training, so
  # the result is precise BN on the unsharded batches (float64 reference).
  from jaxbn._precise import precise_bn_nnx
  rng = np.random.default_rng(6)
  xs = [(rng.standard_normal((32, 3)) * [2.0, 0.5, 1.0] + [3.0, -2.0, 5.0]).astype(np.float32)
        for _ in range(4)]
  rngs = nnx.Rngs(0)
  model = nnx.Sequential(
      nnx.Linear(3, 6, rngs=rngs), jaxbn.nnx.BatchNorm(6, axis_name='data', rngs=rngs),
      nnx.relu, nnx.Linear(6, 4, rngs=rngs), nnx.BatchNorm(4, axis_name='data', rngs=rngs))
  model.layers[1].scale[...] = jnp.array([0.5, 1.0, 2.0, 1.5, 0.7, 1.2])
  mesh = Mesh(np.array(jax.devices()[:NDEV]), ('data',))

  def call(model, batch):
    graphdef, state = nnx.split(model)

    def per_device(state, x):
      shard = nnx.merge(graphdef, state)
      shard(x)
      return nnx.state(shard)

    nnx.update(model, jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P('data')),
                                    out_specs=P(), check_vma=False)(state, batch))

  precise_bn_nnx(model, xs, call=call)
  f = lambda v: np.asarray(v[...], np.float64)
  l1, bn1, _, l2, bn2 = model.layers
  h1 = [x.astype(np.float64) @ f(l1.kernel) + f(l1.bias) for x in xs]
  y1 = [(h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) * f(bn1.scale) + f(bn1.bias) for h in h1]
  h2 = [np.maximum(y, 0) @ f(l2.kernel) + f(l2.bias) for y in y1]
  for bn, h in ((bn1, np.concatenate(h1)), (bn2, np.concatenate(h2))):
    np.testing.assert_allclose(bn.mean[...], h.mean(0), **TOL)
    np.testing.assert_allclose(bn.var[...], h.var(0), **TOL)


def test_precise_bn_linen_runs_through_call_under_shard_map():
  # The Linen form of the test above: apply under shard_map through call=,
  # with shard_map's replication check on (the statistics come out typed
  # as equal on every device).
  rng = np.random.default_rng(7)
  xs = [(rng.standard_normal((32, 3)) * [2.0, 0.5, 1.0] + [3.0, -2.0, 5.0]).astype(np.float32)
        for _ in range(4)]

  class Net(flax.linen.Module):
    @flax.linen.compact
    def __call__(self, x, train=False):
      h = flax.linen.Dense(6)(x)
      h = jaxbn.linen.BatchNorm(use_running_average=not train, axis_name='data')(h)
      h = flax.linen.Dense(4)(flax.linen.relu(h))
      return flax.linen.BatchNorm(use_running_average=not train, axis_name='data')(h)

  net = Net()
  variables = net.init(jax.random.key(0), xs[0])
  mesh = Mesh(np.array(jax.devices()[:NDEV]), ('data',))
  call = lambda apply, v, x: jax.shard_map(apply, mesh=mesh, in_specs=(P(), P('data')),
                                           out_specs=(P('data'), P()))(v, x)
  new = jaxbn.precise_bn_linen(net, variables, xs, call=call, train=True)
  f = lambda v: np.asarray(v, np.float64)
  params, stats = variables['params'], new['batch_stats']
  h1 = [x.astype(np.float64) @ f(params['Dense_0']['kernel']) + f(params['Dense_0']['bias'])
        for x in xs]
  y1 = [(h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) for h in h1]
  h2 = [np.maximum(y, 0) @ f(params['Dense_1']['kernel']) + f(params['Dense_1']['bias'])
        for y in y1]
  for name, h in (('BatchNorm_0', np.concatenate(h1)), ('BatchNorm_1', np.concatenate(h2))):
    np.testing.assert_allclose(stats[name]['mean'], h.mean(0), **TOL)
    np.testing.assert_allclose(stats[name]['var'], h.var(0), **TOL)
