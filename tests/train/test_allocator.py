"""train.allocator: freed large blocks are reused instead of faulting in afresh."""

import json
import subprocess
import sys

from conftest import REPO, cli_env

# A jitted program writing a fresh 32 MiB output, called a few times: count
# minor page faults (first touches of fresh pages) per call after warm-up.
PROGRAM = """
import json, resource, sys
from train.allocator import tune_malloc
tuned = tune_malloc() if sys.argv[1] == "tuned" else False
import jax, jax.numpy as jnp
double = jax.jit(lambda x: x * 2)
x = jnp.ones((8 * 2**20,), jnp.float32)
for _ in range(2):
    double(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    double(x).block_until_ready()
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"tuned": tuned, "faults_per_round": (after - before) / 4}))
"""


def _faults(mode: str, **env) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROGRAM, mode], cwd=REPO,
                          env=cli_env(**env), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_tuned_malloc_reuses_freed_pages():
    default, tuned = _faults("default"), _faults("tuned")
    assert tuned["tuned"]
    # 32 MiB is 8192 pages of 4 KiB: with glibc's mmap every output faults
    # them all in again; with tuning the freed heap block is reused (measured:
    # 8192 against 2048 per call here, and 15,600 against 0 per CNN step).
    assert default["faults_per_round"] > 4000
    assert tuned["faults_per_round"] < default["faults_per_round"] / 2


def test_user_malloc_settings_win():
    result = _faults("tuned", MALLOC_ARENA_MAX="2")
    assert result["tuned"] is False
    assert result["faults_per_round"] > 4000
