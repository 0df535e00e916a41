"""jaxbn.linen.BatchNorm: drop-in parity with flax.linen.BatchNorm, and beyond.

Parity tolerance: as in test_nnx.py. Flax's E[x^2] - E[x]^2 and jaxbn's
shifted sums differ by a few float32 ulps on well-conditioned data; after a
few optimizer steps through conv/BN/dense the parameters and statistics
differ by ~1e-6, so rtol = atol = 1e-5 has a ~10x margin and still catches
any real deviation (which shows at 1e-3 or more). Evaluation does the same
arithmetic in the same order and matches to 1e-6.
"""

import dataclasses
import functools
import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax.core import freeze

import jaxbn
import jaxbn.linen
from jaxbn.linen import BatchNorm, apply_train
from reference import np_batch_norm_train, np_moments

TOL = dict(rtol=1e-5, atol=1e-5)
EVAL_TOL = dict(rtol=1e-6, atol=1e-6)
BN_CLASSES = {'flax': nn.BatchNorm, 'jaxbn': BatchNorm}


def _data(shape, seed=0, offset=0.5, std=1.5):
  rng = np.random.default_rng(seed)
  return jnp.asarray(offset + std * rng.standard_normal(shape), jnp.float32)


# --- API surface ------------------------------------------------------------



def test_submodule_access():
  from jaxbn import linen as jlinen
  assert jlinen.BatchNorm is jaxbn.linen.BatchNorm
  assert BatchNorm.__name__ == 'BatchNorm'


def test_fields_match_flax_in_order_and_defaults():
  skip = {'parent', 'name'}
  ours = [f for f in dataclasses.fields(BatchNorm) if f.name not in skip]
  theirs = [f for f in dataclasses.fields(nn.BatchNorm) if f.name not in skip]
  assert [f.name for f in ours[:len(theirs)]] == [f.name for f in theirs]
  for a, b in zip(ours, theirs):
    assert a.default == b.default, a.name
  extra = ours[len(theirs):]
  assert [f.name for f in extra] == ['running_var', 'virtual_batch_size']
  assert all(f.kw_only for f in extra)
  # Positional use means the same thing as with Flax.
  assert BatchNorm(True).use_running_average is True
  assert BatchNorm(True, 1).axis == 1
  params = inspect.signature(BatchNorm).parameters
  assert params['running_var'].kind is inspect.Parameter.KEYWORD_ONLY
  assert params['virtual_batch_size'].kind is inspect.Parameter.KEYWORD_ONLY


def test_auto_name_and_variables_match_flax():
  def make(bn_cls):
    class Model(nn.Module):
      @nn.compact
      def __call__(self, x):
        x = nn.Dense(4)(x)
        return bn_cls(use_running_average=False, scale_init=nn.initializers.uniform(),
                      bias_init=nn.initializers.normal())(x)
    return Model()

  x = _data((8, 3))
  variables = {k: make(cls).init(jax.random.key(0), x) for k, cls in BN_CLASSES.items()}
  assert 'BatchNorm_0' in variables['jaxbn']['params']
  assert 'BatchNorm_0' in variables['jaxbn']['batch_stats']
  # Same structure, shapes, dtypes, and values: initializers get the same keys.
  jax.tree.map(lambda a, b: (a.shape == b.shape and a.dtype == b.dtype) or pytest.fail(),
               variables['jaxbn'], variables['flax'])
  chex.assert_trees_all_equal(variables['jaxbn'], variables['flax'])


@pytest.mark.parametrize('use_scale,use_bias', [(True, False), (False, True), (False, False)])
def test_optional_params(use_scale, use_bias):
  x = _data((8, 3))
  shapes = {
      k: jax.tree.map(jnp.shape, cls(use_running_average=True, use_scale=use_scale,
                                     use_bias=use_bias).init(jax.random.key(0), x))
      for k, cls in BN_CLASSES.items()}
  assert shapes['jaxbn'] == shapes['flax']


def test_extra_variables_only_when_switched_on():
  x = _data((8, 3))
  plain = BatchNorm(use_running_average=False, running_var='unbiased', virtual_batch_size=4)
  assert set(plain.init(jax.random.key(0), x)['batch_stats']) == {'mean', 'var'}
  cumulative = BatchNorm(use_running_average=False, momentum=None)
  stats = cumulative.init(jax.random.key(0), x)['batch_stats']
  assert set(stats) == {'mean', 'var', 'count'}
  assert stats['count'].dtype == jnp.int32 and int(stats['count']) == 0


