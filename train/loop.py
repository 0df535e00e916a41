"""The training loop: output folder, data order, checkpoints, resume, signals.

Exactness of ``--resume``: the data order is a function of (seed, epoch),
the TrainState is restored bit for bit, the per-epoch running sums are stored
in the checkpoint, and ``metrics.jsonl`` is cut back to what it held when the
checkpoint was taken. A resumed run therefore replays exactly the same
computation as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import io
import json
import math
import os
import platform
import re
import shlex
import signal
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Callable, TextIO

import jax
import numpy as np
from jax.experimental import multihost_utils

from train import checkpoint, data, models, plots, steps
from train.signals import Interrupted, StopFlag, catch_signals, reclaim_signals
from train.config import (Config, ConfigError, LAUNCH_FIELDS, MAX_STEPS, RUN_MARKERS,
                          TRAINING_FIELDS, check_out_dir, check_typed_options, resolve,
                          validate)

EXIT_INTERRUPTED = 130
EVAL_BATCH = 1000
# Fields of metrics.jsonl records that measure time: the only ones that
# differ between a resumed run and an uninterrupted one.
TIMING_FIELDS = frozenset({"step_time", "epoch_seconds", "images_per_second", "elapsed_seconds"})
JOIN_TIMEOUT_S = 120
RUN_CONFIG = "config.json"  # the run's settings, written before its first step
KEEP_CHECKPOINTS = 3


class RunError(Exception):
    """The run cannot start or continue; the message names the fix."""


# --------------------------------------------------------------------------
# output folder


def open_out_dir(out: Path, resume: bool) -> int:
    """Create --out, take its lock (returns the lock fd) and re-check it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create --out {out}: {e.strerror or e}") from None
    try:
        fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunError(f"--out {out} is not writable: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise RunError(
            f"another training run is writing to {out} (its .lock is held); wait for it "
            f"to finish or choose another --out") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    try:
        check_out_dir(str(out), resume)  # again, now that we hold the lock
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        os.close(fd)
        raise RunError(f"--out {out} is not writable: {e.strerror or e}") from None
    except ConfigError:
        os.close(fd)
        raise
    return fd


# The files of --out written through a temporary, and the writability probe:
# the names a kill can leave behind. A run holding the lock removes them.
ATOMIC_FILES = (RUN_CONFIG, "summary.json", *plots.FILES.values())
_PROBE = re.compile(r"^\.write-test-\d+$")


def remove_leftovers(out: Path) -> list[str]:
    """Delete temporaries of this program's killed writes in ``out`` (only those)."""
    leftovers = [plots.atomic_tmp(out / name) for name in ATOMIC_FILES]
    leftovers += [p for p in out.iterdir() if _PROBE.match(p.name)]
    removed = []
    for path in leftovers:
        # Only files (or links): a folder of that name is not ours.
        if path.is_symlink() or path.is_file():
            path.unlink()
            removed.append(path.name)
    return removed


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = plots.atomic_tmp(path)
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------
# resume configuration


def resume_config(explicit: dict[str, Any]) -> Config:
    """Config for ``--resume``: the checkpointed run's settings, with overrides.

    Options given on the command line must agree with the checkpoint for
    every setting that changes the computation; paths may differ. Options
    that the resulting settings would ignore are refused.
    """
    # Unchecked: the values are checked once merged with the saved settings.
    probe = resolve(Config(**explicit), check=False)
    found = checkpoint.latest_meta(Path(probe.out) / "checkpoints")
    if found is not None:
        check_meta(*found)
        saved = found[1]["config"]
    else:
        saved = _read_run_config(Path(probe.out) / RUN_CONFIG)
        if saved is None:
            validate(probe)
            check_typed_options(explicit, probe)
            return probe
    for key, value in explicit.items():
        if key in TRAINING_FIELDS and key in saved and saved[key] != value:
            was = "which does not set it" if saved[key] is None else saved[key]
            raise ConfigError(
                f"--{key.replace('_', '-')} {value} differs from the run in {probe.out} "
                f"({was}); drop the option to resume, or choose another --out")
    # The saved data_dir is where the files were (often JAXBN_DATA's value
    # then); where JAXBN_DATA points now wins, as its error messages advise.
    # The files are checksummed, so any copy trains alike.
    moved = ("data_dir",) if os.environ.get("JAXBN_DATA") else ()
    merged = {k: v for k, v in saved.items()
              if k in CONFIG_FIELDS and k not in ("out", "resume") + LAUNCH_FIELDS + moved}
    merged.update(explicit)
    merged.setdefault("out", probe.out)
    cfg = resolve(Config(**merged))
    check_typed_options(explicit, cfg)
    return cfg


