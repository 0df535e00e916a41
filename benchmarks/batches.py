"""The CNN benchmark's input batches, as NumPy arrays (imports no framework).

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
