"""Folding batch norm into Conv/Dense kernels, for arrays and NNX models."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbn
import jaxbn.nnx as jnnx
from jaxbn._fold import FoldedBatchNorm, fold_batch_norm, fold_batch_norm_nnx
from reference import np_normalize

# The folded and unfolded float32 paths round differently: a few ulps per
# product over sums of <= 200 terms of O(1) values, then up to three layers.
# 1e-4 relative to the output's magnitude is >10x above what that predicts.
def assert_close(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


def _bn_state(c, seed=0):
  rng = np.random.default_rng(seed)
  state = jaxbn.BatchNormState(
      mean=jnp.asarray(rng.standard_normal(c) * 2, jnp.float32),
      var=jnp.asarray(rng.uniform(0.1, 4.0, c), jnp.float32),
      count=jnp.array(5, jnp.int32))
  scale = rng.uniform(0.5, 2.0, c).astype(np.float32)
  bias = rng.standard_normal(c).astype(np.float32)
  return state, scale, bias


@pytest.mark.parametrize('with_bias', [True, False])
@pytest.mark.parametrize('with_affine', [True, False])
def test_dense_fold_matches_float64_reference(with_bias, with_affine):
  rng = np.random.default_rng(1)
  x = rng.standard_normal((7, 5))
  w = rng.standard_normal((5, 4)).astype(np.float32)
  b = rng.standard_normal(4).astype(np.float32) if with_bias else None
  state, scale, bn_bias = _bn_state(4)
  if not with_affine:
    scale = bn_bias = None
  z = x @ w.astype(np.float64) + (0 if b is None else b)
  ref = np_normalize(z, np.asarray(state.mean, np.float64),
                     np.asarray(state.var, np.float64), scale, bn_bias, (1,), 1e-3)
  wf, bf = fold_batch_norm(w, b, state, scale, bn_bias, epsilon=1e-3)
  np.testing.assert_allclose(x @ np.asarray(wf, np.float64) + bf, ref,
                             rtol=1e-5, atol=1e-5)
  assert wf.dtype == jnp.float32 and bf.shape == (4,)


@pytest.mark.parametrize('groups,strides,padding', [
    (1, (1, 1), 'SAME'), (2, (2, 1), 'VALID'), (4, (1, 1), ((2, 0), (1, 1)))])
def test_conv_fold_matches_eval_batch_norm(groups, strides, padding):
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 7, 6, 4)).astype(np.float32)
  w = rng.standard_normal((3, 3, 4 // groups, 8)).astype(np.float32)
  b = rng.standard_normal(8).astype(np.float32)
  state, scale, bn_bias = _bn_state(8, seed=3)

  def conv(w, b):
    y = jax.lax.conv_general_dilated(
        x, w, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=groups)
    return y + b

  ref, _ = jaxbn.batch_norm(conv(w, b), state, scale, bn_bias, training=False)
  assert_close(conv(*fold_batch_norm(w, b, state, scale, bn_bias)), ref)


def test_low_precision_kernel_keeps_its_dtype():
  w = jnp.ones((3, 4), jnp.bfloat16)
  state, scale, bn_bias = _bn_state(4)
  wf, bf = fold_batch_norm(w, None, state, scale, bn_bias)
  assert wf.dtype == jnp.bfloat16 and bf.dtype == jnp.bfloat16
  wf, bf = fold_batch_norm(w, jnp.zeros(4, jnp.float32), state)
  assert bf.dtype == jnp.float32


@pytest.mark.parametrize('args,match', [
    (dict(state=jaxbn.init_state(3)), r'state.mean has shape \(3,\).*last axis'),
    (dict(scale=np.ones(5)), r'scale has shape \(5,\).*needs shape \(4,\)'),
    (dict(bias=np.ones(2)), r'bias has shape \(2,\)'),
    (dict(bn_bias=np.ones((4, 4))), r'bn_bias has shape'),
])
def test_mismatched_sizes_name_the_fix(args, match):
  kw = dict(kernel=jnp.ones((3, 3, 2, 4)), bias=None, state=jaxbn.init_state(4))
  kw.update(args)
  with pytest.raises(ValueError, match=match):
    fold_batch_norm(kw.pop('kernel'), kw.pop('bias'), kw.pop('state'), **kw)


def test_not_a_state_is_a_type_error():
  with pytest.raises(TypeError, match='BatchNormState'):
    fold_batch_norm(jnp.ones((2, 4)), None, (jnp.zeros(4), jnp.ones(4)))
  with pytest.raises(TypeError, match='floating'):
    fold_batch_norm(jnp.ones((2, 4), jnp.int32), None, jaxbn.init_state(4))


# ------------------------------------------------------------------ NNX models


def _randomize_batch_norms(model, seed=0):
  """Non-trivial running statistics and affine parameters everywhere."""
  rng = np.random.default_rng(seed)
  for _, m in nnx.iter_graph(model):
    if isinstance(m, (nnx.BatchNorm, jnnx.BatchNorm, DuckBatchNorm)):
      c = m.mean[...].shape
      m.mean[...] = jnp.asarray(rng.standard_normal(c), jnp.float32)
      m.var[...] = jnp.asarray(rng.uniform(0.2, 3.0, c), jnp.float32)
      if m.scale is not None:
        m.scale[...] = jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)
      if m.bias is not None:
        m.bias[...] = jnp.asarray(rng.standard_normal(c), jnp.float32)
  return model


class DuckBatchNorm(nnx.Module):
  """Not a flax BatchNorm: only the attribute names the fold relies on."""

  def __init__(self, c):
    self.scale = nnx.Param(jnp.ones(c))
    self.bias = None
    self.mean = nnx.BatchStat(jnp.zeros(c))
    self.var = nnx.BatchStat(jnp.ones(c))
    self.epsilon = 1e-3
    self.use_running_average = False

  def __call__(self, x, use_running_average=None):
    use_ra = self.use_running_average if use_running_average is None else use_running_average
    state = jaxbn.BatchNormState(self.mean[...], self.var[...], jnp.array(0))
    y, _ = jaxbn.batch_norm(x, state, self.scale[...], training=not use_ra,
                            epsilon=self.epsilon)
    return y


def _cnn(rngs, bn=nnx.BatchNorm):
  return nnx.Sequential(
      nnx.Conv(3, 8, (3, 3), rngs=rngs),
      bn(8, rngs=rngs),
      nnx.relu,
      nnx.Conv(8, 6, (3, 3), strides=2, use_bias=False, rngs=rngs),
      bn(6, use_scale=False, epsilon=1e-3, rngs=rngs),
      nnx.relu,
      lambda x: x.reshape(x.shape[0], -1),
      nnx.Linear(6 * 4 * 4, 10, use_bias=False, rngs=rngs),
      bn(10, use_bias=False, rngs=rngs),
      nnx.Linear(10, 3, rngs=rngs),
  )


@pytest.mark.parametrize('bn', [nnx.BatchNorm, jnnx.BatchNorm])
def test_sequential_cnn_folds_to_eval_outputs(bn):
  model = _randomize_batch_norms(_cnn(nnx.Rngs(0), bn))
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  model.eval()
  ref = model(x)
  folded = fold_batch_norm_nnx(model)
  kinds = [type(m).__name__ for m in folded.layers]
  assert kinds.count('FoldedBatchNorm') == 3 and 'BatchNorm' not in kinds
  assert_close(folded(x), ref)
  assert_close(nnx.jit(lambda m, x: m(x))(folded, x), ref)
  # The input model is untouched and still has its batch norms.
  assert isinstance(model.layers[1], bn)
  assert model.layers[3].bias is None
  np.testing.assert_array_equal(model(x), ref)


def test_folded_model_ignores_the_training_flag():
  model = _randomize_batch_norms(_cnn(nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  folded = fold_batch_norm_nnx(model)  # model itself is in training mode
  model.eval()
  folded.train()
  assert_close(folded(x), model(x))


class Block(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(4, 5, (3, 3), use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(5, rngs=rngs)
    self.head = nnx.Sequential(nnx.Linear(5, 6, rngs=rngs), DuckBatchNorm(6))

  def __call__(self, x, train=False):
    x = nnx.relu(self.bn(self.conv(x), use_running_average=not train))
    return self.head(x.mean(axis=(1, 2)))


class Net(nnx.Module):
  def __init__(self, rngs):
    self.blocks = nnx.List([Block(rngs), Block(rngs)])
    self.proj = nnx.Linear(6, 4, rngs=rngs)

  def __call__(self, x, train=False):
    y = self.blocks[0](x, train) + self.blocks[1](x, train)
    return self.proj(y)


def test_custom_model_with_explicit_pairs():
  model = _randomize_batch_norms(Net(nnx.Rngs(0)), seed=3)
  x = jax.random.normal(jax.random.key(2), (3, 6, 6, 4))
  model.eval()
  ref = model(x)
  pairs = [('blocks/0/conv', 'blocks/0/bn'), (('blocks', 1, 'conv'), ('blocks', 1, 'bn')),
           ('blocks.0.head.layers.0', 'blocks.0.head.layers.1'),
           ('blocks/1/head/layers/0', 'blocks/1/head/layers/1')]
  folded = fold_batch_norm_nnx(model, pairs)
  assert isinstance(folded.blocks[1].bn, FoldedBatchNorm)
  assert_close(folded(x), ref)
  assert_close(folded(x, train=True), ref)


def test_auto_detection_finds_nested_sequentials_and_duck_typed_norms():
  model = _randomize_batch_norms(Net(nnx.Rngs(0)), seed=4)
  x = jax.random.normal(jax.random.key(2), (3, 6, 6, 4))
  model.eval()
  folded = fold_batch_norm_nnx(model)
  # Only the Sequential heads are detected; the conv->bn calls are not.
  assert isinstance(folded.blocks[0].head.layers[1], FoldedBatchNorm)
  assert isinstance(folded.blocks[0].bn, nnx.BatchNorm)
  assert_close(folded(x), model(x))


def test_model_errors_name_the_fix():
  rngs = nnx.Rngs(0)
  with pytest.raises(ValueError, match='pairs='):
    fold_batch_norm_nnx(nnx.Sequential(nnx.Linear(2, 3, rngs=rngs), nnx.relu))
  with pytest.raises(TypeError, match='fold_batch_norm'):
    fold_batch_norm_nnx({'kernel': jnp.ones((2, 2))})
  net = Net(rngs)
  with pytest.raises(ValueError, match='no submodule at blocks/0/cnv'):
    fold_batch_norm_nnx(net, [('blocks/0/cnv', 'blocks/0/bn')])
  with pytest.raises(TypeError, match='not a batch norm'):
    fold_batch_norm_nnx(net, [('blocks/0/conv', 'proj')])
  with pytest.raises(TypeError, match='first path of a pair names the layer'):
    fold_batch_norm_nnx(net, [('blocks/0/bn', 'blocks/0/conv')])
  with pytest.raises(ValueError, match='two fold pairs'):
    fold_batch_norm_nnx(net, [('blocks/0/conv', 'blocks/0/bn'), ('proj', 'blocks/0/bn')])
  with pytest.raises(ValueError, match='output'):
    fold_batch_norm_nnx(net, [('proj', 'blocks/0/bn')])
  bad_axis = nnx.Sequential(nnx.Linear(2, 3, rngs=rngs), nnx.BatchNorm(3, axis=0, rngs=rngs))
  with pytest.raises(ValueError, match='axis=-1'):
    fold_batch_norm_nnx(bad_axis)
  transposed = nnx.Sequential(
      nnx.ConvTranspose(2, 3, (3, 3), transpose_kernel=True, rngs=rngs),
      nnx.BatchNorm(3, rngs=rngs))
  with pytest.raises(ValueError, match='pairs='):
    fold_batch_norm_nnx(transposed)
  with pytest.raises(ValueError, match='transpose_kernel'):
    fold_batch_norm_nnx(transposed, [('layers/0', 'layers/1')])


def test_a_one_axis_tuple_is_the_last_axis():
  rngs = nnx.Rngs(0)
  model = _randomize_batch_norms(nnx.Sequential(
      nnx.Linear(2, 3, rngs=rngs), nnx.BatchNorm(3, axis=(-1,), rngs=rngs)))
  x = jax.random.normal(jax.random.key(3), (4, 2))
  model.eval()
  assert_close(fold_batch_norm_nnx(model)(x), model(x))


@pytest.mark.parametrize('bn', [nnx.BatchNorm, jnnx.BatchNorm])
def test_positive_feature_axis_folds(bn):
  # axis=3 on NHWC (axis=1 on (batch, features)) is the last axis: the
  # layer's kernel fixes the rank of its output.
  rngs = nnx.Rngs(0)
  model = _randomize_batch_norms(nnx.Sequential(
      nnx.Conv(3, 5, (3, 3), rngs=rngs), bn(5, axis=3, rngs=rngs), nnx.relu,
      lambda x: x.mean(axis=(1, 2)),
      nnx.Linear(5, 4, use_bias=False, rngs=rngs), bn(4, axis=1, rngs=rngs)))
  x = jax.random.normal(jax.random.key(4), (2, 6, 6, 3))
  model.eval()
  folded = fold_batch_norm_nnx(model)
  assert [type(m) for m in folded.layers].count(FoldedBatchNorm) == 2
  assert_close(folded(x), model(x))
  # An axis that is not the output features names the ones that would be.
  other = nnx.Sequential(nnx.Conv(3, 5, (3, 3), rngs=rngs), bn(5, axis=2, rngs=rngs))
  with pytest.raises(ValueError, match=r'axis=2, .* Conv .* axis=-1, or axis=3 for an output '
                                       'with one batch axis'):
    fold_batch_norm_nnx(other)


def test_conv_transpose_folds():
  rngs = nnx.Rngs(0)
  model = _randomize_batch_norms(nnx.Sequential(
      nnx.ConvTranspose(2, 3, (3, 3), strides=2, rngs=rngs), nnx.BatchNorm(3, rngs=rngs)))
  x = jax.random.normal(jax.random.key(3), (2, 5, 5, 2))
  model.eval()
  assert_close(fold_batch_norm_nnx(model)(x), model(x))