def finished_summary(out: Path) -> dict | None:
    """The summary of the finished run in ``out``, or None if it has not finished.

    summary.json is written (atomically) after the last checkpoint, so its
    presence means the run is complete.
    """
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if isinstance(summary, dict) and isinstance(summary.get("test_accuracy"), float):
        return summary
    return None


def _read_run_config(path: Path) -> dict | None:
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise RunError(f"{path} is unreadable ({e}); remove it to resume with the options "
                       f"given on the command line") from None
    if not isinstance(saved, dict):
        return None
    check_settings(path, saved, RunError)
    return saved


# --------------------------------------------------------------------------
# progress


class Progress:
    """A progress bar on a terminal, one plain line per epoch otherwise."""

    def __init__(self, stream: TextIO, epochs: int, steps_per_epoch: int, batch_size: int):
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.epochs, self.spe, self.bs = epochs, steps_per_epoch, batch_size
        self._last = 0.0

    def step(self, epoch: int, index: int, loss: float, acc: float, ips: float) -> None:
        if not self.tty:
            return
        now = time.perf_counter()
        if now - self._last < 0.1 and index + 1 < self.spe:
            return
        self._last = now
        width = 24
        done = int(width * (index + 1) / self.spe)
        bar = "#" * done + "." * (width - done)
        self.stream.write(
            f"\repoch {epoch + 1}/{self.epochs} [{bar}] {index + 1}/{self.spe} "
            f"loss {loss:.4f} acc {100 * acc:5.1f}% {ips:7.0f} img/s")
        self.stream.flush()

    def epoch(self, rec: dict) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        if rec["train_loss"] is None:
            train = "train: no finite step"
        else:
            train = (f"train loss {rec['train_loss']:.4f} "
                     f"acc {100 * rec['train_accuracy']:.1f}%")
        self.stream.write(
            f"epoch {rec['epoch']}/{self.epochs}  {train}  test loss {_loss_text(rec['test_loss'])} "
            f"acc {100 * rec['test_accuracy']:.2f}%  {rec['images_per_second']:.0f} img/s  "
            f"{rec['epoch_seconds']:.1f} s\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()


# --------------------------------------------------------------------------
# signals


# --------------------------------------------------------------------------
# helpers


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _loss_text(loss: float | None) -> str:
    return "n/a" if loss is None else f"{loss:.4f}"


def versions() -> dict[str, str]:
    import flax
    import optax
    out = {"python": platform.python_version(), "jax": jax.__version__,
           "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__}
    try:
        import jaxlib
        out["jaxlib"] = jaxlib.__version__
    except ImportError:
        pass
    try:
        import jaxbn
        out["jaxbn"] = getattr(jaxbn, "__version__", "unknown")
    except ImportError:
        pass
    return out


def device_description(n: int) -> str:
    d = jax.devices()[0]
    text = f"{n} x {d.platform} ({getattr(d, 'device_kind', d.platform)})"
    return text + (f" in {jax.process_count()} processes" if jax.process_count() > 1 else "")


def state_digest(host_state) -> str:
    """SHA-256 of every parameter and statistic, to compare runs bit for bit."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(host_state):
        h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()


def evaluate(eval_step, state, x, y, batch_size: int, mesh) -> tuple[float, float]:
    """Mean loss and accuracy over every example, with running statistics."""
    loss_sum = correct = count = 0.0
    for xb, yb, mb in data.eval_batches(x, y, batch_size):
        out = steps.to_host(eval_step(state, steps.place_batch((xb, yb, mb), mesh)))
        loss_sum += float(out["loss_sum"])
        correct += float(out["correct"])
        count += float(out["count"])
    return loss_sum / count, correct / count


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


@dataclasses.dataclass
class Bookkeeping:
    """Host-side running totals; stored in checkpoints so resume is exact."""
    epoch: int = 0          # current epoch (0-based)
    batch: int = 0          # next batch index within the epoch
    loss_sum: float = 0.0   # over this epoch's finite steps
    acc_sum: float = 0.0
    finite_steps: int = 0
    epoch_images: int = 0
    epoch_step_time: float = 0.0
    bad_total: int = 0
    images_total: int = 0
    steady_time: float = 0.0    # step time excluding each segment's first (compiling) step
    steady_images: int = 0
    train_seconds: float = 0.0  # wall time spent in earlier segments
    last_lr: float | None = None
    last_epoch: dict | None = None

    def new_epoch(self, epoch: int) -> None:
        self.epoch, self.batch = epoch, 0
        self.loss_sum = self.acc_sum = self.epoch_step_time = 0.0
        self.finite_steps = self.epoch_images = 0

    def add_step(self, m: dict, images: int, seconds: float, *, compiling: bool) -> dict:
        """Account for one train step (host metrics ``m``); return its log record."""
        self.batch += 1
        finite = bool(m["finite"])
        loss, acc, lr = float(m["loss"]), float(m["accuracy"]), float(m["lr"])
        self.last_lr = lr
        self.images_total += images
        self.epoch_images += images
        self.epoch_step_time += seconds
        if not compiling:
            self.steady_time += seconds
            self.steady_images += images
        if finite:
            self.loss_sum += loss
            self.acc_sum += acc
            self.finite_steps += 1
        else:
            self.bad_total += 1
        return {"kind": "step", "step": None, "epoch": self.epoch + 1,
                "loss": _finite_or_none(loss), "accuracy": acc, "lr": lr,
                "grad_norm": _finite_or_none(float(m["grad_norm"])), "step_time": seconds,
                "finite": finite, "bad_steps": int(m["bad_steps"])}

    def epoch_record(self, step: int, test_loss: float, test_acc: float,
                     eval_seconds: float) -> dict:
        n = self.finite_steps
        return {"kind": "epoch", "epoch": self.epoch + 1, "step": step,
                "train_loss": self.loss_sum / n if n else None,
                "train_accuracy": self.acc_sum / n if n else None,
                # NaN is not JSON: diverged running statistics log null.
                "test_loss": _finite_or_none(test_loss), "test_accuracy": test_acc,
                "lr": self.last_lr,
                "epoch_seconds": self.epoch_step_time + eval_seconds,
                "images_per_second": self.epoch_images / max(self.epoch_step_time, 1e-9)}


# The JSON types of each annotation in Config and Bookkeeping: a number
# written as an integer is a fine float.
_JSON_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,),
               "dict": (dict,), "None": (type(None),)}


def _field_types(cls) -> dict[str, tuple[type, ...]]:
    """What each field of a dataclass may hold in JSON, from its annotation ("int | None")."""
    return {f.name: sum((_JSON_TYPES[t] for t in str(f.type).split(" | ")), ())
            for f in dataclasses.fields(cls)}


BOOKKEEPING_TYPES = _field_types(Bookkeeping)
CONFIG_TYPES = _field_types(Config)
CONFIG_FIELDS = frozenset(CONFIG_TYPES)
_RUN_META_TYPES = {"position": int, "metrics_bytes": int, "bookkeeping": dict, "config": dict}


def _holds(value: Any, kind) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # JSON true/false are not counts.
    return isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))


def _not_ours(path: Path, what: str, error=None) -> Exception:
    name = f"checkpoint {path}" if error is None else str(path)
    return (error or checkpoint.CheckpointError)(
        f"{name}: {what}; it was not written by this version of train: resume it "
        f"with the version that wrote it, or start a fresh --out")


def check_settings(path: Path, saved: dict[str, Any], error=None) -> None:
    """The saved settings of a run (checkpoint or config.json) are this version's.

    Older versions wrote fewer settings (the defaults apply); an unknown one
    comes from a newer version, and would be dropped silently.
    """
    unknown = sorted(saved.keys() - CONFIG_FIELDS)
    if unknown:
        what = f"unknown settings: {', '.join(unknown)}"
        if error is None:
            raise checkpoint.NewerCheckpointError(path, what)
        raise error(f"{path} was written by a newer version of train ({what}); upgrade train "
                    f"to resume it, or start a fresh --out")
    for key, value in saved.items():
        if not _holds(value, CONFIG_TYPES[key]):
            raise _not_ours(path, f"setting {_describe(key, value, CONFIG_TYPES[key])}", error)


def _describe(key: str, value: Any, kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    expected = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
    return f"{key} is {value!r:.40} ({type(value).__name__}), expected {expected}"


def check_meta(path: Path, meta: dict[str, Any]) -> None:
    """Refuse a checkpoint whose run fields this version cannot use exactly.

    Its checksum holds, so this is not damage but another version's layout:
    unknown fields come from a newer one (NewerCheckpointError). Neither is
    skipped for an older checkpoint, which would throw the newest away.
    """
    for key, kind in _RUN_META_TYPES.items():
        _check_field(path, key, meta, kind)
    unknown = sorted(meta["bookkeeping"].keys() - BOOKKEEPING_TYPES.keys())
    if unknown:
        raise checkpoint.NewerCheckpointError(
            path, f"unknown bookkeeping fields: {', '.join(unknown)}")
    check_settings(path, meta["config"])
    for key, kind in BOOKKEEPING_TYPES.items():
        _check_field(path, key, meta["bookkeeping"], kind, "bookkeeping field ")


def _check_field(path: Path, key: str, fields: dict, kind, label: str = "") -> None:
    if key not in fields:
        raise _not_ours(path, f"{label}{key} is missing")
    if not _holds(fields[key], kind):
        raise _not_ours(path, label + _describe(key, fields[key], kind))


def check_checkpoints(root: Path) -> None:
    """check_meta on every checkpoint whose meta.json reads, before --out changes.

    Damaged ones are left to restore_latest, which skips them with a warning.
    """
    for _, path in checkpoint.list_checkpoints(root):
        try:
            meta = checkpoint.read_meta(path)
        except checkpoint.NewerCheckpointError:
            raise
        except checkpoint.CheckpointError:
            continue
        check_meta(path, meta)


# --------------------------------------------------------------------------
# the run


def run(cfg: Config, *, stdout: TextIO | None = None, interrupt_at_step: int | None = None,
        load_data: Callable[..., data.Dataset] = data.load,
        started: float | None = None, stop: StopFlag | None = None) -> tuple[int, dict | None]:
    """Train as ``cfg`` says. Returns (exit code, summary or None).

    ``interrupt_at_step`` acts as if SIGINT arrived after that global step
    (used to test resuming); ``load_data`` replaces the data loader;
    ``started`` is the ``time.perf_counter()`` the cold start is measured
    from (default: now). ``stop``: a flag the caller already routes SIGINT
    and SIGTERM to (default: the run catches them while it trains); set
    before training starts, it raises :class:`Interrupted`.
    """
    started = time.perf_counter() if started is None else started
    stdout = stdout or sys.stdout
    out = Path(cfg.out)
    primary = cfg.process_id == 0

    def say(message: str) -> None:
        print(message, file=stdout, flush=True)

    # Whether the settings come from a run saved in --out (else the command line).
    saved_run = cfg.resume and any((out / m).exists() for m in RUN_MARKERS)
    if cfg.resume:
        summary = finished_summary(out)
        if summary is not None:
            if primary:
                if not all((out / name).exists() for name in plots.FILES.values()):
                    # killed while drawing them
                    _draw_plots(cfg, out, say)
                say(f"the run in {out} is already complete (test accuracy "
                    f"{100 * summary['test_accuracy']:.2f}%); nothing to resume")
            return 0, summary
        if primary and not saved_run:
            # Launch scripts of preemptible jobs pass --resume from the first start.
            say(f"nothing to resume in {out}: starting a new run")
    join_processes(cfg)
    check_same_settings(cfg)
    opts = norm_options(cfg)
    try:
        mesh = steps.make_mesh(cfg.devices)
    except ValueError as e:
        per_process = "" if cfg.num_processes == 1 else " in each process"
        simulate = (f"XLA_FLAGS=--xla_force_host_platform_device_count="
                    f"{cfg.devices // cfg.num_processes}{per_process}")
        if saved_run:
            raise ConfigError(
                f"the run in {cfg.out} was checkpointed on --devices {cfg.devices}, but only "
                f"{jax.device_count()} device(s) are visible; resume it where {cfg.devices} "
                f"are (on CPU: {simulate}) or start a new --out") from None
        if jax.devices()[0].platform == "cpu":
            raise ConfigError(f"{e}, or simulate {cfg.devices} CPU devices with "
                              f"{simulate}") from None
        raise ConfigError(str(e)) from None
    if primary:
        check_out_dir(cfg.out, cfg.resume)

    dataset = load_data(cfg.dataset, cfg.data_dir, download_missing=cfg.download,
                        base_url=cfg.base_url, limit_train=cfg.limit_train,
                        log=say)
    n_train = len(dataset.x_train)
    spe = data.steps_per_epoch(n_train, cfg.batch_size)
    if spe == 0:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} is larger than the {n_train} training examples; "
            f"lower --batch-size")
    total_steps = spe * cfg.epochs
    if total_steps > MAX_STEPS:
        raise ConfigError(
            f"--epochs {cfg.epochs} of {spe} steps each make {total_steps} steps, more than "
            f"the {MAX_STEPS} a 32-bit step counter holds; lower --epochs")
    eval_bs = _round_up(min(EVAL_BATCH, len(dataset.x_test)), cfg.devices)

    signum = agreed_stop(stop, cfg.num_processes)
    if signum:
        raise Interrupted(signum)
    train = functools.partial(_train, cfg, dataset, out, spe, total_steps, eval_bs, opts, mesh,
                              stdout, interrupt_at_step, started, stop)
    if not primary:
        # Process 0 alone writes --out; the others only read checkpoints.
        return train()
    lock_fd = open_out_dir(out, cfg.resume)
    try:
        if cfg.resume:
            check_checkpoints(out / "checkpoints")  # before config.json is rewritten
        for name in remove_leftovers(out):
            say(f"removed a leftover temporary file: {name}")
        # The settings, before anything else: a run killed before its first
        # checkpoint still resumes as itself.
        write_json_atomic(out / RUN_CONFIG, cfg.to_dict())
        return train()
    except BrokenPipeError:
        raise  # stdout's reader ended: not the folder's fault
    except OSError as e:
        # A full disk or quota: the last complete checkpoint is intact. The
        # settings may not be saved yet, so the hint keeps the command line.
        raise RunError(
            f"cannot write into --out {out}: {e.strerror or e}; make room there, then run "
            f"the same command with --resume to continue") from None
    finally:
        os.close(lock_fd)


def join_processes(cfg: Config) -> None:
    """Connect to the other processes of a multi-process run (jax.distributed)."""
    if cfg.num_processes == 1 or jax.distributed.is_initialized():
        return
    # CPU devices of different processes talk through gloo; GPUs and TPUs use
    # their own collectives whatever this says.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(cfg.coordinator, cfg.num_processes, cfg.process_id,
                                   initialization_timeout=JOIN_TIMEOUT_S)
    except Exception as e:  # jax raises bare RuntimeErrors/XlaRuntimeErrors here
        raise RunError(
            f"process {cfg.process_id} could not join the {cfg.num_processes}-process run at "
            f"--coordinator {cfg.coordinator} ({str(e).splitlines()[0]}); start every process "
            f"with the same --coordinator and --num-processes, process 0 on that host") from None
    reclaim_signals()


def check_same_settings(cfg: Config) -> None:
    """Refuse a multi-process run whose processes were given different settings.

    They would otherwise train diverging "replicated" states, or wait forever
    in collectives whose shapes differ.
    """
    if cfg.num_processes == 1:
        return
    values = cfg.training_dict()
    digests = np.array([zlib.crc32(json.dumps(values[k]).encode()) & 0x7FFFFFFF
                        for k in TRAINING_FIELDS], np.int32)
    gathered = np.asarray(multihost_utils.process_allgather(digests))
    differ = [k for j, k in enumerate(TRAINING_FIELDS) if (gathered[:, j] != gathered[0, j]).any()]
    if differ:
        flags = ", ".join("--" + k.replace("_", "-") for k in differ)
        raise ConfigError(
            f"the {cfg.num_processes} processes were started with different {flags}; "
            f"start every process with the same options (only --process-id differs)")


def check_same_start(resumed_from: int | None, num_processes: int) -> None:
    """Every process resumes from the same checkpoint (or none)."""
    if num_processes == 1:
        return
    starts = np.asarray(multihost_utils.process_allgather(
        np.int32(-1 if resumed_from is None else resumed_from)))
    if (starts != starts[0]).any():
        where = ", ".join(f"process {i}: {'the beginning' if s < 0 else f'step {s}'}"
                          for i, s in enumerate(starts.tolist()))
        raise ConfigError(
            f"the processes would start from different points ({where}); every process "
            f"must read the same --out, a folder they share")


def agreed_stop(flag: StopFlag | None, num_processes: int) -> int | None:
    """The signal to stop on: this process's, or in a multi-process run any process's.

    Every process must leave the loop after the same step: one that stopped
    alone would leave the others waiting in the next step's collectives. A
    signal sent to one process (a scheduler preempting one host) thus stops
    them all, each at a safe point, with one checkpoint.

    Only the agreed value decides, and the flag is set to it when it says
    stop, never cleared: a signal that arrives while the processes compare
    theirs stays in the flag for the next comparison.
    """
    local = flag.signum if flag else None
    if num_processes == 1:
        return local
    signums = multihost_utils.process_allgather(np.int32(local or 0))
    agreed = int(np.max(signums)) or None
    if agreed and flag is not None:
        flag.signum = agreed
    return agreed


def norm_options(cfg: Config) -> models.NormOptions:
    """Normalization settings; with several devices, batch norms sync over them."""
    groups = None
    if cfg.bn_group_size < cfg.devices:
        g = cfg.bn_group_size
        groups = tuple(tuple(range(i, i + g)) for i in range(0, cfg.devices, g))
    return models.NormOptions(
        momentum=cfg.bn_momentum, virtual_batch_size=cfg.virtual_batch_size,
        axis_name=steps.DATA_AXIS if cfg.devices > 1 else None, axis_index_groups=groups)


@functools.lru_cache(maxsize=16)
def compiled_steps(graphdefs, optimizer, schedule_name, lr, weight_decay, total_steps, mesh,
                   average_model_state=False):
    """Jitted state init, train and eval steps, shared by runs in one process.

    Keyed on everything the compiled programs depend on (graphdefs are
    hashable and equal for equal architectures), so several seeds run from a
    notebook or a test suite compile once.
    """
    schedule = steps.make_schedule(schedule_name, lr, total_steps)
    tx = steps.make_optimizer(optimizer, schedule, weight_decay)
    train_step, eval_step = steps.jit_steps(
        steps.make_train_step(graphdefs.train, tx, schedule,
                              axis_name=None if mesh is None else steps.DATA_AXIS,
                              average_model_state=average_model_state),
        steps.make_eval_step(graphdefs.eval), mesh)
    # One compiled program instead of an eager op (and a compilation) per
    # distinct parameter shape in the optimizer's init.
    init = jax.jit(lambda params, model_state, seed: steps.init_state(params, model_state, tx, seed))
    return init, train_step, eval_step


def _train(cfg, dataset, out, spe, total_steps, eval_bs, opts, mesh, stdout, interrupt_at_step,
           started, stop):
    model = models.build_model(cfg.model, dataset.input_shape, norm=cfg.norm, seed=cfg.seed,
                               opts=opts, mlp_depth=cfg.mlp_depth, mlp_width=cfg.mlp_width,
                               activation=cfg.activation)
    graphdefs, params, model_state = steps.split_model(model)
    param_count = int(sum(np.size(p) for p in jax.tree.leaves(params)))
    init, train_step, eval_step = compiled_steps(
        graphdefs, cfg.optimizer, cfg.schedule, cfg.lr, cfg.weight_decay, total_steps, mesh,
        average_model_state=opts.axis_index_groups is not None)
    primary = cfg.process_id == 0
    state = init(params, model_state, np.uint32(cfg.seed))

    ckpt_root = out / "checkpoints"
    metrics_path = out / "metrics.jsonl"
    book = Bookkeeping()
    resumed_from = None
    progress = Progress(stdout if primary else io.StringIO(), cfg.epochs, spe, cfg.batch_size)
    if cfg.resume:
        for p in checkpoint.remove_partial(ckpt_root) if primary else ():
            progress.message(f"removed an incomplete checkpoint write: {p.name}")
        restored = checkpoint.restore_latest(ckpt_root, state, warn=progress.message)
        if restored is not None:
            state, meta = restored
            check_meta(ckpt_root / f"ckpt-{meta['position']:09d}", meta)
            book = Bookkeeping(**meta["bookkeeping"])
            resumed_from = meta["position"]
            if primary:
                _truncate(metrics_path, meta["metrics_bytes"], progress)
            # The checkpoint after the last epoch leaves only the summary to write.
            where = (f"after epoch {cfg.epochs} of {cfg.epochs}" if book.epoch >= cfg.epochs
                     else f"epoch {book.epoch + 1}")
            progress.message(
                f"resuming from {ckpt_root.name}/ckpt-{resumed_from:09d} "
                f"({where}, step {resumed_from})")
        else:
            if checkpoint.list_checkpoints(ckpt_root):
                progress.message(f"no checkpoint in {ckpt_root} verifies (see the warnings "
                                 f"above); starting from the beginning")
            elif ckpt_root.exists() or metrics_path.exists():
                progress.message(f"no complete checkpoint in {ckpt_root}; starting from the beginning")
            if primary:
                _truncate(metrics_path, 0, progress)
    check_same_start(resumed_from, cfg.num_processes)
    state = steps.place_state(state, mesh)

    flag = stop if stop is not None else StopFlag()
    # A caller that passed its flag already routes the signals to it.
    signals = contextlib.nullcontext() if stop is not None else catch_signals(flag)
    segment_start = time.perf_counter()
    first_step = True
    cold_start = first_step_seconds = None  # of this segment (a resume is a new process)
    metrics_file = open(metrics_path if primary else os.devnull, "a")

    def save_checkpoint(replace: bool = False) -> Path:
        position = book.epoch * spe + book.batch
        if not primary:  # process 0 writes; the state is replicated, so it has all of it
            return ckpt_root / f"ckpt-{position:09d}"
        metrics_file.flush()
        os.fsync(metrics_file.fileno())
        bk = dataclasses.replace(book, train_seconds=book.train_seconds
                                 + time.perf_counter() - segment_start)
        meta = {"bookkeeping": dataclasses.asdict(bk), "config": cfg.to_dict(),
                "metrics_bytes": metrics_file.tell(), "created": time.time()}
        return checkpoint.save(ckpt_root, steps.to_host(state), meta, position=position,
                               keep=KEEP_CHECKPOINTS, replace=replace)

    def write(rec: dict) -> None:
        metrics_file.write(json.dumps(rec) + "\n")

    try:
        with signals:
            while book.epoch < cfg.epochs:
                epoch = book.epoch
                batches = data.train_batches(dataset.x_train, dataset.y_train, cfg.batch_size,
                                             seed=cfg.seed, epoch=epoch, start=book.batch,
                                             max_shift=cfg.augment_shift)
                for xb, yb in batches:
                    t0 = time.perf_counter()
                    state, m = train_step(state, steps.place_batch((xb, yb), mesh))
                    m = steps.to_host(m)
                    dt = time.perf_counter() - t0
                    rec = book.add_step(m, len(xb), dt, compiling=first_step)
                    if first_step:
                        cold_start, first_step_seconds = time.perf_counter() - started, dt
                    first_step = False
                    gstep = rec["step"] = epoch * spe + book.batch
                    write(rec)
                    if rec["bad_steps"] >= cfg.max_bad_steps:
                        metrics_file.flush()
                        raise RunError(
                            f"stopped at step {gstep}: {rec['bad_steps']} consecutive steps "
                            f"had a non-finite loss, gradient, parameter or running statistic; "
                            f"start a new run with a lower --lr, or check the data")
                    progress.step(epoch, book.batch - 1, m["loss"], m["accuracy"],
                                  len(xb) / dt if dt > 0 else 0.0)
                    if interrupt_at_step is not None and gstep == interrupt_at_step:
                        flag.signum = signal.SIGINT
                    if agreed_stop(flag, cfg.num_processes):
                        return _interrupted(cfg, flag, save_checkpoint, progress, gstep)

                t_eval = time.perf_counter()
                test_loss, test_acc = evaluate(eval_step, state, dataset.x_test, dataset.y_test,
                                               eval_bs, mesh)
                rec = book.epoch_record((epoch + 1) * spe, test_loss, test_acc,
                                        time.perf_counter() - t_eval)
                # since this process started: accuracy against wall time
                rec["elapsed_seconds"] = time.perf_counter() - started
                write(rec)
                progress.epoch(rec)
                book.last_epoch = {k: rec[k] for k in ("test_loss", "test_accuracy",
                                                       "train_loss", "train_accuracy")}
                book.new_epoch(epoch + 1)
                # A stop on the epoch's last step checkpointed this position
                # before the evaluation: replace it, or a resume from it
                # would evaluate again.
                save_checkpoint(replace=True)
                if agreed_stop(flag, cfg.num_processes):
                    return _interrupted(cfg, flag, save_checkpoint, progress, (epoch + 1) * spe)
    finally:
        # After a failed write the buffer still holds lines past the last
        # checkpoint, which a resume cuts anyway: closing must not raise again.
        with contextlib.suppress(OSError):
            metrics_file.close()

    train_seconds = book.train_seconds + time.perf_counter() - segment_start
    # Throughput without compilation: steps after each start's first. A run
    # of one step per start has none to measure.
    ips = book.steady_images / book.steady_time if book.steady_time > 0 else None
    summary = {
        "test_accuracy": book.last_epoch["test_accuracy"],
        "test_loss": book.last_epoch["test_loss"],
        "train_loss": book.last_epoch["train_loss"],
        "train_accuracy": book.last_epoch["train_accuracy"],
        "epochs": cfg.epochs,
        "steps": cfg.epochs * spe,
        "train_examples": len(dataset.x_train),
        "test_examples": len(dataset.x_test),
        "bad_steps": book.bad_total,
        "train_seconds": train_seconds,
        "images_per_second": ips,
        # From process start (or run()) to the first finished step: imports,
        # data, model init and compilation; the first step alone is mostly
        # compilation.
        "cold_start_seconds": cold_start,
        "first_step_seconds": first_step_seconds,
        "param_count": param_count,
        "norm_impl": models.norm_implementation(cfg.norm),
        "resumed_from_step": resumed_from,
        "config": cfg.to_dict(),
        "versions": versions(),
        "device": device_description(cfg.devices),
        "state_sha256": state_digest(steps.to_host(state)),
    }
    if not primary:
        print(f"process {cfg.process_id}/{cfg.num_processes} done: test accuracy "
              f"{100 * summary['test_accuracy']:.2f}%, state sha256 {summary['state_sha256']}",
              file=stdout, flush=True)
        return 0, summary
    write_json_atomic(out / "summary.json", summary)
    written = ["summary.json", "metrics.jsonl"]
    if _draw_plots(cfg, out, progress.message):
        written += plots.FILES.values()
    progress.message(f"wrote {', '.join(written)} and checkpoints/ in {out}")
    speed = ("no images/s: they are measured after the first step, the only one" if ips is None
             else f"{ips:.0f} images/s after the first step")
    progress.message(
        f"test accuracy {100 * summary['test_accuracy']:.2f}% (test loss "
        f"{_loss_text(summary['test_loss'])}) in {train_seconds:.1f} s, {speed}")
    return 0, summary


def _draw_plots(cfg: Config, out: Path, warn: Callable[[str], None]) -> bool:
    """Draw the plots of the run in ``out``; False (after a warning) if they failed."""
    try:
        plots.plot_run(plots.read_metrics(out / "metrics.jsonl"), out,
                       title=f"{cfg.dataset} {cfg.model} norm={cfg.norm} seed={cfg.seed}")
    except Exception as e:  # plots are a convenience; never lose a finished run over them
        # Resuming a finished run draws missing plots.
        warn(f"warning: could not draw plots: {e}; once that is fixed, python -m train "
             f"--out {shlex.quote(str(out))} --resume draws them")
        return False
    return True


def _interrupted(cfg, flag, save_checkpoint, progress, gstep) -> tuple[int, None]:
    path = save_checkpoint()
    name = signal.Signals(flag.signum).name
    # --resume reads every setting back from the checkpoint.
    progress.message(
        f"{name}: stopped after step {gstep}; checkpoint saved in {path}. "
        f"Resume with: python -m train --out {shlex.quote(str(cfg.out))} --resume")
    return EXIT_INTERRUPTED if flag.signum == signal.SIGINT else 128 + flag.signum, None


def _truncate(path: Path, size: int, progress: Progress) -> None:
    """Cut metrics.jsonl back to ``size`` bytes (its length at the checkpoint)."""
    if not path.exists():
        if size:
            progress.message(f"warning: {path} is missing; the resumed log starts mid-run")
        return
    current = path.stat().st_size
    if current < size:
        progress.message(f"warning: {path} is shorter than at the checkpoint; keeping it as is")
        return
    with open(path, "r+b") as f:
        f.truncate(size)
