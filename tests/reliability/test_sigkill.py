"""SIGKILL at arbitrary moments, then --resume: the result is the uninterrupted run's.

SIGKILL cannot be caught, so these tests check the on-disk protocol itself:
atomic checkpoint folders, metrics.jsonl cut back to the checkpoint, a lock
that dies with its process.
"""

import random
import signal
import subprocess
import sys

import pytest

from reliability_helpers import (REPO, STEPS_PER_EPOCH, TINY_ARGS, assert_same_run, cli_env,
                                 holds_lock, run_cli, running, train_cmd, wait_until)
from reliability_helpers import reference  # noqa: F401  (a fixture)

from train import checkpoint


def newest_position(out):
    found = checkpoint.list_checkpoints(out / "checkpoints")
    return found[-1][0] if found else 0


def kill_run(cmd, out, rng, anchored: bool) -> str:
    """Start ``cmd``, SIGKILL it at a random moment; describe where it was."""
    with running(cmd) as proc:
        assert wait_until(holds_lock(out, proc), proc), proc.communicate()
        if anchored:
            # After a checkpoint of this segment: the kill lands mid-training.
            first = newest_position(out)
            wait_until(lambda: newest_position(out) > first, proc)
            delay = rng.uniform(0, 0.1)
        else:
            delay = rng.uniform(0, 3.0)  # compile, training, summary or plots
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    if proc.returncode == 0:
        return "finished before the kill"
    assert proc.returncode == -signal.SIGKILL, proc.returncode
    return f"killed {delay:.3f} s later, newest checkpoint at step {newest_position(out)}"


@pytest.mark.slow
def test_random_sigkills_then_resume_equal_the_uninterrupted_run(tmp_path, reference):
    rng = random.Random(20240607)
    out = tmp_path / "run"
    cmd = train_cmd(*TINY_ARGS, "--out", out)
    landed = []
    for anchored in (False, True, True):
        landed.append(kill_run(cmd, out, rng, anchored))
        cmd = train_cmd(*TINY_ARGS, "--out", out, "--resume")
    final = run_cli(*TINY_ARGS, "--out", out, "--resume")
    assert final.returncode == 0, final.stderr
    assert "Traceback" not in final.stderr
    print("\n".join(landed))
    assert_same_run(out, reference)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


# Runs python -m train with checkpoint._write_synced replaced: the Nth write
# stores its bytes (all of them, or the first half: a torn write) and then the
# process SIGKILLs itself, before the checkpoint folder is renamed into place.
DIE_ON_WRITE = """
import os, signal, sys
from train import checkpoint
from train.__main__ import main
nth, torn = int(sys.argv[1]), sys.argv[2] == "torn"
real, calls = checkpoint._write_synced, [0]
def write_then_die(path, data):
    calls[0] += 1
    if calls[0] < nth:
        return real(path, data)
    real(path, data[: len(data) // 2] if torn else data)
    os.kill(os.getpid(), signal.SIGKILL)
checkpoint._write_synced = write_then_die
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("nth, torn, resumes_from", [
    (1, "torn", None),                      # half of the first state.npz
    (4, "whole", STEPS_PER_EPOCH),          # second checkpoint complete but not renamed
], ids=["torn-first-state", "unrenamed-second-checkpoint"])
def test_sigkill_during_a_checkpoint_write(tmp_path, reference, nth, torn, resumes_from):
    out = tmp_path / "run"
    killed = subprocess.run(
        [sys.executable, "-c", DIE_ON_WRITE, str(nth), torn, *TINY_ARGS, "--out", str(out)],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=180)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    ckpts = out / "checkpoints"
    leftovers = [p.name for p in ckpts.iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1
    assert [pos for pos, _ in checkpoint.list_checkpoints(ckpts)] == (
        [resumes_from] if resumes_from else [])

    resumed = run_cli(*TINY_ARGS, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"removed an incomplete checkpoint write: {leftovers[0]}" in resumed.stdout
    if resumes_from:
        assert f"resuming from checkpoints/ckpt-{resumes_from:09d}" in resumed.stdout
    else:
        assert "no complete checkpoint" in resumed.stdout
    assert_same_run(out, reference)
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".tmp-")]


def test_bare_resume_before_the_first_checkpoint_keeps_the_run_settings(tmp_path):
    from train import loop
    out = tmp_path / "run"
    killed = subprocess.run(
        [sys.executable, "-c", DIE_ON_WRITE, "1", "whole", *TINY_ARGS, "--out", str(out)],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=180)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (out / "metrics.jsonl").stat().st_size > 0  # the run had started training
    cfg = loop.resume_config({"out": str(out), "resume": True})
    assert (cfg.model, cfg.epochs, cfg.limit_train) == ("mlp", 20, 320)
