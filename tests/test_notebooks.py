"""Every notebook in notebooks/ runs top to bottom in quick mode without error.

Each notebook is copied (with its helper ``_nbutil.py``) to a temporary
folder and executed there by ``notebooks/run.py`` with
``JAXBN_NOTEBOOK_QUICK=1``; the kernel is this interpreter, so the notebooks
see the same jax, flax, jaxbn and train. Notebooks that list datasets in
their metadata (``metadata.jaxbn.datasets``) are skipped when those files
are absent.
"""

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))

pytest.importorskip("nbclient")
pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _data_dir():
    env = os.environ.get("JAXBN_DATA")
    if env:
        return Path(env)
    default = ROOT.parent / "shared" / "data"
    return default if default.is_dir() else None


def _missing_datasets(path):
    needs = json.loads(path.read_text()).get("metadata", {}).get("jaxbn", {}).get("datasets", [])
    root = _data_dir()
    return [d for d in needs
            if root is None or not (root / d / "train-images-idx3-ubyte.gz").is_file()]


def test_there_are_notebooks():
    assert PATHS, f"no notebooks in {NOTEBOOKS}"


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebook_runs_in_quick_mode(path, tmp_path, monkeypatch):
    missing = _missing_datasets(path)
    if missing:
        pytest.skip(f"{path.name} needs {', '.join(missing)}: set JAXBN_DATA to a folder "
                    f"holding {'/, '.join(missing)}/ (see ../shared/data/README.md)")
    if _data_dir() is not None:
        monkeypatch.setenv("JAXBN_DATA", str(_data_dir()))
    run = _load("jaxbn_notebook_runner", NOTEBOOKS / "run.py")
    shutil.copy(NOTEBOOKS / "_nbutil.py", tmp_path / "_nbutil.py")
    target = tmp_path / path.name
    shutil.copy(path, target)
    seconds = run.execute(target, quick=True, timeout=600, cwd=tmp_path)
    print(f"{path.name}: {seconds:.1f} s in quick mode", file=sys.stderr)

    import nbformat
    nb = nbformat.read(target, as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert images, f"{path.name} drew no figure"


def _tiny_notebook(path, sources, stale_output="from an earlier run\n"):
    """A notebook of code cells, each holding an earlier run's stdout."""
    import nbformat
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src, execution_count=i + 1, outputs=[
        nbformat.v4.new_output("stream", name="stdout", text=stale_output)])
        for i, src in enumerate(sources)]
    nbformat.write(nb, path)


def test_a_failing_notebook_keeps_no_outputs_of_an_earlier_run(tmp_path):
    # The partly executed notebook is written: the cells after the failing
    # one must not show the outputs of another run, and the metadata says
    # where it stopped.
    import nbclient
    import nbformat
    run = _load("jaxbn_notebook_runner", NOTEBOOKS / "run.py")
    source, out = tmp_path / "nb.ipynb", tmp_path / "out" / "nb.ipynb"
    _tiny_notebook(source, ["print('one')", "1 / 0", "print('three')"])
    with pytest.raises(nbclient.exceptions.CellExecutionError):
        run.execute(source, out, quick=True, timeout=60)
    cells = nbformat.read(out, as_version=4).cells
    assert cells[0].outputs[0].text == "one\n"
    assert cells[1].outputs[0].output_type == "error"
    assert cells[2].outputs == [] and cells[2].execution_count is None
    executed = nbformat.read(out, as_version=4).metadata.jaxbn.executed
    assert executed["failed"] == "CellExecutionError in cell 1"


def test_a_kernel_that_does_not_start_leaves_the_notebook_alone(tmp_path, monkeypatch):
    import nbformat
    run = _load("jaxbn_notebook_runner", NOTEBOOKS / "run.py")
    source = tmp_path / "nb.ipynb"
    _tiny_notebook(source, ["print('one')"])
    before = source.read_bytes()
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    with pytest.raises(Exception):
        run.execute(source, quick=True, timeout=60)
    assert source.read_bytes() == before  # not marked as executed
    assert nbformat.read(source, as_version=4).cells[0].outputs[0].text == "from an earlier run\n"
