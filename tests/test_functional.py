"""batch_norm against the float64 NumPy reference, option by option."""

import re
import warnings

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxbn
from reference import (bfloat16_ulps, cancelling_dx_case, np_batch_norm_train, np_moments,
                       np_normalize)

# float32 arithmetic on O(1) normalized values: a few ulps of 1.0 per op over
# reductions of ~1e3 terms stays well below 1e-5.
F32_TOL = dict(rtol=2e-5, atol=2e-5)


def _data(shape, seed=0, offset=0.5, std=2.0):
  rng = np.random.default_rng(seed)
  return (offset + std * rng.standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize('shape,axis', [
    ((16, 5), -1),
    ((4, 6, 6, 3), -1),        # NHWC
    ((4, 3, 6, 6), 1),         # NCHW
    ((4, 3, 5, 6), (1, 3)),    # two feature axes
    ((8, 2, 7), (0, 2)),       # feature axes around the batch axis
])
@pytest.mark.parametrize('running_var', ['biased', 'unbiased'])
def test_training_step_matches_reference(shape, axis, running_var):
  x = _data(shape)
  axes = (axis,) if isinstance(axis, int) else axis
  fshape = tuple(shape[a] for a in axes)
  rng = np.random.default_rng(1)
  scale = rng.uniform(0.5, 1.5, fshape).astype(np.float32)
  bias = rng.standard_normal(fshape).astype(np.float32)
  state = jaxbn.init_state(fshape if len(fshape) > 1 else fshape[0])
  y, new = jaxbn.batch_norm(x, state, scale, bias, training=True, axis=axis,
                            momentum=0.9, running_var=running_var)
  ry, rmean, rvar, rcount = np_batch_norm_train(
      x, np.zeros(fshape), np.ones(fshape), 0, scale, bias, feature_axes=axes,
      momentum=0.9, running_var=running_var)
  np.testing.assert_allclose(y, ry, **F32_TOL)
  np.testing.assert_allclose(new.mean, rmean, **F32_TOL)
  np.testing.assert_allclose(new.var, rvar, **F32_TOL)
  assert int(new.count) == rcount
  assert y.dtype == jnp.float32 and y.shape == x.shape


def test_eval_mode_uses_state_and_returns_it_unchanged():
  x = _data((10, 4))
  state = jaxbn.BatchNormState(mean=jnp.arange(4.0), var=jnp.arange(1.0, 5.0),
                               count=jnp.array(7, jnp.int32))
  y, same = jaxbn.batch_norm(x, state, training=False, epsilon=1e-3)
  ref = np_normalize(x, np.arange(4.0), np.arange(1.0, 5.0), None, None, (1,), 1e-3)
  np.testing.assert_allclose(y, ref, **F32_TOL)
  assert same is state


def test_several_steps_and_cumulative_average():
  state = jaxbn.init_state(3)
  rm, rv, rc = np.zeros(3), np.ones(3), 0
  for step in range(5):
    x = _data((12, 3), seed=step, offset=step)
    _, state = jaxbn.batch_norm(x, state, training=True, momentum=None,
                                running_var='unbiased')
    _, rm, rv, rc = np_batch_norm_train(x, rm, rv, rc, momentum=None,
                                        running_var='unbiased')
  np.testing.assert_allclose(state.mean, rm, **F32_TOL)
  np.testing.assert_allclose(state.var, rv, **F32_TOL)
  # A cumulative average is the plain mean of the per-batch statistics.
  means = [np_moments(_data((12, 3), seed=s, offset=s), (1,))[0] for s in range(5)]
  np.testing.assert_allclose(state.mean, np.mean(means, 0), **F32_TOL)


def test_mask_equals_dropping_rows_and_ignores_nan():
  x = _data((20, 4))
  keep = np.arange(20) % 3 != 0
  poisoned = np.where(keep[:, None], x, np.nan).astype(np.float32)
  state = jaxbn.init_state(4)
  y, new = jaxbn.batch_norm(poisoned, state, training=True, mask=keep[:, None])
  y_ref, ref = jaxbn.batch_norm(x[keep], state, training=True)
  np.testing.assert_allclose(y[keep], y_ref, **F32_TOL)
  np.testing.assert_allclose(new.mean, ref.mean, **F32_TOL)
  np.testing.assert_allclose(new.var, ref.var, **F32_TOL)

  def loss(x):
    y, s = jaxbn.batch_norm(x, state, training=True, mask=keep[:, None])
    return jnp.sum(jnp.where(keep[:, None], y, 0.0) ** 3) + s.var.sum()

  grad = jax.grad(loss)(jnp.asarray(poisoned))
  assert np.isfinite(grad[keep]).all()
  assert (grad[~keep] == 0).all()


def test_feature_without_valid_entry_keeps_state_and_gives_no_nan():
  x = _data((6, 3))
  mask = np.ones((6, 3), bool)
  mask[:, 1] = False
  state = jaxbn.BatchNormState(jnp.full(3, 2.0), jnp.full(3, 5.0), jnp.array(0, jnp.int32))
  y, new = jaxbn.batch_norm(x, state, training=True, mask=mask, momentum=0.5)
  assert np.isfinite(y).all()
  assert float(new.mean[1]) == 2.0 and float(new.var[1]) == 5.0
  assert float(new.mean[0]) != 2.0


def test_per_feature_mask():
  x = _data((9, 2, 3))
  mask = np.random.default_rng(3).random((9, 2, 3)) > 0.4
  state = jaxbn.init_state(3)
  y, new = jaxbn.batch_norm(x, state, training=True, mask=mask, momentum=0.0,
                            running_var='unbiased')
  ry, rm, rv, _ = np_batch_norm_train(x, np.zeros(3), np.ones(3), 0, mask=mask,
                                      momentum=0.0, running_var='unbiased')
  np.testing.assert_allclose(y, ry, **F32_TOL)
  np.testing.assert_allclose(new.mean, rm, **F32_TOL)
  np.testing.assert_allclose(new.var, rv, **F32_TOL)


def test_state_keeps_its_dtypes_so_it_threads_through_scan():
  # float64 batches (x64 on) into a float32 state: the state stays float32,
  # which lax.scan requires of its carry.
  with jax.enable_x64(True):
    xs = np.random.default_rng(0).standard_normal((5, 16, 4)) * 2 + 3
    state, _ = jax.lax.scan(
        lambda s, x: (jaxbn.batch_norm(x, s, training=True, momentum=None)[1], None),
        jaxbn.init_state(4), xs)
  assert (state.mean.dtype, state.var.dtype, state.count.dtype) == (
      jnp.float32, jnp.float32, jnp.int32)
  # momentum=None averages the five batches' statistics.
  np.testing.assert_allclose(state.mean, xs.mean(1).mean(0), rtol=1e-6)
  np.testing.assert_allclose(state.var, xs.var(1).mean(0), rtol=1e-6)


def test_plain_python_count_and_numpy_float64_input():
  x = np.random.default_rng(0).standard_normal((8, 6)) + 2  # float64, x64 off
  state = jaxbn.BatchNormState(jnp.zeros(6), jnp.ones(6), 0)
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # no dtype-truncation warnings
    y, new = jaxbn.batch_norm(x, state, training=True, momentum=None)
  assert y.dtype == jnp.float32 and int(new.count) == 1
  np.testing.assert_allclose(new.mean, x.mean(0), rtol=1e-6)


def test_bfloat16_training_output_rounds_once():
  rng = np.random.default_rng(3)
  x = jnp.asarray(3.0 + 2.0 * rng.standard_normal((256, 16)), jnp.bfloat16)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, 16), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(16), jnp.float32)
  y, _ = jaxbn.batch_norm(x, jaxbn.init_state(16), scale, bias, training=True)
  xs = np.asarray(x.astype(jnp.float32), np.float64)
  mean, var, _ = np_moments(xs, (1,))
  ref = np_normalize(xs, mean, var, np.asarray(scale), np.asarray(bias), (1,), 1e-5)
  # Statistics and affine in float32, one rounding: 0.5 ulp plus float32's ~1e-3 ulp.
  assert bfloat16_ulps(y, ref).max() <= 0.505


