"""End-to-end runs of the training loop, in-process on tiny data."""

import fcntl
import io
import json
import os
import signal

import numpy as np
import pytest

from train import checkpoint, data, loop
from train.config import MAX_STEPS, Config, ConfigError, resolve
from train.signals import StopFlag

TIMING_KEYS = loop.TIMING_FIELDS


def tiny(out, **kw) -> Config:
    base = dict(out=str(out), epochs=1, limit_train=64, batch_size=32, model="mlp")
    base.update(kw)
    return resolve(Config(**base))


def run(cfg, **kw):
    stdout = io.StringIO()
    code, summary = loop.run(cfg, stdout=stdout, **kw)
    return code, summary, stdout.getvalue()


def records(out):
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def without_timings(recs):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in recs]


def final_arrays(out):
    _, path = checkpoint.list_checkpoints(out / "checkpoints")[-1]
    with np.load(path / checkpoint.STATE_FILE) as npz:
        return [npz[k] for k in sorted(npz.files, key=lambda k: int(k[1:]))]


MATRIX = [(m, n) for m in ("cnn", "mlp", "resnet") for n in ("batch", "none", "layer", "group")]


@pytest.mark.parametrize("model, norm", [
    pytest.param(m, n, marks=pytest.mark.slow) if m == "resnet" else (m, n) for m, n in MATRIX])
def test_every_model_and_norm_trains_one_epoch(tmp_path, model, norm):
    out = tmp_path / "run"
    code, summary, text = run(tiny(out, model=model, norm=norm))
    assert code == 0
    recs = records(out)
    assert [r["kind"] for r in recs] == ["step", "step", "epoch"]
    assert {"step", "loss", "accuracy", "lr", "grad_norm", "step_time"} <= recs[0].keys()
    assert {"train_loss", "train_accuracy", "test_loss", "test_accuracy", "epoch_seconds",
            "images_per_second", "elapsed_seconds"} <= recs[-1].keys()
    # The epoch record names its epoch, its last step and the lr that step used.
    assert (recs[-1]["epoch"], recs[-1]["step"]) == (1, 2) and recs[1]["step"] == 2
    assert recs[-1]["lr"] == recs[1]["lr"]
    for key in ("test_accuracy", "test_loss", "epochs", "train_seconds", "images_per_second",
                "config", "versions", "device"):
        assert key in summary
    assert 0 < summary["first_step_seconds"] < summary["cold_start_seconds"]
    assert json.loads((out / "summary.json").read_text())["test_loss"] == summary["test_loss"]
    assert summary["test_examples"] == 360 and np.isfinite(summary["test_loss"])
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "accuracy.png").stat().st_size > 1000
    assert len(checkpoint.list_checkpoints(out / "checkpoints")) == 1
    assert "test accuracy" in text.splitlines()[-1]


@pytest.mark.parametrize("norm", ["ghost", "renorm"])
def test_library_only_norms_train(tmp_path, norm):
    code, summary, _ = run(tiny(tmp_path / "r", norm=norm, virtual_batch_size=8))
    assert code == 0 and np.isfinite(summary["test_loss"])
    assert summary["norm_impl"] == {"ghost": "jaxbn.nnx.BatchNorm",
                                    "renorm": "jaxbn.nnx.BatchRenorm"}[norm]


@pytest.fixture(scope="module")
def default_digest(tmp_path_factory):
    code, summary, _ = run(tiny(tmp_path_factory.mktemp("default") / "r"))
    assert code == 0
    return summary["state_sha256"]


@pytest.mark.parametrize("option", [
    {"bn_momentum": 0.5}, {"optimizer": "sgd"}, {"schedule": "constant"},
    {"weight_decay": 0.1}, {"augment_shift": 2}, {"mlp_depth": 2}, {"mlp_width": 50},
    {"activation": "relu"}, {"seed": 1}], ids=lambda o: next(iter(o)))
def test_every_training_option_reaches_the_run(tmp_path, default_digest, option):
    # Each option changes the trained state (against the same run with the
    # default), so the loop passed it on rather than dropping it.
    code, summary, _ = run(tiny(tmp_path / "r", **option))
    assert code == 0 and summary["config"][next(iter(option))] == next(iter(option.values()))
    assert summary["state_sha256"] != default_digest


