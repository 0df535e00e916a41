"""Machine description, the cross-process tables, RESULTS.md and the plot."""

from __future__ import annotations

import datetime
import importlib.metadata
import io
import json
import os
import platform
import shlex
import sys
from pathlib import Path

from benchmarks import bn, cnn, procs, timing

PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "torch")


def machine() -> dict:
    import jax
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": _proc_field("/proc/cpuinfo", "model name") or platform.processor() or "unknown",
        "memory": _memory(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in PACKAGES},
        "backend": jax.default_backend(),
        "devices": [f"{d} ({d.device_kind})" for d in jax.devices()],
    }


def _proc_field(path: str, key: str) -> str | None:
    try:
        with open(path) as f:
            for line in f:
                if line.split(":")[0].strip() == key:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _memory() -> str:
    total = _proc_field("/proc/meminfo", "MemTotal")  # "24683656 kB"
    return f"{int(total.split()[0]) / 2**20:.1f} GiB" if total else "unknown"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# --------------------------------------------------------------------------
# tables from the worker processes


def torch_bn_table(jax_run: dict, torch_run: dict) -> str:
    rows = [[f"JAX {name}", jax_run["bn"][name]["seconds"]] for name in jax_run["bn"]]
    rows += [[f"PyTorch {name}", r["seconds"]] for name, r in torch_run["bn"].items()]
    reference = torch_run["bn"]["BatchNorm2d NCHW"]["seconds"]
    return timing.table(["implementation", "median", "time / PyTorch NCHW"],
                        [[n, timing.ms(t), timing.ratio(t, reference)] for n, t in rows])


def cnn_table(jax_run: dict, torch_run: dict | None, train_run: dict | None = None) -> str:
    rows = [(f"JAX {name}", r) for name, r in jax_run["cnn"].items()]
    if train_run:
        rows += [(f"JAX {name}, python -m train's malloc", r)
                 for name, r in train_run["cnn"].items()]
    if torch_run:
        rows += [(f"PyTorch {name}", r) for name, r in torch_run["cnn"].items()]
    flax_speed = jax_run["cnn"][cnn.REFERENCE]["images_per_second"]
    headers = ["step", "median step", "images/s", "first step (compile)",
               f"speed / JAX {cnn.REFERENCE}"]
    if torch_run:
        torch_speed = torch_run["cnn"]["NCHW"]["images_per_second"]
        headers.append("speed / PyTorch NCHW")
    table_rows = []
    for name, r in rows:
        row = [name, timing.ms(r["step"]), f"{r['images_per_second']:.0f}",
               timing.ms(r["first_step"]), f"{r['images_per_second'] / flax_speed:.2f}x"]
        if torch_run:
            row.append(f"{r['images_per_second'] / torch_speed:.2f}x")
        table_rows.append(row)
    return timing.table(headers, table_rows)


def alone_table(runs: dict[str, dict]) -> str:
    """train's step and PyTorch's in each layout, each timed in processes of its own.

    ``runs``: the worker results under the keys ``"JAX"``, ``"NCHW"`` and
    ``"channels_last"``.
    """
    steps = {key: next(iter(run["cnn"].values())) for key, run in runs.items()}
    labels = {"JAX": f"JAX {cnn.TRAIN_VARIANT} (python -m train: its step, its malloc)",
              "NCHW": "PyTorch NCHW", "channels_last": "PyTorch channels_last"}
    rows = []
    for key, r in steps.items():
        speed = r["images_per_second"]
        rows.append([labels[key], timing.ms(r["step"]), f"{speed:.0f}", timing.ms(r["first_step"]),
                     *(f"{speed / steps[t]['images_per_second']:.2f}x" for t in ("NCHW", "channels_last"))])
    return timing.table(["step", "median step", "images/s", "first step (compile)",
                         "speed / PyTorch NCHW", "speed / PyTorch channels_last"], rows)


def layers_table(jax_run: dict, torch_run: dict) -> str:
    """The CNN's convolutions (nnx.Conv, compiled as train's step) vs PyTorch's, per layer."""
    torch_layers = torch_run["layers"]
    rows = []
    for name, r in jax_run["layers"].items():
        torch_times = [torch_layers[f"{name} {layout}"]["seconds"]
                       for layout in ("NCHW", "channels_last")]
        rows.append([name, timing.ms(r["seconds"]), *map(timing.ms, torch_times),
                     timing.ratio(r["seconds"], min(torch_times))])
    return timing.table(["layer (fwd + grads)", "JAX nnx.Conv", "PyTorch NCHW",
                         "PyTorch channels_last", "JAX time / fastest PyTorch"], rows)


