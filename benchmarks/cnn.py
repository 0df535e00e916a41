"""The train/ CNN step with Flax's conv and pool against ``train.conv``'s.

The step is train's own (``train.models`` + ``train.steps``, jitted with
donation by ``steps.jit_steps``). In the variants every ``nnx.Conv`` of the
built model is replaced by a ``train.conv.Conv`` holding the same parameters
(which is also what ``train.conv.Conv`` would have initialised from the same
seed), and ``train.models._max_pool`` is replaced while the step is traced:
each variant is the model ``train/models.py`` would run after switching.
"""

from __future__ import annotations

import contextlib
import functools
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import timing
from train import conv, models, steps

IMAGE = (28, 28, 1)
VARIANTS = {
    "flax": {"swap_conv": False, "swap_pool": False},
    "train.conv.Conv": {"swap_conv": True, "swap_pool": False},
    "Conv + max_pool": {"swap_conv": True, "swap_pool": True},
}
REFERENCE = "flax"


def batch_size(quick: bool) -> int:
    return 8 if quick else 128


def with_train_convs(model: nnx.Module) -> nnx.Module:
    """``model`` with each ``nnx.Conv`` replaced by a ``train.conv.Conv`` of the same parameters."""
    for path, node in list(nnx.iter_graph(model)):
        if type(node) is nnx.Conv:
            parent = functools.reduce(_child, path[:-1], model)
            _set_child(parent, path[-1], _converted(node))
    return model


def _converted(layer: nnx.Conv) -> conv.Conv:
    bias = layer.bias
    return conv.Conv(layer.in_features, layer.out_features, layer.kernel_size, layer.strides,
                     padding=layer.padding, use_bias=layer.use_bias, dtype=layer.dtype,
                     param_dtype=layer.param_dtype,
                     kernel_init=lambda *_: layer.kernel[...],
                     bias_init=lambda *_: bias[...], rngs=nnx.Rngs(0))


def _child(node, key):
    return node[key] if isinstance(key, int) else getattr(node, key)


def _set_child(node, key, value):
    if isinstance(key, int):
        node[key] = value
    else:
        setattr(node, key, value)


def pool_swapped(swap_pool: bool):
    """A context in which tracing train.models' CNN uses train.conv.max_pool."""
    if swap_pool:
        return mock.patch.object(models, "_max_pool", conv.max_pool)
    return contextlib.nullcontext()


def _normal(seed, shape):
    # NumPy draws: eager jax.random would compile a program per shape.
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _batch(n: int):
    return _normal(1, (n,) + IMAGE), jnp.arange(n, dtype=jnp.int32) % models.NUM_CLASSES


class Stepper:
    """Runs the donated train step, carrying the state; one call = one blocking step."""

    def __init__(self, variant: str, n: int):
        options = VARIANTS[variant]
        model = models.build_model("cnn", IMAGE, norm="batch", seed=0)
        if options["swap_conv"]:
            model = with_train_convs(model)
        graphdefs, params, model_state = steps.split_model(model)
        schedule = steps.make_schedule("cosine", 2e-3, 1000)
        tx = steps.make_optimizer("adam", schedule)
        self.state = steps.init_state(params, model_state, tx, 0)
        train_step, _ = steps.jit_steps(steps.make_train_step(graphdefs.train, tx, schedule),
                                        steps.make_eval_step(graphdefs.eval), None)
        self.batch = _batch(n)
        start = time.perf_counter()
        with pool_swapped(options["swap_pool"]):  # the pool is looked up while tracing
            lowered = train_step.lower(self.state, self.batch)
        self.step = lowered.compile()
        self()
        self.first_step_seconds = time.perf_counter() - start

    def __call__(self):
        self.state, metrics = self.step(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))


def variants(quick: bool) -> tuple[str, ...]:
    # Every variant compiles for several seconds: quick runs keep the two ends.
    return (REFERENCE, "Conv + max_pool") if quick else tuple(VARIANTS)


def run_steps(quick: bool, repeats: int) -> dict:
    """Per variant: median step seconds, images/s, first-step seconds, faults per step."""
    n = batch_size(quick)
    steppers = {name: Stepper(name, n) for name in variants(quick)}
    times = timing.medians(timing.interleave(steppers, repeats))
    return {name: {"step": times[name], "images_per_second": n / times[name],
                   "first_step": s.first_step_seconds, "faults_per_step": timing.faults_per_call(s)}
            for name, s in steppers.items()}


# --------------------------------------------------------------------------
# single layers


def _conv_case(module_cls, x_shape, cout, wrt_input):
    layer = module_cls(x_shape[-1], cout, (3, 3), padding="SAME", use_bias=False,
                       rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)
    x = _normal(1, x_shape)
    g = _normal(2, x_shape[:-1] + (cout,))

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x) * g)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1) if wrt_input else 0))
    return lambda: jax.block_until_ready(grad(params, x))


def _pool_case(pool, x_shape):
    x = jnp.maximum(_normal(1, x_shape), 0)  # ReLU outputs: many tied zeros
    g = _normal(2, (x_shape[0], x_shape[1] // 2, x_shape[2] // 2, x_shape[3]))
    grad = jax.jit(jax.grad(lambda x: jnp.sum(pool(x) * g)))
    return lambda: jax.block_until_ready(grad(x))


def _flax_pool(x):
    return nnx.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")


def layer_cases(n: int) -> dict[str, dict]:
    """The CNN's two convs (fwd+bwd as the step needs them) and two pools (bwd)."""
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
    }


def run_layers(quick: bool, repeats: int) -> dict:
    return {case: timing.medians(timing.interleave(fns, repeats))
            for case, fns in layer_cases(batch_size(quick)).items()}


def layer_table(results: dict) -> str:
    rows = [[case, timing.ms(t["flax"]), timing.ms(t["train.conv"]),
             f"{t['flax'] / t['train.conv']:.2f}x"] for case, t in results.items()]
    return timing.table(["layer (jit(grad))", "flax", "train.conv", "speedup"], rows)
