"""``python -m benchmarks``: print (and with --write-results, save) the ratio tables.

Sections (``--only``, comma-separated):
  bn     jaxbn (functional, Linen, NNX) vs Flax's BatchNorm, memory floor, XLA memory
  pool   the CNN's 2x2 max pools: nnx.max_pool vs train.pool.max_pool (gradients)
  torch  BN forward+backward, JAX process vs PyTorch process
  cnn    train's CNN step (with either pool) vs the same net in PyTorch, and its
         convolutions alone
  alloc  the same worker processes under other glibc malloc settings (CPU)
  threads  the same worker processes pinned to one core (CPU)
  scaling  BN sync and train's CNN step against the number of (simulated) devices
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import tempfile
import textwrap
from pathlib import Path

SECTIONS = ("bn", "pool", "torch", "cnn", "alloc", "threads", "scaling")
# The sections whose worker processes include PyTorch's.
TORCH_SECTIONS = ("torch", "cnn", "alloc", "threads")
CPU_SECTIONS = ("alloc", "threads")
HERE = Path(__file__).resolve().parent


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, few repeats (a smoke test)")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated sections (default: all of {','.join(SECTIONS)})")
    p.add_argument("--repeats", type=_positive_int,
                   help="timed calls per alternative (default 12, 4x that in the BN tables; "
                        "quick 2)")
    p.add_argument("--rounds", type=_positive_int, help="rounds of worker processes (default 3; quick 1)")
    p.add_argument("--gpu", action="store_true", help="fail unless JAX's default backend is a GPU")
    p.add_argument("--write-results", nargs="?", const=str(HERE), metavar="DIR",
                   help="write RESULTS.md, bn_times.png and results.json to DIR "
                        "(default: benchmarks/); a full-size run's results there are "
                        "replaced only by a full-size run of at least their sections "
                        "on the same kind of device")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if not only:
        p.error(f"--only {args.only!r} names no section; choose from {', '.join(SECTIONS)}")
    args.only = only
    if args.write_results:
        # A shell leaves ~ alone in --write-results=~/res: the home folder is still meant.
        args.write_results = os.path.expanduser(args.write_results)
        # Checked before the run: a full one takes about 20 minutes.
        directory = Path(args.write_results)
        problem = _unwritable(directory)
        if problem:
            p.error(f"--write-results {args.write_results}: {problem}; choose another folder")
        problem = _replaces_more(directory, only, args.quick)
        if problem:
            p.error(f"--write-results {args.write_results}: {problem}")
    return args


def _positive_int(text: str) -> int:
    # 0 would silently mean the default (``args.repeats or ...``), and fewer
    # than one timed call has no median: refused before the run.
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _unwritable(directory: Path) -> str | None:
    """Why results could not be written to ``directory`` (None if they can).

    Creates nothing: a run refused or stopped later leaves no empty folder.
    """
    existing = directory
    while not existing.exists():  # report.write creates the rest
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        return e.strerror or str(e)
    return None


def _replaces_more(directory: Path, only: list[str], quick: bool) -> str | None:
    """Why this run's results would replace fuller ones in ``directory`` (None if not).

    A full-size run's results (committed ones, say) are replaced only by a
    full-size run of at least the same sections: RESULTS.md says every ratio
    comes from one run, so a subset cannot be merged into them.
    """
    results = directory / "results.json"
    meta = _full_size_meta(results)
    if meta is None:
        return None
    had = set(meta["sections"]) if "sections" in meta else _sections_of(meta["command"])
    missing = [s for s in SECTIONS if s in had and s not in only]
    if missing:
        change = (f"--only {','.join(only)} would replace them without {','.join(missing)}: "
                  f"add those to --only")
    elif quick:
        change = "--quick would replace them with tiny sizes: drop --quick"
    else:
        return None
    return (f"it holds the full-size results of `{meta['command']}`; {change}, choose another "
            f"folder, or delete {results} to replace them")


def _full_size_meta(results: Path) -> dict | None:
    """The meta of the full-size results in ``results`` (None: none, or a smoke test's)."""
    try:
        meta = json.loads(results.read_text())["meta"]
        return None if meta["quick"] else meta
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no results of ours there


def _other_machine(directory: Path, backend: str, kinds: set[str]) -> str | None:
    """Why this run's results would replace another machine's in ``directory`` (None if not).

    A folder holds one kind of device's results (benchmarks/ the CPU's,
    benchmarks/gpu-h200/ an H200's); asked after JAX is up, before timing.
    """
    results = directory / "results.json"
    meta = _full_size_meta(results)
    try:
        machine = meta["machine"]
        # "cuda:0 (NVIDIA H200)": the kind is in the last parentheses.
        had = machine["backend"], {d.rsplit(" (", 1)[-1].rstrip(")") for d in machine["devices"]}
    except (KeyError, TypeError, AttributeError):
        return None  # none there, or written without the machine
    if had == (backend, kinds):
        return None
    return (f"it holds the full-size results of `{meta['command']}` on {_devices(*had)}, and "
            f"this run is on {_devices(backend, kinds)}; choose another folder, or delete "
            f"{results} to replace them")


def _devices(backend: str, kinds: set[str]) -> str:
    return f"{backend} ({', '.join(sorted(kinds))})"


def _sections_of(command: str) -> set[str]:
    """The sections a recorded ``python -m benchmarks`` command line ran."""
    # results.json written before its meta listed the sections
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--only", default=",".join(SECTIONS))
    args, _ = p.parse_known_args(shlex.split(command)[3:])
    return {s.strip() for s in args.only.split(",")} & set(SECTIONS)


def main(argv=None) -> int:
    args = parse(argv)
    # SIGTERM (a timeout, a cancelled job) would end this process alone, and
    # the worker process it waits for would go on timing. As an exception it
    # unwinds through subprocess.run, which kills the worker. Ctrl-C likewise,
    # without a traceback.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, _exit_on_signal)
    # On a GPU, JAX would otherwise take 75% of its memory at start-up in this
    # process and leave too little for the worker processes (JAX and PyTorch).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax  # after parsing, so that --help and bad options answer at once

    from benchmarks import bn, cnn, procs, report, scaling

    backend = jax.default_backend()
    if args.gpu and backend != "gpu":
        print(f"--gpu: JAX's default backend is {backend!r}; install jax[cuda12] on a GPU "
              f"machine, or drop --gpu to benchmark {backend}", file=sys.stderr)
        return 2
    if backend != "cpu" and set(args.only) <= set(CPU_SECTIONS):
        print(f"--only {','.join(args.only)}: these sections time the CPU (glibc malloc, one "
              f"core), and JAX's default backend is {backend!r}; choose other sections, or "
              f"run them with JAX_PLATFORMS=cpu", file=sys.stderr)
        return 2
    if args.write_results:
        problem = _other_machine(Path(args.write_results), backend,
                                 {d.device_kind for d in jax.devices()})
        if problem:
            print(f"--write-results {args.write_results}: {problem}", file=sys.stderr)
            return 2
    quick = args.quick
    repeats = args.repeats or (2 if quick else 12)
    rounds = args.rounds or (1 if quick else 3)
    jobs = worker_jobs(args.only, quick, repeats, backend)
    if any(job.module == procs.TORCH_WORKER for job in jobs.values()):
        problem = procs.torch_problem("cpu" if backend == "cpu" else "cuda")
        if problem:
            # Refused before the JAX sections: those take minutes.
            needs = ",".join(s for s in args.only if s in TORCH_SECTIONS)
            rest = ",".join(s for s in args.only if s not in TORCH_SECTIONS) or "bn,pool,scaling"
            print(f"{problem}; the sections {needs} time PyTorch: install it "
                  f"(pip install -e '.[dev]') or run --only {rest}", file=sys.stderr)
            return 2
    meta = report.meta(args, quick, repeats, rounds)
    sections: list[tuple[str, str]] = []
    results: dict = {"quick": quick}

    def emit(title, body):
        sections.append((title, body))
        print(f"\n## {title}\n\n{body}", flush=True)

    print(f"backend {backend}, {meta['machine']['nproc']} cores ({meta['machine']['cpu']}), "
          f"{'quick' if quick else 'full'} sizes, {repeats} repeats", flush=True)
    if "bn" in args.only:
        results["bn"] = bn.run(quick, repeats)
        for title, body in bn.tables(results["bn"]):
            emit(title, body)
    if "pool" in args.only:
        results["pool"] = cnn.run_pools(quick, repeats)
        emit(f"CNN pools: {cnn.REFERENCE} vs {cnn.TRAIN_VARIANT}, median of jit(grad) "
             f"(speedup = {cnn.REFERENCE} / {cnn.TRAIN_VARIANT})",
             cnn.pool_table(results["pool"]))
    try:
        if jobs:
            print(f"\nworker processes ({rounds} round(s)):", flush=True)
            runs = procs.rotate(jobs, rounds)
            results["cnn_runs"] = runs
            for title, body in worker_tables(args.only, runs):
                emit(title, body)
        if "scaling" in args.only:
            results["scaling"] = scaling.run(quick, repeats)
            emit("Data-parallel scaling: median times over simulated devices (one process)",
                 scaling.table(results["scaling"]))
    except procs.WorkerError as e:
        kept = f"; nothing was written to {args.write_results}" if args.write_results else ""
        tail = textwrap.indent(e.stderr, "  ") if e.stderr else "  (nothing)"
        print(f"\nstopped: {e.what}{kept}. The end of its stderr:\n{tail}", file=sys.stderr)
        return 1
    if args.write_results:
        path = report.write(Path(args.write_results), meta, sections, results)
        print(f"\nwrote {path}")
    return 0


def _exit_on_signal(signum, frame):
    print(f"\nstopped by {signal.Signals(signum).name}; results are written only when a run "
          f"finishes", file=sys.stderr)
    sys.exit(128 + signum)


# The JAX process set up as ``python -m train`` runs (train/allocator.py).
TRAIN_JOB = "JAX, python -m train's malloc"
# Each CNN step alone in its process: interleaved with other variants, a
# step shares the heap and the caches with their programs (each JAX variant
# holds about 150 MiB of temporaries), which slowed train's by 10-17%.
ALONE_JOBS = {"JAX": "JAX, python -m train's step alone",
              "NCHW": "PyTorch, NCHW alone", "channels_last": "PyTorch, channels_last alone"}


def worker_jobs(only, quick: bool, repeats: int, backend: str) -> dict:
    """The worker processes the selected sections need, by row name."""
    from benchmarks.procs import ALLOCATOR_ENVS, TORCH_WORKER, Job

    tasks = [task for section, task in (("torch", "bn"), ("cnn", "cnn"), ("cnn", "layers"))
             if section in only]
    cpu = backend == "cpu"
    allocator, threads = cpu and "alloc" in only, cpu and "threads" in only
    if not tasks and (allocator or threads):
        tasks = ["bn", "cnn"]
    if not tasks:
        return {}
    spec = {"tasks": tasks, "quick": quick, "repeats": repeats}
    torch_spec = dict(spec, device="cpu" if cpu else "cuda")
    if "bn" in tasks:  # each JAX process measures the floor under its own settings
        spec = dict(spec, tasks=tasks + ["bn_floor"])
    jax_job = lambda spec=spec, **kw: Job("benchmarks.jax_worker", spec, **kw)
    torch_job = lambda spec=torch_spec, **kw: Job(TORCH_WORKER, spec, **kw)
    jobs = {"JAX": jax_job(), "PyTorch": torch_job()}
    if "cnn" in tasks and cpu:
        jobs[TRAIN_JOB] = jax_job(dict(spec, tasks=["cnn"], train_malloc=True))
    if "cnn" in tasks:
        from benchmarks.cnn import TRAIN_VARIANT

        jobs[ALONE_JOBS["JAX"]] = jax_job(dict(spec, tasks=["cnn"], train_malloc=cpu,
                                               variants=[TRAIN_VARIANT]))
        for layout in ("NCHW", "channels_last"):
            jobs[ALONE_JOBS[layout]] = torch_job(dict(torch_spec, tasks=["cnn"], variants=[layout]))
    if quick:
        # A smoke test of each kind of setting, on the cheapest process.
        small = dict(torch_spec, tasks=["bn"])
        if allocator:
            jobs["PyTorch, one arena, no mmap"] = torch_job(small, env="one arena, no mmap")
        if threads:
            jobs["PyTorch, 1 core"] = torch_job(dict(small, cores=1))
        return jobs
    if allocator:
        for env in ALLOCATOR_ENVS:
            if env != "default":
                jobs[f"JAX, {env}"] = jax_job(env=env)
        for env in ("one arena, no mmap", "huge pages"):
            jobs[f"PyTorch, {env}"] = torch_job(env=env)
    if threads:
        jobs["JAX, 1 core"] = jax_job(dict(spec, cores=1))
        jobs["PyTorch, 1 core"] = torch_job(dict(torch_spec, cores=1))
    return jobs


def worker_tables(only, runs: dict) -> list[tuple[str, str]]:
    from benchmarks import report

    out = []
    jax_run, torch_run = runs["JAX"], runs.get("PyTorch")
    if "torch" in only:
        out.append(("BN fwd+bwd in separate processes: JAX (NHWC) vs PyTorch BatchNorm2d (NCHW)",
                    report.torch_bn_table(jax_run, torch_run)))
    if "cnn" in only:
        out.append(("CNN train step (train/ default cnn): JAX variants vs PyTorch",
                    report.cnn_table(jax_run, torch_run, runs.get(TRAIN_JOB))))
        out.append(("CNN train step, each alone in its own processes: python -m train vs PyTorch",
                    report.alone_table({key: runs[name] for key, name in ALONE_JOBS.items()})))
        if torch_run:
            out.append(("CNN convolutions alone in separate processes: JAX (nnx.Conv, "
                        "train's compiler options) vs PyTorch", report.layers_table(jax_run, torch_run)))
    if any(", " in name for name in runs):  # processes under other settings
        out.append(("Worker process settings: glibc malloc, one core, one CNN step alone",
                    report.settings_table(runs)))
        out.append(("Fastest configuration of each framework (from all worker processes above)",
                    report.best_table(runs)))
    if any("bn_floor" in run for run in runs.values()):
        out.append(("BN fwd+bwd against the memory floor each JAX process measured under its "
                    "settings (ratio to the floor, page faults per call; x donated: dx may take x's "
                    "buffer, as inside a train step)",
                    report.floor_table(runs)))
    return out


if __name__ == "__main__":
    sys.exit(main())