def test_digits_cnn_learns(tmp_path):
    code, summary, _ = run(tiny(tmp_path / "r", model="cnn", limit_train=None, epochs=2))
    assert code == 0 and summary["test_accuracy"] > 0.9


@pytest.mark.parametrize("stop_at", [10, 3], ids=["epoch-boundary", "mid-epoch"])
def test_resume_after_interruption_equals_uninterrupted(tmp_path, stop_at):
    # 2 epochs of 10 steps; the interrupted run stops after step `stop_at`.
    kw = dict(epochs=2, limit_train=320)
    code, ref, _ = run(tiny(tmp_path / "ref", **kw))
    assert code == 0
    code, summary, text = run(tiny(tmp_path / "cut", **kw), interrupt_at_step=stop_at)
    assert code == loop.EXIT_INTERRUPTED and summary is None
    assert "--resume" in text and not (tmp_path / "cut" / "summary.json").exists()
    code, resumed, text = run(loop.resume_config({"out": str(tmp_path / "cut"), "resume": True}))
    assert code == 0 and f"resuming from checkpoints/ckpt-{stop_at:09d}" in text
    assert resumed["test_accuracy"] == ref["test_accuracy"]
    assert resumed["test_loss"] == ref["test_loss"]
    assert resumed["train_loss"] == ref["train_loss"]
    for a, b in zip(final_arrays(tmp_path / "ref"), final_arrays(tmp_path / "cut")):
        np.testing.assert_array_equal(a, b)
    assert without_timings(records(tmp_path / "cut")) == without_timings(records(tmp_path / "ref"))


class Killed(Exception):
    """Stands for a SIGKILL: the run ends where it is, writing nothing more."""


def killed_in_epoch(monkeypatch, epoch, after):
    """Make the run die after ``after`` batches of (0-based) ``epoch``."""
    real = data.train_batches

    def batches(*args, epoch: int, **kw):
        for i, batch in enumerate(real(*args, epoch=epoch, **kw)):
            if epoch == killed_epoch and i == after:
                raise Killed
            yield batch

    killed_epoch = epoch
    monkeypatch.setattr(data, "train_batches", batches)


def test_a_stop_on_an_epochs_last_step_is_evaluated_once(tmp_path, monkeypatch):
    # Stopped after step 10, the last of epoch 1, the checkpoint precedes
    # that epoch's evaluation. The resume evaluates, and its checkpoint at
    # step 10 must then replace the stopped one: a later resume from it (a
    # kill during epoch 2) would otherwise evaluate epoch 1 a second time.
    kw = dict(epochs=2, limit_train=320)
    assert run(tiny(tmp_path / "ref", **kw))[0] == 0
    out = tmp_path / "cut"
    assert run(tiny(out, **kw), interrupt_at_step=10)[0] == loop.EXIT_INTERRUPTED
    evaluated = []
    evaluate = loop.evaluate
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: evaluated.append(1) or evaluate(*a, **k))
    killed_in_epoch(monkeypatch, 1, after=3)
    with pytest.raises(Killed):
        run(tiny(out, resume=True, **kw))
    assert len(evaluated) == 1
    monkeypatch.undo()
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: evaluated.append(1) or evaluate(*a, **k))
    code, resumed, text = run(tiny(out, resume=True, **kw))
    assert code == 0
    assert text.splitlines()[0] == "resuming from checkpoints/ckpt-000000010 (epoch 2, step 10)"
    assert len(evaluated) == 2  # epoch 1 once, epoch 2 once: as without the stop
    assert without_timings(records(out)) == without_timings(records(tmp_path / "ref"))
    # The checkpoint at step 10 is the uninterrupted run's, timings aside.
    untimed = ("train_seconds", "steady_time", "steady_images", "epoch_step_time")
    for ckpts in (out / "checkpoints", tmp_path / "ref" / "checkpoints"):
        meta = checkpoint.read_meta(ckpts / "ckpt-000000010")
        book = {k: v for k, v in meta["bookkeeping"].items() if k not in untimed}
        if ckpts.parent == out:
            got = book
    assert got == book


