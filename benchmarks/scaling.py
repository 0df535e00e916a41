"""Data-parallel scaling: step time against the number of (simulated) devices.

Runs in its own process with ``--xla_force_host_platform_device_count``, so
the parent's JAX keeps its single CPU device. For each device count it times

- BN forward+backward on one global batch under ``shard_map``, with the
  statistics synced across devices (``axis_name``) and without (each device
  normalizes its own slice): the difference is the cost of the sync;
- ``train``'s CNN train step over a mesh of that many devices (sharded batch,
  one all-gather per batch norm, one all-reduce of the gradients).

Simulated CPU devices share the machine's cores, so more devices never run
faster here: the table shows what sharding and the sync cost, not a speedup.
On a GPU or TPU host the same code measures real devices.
"""

from __future__ import annotations

import json
import os
import sys

from benchmarks import procs, timing

MAX_DEVICES = 8


def device_counts(quick: bool) -> tuple[int, ...]:
    return (1, 2) if quick else (1, 2, 4, 8)


def run(quick: bool, repeats: int) -> dict:
    """Time every device count in a fresh process that simulates the devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={MAX_DEVICES}").strip()
    return procs.result("the scaling section's process", "benchmarks.scaling",
                        {"quick": quick, "repeats": repeats}, env, timeout=3600)


def table(results: dict) -> str:
    rows = []
    base_bn = results["1"]["bn synced"]
    base_step = results["1"]["cnn step"]
    for n, r in results.items():
        synced, local = r["bn synced"], r["bn local"]
        rows.append([n, timing.ms(synced), timing.ms(local), timing.ratio(synced, local),
                     timing.ratio(synced, base_bn), timing.ms(r["cnn step"]),
                     f"{r['cnn images/s']:.0f}", timing.ratio(r["cnn step"], base_step)])
    return timing.table(["devices", "BN synced", "BN local", "synced / local",
                         "BN / 1 device", "CNN step", "images/s", "step / 1 device"], rows)


# --------------------------------------------------------------------------
# the worker (imports JAX; run only through ``run``)


def _bn_programs(n: int, shape):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import jaxbn

    mesh = Mesh(jax.devices()[:n], ("data",))
    c = shape[-1]
    rng = np.random.default_rng(0)
    rows = NamedSharding(mesh, P("data"))
    x = jax.device_put(3.0 + 2.0 * rng.standard_normal(shape, np.float32), rows)
    g = jax.device_put(rng.standard_normal(shape, np.float32), rows)
    params = (jnp.ones((c,)), jnp.zeros((c,)))
    state = jaxbn.init_state(c)

    def program(axis_name):
        def loss(params, x, g):
            y, new_state = jaxbn.batch_norm(x, state, *params, training=True,
                                            axis_name=axis_name)
            return jnp.sum(y * g), new_state

        def per_device(params, x, g):
            grads, new_state = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x, g)
            return grads, new_state

        f = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                                  out_specs=((P(), P("data")), P()), check_vma=False))
        compiled = f.lower(params, x, g).compile()
        return lambda: jax.block_until_ready(compiled(params, x, g))

    return program("data"), program(None)


class _CnnSteps:
    """train's CNN step on a mesh of ``n`` devices; one call = one blocking step."""

    def __init__(self, n: int, batch: int):
        import jax
        import numpy as np

        from train import loop, models, steps
        from train.config import Config, resolve

        cfg = resolve(Config(devices=n, batch_size=batch))
        model = models.build_model("cnn", (28, 28, 1), norm="batch", seed=0,
                                   opts=loop.norm_options(cfg))
        graphdefs, params, model_state = steps.split_model(model)
        mesh = steps.make_mesh(n)
        init, self.step, _ = loop.compiled_steps(graphdefs, "adam", "cosine", 2e-3, 0.0,
                                                 1000, mesh)
        self.state = steps.place_state(init(params, model_state, np.uint32(0)), mesh)
        rng = np.random.default_rng(0)
        self.batch = steps.place_batch(
            (rng.standard_normal((batch, 28, 28, 1), np.float32),
             (np.arange(batch) % 10).astype(np.int32)), mesh)
        self._block = jax.block_until_ready

    def __call__(self):
        self.state, metrics = self.step(self.state, self.batch)
        self._block((self.state, metrics))


def worker(spec: dict) -> dict:
    import jax

    quick, repeats = spec["quick"], spec["repeats"]
    shape = (16, 8, 8, 16) if quick else (128, 32, 32, 64)
    batch = 16 if quick else 128
    out = {}
    # On a GPU host the simulated CPU devices do not count: real ones only.
    for n in [n for n in device_counts(quick) if n <= jax.device_count()]:
        synced, local = _bn_programs(n, shape)
        cnn = _CnnSteps(n, batch)
        times = timing.medians(timing.interleave(
            {"bn synced": synced, "bn local": local, "cnn step": cnn}, repeats))
        times["cnn images/s"] = batch / times["cnn step"]
        out[str(n)] = times
    return out


if __name__ == "__main__":
    print(json.dumps(worker(json.loads(sys.argv[1]))))
