"""The functional core against flax.linen.BatchNorm on well-conditioned data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jaxbn

# Same float32 inputs, different reduction algorithms: agreement to a few
# ulps of the O(1) outputs and statistics.
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('axis', [-1, 1, (1, 2)])
@pytest.mark.parametrize('use_fast_variance', [True, False])
def test_matches_linen_batchnorm_over_steps(axis, use_fast_variance):
  rng = np.random.default_rng(0)
  shape = (8, 3, 4, 5)
  bn = nn.BatchNorm(axis=axis, momentum=0.8,
                    use_fast_variance=use_fast_variance)
  variables = bn.init(jax.random.key(0), jnp.zeros(shape), use_running_average=True)
  params = jax.tree.map(
      lambda p: jnp.asarray(rng.uniform(0.5, 1.5, p.shape), p.dtype), variables['params'])
  stats = variables['batch_stats']
  axes = (axis,) if isinstance(axis, int) else axis
  fshape = tuple(shape[a] for a in axes)
  state = jaxbn.init_state(fshape if len(fshape) > 1 else fshape[0])
  for step in range(3):
    x = jnp.asarray(rng.standard_normal(shape) * 2 + 1, jnp.float32)
    y_flax, upd = bn.apply({'params': params, 'batch_stats': stats}, x,
                           use_running_average=False, mutable=['batch_stats'])
    stats = upd['batch_stats']
    y, state = jaxbn.batch_norm(x, state, params['scale'], params['bias'],
                                training=True, axis=axis, momentum=0.8)
    np.testing.assert_allclose(y, y_flax, **TOL)
    np.testing.assert_allclose(state.mean, stats['mean'], **TOL)
    np.testing.assert_allclose(state.var, stats['var'], **TOL)
  y_flax = bn.apply({'params': params, 'batch_stats': stats}, x, use_running_average=True)
  y, _ = jaxbn.batch_norm(x, state, params['scale'], params['bias'],
                          training=False, axis=axis)
  np.testing.assert_allclose(y, y_flax, **TOL)


def test_mask_matches_linen():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((10, 6)), jnp.float32)
  mask = jnp.asarray(rng.random((10, 6)) > 0.3)
  bn = nn.BatchNorm(use_running_average=False, momentum=0.5)
  variables = bn.init(jax.random.key(0), x)
  y_flax, upd = bn.apply(variables, x, mask=mask, mutable=['batch_stats'])
  y, state = jaxbn.batch_norm(x, jaxbn.init_state(6), training=True, momentum=0.5, mask=mask)
  np.testing.assert_allclose(y, y_flax, **TOL)
  np.testing.assert_allclose(state.var, upd['batch_stats']['var'], **TOL)
