"""Conversion from and to real PyTorch batch norms, and Keras weight lists."""


import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxbn
from jaxbn._convert import from_keras, from_torch, to_keras, to_torch
from reference import np_normalize

torch.manual_seed(0)

# Both sides compute in float32 with different reduction orders; normalized
# outputs are O(1) and statistics O(1)-O(10), so a few ulps of error over
# reductions of <= 1e3 terms and a few momentum steps stay under 2e-5.
F32_TOL = dict(rtol=2e-5, atol=2e-5)

TORCH_BN = {
    '1d': (torch.nn.BatchNorm1d, (16, 5)),
    '1d-seq': (torch.nn.BatchNorm1d, (8, 5, 7)),
    '2d': (torch.nn.BatchNorm2d, (4, 5, 6, 6)),
    '3d': (torch.nn.BatchNorm3d, (2, 5, 3, 4, 4)),
}


def _batches(shape, n, seed=0):
  g = torch.Generator().manual_seed(seed)
  return [torch.randn(shape, generator=g) * 3.0 + 1.5 for _ in range(n)]


def _torch_bn(kind, **kwargs):
  cls, shape = TORCH_BN[kind]
  bn = cls(5, **kwargs)
  if bn.affine:
    with torch.no_grad():
      bn.weight.uniform_(0.5, 1.5)
      bn.bias.normal_()
  return bn, shape


@pytest.mark.parametrize('kind', list(TORCH_BN))
def test_torch_trained_layer_gives_same_eval_outputs(kind):
  bn, shape = _torch_bn(kind)
  bn.train()
  for x in _batches(shape, 3):
    bn(x)
  state, scale, bias = from_torch(bn)
  assert int(state.count) == 3 and state.mean.dtype == jnp.float32
  x = _batches(shape, 1, seed=1)[0]
  y, _ = jaxbn.batch_norm(x.numpy(), state, scale, bias, training=False,
                          axis=1, epsilon=bn.eps)
  np.testing.assert_allclose(y, bn.eval()(x).detach().numpy(), **F32_TOL)


@pytest.mark.parametrize('kind', list(TORCH_BN))
def test_jaxbn_trained_state_loads_into_torch(kind):
  bn, shape = _torch_bn(kind)
  rng = np.random.default_rng(2)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, 5), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(5), jnp.float32)
  state = jaxbn.init_state(5)
  for x in _batches(shape, 3):
    _, state = jaxbn.batch_norm(x.numpy(), state, scale, bias, training=True,
                                axis=1, momentum=0.9, running_var='unbiased')
  sd = to_torch(state, scale, bias)
  bn.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
  assert int(bn.num_batches_tracked) == 3
  x = _batches(shape, 1, seed=3)[0]
  y, _ = jaxbn.batch_norm(x.numpy(), state, scale, bias, training=False, axis=1)
  np.testing.assert_allclose(bn.eval()(x).detach().numpy(), y, **F32_TOL)


@pytest.mark.parametrize('kind', ['1d', '2d', '3d'])
@pytest.mark.parametrize('torch_momentum', [0.1, 0.3, None])
def test_training_in_both_keeps_the_same_running_stats(kind, torch_momentum):
  bn, shape = _torch_bn(kind, momentum=torch_momentum)
  bn.train()
  state, scale, bias = from_torch(bn)
  momentum = None if torch_momentum is None else 1.0 - torch_momentum
  for x in _batches(shape, 5, seed=4):
    y_torch = bn(x).detach().numpy()
    y, state = jaxbn.batch_norm(x.numpy(), state, scale, bias, training=True,
                                axis=1, momentum=momentum, running_var='unbiased')
    np.testing.assert_allclose(y, y_torch, **F32_TOL)
  np.testing.assert_allclose(state.mean, bn.running_mean.numpy(), **F32_TOL)
  np.testing.assert_allclose(state.var, bn.running_var.numpy(), **F32_TOL)
  assert int(state.count) == int(bn.num_batches_tracked) == 5


def test_prefix_in_a_model_state_dict():
  model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.BatchNorm2d(5),
                              torch.nn.Sequential(torch.nn.BatchNorm2d(5)))
  model.train()
  model(torch.randn(4, 3, 8, 8))
  for prefix in ('1', '1.'):
    state, _, _ = from_torch(model, prefix=prefix)
    np.testing.assert_array_equal(state.mean, model[1].running_mean.numpy())
  state, _, _ = from_torch(model.state_dict(), prefix='2.0')
  np.testing.assert_array_equal(state.var, model[2][0].running_var.numpy())
  with pytest.raises(ValueError, match=r"prefixes \['1.', '2.0.'\]: pass one as prefix"):
    from_torch(model)
  sd = to_torch(state, prefix='2.0')
  assert set(sd) == {'2.0.running_mean', '2.0.running_var', '2.0.num_batches_tracked'}