# --- init -------------------------------------------------------------------


def test_init_does_not_update_and_ignores_axis_name():
  x = _data((8, 3), offset=3.0)
  bn = BatchNorm(use_running_average=False, axis_name='devices', momentum=None)
  y, variables = bn.init_with_output(jax.random.key(0), x)
  np.testing.assert_array_equal(variables['batch_stats']['mean'], 0.0)
  np.testing.assert_array_equal(variables['batch_stats']['var'], 1.0)
  assert int(variables['batch_stats']['count']) == 0
  np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-5)


def test_init_accepts_a_dummy_batch_of_one():
  # The usual `model.init(key, jnp.ones((1, ...)), train=True)` pattern.
  x = jnp.ones((1, 3))
  for cls in BN_CLASSES.values():
    y, variables = cls(use_running_average=False).init_with_output(jax.random.key(0), x)
    np.testing.assert_array_equal(y, 0.0)  # x - mean = 0: the output is `bias`
    assert variables['params']['scale'].shape == (3,)
  ghost = BatchNorm(use_running_average=False, virtual_batch_size=4)
  assert ghost.init(jax.random.key(0), x)['batch_stats']['mean'].shape == (3,)


# --- parity with flax.linen.BatchNorm ---------------------------------------


@pytest.mark.parametrize('axis,shape', [(-1, (8, 5, 5, 4)), (1, (8, 4, 5, 5)), ((1, 2), (8, 3, 4, 2))])
def test_single_layer_matches_flax(axis, shape):
  x = _data(shape)
  mask = jnp.asarray(np.random.default_rng(1).random(shape) > 0.3)
  for m in (None, mask):
    out = {}
    for k, cls in BN_CLASSES.items():
      bn = cls(use_running_average=False, axis=axis, momentum=0.9)
      variables = bn.init(jax.random.key(0), x)
      y, updates = bn.apply(variables, x, mask=m, mutable=['batch_stats'])
      y_eval = cls(use_running_average=True, axis=axis).apply({**variables, **updates}, x)
      out[k] = (y, updates, y_eval)
    chex.assert_trees_all_close(out['jaxbn'][:2], out['flax'][:2], **TOL)
    np.testing.assert_allclose(out['jaxbn'][2], out['flax'][2], **EVAL_TOL)