def test_normalize_with_bfloat16_statistics_rounds_once():
  # Flax NNX hands bfloat16 statistics and parameters to the normalization
  # when dtype=bfloat16; the arithmetic still runs in float32.
  rng = np.random.default_rng(0)
  as_bf16 = lambda a: jnp.asarray(a, jnp.bfloat16)
  x = as_bf16(3.0 + 2.0 * rng.standard_normal((512, 16)))
  mean, var = as_bf16(3.0 + 0.1 * rng.standard_normal(16)), as_bf16(rng.uniform(2, 6, 16))
  scale, bias = as_bf16(rng.uniform(0.5, 1.5, 16)), as_bf16(rng.standard_normal(16))
  y = jaxbn.normalize(x, mean, var, scale, bias)
  assert y.dtype == jnp.bfloat16
  f64 = lambda a: np.asarray(a.astype(jnp.float32), np.float64)
  ref = np_normalize(f64(x), f64(mean), f64(var), f64(scale), f64(bias), (1,), 1e-5)
  # One rounding: 0.5 ulp, and float32's own error is ~2^-16 ulp.
  assert bfloat16_ulps(y, ref).max() <= 0.501


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_low_precision_in_same_dtype_out_stats_in_float32(dtype):
  x32 = _data((64, 8), offset=3.0)
  x = jnp.asarray(x32, dtype)
  state = jaxbn.init_state(8)
  y, new = jaxbn.batch_norm(x, state, training=True, momentum=0.0)
  assert y.dtype == dtype
  assert new.mean.dtype == jnp.float32 and new.var.dtype == jnp.float32
  xs = np.asarray(x.astype(jnp.float32), np.float64)  # the values the model saw
  mean, var, _ = np_moments(xs, (1,))
  np.testing.assert_allclose(new.mean, mean, rtol=1e-5)
  np.testing.assert_allclose(new.var, var, rtol=1e-5)
  # Output precision is that of the dtype: 8 bits of mantissa for bfloat16.
  tol = 1e-2 if dtype == jnp.bfloat16 else 2e-3
  ref = np_normalize(xs, mean, var, None, None, (1,), 1e-5)
  np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize('dtype,offset,std', [
    (jnp.float16, 1000.0, 4.0),    # float16 spacing at 1000: 0.5
    (jnp.bfloat16, 300.0, 6.0),    # bfloat16 spacing at 300: 2
])
def test_low_precision_far_from_zero_keeps_exact_statistics_and_gradients(dtype, offset, std):
  # |mean| / std of 50-250: E[x^2] - E[x]^2 would lose 11-16 of float32's
  # 24 bits. Every number is checked against float64 on the values seen.
  x = jnp.asarray(_data((4, 6, 6, 8), seed=1, offset=offset, std=std), dtype)
  # The cotangent reaches the normalization in the output dtype: use values
  # that dtype holds exactly.
  g = np.asarray(jnp.asarray(_data(x.shape, seed=2, offset=0.0, std=1.0), dtype), np.float32)
  scale, bias = _data((8,), seed=3), _data((8,), seed=4)

  def loss(x, scale, bias):
    y, new = jaxbn.batch_norm(x, jaxbn.init_state(8), scale, bias, training=True,
                              momentum=0.0, epsilon=1e-5)
    return jnp.sum(y.astype(jnp.float32) * g), (y, new)

  (dx, dscale, dbias), (y, new) = jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True))(
      x, scale, bias)
  assert y.dtype == dtype and dx.dtype == dtype
  xs = np.asarray(x.astype(jnp.float32), np.float64)
  mean, var, n = np_moments(xs, (3,))
  np.testing.assert_allclose(new.mean, mean, rtol=1e-6)
  np.testing.assert_allclose(new.var, var, rtol=1e-5)
  x_hat = (xs - mean) / np.sqrt(var + 1e-5)
  g64 = g.astype(np.float64)
  red = (0, 1, 2)
  ref_dbias = g64.sum(red)
  ref_dscale = (g64 * x_hat).sum(red)
  # d/dx of sum(g * (scale * x_hat + bias)), the textbook closed form.
  ref_dx = scale / np.sqrt(var + 1e-5) / n * (n * g64 - ref_dbias - x_hat * ref_dscale)
  np.testing.assert_allclose(dbias, ref_dbias, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dscale, ref_dscale, rtol=1e-5, atol=1e-4)
  # y and dx are rounded to the input dtype at the end: 8 (bfloat16) or 11
  # (float16) bits of mantissa, relative to the largest value.
  tol = 2.0 ** -7 if dtype == jnp.bfloat16 else 2.0 ** -10
  ref_y = np_normalize(xs, mean, var, scale, bias, (3,), 1e-5)
  np.testing.assert_allclose(np.asarray(y, np.float64), ref_y, rtol=tol, atol=tol * 4)
  dx = np.asarray(dx, np.float64)
  np.testing.assert_allclose(dx, ref_dx, rtol=tol, atol=tol * np.abs(ref_dx).max())


