"""Atomic, checksummed checkpoints of a TrainState pytree.

Layout: ``checkpoints/ckpt-<position>/`` holding ``state.npz`` (the pytree's
leaves, in flattening order) and ``meta.json`` (data position, run
bookkeeping, leaf names/shapes/dtypes, the SHA-256 of ``state.npz`` and the
SHA-256 of meta.json's own other fields).

A checkpoint is written into a hidden temporary folder, fsynced, then renamed
into place: a kill at any moment leaves either the complete checkpoint or no
checkpoint under a real name. On load, anything that does not verify (bad
JSON, wrong checksum, leaves that do not match the model) is skipped with a
warning and the next older checkpoint is tried; one of a newer format stops
the resume instead (NewerCheckpointError), as nothing is wrong with it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

# Format 2 adds meta_sha256; format 1 (no checksum over meta.json) still loads.
FORMAT = 2
_FORMATS = (1, 2)
_NAME = re.compile(r"^ckpt-(\d+)$")
# Where save() moves the checkpoint it replaces, for the moment of the swap.
_ASIDE = ".tmp-old-"
_ASIDE_NAME = re.compile(r"^\.tmp-old-(ckpt-\d+)-\d+$")
STATE_FILE = "state.npz"
META_FILE = "meta.json"


class CheckpointError(Exception):
    """A checkpoint that cannot be used (the message says why)."""


class NewerCheckpointError(CheckpointError):
    """A checkpoint of a newer version of train: never skipped for an older one.

    Skipping it would resume from an older checkpoint or the beginning, cut
    metrics.jsonl back, and in time delete it as an old checkpoint.
    """

    def __init__(self, path: Path, what: str):
        super().__init__(f"checkpoint {path} was written by a newer version of train ({what}); "
                         f"upgrade train to resume it, or start a fresh --out")


def _leaf_names(tree) -> list[str]:
    return [jax.tree_util.keystr(path)
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _meta_digest(meta: dict[str, Any]) -> str:
    # Canonical JSON: a float's repr round-trips, so a re-read dict hashes alike.
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _verifies(path: Path) -> bool:
    """Whether checkpoint ``path``'s files match their checksums."""
    try:
        meta = read_meta(path)
        payload = (path / STATE_FILE).read_bytes()
    except (CheckpointError, OSError):
        return False
    return hashlib.sha256(payload).hexdigest() == meta.get("sha256")


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete-named checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        m = _NAME.match(entry.name)
        if m and entry.is_dir():
            found.append((int(m.group(1)), entry))
    return sorted(found)


def save(root: Path, state: Any, meta: dict[str, Any], *, position: int, keep: int = 3,
         replace: bool = False) -> Path:
    """Write ``state`` and ``meta`` as checkpoint ``position``; keep the newest ``keep``.

    An intact checkpoint already at ``position`` is kept as it is, unless
    ``replace``: the same state with newer bookkeeping (an epoch's checkpoint
    taken before its evaluation, then again after it).
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"ckpt-{position:09d}"
    if not replace and final.exists() and _verifies(final):
        # Same data position, same state: nothing new to write.
        return final
    leaves = [np.asarray(x) for x in jax.device_get(jax.tree.leaves(state))]
    buf = io.BytesIO()
    np.savez(buf, **{f"a{i}": leaf for i, leaf in enumerate(leaves)})
    payload = buf.getvalue()
    full_meta = dict(meta)
    full_meta.update(
        format=FORMAT,
        position=position,
        sha256=hashlib.sha256(payload).hexdigest(),
        leaves=[{"name": n, "shape": list(x.shape), "dtype": str(x.dtype)}
                for n, x in zip(_leaf_names(state), leaves)],
    )
    full_meta["meta_sha256"] = _meta_digest(full_meta)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _write_synced(tmp / STATE_FILE, payload)
    _write_synced(tmp / META_FILE, json.dumps(full_meta, indent=1).encode())
    _fsync_path(tmp)
    aside = root / f"{_ASIDE}{final.name}-{os.getpid()}"
    if final.exists():
        # A damaged or outdated checkpoint at this position: move it aside
        # (a kill right now leaves it there for remove_partial to put back).
        os.rename(final, aside)
    os.rename(tmp, final)
    _fsync_path(root)
    remove_partial(root, aside.name)
    for _, old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_partial(root: Path, prefix: str = ".tmp-") -> list[Path]:
    """Delete leftovers of interrupted writes (hidden temporary folders).

    A checkpoint that ``save`` moved aside, killed before the new one took
    its name, goes back under its name instead: it is complete.
    """
    removed = []
    if root.is_dir():
        for entry in root.iterdir():
            m = _ASIDE_NAME.match(entry.name)
            if m and not (root / m.group(1)).exists():
                os.rename(entry, root / m.group(1))
                continue
            if entry.name.startswith(prefix):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / META_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{META_FILE} is missing") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{META_FILE} is unreadable ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{META_FILE} has an unknown format")
    fmt = meta.get("format")
    if type(fmt) is int and fmt > FORMAT:
        raise NewerCheckpointError(path, f"format {fmt}, this one reads up to {FORMAT}")
    if fmt not in _FORMATS:
        raise CheckpointError(f"{META_FILE} has an unknown format")
    if meta["format"] >= 2 and meta.get("meta_sha256") != _meta_digest(meta):
        raise CheckpointError(f"{META_FILE} does not match its checksum (partial or corrupted)")
    return meta


def restore(path: Path, template: Any) -> tuple[Any, dict[str, Any]]:
    """Load checkpoint ``path`` into the structure of ``template`` (verified)."""
    meta = read_meta(path)
    try:
        payload = (path / STATE_FILE).read_bytes()
    except OSError as e:
        raise CheckpointError(f"{STATE_FILE} is unreadable ({e.strerror or e})") from None
    if hashlib.sha256(payload).hexdigest() != meta.get("sha256"):
        raise CheckpointError(f"{STATE_FILE} does not match its checksum (partial or corrupted)")
    template_leaves, treedef = jax.tree.flatten(template)
    names = _leaf_names(template)
    recorded = meta.get("leaves", [])
    if [r["name"] for r in recorded] != names:
        raise CheckpointError("its variables do not match this model (different model/norm?)")
    with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
        leaves = [npz[f"a{i}"] for i in range(len(names))]
    for name, leaf, ref in zip(names, leaves, template_leaves):
        if leaf.shape != np.shape(ref) or leaf.dtype != np.asarray(ref).dtype:
            raise CheckpointError(
                f"variable {name} has shape {leaf.shape} {leaf.dtype}, the model needs "
                f"{np.shape(ref)} {np.asarray(ref).dtype}")
    return jax.tree.unflatten(treedef, leaves), meta


def latest_meta(root: Path, warn: Callable[[str], None] = print) -> tuple[Path, dict] | None:
    """The newest checkpoint whose metadata reads (for configuration lookup)."""
    for _, path in reversed(list_checkpoints(root)):
        try:
            return path, read_meta(path)
        except NewerCheckpointError:
            raise
        except CheckpointError:
            continue
    return None


def restore_latest(root: Path, template: Any, warn: Callable[[str], None] = print
                   ) -> tuple[Any, dict[str, Any]] | None:
    """The newest checkpoint that verifies, or None; skipped ones are warned about."""
    for _, path in reversed(list_checkpoints(root)):
        try:
            return restore(path, template)
        except NewerCheckpointError:
            raise
        except CheckpointError as e:
            warn(f"warning: skipping checkpoint {path}: {e}")
    return None
