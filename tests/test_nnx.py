"""jaxbn.nnx.BatchNorm: drop-in parity with flax.nnx.BatchNorm, and beyond.

Parity tolerance. Flax computes the batch variance as E[x^2] - E[x]^2 and
jaxbn with shifted sums; on well-conditioned float32 data the two differ by a
few ulps (~1e-7 relative). Through a conv/BN/dense model and a few optimizer
steps these differences stay around 1e-6, so 1e-5 (rtol and atol) leaves a
margin of ~10x while still catching any real difference (a wrong momentum,
epsilon or variance estimate shows at 1e-3 or more). Evaluation uses the
same arithmetic in the same order as Flax and matches to 1e-6.
"""

import functools
import inspect
import subprocess
import sys
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.nnx import bridge

import jaxbn
import jaxbn.linen
import jaxbn.nnx
from reference import bfloat16_ulps, np_batch_norm_train, np_moments, np_normalize

TOL = dict(rtol=1e-5, atol=1e-5)
EVAL_TOL = dict(rtol=1e-6, atol=1e-6)
BN_CLASSES = {'flax': nnx.BatchNorm, 'jaxbn': jaxbn.nnx.BatchNorm}


def _data(shape, seed=0, offset=0.5, std=1.5):
  rng = np.random.default_rng(seed)
  return jnp.asarray(offset + std * rng.standard_normal(shape), jnp.float32)


def _state_arrays(module):
  return nnx.to_pure_dict(nnx.state(module))


# --- API surface ------------------------------------------------------------



def test_submodule_access():
  from jaxbn import nnx as jnnx
  assert jnnx.BatchNorm is jaxbn.nnx.BatchNorm
  assert jaxbn.nnx.BatchNorm.__name__ == 'BatchNorm'


def test_lazy_submodules_from_a_plain_import():
  code = ('import jaxbn; assert jaxbn.nnx.BatchNorm.__module__ == "jaxbn.nnx"; '
          'assert jaxbn.linen.BatchNorm.__module__ == "jaxbn.linen"; '
          'from jaxbn import nnx, linen')
  subprocess.run([sys.executable, '-c', code], check=True)


def test_constructor_signature_extends_flax():
  ours = list(inspect.signature(jaxbn.nnx.BatchNorm.__init__).parameters.values())
  theirs = list(inspect.signature(nnx.BatchNorm.__init__).parameters.values())
  assert [p.name for p in ours[:len(theirs)]] == [p.name for p in theirs]
  for a, b in zip(ours, theirs):
    assert a.kind == b.kind, a.name
    if a.name.endswith('_init'):
      # Fresh closures each time; compare what they produce.
      key = jax.random.key(0)
      np.testing.assert_array_equal(a.default(key, (3,)), b.default(key, (3,)))
    else:
      assert a.default == b.default, a.name
  extra = ours[len(theirs):]
  assert [p.name for p in extra] == ['running_var', 'virtual_batch_size']
  assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extra)
  call_ours = inspect.signature(jaxbn.nnx.BatchNorm.__call__)
  call_theirs = inspect.signature(nnx.BatchNorm.__call__)
  assert list(call_ours.parameters) == list(call_theirs.parameters)


