"""``python -m benchmarks.soak --steps N``: a long digits run; host memory and recompilations.

It repeats what ``python -m train`` does every step and every epoch, with
train's own pieces: the model builder, the jitted state init, train and eval
steps (``train.loop.compiled_steps``), the epoch-seeded batches, evaluation
and an atomic checkpoint per epoch (into a temporary folder). After a
warm-up (default: the first epoch, which compiles everything), it samples
the process's resident memory (VmRSS) every K steps and counts XLA
compilations and jaxpr traces through ``jax.monitoring`` events. A leak shows
as a positive RSS slope; a retrace (a Python scalar or a changing shape or
dtype in a step's arguments) as compilations after warm-up. malloc is tuned
as ``python -m train`` tunes it (``--glibc-malloc`` keeps glibc's defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"


def rss_mib() -> float:
    """Resident set size of this process now (Linux /proc), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class CompileCounter:
    """Counts XLA compilations and jaxpr traces while registered."""

    def __init__(self):
        self.compiles = self.traces = 0

    def __call__(self, event: str, duration: float, **kwargs) -> None:
        if event == COMPILE_EVENT:
            self.compiles += 1
        elif event == TRACE_EVENT:
            self.traces += 1

    def __enter__(self):
        import jax.monitoring
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        import jax.monitoring
        jax.monitoring.unregister_event_duration_listener(self)


def slope_per_1000(samples: list[tuple[int, float]]) -> float:
    """Least-squares slope of RSS over steps, in MiB per 1000 steps."""
    import numpy as np
    if len(samples) < 2:
        return 0.0
    steps, rss = np.array(samples, dtype=np.float64).T
    return float(np.polyfit(steps, rss, 1)[0] * 1000)


