"""The train/ CNN step with Flax's max pool against ``train.pool``'s, and its layers.

The step is train's own (``train.models`` + ``train.steps``, jitted with
donation by ``steps.jit_steps``). Each variant replaces
``train.models._max_pool`` while the step is traced: the comparison is the
same whichever pool ``train/models.py`` uses.
"""

from __future__ import annotations

import time
from typing import Sequence
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import batches, timing
from train import models, pool, steps

IMAGE = (28, 28, 1)


def _flax_pool(x):
    return nnx.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")


# name: the 2x2 max pool the CNN runs
VARIANTS = {
    "nnx.max_pool": _flax_pool,
    "train.pool.max_pool": pool.max_pool,
}
REFERENCE = "nnx.max_pool"
# The variant python -m train runs (train/models.py builds it).
TRAIN_VARIANT = "train.pool.max_pool"


def batch_size(quick: bool) -> int:
    return 8 if quick else 128


def _normal(seed, shape):
    # NumPy draws: eager jax.random would compile a program per shape.
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


class Stepper:
    """Runs the donated train step, carrying the state; one call = one blocking step."""

    def __init__(self, variant: str, n: int):
        model = models.build_model("cnn", IMAGE, norm="batch", seed=0)
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
        with mock.patch.object(models, "_max_pool", VARIANTS[variant]):
            lowered = train_step.lower(self.state, self.batches[0])
        self.step = lowered.compile()
        self()
        self.first_step_seconds = time.perf_counter() - start

    def __call__(self):
        batch = self.batches[self.calls % batches.DISTINCT_BATCHES]
        self.calls += 1
        self.state, metrics = self.step(self.state, batch)
        jax.block_until_ready((self.state, metrics))


def run_steps(quick: bool, repeats: int, names: Sequence[str] | None = None) -> dict:
    """Per variant (default: all): median step seconds, images/s, first-step seconds,
    faults per step."""
    n = batch_size(quick)
    steppers = {name: Stepper(name, n) for name in (names or VARIANTS)}
    times = timing.medians(timing.interleave(steppers, repeats))
    return {name: {"step": times[name], "images_per_second": n / times[name],
                   "first_step": s.first_step_seconds, "faults_per_step": timing.faults_per_call(s)}
            for name, s in steppers.items()}


# --------------------------------------------------------------------------
# single layers


def _conv_case(x_shape, cout, wrt_input):
    """The CNN's convolution (``nnx.Conv``) forward and gradients, compiled as train's step is."""
    layer = nnx.Conv(x_shape[-1], cout, (3, 3), padding="SAME", use_bias=False,
                     rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)
    x = _normal(1, x_shape)
    g = _normal(2, x_shape[:-1] + (cout,))

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x) * g)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1) if wrt_input else 0),
                   compiler_options=steps.compiler_options(jax.default_backend()))
    return lambda: jax.block_until_ready(grad(params, x))


def _pool_case(pool, x_shape):
    x = jnp.maximum(_normal(1, x_shape), 0)  # ReLU outputs: many tied zeros
    g = _normal(2, (x_shape[0], x_shape[1] // 2, x_shape[2] // 2, x_shape[3]))
    grad = jax.jit(jax.grad(lambda x: jnp.sum(pool(x) * g)),
                   compiler_options=steps.compiler_options(jax.default_backend()))
    return lambda: jax.block_until_ready(grad(x))


def pool_cases(n: int) -> dict[str, dict]:
    """The CNN's two pools, forward and gradient as the step needs them."""
    return {f"pool{i} {n}x{side}x{side}x{c}, fwd + grad":
            {name: _pool_case(fn, (n, side, side, c)) for name, fn in VARIANTS.items()}
            for i, (side, c) in enumerate(((28, 32), (14, 64)), start=1)}


def run_pools(quick: bool, repeats: int) -> dict:
    return {case: timing.medians(timing.interleave(fns, repeats))
            for case, fns in pool_cases(batch_size(quick)).items()}


def pool_table(results: dict) -> str:
    rows = [[case, timing.ms(t[REFERENCE]), timing.ms(t[TRAIN_VARIANT]),
             f"{t[REFERENCE] / t[TRAIN_VARIANT]:.2f}x"] for case, t in results.items()]
    return timing.table(["layer (jit(grad))", REFERENCE, TRAIN_VARIANT, "speedup"], rows)


def run_torch_comparable_layers(quick: bool, repeats: int) -> dict:
    """The CNN's convolutions alone; PyTorch's worker times the same ``batches.CONV_LAYERS``."""
    n = batch_size(quick)
    fns = {name: _conv_case((n,) + shape, cout, wrt_input)
           for name, (shape, cout, wrt_input) in batches.CONV_LAYERS.items()}
    return {name: {"seconds": t} for name, t in timing.medians(timing.interleave(fns, repeats)).items()}
