"""Damaged checkpoints on disk: skipped with a warning naming them, older ones used.

tests/train covers a truncated state.npz and cut-off JSON; these add damage
that keeps the files' sizes or their JSON valid, and a folder where nothing
verifies, as the user sees it from the command line.
"""

import io
import json
import os

import pytest

from reliability_helpers import (STEPS_PER_EPOCH, TINY, TINY_ARGS, assert_one_line_error,
                                 assert_same_run, run_cli)
from reliability_helpers import reference  # noqa: F401  (a fixture)

from train import checkpoint, loop
from train.config import Config, resolve

STOP = STEPS_PER_EPOCH + 4  # mid-epoch 2: checkpoints at steps 10 and 14


def interrupted_run(out):
    """A run stopped after step STOP (as on SIGINT): checkpoints 10 and 14."""
    code, _ = loop.run(resolve(Config(out=str(out), **TINY)), stdout=io.StringIO(),
                       interrupt_at_step=STOP)
    assert code == loop.EXIT_INTERRUPTED
    found = checkpoint.list_checkpoints(out / "checkpoints")
    assert [pos for pos, _ in found] == [STEPS_PER_EPOCH, STOP]
    return found[-1][1]


def resume(out):
    stdout = io.StringIO()
    code, _ = loop.run(resolve(Config(out=str(out), resume=True, **TINY)), stdout=stdout)
    assert code == 0
    return stdout.getvalue()


def flip_bit(path, offset, bit=0):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 1 << bit
    path.write_bytes(bytes(raw))


def flip_in_state(ckpt):
    blob = ckpt / checkpoint.STATE_FILE
    flip_bit(blob, blob.stat().st_size // 2)  # inside the arrays; size unchanged


def flip_batch_index(ckpt):
    # "batch": 4 -> "batch": 5, a one-bit change that leaves valid JSON: without
    # a checksum over meta.json the run would silently skip a batch.
    meta = ckpt / checkpoint.META_FILE
    offset = meta.read_bytes().index(b'"batch": 4') + len(b'"batch": ')
    flip_bit(meta, offset)


def flip_metrics_length(ckpt):
    # The byte count metrics.jsonl is cut back to on resume.
    meta = ckpt / checkpoint.META_FILE
    offset = meta.read_bytes().index(b'"metrics_bytes": ') + len(b'"metrics_bytes": ')
    flip_bit(meta, offset, bit=1)


def garbage_meta(ckpt):
    (ckpt / checkpoint.META_FILE).write_bytes(os.urandom(256) + b"\xff\xfe")


def empty_state(ckpt):
    (ckpt / checkpoint.STATE_FILE).write_bytes(b"")


DAMAGE = [
    (flip_in_state, "state.npz does not match its checksum"),
    (flip_batch_index, "meta.json does not match its checksum"),
    (flip_metrics_length, "meta.json does not match its checksum"),
    (garbage_meta, "meta.json is unreadable"),
    (empty_state, "state.npz does not match its checksum"),
]


@pytest.mark.parametrize("damage, reason", DAMAGE, ids=[f.__name__ for f, _ in DAMAGE])
def test_damaged_newest_checkpoint_is_skipped_and_the_older_one_used(
        tmp_path, reference, damage, reason):
    out = tmp_path / "run"
    newest = interrupted_run(out)
    damage(newest)
    text = resume(out)
    assert f"warning: skipping checkpoint {newest}: {reason}" in text
    assert f"resuming from checkpoints/ckpt-{STEPS_PER_EPOCH:09d}" in text
    assert_same_run(out, reference)


def test_no_checkpoint_verifies_the_command_line_says_so(tmp_path, reference):
    out = tmp_path / "run"
    interrupted_run(out)
    damaged = [path for _, path in checkpoint.list_checkpoints(out / "checkpoints")]
    flip_in_state(damaged[0])
    flip_batch_index(damaged[1])
    proc = run_cli(*TINY_ARGS, "--out", out, "--resume")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:3] == [
        f"warning: skipping checkpoint {damaged[1]}: meta.json does not match its checksum "
        "(partial or corrupted)",
        f"warning: skipping checkpoint {damaged[0]}: state.npz does not match its checksum "
        "(partial or corrupted)",
        f"no checkpoint in {out / 'checkpoints'} verifies (see the warnings above); "
        f"starting from the beginning",
    ]
    assert_same_run(out, reference)  # the restart is the uninterrupted run


