"""Execute every notebook in ``notebooks/`` and check what it produced.

Each notebook runs top to bottom in a fresh ``python3`` kernel (this interpreter, through a kernel spec
written to a temporary folder, so no ``ipykernel install`` by hand is needed), with the repository root
as working directory and ``LIPSDP_NOTEBOOK_OUT`` pointing at a temporary folder for its figures. A
failing ``assert`` cell (e.g. the ``lower <= bound <= trivial`` sandwich) fails the test. Notebooks added
later are picked up by the glob.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
FIGURE_SUFFIXES = {".png", ".svg", ".pdf"}
#: Figures a notebook must write into ``LIPSDP_NOTEBOOK_OUT``; others must write at least one figure.
EXPECTED_FIGURES = {"01_quickstart.ipynb": ["bounds_per_model.png"],
                    "02_lipschitz_activations.ipynb": ["groupsort2_vs_relu_rewrite.png"],
                    "03_scaling.ipynb": ["benchmark_time_vs_size.png", "scaling_sweep.png"],
                    "04_robustness.ipynb": ["certified_accuracy.png"],
                    "05_local_and_monotone.ipynb": ["local_bound_vs_radius.png"],
                    "06_lipschitz_architectures.ipynb": ["lipschitz_architectures.png"]}
CELL_TIMEOUT = 600  # seconds per cell


def _ids(paths):
    return [p.name for p in paths]


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A ``python3`` kernel spec for this interpreter, and a quiet single-threaded environment."""
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (lipsdp tests)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))  # searched before user and system dirs
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "1")
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("LIPSDP_NOTEBOOK_OUT", str(out))
    return out


def test_notebooks_found():
    assert NOTEBOOKS, f"no notebooks in {REPO / 'notebooks'}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_stripped(path):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, \
                f"{path.name} cell {i} has stored outputs: clear them before committing"


@pytest.mark.slow  # about 1.5 min for all four: CI runs them in its `-m slow` step on every landing
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs(path, kernel_env):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")

    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT,
                                     resources={"metadata": {"path": str(REPO)}})
    client.execute()  # raises CellExecutionError, with the cell's traceback, on any failing cell

    out = kernel_env
    figures = [p for p in out.rglob("*") if p.suffix in FIGURE_SUFFIXES]
    expected = EXPECTED_FIGURES.get(path.name)
    if expected:
        for name in expected:
            assert (out / name).is_file(), f"{path.name} did not write {name} to LIPSDP_NOTEBOOK_OUT"
    else:
        assert figures, f"{path.name} wrote no figure to LIPSDP_NOTEBOOK_OUT"
    for fig in figures:
        assert fig.stat().st_size > 0, f"{fig.name} is empty"