def _cancelling_dx(dtype):
  """``reference.cancelling_dx_case`` for a batch norm of a (64, 8, 8, 16) batch."""
  x, g, error = cancelling_dx_case(dtype, (64, 8, 8, 16), (0, 1, 2), 1e-5)
  return jnp.asarray(x), g, error


@pytest.mark.parametrize('norm', ['batch_norm', 'batch_renorm', 'ghost'])
@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_low_precision_dx_is_rounded_once(dtype, norm):
  x, g, error = _cancelling_dx(dtype)
  # Batch renorm with r_max=1, d_max=0 and ghost batch norm with one chunk
  # are batch norm, each through its own code.
  options = {'batch_renorm': {'r_max': 1.0, 'd_max': 0.0},
             'ghost': {'virtual_batch_size': x.shape[0]}}.get(norm, {})
  norm_fn = jaxbn.batch_renorm if norm == 'batch_renorm' else jaxbn.batch_norm

  def loss(x):
    y, _ = norm_fn(x, jaxbn.init_state(16), training=True, **options)
    return jnp.sum(y.astype(jnp.float32) * g)

  # One rounding of dx (2^-8 relative for bfloat16, 2^-11 for float16), plus
  # the float32 sums: measured 2.2e-3 for bfloat16.
  assert error(jax.jit(jax.grad(loss))(x)) < (2.0 ** -7 if dtype == jnp.bfloat16 else 2.0 ** -9)