def soak(total_steps: int, *, warmup: int | None = None, every: int = 100,
         model_name: str = "cnn", batch_size: int = 32, seed: int = 0, log=print) -> dict:
    """Train ``total_steps`` steps as ``python -m train`` would; memory and compile report."""
    import jax
    import numpy as np

    from train import checkpoint, data, loop, models, steps
    from train.config import DATASET_DEFAULTS

    dataset = data.load("digits")
    spe = data.steps_per_epoch(len(dataset.x_train), batch_size)
    if spe == 0:  # no full batch: every epoch would be empty, and the run endless
        raise ValueError(f"--batch-size {batch_size} is larger than the "
                         f"{len(dataset.x_train)} training examples")
    one_epoch = warmup is None
    warmup = spe if one_epoch else warmup
    # Checked before training: the measurements start at the warm-up's last step.
    if warmup < 1:
        raise ValueError(f"--warmup {warmup}: must be at least 1 (the first step compiles)")
    if warmup > total_steps:
        raise ValueError(f"--steps {total_steps} ends before the warm-up of {warmup} steps"
                         + (" (one epoch; set --warmup)" if one_epoch else ""))
    counter = CompileCounter()
    at_warmup: dict = {}
    samples: list[tuple[int, float]] = []
    step, epoch = 0, 0
    start = time.perf_counter()
    with counter, tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        model = models.build_model(model_name, dataset.input_shape, norm="batch", seed=seed)
        graphdefs, params, model_state = steps.split_model(model)
        init, train_step, eval_step = loop.compiled_steps(
            graphdefs, "adam", "cosine", DATASET_DEFAULTS["digits"]["lr"], 0.0, total_steps,
            None)
        state = steps.place_state(init(params, model_state, np.uint32(seed)), None)
        while step < total_steps:
            for xb, yb in data.train_batches(dataset.x_train, dataset.y_train, batch_size,
                                             seed=seed, epoch=epoch):
                state, m = train_step(state, steps.place_batch((xb, yb), None))
                m = jax.device_get(m)
                step += 1
                if step % spe == 0:  # epoch end, as in train.loop
                    loop.evaluate(eval_step, state, dataset.x_test, dataset.y_test,
                                  len(dataset.x_test), None)
                    checkpoint.save(Path(tmp), jax.device_get(state), {"epoch": epoch},
                                    position=step, keep=loop.KEEP_CHECKPOINTS)
                if step == warmup:
                    at_warmup = dict(step=step, rss=rss_mib(), compiles=counter.compiles,
                                     traces=counter.traces, time=time.perf_counter())
                    samples.append((step, at_warmup["rss"]))
                elif step > warmup and (step - warmup) % every == 0:
                    samples.append((step, rss_mib()))
                if step == total_steps:
                    break
            epoch += 1
    end = time.perf_counter()
    if samples[-1][0] != step:
        samples.append((step, rss_mib()))
    timed = step - at_warmup["step"]
    return {
        "steps": step, "warmup_steps": warmup, "steps_per_epoch": spe, "model": model_name,
        "batch_size": batch_size, "final_loss": float(m["loss"]),
        "rss_warmup_mib": at_warmup["rss"], "rss_end_mib": samples[-1][1],
        "rss_max_mib": max(r for _, r in samples),
        "rss_slope_mib_per_1000_steps": slope_per_1000(samples),
        # Allocators settle for a while; a leak keeps growing in the second half too.
        "rss_slope_second_half": slope_per_1000(samples[len(samples) // 2:]),
        "compiles_in_warmup": at_warmup["compiles"], "traces_in_warmup": at_warmup["traces"],
        "compiles_after_warmup": counter.compiles - at_warmup["compiles"],
        "traces_after_warmup": counter.traces - at_warmup["traces"],
        "steps_per_second_after_warmup": timed / (end - at_warmup["time"]) if timed else 0.0,
        "seconds": end - start, "samples": samples,
        "machine": f"{cpu_name()}, {len(os.sched_getaffinity(0))} cores, "
                   f"{jax.default_backend()} backend, python {platform.python_version()}, "
                   f"jax {jax.__version__}",
    }


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(r: dict) -> str:
    return "\n".join([
        f"soak: {r['steps']} steps of the digits {r['model']} (batch {r['batch_size']}, "
        f"{r['steps_per_epoch']} steps/epoch) in {r['seconds']:.1f} s",
        f"machine: {r['machine']}; malloc: {r['malloc']}",
        f"warm-up: {r['warmup_steps']} steps, {r['compiles_in_warmup']} compilations, "
        f"{r['traces_in_warmup']} traces",
        f"RSS at warm-up {r['rss_warmup_mib']:.1f} MiB, at the end {r['rss_end_mib']:.1f} MiB, "
        f"max {r['rss_max_mib']:.1f} MiB; slope {r['rss_slope_mib_per_1000_steps']:+.3f} "
        f"MiB per 1000 steps ({len(r['samples'])} samples), over the second half "
        f"{r['rss_slope_second_half']:+.3f}",
        f"after warm-up: {r['compiles_after_warmup']} compilations, "
        f"{r['traces_after_warmup']} traces, {r['steps_per_second_after_warmup']:.0f} steps/s",
        f"final train loss {r['final_loss']:.4f}",
    ])


def apply_malloc_settings(glibc_defaults: bool) -> str:
    """Tune malloc as python -m train does (before JAX allocates); describe the result."""
    if any(k.startswith("MALLOC_") for k in os.environ):
        return "MALLOC_* from the environment"
    if glibc_defaults:
        return "glibc defaults"
    from train.allocator import tune_malloc
    return "python -m train's (train/allocator.py)" if tune_malloc() else "not glibc: untouched"


def _unwritable(path: Path) -> str | None:
    """Why ``path`` could not be written (None if it can), leaving it as it is."""
    try:
        if path.exists():
            open(path, "a").close()
        # The JSON goes to a temporary beside it first.
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as e:
        return e.strerror or str(e)
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5000, help="train steps (default 5000)")
    p.add_argument("--warmup", type=int, help="steps before measuring (default: one epoch)")
    p.add_argument("--every", type=int, default=100, help="RSS sample interval in steps")
    p.add_argument("--model", default="cnn", choices=("cnn", "mlp", "resnet"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--glibc-malloc", action="store_true",
                   help="keep glibc's malloc defaults instead of python -m train's settings")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.steps < 1 or args.every < 1 or args.batch_size < 1:
        p.error("--steps, --every and --batch-size must be at least 1")
    if args.json:
        # A shell leaves ~ alone in --json=~/soak.json: the home folder is still meant.
        args.json = os.path.expanduser(args.json)
        problem = _unwritable(Path(args.json))
        if problem:
            # Checked before training: the JSON is written after it, minutes later.
            p.error(f"--json {args.json}: {problem}; choose another path")
    malloc = apply_malloc_settings(args.glibc_malloc)
    try:
        r = soak(args.steps, warmup=args.warmup, every=args.every, model_name=args.model,
                 batch_size=args.batch_size)
    except ValueError as e:
        p.error(str(e))
    r["malloc"] = malloc
    print(report(r))
    if args.json:
        from benchmarks.report import write_all
        path = Path(args.json)
        # Through a temporary: a failure (a full disk) keeps the previous file.
        write_all(path.parent, {path.name: json.dumps(r, indent=1) + "\n"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