def best_table(runs: dict[str, dict]) -> str:
    """Each framework's fastest configuration (any layout, variant or process setting)."""
    rows = []
    for label, task, key in (("BN fwd+bwd", "bn", "seconds"), ("CNN step", "cnn", "step")):
        best = {}
        for name, run in runs.items():
            framework, setting = _framework_and_setting(name)
            for variant, r in run.get(task, {}).items():
                if framework not in best or r[key] < best[framework][0]:
                    best[framework] = (r[key], f"{variant}, {setting}")
        if len(best) == 2:
            (jax_t, jax_how), (torch_t, torch_how) = best["JAX"], best["PyTorch"]
            rows.append([label, f"{timing.ms(jax_t)} ({jax_how})",
                         f"{timing.ms(torch_t)} ({torch_how})", timing.ratio(jax_t, torch_t)])
    return timing.table(["measurement", "fastest JAX", "fastest PyTorch", "JAX / PyTorch"], rows)


def settings_table(runs: dict[str, dict]) -> str:
    """One row per (framework, setting) measurement; ratios to the default setting."""
    default = {"JAX": runs.get("JAX"), "PyTorch": runs.get("PyTorch")}
    rows = []
    for name, run in runs.items():
        framework, setting = _framework_and_setting(name)
        base = default[framework]
        for label, value, faults in _settings_numbers(run):
            ref = next((v for l, v, _ in _settings_numbers(base) if l == label), None) if base else None
            rows.append([framework, setting, label, timing.ms(value),
                         "-" if faults is None else f"{faults:.0f}",
                         timing.ratio(value, ref) if ref else "-"])
    return timing.table(["framework", "setting", "measurement", "median",
                         "page faults / call", "time / default"], rows)


def _framework_and_setting(job: str) -> tuple[str, str]:
    """("JAX", "one arena, no mmap") from the job name "JAX, one arena, no mmap"."""
    framework, setting = (job.split(", ", 1) + ["default"])[:2]
    return framework, setting


def floor_table(runs: dict[str, dict]) -> str:
    """Each JAX process's BN forward+backward times against the memory floor
    it measured itself (the same malloc and cores), one row per config."""
    measured = {name: run["bn_floor"] for name, run in runs.items() if "bn_floor" in run}
    first = next(iter(next(iter(measured.values())).values()))
    names = list(first["times"])
    rows = []
    for name, configs in measured.items():
        setting = _framework_and_setting(name)[1]
        for config, m in configs.items():
            cells = [(m["times"][n]["seconds"], m["times"][n]["faults_per_call"]) for n in names]
            rows.append([setting, config, timing.ms(m["floor"])] + [
                f"{timing.ms(t)} ({t / m['floor']:.2f}x, {faults:.0f} pf)" for t, faults in cells])
    return timing.table(["setting", "config", "memory floor"] + names, rows)


def _settings_numbers(run: dict):
    for name, r in run.get("bn", {}).items():
        yield f"BN fwd+bwd {name}", r["seconds"], r.get("faults_per_call")
    for name, r in run.get("cnn", {}).items():
        yield f"CNN step {name}", r["step"], r.get("faults_per_step")


# --------------------------------------------------------------------------
# RESULTS.md and the plot


PLOT = "bn_times.png"


def write(directory: Path, meta: dict, sections: list[tuple[str, str]], results: dict) -> Path:
    """RESULTS.md, the plot, and results.json (the raw numbers, for later comparisons).

    All of them or none: RESULTS.md says every number comes from one run, so
    a failure midway (a full disk) must not leave this run's beside an
    earlier run's.
    """
    directory.mkdir(parents=True, exist_ok=True)
    png = _plot(results)
    files = {"results.json": json.dumps({"meta": meta, "results": results}, indent=1,
                                        sort_keys=True) + "\n",
             "RESULTS.md": _markdown(meta, sections, PLOT if png else None)}
    if png:
        files[PLOT] = png
    write_all(directory, files)
    if png is None:
        # Without BN numbers there is no plot; an earlier run's would pass for this one's.
        (directory / PLOT).unlink(missing_ok=True)
    return directory / "RESULTS.md"


def write_all(directory: Path, files: dict[str, str | bytes]) -> None:
    """Write every file or none: each to a temporary, renamed into place once all are written."""
    temporaries = {}
    try:
        for name, data in files.items():
            tmp = temporaries[directory / name] = directory / f".{name}.tmp"
            tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        for path, tmp in temporaries.items():
            os.replace(tmp, path)
    finally:
        for tmp in temporaries.values():
            tmp.unlink(missing_ok=True)


