"""The house rules of the library's layout, checked by reading the source.

The library's modules import each other without a cycle, every public module
declares ``__all__``, and nothing under ``src/gradclip`` imports a book
dependency (those live in ``src/gradclip_book``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LIBRARY = Path(__file__).resolve().parents[1] / "src" / "gradclip"
MODULES = sorted(path.stem for path in LIBRARY.glob("*.py") if path.stem != "__init__")


def internal_imports(module: str) -> set[str]:
    """The gradclip modules that ``module`` imports, at any depth of its code (lazy imports count)."""
    tree = ast.parse((LIBRARY / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import y
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x, y
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.split(".")[0] == "gradclip":
                parts = node.module.split(".")
                found.update([parts[1]] if len(parts) > 1 else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "gradclip" and len(parts) > 1:
                    found.add(parts[1])
    return {name for name in found if name in MODULES and name != module}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A list of modules forming an import cycle, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_cycle():
    # the checker itself must be able to fail
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_library_modules_import_each_other_without_a_cycle():
    graph = {module: internal_imports(module) for module in MODULES}
    assert graph["clip"], "the import reader found nothing: it is broken"
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_distributed_sits_below_the_global_norm():
    # one pipeline: the reduction uses the ground-floor norms, the global norm uses the reduction
    assert "norms" not in internal_imports("distributed")
    assert "distributed" in internal_imports("norms")


@pytest.mark.parametrize("module", [m for m in MODULES if not m.startswith("_")])
def test_public_modules_declare_all(module):
    tree = ast.parse((LIBRARY / f"{module}.py").read_text())
    names = [target.id for node in tree.body if isinstance(node, ast.Assign)
             for target in node.targets if isinstance(target, ast.Name)]
    assert "__all__" in names, f"gradclip.{module} has no __all__"


BOOK = Path(__file__).resolve().parents[1] / "src" / "gradclip_book"
SHARED_BOOK_MODULES = {"harness", "data", "figures", "exercise", "exercises", "timing", "reproducibility"}


def book_imports(path: Path) -> set[str]:
    """The gradclip_book modules a file of the book package imports (relative or absolute)."""
    found = set()
    package_parts = path.relative_to(BOOK).parts[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package_parts[:len(package_parts) - (node.level - 1)])
                parts = base + (node.module.split(".") if node.module else [])
                found.update([parts[0]] if parts else [alias.name for alias in node.names])
            elif node.module and node.module.split(".")[0] == "gradclip_book":
                parts = node.module.split(".")
                found.update([parts[1]] if len(parts) > 1 else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "gradclip_book" and len(parts) > 1:
                    found.add(parts[1])
    return found


def test_the_shared_harness_imports_no_chapter_module():
    # the book's layout: the harness is shared by every chapter and depends on none of them
    files = sorted((BOOK / "harness").glob("*.py"))
    assert files, "no harness package"
    for path in files:
        outside = book_imports(path) - SHARED_BOOK_MODULES
        assert not outside, f"{path.name} imports chapter modules {sorted(outside)}"
    assert book_imports(BOOK / "safety.py"), "the import reader found nothing: it is broken"
