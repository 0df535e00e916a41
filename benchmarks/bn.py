"""Batch norm: jaxbn (functional, Linen, NNX) against Flax, timed in one process.

Every implementation is reduced to the same pure signature,
``apply(params, stats, x) -> (y, new_stats)``, so one set of jitted
drivers (training forward+backward, training forward, inference) times
them all identically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxbn
import jaxbn.linen
import jaxbn.nnx
from jaxbn import _native
from benchmarks import batches, timing

MOMENTUM = 0.99
EPSILON = 1e-5
REFERENCE = "flax.linen"
MODES = ("train fwd+bwd", "train fwd", "eval")
# Array-sized memory transfers of the fewest passes each mode needs:
# fwd+bwd: read x for the statistics (the cotangent g depends on y, hence on
# them), read x and g for the backward's per-channel sums, read x and g and
# write dx; fwd: read x for the statistics, read x and write y; eval: read
# x, write y.
MIN_PASSES = {"train fwd+bwd": 6, "train fwd": 3, "eval": 2}


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * jnp.dtype(self.dtype).itemsize


def configs(quick: bool, backend: str = "cpu") -> list[Config]:
    """The shapes timed; the first is the one PyTorch's worker times too."""
    nhwc = batches.bn_shape(quick, backend)
    if quick:
        return [Config("NHWC f32", nhwc, "float32")]
    dense = (4096, 1024) if backend == "cpu" else (65536, 4096)
    out = [Config("NHWC f32", nhwc, "float32"), Config("NHWC bf16", nhwc, "bfloat16"),
           Config("dense f32", dense, "float32"), Config("dense bf16", dense, "bfloat16")]
    if backend != "cpu":
        # The CPU's shape too: small enough that launches, not memory, set the time.
        out.append(Config("NHWC f32 small", batches.bn_shape(False, "cpu"), "float32"))
    return out


# --------------------------------------------------------------------------
# implementations: (features, dtype, training) -> (apply, params, stats)


def _functional(c, dtype, training):
    def apply(params, state, x):
        return jaxbn.batch_norm(x, state, params["scale"], params["bias"], training=training,
                                momentum=MOMENTUM, epsilon=EPSILON)
    params = {"scale": jnp.ones((c,)), "bias": jnp.zeros((c,))}
    return apply, params, jaxbn.init_state(c)


def _linen(cls, **kwargs):
    def make(c, dtype, training):
        # dtype: the output dtype, so bfloat16 inputs give bfloat16 outputs everywhere.
        module = cls(use_running_average=not training, momentum=MOMENTUM, epsilon=EPSILON,
                     dtype=dtype, **kwargs)
        # Jitted: eagerly, every op of init compiles on its own.
        variables = jax.jit(module.init)(jax.random.key(0), jnp.zeros((2, c), dtype))

        def apply(params, stats, x):
            y, updates = module.apply({"params": params, "batch_stats": stats}, x,
                                      mutable=["batch_stats"])
            return y, updates["batch_stats"]
        return apply, variables["params"], variables["batch_stats"]
    return make


def _nnx(cls):
    def make(c, dtype, training):
        module = cls(c, use_running_average=not training, momentum=MOMENTUM, epsilon=EPSILON,
                     dtype=dtype, rngs=nnx.Rngs(0))
        graphdef, params, stats = nnx.split(module, nnx.Param, nnx.BatchStat)

        def apply(params, stats, x):
            model = nnx.merge(graphdef, params, stats, copy=True)
            y = model(x)
            return y, nnx.state(model, nnx.BatchStat)
        return apply, params, stats
    return make


# jaxbn with its per-feature sums left to XLA (as with JAXBN_NATIVE=0): what
# the native kernels save. They serve the CPU only, and so does this row.
XLA_SUMS = "jaxbn, XLA sums"

IMPLEMENTATIONS: dict[str, Callable] = {
    "jaxbn": _functional,
    XLA_SUMS: _functional,
    "jaxbn.linen": _linen(jaxbn.linen.BatchNorm),
    "jaxbn.nnx": _nnx(jaxbn.nnx.BatchNorm),
    "flax.linen": _linen(linen.BatchNorm),
    "flax.linen slow var": _linen(linen.BatchNorm, use_fast_variance=False),
    "flax.nnx": _nnx(nnx.BatchNorm),
}


# --------------------------------------------------------------------------
# drivers


