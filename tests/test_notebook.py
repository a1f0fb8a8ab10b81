"""examples/quickstart.ipynb: committed without outputs, and it runs, offline, on a real kernel that
imports the package under test (``nbclient`` and ``ipykernel``, the ``dev`` extra)."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "examples" / "quickstart.ipynb"


def _read():
    nbformat = pytest.importorskip("nbformat", reason="nbformat is in the dev extra: pip install -e .[dev]")
    return nbformat.read(NOTEBOOK, as_version=4)


def test_the_quickstart_is_committed_without_outputs():
    notebook = _read()
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, "the quickstart has no code"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"cell {cell.id} keeps its outputs"
    assert all(set(cell.metadata) <= {"tags"} for cell in notebook.cells), "cell metadata left from a run"


@pytest.mark.slow
def test_the_quickstart_runs_offline_on_a_real_kernel(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient", reason="nbclient is in the dev extra: pip install -e .[dev]")
    pytest.importorskip("ipykernel", reason="ipykernel is in the dev extra: pip install -e .[dev]")
    nbformat = pytest.importorskip("nbformat")
    notebook = _read()
    # The kernel inherits this environment: the package under test first, and no network.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    notebook.cells.append(nbformat.v4.new_code_cell("import landscape; print(landscape.__file__)"))
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = {cell.id: cell.outputs for cell in notebook.cells if cell.cell_type == "code"}
    errors = [o for cell in outputs.values() for o in cell if o.output_type == "error"]
    assert not errors, errors
    assert outputs[notebook.cells[-1].id][0]["text"].strip() == str(REPO / "landscape" / "__init__.py")
    for figure in ("plot", "compare"):  # shown inline: an image, not the figure's repr
        assert any("image/png" in o.get("data", {}) for o in outputs[figure]), outputs[figure]
    schedule = outputs["schedule"][0]["data"]["text/plain"]
    assert "dropout" in schedule and "0.1" in schedule
    assert list(tmp_path.iterdir()) == []  # the notebook writes into its own temporary folder
