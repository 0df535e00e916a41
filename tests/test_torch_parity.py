"""Parity with PyTorch's BatchNorm over several training steps.

PyTorch's ``momentum=0.1`` weights the *new* batch by 0.1; jaxbn (like Flax
and Keras) weights the *old* value, so it is ``momentum=0.9`` here, and
``running_var='unbiased'`` stores the n/(n-1)-corrected variance as PyTorch.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn

torch = pytest.importorskip('torch')
torch.set_num_threads(1)

# float32 on both sides with different reduction orders: a few ulps per
# reduction over ~2e3 values, amplified at most by 1/std ~ 1.
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('torch_momentum', [0.1, 0.3, None])
def test_batchnorm2d_several_steps(torch_momentum):
  rng = np.random.default_rng(0)
  bn = torch.nn.BatchNorm2d(6, momentum=torch_momentum, eps=1e-5)
  with torch.no_grad():
    bn.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, 6).astype(np.float32)))
    bn.bias.copy_(torch.from_numpy(rng.standard_normal(6).astype(np.float32)))
  scale, bias = bn.weight.detach().numpy(), bn.bias.detach().numpy()
  momentum = None if torch_momentum is None else 1.0 - torch_momentum
  state = jaxbn.init_state(6)
  bn.train()
  for step in range(4):
    x = (rng.standard_normal((8, 6, 5, 5)) * (step + 1) + step).astype(np.float32)
    y_torch = bn(torch.from_numpy(x)).detach().numpy()
    y, state = jaxbn.batch_norm(x, state, scale, bias, training=True, axis=1,
                                momentum=momentum, running_var='unbiased')
    np.testing.assert_allclose(y, y_torch, **TOL)
    np.testing.assert_allclose(state.mean, bn.running_mean.numpy(), **TOL)
    np.testing.assert_allclose(state.var, bn.running_var.numpy(), **TOL)
    assert int(state.count) == int(bn.num_batches_tracked)
  bn.eval()
  x = rng.standard_normal((3, 6, 5, 5)).astype(np.float32)
  y, _ = jaxbn.batch_norm(x, state, scale, bias, training=False, axis=1)
  np.testing.assert_allclose(y, bn(torch.from_numpy(x)).detach().numpy(), **TOL)


def test_functional_batch_norm_and_gradients():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((16, 4)).astype(np.float32) * 3 + 2
  w = rng.uniform(0.5, 1.5, 4).astype(np.float32)
  b = rng.standard_normal(4).astype(np.float32)
  g = rng.standard_normal((16, 4)).astype(np.float32)
  tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
  rm, rv = torch.zeros(4), torch.ones(4)
  ty = torch.nn.functional.batch_norm(tx, rm, rv, tw, tb, training=True,
                                      momentum=0.1, eps=1e-5)
  (ty * torch.from_numpy(g)).sum().backward()

  import jax

  def loss(x, w, b):
    y, s = jaxbn.batch_norm(x, jaxbn.init_state(4), w, b, training=True,
                            momentum=0.9, running_var='unbiased')
    return jnp.sum(y * g), (y, s)

  grads, (y, s) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(x, w, b)
  np.testing.assert_allclose(y, ty.detach().numpy(), **TOL)
  np.testing.assert_allclose(s.mean, rm.numpy(), **TOL)
  np.testing.assert_allclose(s.var, rv.numpy(), **TOL)
  for ours, theirs in zip(grads, (tx.grad, tw.grad, tb.grad)):
    np.testing.assert_allclose(ours, theirs.numpy(), **TOL)