def test_a_restart_replaces_damaged_checkpoints_it_reaches_again(tmp_path, reference):
    # Nothing verifies, so the run starts over; when it is stopped again at
    # step 10, checkpoint 10 must now hold its state, not the damaged copy.
    out = tmp_path / "run"
    interrupted_run(out)
    (_, older), (_, newest) = checkpoint.list_checkpoints(out / "checkpoints")
    flip_in_state(older)
    flip_batch_index(newest)
    code, _ = loop.run(resolve(Config(out=str(out), resume=True, **TINY)), stdout=io.StringIO(),
                       interrupt_at_step=STEPS_PER_EPOCH)
    assert code == loop.EXIT_INTERRUPTED
    text = resume(out)
    assert f"resuming from checkpoints/ckpt-{STEPS_PER_EPOCH:09d}" in text
    assert_same_run(out, reference)


def rewrite_meta(ckpt, change):
    """Change meta.json's fields as another version of train would, checksum included."""
    path = ckpt / checkpoint.META_FILE
    meta = json.loads(path.read_text())
    change(meta)
    meta["meta_sha256"] = checkpoint._meta_digest(meta)
    path.write_text(json.dumps(meta, indent=1))


NEWER = "was written by a newer version of train"
FOREIGN = "was not written by this version of train"
OTHER_VERSIONS = [
    (lambda m: m["bookkeeping"].update(grad_accum_index=2),
     [NEWER, "unknown bookkeeping fields: grad_accum_index", "start a fresh --out"]),
    (lambda m: m["config"].update(label_smoothing=0.1),
     [NEWER, "unknown settings: label_smoothing", "start a fresh --out"]),
    (lambda m: m.update(format=checkpoint.FORMAT + 1),
     [NEWER, f"format {checkpoint.FORMAT + 1}", "start a fresh --out"]),
    (lambda m: m["bookkeeping"].pop("loss_sum"),
     [FOREIGN, "bookkeeping field loss_sum is missing", "start a fresh --out"]),
    (lambda m: m["bookkeeping"].update(batch="4"),
     [FOREIGN, "bookkeeping field batch is '4' (str), expected int"]),
    (lambda m: m.update(bookkeeping=[4]),
     [FOREIGN, "bookkeeping is [4] (list), expected dict"]),
    (lambda m: m.pop("metrics_bytes"),
     [FOREIGN, "metrics_bytes is missing"]),
    (lambda m: m["config"].update(epochs="20"),
     [FOREIGN, "setting epochs is '20' (str), expected int or null"]),
]


@pytest.mark.parametrize("change, fragments", OTHER_VERSIONS, ids=[
    "extra-bookkeeping", "extra-setting", "newer-format", "missing-field", "wrong-type",
    "bookkeeping-not-a-dict", "missing-top-level-field", "wrong-setting-type"])
def test_a_checkpoint_of_another_version_is_refused_with_one_line_and_kept(
        tmp_path, change, fragments):
    # Its checksums hold, so it is not damaged: skipping it for an older
    # checkpoint (or the beginning) would cut metrics.jsonl back and in time
    # delete it; a resume must stop instead and change nothing in --out.
    out = tmp_path / "run"
    newest = interrupted_run(out)
    rewrite_meta(newest, change)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    proc = run_cli("--out", out, "--resume")
    line = assert_one_line_error(proc, str(newest), *fragments)
    assert proc.returncode == 1, line
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before
