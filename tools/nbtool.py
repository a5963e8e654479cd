"""Write a notebook from a plain Python description, stripped of outputs.

Usage from a script: ``write(path, [md("..."), code("...", tags=["remove-cell"]), ...])``.
Also ``python tools/nbtool.py strip chapters/*.ipynb`` removes outputs in place.
"""

from __future__ import annotations

import sys

import nbformat

INSTALL_CELL = '''# Installs gradclip when this notebook runs on Colab or Binder; a no-op where it is installed.
import importlib.util, subprocess, sys
if importlib.util.find_spec("gradclip") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "gradclip[figures] @ git+https://github.com/gradclip/gradclip-book"], check=True)'''


def md(text: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_markdown_cell(text.strip("\n"))


def code(text: str, tags: list[str] | None = None) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(text.strip("\n"))
    if tags:
        cell.metadata["tags"] = tags
    return cell


def write(path: str, cells: list[nbformat.NotebookNode]) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [code(INSTALL_CELL, tags=["remove-cell"])] + cells
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nbformat.write(nb, path)


def strip(path: str) -> None:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbformat.write(nb, path)


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "strip":
    for notebook in sys.argv[2:]:
        strip(notebook)