@pytest.mark.parametrize('dtype', [None, jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize('param_dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('x_dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('force_float32_reductions', [True, False])
def test_dtypes_match_flax(dtype, param_dtype, x_dtype, force_float32_reductions):
  x = _data((8, 3)).astype(x_dtype)
  got = {}
  for k, cls in BN_CLASSES.items():
    bn = cls(dtype=dtype, param_dtype=param_dtype,
             force_float32_reductions=force_float32_reductions)
    variables = bn.init(jax.random.key(0), x, use_running_average=False)
    y, updates = bn.apply(variables, x, use_running_average=False, mutable=['batch_stats'])
    y_eval = bn.apply({**variables, **updates}, x, use_running_average=True)
    got[k] = jax.tree.map(lambda a: a.dtype, (variables, updates, y, y_eval))
  assert got['jaxbn'] == got['flax']


def test_narrow_param_dtype_statistics_update_in_the_stored_dtype():
  # force_float32_reductions=False keeps the statistics in param_dtype
  # (bfloat16) until the first update stores float32 ones (the input's
  # precision), as in Flax. That update must not be rounded to bfloat16:
  # Flax rounds only 0.9 * old (0.9 * 1 is 0.8984375 in bfloat16), jaxbn
  # rounds nothing.
  x = _data((64, 3), seed=3, offset=0.3)
  xs = np.asarray(x, np.float64)
  mean, var = 0.1 * xs.mean(0), 0.9 + 0.1 * xs.var(0)
  err = {}
  for k, cls in BN_CLASSES.items():
    bn = cls(use_running_average=False, momentum=0.9, param_dtype=jnp.bfloat16,
             force_float32_reductions=False)
    variables = bn.init(jax.random.key(0), x)
    assert variables['batch_stats']['var'].dtype == jnp.bfloat16
    _, updates = bn.apply(variables, x, mutable=['batch_stats'])
    stats = updates['batch_stats']
    assert stats['mean'].dtype == stats['var'].dtype == jnp.float32
    err[k] = np.abs(np.asarray(stats['var'], np.float64) - var)
    if k == 'jaxbn':
      np.testing.assert_allclose(stats['mean'], mean, rtol=1e-6, atol=1e-7)
      np.testing.assert_allclose(stats['var'], var, rtol=1e-6)
  assert np.all(err['jaxbn'] <= err['flax']) and np.max(err['flax']) > 1e-3


@pytest.mark.parametrize('x_dtype', [jnp.uint8, jnp.int32, jnp.bool_])
@pytest.mark.parametrize('name', ['BatchNorm', 'LayerNorm', 'GroupNorm', 'InstanceNorm'])
def test_integer_input_matches_flax(name, x_dtype):
  # Flax's Linen layers take integer (e.g. uint8 image) batches and return float32.
  x = jnp.asarray(np.random.default_rng(0).integers(0, 2 if x_dtype == jnp.bool_ else 255,
                                                      (6, 4, 4, 8)), x_dtype)
  kwargs = {'num_groups': 4} if name == 'GroupNorm' else {}
  if name == 'BatchNorm':
    kwargs['use_running_average'] = False
  out = {}
  for k, module in {'flax': getattr(nn, name), 'jaxbn': getattr(jaxbn.linen, name)}.items():
    layer = module(**kwargs)
    variables = layer.init(jax.random.key(0), x)
    out[k] = layer.apply(variables, x, mutable=['batch_stats'])[0]
  assert out['jaxbn'].dtype == out['flax'].dtype == jnp.float32
  # Flax's E[x^2] - E[x]^2 on values up to 255 loses ~1e-5 of the variance.
  np.testing.assert_allclose(out['jaxbn'], out['flax'], rtol=1e-4, atol=1e-4)


class CNN(nn.Module):
  """conv-BN-relu-conv-BN-dense, with the BatchNorm class as a field."""

  bn_cls: type

  @nn.compact
  def __call__(self, x, train: bool):
    # No conv bias before BN: its gradient is zero up to rounding, and Adam
    # would turn that rounding noise into full-size steps.
    x = nn.Conv(8, (3, 3), use_bias=False)(x)
    x = nn.relu(self.bn_cls(use_running_average=not train, momentum=0.9)(x))
    x = nn.Conv(16, (3, 3), strides=2, use_bias=False)(x)
    x = nn.relu(self.bn_cls(use_running_average=not train, momentum=0.9)(x))
    return nn.Dense(10)(x.mean(axis=(1, 2)))


@functools.lru_cache(maxsize=None)
def _train(bn_cls, steps=4):
  """(model, variables, losses) after `steps` Adam steps; shared by tests."""
  model = CNN(bn_cls)
  variables = model.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)), train=True)
  tx = optax.adam(1e-2)
  opt_state = tx.init(variables['params'])

  @jax.jit
  def step(variables, opt_state, x, labels):
    def loss_fn(params):
      logits, updates = model.apply({**variables, 'params': params}, x, train=True,
                                    mutable=['batch_stats'])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, updates
    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables['params'])
    param_updates, opt_state = tx.update(grads, opt_state)
    params = optax.apply_updates(variables['params'], param_updates)
    return {'params': params, **updates}, opt_state, loss

  losses = []
  for s in range(steps):
    x = _data((16, 8, 8, 1), seed=s, offset=0.3)
    labels = jnp.asarray(np.random.default_rng(100 + s).integers(0, 10, 16))
    variables, opt_state, loss = step(variables, opt_state, x, labels)
    losses.append(float(loss))
  return model, variables, losses


def test_cnn_training_matches_flax():
  flax_model, flax_vars, flax_losses = _train(nn.BatchNorm)
  model, variables, losses = _train(BatchNorm)
  np.testing.assert_allclose(losses, flax_losses, **TOL)
  chex.assert_trees_all_close(variables, flax_vars, **TOL)
  x = _data((8, 8, 8, 1), seed=99)
  evaluate = jax.jit(lambda m, v, x: m.apply(v, x, train=False), static_argnums=0)
  np.testing.assert_allclose(evaluate(model, variables, x),
                             evaluate(flax_model, flax_vars, x), **TOL)


