"""Data-parallel training: sharded steps, BN groups, resume, many processes.

The in-process tests use the 8 simulated CPU devices set up by the root
conftest. Parameters are compared with ``atol=2e-5``: sharding changes only
the order of float32 sums (per-device partial sums, then a collective), which
moves each step's parameters by a few ulps; over the handful of steps run
here, the largest difference measured was 4e-7.
"""

from __future__ import annotations

import io
import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, cli_env, run_cli
from test_cli import assert_one_line_error
from train import checkpoint, loop, models, steps
from train.config import Config, ConfigError, parse_args, resolve
from train.signals import StopFlag

ATOL = 2e-5
SMALL = dict(model="cnn", limit_train=256, batch_size=64, epochs=1)


def _run(tmp_path, name, **kwargs):
    cfg = resolve(Config(out=str(tmp_path / name), **{**SMALL, **kwargs}))
    code, summary = loop.run(cfg, stdout=io.StringIO())
    return code, summary


def _final_state(out: Path) -> list[np.ndarray]:
    _, path = checkpoint.list_checkpoints(out / "checkpoints")[-1]
    with np.load(path / checkpoint.STATE_FILE) as npz:
        return [npz[f"a{i}"] for i in range(len(npz.files))]


def _assert_states_close(a: Path, b: Path):
    for x, y in zip(_final_state(a), _final_state(b), strict=True):
        np.testing.assert_allclose(x, y, atol=ATOL, rtol=0)


def test_eight_devices_match_one_device(tmp_path):
    _, one = _run(tmp_path, "one")
    _, eight = _run(tmp_path, "eight", devices=8)
    assert eight["device"].startswith("8 x cpu")
    _assert_states_close(tmp_path / "one", tmp_path / "eight")
    np.testing.assert_allclose(eight["test_loss"], one["test_loss"], rtol=1e-5)
    # a borderline logit may flip one of the 360 test images
    assert abs(eight["test_accuracy"] - one["test_accuracy"]) <= 1 / 360
    # The logged training loss and accuracy cover all 64 examples of each
    # batch, not one device's 8 (again, a borderline logit may flip one).
    logged = {name: [json.loads(line) for line in
                     (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
              for name in ("one", "eight")}
    one_steps, eight_steps = ([r for r in logged[n] if r["kind"] == "step"] for n in logged)
    assert len(one_steps) == len(eight_steps) == 4
    for a, b in zip(one_steps, eight_steps):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
        assert abs(b["accuracy"] - a["accuracy"]) <= 1 / 64 + 1e-9
    np.testing.assert_allclose(eight["train_accuracy"], one["train_accuracy"], atol=1 / 64)


def test_bn_groups_match_ghost_batches(tmp_path):
    # 4 devices in BN groups of 2: each group normalizes its 32 consecutive
    # examples with their own statistics, and the running statistics average
    # the groups'. Ghost batch norm over chunks of 32 on one device computes
    # exactly that, so it is the reference.
    _run(tmp_path, "ghost", norm="ghost", virtual_batch_size=32)
    _run(tmp_path, "groups", devices=4, bn_group_size=2)
    _assert_states_close(tmp_path / "ghost", tmp_path / "groups")
    # and the groups really are local: synced BN ends elsewhere
    _run(tmp_path, "synced", devices=4)
    diffs = [np.max(np.abs(a - b)) for a, b in zip(_final_state(tmp_path / "synced"),
                                                   _final_state(tmp_path / "groups"))]
    assert max(diffs) > 1e-3


def test_one_example_per_device_trains_when_batch_norm_pools_the_devices(tmp_path):
    # Synced statistics pool the devices' examples: 4 devices of one example
    # each normalize like one device with a batch of 4.
    # (Batches this small amplify rounding: the states agree to a few 1e-3,
    # the test losses to a few 1e-5, as the devices sum gradients in another
    # order than one device.)
    small = dict(model="mlp", batch_size=4, limit_train=16)
    _, one = _run(tmp_path, "one", **small)
    code, four = _run(tmp_path, "four", devices=4, **small)
    assert code == 0
    np.testing.assert_allclose(four["test_loss"], one["test_loss"], rtol=1e-4)
    with pytest.raises(ConfigError) as info:
        resolve(Config(devices=4, bn_group_size=1, **small))
    assert str(info.value) == (
        "--norm batch needs at least 2 examples for its statistics, and --batch-size 4 over "
        "--devices 4 pools 1 example per --bn-group-size 1; raise --batch-size or "
        "--bn-group-size")


def test_norm_options_groups():
    cfg = resolve(Config(devices=8, bn_group_size=4, batch_size=64))
    opts = loop.norm_options(cfg)
    assert opts.axis_name == steps.DATA_AXIS
    assert opts.axis_index_groups == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert loop.norm_options(resolve(Config(devices=8, batch_size=64))).axis_index_groups is None
    assert loop.norm_options(resolve(Config())).axis_name is None


def _sharded_train_step_hlo(norm: str) -> str:
    cfg = resolve(Config(devices=8, batch_size=64, norm=norm, virtual_batch_size=4))
    model = models.build_model("cnn", (8, 8, 1), norm=norm, seed=0, opts=loop.norm_options(cfg))
    graphdefs, params, model_state = steps.split_model(model)
    mesh = steps.make_mesh(8)
    init, train_step, _ = loop.compiled_steps(graphdefs, "adam", "cosine", 1e-3, 0.0, 10, mesh)
    state = steps.place_state(init(params, model_state, np.uint32(0)), mesh)
    batch = steps.place_batch((np.zeros((64, 8, 8, 1), np.float32), np.zeros(64, np.int32)), mesh)
    return train_step.lower(state, batch).compile().as_text()


def _count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text))


