"""The README's Python examples run, and do what their comments say."""

import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

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
  out = ns['bn'](jnp.arange(64.0).reshape(4, 16))
  assert out.shape == (4, 16)
