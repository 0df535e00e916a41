"""Interleaved timing and plain-text tables (no JAX or PyTorch imports).

The machines these run on are shared and noisy, so alternatives are timed
round-robin and compared by their medians: a burst of load then hits every
alternative alike instead of whichever ran during it. Each round runs them
in a new order (a seeded shuffle): a call is slowed by the one before it
(after Flax's bfloat16 BN, which writes 64 MiB of temporaries, the same
program ran 20-40% slower), so no alternative may mostly follow the same one.
"""

from __future__ import annotations

import random
import resource
import statistics
import time
from typing import Callable, Mapping, Sequence


# Untimed rounds before the timed ones: the first rounds after compiling ran
# up to 1.5x slower while malloc's heap settled.
WARMUP_ROUNDS = 2


def interleave(fns: Mapping[str, Callable[[], object]], repeats: int,
               warmup: int = WARMUP_ROUNDS) -> dict[str, list[float]]:
    """Seconds per call of each blocking ``fn``, timed round-robin ``repeats`` times.

    Every round shuffles the order (the same orders in every run);
    ``warmup`` untimed rounds come first.
    """
    names = list(fns)
    order = random.Random(0)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + repeats):
        order.shuffle(names)
        for name in names:
            start = time.perf_counter()
            fns[name]()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def faults_per_call(fn: Callable[[], object], calls: int = 3) -> float:
    """Minor page faults (first touches of fresh memory) per call of ``fn``."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def medians(times: Mapping[str, Sequence[float]]) -> dict[str, float]:
    return {name: statistics.median(ts) for name, ts in times.items()}


def ms(seconds: float) -> str:
    """Milliseconds below a second, seconds above."""
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}x"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (also readable as plain text)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])
