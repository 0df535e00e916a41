"""Independent float64 NumPy reference for batch normalization."""

import numpy as np


def np_moments(x, feature_axes, mask=None):
  """Per-feature mean, biased variance and count in float64."""
  x = np.asarray(x)
  x = x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)
  red = tuple(i for i in range(x.ndim) if i not in feature_axes)
  if mask is None:
    mask = np.ones(x.shape, bool)
  mask = np.broadcast_to(mask, x.shape)
  xz = np.where(mask, x, 0)
  n = mask.sum(axis=red).astype(np.float64)
  mean = xz.sum(axis=red) / np.maximum(n, 1)
  d = np.where(mask, x - np.expand_dims(mean, red), 0)
  var = (np.abs(d) ** 2).sum(axis=red) / np.maximum(n, 1)
  return mean, var, n


def np_normalize(x, mean, var, scale, bias, feature_axes, epsilon):
  x = np.asarray(x, np.float64)
  shape = [d if i in feature_axes else 1 for i, d in enumerate(x.shape)]
  y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + epsilon)
  if scale is not None:
    y = y * np.asarray(scale, np.float64).reshape(shape)
  if bias is not None:
    y = y + np.asarray(bias, np.float64).reshape(shape)
  return y


def bfloat16_ulps(y, ref):
  """|y - ref| in units of bfloat16's spacing at |ref| (at least that at 1/16).

  A result computed in float32 and rounded once to bfloat16 is within 0.5
  ulp (plus float32's ~2^-16 ulp); arithmetic that rounds to bfloat16 after
  each operation is not. The floor at 1/16 keeps the float32 rounding of
  terms of size ~1 out of results that cancel to nearly zero.
  """
  ref = np.asarray(ref, np.float64)
  magnitude = np.maximum(np.abs(ref), 1.0 / 16)
  spacing = 2.0 ** (np.floor(np.log2(magnitude)) - 7)
  return np.abs(np.asarray(y, np.float64) - ref) / spacing


def np_batch_norm_train(x, run_mean, run_var, count, scale=None, bias=None, *,
                        feature_axes=(-1,), momentum=0.99, epsilon=1e-5,
                        mask=None, running_var='biased'):
  """One training step: returns y and the new (mean, var, count)."""
  x = np.asarray(x)
  feature_axes = tuple(a % x.ndim for a in feature_axes)
  mean, var, n = np_moments(x, feature_axes, mask)
  y = np_normalize(x, mean, var, scale, bias, feature_axes, epsilon)
  est = var * n / np.maximum(n - 1, 1) if running_var == 'unbiased' else var
  keep = 1 - 1 / (count + 1) if momentum is None else momentum
  has = n > 0
  new_mean = np.where(has, keep * run_mean + (1 - keep) * mean, run_mean)
  new_var = np.where(has, keep * run_var + (1 - keep) * est, run_var)
  return y, new_mean, new_var, count + 1


def cancelling_dx_case(dtype, shape, reduction_axes, epsilon, seed=1):
  """``(x, g, error)``: a normalization input and cotangent whose dx terms nearly cancel.

  dx = (g - mean(g) - x_hat * mean(g * x_hat)) / std over ``reduction_axes``:
  with g close to a + b * x_hat the three terms nearly cancel, so rounding
  them to the input dtype apart (what autodiff does when the statistics and
  the normalization widen x separately) leaves errors the size of the terms.
  ``x`` and ``g`` hold values of ``dtype`` (a NumPy or ml_dtypes dtype), ``g``
  as float32; ``error(dx)`` is the largest deviation of ``dx`` (of the loss
  ``sum(g * normalize(x))``) from float64, relative to max |dx|.
  """
  rng = np.random.default_rng(seed)
  x = (5.0 + 2.0 * rng.standard_normal(shape)).astype(np.float32).astype(dtype)
  xs = x.astype(np.float64)
  g = (3.0 + (xs - 5.0) + 0.05 * rng.standard_normal(shape)).astype(dtype).astype(np.float32)
  mean, var = xs.mean(reduction_axes, keepdims=True), xs.var(reduction_axes, keepdims=True)
  x_hat = (xs - mean) / np.sqrt(var + epsilon)
  g64 = g.astype(np.float64)
  ref = (g64 - g64.mean(reduction_axes, keepdims=True)
         - x_hat * (g64 * x_hat).mean(reduction_axes, keepdims=True)) / np.sqrt(var + epsilon)
  error = lambda dx: np.abs(np.asarray(dx, np.float64) - ref).max() / np.abs(ref).max()
  return x, g, error