def _driver(apply, mode):
    if mode == "eval":
        return lambda params, stats, x, g: apply(params, stats, x)[0]
    if mode == "train fwd":
        return lambda params, stats, x, g: apply(params, stats, x)

    def loss(params, x, stats, g):
        y, new_stats = apply(params, stats, x)
        return jnp.sum(y * g, dtype=jnp.float32), new_stats

    # Gradients for x, scale and bias, and the new running statistics.
    return lambda params, stats, x, g: jax.grad(loss, argnums=(0, 1), has_aux=True)(
        params, x, stats, g)


@functools.lru_cache(maxsize=1)
def inputs(config: Config):
    # NumPy draws: eager jax.random would compile a program per shape. Cached:
    # every implementation and mode of a config times the same arrays, and a
    # GPU-sized draw takes seconds.
    rng = np.random.default_rng(0)
    x = 3.0 + 2.0 * rng.standard_normal(config.shape, np.float32)
    g = rng.standard_normal(config.shape, np.float32)
    return jnp.asarray(x, config.dtype), jnp.asarray(g, config.dtype)


def compiled(name: str, config: Config, mode: str):
    """(compiled fn, args) for implementation ``name`` on ``config`` in ``mode``."""
    apply, params, stats = IMPLEMENTATIONS[name](config.shape[-1], jnp.dtype(config.dtype),
                                                 mode != "eval")
    args = (params, stats) + inputs(config)
    sums = _native.xla_sums_only() if name == XLA_SUMS else contextlib.nullcontext()
    with sums:
        return jax.jit(_driver(apply, mode)).lower(*args).compile(), args


def blocking(fn, args):
    return lambda: jax.block_until_ready(fn(*args))


# A BN call takes milliseconds and its time is bimodal (a call whose fresh
# output reuses freed pages runs up to 2x faster than one that faults them
# in): its medians need more rounds than the other sections' to settle.
ROUNDS_PER_REPEAT = 4


def implementations(backend: str) -> tuple[str, ...]:
    return tuple(name for name in IMPLEMENTATIONS if backend == "cpu" or name != XLA_SUMS)


def time_mode(config: Config, mode: str, repeats: int, names=tuple(IMPLEMENTATIONS)):
    """Median seconds per call of each implementation (interleaved), and the executables.

    Each implementation is timed ``ROUNDS_PER_REPEAT * repeats`` times.
    """
    programs = {name: compiled(name, config, mode) for name in names}
    fns = {name: blocking(*program) for name, program in programs.items()}
    return medians(fns, repeats), programs


def medians(fns: dict[str, Callable], repeats: int) -> dict[str, float]:
    """Median seconds per call of each BN call in ``fns``, interleaved, each
    timed ``ROUNDS_PER_REPEAT * repeats`` times."""
    return timing.medians(timing.interleave(fns, ROUNDS_PER_REPEAT * repeats))


def memory_stats(programs) -> dict[str, dict[str, int]]:
    """XLA's buffer sizes (bytes) of each compiled program."""
    out = {}
    for name, (executable, _) in programs.items():
        stats = executable.memory_analysis()
        out[name] = {"temp": stats.temp_size_in_bytes,
                     "argument": stats.argument_size_in_bytes,
                     "output": stats.output_size_in_bytes}
    return out


class _InPlaceAdd:
    """``x = x + g`` with ``x`` donated: the output reuses x's buffer, so no fresh memory."""

    def __init__(self, x, g):
        self.x, self.g = jnp.array(x, copy=True), g
        self.add = jax.jit(lambda x, g: x + g, donate_argnums=0)

    def __call__(self):
        self.x = jax.block_until_ready(self.add(self.x, self.g))


def donated(name: str) -> str:
    return f"{name}, x donated"


class DonatedStep:
    """Implementation ``name``'s forward+backward with x donated, so that dx
    may take x's buffer, as it does inside a train step, where x is an
    intermediate that dies in the backward. Each call's dx is the next x."""

    def __init__(self, name: str, config: Config):
        apply, params, stats = IMPLEMENTATIONS[name](config.shape[-1], jnp.dtype(config.dtype),
                                                     True)
        x, g = inputs(config)
        self.step = jax.jit(_driver(apply, "train fwd+bwd"), donate_argnums=2)
        self.params, self.stats, self.x, self.g = params, stats, jnp.array(x, copy=True), g

    def __call__(self):
        (_, dx), _ = self.step(self.params, self.stats, self.x, self.g)
        self.x = jax.block_until_ready(dx)


