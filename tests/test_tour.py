"""The guided tour: docs/tour.py runs from scratch in a fresh kernel, and docs/tour.ipynb is made from it.

The notebook is regenerated with `jupytext --update --to notebook docs/tour.py -o docs/tour.ipynb &&
jupyter execute --inplace docs/tour.ipynb`. Its asserts hold it to the code (the loss it assembles from
smat.py's parts is meta_train_step's, bit for bit), so running it is the test.
"""

from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
SOURCE, NOTEBOOK = ROOT / "docs" / "tour.py", ROOT / "docs" / "tour.ipynb"
PICTURES = 7  # the episode grid, router weights, gates, expected L0, logits, curves, kept fraction
MAX_BYTES = 1_500_000


def cells(notebook: nbformat.NotebookNode) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in notebook.cells]


def pictures(notebook: nbformat.NotebookNode) -> int:
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    return sum("image/png" in output.get("data", {}) for output in outputs)


def test_the_committed_notebook_is_made_from_the_current_source():
    committed = nbformat.read(NOTEBOOK, as_version=4)

    assert cells(committed) == cells(jupytext.read(SOURCE)), (
        "docs/tour.ipynb is stale: regenerate it from docs/tour.py (the command is in its first cell)")


def test_the_committed_notebook_carries_every_output_and_its_pictures_at_a_modest_size():
    committed = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in committed.cells if cell.cell_type == "code"]

    assert all(cell.execution_count for cell in code)  # every cell ran, so the code host renders it whole
    assert [o for cell in code for o in cell.outputs if o.output_type == "error"] == []
    assert pictures(committed) == PICTURES
    assert NOTEBOOK.stat().st_size < MAX_BYTES


def test_the_tour_runs_from_its_source_offline_on_cpu_in_a_fresh_kernel(tmp_path, monkeypatch):
    monkeypatch.setenv("SMAT_CACHE", str(tmp_path / "cache"))  # the benchmark is built here, not in ~
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    notebook = jupytext.read(SOURCE)

    # a cell that raises (an assert of the tour included) raises CellExecutionError here
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(SOURCE.parent)}}).execute()

    assert pictures(notebook) == PICTURES