def test_flax_bfloat16_dx_rounds_its_parts_apart():
  # The README's figure for Flax on the same case (measured: 0.28).
  x, g, error = _cancelling_dx(jnp.bfloat16)
  layer = flax.linen.BatchNorm(use_running_average=False, dtype=jnp.bfloat16)
  variables = layer.init(jax.random.key(0), x)

  def loss(x):
    y, _ = layer.apply(variables, x, mutable=['batch_stats'])
    return jnp.sum(y.astype(jnp.float32) * g)

  assert error(jax.jit(jax.grad(loss))(x)) > 0.1


def test_low_precision_higher_derivatives_match_autodiff_in_float32():
  # The narrow path has its own derivative plumbing (the bfloat16 x read in
  # the rule, the tangent cast in parts on CPU); second derivatives and
  # tangents must be those of plain autodiff of the textbook formula in
  # float32 on the same values, up to bfloat16 rounding (measured: 4.4e-3
  # and 4.1e-3 of the largest entry; bfloat16 rounds at 2^-8 = 3.9e-3).
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((16, 3)) * 2 + 4, jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((16, 3)), jnp.float32)
  t = jnp.asarray(rng.standard_normal((16, 3)), jnp.bfloat16)
  y = lambda x: jaxbn.batch_norm(x, jaxbn.init_state(3), training=True)[0]
  y_ref = lambda x: (x - x.mean(0)) / jnp.sqrt(x.var(0) + 1e-5)
  f = lambda y: lambda x: jnp.sum(jnp.sin(y(x).astype(jnp.float32)) * w)
  wide = lambda a: a.astype(jnp.float32)
  relative = lambda a, b: float(jnp.abs(wide(a) - b).max() / jnp.abs(b).max())
  assert relative(jax.jit(jax.hessian(f(y)))(x), jax.hessian(f(y_ref))(wide(x))) < 2.0 ** -6
  assert relative(jax.jvp(y, (x,), (t,))[1], jax.jvp(y_ref, (wide(x),), (wide(t),))[1]) < 2.0 ** -6


def test_low_precision_statistics_pool_across_devices():
  # Each device centres its bfloat16 shard on its own first sample; the
  # pooled statistics and outputs must equal those of the whole batch.
  x = jnp.asarray(_data((8, 5), offset=40.0), jnp.bfloat16)
  whole, whole_state = jaxbn.batch_norm(x, jaxbn.init_state(5), training=True, momentum=0.0)

  def shard(x):
    return jaxbn.batch_norm(x, jaxbn.init_state(5), training=True, momentum=0.0,
                            axis_name='d')
  y, state = jax.vmap(shard, axis_name='d')(x.reshape(2, 4, 5))
  np.testing.assert_allclose(np.asarray(y.reshape(8, 5), np.float32),
                             np.asarray(whole, np.float32), atol=2.0 ** -7 * 4)
  np.testing.assert_allclose(state.mean[0], whole_state.mean, rtol=1e-6)
  np.testing.assert_allclose(state.var[0], whole_state.var, rtol=1e-5)