@pytest.mark.parametrize('use_scale,use_bias', [(True, True), (False, True), (True, False), (False, False)])
def test_same_variables_as_flax(use_scale, use_bias):
  kwargs = dict(use_scale=use_scale, use_bias=use_bias, rngs=nnx.Rngs(3),
                scale_init=nnx.initializers.uniform(), bias_init=nnx.initializers.normal())
  ours = jaxbn.nnx.BatchNorm(6, **kwargs)
  kwargs['rngs'] = nnx.Rngs(3)
  theirs = nnx.BatchNorm(6, **kwargs)
  s_ours, s_theirs = nnx.state(ours), nnx.state(theirs)
  assert jax.tree.structure(s_ours) == jax.tree.structure(s_theirs)
  for (p, a), (q, b) in zip(nnx.to_flat_state(s_ours), nnx.to_flat_state(s_theirs)):
    assert p == q and type(a) is type(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    # Initializers draw the same keys in the same order.
    np.testing.assert_array_equal(a[...], b[...])
  assert (ours.scale is None) == (not use_scale)
  assert (ours.bias is None) == (not use_bias)


def test_extra_variables_only_when_switched_on():
  plain = jaxbn.nnx.BatchNorm(4, running_var='unbiased', virtual_batch_size=2,
                              rngs=nnx.Rngs(0))
  assert set(_state_arrays(plain)) == {'scale', 'bias', 'mean', 'var'}
  cumulative = jaxbn.nnx.BatchNorm(4, momentum=None, rngs=nnx.Rngs(0))
  assert set(_state_arrays(cumulative)) == {'scale', 'bias', 'mean', 'var', 'count'}
  assert isinstance(cumulative.count, nnx.BatchStat)
  assert cumulative.count[...].dtype == jnp.int32


def test_graphdef_independent_of_initializers():
  a = jaxbn.nnx.BatchNorm(3, scale_init=nnx.initializers.zeros,
                          bias_init=nnx.initializers.normal(), rngs=nnx.Rngs(0))
  b = jaxbn.nnx.BatchNorm(3, scale_init=nnx.initializers.ones, rngs=nnx.Rngs(1))
  assert nnx.graphdef(a) == nnx.graphdef(b)


# --- modes ------------------------------------------------------------------


def test_train_eval_view_and_call_override():
  x = _data((16, 3))
  bn = jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
  assert bn.use_running_average is False
  bn(x)
  mean_after_train = bn.mean[...]
  assert not np.allclose(mean_after_train, 0.0)

  bn.eval()
  assert bn.use_running_average is True
  bn(x)
  np.testing.assert_array_equal(bn.mean[...], mean_after_train)
  bn(x, use_running_average=False)  # the call argument wins
  assert not np.array_equal(bn.mean[...], mean_after_train)

  bn.train()
  assert bn.use_running_average is False
  eval_view = nnx.view(bn, use_running_average=True)
  assert eval_view.use_running_average is True and bn.use_running_average is False
  before = bn.mean[...]
  eval_view(x)
  np.testing.assert_array_equal(bn.mean[...], before)


def test_missing_mode_names_the_options():
  bn = jaxbn.nnx.BatchNorm(3, use_running_average=None, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='model.train'):
    bn(_data((4, 3)))


# --- parity with flax.nnx.BatchNorm -----------------------------------------


@pytest.mark.parametrize('axis,shape', [((-1), (8, 5, 5, 4)), (1, (8, 4, 5, 5))])
def test_single_layer_matches_flax(axis, shape):
  x = _data(shape)
  mask = np.random.default_rng(1).random(shape) > 0.3
  for m in (None, jnp.asarray(mask)):
    layers = {k: cls(4, axis=axis, momentum=0.9, rngs=nnx.Rngs(0))
              for k, cls in BN_CLASSES.items()}
    ys = {k: bn(x, mask=m) for k, bn in layers.items()}
    np.testing.assert_allclose(ys['jaxbn'], ys['flax'], **TOL)
    for name in ('mean', 'var'):
      np.testing.assert_allclose(getattr(layers['jaxbn'], name)[...],
                                 getattr(layers['flax'], name)[...], **TOL)
    for bn in layers.values():
      bn.eval()
    np.testing.assert_allclose(layers['jaxbn'](x), layers['flax'](x), **EVAL_TOL)


def test_several_feature_axes_use_the_product_as_num_features():
  # Flax's NNX layer cannot update its statistics for a tuple axis; jaxbn's
  # can, and agrees with the Linen layer (whose variables keep the 2-D shape).
  x = _data((8, 3, 4, 2))
  bn = jaxbn.nnx.BatchNorm(12, axis=(1, 2), momentum=0.9, rngs=nnx.Rngs(0))
  y = bn(x)
  linen_bn = jaxbn.linen.BatchNorm(use_running_average=False, axis=(1, 2), momentum=0.9)
  variables = linen_bn.init(jax.random.key(0), x)
  y_linen, updates = linen_bn.apply(variables, x, mutable=['batch_stats'])
  np.testing.assert_allclose(y, y_linen, **EVAL_TOL)
  assert bn.mean.shape == (12,)
  np.testing.assert_allclose(bn.mean[...], updates['batch_stats']['mean'].reshape(12), **EVAL_TOL)
  np.testing.assert_allclose(bn.var[...], updates['batch_stats']['var'].reshape(12), **EVAL_TOL)


class CNN(nnx.Module):
  """conv-BN-relu-conv-BN-dense, with the BatchNorm class as an argument."""

  def __init__(self, bn_cls, *, rngs):
    # No conv bias before BN: its gradient is zero up to rounding, and Adam
    # would turn that rounding noise into full-size steps.
    self.conv1 = nnx.Conv(1, 8, (3, 3), use_bias=False, rngs=rngs)
    self.bn1 = bn_cls(8, momentum=0.9, rngs=rngs)
    self.conv2 = nnx.Conv(8, 16, (3, 3), strides=2, use_bias=False, rngs=rngs)
    self.bn2 = bn_cls(16, momentum=0.9, rngs=rngs)
    self.dense = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    return self.dense(x.mean(axis=(1, 2)))


@nnx.jit
def _train_step(model, optimizer, x, labels):
  def loss_fn(model):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def _eval(model, x):
  return model(x)


@functools.lru_cache(maxsize=None)
def _trained(bn_cls, steps=4):
  """(graphdef, state, losses) after `steps` Adam steps; shared by tests."""
  model = CNN(bn_cls, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  losses = []
  for step in range(steps):
    x = _data((16, 8, 8, 1), seed=step, offset=0.3)
    labels = jnp.asarray(np.random.default_rng(100 + step).integers(0, 10, 16))
    losses.append(float(_train_step(model, optimizer, x, labels)))
  graphdef, state = nnx.split(model)
  return graphdef, state, losses


def _train(bn_cls):
  graphdef, state, losses = _trained(bn_cls)
  return nnx.merge(graphdef, state), losses


def test_cnn_training_matches_flax():
  flax_model, flax_losses = _train(nnx.BatchNorm)
  ours, our_losses = _train(jaxbn.nnx.BatchNorm)
  np.testing.assert_allclose(our_losses, flax_losses, **TOL)
  s_ours, s_flax = nnx.state(ours), nnx.state(flax_model)
  chex.assert_trees_all_close(s_ours, s_flax, **TOL)
  x = _data((8, 8, 8, 1), seed=99)
  flax_model.eval()
  ours.eval()
  np.testing.assert_allclose(_eval(ours, x), _eval(flax_model, x), **TOL)


def test_checkpoint_round_trip_with_flax():
  flax_model, _ = _train(nnx.BatchNorm)
  flax_model.eval()
  x = _data((8, 8, 8, 1), seed=7)
  expected = _eval(flax_model, x)

  # Flax state -> jaxbn model, through update and through merge.
  ours = CNN(jaxbn.nnx.BatchNorm, rngs=nnx.Rngs(42))
  nnx.update(ours, nnx.state(flax_model))
  ours.eval()
  np.testing.assert_allclose(_eval(ours, x), expected, **EVAL_TOL)
  graphdef, _ = nnx.split(ours)
  merged = nnx.merge(graphdef, nnx.state(flax_model))
  np.testing.assert_allclose(_eval(merged, x), expected, **EVAL_TOL)

  # Pure dict (what checkpoint libraries store) -> jaxbn model and back.
  pure = nnx.to_pure_dict(nnx.state(flax_model))
  ours2 = CNN(jaxbn.nnx.BatchNorm, rngs=nnx.Rngs(1))
  state = nnx.state(ours2)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(ours2, state)
  ours2.eval()
  np.testing.assert_allclose(_eval(ours2, x), expected, **EVAL_TOL)

  back = CNN(nnx.BatchNorm, rngs=nnx.Rngs(5))
  nnx.update(back, nnx.state(ours2))
  back.eval()
  np.testing.assert_allclose(_eval(back, x), expected, **EVAL_TOL)


# --- numerics ---------------------------------------------------------------


def test_large_offset_is_exact_where_flax_fast_variance_is_not():
  x = np.asarray(1e4 + np.random.default_rng(0).standard_normal((256, 4)), np.float32)
  ref_mean, ref_var, _ = np_moments(x, (1,))
  layers = {k: cls(4, momentum=0.0, rngs=nnx.Rngs(0)) for k, cls in BN_CLASSES.items()}
  ys = {k: np.asarray(bn(jnp.asarray(x))) for k, bn in layers.items()}

  ours = layers['jaxbn']
  np.testing.assert_allclose(ours.mean[...], ref_mean, rtol=1e-7)
  np.testing.assert_allclose(ours.var[...], ref_var, rtol=1e-5)
  np.testing.assert_allclose(ys['jaxbn'].std(0), 1.0, atol=1e-4)
  # Flax's default E[x^2] - E[x]^2 cancels catastrophically here.
  flax_err = np.abs(np.asarray(layers['flax'].var[...]) / ref_var - 1).max()
  assert flax_err > 0.1
  assert np.abs(ys['flax'].std(0) - 1).max() > 0.1


@pytest.mark.parametrize('dtype,param_dtype', [
    (jnp.bfloat16, jnp.float32), (jnp.bfloat16, jnp.bfloat16), (None, jnp.bfloat16)])
def test_bfloat16_keeps_float32_statistics(dtype, param_dtype):
  x = (3.0 + 2.0 * np.random.default_rng(0).standard_normal((64, 6))).astype(jnp.bfloat16)
  layers = {k: cls(6, dtype=dtype, param_dtype=param_dtype, momentum=0.9, rngs=nnx.Rngs(0))
            for k, cls in BN_CLASSES.items()}
  ys = {k: bn(jnp.asarray(x)) for k, bn in layers.items()}
  ours = layers['jaxbn']
  assert ours.mean[...].dtype == jnp.float32 and ours.var[...].dtype == jnp.float32
  assert ys['jaxbn'].dtype == ys['flax'].dtype
  # Reference: float64 statistics of the bfloat16 values actually seen.
  _, mean, var, _ = np_batch_norm_train(
      np.asarray(x, np.float64), np.zeros(6), np.ones(6), 0, momentum=0.9)
  np.testing.assert_allclose(ours.mean[...], mean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ours.var[...], var, rtol=1e-6)
  ours.eval()
  assert ours(jnp.asarray(x)).dtype == ys['jaxbn'].dtype


def test_bfloat16_evaluation_rounds_once():
  # dtype=bfloat16 promotes the running statistics and parameters to
  # bfloat16 (Flax's semantics, kept); the normalization itself then runs in
  # float32 and rounds once, where Flax's rounds after every operation.
  rng = np.random.default_rng(0)
  x = jnp.asarray(3.0 + 2.0 * rng.standard_normal((512, 16)), jnp.bfloat16)
  layers = {k: cls(16, dtype=jnp.bfloat16, use_running_average=True, rngs=nnx.Rngs(0))
            for k, cls in BN_CLASSES.items()}
  stats = {'mean': 3.0 + 0.1 * rng.standard_normal(16), 'var': rng.uniform(2, 6, 16),
           'scale': rng.uniform(0.5, 1.5, 16), 'bias': rng.standard_normal(16)}
  for layer in layers.values():
    for name, value in stats.items():
      getattr(layer, name)[...] = jnp.asarray(value, jnp.float32)
  seen = lambda a: np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16), np.float64)
  ref = np_normalize(seen(x), *(seen(stats[k]) for k in ('mean', 'var', 'scale', 'bias')),
                     (1,), 1e-5)
  errors = {k: bfloat16_ulps(layer(x), ref).max() for k, layer in layers.items()}
  assert layers['jaxbn'](x).dtype == layers['flax'](x).dtype == jnp.bfloat16
  assert errors['jaxbn'] <= 0.501  # one rounding; float32's own error is ~2^-16 ulp
  assert errors['flax'] > 1.0


