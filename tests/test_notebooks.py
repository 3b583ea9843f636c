"""Every notebook in notebooks/ runs top to bottom (nbclient, kernel python3).

A cell that raises fails the test. Notebooks are a shipped path, so each must turn on float64
in its first code cell (DESIGN.md); the library never does it for them.
"""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and "jax_enable_x64" in code[0].source, (
        f"{path.name}: the first code cell must enable float64 "
        "(jax.config.update('jax_enable_x64', True))"
    )
    # Executes a copy in memory, in the notebook's folder; raises CellExecutionError on a
    # failing cell, with the cell and its traceback in the message.
    client = NotebookClient(
        nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors, errors
