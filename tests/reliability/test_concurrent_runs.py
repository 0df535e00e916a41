"""Two live ``python -m train`` processes on one --out: the second is refused.

tests/train/test_loop.py holds the lock from the test process itself; here
the holder is a real run, stopped with SIGSTOP while it holds the lock so that
the second process meets it deterministically, whatever the machine's speed.
"""

import hashlib
import signal

from reliability_helpers import (TINY_ARGS, assert_one_line_error, assert_same_run, holds_lock,
                                 run_cli, running, train_cmd, wait_until)
from reliability_helpers import reference  # noqa: F401  (a fixture)


def snapshot(folder):
    """Every file under ``folder`` with its SHA-256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_run_into_a_busy_out_dir_is_refused_and_changes_nothing(tmp_path, reference):
    out = tmp_path / "run"
    with running(train_cmd(*TINY_ARGS, "--out", out)) as first:
        assert wait_until(holds_lock(out, first), first), first.communicate()
        first.send_signal(signal.SIGSTOP)
        try:
            before = snapshot(out)
            # --resume gets past the "already holds a run" check to the lock.
            second = run_cli(*TINY_ARGS, "--out", out, "--resume")
            after = snapshot(out)
        finally:
            first.send_signal(signal.SIGCONT)
        first.communicate(timeout=180)
    assert second.returncode == 1
    assert_one_line_error(second, f"another training run is writing to {out} (its .lock is "
                                  "held); wait for it to finish or choose another --out")
    assert after == before  # not even the lock file's pid was touched
    assert first.returncode == 0
    assert_same_run(out, reference)  # the first run was not disturbed
