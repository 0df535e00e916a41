"""Execute notebooks with nbclient, in place or into another file.

    .venv/bin/python notebooks/run.py notebooks/01_bn_from_scratch.ipynb      # full, in place
    .venv/bin/python notebooks/run.py --quick notebooks/*.ipynb --out /tmp/nb  # reduced size

The kernel is the interpreter running this script (a ``python3`` kernelspec
pointing at ``sys.executable`` is written to a temporary ``JUPYTER_PATH``),
so the notebooks see the same jax, flax and jaxbn. The working directory of
the kernel is the notebook's folder, where ``_nbutil.py`` lives.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


@contextlib.contextmanager
def venv_kernel():
    """A ``python3`` kernelspec for ``sys.executable``, first on ``JUPYTER_PATH``."""
    with tempfile.TemporaryDirectory(prefix="jaxbn-kernel-") as tmp:
        spec_dir = Path(tmp) / "kernels" / "python3"
        spec_dir.mkdir(parents=True)
        (spec_dir / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (ipykernel)",
            "language": "python",
        }))
        old = os.environ.get("JUPYTER_PATH")
        os.environ["JUPYTER_PATH"] = tmp + (os.pathsep + old if old else "")
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = old


def kernel_env(quick: bool) -> dict:
    env = dict(os.environ)
    if quick:
        env["JAXBN_NOTEBOOK_QUICK"] = "1"
    else:
        env.pop("JAXBN_NOTEBOOK_QUICK", None)
    # Notebooks run on one host device, whatever a test harness configured.
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    else:
        env.pop("XLA_FLAGS", None)
    # Figures must land in the notebook, whatever backend the caller uses.
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    env["PYTHONHASHSEED"] = "0"
    return env


def execute(path, out=None, *, quick: bool = False, timeout: int = 900,
            cwd=None) -> float:
    """Run every cell of notebook ``path``; write the result to ``out`` (default: in place).

    Raises ``nbclient.exceptions.CellExecutionError`` on the first failing
    cell (the partly executed notebook is still written, without outputs in
    the cells it did not reach; where no cell ran, e.g. the kernel did not
    start, nothing is written). Returns seconds.
    """
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    out = Path(out) if out is not None else path
    nb = nbformat.read(path, as_version=4)
    started: list[int] = []  # the indices of the cells this run reached
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", allow_errors=False, startup_timeout=300,
        resources={"metadata": {"path": str(cwd or path.parent)}},
        on_cell_start=lambda cell, cell_index: started.append(cell_index))
    t0 = time.perf_counter()
    executed = {"mode": "quick" if quick else "full"}
    try:
        with venv_kernel():
            client.execute(env=kernel_env(quick))
    except BaseException as e:
        if not started:
            raise
        # The cells after the failing one keep an earlier run's outputs otherwise.
        for cell in nb.cells[started[-1] + 1:]:
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
        executed["failed"] = f"{type(e).__name__} in cell {started[-1]}"
        raise
    finally:
        seconds = time.perf_counter() - t0
        if started:
            executed["seconds"] = round(seconds, 1)
            nb.metadata.setdefault("jaxbn", {})["executed"] = executed
            nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                         "language": "python"}
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.tmp")
            nbformat.write(nb, tmp)
            os.replace(tmp, out)
    return seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("notebooks", nargs="+")
    p.add_argument("--quick", action="store_true", help="set JAXBN_NOTEBOOK_QUICK=1")
    p.add_argument("--out", help="folder for the executed copies (default: in place)")
    p.add_argument("--timeout", type=int, default=900, help="per cell, seconds")
    args = p.parse_args(argv)
    failed = 0
    for nb in args.notebooks:
        nb = Path(nb)
        out = Path(args.out) / nb.name if args.out else None
        try:
            s = execute(nb, out, quick=args.quick, timeout=args.timeout, cwd=nb.resolve().parent)
            print(f"{nb.name}: ok in {s:.1f} s", flush=True)
        except Exception as e:  # report and go on with the next notebook
            failed += 1
            print(f"{nb.name}: FAILED: {type(e).__name__}: {str(e)[-2000:]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