def test_mask_with_nan_matches_reference_and_has_finite_gradients():
  rng = np.random.default_rng(0)
  x = (1.0 + rng.standard_normal((12, 5))).astype(np.float32)
  mask = rng.random((12, 1)) > 0.3
  x_nan = np.where(mask, x, np.nan).astype(np.float32)
  bn = jaxbn.nnx.BatchNorm(5, momentum=0.9, rngs=nnx.Rngs(0))
  y_ref, mean, var, _ = np_batch_norm_train(
      x, np.zeros(5), np.ones(5), 0, momentum=0.9, mask=np.broadcast_to(mask, x.shape))
  y = bn(jnp.asarray(x_nan), mask=jnp.asarray(mask))
  m = np.broadcast_to(mask, x.shape)
  np.testing.assert_allclose(np.asarray(y)[m], y_ref[m], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(bn.mean[...], mean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(bn.var[...], var, rtol=1e-6)

  def loss(model, x):
    return jnp.sum(jnp.where(mask, model(x, mask=jnp.asarray(mask)), 0.0) ** 2)
  grads = nnx.grad(loss)(jaxbn.nnx.BatchNorm(5, rngs=nnx.Rngs(0)), jnp.asarray(x_nan))
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_complex_input_behaves_like_flax():
  # Flax keeps float32 statistics and writes the complex batch mean into them
  # (JAX warns that the imaginary part is dropped); jaxbn does the same.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((16, 3)) + 1j * rng.standard_normal((16, 3)),
                  jnp.complex64)
  out = {}
  for k, cls in BN_CLASSES.items():
    bn = cls(3, momentum=0.9, rngs=nnx.Rngs(0))
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      y = bn(x)
    bn.eval()
    out[k] = (y, bn(x), bn.mean[...], bn.var[...])
  assert out['jaxbn'][0].dtype == jnp.complex64
  chex.assert_trees_all_close(out['jaxbn'], out['flax'], **TOL)


# --- transforms -------------------------------------------------------------


def test_grad_matches_flax_and_only_touches_params():
  x = _data((16, 4))

  def loss(model):
    return jnp.mean(model(x) ** 3)

  grads = {k: nnx.grad(loss)(cls(4, rngs=nnx.Rngs(0))) for k, cls in BN_CLASSES.items()}
  assert set(nnx.to_pure_dict(grads['jaxbn'])) == {'scale', 'bias'}
  chex.assert_trees_all_close(grads['jaxbn'], grads['flax'], **TOL)


def test_jit_split_merge_and_remat():
  x = _data((16, 4))
  eager = jaxbn.nnx.BatchNorm(4, rngs=nnx.Rngs(0))
  y_eager = eager(x)

  jitted = jaxbn.nnx.BatchNorm(4, rngs=nnx.Rngs(0))
  y_jit = nnx.jit(lambda m, x: m(x))(jitted, x)
  np.testing.assert_allclose(y_jit, y_eager, **EVAL_TOL)
  np.testing.assert_allclose(jitted.mean[...], eager.mean[...], **EVAL_TOL)

  graphdef, state = nnx.split(jaxbn.nnx.BatchNorm(4, rngs=nnx.Rngs(0)))

  @jax.jit
  def pure_step(state, x):
    model = nnx.merge(graphdef, state)
    y = model(x)
    return y, nnx.state(model)

  y_pure, new_state = pure_step(state, x)
  np.testing.assert_allclose(y_pure, y_eager, **EVAL_TOL)
  np.testing.assert_allclose(new_state['var'][...], eager.var[...], **EVAL_TOL)

  remat = jaxbn.nnx.BatchNorm(4, rngs=nnx.Rngs(0))

  def loss(model, x):
    return jnp.sum(nnx.remat(lambda m, x: m(x))(model, x) ** 2)

  grads = nnx.grad(loss)(remat, x)
  np.testing.assert_allclose(remat.mean[...], eager.mean[...], **EVAL_TOL)
  assert set(nnx.to_pure_dict(grads)) == {'scale', 'bias'}


def test_vmap_axis_name_pools_statistics_exactly():
  x = np.asarray(_data((4, 8, 3), offset=2.0))
  bn = jaxbn.nnx.BatchNorm(3, axis_name='batch', rngs=nnx.Rngs(0))

  @nnx.vmap(in_axes=(None, 0), out_axes=0, axis_name='batch')
  def forward(bn, x):
    return bn(x)

  y = forward(bn, x)
  whole = jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
  y_whole = whole(jnp.asarray(x.reshape(32, 3))).reshape(4, 8, 3)
  np.testing.assert_allclose(y, y_whole, **EVAL_TOL)
  np.testing.assert_allclose(bn.mean[...], whole.mean[...], **EVAL_TOL)
  np.testing.assert_allclose(bn.var[...], whole.var[...], **EVAL_TOL)


class Block(nnx.Module):

  def __init__(self, bn_cls, *, rngs):
    self.linear = nnx.Linear(3, 3, rngs=rngs)
    self.bn = bn_cls(3, momentum=0.9, rngs=rngs)

  def __call__(self, x):
    return nnx.relu(self.bn(self.linear(x)))


def test_scan_over_stacked_layers_matches_flax():
  x = _data((8, 3))
  out = {}
  for name, cls in BN_CLASSES.items():
    @nnx.vmap(in_axes=0, out_axes=0)
    def create(key):
      return Block(cls, rngs=nnx.Rngs(key))

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def forward(block, x):
      return block(x)

    stack = create(jax.random.split(jax.random.key(0), 4))
    y = forward(stack, x)
    assert stack.bn.mean.shape == (4, 3)
    out[name] = (y, stack.bn.mean[...], stack.bn.var[...])
  chex.assert_trees_all_close(out['jaxbn'], out['flax'], **TOL)


def test_bridge_to_linen_and_to_nnx():
  x = _data((8, 3))
  # An NNX jaxbn layer inside a Linen model.
  results = {}
  for name, cls in BN_CLASSES.items():
    model = bridge.to_linen(cls, 3)
    variables = model.init(jax.random.key(0), x)
    y, updates = model.apply(variables, x, mutable=['batch_stats'])
    results[name] = (y, updates['batch_stats'])
  chex.assert_trees_all_close(results['jaxbn'], results['flax'], **TOL)

  # A Linen jaxbn layer inside an NNX model.
  results = {}
  for name, cls in {'flax': nn.BatchNorm, 'jaxbn': jaxbn.linen.BatchNorm}.items():
    layer = bridge.ToNNX(cls(use_running_average=False), rngs=nnx.Rngs(0))
    bridge.lazy_init(layer, x)
    y = layer(x, mutable=['batch_stats'])
    results[name] = (y, nnx.to_pure_dict(nnx.state(layer, nnx.BatchStat)))
  chex.assert_trees_all_close(results['jaxbn'], results['flax'], **TOL)


# --- extra options ----------------------------------------------------------


def test_unbiased_running_var_and_cumulative_average():
  xs = [np.asarray(_data((10, 3), seed=s)) for s in range(3)]
  bn = jaxbn.nnx.BatchNorm(3, momentum=None, running_var='unbiased', rngs=nnx.Rngs(0))
  mean, var, count = np.zeros(3), np.ones(3), 0
  for x in xs:
    bn(jnp.asarray(x))
    _, mean, var, count = np_batch_norm_train(
        x, mean, var, count, momentum=None, running_var='unbiased')
  assert int(bn.count[...]) == 3
  np.testing.assert_allclose(bn.mean[...], mean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(bn.var[...], var, rtol=1e-6)
  # The cumulative average is the plain mean of the batch means.
  np.testing.assert_allclose(bn.mean[...], np.mean([x.mean(0) for x in xs], 0), rtol=1e-5)


@pytest.mark.parametrize('size', [0, 1, 2.5, True])
def test_bad_virtual_batch_size_fails_at_construction(size):
  # Not at the first training call, which an evaluation-only model never makes.
  with pytest.raises(ValueError, match='virtual_batch_size must be an int >= 2'):
    jaxbn.nnx.BatchNorm(4, virtual_batch_size=size, rngs=nnx.Rngs(0))


def test_virtual_batch_size_delegates_to_ghost_batch_norm():
  x = _data((12, 4))
  bn = jaxbn.nnx.BatchNorm(4, virtual_batch_size=4, momentum=0.9, rngs=nnx.Rngs(0))
  y = bn(x)
  y_ref, state = jaxbn.batch_norm(
      x, jaxbn.init_state(4), bn.scale[...], bn.bias[...], training=True,
      momentum=0.9, virtual_batch_size=4)
  np.testing.assert_allclose(y, y_ref, **EVAL_TOL)
  np.testing.assert_allclose(bn.mean[...], state.mean, **EVAL_TOL)
  np.testing.assert_allclose(bn.var[...], state.var, **EVAL_TOL)
  # Each chunk is normalized on its own.
  np.testing.assert_allclose(np.asarray(y).reshape(3, 4, 4).mean(1), 0.0, atol=1e-5)


# --- errors -----------------------------------------------------------------


def test_num_features_mismatch_names_the_fix():
  bn = jaxbn.nnx.BatchNorm(5, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'num_features=5.*num_features=6'):
    bn(_data((4, 6)))
  with pytest.raises(TypeError, match='num_features must be an int'):
    jaxbn.nnx.BatchNorm((2, 3), rngs=nnx.Rngs(0))


def test_batch_of_one_in_training_names_the_fix():
  bn = jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'use_running_average=True.*model.eval\(\)'):
    bn(_data((1, 3)))
  with pytest.raises(ValueError, match='batch of 2 or more'):
    nnx.jit(lambda m, x: m(x))(bn, _data((1, 3)))
  bn.eval()
  assert bn(_data((1, 3))).shape == (1, 3)


def test_bad_options_fail_at_construction():
  with pytest.raises(ValueError, match='running_var'):
    jaxbn.nnx.BatchNorm(3, running_var='sample', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='momentum'):
    jaxbn.nnx.BatchNorm(3, momentum=1.5, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='axis_name'):
    jaxbn.nnx.BatchNorm(3, axis_index_groups=[[0, 1]], rngs=nnx.Rngs(0))
