"""train.allocator: the train step's freed buffers are reused, not faulted in afresh."""

import json
import subprocess
import sys

from conftest import REPO, cli_env

# train's CNN step at batch 128, warmed up; minor page faults (first touches
# of fresh pages) per step.
PROGRAM = """
import json, sys
from train.allocator import tune_malloc
tuned = tune_malloc() if sys.argv[1] == "tuned" else False
from benchmarks import cnn, timing
step = cnn.Stepper("Conv + max_pool", 128)
step()
print(json.dumps({"tuned": tuned, "faults_per_step": timing.faults_per_call(step, 4)}))
"""


def _faults(mode: str, **env) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROGRAM, mode], cwd=REPO,
                          env=cli_env(**env), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_tuned_malloc_cuts_page_faults():
    default, tuned = _faults("default"), _faults("tuned")
    assert tuned["tuned"] and not default["tuned"]
    # Measured: about 16,000 faults per step with glibc's defaults (every
    # buffer above the mmap threshold is mapped afresh), 0 or 3,384 tuned
    # (depending on where the heap's free blocks fall).
    assert default["faults_per_step"] > 8000
    assert tuned["faults_per_step"] < default["faults_per_step"] / 3


def test_user_malloc_settings_win():
    assert _faults("tuned", MALLOC_ARENA_MAX="2")["tuned"] is False
