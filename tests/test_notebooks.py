"""Every notebook in notebooks/ (jupytext percent-format .py) runs top to bottom in a fresh kernel;
a cell that raises fails the test with its traceback."""

from pathlib import Path

import jupytext
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))


def test_the_five_notebooks_exist():
    assert [p.stem for p in NOTEBOOKS] == ["01_quickstart", "02_kernels", "03_sharding", "04_serving_economics",
                                           "05_model_hooks"]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path):
    notebook = jupytext.read(path)
    # "python3" is ipykernel's own kernel: this interpreter, no `ipykernel install` needed on a clean clone.
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    images = sum("image/png" in out.get("data", {}) for cell in notebook.cells for out in cell.get("outputs", []))
    assert images >= 1, "each notebook ends in a picture"
