"""The train/ CNN step with Flax's conv and pool against ``train.conv``'s.

The step is train's own (``train.models`` + ``train.steps``, jitted with
donation by ``steps.jit_steps``). Each variant takes the model train builds,
replaces every convolution by the variant's class holding the same
parameters, and replaces ``train.models._max_pool`` while the step is
traced: the comparison is the same whichever ones ``train/models.py`` uses.
"""

from __future__ import annotations

import functools
import time
from typing import Sequence
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import batches, timing
from train import conv, models, steps

IMAGE = (28, 28, 1)


def _flax_pool(x):
    return nnx.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")


# name: (convolution class, 2x2 max pool)
VARIANTS = {
    "flax": (nnx.Conv, _flax_pool),
    "train.conv.Conv": (conv.Conv, _flax_pool),
    "Conv + max_pool": (conv.Conv, conv.max_pool),
}
REFERENCE = "flax"
# The variant python -m train runs (train/models.py builds it).
TRAIN_VARIANT = "Conv + max_pool"
CONVS = (nnx.Conv, conv.Conv)


def batch_size(quick: bool) -> int:
    return 8 if quick else 128


def with_convs(model: nnx.Module, cls) -> nnx.Module:
    """``model`` with every convolution replaced by a ``cls`` of the same parameters."""
    for path, node in list(nnx.iter_graph(model)):
        if type(node) in CONVS:
            parent = functools.reduce(_child, path[:-1], model)
            _set_child(parent, path[-1], _converted(node, cls))
    return model


def _converted(layer, cls):
    kernel = layer.kernel[...]
    bias = layer.bias
    return cls(kernel.shape[-2], kernel.shape[-1], kernel.shape[:-2], layer.strides,
               padding=layer.padding, use_bias=bias is not None, dtype=layer.dtype,
               param_dtype=kernel.dtype, kernel_init=lambda *_: kernel,
               bias_init=lambda *_: bias[...], rngs=nnx.Rngs(0))


def _child(node, key):
    return node[key] if isinstance(key, int) else getattr(node, key)


def _set_child(node, key, value):
    if isinstance(key, int):
        node[key] = value
    else:
        setattr(node, key, value)


def _normal(seed, shape):
    # NumPy draws: eager jax.random would compile a program per shape.
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


class Stepper:
    """Runs the donated train step, carrying the state; one call = one blocking step."""

    def __init__(self, variant: str, n: int):
        conv_cls, pool = VARIANTS[variant]
        model = with_convs(models.build_model("cnn", IMAGE, norm="batch", seed=0), conv_cls)
        graphdefs, params, model_state = steps.split_model(model)
        schedule = steps.make_schedule("cosine", 2e-3, 1000)
        tx = steps.make_optimizer("adam", schedule)
        self.state = steps.init_state(params, model_state, tx, 0)
        train_step, _ = steps.jit_steps(steps.make_train_step(graphdefs.train, tx, schedule),
                                        steps.make_eval_step(graphdefs.eval), None)
        self.batches = [jax.device_put(b) for b in batches.cnn_batches(n)]
        self.calls = 0
        start = time.perf_counter()
        # The CNN looks its pool up while being traced.
        with mock.patch.object(models, "_max_pool", pool):
            lowered = train_step.lower(self.state, self.batches[0])
        self.step = lowered.compile()
        self()
        self.first_step_seconds = time.perf_counter() - start

    def __call__(self):
        batch = self.batches[self.calls % batches.DISTINCT_BATCHES]
        self.calls += 1
        self.state, metrics = self.step(self.state, batch)
        jax.block_until_ready((self.state, metrics))


def variants(quick: bool) -> tuple[str, ...]:
    # Every variant compiles for several seconds: quick runs keep the two ends.
    return (REFERENCE, TRAIN_VARIANT) if quick else tuple(VARIANTS)


def run_steps(quick: bool, repeats: int, names: Sequence[str] | None = None) -> dict:
    """Per variant (default: all): median step seconds, images/s, first-step seconds,
    faults per step."""
    n = batch_size(quick)
    steppers = {name: Stepper(name, n) for name in (names or variants(quick))}
    times = timing.medians(timing.interleave(steppers, repeats))
    return {name: {"step": times[name], "images_per_second": n / times[name],
                   "first_step": s.first_step_seconds, "faults_per_step": timing.faults_per_call(s)}
            for name, s in steppers.items()}


# --------------------------------------------------------------------------
# single layers


