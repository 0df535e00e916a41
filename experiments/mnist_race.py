"""MNIST test accuracy against wall time: ``python -m train`` vs the same model in PyTorch.

    JAXBN_DATA=../shared/data .venv/bin/python experiments/mnist_race.py [--epochs 2] [--out DIR]

Both sides train the default CNN (conv32-BN-pool-conv64-BN-pool-dense128-BN-
dense10) with Adam, a linear warm-up over the first 5% of steps and cosine
decay to 1% of the 2e-3 peak, batch 128, on the same shuffled and randomly
shifted images (``train.data``, with train's MNIST default shift), and
evaluate all 10,000 test images after every epoch. PyTorch runs twice, in
its default NCHW memory format and in channels_last (its faster one on CPU).
The runs go one after the other, each in its own process with the machine to
itself. Wall time counts from process start (imports, data loading and
compilation included) to the end of each epoch's evaluation.

Prints a Markdown table and writes ``mnist_race.json`` and
``mnist_race.png`` into ``--out`` (default: ``docs/``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.perf_counter()
ROOT = Path(__file__).resolve().parent.parent
PEAK_LR, BATCH, MOMENTUM = 2e-3, 128, 0.1  # PyTorch's momentum 0.1 is train's 0.9


def jax_run(epochs: int, work: Path) -> list[dict]:
    """``python -m train`` as users run it; wall times from its own records."""
    out = work / "jax"
    subprocess.run([sys.executable, "-m", "train", "--dataset", "mnist", "--epochs", str(epochs),
                    "--out", str(out)], cwd=ROOT, check=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{"epoch": r["epoch"], "wall_seconds": r["elapsed_seconds"],
             "test_accuracy": r["test_accuracy"]} for r in records if r["kind"] == "epoch"]


LAYOUTS = {"pytorch": "contiguous_format", "pytorch channels_last": "channels_last"}
LABELS = {"jax": "python -m train (JAX, jaxbn)", "pytorch": "PyTorch NCHW",
          "pytorch channels_last": "PyTorch channels_last"}


def torch_run(epochs: int, layout: str) -> list[dict]:
    """The same model, optimizer, schedule and data order in PyTorch (this process),
    in memory format ``layout`` ('contiguous_format' is NCHW)."""
    import torch
    from torch import nn

    from benchmarks.torch_worker import CNN, in_layout
    from train import data
    from train.config import DATASET_DEFAULTS

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(0)
    ds = data.load("mnist", os.environ.get("JAXBN_DATA"))
    memory_format = getattr(torch, layout)
    to_nchw = lambda x: in_layout(torch.from_numpy(x).permute(0, 3, 1, 2), memory_format)
    x_test, y_test = to_nchw(ds.x_test), torch.from_numpy(ds.y_test).long()
    model = CNN().to(memory_format=memory_format).train()
    opt = torch.optim.Adam(model.parameters(), lr=PEAK_LR)
    spe = data.steps_per_epoch(len(ds.x_train), BATCH)
    schedule = warmup_cosine(spe * epochs)
    max_shift = DATASET_DEFAULTS["mnist"]["augment_shift"]
    step, points = 0, []
    for epoch in range(epochs):
        model.train()
        for xb, yb in data.train_batches(ds.x_train, ds.y_train, BATCH, seed=0, epoch=epoch,
                                         max_shift=max_shift):
            for group in opt.param_groups:
                group["lr"] = schedule(step)
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(to_nchw(xb)), torch.from_numpy(yb).long())
            loss.backward()
            opt.step()
            step += 1
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(x_test[i:i + 1000]).argmax(-1) == y_test[i:i + 1000]).sum())
                          for i in range(0, len(x_test), 1000))
        points.append({"epoch": epoch + 1, "wall_seconds": time.perf_counter() - STARTED,
                       "test_accuracy": correct / len(x_test)})
        print(f"pytorch epoch {epoch + 1}: {points[-1]}", flush=True)
    return points


def warmup_cosine(total: int):
    """optax.warmup_cosine_decay_schedule as train.steps.make_schedule sets it up."""
    warmup = max(1, total // 20)

    def lr(step: int) -> float:
        if step < warmup:
            return PEAK_LR * step / warmup
        t = min(step - warmup, total - warmup) / max(1, total - warmup)
        end = PEAK_LR * 0.01
        return end + (PEAK_LR - end) * 0.5 * (1 + math.cos(math.pi * t))
    return lr


def first_reaching(points: list[dict], target: float) -> str:
    hit = next((p for p in points if p["test_accuracy"] >= target), None)
    return "not reached" if hit is None else f"{hit['wall_seconds']:.0f} s (epoch {hit['epoch']})"


def report(results: dict, out: Path) -> str:
    runs = ["jax", *LAYOUTS]
    rows = ["| epoch | " + " | ".join(f"{LABELS[r]} wall | test acc" for r in runs) + " |",
            "|---" * (1 + 2 * len(runs)) + "|"]
    for points in zip(*(results[r] for r in runs)):
        cells = (f"{p['wall_seconds']:.0f} s | {100 * p['test_accuracy']:.2f}%" for p in points)
        rows.append(f"| {points[0]['epoch']} | " + " | ".join(cells) + " |")
    for target in (0.99, 0.994):
        reached = ", ".join(f"{LABELS[r]} {first_reaching(results[r], target)}" for r in runs)
        rows.append(f"\nfirst at >= {100 * target:.1f}%: {reached}")
    plot(results, out / "mnist_race.png")
    return "\n".join(rows)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in LABELS.items():
        points = results[name]
        ax.plot([0] + [p["wall_seconds"] for p in points],
                [None] + [100 * p["test_accuracy"] for p in points], "o-", label=label)
    ax.axhline(99.0, color="grey", lw=0.5)
    ax.set_xlabel("wall time from process start (s)")
    ax.set_ylabel("MNIST test accuracy (%)")
    ax.set_title(f"Same CNN, optimizer and data order; {results['machine']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    # The child processes: PyTorch without JAX in memory.
    p.add_argument("--torch-layout", choices=tuple(LAYOUTS.values()), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.torch_layout:
        print(json.dumps(torch_run(args.epochs, args.torch_layout)))
        return 0
    with tempfile.TemporaryDirectory() as work:
        results = {"jax": jax_run(args.epochs, Path(work))}
    for name, layout in LAYOUTS.items():
        child = subprocess.run([sys.executable, __file__, "--epochs", str(args.epochs),
                                "--torch-layout", layout], cwd=ROOT, check=True,
                               capture_output=True, text=True)
        results[name] = json.loads(child.stdout.strip().splitlines()[-1])
    results["machine"] = f"{os.cpu_count()}-core CPU"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mnist_race.json").write_text(json.dumps(results, indent=1) + "\n")
    print(report(results, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
