"""Helpers and fixtures for the reliability tests: real ``python -m train`` processes.

No conftest.py here: tests/train/test_cli.py does ``from conftest import``,
which gets whichever conftest module pytest loaded last, so a second one
would break it for some orders of command-line paths. Test modules import
the fixtures they use from this module instead.

Every run here is the same tiny digits configuration, so one uninterrupted
in-process run (``reference``) is the independent answer that killed,
corrupted and resumed runs must reproduce bit for bit.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from train import loop

REPO = Path(__file__).resolve().parents[2]

# 20 epochs of 10 steps: an epoch lasts tens of milliseconds after the
# compile, so a checkpoint is written every few tens of milliseconds and a
# kill can land anywhere (step, evaluation, checkpoint write, summary, plots).
EPOCHS, STEPS_PER_EPOCH = 20, 10
TINY = dict(model="mlp", limit_train=320, batch_size=32, epochs=EPOCHS)
TINY_ARGS = ["--model", "mlp", "--limit-train", "320", "--batch-size", "32",
             "--epochs", str(EPOCHS)]
TIMING_KEYS = loop.TIMING_FIELDS


def cli_env(**extra) -> dict[str, str]:
    # Drop the test suite's 8 simulated devices: a user's process has one.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(MPLBACKEND="Agg", JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def train_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "train", *map(str, args)]


def run_cli(*args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(*args), cwd=REPO, env=cli_env(), capture_output=True,
                          text=True, timeout=timeout)


@contextlib.contextmanager
def running(cmd: list[str]) -> Iterator[subprocess.Popen]:
    """``cmd`` started in the background; killed on leaving if it still runs."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_until(predicate, proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Poll ``predicate`` every millisecond while ``proc`` runs; False if it never held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.001)
    return False


def holds_lock(out: Path, proc: subprocess.Popen):
    """True once ``proc`` has taken --out's lock (it writes its pid there)."""
    def check():
        try:
            return (out / ".lock").read_text().strip() == str(proc.pid)
        except OSError:
            return False
    return check


def assert_one_line_error(proc, *fragments) -> str:
    assert proc.returncode not in (0, None), proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def records(out: Path) -> list[dict]:
    with open(out / "metrics.jsonl") as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
                for line in f]


def final_arrays(out: Path) -> list[np.ndarray]:
    from train import checkpoint
    _, path = checkpoint.list_checkpoints(out / "checkpoints")[-1]
    with np.load(path / checkpoint.STATE_FILE) as npz:
        return [npz[k] for k in sorted(npz.files, key=lambda k: int(k[1:]))]


def assert_same_run(out: Path, ref: Path) -> None:
    """``out`` finished with exactly the results, log and state of ``ref``."""
    got = json.loads((out / "summary.json").read_text())
    want = json.loads((ref / "summary.json").read_text())
    for key in ("test_accuracy", "test_loss", "train_loss", "train_accuracy", "steps"):
        assert got[key] == want[key], key
    assert records(out) == records(ref)
    a, b = final_arrays(out), final_arrays(ref)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


@functools.lru_cache(maxsize=None)
def _reference_run(base: Path) -> Path:
    from train.config import Config, resolve
    out = base / "reference" / "run"
    code, _ = loop.run(resolve(Config(out=str(out), **TINY)), stdout=io.StringIO())
    assert code == 0
    return out


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Path:
    """The tiny run, uninterrupted, in this process; run once however many modules ask."""
    return _reference_run(tmp_path_factory.getbasetemp())
