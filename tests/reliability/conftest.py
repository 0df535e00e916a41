"""Fixtures for the reliability tests (helpers live in reliability_helpers)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from reliability_helpers import REPO, TINY


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Path:
    """The tiny run, uninterrupted, in this process."""
    from train import loop
    from train.config import Config, resolve
    out = tmp_path_factory.mktemp("reference") / "run"
    code, _ = loop.run(resolve(Config(out=str(out), **TINY)), stdout=io.StringIO())
    assert code == 0
    return out


def shared_data_dir() -> Path:
    return Path(os.environ.get("JAXBN_DATA") or REPO.parent / "shared" / "data")


@pytest.fixture
def data_dir() -> Path:
    path = shared_data_dir()
    if not (path / "mnist").is_dir():
        pytest.skip(f"real data not found at {path} (set JAXBN_DATA to the folder "
                    "holding mnist/ and fashion-mnist/)")
    return path
