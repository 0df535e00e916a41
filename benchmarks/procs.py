"""Worker processes: one framework (and one setting) per process.

JAX and PyTorch each get the whole machine in turn: their processes run one
after another, rotating (JAX, PyTorch, JAX with other settings, ...), never
side by side.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# glibc malloc settings tried on the JAX (and PyTorch) processes. XLA:CPU
# allocates a program's temporaries (one buffer: 150 MiB for the CNN step)
# and outputs afresh on every call; what malloc serves with mmap comes back
# as new pages that fault in on first touch. glibc caps
# MALLOC_MMAP_THRESHOLD_ at 32 MiB, so larger buffers stay mmapped whatever
# it says; MALLOC_MMAP_MAX_=0 turns mmap off, and MALLOC_ARENA_MAX=1 keeps
# XLA's worker threads on the main heap, whose freed memory a high
# MALLOC_TRIM_THRESHOLD_ then keeps for reuse. glibc.malloc.hugetlb=1 asks
# for transparent huge pages on what malloc maps (where the kernel's THP
# setting is "madvise" or "always"): a 32 MiB buffer then faults in as 16
# pages of 2 MiB instead of 8192 of 4 KiB.
ALLOCATOR_ENVS = {
    "default": {},
    "mmap/trim thresholds": {"MALLOC_MMAP_THRESHOLD_": "33554432",
                             "MALLOC_TRIM_THRESHOLD_": "4294967296"},
    "one arena, no mmap": {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
                           "MALLOC_TRIM_THRESHOLD_": "4294967296"},
    "huge pages": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
}
ALLOCATOR_VARIABLES = ("MALLOC_", "GLIBC_TUNABLES")


@dataclasses.dataclass(frozen=True)
class Job:
    module: str            # benchmarks.jax_worker or benchmarks.torch_worker
    spec: dict
    env: str = "default"   # a key of ALLOCATOR_ENVS


def pin_cores(cores: int | None) -> None:
    """Restrict this process to its first ``cores`` cores (None: leave as is).

    Called by the workers before any computation: JAX and PyTorch size their
    thread pools from the affinity mask when they first compute.
    """
    if cores:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])


def environment(name: str) -> dict[str, str]:
    """The parent's environment with only the malloc settings of ``name``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ALLOCATOR_VARIABLES)}
    env.update(ALLOCATOR_ENVS[name])
    return env


# Set by the parent for its workers: its pid, which die_with_parent checks.
PARENT_PID = "BENCHMARKS_PARENT_PID"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> None:
    """End this worker process with the parent that started it (Linux; elsewhere a no-op).

    Called first by the workers: a SIGKILLed parent cannot end its worker,
    which would go on timing on the machine for minutes.
    """
    parent = os.environ.get(PARENT_PID)
    if parent is None or sys.platform != "linux":
        return  # run by hand, or no prctl
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    # A parent that died before the prctl sends no signal: this process
    # has already been adopted by another.
    if os.getppid() != int(parent):
        os.kill(os.getpid(), signal.SIGKILL)


TORCH_WORKER = "benchmarks.torch_worker"


def torch_problem(device: str) -> str | None:
    """Why the PyTorch worker could not run on ``device`` ('cpu' or 'cuda'); None if it can.

    Asked in a process like the workers' before anything is timed: the
    PyTorch processes come after minutes of JAX timings.
    """
    proc = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=environment("default"))
    if proc.returncode:
        lines = proc.stderr.strip().splitlines()
        return f"PyTorch does not import ({lines[-1] if lines else f'exit status {proc.returncode}'})"
    if device == "cuda" and proc.stdout.strip() != "True":
        return "PyTorch sees no CUDA device (a CPU-only build of torch?)"
    return None


# The end of a traceback, which names the failure (JAX's run to dozens of lines).
STDERR_LINES = 20


class WorkerError(Exception):
    """A worker process that failed: ``what`` says which and how, ``stderr`` how it ended."""

    def __init__(self, what: str, stderr: str):
        super().__init__(what)
        self.what = what
        self.stderr = "\n".join(stderr.rstrip().splitlines()[-STDERR_LINES:])


def result(what: str, module: str, spec: dict, env: dict[str, str], timeout: float) -> dict:
    """The JSON line ``python -m module spec`` prints last; WorkerError if it fails.

    ``what`` names the process in the error, e.g. 'the worker process "JAX" (round 1/3)'.
    """
    what = f"{what}, python -m {module},"
    try:
        proc = subprocess.run([sys.executable, "-m", module, json.dumps(spec)], capture_output=True,
                              text=True, cwd=ROOT, timeout=timeout,
                              env=dict(env, **{PARENT_PID: str(os.getpid())}))
    except subprocess.TimeoutExpired as e:
        # Bytes whatever text= says.
        raise WorkerError(f"{what} did not finish within {timeout:.0f} s",
                          (e.stderr or b"").decode(errors="replace")) from None
    if proc.returncode < 0:
        raise WorkerError(f"{what} was killed by signal {-proc.returncode} "
                          f"({signal.strsignal(-proc.returncode)})", proc.stderr)
    if proc.returncode:
        raise WorkerError(f"{what} exited with status {proc.returncode}", proc.stderr)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise WorkerError(f"{what} printed no JSON result", proc.stderr) from None


def rotate(jobs: dict[str, Job], rounds: int, log=print) -> dict[str, dict]:
    """Run every job once per round, in turn; per job, the median of each number."""
    runs: dict[str, list[dict]] = {name: [] for name in jobs}
    for r in range(rounds):
        for name, job in jobs.items():
            log(f"  round {r + 1}/{rounds}: {name}")
            what = f'the worker process "{name}" (round {r + 1}/{rounds})'
            runs[name].append(result(what, job.module, job.spec, environment(job.env),
                                     timeout=1800))
    return {name: _median_tree(results) for name, results in runs.items()}


def _median_tree(results: list):
    """Element-wise median of equally shaped JSON results (other leaves: the first's)."""
    first = results[0]
    if isinstance(first, dict):
        out = {k: _median_tree([r[k] for r in results]) for k in first}
        if "step" in out and "images_per_second" in out:
            # The rate of the median step, not the median rate: over an even
            # number of rounds the two differ (each averages its middle two),
            # and the tables show both side by side and compare speeds.
            out["images_per_second"] = first["images_per_second"] * first["step"] / out["step"]
        return out
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return statistics.median(results)
    return first