def test_float64_input_accumulates_in_float64():
  with jax.enable_x64(True):
    x = np.random.default_rng(0).standard_normal((32, 3)) * 1e-3 + 1e4
    state = jaxbn.init_state(3, jnp.float64)
    y, new = jaxbn.batch_norm(jnp.asarray(x), state, training=True, momentum=0.0)
    assert y.dtype == jnp.float64 and new.var.dtype == jnp.float64
    np.testing.assert_allclose(new.var, x.var(0), rtol=1e-9)


def test_complex_input_has_real_variance():
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((16, 3)) + 1j * rng.standard_normal((16, 3))).astype(np.complex64)
  state = jaxbn.init_state(3, jnp.complex64)
  y, new = jaxbn.batch_norm(x, state, training=True, momentum=0.0)
  assert y.dtype == jnp.complex64
  assert new.var.dtype == jnp.float32 and new.mean.dtype == jnp.complex64
  mean, var, _ = np_moments(x, (1,))
  np.testing.assert_allclose(new.mean, mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new.var, var, rtol=1e-5)
  np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-5)


def test_transforms_jit_vmap_scan_checkpoint():
  xs = jnp.asarray(_data((5, 16, 4)))
  state = jaxbn.init_state(4)
  step = lambda s, x: jaxbn.batch_norm(x, s, training=True)[::-1]
  final, ys = jax.lax.scan(jax.checkpoint(step), state, xs)
  s = state
  for i in range(5):
    y, s = jaxbn.batch_norm(xs[i], s, training=True)
    np.testing.assert_allclose(ys[i], y, **F32_TOL)
  np.testing.assert_allclose(final.mean, s.mean, **F32_TOL)
  # vmap over independent models: one state per model.
  states = jax.vmap(lambda _: jaxbn.init_state(4))(jnp.arange(5))
  vy, vs = jax.jit(jax.vmap(lambda x, s: jaxbn.batch_norm(x, s, training=True)))(xs, states)
  np.testing.assert_allclose(vy, ys, **F32_TOL)
  assert vs.mean.shape == (5, 4)


@pytest.mark.parametrize('use_mask', [False, True])
def test_gradients_are_exact_second_order(use_mask):
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((6, 3)) * 2 + 1)
    scale = jnp.asarray(rng.uniform(0.5, 2, 3))
    bias = jnp.asarray(rng.standard_normal(3))
    mask = jnp.asarray(rng.random((6, 3)) > 0.3) if use_mask else None
    state = jaxbn.init_state(3, jnp.float64)
    w = jnp.asarray(rng.standard_normal((6, 3)))

    def f(x, scale, bias):
      y, s = jaxbn.batch_norm(x, state, scale, bias, training=True, mask=mask,
                              momentum=0.5)
      if mask is not None:  # masked-out outputs are constants by design
        y = jnp.where(mask, y, 0.0)
      return jnp.sum(w * y) + jnp.sum(jnp.sin(y)) + jnp.sum(s.var * s.mean)

    check_grads(jax.jit(f), (x, scale, bias), order=2, modes=('fwd', 'rev'))


@pytest.mark.parametrize('affine', [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize('dtype', [np.float64, np.complex128])
def test_normalize_derivatives_match_finite_differences(affine, dtype):
  # normalize has a hand-written derivative rule; finite differences of
  # every input (statistics included) check it to second order.
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 2, 3)) * 2 + 1
    mean = rng.standard_normal(3)
    if dtype == np.complex128:
      x = x + 1j * rng.standard_normal(x.shape)
      mean = mean + 1j * rng.standard_normal(3)
    args = [jnp.asarray(x), jnp.asarray(mean), jnp.asarray(rng.uniform(0.5, 2, 3))]
    args += [jnp.asarray(rng.uniform(0.5, 2, 3)) for _ in range(affine[0])]
    args += [jnp.asarray(rng.standard_normal(3)) for _ in range(affine[1])]

    def f(x, mean, var, *params):
      scale = params[0] if affine[0] else None
      bias = params[-1] if affine[1] else None
      y = jaxbn.normalize(x, mean, var, scale, bias, epsilon=1e-3)
      return jnp.sum(jnp.abs(jnp.sin(y)) ** 2)

    check_grads(f, args, order=2, modes=('fwd', 'rev'))


