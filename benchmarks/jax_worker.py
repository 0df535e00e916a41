"""JAX side of the cross-framework comparisons, run in its own process.

``python -m benchmarks.jax_worker '{"tasks": ["bn", "bn_floor", "cnn", "layers"],
"quick": false, "repeats": 9}'`` prints one JSON line: per task, median
seconds (and page faults per call, which show the allocator's share).
``"variants": [...]`` limits the CNN step to those variants.
"""

from __future__ import annotations

import functools
import json
import sys

import jax

from benchmarks import bn, cnn, procs, timing
from train.allocator import tune_malloc

# The shape PyTorch's BatchNorm2d is compared on (NHWC here, NCHW there).
BN_NAMES = ("jaxbn", bn.REFERENCE)


def bn_task(quick: bool, repeats: int) -> dict:
    return _bn_times(bn.configs(quick, jax.default_backend())[0], repeats)


def bn_floor_task(quick: bool, repeats: int) -> dict:
    """Per BN config: the forward+backward's memory floor and times, measured
    under this process's malloc and cores (the page faults of fresh outputs
    depend on them; the floor's donated add has none), with x kept and with
    x donated."""
    return {config.name: {"floor": bn.measured_floor(config, "train fwd+bwd", repeats),
                          "times": _bn_times(config, repeats, with_donated=True)}
            for config in bn.configs(quick, jax.default_backend())}


def _bn_times(config: bn.Config, repeats: int, with_donated: bool = False) -> dict:
    """Median seconds and page faults per call of each of BN_NAMES' forward+backward
    (interleaved), and of the same with x donated if ``with_donated``."""
    fns = {name: bn.blocking(*bn.compiled(name, config, "train fwd+bwd")) for name in BN_NAMES}
    if with_donated:
        fns.update({bn.donated(name): bn.DonatedStep(name, config) for name in BN_NAMES})
    times = bn.medians(fns, repeats)
    return {name: {"seconds": times[name], "faults_per_call": timing.faults_per_call(fn)}
            for name, fn in fns.items()}


def main(spec: dict) -> dict:
    procs.die_with_parent()
    procs.pin_cores(spec.get("cores"))
    if spec.get("train_malloc"):
        tune_malloc()  # as python -m train does
    tasks = {"bn": bn_task, "bn_floor": bn_floor_task,
             "cnn": functools.partial(cnn.run_steps, names=spec.get("variants")),
             "layers": cnn.run_torch_comparable_layers}
    out = {"backend": jax.default_backend()}
    for task in spec["tasks"]:
        out[task] = tasks[task](spec["quick"], spec["repeats"])
    return out


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