def test_affine_false_and_missing_statistics():
  bn = torch.nn.BatchNorm1d(4, affine=False)
  state, scale, bias = from_torch(bn)
  assert scale is None and bias is None
  sd = to_torch(state)
  assert set(sd) == {'running_mean', 'running_var', 'num_batches_tracked'}
  torch.nn.BatchNorm1d(4, affine=False).load_state_dict(
      {k: torch.from_numpy(v) for k, v in sd.items()})
  with pytest.raises(ValueError, match='track_running_stats=False'):
    from_torch(torch.nn.BatchNorm1d(4, track_running_stats=False))
  with pytest.raises(TypeError, match='state_dict'):
    from_torch([1, 2, 3])


def test_half_precision_torch_layer_gives_float32_statistics():
  bn = torch.nn.BatchNorm2d(3).half()
  state, scale, _ = from_torch(bn)
  assert state.mean.dtype == jnp.float32 and scale.dtype == jnp.float16


def test_bfloat16_torch_layer_reads_exactly():
  # NumPy has no bfloat16 of its own, so tensor.numpy() refuses one; every
  # bfloat16 value is a float32, so the conversion must be exact.
  bn, shape = _torch_bn('2d')
  for x in _batches(shape, 2):
    bn(x)
  bn = bn.to(torch.bfloat16)
  state, scale, bias = from_torch(bn)
  assert state.mean.dtype == jnp.float32 and scale.dtype == jnp.bfloat16
  np.testing.assert_array_equal(state.mean, bn.running_mean.float().numpy())
  np.testing.assert_array_equal(state.var, bn.running_var.float().numpy())
  np.testing.assert_array_equal(np.asarray(scale, np.float32), bn.weight.detach().float().numpy())
  np.testing.assert_array_equal(np.asarray(bias, np.float32), bn.bias.detach().float().numpy())


@pytest.mark.parametrize('torch_dtype', [torch.float32, torch.bfloat16])
def test_bfloat16_parameters_load_into_torch(torch_dtype):
  # A bfloat16 model's scale/bias, loaded as the docstring shows; widening
  # bfloat16 to float32 is exact, so torch sees the same values.
  rng = np.random.default_rng(3)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, 5), jnp.bfloat16)
  bias = jnp.asarray(rng.standard_normal(5), jnp.bfloat16)
  state = jaxbn.init_state(5)._replace(mean=jnp.asarray(rng.standard_normal(5), jnp.float32))
  sd = to_torch(state, scale, bias)
  bn = torch.nn.BatchNorm1d(5).to(torch_dtype)
  bn.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
  np.testing.assert_array_equal(bn.weight.detach().float().numpy(), np.asarray(scale, np.float32))
  np.testing.assert_array_equal(bn.bias.detach().float().numpy(), np.asarray(bias, np.float32))
  if torch_dtype == torch.float32:
    np.testing.assert_array_equal(bn.running_mean.numpy(), state.mean)


def test_to_torch_errors():
  with pytest.raises(ValueError, match='one feature axis'):
    to_torch(jaxbn.init_state((2, 3)))
  with pytest.raises(ValueError, match=r'scale has shape \(4,\)'):
    to_torch(jaxbn.init_state(3), jnp.ones(4))


# --------------------------------------------------------------------- Keras


def test_keras_round_trip_and_eval_formula():
  rng = np.random.default_rng(5)
  gamma, beta, mean = (rng.standard_normal(4).astype(np.float32) for _ in range(3))
  var = rng.uniform(0.5, 2.0, 4).astype(np.float32)
  state, scale, bias = from_keras([gamma, beta, mean, var])
  x = rng.standard_normal((6, 3, 4)).astype(np.float32)
  # Keras' inference formula with its default epsilon.
  ref = np_normalize(x, mean.astype(np.float64), var.astype(np.float64),
                     gamma, beta, (2,), 1e-3)
  y, _ = jaxbn.batch_norm(x, state, scale, bias, training=False, epsilon=1e-3)
  np.testing.assert_allclose(y, ref, **F32_TOL)
  for got, want in zip(to_keras(state, scale, bias), [gamma, beta, mean, var]):
    np.testing.assert_array_equal(got, want)


def test_keras_without_scale_or_center_and_dicts():
  m, v, b = np.zeros(3), np.ones(3), np.full(3, 2.0)
  state, scale, bias = from_keras([b, m, v], scale=False)
  assert scale is None and float(bias[0]) == 2.0
  assert len(to_keras(state, bias=bias)) == 3
  state, scale, bias = from_keras([m, v], scale=False, center=False)
  assert scale is None and bias is None
  state, scale, bias = from_keras({'bn/gamma:0': b, 'bn/moving_mean:0': m,
                                   'bn/moving_variance:0': v})
  assert bias is None and float(scale[0]) == 2.0
  with pytest.raises(ValueError, match='center='):
    from_keras([b, m, v])
  with pytest.raises(ValueError, match='moving_variance'):
    from_keras({'gamma': b, 'moving_mean': m})

