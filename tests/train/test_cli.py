"""The command line, through a real subprocess: exit codes and one-line errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, cli_env, run_cli


def assert_one_line_error(proc, *fragments):
    assert proc.returncode not in (0, None), proc.stdout
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("args, fragments", [
    (["--norm", "bogus"], ["--norm", "invalid choice: 'bogus'"]),
    (["--dataset", "cifar10"], ["--dataset", "invalid choice"]),
    (["--model", "vgg"], ["--model", "invalid choice"]),
    (["--batch-size", "0"], ["--batch-size must be at least 1"]),
    (["--epochs", "0"], ["--epochs must be at least 1"]),
    (["--lr", "fast"], ["--lr", "expected a number"]),
    (["--compile-cache", ""], ["--compile-cache needs a folder, or 'off'"]),
    (["--seed", "4294967296"], ["--seed must be in [0, 2**32)"]),
    (["--lr", "inf"], ["--lr must be a finite number"]),
    (["--activation", "relu"], ["--activation only applies to --model mlp", "drop --activation"]),
])
def test_bad_arguments_exit_2_with_one_line(args, fragments):
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert_one_line_error(proc, *fragments)


def test_help_lists_the_pinned_options():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for flag in ("--dataset", "--data-dir", "--model", "--norm", "--epochs", "--batch-size",
                 "--lr", "--seed", "--out", "--resume", "--devices"):
        assert flag in proc.stdout


def test_missing_data_folder(tmp_path):
    proc = run_cli("--dataset", "mnist", "--data-dir", tmp_path, "--out", tmp_path / "o",
                   env=cli_env(JAXBN_DATA=""))
    assert_one_line_error(proc, f"{tmp_path}/mnist is not a folder", "--download")
    assert not (tmp_path / "o").exists()  # nothing created for a run that cannot start


def test_corrupt_data_names_the_file(tmp_path, data_dir):
    shutil.copytree(data_dir / "mnist", tmp_path / "mnist")
    bad = tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz"
    bad.chmod(0o644)
    bad.write_bytes(bad.read_bytes()[:1000])
    proc = run_cli("--dataset", "mnist", "--data-dir", tmp_path, "--out", tmp_path / "o")
    assert_one_line_error(proc, str(bad), "truncated")


def test_out_path_that_is_a_file_or_under_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_cli("--out", blocker)
    assert_one_line_error(proc, "exists and is not a directory")
    proc = run_cli("--out", blocker / "run")
    assert_one_line_error(proc, f"{blocker} is not a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_out_dir_without_write_permission(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    proc = run_cli("--out", ro / "run", "--limit-train", "64", "--epochs", "1")
    assert_one_line_error(proc, "cannot create --out")


def test_existing_run_is_refused(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    proc = run_cli("--out", out)
    assert_one_line_error(proc, "already holds a run", "--resume")


def test_resume_names_a_dataset_mismatch_before_the_missing_files(tmp_path):
    from train.config import Config, resolve
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(resolve(Config(out=str(out))).to_dict()))
    proc = run_cli("--out", out, "--resume", "--dataset", "mnist", env=cli_env(JAXBN_DATA=""))
    assert proc.returncode == 2
    assert_one_line_error(proc, "--dataset mnist differs from the run")


def test_resume_checks_typed_options_against_the_run_not_the_defaults(tmp_path):
    # --batch-size 1 is fine for this layer-norm run; only the default --norm
    # batch, which the run does not use, needs 2 examples per batch.
    from train.config import Config, resolve
    out = tmp_path / "run"
    out.mkdir()
    cfg = resolve(Config(out=str(out), norm="layer", batch_size=1))
    (out / "config.json").write_text(json.dumps(cfg.to_dict()))
    (out / "summary.json").write_text(json.dumps({"test_accuracy": 0.5}))
    proc = run_cli("--out", out, "--resume", "--batch-size", "1")
    assert proc.returncode == 0, proc.stderr
    assert "already complete" in proc.stdout


@pytest.mark.parametrize("resume", [[], ["--resume"]], ids=["new", "resume-with-nothing-saved"])
def test_too_many_devices(tmp_path, resume):
    # With nothing in --out, --resume starts a new run: no checkpoint chose the devices.
    proc = run_cli("--devices", "4", "--batch-size", "32", "--out", tmp_path / "o", *resume)
    assert_one_line_error(proc, "--devices 4 but only 1 cpu device(s) are visible; lower "
                                "--devices, or simulate 4 CPU devices with "
                                "XLA_FLAGS=--xla_force_host_platform_device_count=4")
    assert not (tmp_path / "o").exists()


TINY = ["--model", "mlp", "--limit-train", "320", "--batch-size", "32", "--epochs", "2"]


def test_cli_run_writes_the_documented_outputs(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(*TINY, "--out", out)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("test accuracy ") and "images/s" in last
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["steps"] == 20
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 22 and all(json.loads(x) for x in lines)
    assert {p.name for p in out.iterdir()} >= {
        "metrics.jsonl", "summary.json", "loss.png", "accuracy.png", "checkpoints"}


def _cache_entries(directory, prefix=""):
    if not directory.exists():
        return []
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(prefix))


def test_compile_cache_is_reused_with_identical_results(tmp_path):
    # The CNN's train step compiles for seconds on CPU (JAX keeps programs
    # that take over one; smaller ones such as the eval step may cross that
    # line on a loaded machine, so only the train step's entry is checked);
    # loaded from the cache, it must give the very same run, and the first
    # step must be quicker.
    cache = tmp_path / "xla"
    args = ["--limit-train", "256", "--epochs", "1", "--compile-cache", cache]
    summaries = []
    for i in range(2):
        proc = run_cli(*args, "--out", tmp_path / f"run{i}")
        assert proc.returncode == 0, proc.stderr
        summaries.append(json.loads((tmp_path / f"run{i}" / "summary.json").read_text()))
        if i == 0:
            written = _cache_entries(cache)
            train_step = _cache_entries(cache, "jit_train_step")
            assert len(train_step) == 1, written
    assert _cache_entries(cache, "jit_train_step") == train_step  # the same program
    assert summaries[1]["state_sha256"] == summaries[0]["state_sha256"]
    assert summaries[1]["first_step_seconds"] < 0.75 * summaries[0]["first_step_seconds"]
    # A damaged entry (a run killed while writing it) costs a warning and a
    # compilation, nothing else.
    for name in written:
        (cache / name).write_bytes(b"torn")
    proc = run_cli(*args, "--out", tmp_path / "run2")
    assert proc.returncode == 0, proc.stderr
    assert "Error reading persistent compilation cache entry" in proc.stderr
    summary = json.loads((tmp_path / "run2" / "summary.json").read_text())
    assert summary["state_sha256"] == summaries[0]["state_sha256"]


def test_compile_cache_off_overrides_jax_environment(tmp_path):
    cache = tmp_path / "xla"
    env = cli_env(JAX_COMPILATION_CACHE_DIR=str(cache))
    args = ["--limit-train", "256", "--epochs", "1"]
    proc = run_cli(*args, "--out", tmp_path / "off", "--compile-cache", "off", env=env)
    assert proc.returncode == 0, proc.stderr
    assert _cache_entries(cache) == []
    # Without the option, JAX's own setting holds.
    proc = run_cli(*args, "--out", tmp_path / "jax", env=env)
    assert proc.returncode == 0, proc.stderr
    assert _cache_entries(cache)


def _wait_for_lines(path, n, proc, deadline):
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and len(path.read_bytes().splitlines()) >= n:
            return True
        time.sleep(0.01)
    return False


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_and_resume_matches(tmp_path):
    # Reference: the same run, uninterrupted (in this process).
    import io
    from train import loop
    from train.config import Config, resolve
    args = dict(model="mlp", limit_train=1280, batch_size=32, epochs=3)
    _, ref, _ = (lambda s: (*loop.run(resolve(Config(out=str(tmp_path / "ref"), **args)),
                                       stdout=s), None))(io.StringIO())

    out = tmp_path / "cut"
    cmd = [sys.executable, "-m", "train", "--model", "mlp", "--limit-train", "1280",
           "--batch-size", "32", "--epochs", "3", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        started = _wait_for_lines(out / "metrics.jsonl", 5, proc, time.monotonic() + 120)
        if started:
            proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    if not started or proc.returncode == 0:
        pytest.skip("the run ended before it could be interrupted (machine too fast?)")
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "SIGINT: stopped after step" in stdout and "--resume" in stdout
    assert not (out / "summary.json").exists()

    resumed = run_cli("--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] == ref["test_accuracy"]
    assert summary["test_loss"] == ref["test_loss"]

    from test_loop import final_arrays
    for a, b in zip(final_arrays(tmp_path / "ref"), final_arrays(out)):
        np.testing.assert_array_equal(a, b)


def test_a_closed_stdout_stops_the_run_with_one_line_and_it_resumes(tmp_path):
    # `python -m train | head -1`: the pipe's reader ends. This used to be
    # blamed on the folder ("cannot write into --out ...: Broken pipe; make
    # room there"), also after the run had finished.
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "train", "--model", "mlp", "--limit-train",
                             "640", "--batch-size", "32", "--epochs", "2", "--out", str(out)],
                            cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()
        proc.stdout.close()
        stderr = proc.stderr.read()
        proc.wait(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGPIPE
    assert stderr == (f"python -m train: error: stdout was closed (the reader of its pipe "
                      f"ended), so the run stopped; continue it with: python -m train --out "
                      f"{out} --resume\n")
    resumed = run_cli("--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "summary.json").read_text())["epochs"] == 2
    # The finished run's report, into a pipe nobody reads.
    proc = subprocess.Popen([sys.executable, "-m", "train", "--out", str(out), "--resume"],
                            cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGPIPE
    assert stderr == (f"python -m train: error: stdout was closed (the reader of its pipe "
                      f"ended) after the run finished; its results are in {out}\n")


@pytest.mark.slow
def test_default_run_reaches_97_percent(tmp_path):
    start = time.monotonic()
    proc = run_cli("--out", tmp_path / "default", timeout=600)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "default" / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.97
    assert summary["config"]["dataset"] == "digits" and summary["config"]["norm"] == "batch"
    print(f"default run: {elapsed:.1f} s wall, {summary['train_seconds']:.1f} s training")


@pytest.mark.slow
def test_two_devices_match_one_device(tmp_path):
    # Data parallel over 2 host devices through the CLI: batch norm pools the
    # statistics of both halves, so the run matches the single-device one up
    # to float summation order.
    import io
    from train import loop
    from train.config import Config, resolve
    args = dict(model="mlp", limit_train=320, batch_size=32, epochs=1)
    _, ref = loop.run(resolve(Config(out=str(tmp_path / "one"), **args)), stdout=io.StringIO())
    env = cli_env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = run_cli("--model", "mlp", "--limit-train", "320", "--batch-size", "32",
                   "--epochs", "1", "--devices", "2", "--out", tmp_path / "two", env=env)
    assert proc.returncode == 0, proc.stderr
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["device"].startswith("2 x cpu")
    np.testing.assert_allclose(two["test_loss"], ref["test_loss"], rtol=1e-4)
    assert abs(two["test_accuracy"] - ref["test_accuracy"]) <= 1 / 360

    odd = run_cli("--devices", "2", "--batch-size", "33", "--out", tmp_path / "odd", env=env)
    assert_one_line_error(odd, "not divisible by --devices 2")
