"""Bad input gets a clear error at trace time that says how to fix it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn

X = np.ones((4, 3), np.float32)
STATE = jaxbn.init_state(3)


def bn(x=X, state=STATE, **kw):
  kw.setdefault('training', True)
  return jaxbn.batch_norm(x, state, **kw)


@pytest.mark.parametrize('call,error,message', [
    (lambda: bn(np.ones((4, 3), np.int32)), TypeError, r'astype\(jnp.float32\)'),
    (lambda: bn(axis=2), ValueError, r'out of range .* \[-2, 1\]'),
    (lambda: bn(axis=(0, 0)), ValueError, 'same axis twice'),
    (lambda: bn(axis='features'), TypeError, 'int or a tuple'),
    (lambda: bn(state=jaxbn.init_state(4)), ValueError, r'init_state\(3\)'),
    (lambda: bn(state=(0, 1)), TypeError, 'BatchNormState'),
    (lambda: bn(scale=jnp.ones(4)), ValueError, 'one value per feature'),
    (lambda: bn(bias=jnp.ones(2)), ValueError, 'bias has shape'),
    (lambda: bn(np.ones((1, 3), np.float32)), ValueError, 'more than 1 value per feature'),
    (lambda: bn(momentum=1.5), ValueError, 'momentum=0.9 here'),
    (lambda: bn(momentum=-0.1), ValueError, r'\[0, 1\]'),
    (lambda: bn(epsilon=-1e-5), ValueError, 'epsilon must be'),
    (lambda: bn(mask=np.ones((5, 3), bool)), ValueError, 'does not broadcast'),
    (lambda: bn(mask=np.ones((4, 3), np.float32)), TypeError, 'boolean'),
    (lambda: bn(running_var='sample'), ValueError, 'unbiased'),
    (lambda: bn(training=1), TypeError, 'Python bool'),
    (lambda: bn(axis_index_groups=[[0, 1]]), ValueError, 'needs axis_name'),
    (lambda: jaxbn.init_state(0), ValueError, 'num_features must be >= 1'),
    (lambda: jaxbn.init_state('3'), TypeError, 'num_features must be an int'),
    (lambda: jaxbn.init_state(3, jnp.int32), TypeError, 'floating dtype'),
    # Integer running statistics would be truncated at every update (a
    # variance below 1 becomes 0), silently.
    (lambda: bn(state=jaxbn.BatchNormState(jnp.array([0, 0, 0]), jnp.ones(3), 0)), TypeError,
     r'state.mean has dtype int32.*jnp.float32'),
    (lambda: bn(state=jaxbn.BatchNormState(jnp.zeros(3), np.ones(3, np.int64), 0)), TypeError,
     r'state.var has dtype int'),
    (lambda: jaxbn.batch_renorm(X, jaxbn.BatchNormState(jnp.zeros(3), jnp.array([1, 1, 1]), 0),
                                training=True), TypeError, 'floating'),
    (lambda: jaxbn.batch_norm(X, STATE), TypeError, 'training'),
    (lambda: jaxbn.normalize(X, jnp.zeros(2), jnp.ones(3)), ValueError, 'mean has shape'),
    (lambda: jaxbn.normalize(X, None, jnp.ones(3)), TypeError, r'needs the mean .* state\.mean'),
    (lambda: jaxbn.normalize(X, jnp.zeros(3), None), TypeError, r'needs the var .*jaxbn\.moments'),
    (lambda: jaxbn.normalize(X, jnp.zeros(3), jnp.ones(3), jnp.ones(4)), ValueError,
     'scale has shape'),
    (lambda: jaxbn.to_torch((np.zeros(3), np.ones(3))), TypeError, 'BatchNormState'),
    (lambda: jaxbn.update_state({'mean': 0}, jaxbn.moments(X)), TypeError, 'BatchNormState'),
    (lambda: jaxbn.update_state(STATE, jaxbn.moments(np.ones((4, 2), np.float32))), ValueError,
     r'mean of shape \(2,\) but state.mean has shape \(3,\)'),
])
def test_bad_input(call, error, message):
  with pytest.raises(error, match=message):
    call()


def test_transposed_params_of_several_feature_axes_are_refused():
  # (4, 3) has the size of features (3, 4); reshaped, its values would land
  # on the wrong features.
  import jaxbn.nnx
  from flax import nnx
  x = np.ones((5, 3, 4), np.float32)
  wrong = jnp.ones((4, 3))
  msg = r'has shape \(4, 3\) .* feature shape \(3, 4\); .* of shape \(3, 4\) or \(12,\)'
  state = jaxbn.init_state((3, 4))
  for call in (
      lambda: jaxbn.batch_norm(x, state, wrong, training=True, axis=(-2, -1)),
      lambda: jaxbn.batch_norm(x, state, None, wrong, training=False, axis=(-2, -1)),
      lambda: jaxbn.batch_renorm(x, state, wrong, training=True, axis=(-2, -1)),
      lambda: jaxbn.normalize(x, state.mean, state.var, wrong, axis=(-2, -1)),
      lambda: jaxbn.layer_norm(x, wrong, reduction_axes=(-2, -1), feature_axes=(-2, -1))):
    with pytest.raises(ValueError, match=msg):
      call()
  layer = jaxbn.nnx.BatchNorm(12, axis=(-2, -1), rngs=nnx.Rngs(0))
  layer.scale = nnx.Param(wrong)
  with pytest.raises(ValueError, match=msg):
    layer(x)
  # The layouts that do match: the feature shape, flat (NNX), size-1 axes.
  for scale in (jnp.ones((3, 4)), jnp.ones(12), jnp.ones((1, 3, 4))):
    jaxbn.batch_norm(x, state, scale, training=True, axis=(-2, -1))


def test_errors_raise_at_trace_time_under_jit():
  with pytest.raises(ValueError, match='more than 1 value'):
    jax.jit(lambda x: bn(x))(np.ones((1, 3), np.float32))


def test_batch_of_one_is_fine_in_eval_and_with_spatial_dims():
  # Eval uses the running statistics (mean 0, var 1): y = x / sqrt(1 + eps).
  y, _ = bn(np.ones((1, 3), np.float32), training=False)
  np.testing.assert_allclose(y, np.ones((1, 3)) / np.sqrt(1 + 1e-5), rtol=1e-6)
  # One example with 4x4 positions: 16 values per feature to normalize over.
  x = np.random.default_rng(0).standard_normal((1, 4, 4, 3)).astype(np.float32)
  y, _ = bn(x)
  xs = x.astype(np.float64)
  ref = (xs - xs.mean((0, 1, 2))) / np.sqrt(xs.var((0, 1, 2)) + 1e-5)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)  # float32 sums of 16 O(1) values


@pytest.mark.parametrize('wrap', [jnp.float32, np.float32, np.asarray])
def test_scalar_array_options_mean_what_their_values_mean(wrap):
  # Under jit a traced momentum/epsilon is accepted, so the same value as a
  # concrete scalar array must be too, and give the same result bit for bit
  # (the float32 values of 0.9 and 1e-3 are what the arithmetic uses anyway).
  x = np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32)
  kwargs = dict(momentum=np.float32(0.9), epsilon=np.float32(1e-3))
  want_y, want_state = bn(x, **kwargs)
  got_y, got_state = bn(x, **{k: wrap(v) for k, v in kwargs.items()})
  jitted_y, _ = jax.jit(lambda x, m, e: bn(x, momentum=m, epsilon=e))(
      x, *(wrap(v) for v in kwargs.values()))
  np.testing.assert_array_equal(got_y, want_y)
  np.testing.assert_array_equal(jitted_y, want_y)
  np.testing.assert_array_equal(got_state.mean, want_state.mean)
  np.testing.assert_array_equal(got_state.var, want_state.var)
  with pytest.raises(ValueError, match=r'momentum=0.9 here'):
    bn(momentum=wrap(1.5))
  with pytest.raises(ValueError, match='epsilon must be'):
    bn(epsilon=wrap(-1.0))
  with pytest.raises(ValueError, match='scalar'):
    bn(momentum=jnp.full(3, 0.9))
