"""SIGINT/SIGTERM as a flag that the run checks at safe points (no jax imports).

``python -m train`` routes the signals to a flag from its first line on, so
an interrupt during the imports, the data loading or the compilation never
lands as a KeyboardInterrupt inside jax: it is seen at the next check and
the run stops cleanly (after a step, with a checkpoint).
"""

from __future__ import annotations

import contextlib
import signal
import threading


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it between steps."""

    def __init__(self):
        self.signum: int | None = None

    def __bool__(self):
        return self.signum is not None


class Interrupted(Exception):
    """A signal arrived before training started; nothing was written."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def catch_signals(flag: StopFlag):
    """Route SIGINT/SIGTERM to ``flag`` inside the block (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return

    def handler(signum, frame):
        flag.signum = signum
        # A second signal interrupts at once (the default behaviour).
        signal.signal(signum, previous[signum])

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def reclaim_signals() -> None:
    """Make Python's handlers for SIGINT/SIGTERM the active ones again.

    ``jax.distributed.initialize`` installs a native SIGTERM handler (for its
    preemption notices) over Python's, which then never runs although
    ``signal.getsignal`` still reports it. Installing it again puts it back.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for s in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(s)
        if handler is not None:
            signal.signal(s, handler)
