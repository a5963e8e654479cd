"""Write a notebook from a plain Python description, stripped of outputs.

Usage from a script: ``write(path, [md("..."), code("...", tags=["remove-cell"]), ...])``.
Commands:

``python tools/nbtool.py strip chapters/*.ipynb``
    removes outputs in place.
``python tools/nbtool.py install-cells chapters/*.ipynb``
    rewrites cell 0 of each notebook, the hidden install cell, from the book's
    ``_config.yml`` (``repository.url`` and ``branch``) and the notebook's imports.

The install cell installs ``gradclip[book]`` from the book's repository only when
a module the notebook imports is missing (Colab, Binder); elsewhere it is a no-op.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "_config.yml"
BOOK_PACKAGE = ROOT / "src" / "gradclip_book"
TAGS = ["remove-cell"]
_DEFAULT_BRANCH = "master"  # Jupyter Book 1's default when _config.yml names no branch

INSTALL_TEMPLATE = """\
# Installs gradclip with its book extra from the book's repository when a module this
# notebook needs is missing (Colab, Binder); a no-op where they are all installed.
import importlib.util, subprocess, sys
if any(importlib.util.find_spec(name) is None for name in [{modules}]):
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    {target}], check=True)"""


def repository(config: Path = CONFIG) -> tuple[str, str]:
    """``(url, branch)`` from ``repository:`` in the book's _config.yml."""
    settings = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    repo = settings.get("repository") or {}
    url = str(repo.get("url") or "").strip().rstrip("/")
    if not url:
        raise ValueError(f"{config} has no repository.url")
    return url, str(repo.get("branch") or _DEFAULT_BRANCH)


def install_target(config: Path = CONFIG) -> str:
    """The pip requirement the install cell installs: ``gradclip[book] @ git+URL@BRANCH``."""
    url, branch = repository(config)
    return f"gradclip[book] @ git+{url}@{branch}"


def _python_lines(source: str) -> str:
    """A code cell's source without IPython magics and shell escapes, which ast cannot parse."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())


def imported_modules(sources: list[str]) -> list[str]:
    """Top-level modules that ``sources`` import, outside the standard library, sorted."""
    names: set[str] = set()
    for source in sources:
        for node in ast.walk(ast.parse(_python_lines(source))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return sorted(names - set(sys.stdlib_module_names))


def notebook_modules(cells: list[nbformat.NotebookNode]) -> list[str]:
    """What a notebook needs importable: its own imports, plus those of ``gradclip_book`` if it uses it.

    The book package imports plotly, ipywidgets and others lazily, so a notebook
    that imports ``gradclip_book`` needs them although it does not name them.
    """
    modules = set(imported_modules([c.source for c in cells if c.cell_type == "code"]))
    if "gradclip_book" in modules:
        modules.update(imported_modules([f.read_text(encoding="utf-8") for f in sorted(BOOK_PACKAGE.glob("*.py"))]))
    return sorted(modules)


def install_cell_source(cells: list[nbformat.NotebookNode], config: Path = CONFIG) -> str:
    """The install cell for a notebook whose other cells are ``cells``."""
    return INSTALL_TEMPLATE.format(modules=", ".join(json.dumps(m) for m in notebook_modules(cells)),
                                   target=json.dumps(install_target(config)))


def md(text: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_markdown_cell(text.strip("\n"))


def code(text: str, tags: list[str] | None = None) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(text.strip("\n"))
    if tags:
        cell.metadata["tags"] = tags
    return cell


def write(path: str, cells: list[nbformat.NotebookNode]) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [code(install_cell_source(cells), tags=TAGS)] + cells
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nbformat.write(nb, path)


def install_cells(path: str) -> bool:
    """Rewrite cell 0 of ``path`` as its install cell; True when it changed."""
    nb = nbformat.read(path, as_version=4)
    if not nb.cells or "remove-cell" not in nb.cells[0].metadata.get("tags", []):
        raise ValueError(f"{path}: cell 0 is not the hidden install cell (tag remove-cell)")
    source = install_cell_source(nb.cells[1:])
    first = nb.cells[0]
    if first.cell_type == "code" and first.source == source and not first.outputs:
        return False
    replacement = code(source, tags=TAGS)
    replacement.id = first.get("id", replacement.id)
    nb.cells[0] = replacement
    nbformat.write(nb, path)
    return True


def strip(path: str) -> None:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbformat.write(nb, path)


if __name__ == "__main__":
    commands = {"strip": strip, "install-cells": install_cells}
    if len(sys.argv) < 3 or sys.argv[1] not in commands:
        sys.exit(f"usage: python {sys.argv[0]} {{{'|'.join(commands)}}} NOTEBOOK...")
    for notebook in sys.argv[2:]:
        commands[sys.argv[1]](notebook)
