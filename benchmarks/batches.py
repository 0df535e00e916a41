"""Shapes and inputs both workers share: BN tensors, the CNN's batches and layers (no framework).

Both workers cycle through the same ``DISTINCT_BATCHES`` batches: one batch
repeated lets the model fit it, and the shrinking gradients (denormals on
CPU) then time something that training never sees.

The CNN's batches are images, not noise: PyTorch's NCHW max pool branches on
its data, and its train step took 72 ms on N(0, 1) images against 52 ms on
MNIST batches (one process, interleaved; channels_last and JAX's step
unchanged). scikit-learn's digits enlarged to MNIST's format ran at MNIST's
52 ms, and need no download.
"""

from __future__ import annotations

import functools

import numpy as np

from train import data

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


@functools.lru_cache(maxsize=1)
def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's training digits in MNIST's format: (n, 28, 28, 1) float32, labels.

    Each 8x8 digit is enlarged 3x to 24x24 and centred on a blank 28x28
    field (MNIST centres 20x20 digits so), then standardized as train
    standardizes MNIST.
    """
    digits = data.load_digits()
    big = digits.x_train.repeat(3, axis=1).repeat(3, axis=2)
    margin = (IMAGE[0] - big.shape[1]) // 2
    # Standardized, a blank pixel is the smallest value.
    x = np.pad(big, ((0, 0), (margin, margin), (margin, margin), (0, 0)), constant_values=big.min())
    return ((x - x.mean()) / x.std()).astype(np.float32), digits.y_train


def cnn_batch(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` distinct (28, 28, 1) float32 digit images and their int32 labels, drawn by ``seed``."""
    x, y = digit_images()
    pick = np.random.default_rng(seed).choice(len(x), n, replace=False)
    return x[pick], y[pick]


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