def _conv_case(module_cls, x_shape, cout, wrt_input, compiler_options=None):
    layer = module_cls(x_shape[-1], cout, (3, 3), padding="SAME", use_bias=False,
                       rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)
    x = _normal(1, x_shape)
    g = _normal(2, x_shape[:-1] + (cout,))

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x) * g)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1) if wrt_input else 0),
                   compiler_options=compiler_options)
    return lambda: jax.block_until_ready(grad(params, x))


def _pool_case(pool, x_shape):
    x = jnp.maximum(_normal(1, x_shape), 0)  # ReLU outputs: many tied zeros
    g = _normal(2, (x_shape[0], x_shape[1] // 2, x_shape[2] // 2, x_shape[3]))
    grad = jax.jit(jax.grad(lambda x: jnp.sum(pool(x) * g)))
    return lambda: jax.block_until_ready(grad(x))


def _kernel_grad_case(x_shape, cout, im2col: bool):
    x, g = _normal(1, x_shape), _normal(2, x_shape[:-1] + (cout,))
    kernel = jnp.zeros((3, 3, x_shape[-1], cout))
    pads = ((1, 1), (1, 1))
    if im2col:
        fn = jax.jit(lambda x, g: conv.kernel_grad(x, g, (3, 3), (1, 1), pads))
    else:
        fn = jax.jit(lambda x, g: conv.xla_kernel_grad(x, g, kernel, (1, 1), pads))
    return lambda: jax.block_until_ready(fn(x, g))


def layer_cases(n: int) -> dict[str, dict]:
    """The CNN's two convs (fwd+bwd as the step needs them) and two pools (bwd).

    train.conv picks its kernel gradient per platform (im2col on CPU, XLA's
    elsewhere); the last row times both ways of conv2's kernel gradient.
    """
    return {
        f"conv1 {n}x28x28x1->32, fwd + kernel grad": {
            "flax": _conv_case(nnx.Conv, (n, 28, 28, 1), 32, False),
            "train.conv": _conv_case(conv.Conv, (n, 28, 28, 1), 32, False)},
        f"conv2 {n}x14x14x32->64, fwd + kernel and input grads": {
            "flax": _conv_case(nnx.Conv, (n, 14, 14, 32), 64, True),
            "train.conv": _conv_case(conv.Conv, (n, 14, 14, 32), 64, True)},
        f"pool1 {n}x28x28x32, fwd + grad": {
            "flax": _pool_case(_flax_pool, (n, 28, 28, 32)),
            "train.conv": _pool_case(conv.max_pool, (n, 28, 28, 32))},
        f"pool2 {n}x14x14x64, fwd + grad": {
            "flax": _pool_case(_flax_pool, (n, 14, 14, 64)),
            "train.conv": _pool_case(conv.max_pool, (n, 14, 14, 64))},
        "conv2 kernel grad alone: XLA's (flax column) vs im2col": {
            "flax": _kernel_grad_case((n, 14, 14, 32), 64, im2col=False),
            "train.conv": _kernel_grad_case((n, 14, 14, 32), 64, im2col=True)},
    }


def run_layers(quick: bool, repeats: int) -> dict:
    return {case: timing.medians(timing.interleave(fns, repeats))
            for case, fns in layer_cases(batch_size(quick)).items()}


def layer_table(results: dict) -> str:
    rows = [[case, timing.ms(t["flax"]), timing.ms(t["train.conv"]),
             f"{t['flax'] / t['train.conv']:.2f}x"] for case, t in results.items()]
    return timing.table(["layer (jit(grad))", "flax", "train.conv", "speedup"], rows)


def run_torch_comparable_layers(quick: bool, repeats: int) -> dict:
    """train.conv's convolutions and a plain matmul, compiled as train's step is.

    PyTorch's worker times the same layers (``batches.CONV_LAYERS``) and
    matmul, so the step's gap can be placed layer by layer.
    """
    n = batch_size(quick)
    options = steps.CPU_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
    fns = {name: _conv_case(conv.Conv, (n,) + shape, cout, wrt_input, options)
           for name, (shape, cout, wrt_input) in batches.CONV_LAYERS.items()}
    m, k, n_out = batches.gemm_shape(n)
    a, b = (jnp.asarray(batches.layer_input(s, shape)) for s, shape in ((1, (m, k)), (2, (k, n_out))))
    matmul = jax.jit(jnp.matmul, compiler_options=options)
    fns[batches.GEMM] = lambda: jax.block_until_ready(matmul(a, b))
    return {name: {"seconds": t} for name, t in timing.medians(timing.interleave(fns, repeats)).items()}
