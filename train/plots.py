"""Loss and accuracy curves from ``metrics.jsonl`` (matplotlib, Agg backend)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable


def read_metrics(path: Path) -> list[dict]:
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                records.append(json.loads(line))
    return records


def _smooth(values: list[float], window: int) -> list[float]:
    # Trailing moving average: per-step losses are noisy at small batch sizes.
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def atomic_tmp(path: Path) -> Path:
    """Where an atomic write of ``path`` goes first: a hidden name beside it."""
    return path.with_name(f".{path.name}.tmp")


def _save(fig, path: Path) -> None:
    # Write beside the target and rename, so a kill never leaves half a PNG.
    tmp = atomic_tmp(path)
    fig.savefig(tmp, dpi=110, format="png")
    tmp.replace(path)


# The files plot_run writes, one per metric.
FILES = {"loss": "loss.png", "accuracy": "accuracy.png"}


def plot_run(records: Iterable[dict], out_dir: Path, title: str = "") -> list[Path]:
    """Write ``loss.png`` and ``accuracy.png`` into ``out_dir``; return their paths."""
    # The object-oriented API draws with Agg without touching pyplot's global
    # state or the user's backend choice (and imports faster).
    from matplotlib.figure import Figure

    records = list(records)
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    written = []

    for metric, ylabel in (("loss", "cross-entropy loss"), ("accuracy", "accuracy")):
        fname = FILES[metric]
        fig = Figure(figsize=(6.4, 4.0))
        ax = fig.add_subplot()
        finite = [r for r in steps if r.get("finite", True)]
        if finite:
            xs = [r["step"] for r in finite]
            ys = [r[metric] for r in finite]
            ax.plot(xs, ys, color="0.8", lw=0.8, label="train (per step)")
            ax.plot(xs, _smooth(ys, max(1, len(ys) // 50)), color="C0", lw=1.2,
                    label="train (smoothed)")
        if epochs:
            xs = [r["step"] for r in epochs]
            # null: a non-finite test loss (diverged running statistics)
            ys = [float("nan") if r[f"test_{metric}"] is None else r[f"test_{metric}"]
                  for r in epochs]
            ax.plot(xs, ys, "o-", color="C3",
                    label="test (running statistics)")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if metric == "loss":
            ax.set_yscale("log")
        else:
            ax.set_ylim(top=1.005)
        if title:
            ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / fname
        _save(fig, path)
        written.append(path)
    return written