def bandwidths(config: Config, repeats: int) -> dict[str, float]:
    """Bytes/s of jitted copies and adds of this size (reads + writes over time).

    The allocating ones pay for their fresh output buffer as a BN would; the
    donated add shows what the memory system itself sustains.
    """
    x, g = inputs(config)
    fns = {"copy (x + 1)": blocking(jax.jit(lambda x: x + 1), (x,)),
           "add (x + g)": blocking(jax.jit(lambda x, g: x + g), (x, g)),
           "donated add": _InPlaceAdd(x, g)}
    moved = {"copy (x + 1)": 2, "add (x + g)": 3, "donated add": 3}
    times = timing.medians(timing.interleave(fns, repeats))
    return {name: moved[name] * config.nbytes / t for name, t in times.items()}


def floor_seconds(config: Config, mode: str, bytes_per_second: float) -> float:
    return MIN_PASSES[mode] * config.nbytes / bytes_per_second


def measured_floor(config: Config, mode: str, repeats: int) -> float:
    """The floor at the best bandwidth measured now, in this process."""
    return floor_seconds(config, mode, max(bandwidths(config, repeats).values()))


def run(quick: bool, repeats: int) -> dict:
    """Times, floors and memory statistics for every config and mode."""
    results = []
    for config in configs(quick, jax.default_backend()):
        measured = bandwidths(config, repeats)
        bw = max(measured.values())
        entry = {"config": dataclasses.asdict(config), "bandwidths": measured, "modes": {}}
        for mode in MODES:
            times, programs = time_mode(config, mode, repeats,
                                        implementations(jax.default_backend()))
            faults = {name: timing.faults_per_call(blocking(*program))
                      for name, program in programs.items()}
            entry["modes"][mode] = {"times": times, "faults": faults,
                                    "floor": floor_seconds(config, mode, bw)}
            if mode == "train fwd+bwd":
                entry["memory"] = memory_stats(programs)
        results.append(entry)
    return {"configs": results}


def tables(results: dict) -> list[tuple[str, str]]:
    """(title, table) pairs: one per mode, then memory."""
    out = []
    entries = results["configs"]
    for mode in MODES:
        headers = ["implementation"] + [e["config"]["name"] for e in entries]
        rows = [[name] + [_cell(e["modes"][mode], name) for e in entries]
                for name in timed(entries)]
        rows.append(["memory floor"] + [
            f"{timing.ms(e['modes'][mode]['floor'])} (jaxbn at "
            f"{e['modes'][mode]['times']['jaxbn'] / e['modes'][mode]['floor']:.1f}x floor)"
            for e in entries])
        out.append((f"BN {mode}: median time (ratio to {REFERENCE}), page faults per call",
                    timing.table(headers, rows)))
    mib = lambda b: f"{b / 2**20:.1f}"
    rows = [[e["config"]["name"], name, mib(m["temp"]), mib(m["argument"]), mib(m["output"])]
            for e in entries for name, m in e["memory"].items()]
    out.append(("BN train fwd+bwd: XLA memory_analysis (MiB)",
                timing.table(["config", "implementation", "temp", "argument", "output"], rows)))
    out.append(("BN train fwd+bwd: effective bandwidth in GB/s (the floor's bytes / median "
                "time) and its share of the best copy bandwidth",
                bandwidth_table(entries)))
    kinds = list(entries[0]["bandwidths"])
    rows = [[e["config"]["name"], str(tuple(e["config"]["shape"]))] +
            [f"{e['bandwidths'][k] / 1e9:.2f}" for k in kinds] for e in entries]
    out.append(("Bandwidth (GB/s) of jitted copies of the same size; the floors use the best",
                timing.table(["config", "shape"] + kinds, rows)))
    return out


def bandwidth_table(entries) -> str:
    """GB/s each implementation would move if it made only the fewest passes,
    and that as a share of the best copy bandwidth of the same size."""
    mode = "train fwd+bwd"
    rows = []
    for name in timed(entries):
        row = [name]
        for e in entries:
            moved = MIN_PASSES[mode] * Config(**e["config"]).nbytes
            rate = moved / e["modes"][mode]["times"][name]
            row.append(f"{rate / 1e9:.0f} ({rate / max(e['bandwidths'].values()):.0%})")
        rows.append(row)
    return timing.table(["implementation"] + [e["config"]["name"] for e in entries], rows)


def timed(entries) -> list[str]:
    """The implementations a run timed, in table order."""
    return list(entries[0]["modes"]["train fwd+bwd"]["times"])


def _cell(measured: dict, name: str) -> str:
    times = measured["times"]
    return (f"{timing.ms(times[name])} ({timing.ratio(times[name], times[REFERENCE])}, "
            f"{measured['faults'][name]:.0f} pf)")
