"""Shapes and inputs both workers share: BN tensors, the CNN's batches and layers (no framework).

Both workers cycle through the same ``DISTINCT_BATCHES`` batches: one batch
repeated lets the model fit it, and the shrinking gradients (denormals on
CPU) then time something that training never sees.
"""

from __future__ import annotations

import numpy as np

DISTINCT_BATCHES = 8

# The NHWC batch norm input both frameworks are compared on. On a GPU the
# CPU's 33 MB tensor takes microseconds (launch overhead, not memory), so
# GPUs get a large activation (822 MB in float32), a ResNet stage's shape.
BN_SHAPES = {"quick": (8, 8, 8, 16), "cpu": (128, 32, 32, 64), "gpu": (256, 56, 56, 256)}


def bn_shape(quick: bool, backend: str) -> tuple[int, int, int, int]:
    """(N, H, W, C) of the compared batch norm input on ``backend`` ('cpu', 'gpu', ...)."""
    if quick:
        return BN_SHAPES["quick"]
    return BN_SHAPES["cpu" if backend == "cpu" else "gpu"]


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
# alone in both frameworks; conv2 also without its input gradient, to tell
# its two gradients apart.
CONV_LAYERS = {
    "conv1 fwd + kernel grad": ((28, 28, 1), 32, False),
    "conv2 fwd + kernel and input grads": ((14, 14, 32), 64, True),
    "conv2 fwd + kernel grad": ((14, 14, 32), 64, False),
}
