"""batch_renorm against a float64 NumPy reference, and its schedules."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn._renorm import batch_renorm, d_max_schedule, r_max_schedule
from reference import np_moments, np_normalize

# float32 arithmetic on O(1) values (normalized outputs, r and d, running
# statistics): a few ulps per op over reductions of a few hundred terms.
F32_TOL = dict(rtol=2e-5, atol=2e-5)


def _data(shape, seed=0, offset=0.5, std=2.0):
  rng = np.random.default_rng(seed)
  return (offset + std * rng.standard_normal(shape)).astype(np.float32)


def np_renorm(x, run_mean, run_var, scale, bias, *, axes, r_max, d_max,
              epsilon=1e-5, momentum=0.99, mask=None):
  """Ioffe (2017), Algorithm 1, in float64. Returns y, r, d, new mean, var."""
  axes = tuple(a % x.ndim for a in axes)
  mean, var, _ = np_moments(x, axes, mask)
  sigma_b = np.sqrt(var + epsilon)
  sigma = np.sqrt(run_var + epsilon)
  r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
  d = np.clip((mean - run_mean) / sigma, -d_max, d_max)
  xhat = np_normalize(x, mean, var, None, None, axes, epsilon)
  shape = [s if i in axes else 1 for i, s in enumerate(x.shape)]
  y = ((xhat * r.reshape(shape) + d.reshape(shape)) * scale.reshape(shape)
       + bias.reshape(shape))
  new_mean = momentum * run_mean + (1 - momentum) * mean
  new_var = momentum * run_var + (1 - momentum) * var
  return y, r, d, new_mean, new_var


def np_renorm_grads(x, w, run_mean, run_var, scale, *, r_max, d_max, epsilon):
  """Gradients of sum(w * y) for x of shape (N, C), r and d held constant."""
  x = x.astype(np.float64)
  mean, var = x.mean(0), x.var(0)
  sigma_b = np.sqrt(var + epsilon)
  sigma = np.sqrt(run_var + epsilon)
  r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
  d = np.clip((mean - run_mean) / sigma, -d_max, d_max)
  xhat = (x - mean) / sigma_b
  g = w * scale * r  # d loss / d xhat
  gx = (g - g.mean(0) - xhat * (g * xhat).mean(0)) / sigma_b
  return gx, (w * (xhat * r + d)).sum(0), w.sum(0)


def _state(mean, var, count=3):
  return jaxbn.BatchNormState(mean=jnp.asarray(mean, jnp.float32),
                              var=jnp.asarray(var, jnp.float32),
                              count=jnp.asarray(count, jnp.int32))


@pytest.mark.parametrize('shape,axis', [
    ((4, 5, 5, 6), -1),      # NHWC
    ((4, 6, 5, 5), 1),       # NCHW
    ((16, 6), (1,)),
])
def test_training_matches_reference(shape, axis):
  x = _data(shape)
  axes = (axis,) if isinstance(axis, int) else axis
  c = shape[axes[0]]
  rng = np.random.default_rng(1)
  # Running stats chosen so some features clip r and d and others do not.
  run_mean = np.array([0.5, 0.0, 3.0, -9.0, 0.6, 1.0])[:c]
  run_var = np.array([4.0, 0.1, 50.0, 4.0, 3.5, 1.0])[:c]
  scale = rng.uniform(0.5, 1.5, c)
  bias = rng.standard_normal(c)
  y, new = batch_renorm(x, _state(run_mean, run_var), scale.astype(np.float32),
                        bias.astype(np.float32), training=True, axis=axis,
                        r_max=2.0, d_max=1.5, momentum=0.9)
  ry, r, d, rmean, rvar = np_renorm(x, run_mean, run_var, scale, bias, axes=axes,
                                    r_max=2.0, d_max=1.5, momentum=0.9)
  assert np.any(r == 2.0) and np.any(r == 0.5) and np.any(np.abs(d) == 1.5)
  assert np.any((np.abs(d) < 1.5) & (r > 0.5) & (r < 2.0))
  np.testing.assert_allclose(y, ry, **F32_TOL)
  np.testing.assert_allclose(new.mean, rmean, **F32_TOL)
  np.testing.assert_allclose(new.var, rvar, **F32_TOL)
  assert int(new.count) == 4 and y.dtype == jnp.float32


def test_without_scale_and_bias_matches_reference():
  x = _data((32, 3))
  y, _ = batch_renorm(x, _state([0.0, 1.0, -1.0], [1.0, 9.0, 0.5]),
                      training=True, r_max=3.0, d_max=5.0)
  ry, *_ = np_renorm(x, np.array([0.0, 1.0, -1.0]), np.array([1.0, 9.0, 0.5]),
                     np.ones(3), np.zeros(3), axes=(1,), r_max=3.0, d_max=5.0)
  np.testing.assert_allclose(y, ry, **F32_TOL)


def test_masked_statistics_match_reference():
  x = _data((12, 4), seed=3)
  mask = np.random.default_rng(4).random((12, 4)) > 0.3
  x_nan = np.where(mask, x, np.nan).astype(np.float32)
  run_mean, run_var = np.array([0.0, 1.0, 0.5, 2.0]), np.array([1.0, 2.0, 8.0, 3.0])
  y, new = batch_renorm(x_nan, _state(run_mean, run_var), training=True,
                        r_max=1.5, d_max=0.5, mask=mask)
  ry, _, _, rmean, rvar = np_renorm(x, run_mean, run_var, np.ones(4), np.zeros(4),
                                    axes=(1,), r_max=1.5, d_max=0.5, mask=mask)
  np.testing.assert_allclose(np.where(mask, y, 0), np.where(mask, ry, 0), **F32_TOL)
  np.testing.assert_allclose(new.mean, rmean, **F32_TOL)
  np.testing.assert_allclose(new.var, rvar, **F32_TOL)


def test_epsilon_enters_both_sigmas_for_a_small_batch_variance():
  # Features whose batch variance is comparable to epsilon: r is
  # sqrt(var_B + eps) / sqrt(var + eps) (near 1 here, unclipped), not
  # sqrt(var_B) / sqrt(var + eps) (0.3 to 0.7). Centred data (no offset)
  # keeps every float32 step at full relative precision, so F32_TOL holds.
  rng = np.random.default_rng(13)
  x = (rng.standard_normal((32, 3)) * np.array([3e-3, 1e-3, 1.0])).astype(np.float32)
  run_mean, run_var = np.array([1e-3, -5e-4, 0.2]), np.array([1e-5, 2e-6, 1.5])
  scale, bias = np.array([1.5, 0.5, 1.0]), np.array([0.1, -0.2, 0.3])
  y, _ = batch_renorm(x, _state(run_mean, run_var), scale.astype(np.float32),
                      bias.astype(np.float32), training=True, r_max=3.0, d_max=5.0)
  ry, r, d, *_ = np_renorm(x, run_mean, run_var, scale, bias, axes=(1,), r_max=3.0,
                           d_max=5.0)
  assert np.all((r > 1 / 3) & (r < 3)) and np.all(np.abs(d) < 5)
  np.testing.assert_allclose(y, ry, **F32_TOL)


def test_eval_mode_normalizes_with_running_stats():
  x = _data((10, 4))
  state = _state(np.arange(4.0), np.arange(1.0, 5.0), count=7)
  scale, bias = np.full(4, 2.0, np.float32), np.full(4, -1.0, np.float32)
  y, same = batch_renorm(x, state, scale, bias, training=False)
  ref = np_normalize(x, np.arange(4.0), np.arange(1.0, 5.0), scale, bias, (1,), 1e-5)
  np.testing.assert_allclose(y, ref, **F32_TOL)
  assert same is state


def test_gradients_hold_r_and_d_constant():
  x = _data((24, 5), seed=5)
  rng = np.random.default_rng(6)
  w = rng.standard_normal((24, 5))
  scale = rng.uniform(0.5, 1.5, 5)
  bias = rng.standard_normal(5)
  run_mean, run_var = np.array([0.0, 0.5, 2.0, -3.0, 1.0]), np.array([1.0, 4.0, 0.2, 9.0, 30.0])
  state = _state(run_mean, run_var)

  def loss(x, scale, bias):
    y, _ = batch_renorm(x, state, scale, bias, training=True, r_max=2.0, d_max=1.0)
    return jnp.sum(y * w.astype(np.float32))

  grads = jax.grad(loss, argnums=(0, 1, 2))(
      x, scale.astype(np.float32), bias.astype(np.float32))
  refs = np_renorm_grads(x, w, run_mean, run_var, scale, r_max=2.0, d_max=1.0,
                         epsilon=1e-5)
  for g, ref in zip(grads, refs):
    np.testing.assert_allclose(g, ref, **F32_TOL)


def test_gradients_differ_from_differentiating_through_r_and_d():
  # Guards the stop_gradient: without it the x-gradient would change.
  x = _data((24, 2), seed=7)
  state = _state([0.0, 0.0], [3.0, 5.0])
  w = np.random.default_rng(8).standard_normal((24, 2)).astype(np.float32)

  def loss(x):
    y, _ = batch_renorm(x, state, training=True, r_max=10.0, d_max=10.0)
    return jnp.sum(y * w)

  def loss_free(x):  # r and d differentiated: y = (x - mu) / sigma
    return jnp.sum((x - state.mean) / jnp.sqrt(state.var + 1e-5) * w)

  g = jax.grad(loss)(x)
  # Unclipped r, d make y equal to normalizing with the running stats.
  y, _ = batch_renorm(x, state, training=True, r_max=10.0, d_max=10.0)
  y_run = (x - state.mean) / jnp.sqrt(state.var + 1e-5)
  np.testing.assert_allclose(y, y_run, **F32_TOL)
  assert not np.allclose(g, jax.grad(loss_free)(x), atol=1e-3)


@pytest.mark.parametrize('with_affine', [False, True])
def test_unit_limits_are_batch_norm_exactly(with_affine):
  x = _data((6, 4, 4, 3), seed=9)
  state = _state([1.0, -2.0, 0.3], [0.5, 7.0, 2.0])
  rng = np.random.default_rng(10)
  params = ((rng.uniform(0.5, 1.5, 3).astype(np.float32),
             rng.standard_normal(3).astype(np.float32)) if with_affine else ())
  w = rng.standard_normal(x.shape).astype(np.float32)

  def loss(norm):
    def f(x, *params):
      y, new = norm(x, state, *params, training=True, momentum=0.9)
      return jnp.sum(y * w), (y, new)
    return jax.value_and_grad(f, tuple(range(1 + len(params))), has_aux=True)

  renorm = lambda *a, **k: batch_renorm(*a, **k, r_max=1.0, d_max=0.0)
  (_, (y_bn, s_bn)), g_bn = loss(jaxbn.batch_norm)(x, *params)
  (_, (y_rn, s_rn)), g_rn = loss(renorm)(x, *params)
  for a, b in zip((y_rn, *g_rn, *s_rn), (y_bn, *g_bn, *s_bn)):
    np.testing.assert_array_equal(a, b)


def test_traced_limits_inside_jit_follow_the_schedule():
  x = _data((16, 3), seed=11)
  state = _state([2.0, -2.0, 0.0], [9.0, 0.1, 1.0])
  r_sched = r_max_schedule(3.0, warmup_steps=10, end_step=20)
  d_sched = d_max_schedule(5.0, warmup_steps=10, end_step=20)

  @jax.jit
  def step(x, state, i):
    return batch_renorm(x, state, training=True, r_max=r_sched(i), d_max=d_sched(i))

  for i in (0, 15, 30):
    y, _ = step(x, state, i)
    ry, *_ = np_renorm(x, np.array([2.0, -2.0, 0.0]), np.array([9.0, 0.1, 1.0]),
                       np.ones(3), np.zeros(3), axes=(1,),
                       r_max=float(r_sched(i)), d_max=float(d_sched(i)))
    np.testing.assert_allclose(y, ry, **F32_TOL)
  y0, _ = step(x, state, 0)
  y_bn, _ = jaxbn.batch_norm(x, state, training=True)
  np.testing.assert_allclose(y0, y_bn, rtol=0, atol=1e-6)


def test_axis_name_pools_statistics_across_devices():
  x = _data((8, 6, 3), seed=12)  # 8 shards of 6 examples
  state = _state([0.5, 0.0, 1.0], [2.0, 9.0, 0.3])
  f = lambda xs: batch_renorm(xs, state, training=True, axis_name='b',
                              r_max=2.0, d_max=1.0)
  ys, states = jax.vmap(f, axis_name='b')(x)
  y, new = batch_renorm(x.reshape(48, 3), state, training=True, r_max=2.0, d_max=1.0)
  np.testing.assert_allclose(ys.reshape(48, 3), y, **F32_TOL)
  np.testing.assert_allclose(states.mean[0], new.mean, **F32_TOL)


def test_paper_schedule_defaults():
  r, d = r_max_schedule(), d_max_schedule()
  assert [float(r(s)) for s in (0, 5_000, 22_500, 40_000, 10**6)] == [1.0, 1.0, 2.0, 3.0, 3.0]
  assert [float(d(s)) for s in (0, 5_000, 15_000, 25_000, 10**6)] == [0.0, 0.0, 2.5, 5.0, 5.0]
  jump = r_max_schedule(2.0, warmup_steps=5, end_step=5)
  assert [float(jump(s)) for s in (4, 5, 6)] == [1.0, 2.0, 2.0]


@pytest.mark.parametrize('kwargs,match', [
    (dict(r_max=0.5), 'r_max must be >= 1'),
    (dict(d_max=-1.0), 'd_max must be >= 0'),
    (dict(r_max=np.ones(3)), 'r_max must be a scalar'),
    (dict(momentum=1.5), 'momentum must be in'),
])
def test_bad_arguments_name_the_fix(kwargs, match):
  with pytest.raises(ValueError, match=match):
    batch_renorm(_data((4, 3)), jaxbn.init_state(3), training=True, **kwargs)


def test_other_errors():
  with pytest.raises(ValueError, match='init_state'):
    batch_renorm(_data((4, 3)), jaxbn.init_state(5), training=True)
  with pytest.raises(TypeError, match='real input'):
    batch_renorm(jnp.ones((4, 3), jnp.complex64), jaxbn.init_state(3), training=True)
  with pytest.raises(ValueError, match='more than 1 value'):
    batch_renorm(_data((1, 3)), jaxbn.init_state(3), training=True)
  with pytest.raises(ValueError, match='r_max must be >= 1'):
    r_max_schedule(0.9)
  with pytest.raises(ValueError, match='end_step'):
    d_max_schedule(warmup_steps=10, end_step=5)

