"""Invariants of batch normalization on random shapes, axes and data."""

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

import jaxbn

# Outputs are O(1); inputs are well-conditioned (std >= 0.5 per feature), so
# float32 agreement within 1e-4 leaves room for reordered reductions.
TOL = dict(rtol=1e-4, atol=1e-4)


@st.composite
def batches(draw):
  ndim = draw(st.integers(2, 4))
  shape = tuple(draw(st.lists(st.integers(2, 5), min_size=ndim, max_size=ndim)))
  axis = draw(st.integers(-ndim, ndim - 1))
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape) * rng.uniform(0.5, 3.0) + rng.uniform(-5, 5)
  return x.astype(np.float32), axis, rng


def _feature_shape(x, axis):
  return [d if i == axis % x.ndim else 1 for i, d in enumerate(x.shape)]


def _bn(x, axis, mask=None):
  state = jaxbn.init_state(x.shape[axis])
  return jaxbn.batch_norm(jnp.asarray(x), state, training=True, axis=axis, mask=mask)


@settings(max_examples=15, deadline=None)
@given(batches())
def test_invariant_to_per_feature_shift_and_positive_scale(case):
  x, axis, rng = case
  shape = _feature_shape(x, axis)
  shift = rng.uniform(-100, 100, shape).astype(np.float32)
  scale = rng.uniform(0.5, 4.0, shape).astype(np.float32)
  y, _ = _bn(x, axis)
  # epsilon breaks exact scale invariance: compare with epsilon scaled too.
  y2, _ = jaxbn.batch_norm(jnp.asarray(x * scale + shift), jaxbn.init_state(x.shape[axis]),
                           training=True, axis=axis, epsilon=0.0)
  y1, _ = jaxbn.batch_norm(jnp.asarray(x), jaxbn.init_state(x.shape[axis]),
                           training=True, axis=axis, epsilon=0.0)
  # Rounding ``x * scale + shift`` to float32 moves each input by up to
  # eps * |x * scale + shift|, i.e. by that over ``scale * std`` in the
  # output: large when a few samples happen to lie close together.
  reduced = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
  std = x.std(axis=reduced, keepdims=True, dtype=np.float64)
  rounding = np.finfo(np.float32).eps * np.max(
      np.abs(x * scale + shift), axis=reduced, keepdims=True) / (scale * std)
  assert np.all(np.abs(np.asarray(y2) - np.asarray(y1)) <= TOL['atol'] + 4 * rounding)
  assert y.shape == x.shape


@settings(max_examples=15, deadline=None)
@given(batches())
def test_equivariant_to_batch_permutation(case):
  x, axis, rng = case
  reduced = [i for i in range(x.ndim) if i != axis % x.ndim][0]
  perm = rng.permutation(x.shape[reduced])
  y, s = _bn(x, axis)
  yp, sp = _bn(np.take(x, perm, axis=reduced), axis)
  np.testing.assert_allclose(yp, np.take(np.asarray(y), perm, axis=reduced), **TOL)
  np.testing.assert_allclose(sp.mean, s.mean, **TOL)
  np.testing.assert_allclose(sp.var, s.var, **TOL)


@settings(max_examples=15, deadline=None)
@given(batches())
def test_mask_equals_dropping_masked_rows(case):
  x, axis, rng = case
  axis = axis % x.ndim
  batch_axis = 0 if axis != 0 else 1
  n = x.shape[batch_axis]
  keep = rng.random(n) < 0.6
  keep[:2] = True  # at least two rows remain
  mshape = [1] * x.ndim
  mshape[batch_axis] = n
  mask = keep.reshape(mshape)
  poisoned = np.where(mask, x, np.nan).astype(np.float32)
  y, s = _bn(poisoned, axis, mask=mask)
  y_ref, s_ref = _bn(np.compress(keep, x, axis=batch_axis), axis)
  np.testing.assert_allclose(np.compress(keep, np.asarray(y), axis=batch_axis), y_ref, **TOL)
  np.testing.assert_allclose(s.mean, s_ref.mean, **TOL)
  np.testing.assert_allclose(s.var, s_ref.var, **TOL)
