"""The `gradclip` distribution: what the wheel holds, and that the library needs only torch and numpy.

The wheel is built offline from a copy of the sources (``python -m build --wheel
--no-isolation``), installed with ``--no-deps --no-index`` into a fresh virtual
environment that sees nothing but torch, numpy and their own requirements (linked
from this environment, not downloaded), and the README's usage example runs there.
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())  # the repository
LIBRARY = ROOT / "src" / "gradclip"
BOOK_PACKAGE = ROOT / "src" / "gradclip_book"

# What the book needs and the library must never import (nor pull in through an import).
BOOK_MODULES = ["plotly", "sklearn", "scipy", "ipywidgets", "IPython", "gradclip_book", "myst_nb",
                "matplotlib", "pandas", "yaml"]


def requirement_closure(roots: list[str]) -> dict[str, metadata.Distribution]:
    """The installed distributions that ``roots`` (requirement strings) need, transitively.

    Markers are evaluated for this interpreter, extras are followed; a requirement
    that applies here but is not installed fails the test.
    """
    found: dict[str, metadata.Distribution] = {}
    done: set[tuple[str, str]] = set()
    todo = [Requirement(r) for r in roots]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        extras = sorted(req.extras)
        for extra in extras or [""]:
            if (name, extra) in done:
                continue
            done.add((name, extra))
            try:
                dist = found.setdefault(name, metadata.distribution(req.name))
            except metadata.PackageNotFoundError:  # pragma: no cover - a broken environment
                pytest.fail(f"{req} is required but not installed")
            for spec in dist.requires or []:
                sub = Requirement(spec)
                if sub.marker is None or sub.marker.evaluate({"extra": extra}):
                    todo.append(sub)
    return found


def top_level_entries(dist: metadata.Distribution) -> set[str]:
    """The names a distribution puts directly into site-packages (packages, modules, .dist-info, .libs)."""
    assert dist.files, f"{dist.metadata['Name']} has no RECORD; cannot tell its files"
    entries = {f.parts[0] for f in dist.files if f.parts and f.parts[0] not in ("..", "__pycache__")}
    entries.add(Path(str(dist._path)).name)  # the .dist-info itself
    return entries


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built offline from a clean copy of the sources (no build/ or egg-info left in the repo)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "LICENSE.txt", "setup.cfg", "MANIFEST.in"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    outdir = tmp / "dist"
    done = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(outdir),
                           str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    wheels = list(outdir.glob("gradclip-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_holds_both_packages_and_nothing_else(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    dist_info = [t for t in top if t.endswith(".dist-info")]
    assert len(dist_info) == 1 and top - set(dist_info) == {"gradclip", "gradclip_book"}, sorted(top)
    for package in (LIBRARY, BOOK_PACKAGE):
        for module in package.glob("*.py"):
            assert f"{package.name}/{module.name}" in names
    assert "gradclip/py.typed" in names
    assert not [n for n in names if n.startswith(("tests/", "chapters/")) or n.endswith(".ipynb")]

    meta = zipfile.ZipFile(wheel).read(f"{dist_info[0]}/METADATA").decode()
    requires = [Requirement(line.split(":", 1)[1].strip()) for line in meta.splitlines()
                if line.startswith("Requires-Dist:")]
    core = sorted(canonicalize_name(r.name) for r in requires if r.marker is None)
    assert core == ["numpy", "torch"], core
    # book: what the book imports; bench: the peer packages benchmarks/bench_peers.py measures against
    assert sorted(re.findall(r"^Provides-Extra: (.+)$", meta, re.M)) == ["bench", "book"]


def readme_example() -> str:
    """The README's usage snippet (the first python block under "Using gradclip")."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Using gradclip", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "README: no python block under 'Using gradclip'"
    return blocks[0]


CHECK_SCRIPT = '''
import importlib.util, sys, sysconfig
from pathlib import Path

import torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.randn(32, 8), torch.randn(32, 1)
loss = 100.0 * torch.nn.functional.mse_loss(model(x), y)
before = [p.detach().clone() for p in model.parameters()]

# --- the README's example ---
{example}
# ---

import gradclip
site = Path(sysconfig.get_paths()["purelib"]).resolve()
assert Path(gradclip.__file__).resolve().is_relative_to(site), gradclip.__file__  # the wheel, not src/
assert isinstance(norm, torch.Tensor), type(norm)
assert float(norm) > 1.0, float(norm)  # the example did clip
post = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
assert float(post) <= 1.0 + 1e-6, float(post)
assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters())), "optimizer.step() changed nothing"

book = {book!r}
assert importlib.util.find_spec("gradclip_book") is not None  # shipped in the wheel ...
loaded = sorted(m for m in book if m in sys.modules)
assert not loaded, f"importing gradclip loaded book modules: {{loaded}}"  # ... but not imported
present = sorted(m for m in book if m != "gradclip_book" and importlib.util.find_spec(m) is not None)
assert not present, f"the fresh environment is not minimal: {{present}}"
print("ok", float(norm), float(post))
'''


def test_library_works_in_an_environment_with_only_torch_and_numpy(wheel, tmp_path):
    # torch, numpy and their own runtime requirements, linked from this environment.
    deps = tmp_path / "deps"
    deps.mkdir()
    closure = requirement_closure(["torch", "numpy"])
    assert {"torch", "numpy"} <= set(closure)
    for dist in closure.values():
        site = Path(str(dist.locate_file("")))
        for entry in top_level_entries(dist):
            if (site / entry).exists() and not (deps / entry).exists():
                (deps / entry).symlink_to(site / entry)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV"))}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    purelib = subprocess.run([str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True, env=env).stdout.strip()
    Path(purelib, "_linked_torch_numpy.pth").write_text(f"{deps}\n")

    # pip runs from this environment, acting on the fresh one (which has no pip of its own).
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    done = subprocess.run([*pip, "install", "--no-deps", "--no-index", "-q", str(wheel)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    check = subprocess.run([*pip, "check"], capture_output=True, text=True, env=env, timeout=120)
    assert check.returncode == 0 and "No broken requirements" in check.stdout, check.stdout + check.stderr
    listed = subprocess.run([*pip, "list", "--format=freeze"], capture_output=True, text=True, env=env,
                            timeout=120).stdout
    installed = {canonicalize_name(line.split("==")[0]) for line in listed.split()}
    assert installed == set(closure) | {"gradclip"}, sorted(installed)

    script = tmp_path / "check.py"
    script.write_text(CHECK_SCRIPT.format(example=readme_example(), book=BOOK_MODULES))
    run = subprocess.run([str(python), "-I", str(script)], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stdout[-3000:] + run.stderr[-3000:]


def _imports(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) == "import_module" or getattr(node.func, "id", None) == "__import__")):
            names.add(node.args[0].value.split(".")[0])
    return names


def test_library_sources_import_no_book_dependency():
    offenders = {}
    for path in sorted(LIBRARY.rglob("*.py")):
        with warnings.catch_warnings():  # a bad escape in someone's docstring is not this test's concern
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        bad = _imports(tree) & set(BOOK_MODULES)
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders, f"gradclip must need only torch and numpy; book imports in: {offenders}"


def test_the_import_scan_sees_every_kind_of_import():
    tree = ast.parse(textwrap.dedent("""
        import plotly.express as px
        from sklearn import datasets
        def f():
            import importlib
            importlib.import_module("scipy.stats")
            __import__("yaml")
        from . import clip
    """))
    assert _imports(tree) == {"plotly", "sklearn", "importlib", "scipy", "yaml"}
