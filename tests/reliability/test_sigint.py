"""SIGINT / SIGTERM from outside: exit code, one clean line, a checkpoint that verifies.

tests/train/test_cli.py already interrupts a run once and resumes it; these
pin the exact message, check the checkpoint it names, and cover SIGTERM and
an interrupt during start-up.
"""

import random
import re
import signal
import subprocess

from reliability_helpers import (TINY_ARGS, assert_same_run, run_cli, running, train_cmd,
                                 wait_until)
from reliability_helpers import reference  # noqa: F401  (a fixture)

from train import checkpoint

STOPPED = re.compile(r"^(SIGINT|SIGTERM): stopped after step (\d+); checkpoint saved in (\S+)\. "
                     r"Resume with: python -m train --out (\S+) --resume$")


def signal_mid_run(out, signum):
    """Start the tiny run, send ``signum`` once it has written a checkpoint."""
    with running(train_cmd(*TINY_ARGS, "--out", out)) as proc:
        assert wait_until(lambda: checkpoint.list_checkpoints(out / "checkpoints"), proc), (
            proc.communicate())
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    return proc.returncode, stdout, stderr


def check_stopped(out, signum, returncode, stdout, stderr) -> str:
    """Exit 128+signum, one line naming a verified checkpoint; returns the resume --out."""
    assert returncode == 128 + signum and stderr == ""
    last = stdout.splitlines()[-1]
    match = STOPPED.match(last)
    assert match, last
    name, step, path, resume_out = match.groups()
    assert name == signum.name
    assert sum(signum.name in line for line in stdout.splitlines()) == 1
    # The named checkpoint is the newest, holds the step it names and verifies.
    position, newest = checkpoint.list_checkpoints(out / "checkpoints")[-1]
    assert path == str(newest) and position == int(step)
    assert checkpoint._verifies(newest)
    assert not (out / "summary.json").exists()
    return resume_out


def test_sigint_mid_run_then_the_resume_it_names_equals_the_uninterrupted_run(
        tmp_path, reference):
    out = tmp_path / "run"
    resume_out = check_stopped(out, signal.SIGINT, *signal_mid_run(out, signal.SIGINT))
    assert resume_out == str(out)
    resumed = run_cli("--out", resume_out, "--resume")
    assert resumed.returncode == 0 and resumed.stderr == "", resumed.stderr
    assert_same_run(out, reference)


def test_sigterm_mid_run_saves_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    check_stopped(out, signal.SIGTERM, *signal_mid_run(out, signal.SIGTERM))


def test_sigint_during_start_up_exits_130_with_one_line(tmp_path):
    rng = random.Random(7)
    during_start_up = 0
    for i in range(3):
        with running(train_cmd(*TINY_ARGS, "--out", tmp_path / f"run{i}")) as proc:
            try:
                proc.wait(timeout=rng.uniform(0.5, 3.0))  # while jax imports, data loads
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)
            stdout, stderr = proc.communicate(timeout=120)
        if "SIGINT: stopped after step" in stdout:
            continue  # it had reached the training loop: the tests above cover that
        assert (proc.returncode, stderr) == (130, "python -m train: error: interrupted; "
                                             "--resume continues from the last complete "
                                             "checkpoint, if there is one\n")
        during_start_up += 1
    # Start-up takes seconds (imports, data, compilation): at least one of the
    # signals, sent 0.5 to 3 s in, must have landed there.
    assert during_start_up