def test_sharded_step_communicates_twice_per_batch_norm():
    # The CNN has 3 batch norms. Each pools (count, mean, M2) with two
    # per-feature all-reduces forward and their transposes, two more,
    # backward; all gradients and metrics share one after XLA's combiner.
    compiled = _sharded_train_step_hlo("batch")
    assert _count(r" all-reduce(-start)?\(", compiled) == 3 * (2 + 2) + 1
    assert _count(r" (all-gather|reduce-scatter|all-to-all)(-start)?\(", compiled) == 0
    # Layer norm has no batch statistics: only the gradient all-reduce is left.
    compiled = _sharded_train_step_hlo("layer")
    assert _count(r" all-reduce(-start)?\(", compiled) == 1


def test_sharded_resume_is_exact(tmp_path):
    _, full = _run(tmp_path, "full", devices=8)
    cfg = resolve(Config(out=str(tmp_path / "cut"), devices=8, **SMALL))
    code, _ = loop.run(cfg, stdout=io.StringIO(), interrupt_at_step=2)
    assert code == loop.EXIT_INTERRUPTED
    resumed_cfg = loop.resume_config({"out": str(tmp_path / "cut"), "resume": True})
    assert resumed_cfg.devices == 8
    code, resumed = loop.run(resumed_cfg, stdout=io.StringIO())
    assert code == 0 and resumed["resumed_from_step"] == 2
    assert resumed["state_sha256"] == full["state_sha256"]
    assert resumed["test_loss"] == full["test_loss"]


def test_resume_on_another_device_count_is_refused(tmp_path):
    cfg = resolve(Config(out=str(tmp_path / "run"), devices=8, **SMALL))
    loop.run(cfg, stdout=io.StringIO(), interrupt_at_step=1)
    with pytest.raises(ConfigError, match="--devices 2 differs from the run"):
        loop.resume_config({"out": str(tmp_path / "run"), "resume": True, "devices": 2})
    # Without --devices the checkpointed 8 are needed; a process seeing one says so.
    proc = run_cli("--out", tmp_path / "run", "--resume")
    assert_one_line_error(proc, "checkpointed on --devices 8", "only 1 device(s) are visible")
    assert proc.returncode == 2