def _thp_setting() -> str:
    """The kernel's transparent huge page mode (the bracketed one), or 'unknown'."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    return next((w.strip("[]") for w in text.split() if w.startswith("[")), "unknown")


def _markdown(meta: dict, sections, plot: str | None) -> str:
    m = meta["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    malloc = {k: v for k, v in os.environ.items() if k.startswith(procs.ALLOCATOR_VARIABLES)}
    lines = [
        "# Benchmark results",
        "",
        f"Produced by `{meta['command']}` on {meta['date']}; every ratio below comes from",
        "this one run.",
        "",
        "## Machine and settings",
        "",
        f"- CPU: {m['cpu']}, `nproc` = {m['nproc']}, memory {m['memory']}",
        f"- {m['platform']}, Python {m['python']}",
        f"- {versions}",
        f"- JAX backend: `{m['backend']}` ({', '.join(m['devices'])})",
        f"- sizes: {'quick (tiny)' if meta['quick'] else 'full'}; {meta['repeats']} timed calls "
        f"per alternative ({bn.ROUNDS_PER_REPEAT * meta['repeats']} in the BN tables), after "
        f"{timing.WARMUP_ROUNDS} untimed rounds; {meta['rounds']} rounds of worker processes",
        f"- XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, malloc settings of the parent: "
        f"{malloc or 'none'}; transparent huge pages: {_thp_setting()}",
        "",
        _backend_note(m["backend"]),
        "",
        "## Method",
        "",
        "- Alternatives are timed round-robin in one process, each round in a new",
        "  (seeded) order because a call can be slowed by the one before it, and",
        "  compared by medians; the machine is shared, so absolute times are noisy and",
        "  the ratios are the result.",
        "- PyTorch runs in its own processes (`torch.set_num_threads` = `nproc` on CPU),",
        "  alternating with JAX processes that time the same shapes; each number is the",
        "  median over the rounds of the per-process medians.",
        "- BN forward+backward is `jit(grad)` of `sum(y * g)` with respect to x, scale and",
        "  bias, also returning the new running statistics.",
        "- Memory floor: the array-sized transfers the fewest passes need (fwd+bwd 6: one",
        "  pass reading x for the statistics, which y and so the cotangent g depend on,",
        "  one reading x and g for the backward's per-channel sums, one reading x and g",
        "  and writing dx; training fwd 3; eval 2) divided by the best bandwidth of a",
        "  jitted copy, add or donated (in-place) add of the same size, measured in the",
        "  same process. Allocating copies pay for fresh output pages as the BN programs",
        "  do; the donated add does not, so a BN can sit well above this floor because",
        "  of page faults alone (see the memory floor table, one process per malloc setting).",
        "- Page faults / call (pf in the BN tables): minor faults (`getrusage`) per call.",
        "  XLA:CPU allocates a program's temporaries and outputs afresh on every call;",
        "  4 KiB x faults is the memory malloc got from the kernel anew (e.g. the CNN",
        "  step's 150 MiB of temporaries, the BN's 32 MiB dx). They depend on what the",
        "  process allocated before, so identical programs can differ.",
        "",
    ]
    for title, body in sections:
        lines += [f"## {title}", "", body, ""]
    if plot:
        lines += ["## Plot", "", f"![BN and CNN times]({plot})", ""]
    return "\n".join(lines)


def _backend_note(backend: str) -> str:
    if backend == "cpu":
        return ("**Every number in this run is CPU.** On a GPU machine, "
                "`python -m benchmarks --write-results DIR` measures JAX's default backend (the "
                "GPU, on GPU-sized shapes) and runs PyTorch on CUDA, into a folder of its own "
                "(one holding another device's results is refused); `python -m benchmarks "
                "--gpu` insists on a GPU (an H200's results: `benchmarks/gpu-h200/`). The "
                "malloc section applies to CPU only.")
    return f"Backend `{backend}`: the CPU-only malloc section was skipped."


def _plot(results: dict) -> bytes | None:
    """The PNG of the BN (and CNN step) times; None without BN numbers."""
    if "bn" not in results:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if "cnn" in results.get("cnn_runs", {}).get("JAX", {}) else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4.5), squeeze=False)
    _bn_panel(axes[0][0], results["bn"])
    if panels == 2:
        _cnn_panel(axes[0][1], results["cnn_runs"], cnn.batch_size(results["quick"]))
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    return png.getvalue()


def _bn_panel(ax, bn_results):
    entries = bn_results["configs"]
    names = bn.timed(entries)
    width = 0.8 / (len(names) + 1)
    for i, name in enumerate(names):
        values = [e["modes"]["train fwd+bwd"]["times"][name] * 1e3 for e in entries]
        ax.bar([j + i * width for j in range(len(entries))], values, width, label=name)
    floors = [e["modes"]["train fwd+bwd"]["floor"] * 1e3 for e in entries]
    ax.bar([j + len(names) * width for j in range(len(entries))], floors, width,
           label="memory floor", color="black")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(entries))],
                  [e["config"]["name"] for e in entries])
    ax.set_ylabel("ms (median)")
    ax.set_title("BN training forward+backward")
    ax.legend(fontsize=7)


def _cnn_panel(ax, runs, batch):
    labels, values, colors = [], [], []
    for color, proc in (("C0", "JAX"), ("C3", "PyTorch")):
        for name, r in runs.get(proc, {}).get("cnn", {}).items():
            labels.append(f"{proc}\n{name}")
            values.append(r["images_per_second"])
            colors.append(color)
    ax.bar(range(len(values)), values, color=colors)
    ax.set_xticks(range(len(values)), labels, fontsize=7)
    ax.set_ylabel("images/s (median)")
    ax.set_title(f"CNN train step, batch {batch}, 28x28x1")


def meta(args, quick: bool, repeats: int, rounds: int) -> dict:
    return {
        "command": " ".join(["python -m benchmarks"] + [shlex.quote(a) for a in sys.argv[1:]]),
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "sections": args.only, "quick": quick, "repeats": repeats, "rounds": rounds,
        "machine": machine(),
    }