def test_checkpoint_round_trip_with_flax():
  flax_model, flax_vars, _ = _train(nn.BatchNorm)
  x = _data((8, 8, 8, 1), seed=7)
  evaluate = jax.jit(lambda m, v, x: m.apply(v, x, train=False), static_argnums=0)
  expected = evaluate(flax_model, flax_vars, x)
  ours = CNN(BatchNorm)
  # The variables of either model load into the other unchanged.
  assert (jax.tree.structure(ours.init(jax.random.key(1), x, train=False))
          == jax.tree.structure(flax_vars))
  np.testing.assert_allclose(evaluate(ours, flax_vars, x), expected, **EVAL_TOL)
  _, our_vars, _ = _train(BatchNorm)
  np.testing.assert_allclose(evaluate(flax_model, our_vars, x),
                             evaluate(ours, our_vars, x), **EVAL_TOL)


# --- numerics ---------------------------------------------------------------


def test_large_offset_is_exact_where_flax_fast_variance_is_not():
  x = np.asarray(1e4 + np.random.default_rng(0).standard_normal((256, 4)), np.float32)
  _, ref_var, _ = np_moments(x, (1,))
  out = {}
  for k, cls in BN_CLASSES.items():
    bn = cls(use_running_average=False, momentum=0.0)
    variables = bn.init(jax.random.key(0), x)
    y, updates = bn.apply(variables, x, mutable=['batch_stats'])
    out[k] = (np.asarray(y), np.asarray(updates['batch_stats']['var']))
  np.testing.assert_allclose(out['jaxbn'][1], ref_var, rtol=1e-5)
  np.testing.assert_allclose(out['jaxbn'][0].std(0), 1.0, atol=1e-4)
  # Flax's default E[x^2] - E[x]^2 cancels catastrophically here.
  assert np.abs(out['flax'][1] / ref_var - 1).max() > 0.1


