"""A full disk (or quota) under --out: one line, and --resume then finishes the run exactly.

The run is started with a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored):
a write past it fails with EFBIG the way a write to a full disk fails with
ENOSPC, at a chosen file.
"""

import subprocess
import sys

import pytest

from reliability_helpers import (REPO, TINY_ARGS, assert_one_line_error, assert_same_run,
                                 cli_env, run_cli)
from reliability_helpers import reference  # noqa: F401  (a fixture)


# Sets the limit, then execs python -m train (limits and ignored signals
# survive exec; a preexec_fn would fork this multithreaded process).
LAUNCH = ("import os, resource, signal, sys; "
          "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
          "limit = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); "
          "os.execv(sys.executable, [sys.executable, '-m', 'train', *sys.argv[2:]])")


def run_with_file_size_limit(limit, *args):
    return subprocess.run([sys.executable, "-c", LAUNCH, str(limit), *map(str, args)],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("limit", [300, 2000, 60000],
                         ids=["config.json", "metrics.jsonl", "checkpoint"])
def test_a_full_disk_stops_with_one_line_and_resume_finishes_exactly(tmp_path, reference, limit):
    out = tmp_path / "run"
    proc = run_with_file_size_limit(limit, *TINY_ARGS, "--out", out)
    assert proc.returncode == 1
    assert_one_line_error(proc, f"cannot write into --out {out}", "File too large",
                          "run the same command with --resume")
    resumed = run_cli(*TINY_ARGS, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(out, reference)
