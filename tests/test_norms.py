"""layer_norm, group_norm and instance_norm against Flax and float64 NumPy."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxbn._norms import group_norm, instance_norm, layer_norm
from reference import bfloat16_ulps, cancelling_dx_case

# float32 on O(1) normalized values, reductions of <= 400 terms: a few ulps
# of 1.0 per op, far below 2e-5. Flax uses a different variance formula,
# which on well-conditioned data (|mean|/std ~ 0.3) differs by ulps too.
F32_TOL = dict(rtol=2e-5, atol=2e-5)


def _data(shape, seed=0, offset=0.3, std=1.5):
  rng = np.random.default_rng(seed)
  return (offset + std * rng.standard_normal(shape)).astype(np.float32)


def _params(shape, seed=1):
  rng = np.random.default_rng(seed)
  return (rng.uniform(0.5, 1.5, shape).astype(np.float32),
          rng.standard_normal(shape).astype(np.float32))


def np_norm(x, reduction_axes, scale=None, bias=None, feature_axes=(-1,),
            epsilon=1e-6, mask=None):
  """Float64 reference: normalize over reduction_axes, affine on feature_axes."""
  x = np.asarray(x, np.float64)
  m = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
  n = m.sum(axis=reduction_axes, keepdims=True)
  mean = np.where(m, x, 0).sum(axis=reduction_axes, keepdims=True) / n
  var = (np.where(m, x - mean, 0) ** 2).sum(axis=reduction_axes, keepdims=True) / n
  y = (x - mean) / np.sqrt(var + epsilon)
  shape = [d if i in [a % x.ndim for a in feature_axes] else 1
           for i, d in enumerate(x.shape)]
  if scale is not None:
    y = y * np.reshape(scale, shape)
  if bias is not None:
    y = y + np.reshape(bias, shape)
  return y


def np_group_norm(x, groups, scale=None, bias=None, epsilon=1e-6, mask=None):
  xg = np.asarray(x, np.float64).reshape(x.shape[:-1] + (groups, -1))
  mg = None if mask is None else np.broadcast_to(mask, x.shape).reshape(xg.shape)
  red = tuple(a for a in range(1, xg.ndim) if a != xg.ndim - 2)
  y = np_norm(xg, red, epsilon=epsilon, mask=mg).reshape(x.shape)
  return np_norm_affine(y, scale, bias)


def np_norm_affine(y, scale, bias):
  return y * (1 if scale is None else scale) + (0 if bias is None else bias)


def _flax(module, x, scale, bias, mask=None):
  params = {'params': {'scale': jnp.asarray(scale), 'bias': jnp.asarray(bias)}}
  return module.apply(params, x, mask=mask)


# ------------------------------------------------------------------ layer norm


@pytest.mark.parametrize('shape,red,feat', [
    ((6, 10), -1, -1),
    ((3, 4, 5, 6), (1, 2, 3), -1),
    ((3, 4, 5, 6), (1, 2, 3), (1, 2, 3)),
    ((3, 4, 5), -1, (1, 2)),
])
def test_layer_norm_matches_flax_and_numpy(shape, red, feat):
  x = _data(shape)
  feat_t = (feat,) if isinstance(feat, int) else feat
  scale, bias = _params(tuple(shape[a] for a in feat_t))
  y = layer_norm(x, scale, bias, reduction_axes=red, feature_axes=feat)
  red_t = (red,) if isinstance(red, int) else red
  np.testing.assert_allclose(
      y, np_norm(x, red_t, scale, bias, feat_t), **F32_TOL)
  flax_y = _flax(nn.LayerNorm(reduction_axes=red, feature_axes=feat), x, scale, bias)
  np.testing.assert_allclose(y, flax_y, **F32_TOL)
  assert y.dtype == jnp.float32 and y.shape == x.shape


def test_layer_norm_mask_matches_flax_and_numpy():
  x = _data((5, 12), seed=2)
  mask = np.random.default_rng(3).random((5, 12)) > 0.3
  scale, bias = _params(12)
  y = layer_norm(np.where(mask, x, np.nan), scale, bias, mask=mask)
  ref = np_norm(x, (1,), scale, bias, mask=mask)
  np.testing.assert_allclose(np.where(mask, y, 0), np.where(mask, ref, 0), **F32_TOL)
  flax_y = _flax(nn.LayerNorm(), x, scale, bias, mask=mask)
  np.testing.assert_allclose(np.where(mask, y, 0), np.where(mask, flax_y, 0), **F32_TOL)


def test_masked_nan_entries_get_no_nan_gradient():
  x = _data((4, 6), seed=4)
  mask = np.ones((4, 6), bool)
  mask[:, 0] = False
  x_nan = np.where(mask, x, np.nan).astype(np.float32)
  scale, bias = _params(6)
  for fn in (lambda x, s: layer_norm(x, s, mask=mask),
             lambda x, s: group_norm(x, s, num_groups=2, mask=mask)):
    grads = jax.grad(lambda x, s: jnp.sum(jnp.where(mask, fn(x, s), 0) ** 2),
                     argnums=(0, 1))(x_nan, scale)
    assert all(np.isfinite(g).all() for g in grads)


# ------------------------------------------------------------------ group norm


@pytest.mark.parametrize('shape,kwargs,groups', [
    ((2, 5, 5, 8), dict(num_groups=4), 4),
    ((2, 5, 5, 8), dict(num_groups=None, group_size=2), 4),
    ((3, 7, 6), dict(num_groups=1), 1),          # = layer norm over (1, 2)
    ((2, 3, 4, 6), dict(num_groups=6), 6),       # = instance norm
    ((4, 32), dict(), 32),
])
def test_group_norm_matches_flax_and_numpy(shape, kwargs, groups):
  x = _data(shape, seed=5)
  scale, bias = _params(shape[-1])
  y = group_norm(x, scale, bias, **kwargs)
  np.testing.assert_allclose(y, np_group_norm(x, groups, scale, bias), **F32_TOL)
  flax_y = _flax(nn.GroupNorm(**kwargs), x, scale, bias)
  np.testing.assert_allclose(y, flax_y, **F32_TOL)


def test_group_norm_mask_matches_numpy():
  x = _data((3, 4, 4, 6), seed=6)
  mask = np.random.default_rng(7).random((3, 4, 4, 1)) > 0.4
  scale, bias = _params(6)
  y = group_norm(x, scale, bias, num_groups=3, mask=mask)
  ref = np_group_norm(x, 3, scale, bias, mask=mask)
  m = np.broadcast_to(mask, x.shape)
  np.testing.assert_allclose(np.where(m, y, 0), np.where(m, ref, 0), **F32_TOL)
  flax_y = _flax(nn.GroupNorm(num_groups=3), x, scale, bias,
                 mask=np.broadcast_to(mask, x.shape))
  np.testing.assert_allclose(np.where(m, y, 0), np.where(m, flax_y, 0), **F32_TOL)


def test_group_norm_special_cases_equal_layer_and_instance_norm():
  x = _data((2, 3, 4, 6), seed=8)
  np.testing.assert_allclose(group_norm(x, num_groups=1),
                             layer_norm(x, reduction_axes=(1, 2, 3)), **F32_TOL)
  np.testing.assert_allclose(group_norm(x, num_groups=6), instance_norm(x), **F32_TOL)


@pytest.mark.parametrize('kwargs,match', [
    (dict(num_groups=4), r'num_groups=4 does not divide the 6 channels.*\[1, 2, 3, 6\]'),
    (dict(num_groups=None, group_size=4), 'group_size=4 does not divide'),
    (dict(group_size=2), 'pass num_groups=None'),
    (dict(num_groups=None), 'needs num_groups or group_size'),
    (dict(num_groups=0), 'positive int'),
])
def test_group_norm_errors_name_the_fix(kwargs, match):
  with pytest.raises(ValueError, match=match):
    group_norm(jnp.ones((2, 3, 6)), **kwargs)


def test_group_norm_other_errors():
  with pytest.raises(ValueError, match='add the batch axis'):
    group_norm(jnp.ones(6), num_groups=2)
  with pytest.raises(ValueError, match='scale has shape'):
    group_norm(jnp.ones((2, 6)), jnp.ones(3), num_groups=2)


# --------------------------------------------------------------- instance norm


@pytest.mark.parametrize('shape,feat', [
    ((2, 5, 5, 3), -1), ((2, 3, 5, 5), 1), ((2, 6, 3, 4), (2, 3))])
def test_instance_norm_matches_flax_and_numpy(shape, feat):
  x = _data(shape, seed=9)
  feat_t = tuple(a % len(shape) for a in ((feat,) if isinstance(feat, int) else feat))
  scale, bias = _params(tuple(shape[a] for a in feat_t))
  y = instance_norm(x, scale, bias, feature_axes=feat)
  red = tuple(a for a in range(1, len(shape)) if a not in feat_t)
  np.testing.assert_allclose(y, np_norm(x, red, scale, bias, feat_t), **F32_TOL)
  flax_y = _flax(nn.InstanceNorm(feature_axes=feat), x, scale, bias)
  np.testing.assert_allclose(y, flax_y, **F32_TOL)


def test_instance_norm_errors():
  with pytest.raises(ValueError, match='put the batch first'):
    instance_norm(jnp.ones((4, 3)), feature_axes=0)
  with pytest.raises(ValueError, match='out of range'):
    instance_norm(jnp.ones((4, 3)), feature_axes=2)
  with pytest.raises(TypeError, match='floating'):
    layer_norm(jnp.ones((4, 3), jnp.int32))


# ----------------------------------------------------------- shared properties


@pytest.mark.parametrize('fn,red,flax_module', [
    (lambda x, *a: layer_norm(x, *a, reduction_axes=(1, 2, 3)), (1, 2, 3),
     nn.LayerNorm(reduction_axes=(1, 2, 3))),
    (lambda x, *a: group_norm(x, *a, num_groups=2), None, nn.GroupNorm(2)),
    (instance_norm, (1, 2), nn.InstanceNorm()),
], ids=['layer_norm', 'group_norm', 'instance_norm'])
def test_default_epsilon_is_flax_one_millionth(fn, red, flax_module):
  # A variance of ~1e-5, comparable to epsilon: 1e-5 instead of 1e-6 would
  # change the outputs by a quarter. Centred data (no offset) keeps Flax's
  # fast variance and every float32 step at full relative precision.
  x = _data((2, 4, 4, 6), seed=14, offset=0.0, std=3e-3)
  scale, bias = _params(6)
  y = fn(x, scale, bias)
  ref = np_group_norm(x, 2, scale, bias) if red is None else np_norm(x, red, scale, bias)
  np.testing.assert_allclose(y, ref, **F32_TOL)
  np.testing.assert_allclose(y, _flax(flax_module, x, scale, bias), **F32_TOL)


@pytest.mark.parametrize('fn,flax_module', [
    (lambda x: layer_norm(x), nn.LayerNorm(use_scale=False, use_bias=False)),
    (lambda x: group_norm(x, num_groups=2), nn.GroupNorm(2, use_scale=False, use_bias=False)),
    (lambda x: instance_norm(x), nn.InstanceNorm(use_scale=False, use_bias=False)),
])
def test_large_offset_stays_accurate_where_flax_fast_variance_fails(fn, flax_module):
  # x = 1e4 + N(0, 1) in float32: the mean itself rounds to ulp(1e4) ~ 1e-3,
  # so the error measured in input units (|y - ref| * std) stays within 2 ulps.
  rng = np.random.default_rng(10)
  x = (1e4 + rng.standard_normal((4, 8, 8, 4))).astype(np.float32)
  x64 = x.astype(np.float64)
  xg = x64.reshape(4, 8, 8, 2, 2)
  ref, std = {
      nn.LayerNorm: (np_norm(x, (3,)), x64.std(3, keepdims=True)),
      nn.GroupNorm: (np_group_norm(x, 2), np.repeat(xg.std((1, 2, 4)), 2, -1)[:, None, None]),
      nn.InstanceNorm: (np_norm(x, (1, 2)), x64.std((1, 2), keepdims=True)),
  }[type(flax_module)]
  err = np.abs(np.asarray(fn(x), np.float64) - ref)
  assert (err * std).max() < 2 * np.spacing(np.float32(1e4))
  err = err.max()
  flax_err = np.nan_to_num(
      np.abs(np.asarray(flax_module.apply({}, x), np.float64) - ref), nan=np.inf).max()
  assert flax_err > 100 * err


def test_low_precision_input_keeps_its_dtype_and_rounds_once():
  x = jnp.asarray(_data((8, 16)), jnp.bfloat16)
  scale, bias = _params(16)
  xs = np.asarray(x.astype(jnp.float32), np.float64)  # the values the layers see
  grouped = np_norm(xs.reshape(8, 4, 4), (2,)).reshape(8, 16)
  cases = {
      'layer': (layer_norm(x, scale, bias), np_norm(xs, (1,), scale, bias)),
      'group': (group_norm(x, scale, bias, num_groups=4), np_norm_affine(grouped, scale, bias)),
      'instance': (instance_norm(x.reshape(2, 4, 16), scale, bias).reshape(8, 16),
                   np_norm(xs.reshape(2, 4, 16), (1,), scale, bias).reshape(8, 16)),
  }
  for name, (y, ref) in cases.items():
    assert y.dtype == jnp.bfloat16, name
    # Statistics and affine in float32, one rounding to bfloat16: 0.5 ulp,
    # plus float32's own error (~1e-3 ulp here).
    assert bfloat16_ulps(y, ref).max() <= 0.505, name
  assert layer_norm(x, dtype=jnp.float32).dtype == jnp.float32


def test_gradients_are_exact_in_float64():
  x = np.random.default_rng(11).standard_normal((3, 4, 6)) + 2.0
  scale, bias = (np.asarray(p, np.float64) for p in _params(6))
  with jax.enable_x64(True):
    for fn in (lambda x, s, b: layer_norm(x, s, b),
               lambda x, s, b: group_norm(x, s, b, num_groups=3),
               lambda x, s, b: instance_norm(x, s, b)):
      check_grads(jax.jit(fn), (x, scale, bias), order=1, modes=['rev'])



# --------------------------------------------------------------------------
# axis_name: the reduced axes split over the devices of a mapped axis


def _shards(x, axis, devices):
  """``x`` split into ``devices`` equal parts along ``axis``, stacked first."""
  return np.stack(np.split(x, devices, axis=axis))


def _unshard(ys, axis):
  return np.concatenate(list(np.asarray(ys)), axis=axis)


def test_layer_norm_with_features_split_over_devices():
  x = _data((5, 12), seed=20, offset=4.0)
  scale, bias = _params((12,))
  # Uneven masks: device 0 keeps fewer features of each example than the
  # others, so a mean of per-device means would be wrong.
  mask = np.ones((5, 12), bool)
  mask[:, :2] = False
  mask[3, 5] = False
  f = jax.vmap(lambda x, s, b, m: layer_norm(x, s, b, mask=m, axis_name='model'),
               axis_name='model')
  ys = f(_shards(x, 1, 3), _shards(scale, 0, 3), _shards(bias, 0, 3),
         _shards(mask, 1, 3))
  expected = np_norm(x, (1,), scale, bias, mask=mask)
  y = _unshard(ys, 1)
  np.testing.assert_allclose(y[mask], expected[mask], **F32_TOL)


@pytest.mark.parametrize('fn', ['group', 'instance'])
def test_spatially_split_images_normalize_as_one(fn):
  x = _data((2, 8, 5, 6), seed=21, offset=-2.0)
  if fn == 'group':
    norm = lambda x, **k: group_norm(x, num_groups=3, **k)
    reference = lambda x: np_group_norm(x, 3)
  else:
    norm = instance_norm
    reference = lambda x: np_norm(x, (1, 2))
  # The rows of every image split over 4 devices.
  rows = _shards(x, 1, 4)
  whole = jax.vmap(lambda x: norm(x, axis_name='rows'), axis_name='rows')
  np.testing.assert_allclose(_unshard(whole(rows), 1), reference(x), **F32_TOL)
  if jax.device_count() < 4:
    pytest.skip('axis_index_groups need pmap over 4 devices (XLA_FLAGS in conftest.py)')
  # Groups of 2 devices (pmap: vmap has no groups): each normalizes its own
  # half of the image.
  halves = jax.pmap(
      lambda x: norm(x, axis_name='rows', axis_index_groups=[[0, 1], [2, 3]]),
      axis_name='rows', devices=jax.devices()[:4])
  top, bottom = np.split(x, 2, axis=1)
  np.testing.assert_allclose(_unshard(halves(rows), 1),
                             np.concatenate([reference(top), reference(bottom)], 1),
                             **F32_TOL)


def test_axis_index_groups_need_axis_name():
  x = _data((2, 4, 6))
  for call in (lambda: layer_norm(x, axis_index_groups=[[0]]),
               lambda: instance_norm(x, axis_index_groups=[[0]]),
               lambda: group_norm(x, num_groups=2, axis_index_groups=[[0]])):
    with pytest.raises(ValueError, match='needs axis_name'):
      call()


@pytest.mark.parametrize('norm', [
    lambda x: layer_norm(x, reduction_axes=(1, 2, 3)),
    lambda x: group_norm(x, num_groups=1),
], ids=['layer_norm', 'group_norm'])
def test_bfloat16_dx_is_rounded_once(norm):
  # Per-example statistics; the cotangent's dx terms nearly cancel. Parts
  # from the statistics and from the normalization rounded to bfloat16 apart
  # would leave errors the size of the terms; summed in float32 and rounded
  # once, the error is the dtype's.
  x, g, error = cancelling_dx_case(jnp.bfloat16, (16, 4, 4, 32), (1, 2, 3), 1e-6)
  dx = jax.jit(jax.grad(lambda x: jnp.sum(norm(x).astype(jnp.float32) * g)))(jnp.asarray(x))
  assert error(dx) < 2.0 ** -7  # one bfloat16 rounding of dx, plus the float32 sums
