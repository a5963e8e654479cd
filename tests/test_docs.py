"""Every public name is documented with a formula, its errors, references and an example, and the examples run."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import gradclip
import gradclip_book

MODULES = sorted(
    name
    for package in (gradclip, gradclip_book)
    for _, name, _ in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
    if not name.split(".")[-1].startswith("_")
)


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name):
    module = importlib.import_module(module_name)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    for test in doctest.DocTestFinder().find(module, module_name):
        runner.run(test)
    assert runner.failures == 0, f"{runner.failures} docstring example(s) of {module_name} failed"


# Result records and the clippers' abstract base: documented, but nothing to show by example.
RECORDS = {"Clipper", "PerSampleClipResult", "UnitSpec"}


def public_callables():
    for name in gradclip.__all__:
        obj = getattr(gradclip, name)
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and name not in RECORDS:
            yield name, obj


@pytest.mark.parametrize("name,obj", list(public_callables()), ids=lambda x: x if isinstance(x, str) else "")
def test_public_names_have_examples_and_type_hints(name, obj):
    doc = inspect.getdoc(obj) or ""
    assert ">>>" in doc, f"gradclip.{name} has no example"
    target = obj.__init__ if inspect.isclass(obj) and "__init__" in vars(obj) else obj
    if inspect.isfunction(target):
        hints = inspect.signature(target).parameters
        missing = [p for p, v in hints.items() if p != "self" and v.annotation is inspect.Parameter.empty
                   and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)]
        assert not missing, f"gradclip.{name}: parameters without type hints: {missing}"


# The functions that transform gradients (in place, so named with a trailing underscore).
FUNCTIONS_WITH_FORMULAS = [name for name, obj in public_callables() if inspect.isfunction(obj) and name.endswith("_")]


@pytest.mark.parametrize("name", FUNCTIONS_WITH_FORMULAS)
def test_public_functions_state_their_formula_and_source(name):
    doc = inspect.getdoc(getattr(gradclip, name)) or ""
    assert ".. math::" in doc or ":math:" in doc, f"gradclip.{name} states no formula"
    assert "arxiv.org" in doc or "torch.nn.utils" in doc or "Playbook" in doc or ":func:`gradclip." in doc, \
        f"gradclip.{name} cites no paper or reference"


# Plain records raise nothing of their own.
RAISE_NOTHING = {"ClipResult", "UnitSpec", "PerSampleClipResult"}
RAISE_NOTHING |= {"AdaGCResult", "UpdateClipResult"}


@pytest.mark.parametrize("name", [name for name, _ in public_callables()] + sorted(RECORDS))
def test_public_names_state_errors_and_references(name):
    doc = inspect.getdoc(getattr(gradclip, name)) or ""
    if name not in RAISE_NOTHING:
        assert "\nRaises:\n" in doc, f"gradclip.{name} has no Raises: section"
    references = doc.split("\nReferences:\n", 1)
    assert len(references) == 2, f"gradclip.{name} has no References: section"
    assert "https://" in references[1].split("\nExample:\n")[0], f"gradclip.{name}: References without a link"


# Public entry points that are not top-level names: the presets of the methods adopted since 2023 and the
# warning a clipper gives under Muon; each states its source with a link, and shows its use.
PRESETS = {"AdaGC.olmo": gradclip.AdaGC.olmo, "SpikeGuard.olmo_core": gradclip.SpikeGuard.olmo_core,
           "clippers.OrthogonalizedUpdateWarning": gradclip.clippers.OrthogonalizedUpdateWarning}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_and_the_muon_warning_state_their_references_and_an_example(name):
    doc = inspect.getdoc(PRESETS[name]) or ""
    references = doc.split("\nReferences:\n", 1)
    assert len(references) == 2, f"gradclip.{name} has no References: section"
    assert "https://github.com/" in references[1].split("\nExample:\n")[0], f"gradclip.{name}: no reference code"
    assert "\nExample:\n" in doc and ">>>" in doc, f"gradclip.{name} has no example"


def test_conventions_are_written_once_in_the_package_docstring():
    doc = gradclip.__doc__
    for topic in ("Non-finite values", "Distributed training", "No host-device synchronisation"):
        assert topic in doc, topic
    # the distributed recipe lives in gradclip.distributed, not repeated in every function
    repeated = [name for name, obj in public_callables() if "DistributedDataParallel" in (inspect.getdoc(obj) or "")]
    assert not repeated, f"the distributed paragraph is repeated in {repeated}"


def test_the_readme_table_of_methods_lists_every_method_and_preset():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    rows = "\n".join(line for line in readme.splitlines() if line.startswith("| ") and "`" in line)
    transforms = [name for name, obj in public_callables() if inspect.isfunction(obj) and name.endswith("_")]
    stateful = [name for name, obj in public_callables() if inspect.isclass(obj)
                and (issubclass(obj, gradclip.Clipper) or obj is gradclip.UpdateClip)]
    presets = ["AdaGC.olmo(", "SpikeGuard.olmo_core()", 'UpdateClip("adafactor"', 'UpdateClip("stable_adamw")',
               'clipping_fn="automatic"', 'clipping="per_layer"', 'method="auto"']
    missing = [name for name in transforms + stateful + presets if name not in rows]
    assert not missing, f"README's table of methods lacks {missing}"
