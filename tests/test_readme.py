"""The README's Python examples run, and do what their comments say."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

README = Path(__file__).resolve().parents[1] / 'README.md'


def _examples():
  return re.findall(r'```python\n(.*?)```', README.read_text(), re.S)


def test_readme_examples_run_and_do_what_they_say():
  functional, flax_swap = _examples()
  ns = {}
  exec(functional, ns)
  # Training: normalized with the batch statistics of data centred at 1e4.
  y = np.asarray(ns['y'], np.float64)
  np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0.0, atol=1e-3)
  np.testing.assert_allclose(y.std(axis=(0, 1, 2)), 1.0, atol=1e-3)
  assert int(ns['state'].count) == 1
  np.testing.assert_allclose(ns['state'].mean, 0.01 * np.asarray(ns['x']).mean(axis=(0, 1, 2)),
                             rtol=1e-5)
  ns = {}
  exec(flax_swap, ns)
  # "same arguments, variables, outputs" as Flax's BatchNorm.
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 16)) * 2 + 1, jnp.float32)
  theirs = nnx.BatchNorm(16, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(ns["bn"](x), theirs(x), rtol=1e-5, atol=1e-5)  # float32, O(1) values
  assert (jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(ns['bn']))) ==
          jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(theirs))))
