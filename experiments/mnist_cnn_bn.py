"""Full-width CNN on MNIST with and without batch norm, through ``python -m train``.

    JAXBN_DATA=../shared/data .venv/bin/python experiments/mnist_cnn_bn.py [--epochs 3] [--seeds 0 1]

Runs ``python -m train --dataset mnist --model cnn --norm {batch,none}`` (the
package defaults for MNIST: Adam, peak learning rate 2e-3 with warm-up and
cosine decay, batch 128) once per seed, skipping runs whose ``summary.json``
already exists, then prints a Markdown table of the per-epoch test accuracy
read from each run's ``metrics.jsonl``. Results are summarised in
``docs/experiments.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def run(norm: str, seed: int, epochs: int, out: Path, extra: list[str]) -> Path:
    folder = out / f"mnist-cnn-{norm}-seed{seed}"
    if (folder / "summary.json").exists():
        return folder
    cmd = [sys.executable, "-m", "train", "--dataset", "mnist", "--model", "cnn", "--norm", norm,
           "--epochs", str(epochs), "--seed", str(seed), "--out", str(folder), *extra]
    if folder.exists():
        cmd.append("--resume")
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    return folder


def table(folders: list[Path]) -> str:
    rows = []
    epochs = 0
    for folder in folders:
        summary = json.loads((folder / "summary.json").read_text())
        recs = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line]
        per_epoch = [r["test_accuracy"] for r in recs if r.get("kind") == "epoch"]
        epochs = max(epochs, len(per_epoch))
        first = lambda t: next((i + 1 for i, a in enumerate(per_epoch) if a >= t), None)
        cfg = summary["config"]
        rows.append((cfg["norm"], cfg["seed"], per_epoch, first(0.98), first(0.99),
                     summary["train_seconds"], summary["images_per_second"]))
    head = ["norm", "seed"] + [f"test acc, epoch {e + 1}" for e in range(epochs)] + [
        "first epoch >= 98%", "first epoch >= 99%", "train seconds", "images/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for norm, seed, accs, e98, e99, secs, ips in rows:
        cells = [norm, str(seed)] + [f"{100 * a:.2f}%" for a in accs] + [""] * (epochs - len(accs))
        cells += [str(e98 or "-"), str(e99 or "-"), f"{secs:.0f}", f"{ips:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", type=Path, default=Path("runs/experiments"))
    p.add_argument("extra", nargs="*", help="more python -m train options, after --")
    args = p.parse_args(argv)
    folders = [run(norm, seed, args.epochs, args.out, args.extra)
               for seed in args.seeds for norm in ("batch", "none")]
    print(table(folders))
    return 0


if __name__ == "__main__":
    sys.exit(main())