@pytest.mark.parametrize("argv, fragment", [
    (["--num-processes", "2"], "needs --coordinator HOST:PORT"),
    (["--num-processes", "2", "--coordinator", "localhost"], "is not HOST:PORT"),
    (["--num-processes", "2", "--coordinator", "h:1", "--process-id", "2"], "not in 0..1"),
    (["--coordinator", "h:1"], "only apply with --num-processes 2"),
    (["--num-processes", "2", "--coordinator", "h:1", "--devices", "3", "--batch-size", "6"],
     "not a multiple of --num-processes"),
    (["--devices", "4", "--bn-group-size", "3", "--batch-size", "8"], "does not divide --devices"),
    (["--devices", "4", "--bn-group-size", "2", "--norm", "layer", "--batch-size", "8"],
     "only applies to batch statistics"),
])
def test_parallel_options_are_checked(argv, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        parse_args(argv)


def test_processes_default_to_one_device_each():
    cfg = parse_args(["--num-processes", "4", "--coordinator", "h:1", "--batch-size", "8"])
    assert cfg.devices == 4 and cfg.bn_group_size == 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    # Two real processes on 127.0.0.1, one CPU device each, joined by
    # jax.distributed (gloo): each places its half of every batch, batch
    # norm pools statistics across processes.
    args = ["--model", "cnn", "--limit-train", "256", "--batch-size", "64", "--epochs", "1",
            "--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2",
            "--out", tmp_path / "multi"]
    procs = [subprocess.Popen([sys.executable, "-m", "train", *map(str, args),
                               "--process-id", str(i)],
                              cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err
    summary = json.loads((tmp_path / "multi" / "summary.json").read_text())
    assert summary["device"] == "2 x cpu (cpu) in 2 processes"
    # Process 1 wrote nothing, and ended with process 0's parameters bit for bit.
    assert f"state sha256 {summary['state_sha256']}" in outputs[1][0]
    _, single = _run(tmp_path, "single")
    _assert_states_close(tmp_path / "single", tmp_path / "multi")
    np.testing.assert_allclose(summary["test_loss"], single["test_loss"], rtol=1e-5)


def _processes(args, n=2):
    return [subprocess.Popen([sys.executable, "-m", "train", *map(str, args),
                              "--process-id", str(i)],
                             cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(n)]


def _finish(procs, timeout=300):
    try:
        return [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_one_process_stops_all_with_one_checkpoint(tmp_path, signum):
    # A signal to process 1 alone (as a scheduler preempting one host would):
    # both processes must leave the loop after the same step, process 0
    # saving the checkpoint, instead of process 0 waiting forever in the next
    # step's collectives. Resuming both then completes the run. SIGTERM too:
    # jax.distributed's own SIGTERM handler must not swallow it.
    out = tmp_path / "multi"
    args = ["--model", "cnn", "--limit-train", "512", "--batch-size", "16", "--epochs", "6",
            "--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2",
            "--out", out]
    procs = _processes(args)
    ckpts = out / "checkpoints"
    deadline = time.monotonic() + 240
    while not (ckpts.is_dir() and checkpoint.list_checkpoints(ckpts)):
        assert all(p.poll() is None for p in procs), "a process ended before the first epoch"
        assert time.monotonic() < deadline, "no checkpoint after 240 s"
        time.sleep(0.02)
    procs[1].send_signal(signum)  # after epoch 1 of 6: 160 steps to go
    outputs = _finish(procs, timeout=120)  # seconds: a hang, not a slow run
    assert [p.returncode for p in procs] == [128 + signum] * 2, outputs
    stopped = re.search(rf"{signum.name}: stopped after step (\d+)", outputs[0][0] + outputs[0][1])
    assert stopped, outputs[0]
    step = int(stopped.group(1))
    assert step < 6 * 32
    assert checkpoint.list_checkpoints(ckpts)[-1][0] == step
    summary_path = out / "summary.json"
    assert not summary_path.exists()

    resume = ["--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2",
              "--out", out, "--resume"]
    outputs = _finish(_processes(resume))
    assert all("error" not in err for _, err in outputs), outputs
    summary = json.loads(summary_path.read_text())
    assert summary["resumed_from_step"] == step and summary["steps"] == 6 * 32


@pytest.mark.slow
def test_processes_with_different_settings_or_starts_are_refused(tmp_path):
    # Different seeds would train diverging "replicated" states; different
    # batch sizes would wait forever in mismatched collectives; a process
    # that cannot see the shared --out would start over while the others
    # resume. Each is refused on every process, fast.
    common = ["--model", "mlp", "--limit-train", "128", "--epochs", "1", "--num-processes", "2"]

    def launch(port, per_process):
        return [subprocess.Popen(
            [sys.executable, "-m", "train", *map(str, common), "--coordinator",
             f"127.0.0.1:{port}", "--process-id", str(i), *map(str, per_process(i))],
            cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]

    def refused(procs, message):
        outputs = _finish(procs, timeout=120)  # seconds: a hang, not a slow run
        for p, (_, err) in zip(procs, outputs):
            assert p.returncode == 2 and message in err, err

    refused(launch(_free_port(), lambda i: ["--out", tmp_path / "mixed", "--seed", i,
                                            "--batch-size", 32 * (i + 1)]),
            "started with different --batch-size, --seed")

    out = tmp_path / "run"
    first = _finish(_processes(common + ["--coordinator", f"127.0.0.1:{_free_port()}",
                                         "--out", out]))
    assert all("error" not in err for _, err in first), first
    (out / "summary.json").unlink()  # as if killed after the last checkpoint
    refused(launch(_free_port(), lambda i: ["--resume", "--out",
                                            out if i == 0 else tmp_path / "elsewhere"]),
            "every process must read the same --out, a folder they share")


def test_agreed_stop_keeps_a_signal_that_arrives_while_comparing(monkeypatch):
    # The signal handler can run while process_allgather waits for the other
    # processes; the signal must then stay set for the next comparison
    # rather than be overwritten by this comparison's "no stop".
    flag = StopFlag()
    gathered = []

    def allgather(value):
        gathered.append(int(value))
        if len(gathered) == 1:
            flag.signum = signal.SIGINT  # arrives during the first comparison
        return np.array([value, 0])

    monkeypatch.setattr(loop.multihost_utils, "process_allgather", allgather)
    assert loop.agreed_stop(flag, 2) is None and flag.signum == signal.SIGINT
    assert loop.agreed_stop(flag, 2) == signal.SIGINT and gathered == [0, signal.SIGINT]
    other = StopFlag()  # a signal to another process stops this one too
    monkeypatch.setattr(loop.multihost_utils, "process_allgather",
                        lambda value: np.array([value, signal.SIGTERM]))
    assert loop.agreed_stop(other, 2) == signal.SIGTERM and other.signum == signal.SIGTERM
