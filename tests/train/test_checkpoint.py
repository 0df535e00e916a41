import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import checkpoint


def _state(value=0.0):
    return {"w": jnp.full((3, 2), value, jnp.float32), "n": jnp.asarray(7, jnp.int32),
            "key": jax.random.PRNGKey(1)}


def _same(a, b):
    return all(np.array_equal(x, y) and np.asarray(x).dtype == np.asarray(y).dtype
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_round_trip_is_exact_and_keeps_the_last_three(tmp_path):
    root = tmp_path / "checkpoints"
    for pos in range(1, 6):
        checkpoint.save(root, _state(pos / 3), {"note": pos}, position=pos)
    assert [p for p, _ in checkpoint.list_checkpoints(root)] == [3, 4, 5]
    state, meta = checkpoint.restore_latest(root, _state())
    assert _same(state, _state(5 / 3)) and meta["note"] == 5 and meta["position"] == 5
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp")]


def test_corrupted_newest_checkpoint_is_skipped_with_a_warning(tmp_path):
    root = tmp_path / "checkpoints"
    checkpoint.save(root, _state(1.0), {}, position=1)
    newest = checkpoint.save(root, _state(2.0), {}, position=2)
    blob = newest / checkpoint.STATE_FILE
    blob.write_bytes(blob.read_bytes()[:-20])  # a torn write
    warnings = []
    state, meta = checkpoint.restore_latest(root, _state(), warn=warnings.append)
    assert meta["position"] == 1 and _same(state, _state(1.0))
    assert len(warnings) == 1 and "ckpt-000000002" in warnings[0] and "checksum" in warnings[0]


@pytest.mark.parametrize("damage", ["no_meta", "bad_json", "no_state", "other_model"])
def test_unusable_checkpoints_are_skipped(tmp_path, damage):
    root = tmp_path / "checkpoints"
    checkpoint.save(root, _state(1.0), {}, position=1)
    path = checkpoint.save(root, _state(2.0), {}, position=2)
    template = _state()
    if damage == "no_meta":
        (path / checkpoint.META_FILE).unlink()
    elif damage == "bad_json":
        (path / checkpoint.META_FILE).write_text('{"format": 1, "sha')
    elif damage == "no_state":
        (path / checkpoint.STATE_FILE).unlink()
    else:
        template = {"w": jnp.zeros((4, 2)), "n": jnp.asarray(0, jnp.int32),
                    "key": jax.random.PRNGKey(0)}
    warnings = []
    found = checkpoint.restore_latest(root, template, warn=warnings.append)
    if damage == "other_model":
        assert found is None and len(warnings) == 2
        assert "shape" in warnings[0]
    else:
        assert found[1]["position"] == 1 and len(warnings) == 1


def test_nothing_to_restore(tmp_path):
    assert checkpoint.restore_latest(tmp_path / "none", _state()) is None


def test_leftover_temporary_folders_are_not_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    checkpoint.save(root, _state(1.0), {}, position=1)
    partial = root / ".tmp-ckpt-000000002-123"
    partial.mkdir()
    (partial / checkpoint.STATE_FILE).write_bytes(b"half")
    assert [p for p, _ in checkpoint.list_checkpoints(root)] == [1]
    assert checkpoint.remove_partial(root) == [partial] and not partial.exists()


def test_meta_records_checksum_and_leaf_layout(tmp_path):
    path = checkpoint.save(tmp_path, _state(), {"x": 1}, position=9)
    meta = json.loads((path / checkpoint.META_FILE).read_text())
    assert len(meta["sha256"]) == 64
    assert {leaf["name"]: leaf["shape"] for leaf in meta["leaves"]} == {
        "['key']": [2], "['n']": [], "['w']": [3, 2]}


def test_a_bit_flip_in_meta_json_is_detected(tmp_path):
    path = checkpoint.save(tmp_path, _state(), {"batch": 4}, position=1)
    meta = path / checkpoint.META_FILE
    meta.write_bytes(meta.read_bytes().replace(b'"batch": 4', b'"batch": 5'))
    with pytest.raises(checkpoint.CheckpointError, match="meta.json does not match its checksum"):
        checkpoint.restore(path, _state())


def test_format_1_checkpoints_without_a_meta_checksum_still_load(tmp_path):
    path = checkpoint.save(tmp_path, _state(2.0), {"note": 1}, position=1)
    meta = json.loads((path / checkpoint.META_FILE).read_text())
    del meta["meta_sha256"]
    meta["format"] = 1
    (path / checkpoint.META_FILE).write_text(json.dumps(meta))
    state, loaded = checkpoint.restore(path, _state())
    assert _same(state, _state(2.0)) and loaded["note"] == 1


def test_saving_over_a_damaged_checkpoint_replaces_it(tmp_path):
    path = checkpoint.save(tmp_path, _state(1.0), {}, position=1)
    (path / checkpoint.STATE_FILE).write_bytes(b"torn")
    assert checkpoint.save(tmp_path, _state(2.0), {}, position=1) == path
    assert _same(checkpoint.restore(path, _state())[0], _state(2.0))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # nothing set aside is left
    # An intact checkpoint at the same position is kept as it is.
    checkpoint.save(tmp_path, _state(3.0), {}, position=1)
    assert _same(checkpoint.restore(path, _state())[0], _state(2.0))


def test_replace_rewrites_an_intact_checkpoint_at_the_same_position(tmp_path):
    path = checkpoint.save(tmp_path, _state(1.0), {"evaluated": False}, position=1)
    checkpoint.save(tmp_path, _state(1.0), {"evaluated": True}, position=1, replace=True)
    assert checkpoint.restore(path, _state())[1]["evaluated"] is True
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_checkpoint_moved_aside_by_a_killed_replace_is_put_back(tmp_path):
    # Killed between moving the old checkpoint aside and renaming the new
    # one into place: the old one is complete and still the newest state.
    path = checkpoint.save(tmp_path, _state(1.0), {}, position=1)
    path.rename(tmp_path / f".tmp-old-{path.name}-123")
    (tmp_path / f".tmp-{path.name}-123").mkdir()  # the new one, never renamed
    assert checkpoint.remove_partial(tmp_path) == [tmp_path / f".tmp-{path.name}-123"]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert _same(checkpoint.restore(path, _state())[0], _state(1.0))
