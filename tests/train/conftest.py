"""Shared fixtures for the training-package tests."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def cli_env(**extra) -> dict[str, str]:
    env = dict(os.environ)
    env.update(MPLBACKEND="Agg", JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    env.update(extra)
    return env


def run_cli(*args, env=None, timeout=180, cwd=None) -> subprocess.CompletedProcess:
    """Run ``python -m train ARGS`` from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "train", *map(str, args)],
        cwd=cwd or REPO, env=env or cli_env(), capture_output=True, text=True,
        timeout=timeout)


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        self.requests.append(self.path)
        super().do_GET()


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        # Tests of failed downloads hang up mid-file; anything else is printed.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture
def server(tmp_path, data_dir):
    """Serve a temporary copy of the MNIST files on 127.0.0.1 (a free port)."""
    root = tmp_path / "served"
    shutil.copytree(data_dir / "mnist", root / "mnist")
    requests: list[str] = []
    handler = type("H", (_Handler,), {"requests": requests})
    httpd = _Server(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/mnist/", root / "mnist", requests
    finally:
        httpd.shutdown()
        httpd.server_close()
