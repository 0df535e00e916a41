"""The benchmark entry point runs end to end on tiny sizes (no timing assertions)."""

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import batches

ROOT = Path(__file__).resolve().parent.parent


def _run(*args, timeout=600, **env_vars):
    # A fresh process, as users run it, without the 8 simulated devices of
    # the test configuration.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | env_vars
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    proc = _run("--quick", "--write-results", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout, out


def test_quick_run_prints_every_section_with_ratios(quick_run):
    stdout, _ = quick_run
    for title in ("BN train fwd+bwd: median time (ratio to flax.linen), page faults per call", "BN eval",
                  "XLA memory_analysis", "CNN pools: nnx.max_pool vs train.pool.max_pool",
                  "JAX (NHWC) vs PyTorch BatchNorm2d", "CNN train step",
                  "CNN convolutions alone", "each alone in its own processes",
                  "Worker process settings", "against the memory floor",
                  "Data-parallel scaling"):
        assert title in stdout
    assert "(1.00x, " in stdout and " pf)" in stdout  # the reference column of the BN tables
    assert "speed / PyTorch NCHW" in stdout


def test_quick_run_writes_results_and_plot(quick_run):
    _, out = quick_run
    text = (out / "RESULTS.md").read_text()
    assert "nproc" in text and "JAX backend" in text and "quick (tiny)" in text
    assert "Every number in this run is CPU" in text or "Backend `gpu`" in text
    assert (out / "bn_times.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    raw = json.loads((out / "results.json").read_text())
    assert raw["meta"]["quick"] and "bn" in raw["results"]
    assert raw["meta"]["sections"] == ["bn", "pool", "torch", "cnn", "alloc", "threads", "scaling"]


def test_results_json_holds_the_pool_times(tmp_path):
    # results.json keeps the raw numbers of every table RESULTS.md shows.
    proc = _run("--quick", "--only", "pool", "--repeats", "1", "--write-results", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    pools = json.loads((tmp_path / "results.json").read_text())["results"]["pool"]
    assert len(pools) == 2
    for case, times in pools.items():
        assert case in (tmp_path / "RESULTS.md").read_text()
        assert set(times) == {"nnx.max_pool", "train.pool.max_pool"}
        assert all(t > 0 for t in times.values())


def test_results_without_a_plot_leave_no_earlier_plot(tmp_path):
    import argparse

    from benchmarks import report

    (tmp_path / "bn_times.png").write_bytes(b"an earlier run's plot")
    meta = report.meta(argparse.Namespace(only=["pool"]), True, 1, 1)
    report.write(tmp_path, meta, [("CNN pools", "| table |")], {"quick": True, "pool": {}})
    assert sorted(f.name for f in tmp_path.iterdir()) == ["RESULTS.md", "results.json"]
    assert "bn_times.png" not in (tmp_path / "RESULTS.md").read_text()


def _bn_entry():
    # Synthetic numbers for one config of bn.run's results.
    from benchmarks import bn

    names = list(bn.IMPLEMENTATIONS)
    mode = {"times": {n: 1e-5 * (i + 1) for i, n in enumerate(names)},
            "faults": dict.fromkeys(names, 0.0), "floor": 5e-4}
    return {"config": {"name": "NHWC f32", "shape": [8, 8, 8, 16], "dtype": "float32"},
            "bandwidths": {"copy (x + 1)": 20e9, "donated add": 40e9},
            "modes": dict.fromkeys(bn.MODES, mode),
            "memory": {n: {"temp": 0, "argument": 2**20, "output": 2**20} for n in names}}


def test_bn_tables_name_their_units():
    # Every BN table's title or headers say what its cells measure.
    from benchmarks import bn

    tables = dict(bn.tables({"configs": [_bn_entry()]}))
    title = next(t for t in tables if "effective bandwidth" in t)
    assert "GB/s" in title and "share of the best copy bandwidth" in title
    # jaxbn: 6 passes of 32 KiB in 10 us, 19.7 GB/s, 49% of the best copy's 40 GB/s.
    assert tables[title].splitlines()[2].startswith("| jaxbn ")
    assert "| 20 (49%)" in tables[title].splitlines()[2]
    for t in tables:
        assert any(unit in t for unit in ("median time", "MiB", "GB/s")), t


def _earlier_results(directory):
    for name in ("RESULTS.md", "results.json", "bn_times.png"):
        (directory / name).write_bytes(f"an earlier run's {name}".encode())
    return {f.name: f.read_bytes() for f in directory.iterdir()}


def _write_bn_results(directory):
    import argparse

    from benchmarks import report

    meta = report.meta(argparse.Namespace(only=["bn"]), True, 1, 1)
    report.write(directory, meta, [("BN", "| table |")],
                 {"quick": True, "bn": {"configs": [_bn_entry()]}})


def test_interrupted_plot_keeps_the_previous_results(tmp_path, monkeypatch):
    import matplotlib.figure

    def savefig(fig, target, **kwargs):
        # Stopped as by a full disk: the target opened and partly written.
        with contextlib.nullcontext(target) if hasattr(target, "write") else open(target, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n")
        raise OSError(errno.ENOSPC, "No space left on device")

    before = _earlier_results(tmp_path)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    with pytest.raises(OSError, match="No space left"):
        _write_bn_results(tmp_path)
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before


@pytest.mark.parametrize("failing", ["RESULTS.md", "results.json", "bn_times.png"])
def test_results_are_written_all_or_not_at_all(tmp_path, monkeypatch, failing):
    # Each file used to be replaced in turn: a failure on a later one left
    # this run's first files beside an earlier run's others, as one run's.
    import pathlib

    before = _earlier_results(tmp_path)
    for method in ("write_bytes", "write_text"):
        def write(path, data, *args, original=getattr(pathlib.Path, method), **kwargs):
            if failing not in path.name:
                return original(path, data, *args, **kwargs)
            original(path, data[:3], *args, **kwargs)  # stopped midway, as by a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(pathlib.Path, method, write)
    with pytest.raises(OSError, match="No space left"):
        _write_bn_results(tmp_path)
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before  # no temporaries


@pytest.mark.parametrize("steps", [[0.01, 0.03], [0.01, 0.03, 0.02], [0.04, 0.01, 0.03, 0.02]])
def test_worker_medians_keep_images_per_second_the_batch_over_the_step(steps):
    # --rounds 2: the median of 8/0.01 and 8/0.03 images/s is not 8 over
    # the median step (0.02 s), which the same table row printed next to it.
    from benchmarks import procs

    rounds = [{"cnn": {"NCHW": {"step": s, "images_per_second": 8 / s, "first_step": 1.0}}}
              for s in steps]
    r = procs._median_tree(rounds)["cnn"]["NCHW"]
    assert r["images_per_second"] == pytest.approx(8 / r["step"], rel=1e-12)


def test_workers_print_one_json_line():
    spec = json.dumps({"tasks": ["bn", "layers"], "quick": True, "repeats": 1, "device": "cpu"})
    proc = subprocess.run([sys.executable, "-m", "benchmarks.torch_worker", spec], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result["bn"]) == {"BatchNorm2d NCHW", "BatchNorm2d channels_last"}
    # Every convolution in both layouts.
    assert set(result["layers"]) == {f"{name} {layout}" for name in batches.CONV_LAYERS
                                     for layout in ("NCHW", "channels_last")}
    assert all(r["seconds"] > 0 for r in result["layers"].values())


def test_bad_options_fail_fast():
    proc = _run("--only", "bn,nope", timeout=60)
    assert proc.returncode == 2
    assert "unknown section(s) nope" in proc.stderr


@pytest.mark.parametrize("only", ["", " , "])
def test_only_without_sections_fails_fast(tmp_path, only):
    # It used to time nothing and write an empty RESULTS.md.
    proc = _run("--only", only, "--write-results", str(tmp_path), timeout=60)
    assert proc.returncode == 2
    assert "names no section; choose from bn, pool" in proc.stderr
    assert "backend" not in proc.stdout and not any(tmp_path.iterdir())


@pytest.mark.parametrize("option", ["--repeats", "--rounds"])
@pytest.mark.parametrize("value", ["0", "-2"])
def test_counts_below_one_fail_fast(option, value):
    # 0 used to mean the default silently; a negative count ran every
    # section and then had no median to report.
    proc = _run("--quick", "--only", "pool", f"{option}={value}", timeout=60)
    assert proc.returncode == 2
    assert f"argument {option}: must be at least 1" in proc.stderr
    assert "backend" not in proc.stdout  # nothing was timed


def test_unwritable_results_folder_fails_before_timing(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = _run("--write-results", str(blocker / "results"), timeout=60)
    assert proc.returncode == 2
    assert "--write-results" in proc.stderr and "choose another folder" in proc.stderr
    assert "backend" not in proc.stdout  # nothing was timed


def test_a_refused_run_leaves_no_results_folder(tmp_path):
    # The writability check used to create the folder, which a run refused
    # after it (here: --gpu on a CPU) left behind empty.
    out = tmp_path / "new" / "results"
    proc = _run("--gpu", "--write-results", str(out), timeout=120, JAX_PLATFORMS="cpu")
    assert proc.returncode == 2 and "--gpu" in proc.stderr
    assert not (tmp_path / "new").exists()


def test_a_tilde_the_shell_left_in_write_results_means_the_home_folder(tmp_path, monkeypatch):
    # --write-results=~/res used to create a folder named ~ in the current one.
    from benchmarks.__main__ import parse

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert parse(["--only", "pool", "--write-results=~/res"]).write_results == \
        str(tmp_path / "home" / "res")
    assert not (tmp_path / "~").exists()


def _full_size_results(directory, **meta):
    # The three outputs of an earlier full-size run, as committed.
    (directory / "RESULTS.md").write_text("# Benchmark results\n")
    (directory / "bn_times.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (directory / "results.json").write_text(json.dumps({"meta": {"quick": False, **meta}}))
    return {f.name: f.read_bytes() for f in directory.iterdir()}


@pytest.mark.parametrize("args", [["--only", "bn,pool"], ["--quick"], ["--quick", "--only", "pool"]])
def test_smaller_run_refuses_to_replace_full_size_results(tmp_path, args):
    # A run of fewer sections, or of tiny sizes, would have replaced them
    # all, after the run.
    before = _full_size_results(tmp_path, command="python -m benchmarks --write-results benchmarks")
    proc = _run(*args, "--write-results", str(tmp_path), timeout=60)
    assert proc.returncode == 2
    assert "full-size results of `python -m benchmarks --write-results benchmarks`" in proc.stderr
    assert "choose another folder" in proc.stderr and str(tmp_path / "results.json") in proc.stderr
    assert "backend" not in proc.stdout  # nothing was timed
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before


def test_full_size_results_are_replaced_by_runs_of_their_sections(tmp_path):
    from benchmarks.__main__ import SECTIONS, _replaces_more

    assert _replaces_more(tmp_path, ["pool"], True) is None  # nothing there yet
    _full_size_results(tmp_path, command="python -m benchmarks --only bn,pool",
                       sections=["bn", "pool"])
    assert _replaces_more(tmp_path, ["pool", "bn"], False) is None
    assert _replaces_more(tmp_path, list(SECTIONS), False) is None
    assert "without bn: add those to --only" in _replaces_more(tmp_path, ["pool", "scaling"], False)
    assert "drop --quick" in _replaces_more(tmp_path, ["bn", "pool"], True)
    # Results written before meta listed the sections: its command's, less
    # the sections that no longer exist.
    _full_size_results(tmp_path, command="python -m benchmarks --gpu --only bn,conv,torch")
    assert _replaces_more(tmp_path, ["torch", "bn"], False) is None
    assert "without torch" in _replaces_more(tmp_path, ["bn"], False)
    # A smoke test's results are no loss.
    _full_size_results(tmp_path, command="python -m benchmarks --quick", quick=True)
    assert _replaces_more(tmp_path, ["pool"], True) is None


def test_run_on_another_device_refuses_to_replace_its_results(tmp_path, monkeypatch, capsys):
    # A CPU run with --write-results benchmarks/gpu-h200 used to replace the
    # H200's results with the CPU's.
    import jax

    from benchmarks import bn
    from benchmarks.__main__ import main

    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is present: the H200's results may be this machine's kind")
    (tmp_path / "results.json").write_bytes((ROOT / "benchmarks/gpu-h200/results.json").read_bytes())
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    monkeypatch.setattr(bn, "run", lambda *args: pytest.fail("timed before refusing"))
    # What main sets for the whole process, kept to this test.
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    assert main(["--only", "bn,torch", "--write-results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--only bn,torch --rounds 1 --repeats 10 --write-results /root/out/gpu` on gpu " \
           "(NVIDIA H200), and this run is on cpu (cpu); choose another folder" in err
    assert str(tmp_path / "results.json") in err
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before


def test_results_of_the_same_kind_of_device_are_replaced(tmp_path):
    from benchmarks.__main__ import _other_machine

    assert _other_machine(tmp_path, "cpu", {"cpu"}) is None  # nothing there yet
    machine = {"backend": "gpu", "devices": ["cuda:0 (NVIDIA H200)", "cuda:1 (NVIDIA H200)"]}
    _full_size_results(tmp_path, command="python -m benchmarks --gpu", machine=machine)
    assert _other_machine(tmp_path, "gpu", {"NVIDIA H200"}) is None
    assert "on gpu (NVIDIA H200), and this run is on gpu (NVIDIA H100)" in \
        _other_machine(tmp_path, "gpu", {"NVIDIA H100"})
    # A smoke test's results are no loss.
    _full_size_results(tmp_path, command="python -m benchmarks --quick", quick=True,
                       machine=machine)
    assert _other_machine(tmp_path, "cpu", {"cpu"}) is None


def test_missing_torch_fails_before_timing(tmp_path):
    # A torch that does not import, as where only jaxbn[train] is installed:
    # the PyTorch workers would fail only after the JAX sections ran.
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    proc = _run("--quick", "--only", "bn,torch,scaling", timeout=120, PYTHONPATH=str(tmp_path))
    assert proc.returncode == 2
    assert "No module named 'torch'" in proc.stderr
    assert "--only bn,scaling" in proc.stderr  # what still runs without it
    assert "round 1/1" not in proc.stdout and "## BN" not in proc.stdout  # nothing was timed


def test_crashed_worker_is_reported_and_leaves_the_results(tmp_path):
    # A torch that imports, so that the check before timing passes, but
    # breaks the PyTorch worker after the JAX worker's round.
    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text(
        "class cuda:\n    is_available = staticmethod(lambda: False)\n")
    out = tmp_path / "results"
    out.mkdir()
    (out / "RESULTS.md").write_text("an earlier run's results\n")
    proc = _run("--quick", "--only", "torch", "--repeats", "1", "--write-results", str(out),
                timeout=300, PYTHONPATH=str(fake))
    assert proc.returncode == 1, proc.stderr[-4000:]
    first = proc.stderr.strip().splitlines()[0]
    assert first.startswith('stopped: the worker process "PyTorch" (round 1/1), python -m '
                            'benchmarks.torch_worker, exited with status 1; nothing was written')
    assert "ImportError: cannot import name 'nn' from 'torch'" in proc.stderr  # the worker's
    assert "__main__.py" not in proc.stderr  # no traceback of the parent's
    assert [f.name for f in out.iterdir()] == ["RESULTS.md"]
    assert (out / "RESULTS.md").read_text() == "an earlier run's results\n"


def _run_with_a_worker(*args):
    """A quick run of the torch section, and its JAX worker's pid once it has one."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks", "--quick", "--only", "torch",
                             *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "round 1/1: JAX" in line:
            break
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    deadline = time.monotonic() + 60
    # Once it runs the worker: between the fork and the exec, the parent is
    # still starting it.
    while not (workers := [pid for pid in children.read_text().split()
                           if b"benchmarks.jax_worker" in _command_line(pid)]):
        assert time.monotonic() < deadline, "no worker process started"
        time.sleep(0.05)
    return proc, int(workers[0])


def _command_line(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""


def _running(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has ended, and waits for whoever adopted it to reap it


def _outlived(pid, seconds):
    """Whether worker ``pid`` still runs after ``seconds`` (then killed, for the next tests)."""
    deadline = time.monotonic() + seconds
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if not _running(pid):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return True


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stopped_run_ends_its_worker_process(tmp_path, signum):
    # SIGTERM, as from timeout(1) or a cancelled job, used to end the parent
    # alone: its worker kept timing on the shared machine. Ctrl-C printed a
    # traceback.
    out = tmp_path / "results"
    proc, worker = _run_with_a_worker("--write-results", str(out))
    try:
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    # A signal while the parent is still starting the worker leaves it to
    # end itself (on Linux), once its imports are done.
    assert not _outlived(worker, 30), f"worker process {worker} outlived the run by 30 s"
    assert proc.returncode == 128 + signum
    assert stderr.strip() == (f"stopped by {signal.Signals(signum).name}; results are written "
                              f"only when a run finishes")
    assert not out.exists()


@pytest.mark.skipif(sys.platform != "linux", reason="workers die with their parent on Linux")
def test_killed_run_ends_its_worker_process():
    # SIGKILL leaves the parent no time to end its worker, which used to go
    # on timing (here for minutes) on the shared machine.
    proc, worker = _run_with_a_worker("--repeats", "1000000")
    proc.kill()
    proc.wait()
    # Its imports at most, if it was still importing.
    assert not _outlived(worker, 30), f"worker process {worker} outlived its killed parent by 30 s"


@pytest.mark.skipif(sys.platform != "linux", reason="workers die with their parent on Linux")
def test_worker_whose_parent_died_before_it_started_ends():
    # The parent named in its environment (here this test's parent) is not
    # its parent: it died before the worker could ask to be signalled.
    env = dict(os.environ, BENCHMARKS_PARENT_PID=str(os.getppid()))
    proc = subprocess.run([sys.executable, "-c", "from benchmarks import procs\n"
                           "procs.die_with_parent()\nprint('timing')"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL and "timing" not in proc.stdout


@pytest.mark.parametrize("body, timeout, how", [
    ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", 60,
     "was killed by signal 9 (Killed)"),
    ("import time\ntime.sleep(60)", 1, "did not finish within 1 s"),
    ("print('no result')", 60, "printed no JSON result"),
    ("import sys\nfor i in range(100):\n    print(f'line {i}', file=sys.stderr)\nsys.exit(3)", 60,
     "exited with status 3"),
])
def test_failed_worker_process_says_how(tmp_path, body, timeout, how):
    from benchmarks import procs

    (tmp_path / "failing_worker.py").write_text(body + "\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    with pytest.raises(procs.WorkerError) as e:
        procs.result('the worker process "X"', "failing_worker", {}, env, timeout=timeout)
    assert e.value.what == f'the worker process "X", python -m failing_worker, {how}'
    if "status 3" in how:  # the end of its stderr
        assert e.value.stderr.splitlines() == [f"line {i}" for i in range(80, 100)]


def test_gpu_flag_without_gpu_names_the_fix():
    proc = _run("--gpu", "--quick", "--only", "bn", timeout=300)
    if proc.returncode == 0:
        pytest.skip("a GPU is present")
    assert "install jax[cuda12]" in proc.stderr


def test_cpu_only_sections_on_another_backend_are_refused(monkeypatch, capsys):
    # On a GPU the malloc and one-core sections are skipped: asked for alone,
    # the run would time nothing.
    import jax

    from benchmarks.__main__ import main

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    # What main sets for the whole process, kept to this test.
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    assert main(["--quick", "--only", "alloc,threads"]) == 2
    assert "JAX_PLATFORMS=cpu" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_both_workers_time_the_same_bn_tensor(backend):
    # The JAX worker times bn.configs(...)[0]; the PyTorch worker builds its
    # NCHW tensor from batches.bn_shape: the cross-framework ratio needs both
    # to be one tensor. GPUs get a tensor too large to be launch-bound.
    from benchmarks import bn

    first = bn.configs(False, backend)[0]
    assert first.shape == batches.bn_shape(False, backend) and first.dtype == "float32"
    if backend == "gpu":
        assert first.nbytes >= 512 * 2**20
        assert any(c.shape == batches.bn_shape(False, "cpu") for c in bn.configs(False, "gpu"))
    assert bn.configs(True, backend)[0].shape == batches.bn_shape(True, backend)


def test_interleave_varies_which_alternative_follows_which():
    # A call can be slowed by the one before it, so no alternative may
    # mostly run after the same other one (a fixed or rotated order makes
    # each follow its neighbour in most rounds).
    import collections

    from benchmarks import timing

    calls = []
    names = "ABCDEF"
    fns = {name: (lambda name=name: calls.append(name)) for name in names}
    times = timing.interleave(fns, repeats=60, warmup=0)
    assert all(len(times[name]) == 60 for name in names)
    follows = collections.defaultdict(collections.Counter)
    for before, after in zip(calls, calls[1:]):
        if before != after:
            follows[after][before] += 1
    for name in names:
        assert set(follows[name]) == set(names) - {name}
        assert max(follows[name].values()) <= 0.4 * sum(follows[name].values()), follows[name]
    # Warm-up rounds run every alternative but are not timed.
    calls.clear()
    times = timing.interleave(fns, repeats=3, warmup=2)
    assert len(calls) == 30 and all(len(t) == 3 for t in times.values())


def test_floor_table_divides_each_process_time_by_its_own_floor():
    from benchmarks import report

    def config(floor, jaxbn, flax):
        return {"floor": floor, "times": {"jaxbn": {"seconds": jaxbn, "faults_per_call": 0},
                                          "flax.linen": {"seconds": flax, "faults_per_call": 8193}}}
    runs = {"JAX": {"bn_floor": {"NHWC f32": config(2e-3, 5e-3, 9e-3),
                                 "dense f32": config(1e-3, 3e-3, 4e-3)}},
            "JAX, one arena, no mmap": {"bn_floor": {"NHWC f32": config(4e-3, 5e-3, 6e-3)}},
            "PyTorch": {"bn": {"BatchNorm2d NCHW": {"seconds": 1e-3}}}}
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line
            for line in report.floor_table(runs).splitlines()}
    assert "(2.50x, 0 pf)" in rows["default", "NHWC f32"]
    assert "(4.50x, 8193 pf)" in rows["default", "NHWC f32"]
    assert "(3.00x, 0 pf)" in rows["default", "dense f32"]
    assert "(1.25x, 0 pf)" in rows["one arena, no mmap", "NHWC f32"]
    assert not any("PyTorch" in row or "BatchNorm2d" in row for row in rows.values())


@pytest.mark.parametrize("name", ["jaxbn", "flax.linen"])
def test_donated_step_gives_up_x_and_computes_the_same_dx(name):
    import numpy as np
    from benchmarks import bn

    config = bn.configs(quick=True)[0]
    kept, args = bn.compiled(name, config, "train fwd+bwd")
    (_, dx), _ = kept(*args)
    step = bn.DonatedStep(name, config)
    x = step.x
    step()
    assert x.is_deleted()
    # The same program but for buffer aliasing: the same bits.
    np.testing.assert_array_equal(np.asarray(step.x), np.asarray(dx))
