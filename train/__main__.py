"""``python -m train``: parse the command line, run, turn known errors into one line."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from train.allocator import tune_malloc
from train.config import (Config, ConfigError, check_out_dir, check_typed_options, explicit_args,
                          resolve)
from train.signals import Interrupted, StopFlag, catch_signals

STARTED = time.perf_counter()  # before jax is imported: the cold start counts from here

PROG = "python -m train"
INTERRUPTED = "interrupted; --resume continues from the last complete checkpoint, if there is one"


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def _interrupted(signum: int) -> int:
    return _fail(INTERRUPTED, 130 if signum == signal.SIGINT else 128 + signum)


def _stdout_closed(cfg: Config) -> int:
    """Stop as SIGPIPE would (``python -m train | head``), with a line saying how to go on."""
    # Every later write, and the flush at exit, would fail again.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    from train.loop import finished_summary
    if finished_summary(Path(cfg.out)) is not None:
        return _fail(f"stdout was closed (the reader of its pipe ended) after the run finished; "
                     f"its results are in {cfg.out}", 128 + signal.SIGPIPE)
    return _fail(f"stdout was closed (the reader of its pipe ended), so the run stopped; "
                 f"continue it with: python -m train --out {cfg.out} --resume",
                 128 + signal.SIGPIPE)


def main(argv=None) -> int:
    # From the first line on, SIGINT/SIGTERM only set a flag: checked after
    # the imports and data loading, and between training steps.
    stop = StopFlag()
    with catch_signals(stop):
        return _main(argv, stop)


def _main(argv, stop: StopFlag) -> int:
    tune_malloc()  # before JAX allocates: see train/allocator.py
    try:
        explicit = explicit_args(argv)
        # Cheap checks before importing jax; a resume checks the values and
        # options against the checkpointed settings (loop.resume_config).
        resume = explicit.get("resume", False)
        cfg = resolve(Config(**explicit), check=not resume)
        if not resume:
            check_typed_options(explicit, cfg)
        if cfg.process_id == 0:  # the only process that writes --out
            check_out_dir(cfg.out, cfg.resume)
    except ConfigError as e:
        return _fail(str(e), 2)
    from train.data import DataError, check_present
    try:
        # A resumed run's dataset is the checkpointed one; loading it checks its files.
        if not cfg.resume:
            check_present(cfg.dataset, cfg.data_dir, cfg.download)
    except DataError as e:
        return _fail(str(e), 1)
    try:
        from train import loop, steps
        from train.checkpoint import CheckpointError
        # Processes of a multi-process run stop together (loop.agreed_stop).
        if stop and cfg.num_processes == 1:
            return _interrupted(stop.signum)
        try:
            if cfg.resume:
                cfg = loop.resume_config(explicit)
            steps.use_compile_cache(cfg.compile_cache)
            code, _ = loop.run(cfg, started=STARTED, stop=stop)
            return code
        except Interrupted as e:
            return _interrupted(e.signum)
        except BrokenPipeError:
            return _stdout_closed(cfg)
        except ConfigError as e:
            return _fail(str(e), 2)
        except (DataError, loop.RunError, CheckpointError) as e:
            # Known, user-fixable failures get one line; anything else is a
            # bug and keeps its traceback.
            return _fail(str(e), 1)
    except KeyboardInterrupt:  # a second SIGINT: the default handler is back
        return _fail(INTERRUPTED, 130)


if __name__ == "__main__":
    sys.exit(main())
