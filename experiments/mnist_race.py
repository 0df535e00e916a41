"""MNIST test accuracy against wall time: ``python -m train`` vs the same model in PyTorch.

    JAXBN_DATA=../shared/data .venv/bin/python experiments/mnist_race.py [--epochs 2] [--out DIR]

Both sides train the default CNN (conv32-BN-pool-conv64-BN-pool-dense128-BN-
dense10) with Adam, a linear warm-up over the first 5% of steps and cosine
decay to 1% of the 2e-3 peak, batch 128, on the same shuffled and randomly
shifted images (``train.data``, with train's MNIST default shift), and
evaluate all 10,000 test images after every epoch.
They run one after the other, each in its own process with the machine to
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


def torch_run(epochs: int) -> list[dict]:
    """The same model, optimizer, schedule and data order in PyTorch (this process)."""
    import numpy as np
    import torch
    from torch import nn

    from benchmarks.torch_worker import CNN
    from train import data
    from train.config import DATASET_DEFAULTS

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(0)
    ds = data.load("mnist", os.environ.get("JAXBN_DATA"))
    to_nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    x_test, y_test = to_nchw(ds.x_test), torch.from_numpy(ds.y_test).long()
    model = CNN().train()
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
    rows = ["| epoch | JAX wall | JAX test acc | PyTorch wall | PyTorch test acc |",
            "|---|---|---|---|---|"]
    for j, t in zip(results["jax"], results["pytorch"]):
        rows.append(f"| {j['epoch']} | {j['wall_seconds']:.0f} s | {100 * j['test_accuracy']:.2f}% "
                    f"| {t['wall_seconds']:.0f} s | {100 * t['test_accuracy']:.2f}% |")
    for target in (0.99, 0.994):
        rows.append(f"\nfirst at >= {100 * target:.1f}%: JAX {first_reaching(results['jax'], target)}, "
                    f"PyTorch {first_reaching(results['pytorch'], target)}")
    plot(results, out / "mnist_race.png")
    return "\n".join(rows)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in results.items():
        if name in ("jax", "pytorch"):
            ax.plot([0] + [p["wall_seconds"] for p in points],
                    [None] + [100 * p["test_accuracy"] for p in points], "o-",
                    label={"jax": "python -m train (JAX, jaxbn)", "pytorch": "PyTorch"}[name])
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
    p.add_argument("--side", choices=("both", "pytorch"), default="both", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.side == "pytorch":  # the child process: PyTorch without JAX in memory
        print(json.dumps(torch_run(args.epochs)))
        return 0
    with tempfile.TemporaryDirectory() as work:
        results = {"jax": jax_run(args.epochs, Path(work))}
    child = subprocess.run([sys.executable, __file__, "--epochs", str(args.epochs),
                            "--side", "pytorch"], cwd=ROOT, check=True,
                           capture_output=True, text=True)
    results["pytorch"] = json.loads(child.stdout.strip().splitlines()[-1])
    results["machine"] = f"{os.cpu_count()}-core CPU"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mnist_race.json").write_text(json.dumps(results, indent=1) + "\n")
    print(report(results, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