def test_resume_after_the_final_evaluation_names_the_last_epoch(tmp_path, monkeypatch):
    # Ctrl-C during the last epoch's evaluation: the run stops after saving
    # the final checkpoint, and the resume only has the summary left to write.
    out = tmp_path / "run"
    stop = StopFlag()
    evaluate = loop.evaluate

    def interrupted_evaluate(*args, **kwargs):
        stop.signum = signal.SIGINT
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", interrupted_evaluate)
    code, _, _ = run(tiny(out), stop=stop)
    assert code == loop.EXIT_INTERRUPTED
    monkeypatch.setattr(loop, "evaluate", evaluate)
    code, _, text = run(loop.resume_config({"out": str(out), "resume": True}))
    assert code == 0
    assert text.splitlines()[0] == ("resuming from checkpoints/ckpt-000000002 "
                                    "(after epoch 1 of 1, step 2)")


def test_resume_skips_a_corrupted_checkpoint(tmp_path):
    kw = dict(epochs=2, limit_train=320)
    _, ref, _ = run(tiny(tmp_path / "ref", **kw))
    out = tmp_path / "cut"
    run(tiny(out, **kw), interrupt_at_step=14)
    (pos_a, _), (pos_b, newest) = checkpoint.list_checkpoints(out / "checkpoints")
    assert (pos_a, pos_b) == (10, 14)
    blob = newest / checkpoint.STATE_FILE
    blob.write_bytes(blob.read_bytes()[: len(blob.read_bytes()) // 2])
    code, resumed, text = run(tiny(out, resume=True, **kw))
    assert code == 0
    assert "skipping checkpoint" in text and "resuming from checkpoints/ckpt-000000010" in text
    assert resumed["test_loss"] == ref["test_loss"]
    assert without_timings(records(out)) == without_timings(records(tmp_path / "ref"))


def test_resume_takes_the_settings_of_the_checkpointed_run(tmp_path):
    out = tmp_path / "run"
    run(tiny(out, epochs=2, norm="layer", seed=5), interrupt_at_step=1)
    cfg = loop.resume_config({"out": str(out), "resume": True})
    assert (cfg.norm, cfg.seed, cfg.epochs, cfg.limit_train) == ("layer", 5, 2, 64)
    with pytest.raises(ConfigError, match="--seed 6 differs from the run"):
        loop.resume_config({"out": str(out), "resume": True, "seed": 6})
    with pytest.raises(ConfigError, match=r"--limit-train 32 differs from the run in .* "
                                          r"\(64\)"):
        loop.resume_config({"out": str(out), "resume": True, "limit_train": 32})


def test_resume_names_an_unset_option_as_such(tmp_path):
    out = tmp_path / "run"
    _run_config_only(out, limit_train=None)
    with pytest.raises(ConfigError) as info:
        loop.resume_config({"out": str(out), "resume": True, "limit_train": 32})
    assert str(info.value) == (f"--limit-train 32 differs from the run in {out} (which does not "
                               f"set it); drop the option to resume, or choose another --out")


def test_refuses_an_out_dir_that_holds_another_run(tmp_path):
    out = tmp_path / "run"
    run(tiny(out))
    with pytest.raises(ConfigError, match="already holds a run.*pass --resume"):
        run(tiny(out))


def test_refuses_an_out_dir_locked_by_another_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(loop.RunError, match="another training run is writing to"):
            run(tiny(out))
    finally:
        os.close(fd)
    assert not (out / "metrics.jsonl").exists()


def test_nan_data_stops_after_max_bad_steps(tmp_path):
    def poisoned(*args, **kwargs):
        d = data.load(*args, **kwargs)
        return d._replace(x_train=np.full_like(d.x_train, np.nan))

    out = tmp_path / "run"
    with pytest.raises(loop.RunError, match="3 consecutive steps had a non-finite loss"):
        run(tiny(out, max_bad_steps=3, epochs=2), load_data=poisoned)
    recs = [r for r in records(out) if r["kind"] == "step"]
    assert [r["finite"] for r in recs] == [False] * 3
    assert [r["bad_steps"] for r in recs] == [1, 2, 3]  # counted across the epoch boundary
    assert recs[0]["loss"] is None  # NaN is written as JSON null
    assert not (out / "summary.json").exists()


def test_batch_larger_than_training_set(tmp_path):
    with pytest.raises(ConfigError, match="larger than the 64 training examples"):
        run(tiny(tmp_path / "r", batch_size=128))


def test_mnist_downloaded_from_a_local_mirror(tmp_path, server):
    url, _, requests = server
    cfg = tiny(tmp_path / "run", dataset="mnist", data_dir=str(tmp_path / "data"),
               download=True, base_url=url, limit_train=1024, batch_size=64, activation="relu",
               augment_shift=0)
    code, summary, text = run(cfg)
    assert code == 0 and len(requests) == 4 and "downloading" in text
    assert summary["test_examples"] == 10000 and summary["train_examples"] == 1024
    assert summary["test_accuracy"] > 0.7


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_plain_lines_otherwise(tmp_path):
    term = _Terminal()
    code, _ = loop.run(tiny(tmp_path / "a", limit_train=320), stdout=term)
    text = term.getvalue()
    assert code == 0 and "\r" in text and "img/s" in text and "[" in text
    plain = io.StringIO()
    loop.run(tiny(tmp_path / "b", limit_train=320), stdout=plain)
    lines = plain.getvalue().splitlines()
    assert "\r" not in plain.getvalue()
    assert lines[0].startswith("epoch 1/1  train loss")
    assert lines[-1].startswith("test accuracy ") and len(lines) == 3


def test_interrupt_on_a_terminal_clears_the_bar_first(tmp_path):
    # Ctrl-C mid-epoch: the half-drawn bar is erased ("\r" + erase-line) and
    # the stop message ends with a newline, so the shell prompt starts clean.
    term = _Terminal()
    code, _ = loop.run(tiny(tmp_path / "r", limit_train=320), stdout=term, interrupt_at_step=3)
    text = term.getvalue()
    assert code == loop.EXIT_INTERRUPTED
    bar, _, stop = text.rpartition("\r\033[K")
    assert "[" in bar and stop.startswith("SIGINT: stopped after step 3")
    assert stop.endswith("--resume\n") and stop.count("\n") == 1


def test_a_resume_removes_the_temporaries_a_kill_left_and_nothing_else(tmp_path, monkeypatch):
    out = tmp_path / "run"
    replace = os.replace

    def killed_before_the_summary_lands(src, dst):
        if os.path.basename(dst) == "summary.json":
            raise Killed
        replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_before_the_summary_lands)
    with pytest.raises(Killed):
        run(tiny(out))
    monkeypatch.undo()
    assert (out / ".summary.json.tmp").is_file()
    (out / ".write-test-4242").write_bytes(b"")  # killed between the probe's write and unlink
    keep = [".write-test-x", ".notes.tmp", "summary.json.tmp", "mine.tmp", ".config.json.tmp.bak"]
    for name in keep:
        (out / name).write_text("the user's")
    (out / ".loss.png.tmp").mkdir()  # a folder is not a temporary file of ours
    code, _, text = run(tiny(out, resume=True))
    assert code == 0
    assert "removed a leftover temporary file: .summary.json.tmp" in text
    assert "removed a leftover temporary file: .write-test-4242" in text
    assert sorted(p.name for p in out.iterdir() if "tmp" in p.name or "test" in p.name) == sorted(
        keep + [".loss.png.tmp"])
    assert all((out / name).read_text() == "the user's" for name in keep)


def test_resuming_a_finished_run_changes_nothing(tmp_path):
    out = tmp_path / "run"
    _, first, _ = run(tiny(out))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    code, again, text = run(tiny(out, resume=True))
    assert code == 0
    assert text == (f"the run in {out} is already complete (test accuracy "
                    f"{100 * first['test_accuracy']:.2f}%); nothing to resume\n")
    assert {p: p.read_bytes() for p in before} == before
    assert again == json.loads((out / "summary.json").read_text())
    assert again["test_loss"] == first["test_loss"]


def test_resuming_a_finished_run_draws_missing_plots(tmp_path):
    # A kill after summary.json was written can leave the plots undrawn.
    out = tmp_path / "run"
    run(tiny(out))
    (out / "loss.png").unlink()
    summary = (out / "summary.json").read_bytes()
    code, _, text = run(tiny(out, resume=True))
    assert code == 0 and "already complete" in text
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "summary.json").read_bytes() == summary


