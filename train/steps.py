"""Pure training and evaluation steps over an explicit TrainState pytree.

The model lives as ``nnx.split`` pieces: a static graphdef (captured by the
step functions) and two states, trainable ``params`` and everything else
(``model_state``: batch-norm running statistics). Steps are pure functions
of ``(state, batch)`` so they jit, donate and shard like any jax function.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# The mesh axis the batch is split over, and the axis name batch norms sync on.
DATA_AXIS = "data"

# XLA:CPU hands only dots and reductions to its YNNPACK library kernels. By
# default it also hands over convolutions, which its own kernels compute
# faster on the CNN's shapes (the kernel gradient of the CNN's second
# convolution: 10 ms against 41 ms); elementwise library fusions split chains
# (normalize, ReLU, pool) that its loop fusions do in one pass. The CNN step
# took 1.9x as long with the default and 1.2x with elementwise library
# fusions. Results stay identical from call to call, so resumes stay
# bit-for-bit.
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}


def compiler_options(platform: str) -> dict | None:
    """The XLA options train's steps compile with on ``platform`` ('cpu', 'gpu', ...)."""
    return CPU_COMPILER_OPTIONS if platform == "cpu" else None


def use_compile_cache(setting: str | None) -> None:
    """``--compile-cache``: JAX's persistent compilation cache in a directory.

    ``None`` leaves JAX's own setting (on where ``JAX_COMPILATION_CACHE_DIR``
    is set), ``'off'`` turns the cache off, anything else is the directory.
    A later run of the same programs loads them instead of compiling them:
    the digits CNN's first step took 0.55 s instead of 2.8 s. A loaded
    program is the compiled one, so results stay bit-identical (resumes
    included). JAX recompiles, with a warning, an entry it cannot read; a
    directory it cannot write only loses the saving. Programs that compile
    in under a second are not kept.
    """
    if setting is None:
        return
    jax.config.update("jax_enable_compilation_cache", setting != "off")
    if setting != "off":
        jax.config.update("jax_compilation_cache_dir", setting)


class TrainState(NamedTuple):
    params: Any        # nnx.State of nnx.Param
    model_state: Any   # nnx.State of the other variables (BatchStat, ...)
    opt_state: Any     # optax state
    step: jax.Array    # number of updates applied (bad steps excluded)
    rng: jax.Array     # base PRNG key (uint32[2]); a step needing randomness (dropout)
                       # would use fold_in(rng, step), so the key itself stays fixed
    bad_steps: jax.Array  # consecutive non-finite steps so far


class Model(NamedTuple):
    """The static halves of a split model: one graphdef per mode."""
    train: Any
    eval: Any


def split_model(model: nnx.Module) -> tuple[Model, Any, Any]:
    """model -> (graphdefs for train/eval mode, params, other variables)."""
    model.train()
    train_def, params, rest = nnx.split(model, nnx.Param, ...)
    # BatchNorm's use_running_average is a static attribute, so eval mode is
    # a different graphdef over the very same state.
    model.eval()
    eval_def, _, _ = nnx.split(model, nnx.Param, ...)
    model.train()
    return Model(train_def, eval_def), params, rest


def _decay_mask(params):
    # Decay kernels only: biases and normalization scales/shifts are 1-D and
    # decaying them only fights the normalization.
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_schedule(name: str, lr: float, total_steps: int) -> optax.Schedule:
    total_steps = max(1, total_steps)
    if name == "constant":
        return optax.constant_schedule(lr)
    if name == "onecycle":
        return optax.cosine_onecycle_schedule(total_steps, lr)
    if name == "cosine":
        # At least one warmup step, and at least one step left to decay over.
        warmup = min(max(1, total_steps // 20), total_steps - 1)
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=lr, warmup_steps=warmup,
            decay_steps=total_steps, end_value=lr * 0.01)
    raise ValueError(f"unknown schedule {name!r}")


def make_optimizer(name: str, schedule: optax.Schedule, weight_decay: float = 0.0
                   ) -> optax.GradientTransformation:
    """adam | sgd (Nesterov momentum 0.9) | adamw; decay on kernels only.

    The optimizer runs on one flat vector (``optax.flatten``): the same
    arithmetic, but XLA compiles one fused update instead of one per
    parameter, which cuts compile time on CPU by about a third.
    """
    if name == "adamw":
        # optax.adamw's chain, with the decay outside the flattening so its
        # mask still sees the parameter tree.
        return optax.chain(
            optax.flatten(optax.scale_by_adam()),
            optax.add_decayed_weights(weight_decay, mask=_decay_mask),
            optax.scale_by_learning_rate(schedule))
    if name == "adam":
        base = optax.adam(schedule)
    elif name == "sgd":
        base = optax.sgd(schedule, momentum=0.9, nesterov=True)
    else:
        raise ValueError(f"unknown optimizer {name!r}")
    tx = optax.flatten(base)
    if weight_decay:
        # Coupled L2 (added to the gradient), the classic formulation.
        tx = optax.chain(optax.add_decayed_weights(weight_decay, mask=_decay_mask), tx)
    return tx


def init_state(params, model_state, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(
        params=params,
        model_state=model_state,
        opt_state=tx.init(params),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.PRNGKey(seed),
        bad_steps=jnp.zeros((), jnp.int32),
    )


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels)


def make_train_step(graphdef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, axis_name: str | None = None,
                    average_model_state: bool = False) -> Callable:
    """Build the pure ``train_step(state, (x, y)) -> (state, metrics)``.

    With ``axis_name`` the step runs per device on its slice of the batch
    (under ``shard_map``): losses and gradients are averaged over the axis,
    so every device applies the same update. ``average_model_state``
    averages the running statistics too, for batch norms that sync over
    groups of devices only and so end with one estimate per group.
    """
    mean = (lambda t: t) if axis_name is None else (lambda t: lax.pmean(t, axis_name))

    def loss_fn(params, model_state, x, y):
        model = nnx.merge(graphdef, params, model_state, copy=True)
        logits = model(x)
        _, _, new_model_state = nnx.split(model, nnx.Param, ...)
        return cross_entropy(logits, y).mean(), (logits, new_model_state)

    def train_step(state: TrainState, batch):
        x, y = batch
        (loss, (logits, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.model_state, x, y)
        # Running statistics may differ between devices (groups that sync
        # apart): whether all are finite travels in the gradients' all-reduce.
        stats_finite = _all_finite(new_model_state).astype(jnp.float32)
        loss, grads, stats_finite = mean((loss, grads, stats_finite))
        if average_model_state:
            new_model_state = mean(new_model_state)
        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)

        # NaN/Inf guard: a non-finite loss, gradient or new state (an update
        # that overflowed) leaves params, optimizer and running statistics as
        # they were (a select, not a branch: the step stays one program). The
        # parameters are computed alike on every device: so is their check.
        ok = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (stats_finite == 1)
              & _all_finite(new_params))
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        new_state = TrainState(
            params=keep(new_params, state.params),
            model_state=keep(new_model_state, state.model_state),
            opt_state=keep(new_opt_state, state.opt_state),
            step=state.step + ok.astype(jnp.int32),
            rng=state.rng,
            bad_steps=jnp.where(ok, 0, state.bad_steps + 1),
        )
        metrics = {
            "loss": loss,
            "accuracy": mean(jnp.mean(jnp.argmax(logits, -1) == y)),
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            "finite": ok,
            "bad_steps": new_state.bad_steps,
        }
        return new_state, metrics

    return train_step


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
              if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    return functools.reduce(jnp.logical_and, leaves, jnp.bool_(True))