@pytest.mark.parametrize('training', [True, False])
def test_epsilon_may_be_traced_and_differentiated(training):
  # epsilon is accepted traced (a jit argument), so it must also survive
  # differentiation from outside the jit and get its own true derivative.
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((6, 3)) * 2 + 1)
    state = jaxbn.BatchNormState(jnp.asarray(rng.standard_normal(3)),
                                 jnp.asarray(rng.uniform(0.5, 2, 3)), jnp.asarray(0))
    w = jnp.asarray(rng.standard_normal((6, 3)))

    def f(x, epsilon):
      y, _ = jaxbn.batch_norm(x, state, training=training, epsilon=epsilon)
      return jnp.sum(w * y) + jnp.sum(jnp.sin(y))

    want = jax.grad(f)(x, 0.5)
    np.testing.assert_allclose(jax.grad(jax.jit(f))(x, 0.5), want, rtol=1e-12)
    np.testing.assert_allclose(jax.grad(f)(x, 1), jax.grad(f)(x, 1.0), rtol=1e-12)
    check_grads(jax.jit(f), (x, 0.5), order=2, modes=('fwd', 'rev'))
    check_grads(lambda x, e: jnp.sum(jnp.sin(jaxbn.layer_norm(x, epsilon=e))), (x, 0.5),
                order=2, modes=('fwd', 'rev'))


def _full_size_buffers(compiled_hlo: str, shape) -> list[str]:
  """Instructions of the entry computation that write a floating-point array
  of ``shape`` (one entry per such output, tuple-shaped results included)."""
  entry = compiled_hlo[compiled_hlo.index('\nENTRY'):]
  array = re.compile(r'\b(?:f64|f32|bf16|f16)\[' + ','.join(map(str, shape)) + r'\]')
  views = (' parameter(', ' bitcast(', ' get-tuple-element(', ' tuple(')
  found = []
  for line in entry.splitlines():
    name, _, rest = line.partition(' = ')
    result_type = rest.split('{')[0] if not rest.startswith('(') else rest.split(') ')[0]
    if rest and not any(v in line for v in views):
      found += [name.strip()] * len(array.findall(result_type))
  return found


def _training_grads(num_features):
  """``jit(grad)`` of ``sum(y * g)`` over x, scale and bias for a training
  batch norm (the benchmarks' forward+backward), and a scale and bias."""
  state = jaxbn.init_state(num_features)

  def loss(x, scale, bias, g):
    y, _ = jaxbn.batch_norm(x, state, scale, bias, training=True)
    return jnp.sum(y * g, dtype=jnp.float32)

  return (jax.jit(jax.grad(loss, argnums=(0, 1, 2))), jnp.ones(num_features),
          jnp.zeros(num_features))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_training_backward_writes_no_full_size_buffer_but_dx(dtype):
  # Training forward+backward needs x, the cotangent and per-feature sums;
  # the only array-sized buffer it has to write is dx. A stored centred
  # copy of x (what autodiff keeps for sum(g * (x - mean))) would cost a
  # write and a read of the whole array, plus its page faults on CPU; so
  # would float32 copies of bfloat16 x or of the cotangent.
  shape = (32, 16, 16, 64)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape, np.float32) + 3.0, dtype)
  g = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
  grads, scale, bias = _training_grads(shape[-1])
  buffers = _full_size_buffers(grads.lower(x, scale, bias, g).compile().as_text(), shape)
  assert len(buffers) == 1, buffers


def test_accelerator_backward_holds_no_widened_copy_behind_a_barrier():
  # An optimization barrier makes XLA materialize its operands. On CPU the
  # backward's barrier keeps each reduction widening the narrow cotangent
  # itself; lowered for a GPU, a barrier holding the float32 cotangent of a
  # bfloat16 output would write that copy (twice the activation's size):
  # measured on an H200, 2x Flax's time until it went. Checked on the
  # lowered program, which needs no GPU.
  shape = (32, 16, 16, 64)
  x = jnp.ones(shape, jnp.bfloat16)
  grads, scale, bias = _training_grads(shape[-1])
  full_f32 = 'tensor<' + 'x'.join(map(str, shape)) + 'xf32>'
  for platform in ('cpu', 'cuda'):
    lowered = grads.trace(x, scale, bias, x).lower(lowering_platforms=(platform,)).as_text()
    barriers = [l for l in lowered.splitlines() if 'optimization_barrier' in l]
    held = [l for l in barriers if full_f32 in l]
    if platform == 'cpu':
      assert barriers  # the CPU program still takes its barriers
    else:
      assert not held, held


