"""The CNN benchmark's inputs and layer shapes, as NumPy arrays (imports no framework).

Both workers cycle through the same ``DISTINCT_BATCHES`` batches: one batch
repeated lets the model fit it, and the shrinking gradients (denormals on
CPU) then time something that training never sees.
"""

from __future__ import annotations

import numpy as np

DISTINCT_BATCHES = 8
IMAGE = (28, 28, 1)
NUM_CLASSES = 10


def cnn_batch(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 28, 28, 1) float32 N(0, 1) images and int32 labels, from ``seed``."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n,) + IMAGE, np.float32),
            rng.integers(0, NUM_CLASSES, n).astype(np.int32))


def cnn_batches(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [cnn_batch(seed, n) for seed in range(1, DISTINCT_BATCHES + 1)]


# The CNN's convolutions (NHWC input without the batch, output channels,
# whether the input gradient is needed: not for the first layer), timed
# alone in both frameworks.
CONV_LAYERS = {
    "conv1 fwd + kernel grad": ((28, 28, 1), 32, False),
    "conv2 fwd + kernel and input grads": ((14, 14, 32), 64, True),
}
GEMM = "conv2's kernel grad as one matmul"


def gemm_shape(n: int) -> tuple[int, int, int]:
    """(M, K, N) of conv2's kernel gradient as im2col patches^T @ dy."""
    (h, w, cin), cout, _ = CONV_LAYERS["conv2 fwd + kernel and input grads"]
    return 9 * cin, n * h * w, cout


def layer_input(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, np.float32)