def make_eval_step(graphdef) -> Callable:
    """Build ``eval_step(state, (x, y, mask)) -> sums`` using running statistics."""

    def eval_step(state: TrainState, batch):
        x, y, mask = batch
        model = nnx.merge(graphdef, state.params, state.model_state)
        logits = model(x)
        weight = mask.astype(jnp.float32)
        return {
            "loss_sum": jnp.sum(cross_entropy(logits, y) * weight),
            "correct": jnp.sum((jnp.argmax(logits, -1) == y) * weight),
            "count": jnp.sum(weight),
        }

    return eval_step


def make_mesh(devices: int) -> Mesh | None:
    """A 1-D data mesh over ``devices`` devices in all (None for one device).

    Every process contributes ``devices / process_count`` of its local
    devices, so the mesh spans all processes of a multi-process run.
    """
    processes = jax.process_count()
    if devices == 1 and processes == 1:
        return None
    per_process = devices // processes
    by_process: dict[int, list] = {}
    for d in sorted(jax.devices(), key=lambda d: d.id):
        by_process.setdefault(d.process_index, []).append(d)
    if devices % processes or any(len(ds) < per_process for ds in by_process.values()):
        visible = jax.devices()
        raise ValueError(
            f"--devices {devices} but only {len(visible)} {visible[0].platform} device(s) "
            f"are visible; lower --devices")
    return Mesh([d for p in sorted(by_process) for d in by_process[p][:per_process]],
                (DATA_AXIS,))


def jit_steps(train_step, eval_step, mesh: Mesh | None):
    """Jit both steps; with a mesh, batches are split over it and state replicated.

    ``train_step`` must have been built with ``axis_name=DATA_AXIS``: it runs
    per device under ``shard_map``, where each batch norm pools its
    statistics with two per-feature all-reduces. Evaluation uses running
    statistics only, so plain ``jit`` over the sharded batch suffices.
    """
    options = compiler_options((mesh.devices.flat[0] if mesh else jax.devices()[0]).platform)
    if mesh is None:
        return (jax.jit(train_step, donate_argnums=0, compiler_options=options),
                jax.jit(eval_step, compiler_options=options))
    rep = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P(DATA_AXIS))
    # check_vma=False: the step averages its gradients itself (pmean, as
    # under pmap); with the check on, JAX would already sum them over devices.
    per_device = jax.shard_map(train_step, mesh=mesh, in_specs=(P(), P(DATA_AXIS)),
                               out_specs=(P(), P()), check_vma=False)
    train = jax.jit(per_device, in_shardings=(rep, data), out_shardings=(rep, rep),
                    donate_argnums=0, compiler_options=options)
    evaluate = jax.jit(eval_step, in_shardings=(rep, data), out_shardings=rep,
                       compiler_options=options)
    return train, evaluate


def place_state(state: TrainState, mesh: Mesh | None) -> TrainState:
    """The state replicated on every device of ``mesh`` (of every process)."""
    if mesh is None:
        return jax.device_put(state)
    rep = NamedSharding(mesh, P())
    return jax.tree.map(lambda a: _global_array(np.asarray(a), rep), jax.device_get(state))


def place_batch(batch, mesh: Mesh | None):
    """Split a global batch over ``mesh``; each process places its own rows only."""
    if mesh is None:
        return batch
    rows = NamedSharding(mesh, P(DATA_AXIS))
    return jax.tree.map(lambda a: _global_array(a, rows), batch)


def _global_array(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(tree):
    """Numpy copies of replicated arrays, also where other processes hold devices."""
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)
