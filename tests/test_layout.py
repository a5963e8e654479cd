"""The house rules of the library's layout, checked by reading the source.

The library's modules import each other without a cycle, every public module
declares ``__all__``, and nothing under ``src/gradclip`` imports a book
dependency (those live in ``src/gradclip_book``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

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


# --- one straight pipeline: a call never comes back into a module it is still inside ----------


def nested_reentries(call) -> list[str]:
    """Calls into a gradclip module made while that module is already on the stack below another one.

    ``A -> B -> A``: the pipeline went down into B and B called back up into A. Returns
    ``"caller -> callee"`` for each (empty: the call ran top-down).
    """
    import sys

    def module_of(frame) -> str | None:
        name = frame.f_globals.get("__name__", "")
        return name if name == "gradclip" or name.startswith("gradclip.") else None

    found: list[str] = []

    def profile(frame, event, arg):
        if event != "call" or (callee := module_of(frame)) is None:
            return
        below = []
        outer = frame.f_back
        while outer is not None:
            if (module := module_of(outer)) is not None:
                below.append((module, outer.f_code.co_name))
            outer = outer.f_back
        if below and below[0][0] != callee and any(module == callee for module, _ in below[1:]):
            found.append(f"{below[0][0]}.{below[0][1]} -> {callee}.{frame.f_code.co_name}")

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return found


def test_the_reentry_finder_finds_a_call_back():
    # the checker itself must be able to fail: a rule that calls back into the base class, compiled
    # with the globals of gradclip.zclip so that its frames count as that module's
    import gradclip

    namespace = {"__name__": "gradclip.zclip", "ZClip": gradclip.ZClip}
    exec(compile("def _step(self, groups, norm, wide, count):\n"
                 "    self._on_device(norm.device)\n"
                 "    return ZClip._step(self, groups, norm, wide, count)\n", "<zclip-like>", "exec"), namespace)
    calls_back = type("CallsBack", (gradclip.ZClip,), {"_step": namespace["_step"]})
    weight = torch.nn.Parameter(torch.ones(3))
    weight.grad = torch.ones(3)
    assert nested_reentries(lambda: calls_back()([weight])) == [
        "gradclip.zclip._step -> gradclip.clippers._on_device"]


def pipeline_calls():
    """One call of each public norm, clipping function and clipper, on a small model's fresh gradients."""
    import gradclip

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    params = list(model.parameters())

    def fresh() -> None:
        for p in params:
            p.grad = torch.randn_like(p)

    def clipper_call(clipper, warm_calls: int):
        for _ in range(warm_calls):  # past a warm-up, into the steady rule
            fresh()
            clipper(params)
        return lambda: (fresh(), clipper(params))

    guard_on_loss = gradclip.SpikeGuard(signals=("norm", "loss"))

    def guard_loss_call():
        fresh()
        guard_on_loss.record_loss(torch.tensor(1.0))
        guard_on_loss(params)

    return {
        "clip_grad_norm_": lambda: (fresh(), gradclip.clip_grad_norm_(params, 0.1)),
        "clip_grad_value_": lambda: (fresh(), gradclip.clip_grad_value_(params, 0.1)),
        "get_total_norm": lambda: (fresh(), gradclip.get_total_norm([p.grad for p in params])),
        "ZClip, warming up": clipper_call(gradclip.ZClip(warmup_steps=25), 0),
        "ZClip": clipper_call(gradclip.ZClip(warmup_steps=5), 10),
        "AutoClip": clipper_call(gradclip.AutoClip(), 10),
        "SpikeGuard": clipper_call(gradclip.SpikeGuard(), 30),
        "SpikeGuard on the loss": guard_loss_call,
        "AdaGC": clipper_call(gradclip.AdaGC(), 10),
    }


@pytest.mark.parametrize("name", list(pipeline_calls()))
def test_each_call_runs_top_down_without_calling_back(name):
    call = pipeline_calls()[name]
    assert nested_reentries(call) == []
