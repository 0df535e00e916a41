"""glibc malloc settings for XLA:CPU's large, short-lived buffers.

XLA:CPU allocates every step's outputs and temporaries afresh. glibc serves
blocks above its mmap threshold with new mappings, whose pages fault in one
by one on first touch and go back to the kernel on free: the CNN step took
12,000 to 16,000 page faults per step, a quarter to a third of its time on a
2-core machine (benchmarks/RESULTS.md, "Worker process settings"). With mmap off, one
arena and no trimming, freed blocks are reused: 0 to 3,400 faults a step.
The cost: the heap keeps its peak size instead of shrinking.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))


def tune_malloc() -> bool:
    """Apply the settings above; False where malloc is not glibc's or the user set MALLOC_*.

    Call it before JAX allocates anything large (best: before importing it).
    """
    if any(k.startswith("MALLOC_") for k in os.environ):
        return False  # the user's own settings win
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return all(mallopt(param, value) == 1 for param, value in SETTINGS)
