"""Every notebook in notebooks/ runs top to bottom (nbclient, kernel python3).

A cell that raises fails the test, with the cell and its traceback in the message; so does a
notebook that takes longer than 300 s. Notebooks are a shipped path, so each must turn on
float64 in its first code cell (DESIGN.md); the library never does it for them.
"""

import asyncio
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, DeadKernelError

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
TIMEOUT_S = 300  # per notebook, all cells together


def execute(nb, path: Path, timeout: float = TIMEOUT_S):
    """Run a notebook in memory, in `path`'s folder; return the error outputs of its cells.

    A failing cell stops the run (nbclient's default) and is reported by `pytest.fail`; the
    whole run is bounded by `timeout` seconds.
    """
    client = NotebookClient(
        nb, kernel_name="python3", timeout=timeout,
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.monotonic()
    try:
        asyncio.run(asyncio.wait_for(client.async_execute(), timeout))
    except CellExecutionError as e:
        pytest.fail(f"{path.name}: a cell failed\n{e}")
    except (asyncio.TimeoutError, DeadKernelError) as e:
        # Cancelling nbclient at the deadline surfaces as a dead kernel.
        if time.monotonic() - start >= 0.99 * timeout:
            pytest.fail(f"{path.name}: did not finish within {timeout:g} s")
        raise e
    # Cells tagged `raises-exception` may fail without stopping nbclient: none should.
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.output_type == "error"]


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    # A notebook is user code with JAX's default rank promotion (NumPy-style broadcasting),
    # not the suite's "raise" (conftest.py), which checks the library itself.
    monkeypatch.delenv("JAX_NUMPY_RANK_PROMOTION", raising=False)
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and "jax_enable_x64" in code[0].source, (
        f"{path.name}: the first code cell must enable float64 "
        "(jax.config.update('jax_enable_x64', True))"
    )
    errors = execute(nb, path)
    assert not errors, [f"{e.ename}: {e.evalue}" for e in errors]


def test_a_failing_cell_fails_the_run(tmp_path):
    """The runner above is not vacuous: a notebook whose last cell raises fails, naming the
    error; a cell tagged `raises-exception` before it does not stop the run but leaves an
    error output (one kernel for both)."""
    tagged = nbformat.v4.new_code_cell("raise ValueError('tagged')")
    tagged.metadata["tags"] = ["raises-exception"]
    nb = nbformat.v4.new_notebook()
    nb.cells = [tagged, nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("1 / x0")]
    with pytest.raises(pytest.fail.Exception, match=r"bad.ipynb: a cell failed[\s\S]*NameError"):
        execute(nb, tmp_path / "bad.ipynb", timeout=60)
    assert [o.ename for o in nb.cells[0].outputs if o.output_type == "error"] == ["ValueError"]
