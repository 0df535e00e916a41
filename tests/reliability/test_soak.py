"""The soak benchmark: its compile counter works, and steady training never recompiles."""

import json
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from reliability_helpers import REPO, cli_env

from benchmarks import soak
from benchmarks.soak import CompileCounter, slope_per_1000


def test_compile_counter_counts_each_new_compilation():
    f = jax.jit(lambda x: x * 3.0 + 1.0)
    with CompileCounter() as counter:
        f(np.ones(7, np.float32))
        f(np.ones(7, np.float32))  # cached
        f(np.ones(8, np.float32))  # a new shape compiles again
    # Each compilation traces at least once (older JAX reports more trace
    # events per compilation); the cached call adds nothing.
    assert counter.compiles == 2 and counter.traces >= 2
    counted = (counter.compiles, counter.traces)
    f(np.ones(9, np.float32))  # after unregistering: not counted
    assert (counter.compiles, counter.traces) == counted


def test_slope_is_per_1000_steps():
    # 0.5 MiB per 100 steps; float64 least squares is exact to rounding.
    assert slope_per_1000([(100, 10.0), (200, 10.5), (300, 11.0)]) == pytest.approx(5.0, rel=1e-12)


def test_fifty_steps_after_warm_up_compile_nothing(tmp_path):
    # Batch 64: 22 steps per epoch, so the 28 steps after the one-epoch
    # warm-up include another evaluation and checkpoint.
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--steps", "50", "--batch-size", "64",
         "--every", "5", "--json", str(out)],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert (r["steps"], r["warmup_steps"], r["steps_per_epoch"]) == (50, 22, 22)
    assert r["compiles_in_warmup"] >= 3  # init, train and eval steps at least
    assert r["compiles_after_warmup"] == 0 and r["traces_after_warmup"] == 0
    assert "after warm-up: 0 compilations, 0 traces" in proc.stdout
    assert r["rss_end_mib"] > 0 and len(r["samples"]) == 7  # at 22, 27, ..., 47, and 50


def _no_training(*args, **kwargs):
    raise AssertionError("trained before checking the arguments")


@pytest.mark.parametrize("steps, warmup, message", [
    (5, 0, "--warmup 0: must be at least 1"),
    (5, 6, "--steps 5 ends before the warm-up of 6 steps"),
    (5, None, "--steps 5 ends before the warm-up of 44 steps (one epoch; set --warmup)"),
])
def test_a_warm_up_outside_the_run_is_refused_before_training(monkeypatch, steps, warmup,
                                                             message):
    # --warmup 0 used to train every step and then blame the run's length.
    monkeypatch.setattr("train.models.build_model", _no_training)
    with pytest.raises(ValueError, match=re.escape(message)):
        soak.soak(steps, warmup=warmup, batch_size=32)


def test_a_batch_larger_than_the_data_is_refused(monkeypatch):
    # With no full batch, every epoch was empty and the step loop never ended.
    monkeypatch.setattr("train.models.build_model", _no_training)
    with pytest.raises(ValueError, match="--batch-size 5000 is larger than the"):
        soak.soak(5, warmup=1, batch_size=5000)


@pytest.mark.parametrize("target, problem", [("missing/soak.json", "No such file or directory"),
                                             (".", "Is a directory")])
def test_an_unwritable_json_path_is_refused_before_training(monkeypatch, capsys, tmp_path,
                                                            target, problem):
    # The JSON is written after the soak: a bad path used to cost a whole run.
    monkeypatch.setattr("train.models.build_model", _no_training)
    monkeypatch.setattr(soak, "apply_malloc_settings", lambda glibc_defaults: "untouched")
    path = tmp_path / target
    with pytest.raises(SystemExit) as e:
        soak.main(["--steps", "5", "--warmup", "1", "--json", str(path)])
    assert e.value.code == 2
    assert f"--json {path}: {problem}; choose another path" in capsys.readouterr().err


def test_an_interrupted_json_write_keeps_the_previous_file(monkeypatch, tmp_path):
    # It was written in place: a full disk left a truncated JSON.
    import errno
    import pathlib

    monkeypatch.setattr(soak, "apply_malloc_settings", lambda glibc_defaults: "untouched")
    monkeypatch.setattr(soak, "soak", lambda *args, **kwargs: {"steps": 5})
    monkeypatch.setattr(soak, "report", lambda r: "soak: 5 steps")
    path = tmp_path / "soak.json"
    path.write_text('{"steps": 5000}\n')

    def write_bytes(target, data, *args, **kwargs):
        with target.open("wb") as f:
            f.write(data[:3])  # stopped midway, as by a full disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)
    with pytest.raises(OSError, match="No space left"):
        soak.main(["--steps", "5", "--json", str(path)])
    assert [f.name for f in tmp_path.iterdir()] == ["soak.json"]  # no temporary
    assert path.read_text() == '{"steps": 5000}\n'


def test_a_tilde_the_shell_left_in_json_means_the_home_folder(monkeypatch, tmp_path):
    # --json=~/soak.json was refused: no folder named ~ in the current one.
    monkeypatch.setattr(soak, "apply_malloc_settings", lambda glibc_defaults: "untouched")
    monkeypatch.setattr(soak, "soak", lambda *args, **kwargs: {"steps": 5})
    monkeypatch.setattr(soak, "report", lambda r: "soak: 5 steps")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert soak.main(["--steps", "5", "--json=~/soak.json"]) == 0
    assert json.loads((tmp_path / "soak.json").read_text())["steps"] == 5


def test_a_json_path_in_a_read_only_folder_is_refused_before_training(monkeypatch, capsys,
                                                                      tmp_path):
    # The file itself can be appended to, but the temporary written beside it
    # cannot be created: that used to show only after the soak.
    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("train.models.build_model", _no_training)
    monkeypatch.setattr(soak, "apply_malloc_settings", lambda glibc_defaults: "untouched")
    monkeypatch.setattr(soak.tempfile, "TemporaryFile", read_only)
    path = tmp_path / "soak.json"
    path.write_text("{}\n")
    with pytest.raises(SystemExit) as e:
        soak.main(["--steps", "5", "--warmup", "1", "--json", str(path)])
    assert e.value.code == 2
    assert f"--json {path}: Permission denied; choose another path" in capsys.readouterr().err