def test_bfloat16_keeps_float32_statistics():
  x = (3.0 + 2.0 * np.random.default_rng(0).standard_normal((64, 6))).astype(jnp.bfloat16)
  bn = BatchNorm(use_running_average=False, dtype=jnp.bfloat16, momentum=0.9)
  variables = bn.init(jax.random.key(0), x)
  y, updates = bn.apply(variables, x, mutable=['batch_stats'])
  stats = updates['batch_stats']
  assert y.dtype == jnp.bfloat16
  assert stats['mean'].dtype == jnp.float32 and stats['var'].dtype == jnp.float32
  _, mean, var, _ = np_batch_norm_train(
      np.asarray(x, np.float64), np.zeros(6), np.ones(6), 0, momentum=0.9)
  np.testing.assert_allclose(stats['mean'], mean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(stats['var'], var, rtol=1e-6)


def test_masks_like_flax_including_integer_masks():
  rng = np.random.default_rng(0)
  x = _data((12, 5))
  mask = rng.random((12, 1)) > 0.3
  out = {}
  for k, cls in BN_CLASSES.items():
    bn = cls(use_running_average=False)
    variables = bn.init(jax.random.key(0), x)
    out[k] = [bn.apply(variables, x, mask=m, mutable=['batch_stats'])
              for m in (mask, mask.astype(np.int32))]
  chex.assert_trees_all_close(out['jaxbn'], out['flax'], **TOL)


# --- transforms and helpers -------------------------------------------------


def test_apply_train_merges_updates():
  x = _data((8, 3))
  bn = BatchNorm(use_running_average=False, momentum=0.5)
  variables = bn.init(jax.random.key(0), x)
  y, new_vars = apply_train(bn, variables, x)
  y_ref, updates = bn.apply(variables, x, mutable=['batch_stats'])
  np.testing.assert_array_equal(y, y_ref)
  chex.assert_trees_all_equal(new_vars, {**variables, **updates})
  assert new_vars['params'] is variables['params']
  # FrozenDict in, FrozenDict out; mutable=True and method kwargs pass through.
  frozen = freeze(variables)
  _, new_frozen = apply_train(bn, frozen, x, mutable=True)
  assert type(new_frozen) is type(frozen)
  np.testing.assert_array_equal(new_frozen['batch_stats']['mean'], new_vars['batch_stats']['mean'])


def test_jit_grad_and_scan():
  x = _data((16, 4))
  bn = BatchNorm(use_running_average=False)
  variables = bn.init(jax.random.key(0), x)

  def loss(params, batch_stats, model):
    y, updates = model.apply({'params': params, 'batch_stats': batch_stats}, x,
                             mutable=['batch_stats'])
    return jnp.mean(y ** 3), updates

  grads = {}
  for k, cls in BN_CLASSES.items():
    g, updates = jax.jit(jax.grad(loss, has_aux=True), static_argnums=2)(
        variables['params'], variables['batch_stats'], cls(use_running_average=False))
    grads[k] = (g, updates)
  chex.assert_trees_all_close(grads['jaxbn'], grads['flax'], **TOL)

  class Stack(nn.Module):
    bn_cls: type

    @nn.compact
    def __call__(self, x):
      def body(mdl, carry, _):
        return nn.relu(self.bn_cls(use_running_average=False)(nn.Dense(4)(carry))), None
      scan = nn.scan(body, variable_axes={'params': 0, 'batch_stats': 0},
                     split_rngs={'params': True}, length=3)
      return scan(self, x, None)[0]

  out = {}
  for k, cls in BN_CLASSES.items():
    v = Stack(cls).init(jax.random.key(0), x)
    out[k] = Stack(cls).apply(v, x, mutable=['batch_stats'])
  chex.assert_trees_all_close(out['jaxbn'], out['flax'], **TOL)


def test_lifted_remat_and_jit():
  x = _data((8, 3))
  out = {}
  for k, cls in BN_CLASSES.items():
    class Model(nn.Module):
      @nn.compact
      def __call__(self, x):
        x = nn.remat(cls)(use_running_average=False)(x)
        return nn.jit(cls)(use_running_average=False)(x)
    variables = Model().init(jax.random.key(0), x)
    out[k] = Model().apply(variables, x, mutable=['batch_stats'])
  chex.assert_trees_all_close(out['jaxbn'], out['flax'], **TOL)


def test_unbiased_running_var_and_cumulative_average():
  xs = [np.asarray(_data((10, 3), seed=s)) for s in range(3)]
  bn = BatchNorm(use_running_average=False, momentum=None, running_var='unbiased')
  variables = bn.init(jax.random.key(0), xs[0])
  mean, var, count = np.zeros(3), np.ones(3), 0
  for x in xs:
    _, variables = apply_train(bn, variables, x)
    _, mean, var, count = np_batch_norm_train(
        x, mean, var, count, momentum=None, running_var='unbiased')
  stats = variables['batch_stats']
  assert int(stats['count']) == 3
  np.testing.assert_allclose(stats['mean'], mean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(stats['var'], var, rtol=1e-6)


@pytest.mark.parametrize('size', [0, 1, 2.5, True])
def test_bad_virtual_batch_size_fails_in_evaluation_too(size):
  # Not only at the first training call, which an evaluation-only init never makes.
  bn = BatchNorm(use_running_average=True, virtual_batch_size=size)
  with pytest.raises(ValueError, match='virtual_batch_size must be an int >= 2'):
    bn.init(jax.random.key(0), jnp.ones((2, 4)))


def test_virtual_batch_size_delegates_to_ghost_batch_norm():
  x = _data((12, 4))
  bn = BatchNorm(use_running_average=False, virtual_batch_size=4, momentum=0.9)
  variables = bn.init(jax.random.key(0), x)
  y, new_vars = apply_train(bn, variables, x)
  y_ref, state = jaxbn.batch_norm(x, jaxbn.init_state(4), training=True, momentum=0.9,
                                  virtual_batch_size=4)
  np.testing.assert_allclose(y, y_ref, **EVAL_TOL)
  np.testing.assert_allclose(new_vars['batch_stats']['mean'], state.mean, **EVAL_TOL)
  np.testing.assert_allclose(new_vars['batch_stats']['var'], state.var, **EVAL_TOL)


# --- errors -----------------------------------------------------------------


def test_training_without_mutable_batch_stats_names_the_fix():
  x = _data((8, 3))
  bn = BatchNorm(use_running_average=False)
  variables = bn.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"mutable=\['batch_stats'\].*use_running_average=True"):
    bn.apply(variables, x)
  with pytest.raises(ValueError, match='apply_train'):
    jax.jit(lambda v, x: bn.apply(v, x))(variables, x)
  # Evaluation needs no mutable collection.
  BatchNorm(use_running_average=True).apply(variables, x)


def test_batch_of_one_in_training_names_the_fix():
  bn = BatchNorm(use_running_average=False)
  variables = bn.init(jax.random.key(0), jnp.ones((1, 3)))
  with pytest.raises(ValueError, match=r'batch of 2 or more.*use_running_average=True'):
    bn.apply(variables, jnp.ones((1, 3)), mutable=['batch_stats'])


def test_missing_mode_is_flax_error():
  with pytest.raises(ValueError, match='use_running_average'):
    BatchNorm().init(jax.random.key(0), _data((4, 3)))
