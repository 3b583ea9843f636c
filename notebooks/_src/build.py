"""Build notebooks/NN_name.ipynb from notebooks/_src/NN_name.py (percent format) and execute it.

Usage: python notebooks/_src/build.py 01_quickstart [02_mirror_geometry ...] [--no-exec]

Building 01_quickstart also writes its first figure to docs/quickstart.png (the README's figure);
the notebook itself writes no files, so executing it in the test suite leaves the tree alone.

Cells start at lines `# %%` (code) or `# %% [markdown]` (Markdown, each line prefixed `# `).
The notebook is executed in place with nbclient so that it is committed with its outputs.
"""

import base64
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
NB_DIR = HERE.parent


def parse(text: str):
    cells, kind, lines = [], None, []

    def flush():
        if kind is None:
            return
        body = "\n".join(lines).strip("\n")
        if kind == "markdown":
            body = "\n".join(l[2:] if l.startswith("# ") else l.lstrip("#") for l in body.splitlines())
            cells.append(nbformat.v4.new_markdown_cell(body))
        elif body.strip():
            cells.append(nbformat.v4.new_code_cell(body))

    for line in text.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind is not None:
            lines.append(line)
    flush()
    return cells


def build(name: str, execute: bool = True) -> float:
    nb = nbformat.v4.new_notebook()
    nb.cells = parse((HERE / f"{name}.py").read_text())
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    start = time.perf_counter()
    if execute:
        NotebookClient(nb, kernel_name="python3", timeout=600,
                       resources={"metadata": {"path": str(NB_DIR)}}).execute()
    elapsed = time.perf_counter() - start
    nbformat.write(nb, NB_DIR / f"{name}.ipynb")
    if execute and name in README_FIGURE:
        export_figure(nb, NB_DIR.parent / README_FIGURE[name])
    return elapsed


README_FIGURE = {"01_quickstart": "docs/quickstart.png"}


def export_figure(nb, path: Path, index: int = 0) -> None:
    """Write the `index`-th PNG output of an executed notebook to `path`."""
    pngs = [o["data"]["image/png"] for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    path.write_bytes(base64.b64decode(pngs[index]))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    for name in args:
        print(f"{name}: {build(name, execute='--no-exec' not in sys.argv):.1f} s", flush=True)