@pytest.mark.parametrize('running_var', ['biased', 'unbiased'])
def test_ghost_batch_norm_normalizes_each_chunk(running_var):
  x = _data((12, 5))
  state = jaxbn.init_state(5)
  y, new = jaxbn.batch_norm(x, state, training=True, virtual_batch_size=4,
                            momentum=0.0, running_var=running_var)
  chunks = x.reshape(3, 4, 5)
  for i in range(3):
    m, v, _ = np_moments(chunks[i], (1,))
    np.testing.assert_allclose(y[4 * i:4 * i + 4], np_normalize(chunks[i], m, v, None, None, (1,), 1e-5), **F32_TOL)
  stats = [np_moments(c, (1,)) for c in chunks]
  # The running variance averages each chunk's (unbiased: times 4/3) variance.
  correction = 4 / 3 if running_var == 'unbiased' else 1.0
  np.testing.assert_allclose(new.mean, np.mean([s[0] for s in stats], 0), **F32_TOL)
  np.testing.assert_allclose(new.var, correction * np.mean([s[1] for s in stats], 0), **F32_TOL)
  # One chunk is plain batch norm.
  y_full, s_full = jaxbn.batch_norm(x, state, training=True, virtual_batch_size=12)
  y_bn, s_bn = jaxbn.batch_norm(x, state, training=True)
  np.testing.assert_allclose(y_full, y_bn, **F32_TOL)
  np.testing.assert_allclose(s_full.var, s_bn.var, **F32_TOL)


@pytest.mark.parametrize('running_var', ['biased', 'unbiased'])
def test_masked_ghost_batch_norm_averages_the_chunks_with_data_equally(running_var):
  # Chunks with different numbers of valid entries count once each in the
  # running statistics (the plain average of the chunk statistics, not a
  # count-weighted one), and a chunk with no valid entry of a feature not at
  # all. Masked entries hold NaN.
  x = _data((12, 3), seed=7)
  mask = np.ones((12, 3), bool)
  mask[4:6, 0] = False           # chunk 1: 2 of 4 valid for feature 0
  mask[8:9, 1] = False           # chunk 2: 3 of 4 valid for feature 1
  mask[8:12, 2] = False          # chunk 2: no valid entry for feature 2
  poisoned = np.where(mask, x, np.nan).astype(np.float32)
  y, new = jaxbn.batch_norm(poisoned, jaxbn.init_state(3), training=True, mask=mask,
                            virtual_batch_size=4, momentum=0.0, running_var=running_var)
  means, variances, counts = zip(*(np_moments(x[4 * i:4 * i + 4], (1,), mask[4 * i:4 * i + 4])
                                   for i in range(3)))
  means, variances, counts = np.array(means), np.array(variances), np.array(counts)
  for i in range(3):
    rows = slice(4 * i, 4 * i + 4)
    ref = np_normalize(x[rows], means[i], variances[i], None, None, (1,), 1e-5)
    np.testing.assert_allclose(np.where(mask[rows], y[rows], 0), np.where(mask[rows], ref, 0),
                               **F32_TOL)
  if running_var == 'unbiased':
    variances = variances * counts / np.maximum(counts - 1, 1)
  has = counts > 0
  # Averages of two or three O(1) float32 values: F32_TOL is ample.
  np.testing.assert_allclose(new.mean, (means * has).sum(0) / has.sum(0), **F32_TOL)
  np.testing.assert_allclose(new.var, (variances * has).sum(0) / has.sum(0), **F32_TOL)


def test_ghost_batch_norm_errors():
  x = _data((10, 3))
  state = jaxbn.init_state(3)
  with pytest.raises(ValueError, match='not divisible by virtual_batch_size=4'):
    jaxbn.batch_norm(x, state, training=True, virtual_batch_size=4)
  with pytest.raises(ValueError, match='virtual_batch_size must be an int >= 2'):
    jaxbn.batch_norm(x, state, training=True, virtual_batch_size=1)