def test_plots_that_cannot_be_drawn_are_not_claimed_and_resume_draws_them(tmp_path,
                                                                          monkeypatch):
    # matplotlib missing (jaxbn installed without its [train] extra)
    def no_matplotlib(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'matplotlib'")

    out = tmp_path / "run"
    draw = loop.plots.plot_run
    monkeypatch.setattr(loop.plots, "plot_run", no_matplotlib)
    code, _, text = run(tiny(out))
    assert code == 0 and (out / "summary.json").exists() and not (out / "loss.png").exists()
    lines = text.splitlines()
    assert lines[-3] == (f"warning: could not draw plots: No module named 'matplotlib'; once "
                         f"that is fixed, python -m train --out {out} --resume draws them")
    assert lines[-2] == f"wrote summary.json, metrics.jsonl and checkpoints/ in {out}"
    monkeypatch.setattr(loop.plots, "plot_run", draw)
    code, _, text = run(tiny(out, resume=True))
    assert code == 0 and (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_with_nothing_to_resume_says_it_starts_a_new_run(tmp_path):
    out = tmp_path / "run"
    code, _, text = run(tiny(out, resume=True))
    assert code == 0
    assert text.splitlines()[0] == f"nothing to resume in {out}: starting a new run"


def test_resume_with_a_killed_first_start_does_not_claim_nothing_to_resume(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / loop.RUN_CONFIG).write_text(json.dumps(tiny(out).to_dict()))
    _, _, text = run(tiny(out, resume=True))
    assert "nothing to resume" not in text


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_a_run_of_one_step_reports_no_speed(tmp_path, schedule):
    out = tmp_path / "run"
    code, summary, text = run(tiny(out, limit_train=32, schedule=schedule))
    assert code == 0 and summary["steps"] == 1
    # The only step includes compilation: there is no step to measure speed on.
    assert summary["images_per_second"] is None
    assert json.loads((out / "summary.json").read_text())["images_per_second"] is None
    assert text.splitlines()[-1].endswith(
        "no images/s: they are measured after the first step, the only one")


def test_final_line_says_what_its_speed_measures(tmp_path):
    _, summary, text = run(tiny(tmp_path / "run"))
    assert text.splitlines()[-1].endswith(
        f"{summary['images_per_second']:.0f} images/s after the first step")


def test_more_steps_than_the_step_counter_holds_are_refused_before_out_exists(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="more than the 2147483647 a 32-bit step counter"):
        run(tiny(out, epochs=MAX_STEPS))
    assert not out.exists()


def _run_config_only(out, **kw):
    """--out of a run killed before its first checkpoint: config.json alone."""
    out.mkdir()
    (out / loop.RUN_CONFIG).write_text(json.dumps(tiny(out, **kw).to_dict()))


@pytest.mark.parametrize("change, message", [
    ({"label_smoothing": 0.1}, "was written by a newer version of train (unknown settings: "
                               "label_smoothing); upgrade train to resume it, or start a fresh "
                               "--out"),
    ({"seed": "5"}, ": setting seed is '5' (str), expected int; it was not written by this "
                    "version of train"),
], ids=["newer", "wrong-type"])
def test_resume_refuses_a_config_json_of_another_version(tmp_path, change, message):
    # A run killed before its first checkpoint resumes from config.json alone.
    out = tmp_path / "run"
    _run_config_only(out)
    saved = json.loads((out / loop.RUN_CONFIG).read_text())
    (out / loop.RUN_CONFIG).write_text(json.dumps({**saved, **change}))
    with pytest.raises(loop.RunError) as info:
        loop.resume_config({"out": str(out), "resume": True})
    assert str(info.value).startswith(str(out / loop.RUN_CONFIG))
    assert message in str(info.value)


def test_resume_refuses_typed_options_the_checkpointed_run_ignores(tmp_path):
    out = tmp_path / "run"
    _run_config_only(out, norm="layer", model="cnn")
    with pytest.raises(ConfigError, match="--bn-momentum only applies to .* --norm layer"):
        loop.resume_config({"out": str(out), "resume": True, "bn_momentum": 0.9})
    with pytest.raises(ConfigError, match="--activation only applies to --model mlp"):
        loop.resume_config({"out": str(out), "resume": True, "activation": "sigmoid"})


def test_resume_accepts_typed_options_that_apply_to_the_checkpointed_run(tmp_path):
    # The command line alone (norm batch) would refuse --virtual-batch-size.
    out = tmp_path / "run"
    _run_config_only(out, norm="ghost")
    cfg = loop.resume_config({"out": str(out), "resume": True, "virtual_batch_size": 16})
    assert cfg.norm == "ghost"


def test_resume_checks_typed_values_against_the_checkpointed_settings(tmp_path):
    # The command line alone (norm batch, one device) would refuse both.
    out = tmp_path / "run"
    _run_config_only(out, norm="layer", batch_size=1)
    cfg = loop.resume_config({"out": str(out), "resume": True, "batch_size": 1})
    assert (cfg.norm, cfg.batch_size) == ("layer", 1)
    out = tmp_path / "groups"
    _run_config_only(out, devices=4, bn_group_size=2, batch_size=32)
    cfg = loop.resume_config({"out": str(out), "resume": True, "bn_group_size": 2})
    assert (cfg.devices, cfg.bn_group_size) == (4, 2)


def test_resume_finds_the_data_where_jaxbn_data_now_points(tmp_path, monkeypatch):
    # The run was started on another machine (or before the data moved).
    out = tmp_path / "run"
    _run_config_only(out, dataset="mnist", data_dir="/old/place")
    monkeypatch.delenv("JAXBN_DATA", raising=False)
    assert loop.resume_config({"out": str(out), "resume": True}).data_dir == "/old/place"
    monkeypatch.setenv("JAXBN_DATA", "/new/place")
    assert loop.resume_config({"out": str(out), "resume": True}).data_dir == "/new/place"
    typed = loop.resume_config({"out": str(out), "resume": True, "data_dir": "/typed"})
    assert typed.data_dir == "/typed"


def test_resume_with_nothing_to_resume_checks_typed_options(tmp_path):
    with pytest.raises(ConfigError, match="--virtual-batch-size only applies to --norm ghost"):
        loop.resume_config({"out": str(tmp_path / "new"), "resume": True,
                            "virtual_batch_size": 8})


def _strict_json(text):
    # NaN and Infinity are not JSON: jq, JavaScript and most parsers refuse them.
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_a_non_finite_test_loss_is_written_as_json_null(tmp_path):
    # Diverged running statistics make the evaluation loss NaN while the
    # training steps stay finite, so the run finishes and writes its files.
    def poisoned_test_set(*args, **kwargs):
        d = data.load(*args, **kwargs)
        return d._replace(x_test=np.full_like(d.x_test, np.nan))

    out = tmp_path / "run"
    code, summary, text = run(tiny(out), load_data=poisoned_test_set)
    assert code == 0 and summary["test_loss"] is None
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert _strict_json(lines[-1])["test_loss"] is None
    assert _strict_json((out / "summary.json").read_text())["test_loss"] is None
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "test loss n/a" in text.splitlines()[-1]


def test_evaluation_uses_running_statistics_whatever_the_eval_batch(tmp_path, monkeypatch):
    # With running statistics each test example's prediction is its own:
    # splitting the test set into small zero-padded batches changes nothing.
    code, whole, _ = run(tiny(tmp_path / "whole", norm="batch"))
    assert code == 0
    monkeypatch.setattr(loop, "EVAL_BATCH", 7)  # 360 test examples: 52 batches, the last padded
    code, split, _ = run(tiny(tmp_path / "split", norm="batch"))
    assert code == 0
    assert split["test_accuracy"] == whole["test_accuracy"]
    assert split["test_loss"] == pytest.approx(whole["test_loss"], rel=1e-5)


def test_skipped_non_finite_steps_are_counted_in_the_summary(tmp_path):
    # One NaN example among 64: one batch of two is non-finite in each epoch.
    def one_nan_example(*args, **kwargs):
        d = data.load(*args, **kwargs)
        x = d.x_train.copy()
        x[5] = np.nan
        return d._replace(x_train=x)

    out = tmp_path / "run"
    code, summary, _ = run(tiny(out, epochs=3), load_data=one_nan_example)
    assert code == 0
    steps_ = [r for r in records(out) if r["kind"] == "step"]
    assert [r["finite"] for r in steps_].count(False) == 3
    assert summary["bad_steps"] == 3
    assert json.loads((out / "summary.json").read_text())["bad_steps"] == 3
    # The epoch's train loss and accuracy average its finite steps only.
    last = [r for r in steps_ if r["epoch"] == 3 and r["finite"]]
    assert len(last) == 1
    assert summary["train_loss"] == pytest.approx(last[0]["loss"])
    assert summary["train_accuracy"] == pytest.approx(last[0]["accuracy"])
