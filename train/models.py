"""Models (Flax NNX, NHWC inputs) with a swappable normalization layer.

Every normalization goes through :func:`make_norm`, driven by the ``NORMS``
table: adding a kind of normalization is one entry there.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxbn.nnx import BatchNorm, BatchRenorm, GroupNorm, LayerNorm

# nnx.max_pool's 2x2 case: same outputs and gradients, and a gradient that
# XLA:CPU computes much faster.
from train.pool import max_pool

NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class NormOptions:
    momentum: float = 0.9
    epsilon: float = 1e-5
    virtual_batch_size: int = 16
    # Batch statistics across the devices of this mapped axis (data
    # parallel), optionally within groups of device indices only.
    axis_name: str | None = None
    axis_index_groups: tuple[tuple[int, ...], ...] | None = None

    def sync(self) -> dict:
        return {"axis_name": self.axis_name, "axis_index_groups": self.axis_index_groups}


class Identity(nnx.Module):
    def __call__(self, x):
        return x


def _group_count(features: int, preferred: int = 8) -> int:
    """The largest divisor of ``features`` that is at most ``preferred``."""
    return max(g for g in range(1, min(preferred, features) + 1) if features % g == 0)


def _batch(f, spatial, opts, rngs):
    return BatchNorm(f, momentum=opts.momentum, epsilon=opts.epsilon, **opts.sync(), rngs=rngs)


def _none(f, spatial, opts, rngs):
    return Identity()


def _layer(f, spatial, opts, rngs):
    # Layer norm in the original sense: statistics over all of a sample's
    # features, i.e. over H, W and C for conv activations.
    axes = (-3, -2, -1) if spatial else -1
    return LayerNorm(f, epsilon=opts.epsilon, reduction_axes=axes, feature_axes=-1, rngs=rngs)


def _group(f, spatial, opts, rngs):
    return GroupNorm(f, num_groups=_group_count(f), epsilon=opts.epsilon, rngs=rngs)


def _ghost(f, spatial, opts, rngs):
    return BatchNorm(f, momentum=opts.momentum, epsilon=opts.epsilon,
                     virtual_batch_size=opts.virtual_batch_size, **opts.sync(), rngs=rngs)


def _renorm(f, spatial, opts, rngs):
    return BatchRenorm(f, momentum=opts.momentum, epsilon=opts.epsilon, **opts.sync(),
                       rngs=rngs)


@dataclasses.dataclass(frozen=True)
class NormSpec:
    make: Callable  # (features, spatial, opts, rngs) -> module
    # Whether the layer has its own shift, making the preceding bias redundant.
    has_bias: bool
    # Whether the layer mixes examples of a batch (then batches must be >= 2).
    uses_batch: bool


NORMS: dict[str, NormSpec] = {
    "batch": NormSpec(_batch, has_bias=True, uses_batch=True),
    "none": NormSpec(_none, has_bias=False, uses_batch=False),
    "layer": NormSpec(_layer, has_bias=True, uses_batch=False),
    "group": NormSpec(_group, has_bias=True, uses_batch=False),
    "ghost": NormSpec(_ghost, has_bias=True, uses_batch=True),
    "renorm": NormSpec(_renorm, has_bias=True, uses_batch=True),
}


def make_norm(kind: str, features: int, *, spatial: bool, opts: NormOptions,
              rngs: nnx.Rngs) -> nnx.Module:
    """The normalization layer ``kind`` for ``features`` channels."""
    return NORMS[kind].make(features, spatial, opts, rngs)


def norm_implementation(kind: str) -> str:
    """Which class provides ``kind`` (for run summaries)."""
    if kind == "none":
        return "identity"
    module = NORMS[kind].make(4, False, NormOptions(), nnx.Rngs(0))
    return f"{type(module).__module__}.{type(module).__qualname__}"


# --------------------------------------------------------------------------
# building blocks


class ConvNormAct(nnx.Module):
    """conv 3x3 -> norm -> relu (the conv bias is dropped when the norm shifts)."""

    def __init__(self, cin, cout, *, norm, opts, rngs, stride=1, act=True):
        spec = NORMS[norm]
        self.conv = nnx.Conv(cin, cout, (3, 3), strides=stride, padding="SAME",
                             use_bias=not spec.has_bias, kernel_init=KERNEL_INIT, rngs=rngs)
        self.norm = make_norm(norm, cout, spatial=True, opts=opts, rngs=rngs)
        self.act = act

    def __call__(self, x):
        x = self.norm(self.conv(x))
        return jax.nn.relu(x) if self.act else x


class DenseNormAct(nnx.Module):
    def __init__(self, din, dout, *, norm, opts, rngs, activation=jax.nn.relu):
        spec = NORMS[norm]
        self.linear = nnx.Linear(din, dout, use_bias=not spec.has_bias,
                                 kernel_init=KERNEL_INIT, rngs=rngs)
        self.norm = make_norm(norm, dout, spatial=False, opts=opts, rngs=rngs)
        self.activation = activation

    def __call__(self, x):
        return self.activation(self.norm(self.linear(x)))


# LeCun uniform: the variance of flax's default (LeCun normal) without the
# truncated-normal sampler, which is slow to compile on CPU.
KERNEL_INIT = nnx.initializers.variance_scaling(1.0, "fan_in", "uniform")


def _max_pool(x):
    # 2x2, stride 2, 'SAME' padding so that odd sizes (7x7) still halve.
    return max_pool(x)


def _pooled(side: int, times: int) -> int:
    for _ in range(times):
        side = -(-side // 2)
    return side


class CNN(nnx.Module):
    """conv32-pool-conv64-pool-dense128-dense10, norm after every hidden layer."""

    def __init__(self, input_shape, *, norm="batch", opts=NormOptions(), rngs: nnx.Rngs,
                 channels=(32, 64), hidden=128):
        h, w, c = input_shape
        self.block1 = ConvNormAct(c, channels[0], norm=norm, opts=opts, rngs=rngs)
        self.block2 = ConvNormAct(channels[0], channels[1], norm=norm, opts=opts, rngs=rngs)
        flat = _pooled(h, 2) * _pooled(w, 2) * channels[1]
        self.dense = DenseNormAct(flat, hidden, norm=norm, opts=opts, rngs=rngs)
        self.head = nnx.Linear(hidden, NUM_CLASSES, kernel_init=KERNEL_INIT, rngs=rngs)

    def __call__(self, x):
        x = _max_pool(self.block1(x))
        x = _max_pool(self.block2(x))
        x = x.reshape(x.shape[0], -1)
        return self.head(self.dense(x))


ACTIVATIONS = {"relu": jax.nn.relu, "sigmoid": jax.nn.sigmoid, "tanh": jnp.tanh}


class MLP(nnx.Module):
    """``depth`` hidden layers of ``width`` units: linear -> norm -> activation."""

    def __init__(self, input_shape, *, norm="batch", opts=NormOptions(), rngs: nnx.Rngs,
                 depth=3, width=100, activation="sigmoid"):
        din = 1
        for d in input_shape:
            din *= d
        act = ACTIVATIONS[activation]
        layers = []
        for _ in range(depth):
            layers.append(DenseNormAct(din, width, norm=norm, opts=opts, rngs=rngs,
                                       activation=act))
            din = width
        self.layers = nnx.List(layers)
        self.head = nnx.Linear(din, NUM_CLASSES, kernel_init=KERNEL_INIT, rngs=rngs)

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class ResidualBlock(nnx.Module):
    """Basic block: two 3x3 convs; a 1x1 projection when the shape changes."""

    def __init__(self, cin, cout, stride, *, norm, opts, rngs):
        self.a = ConvNormAct(cin, cout, norm=norm, opts=opts, rngs=rngs, stride=stride)
        self.b = ConvNormAct(cout, cout, norm=norm, opts=opts, rngs=rngs, act=False)
        if stride != 1 or cin != cout:
            spec = NORMS[norm]
            self.proj = nnx.Conv(cin, cout, (1, 1), strides=stride, padding="SAME",
                                 use_bias=not spec.has_bias, kernel_init=KERNEL_INIT, rngs=rngs)
            self.proj_norm = make_norm(norm, cout, spatial=True, opts=opts, rngs=rngs)
        else:
            self.proj = None
            self.proj_norm = None

    def __call__(self, x):
        shortcut = x if self.proj is None else self.proj_norm(self.proj(x))
        return jax.nn.relu(self.b(self.a(x)) + shortcut)


class ResNet(nnx.Module):
    """Small ResNet: stem 16, stages 16/32/64 (strides 1/2/2), global pool."""

    def __init__(self, input_shape, *, norm="batch", opts=NormOptions(), rngs: nnx.Rngs,
                 widths=(16, 32, 64)):
        c = input_shape[-1]
        self.stem = ConvNormAct(c, widths[0], norm=norm, opts=opts, rngs=rngs)
        blocks, cin = [], widths[0]
        for i, cout in enumerate(widths):
            blocks.append(ResidualBlock(cin, cout, 1 if i == 0 else 2,
                                        norm=norm, opts=opts, rngs=rngs))
            cin = cout
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(cin, NUM_CLASSES, kernel_init=KERNEL_INIT, rngs=rngs)

    def __call__(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(axis=(1, 2)))


def _create(name, input_shape, norm, opts, mlp_depth, mlp_width, activation, seed):
    # The "rbg" generator: with the default threefry, XLA spends several
    # seconds compiling this one-off init program on CPU; rbg compiles in a
    # fraction of that. (Its bits differ between backends, which only
    # matters for comparing inits across CPU and GPU.)
    rngs = nnx.Rngs(params=jax.random.key(seed, impl="rbg"))
    if name == "cnn":
        return CNN(input_shape, norm=norm, opts=opts, rngs=rngs)
    if name == "mlp":
        return MLP(input_shape, norm=norm, opts=opts, rngs=rngs, depth=mlp_depth,
                   width=mlp_width, activation=activation)
    return ResNet(input_shape, norm=norm, opts=opts, rngs=rngs)


# Initialising under jit compiles one program per architecture (the seed is
# traced, so every seed reuses it); eagerly, every initializer of every
# distinct shape would be compiled on its own, which takes many seconds.
_create_jit = nnx.jit(_create, static_argnums=(0, 1, 2, 3, 4, 5, 6))


def build_model(name: str, input_shape, *, norm: str, seed: int, opts=NormOptions(),
                mlp_depth=3, mlp_width=100, activation="sigmoid") -> nnx.Module:
    """Model ``name`` ('cnn', 'mlp', 'resnet') initialised from ``seed``."""
    if name not in ("cnn", "mlp", "resnet"):
        raise ValueError(f"unknown model {name!r}; choose cnn, mlp or resnet")
    return _create_jit(name, tuple(input_shape), norm, opts, mlp_depth, mlp_width,
                       activation, np.uint32(seed))
