"""Publishing: the Pages workflow, and the repository URL kept in one place (_config.yml).

The launch links read _config.yml at run time, every notebook's hidden install cell
is generated from it by tools/nbtool.py, and the install cell's target,
``gradclip[book]``, provides exactly what the notebooks import.
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from gradclip_book import figures

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())  # the repository
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.y*ml"))
DEPLOY = ROOT / ".github" / "workflows" / "deploy.yml"
NOTEBOOKS = sorted((ROOT / "chapters").glob("*.ipynb"))
BOOK_PACKAGE = ROOT / "src" / "gradclip_book"
OWN = {"gradclip", "gradclip_book"}  # provided by the gradclip distribution itself


def load_nbtool():
    spec = importlib.util.spec_from_file_location("nbtool", ROOT / "tools" / "nbtool.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


nbtool = load_nbtool()


def config_repository() -> tuple[str, str, str]:
    """(url, branch, owner/name) from _config.yml."""
    repo = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))["repository"]
    url = repo["url"].rstrip("/")
    match = re.fullmatch(r"https://github\.com/([\w.-]+/[\w.-]+?)(?:\.git)?", url)
    assert match, f"_config.yml repository.url is not a GitHub repository: {url}"
    return url, repo["branch"], match.group(1)


# --- the workflow ----------------------------------------------------------------------------


def test_workflows_are_valid_github_workflows():
    assert DEPLOY in WORKFLOWS
    done = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows",
                           *map(str, WORKFLOWS)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_deploy_workflow_builds_with_the_readmes_command_and_publishes_build_html():
    workflow = yaml.safe_load(DEPLOY.read_text(encoding="utf-8"))
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert triggers["push"]["branches"] == ["main"] and "workflow_dispatch" in triggers
    assert workflow["permissions"]["pages"] == "write" and workflow["permissions"]["id-token"] == "write"
    assert workflow["concurrency"]["group"]

    jobs = workflow["jobs"]
    steps = {name: job["steps"] for name, job in jobs.items()}
    build = next(name for name, job_steps in steps.items() if any("make book" in s.get("run", "") for s in job_steps))
    assert "make book" in (ROOT / "README.md").read_text(encoding="utf-8")
    assert re.search(r"^book:", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M)
    assert jobs[build]["runs-on"].startswith("ubuntu")
    setup = [s for s in steps[build] if s.get("uses", "").startswith("actions/setup-python@")]
    assert setup and str(setup[0]["with"]["python-version"]) == "3.11"
    upload = [s for s in steps[build] if s.get("uses", "").startswith("actions/upload-pages-artifact@")]
    assert upload and upload[0]["with"]["path"] == "_build/html"
    order = [s.get("run", s.get("uses", "")) for s in steps[build]]
    assert order.index("make book") < order.index(upload[0]["uses"])

    deploy = [name for name, job_steps in steps.items()
              if any(s.get("uses", "").startswith("actions/deploy-pages@") for s in job_steps)]
    needs = jobs[deploy[0]]["needs"] if len(deploy) == 1 else None
    assert len(deploy) == 1 and build in ([needs] if isinstance(needs, str) else needs or [])
    assert jobs[deploy[0]]["environment"]["name"] == "github-pages"


# --- the repository URL in one place ---------------------------------------------------------


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_install_cell_is_generated_from_config(notebook):
    nb = nbformat.read(notebook, as_version=4)
    first = nb.cells[0]
    assert first.cell_type == "code" and "remove-cell" in first.metadata.get("tags", [])
    assert not first.outputs
    assert first.source == nbtool.install_cell_source(nb.cells[1:]), (
        f"{notebook.name}: run `python tools/nbtool.py install-cells chapters/*.ipynb`")
    url, branch, _ = config_repository()
    assert f'"gradclip[book] @ git+{url}@{branch}"' in first.source


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_install_cell_installs_only_when_a_needed_module_is_missing(notebook, monkeypatch):
    source = nbformat.read(notebook, as_version=4).cells[0].source
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: calls.append(args[0]))
    exec(compile(source, "install-cell", "exec"), {})
    assert calls == [], "installs although everything is importable"

    real = importlib.util.find_spec
    checked = re.search(r"for name in \[(.*?)\]", source).group(1).replace('"', "").split(", ")
    third_party = next(name for name in checked if name not in ("gradclip", "gradclip_book"))
    for missing in ("gradclip", third_party):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, m=missing: None if name == m else real(name, *a))
        exec(compile(source, "install-cell", "exec"), {})
    url, branch, _ = config_repository()
    expected = [sys.executable, "-m", "pip", "install", "-q", f"gradclip[book] @ git+{url}@{branch}"]
    assert calls == [expected, expected]


def test_readme_names_no_other_repository_than_config():
    _, _, slug = config_repository()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    named = {re.sub(r"\.git$", "", m.rstrip(".")) for m in re.findall(r"github\.com[/:]([\w.-]+/[\w.-]+)", readme)}
    assert named <= {slug}, f"README names {named - {slug}}; _config.yml says {slug}"


def test_code_does_not_hard_code_the_repository():
    _, _, slug = config_repository()
    for path in [*sorted((ROOT / "src").rglob("*.py")), *sorted((ROOT / "tools").rglob("*.py"))]:
        assert slug not in path.read_text(encoding="utf-8"), f"{path.relative_to(ROOT)} hard-codes {slug}"


def test_launch_links_come_from_config():
    url, branch, slug = config_repository()
    links = figures.launch_links("chapters/figures.ipynb")
    assert links == {
        "Binder": f"https://mybinder.org/v2/gh/{slug}/{branch}?urlpath=lab/tree/chapters/figures.ipynb",
        "Colab": f"https://colab.research.google.com/github/{slug}/blob/{branch}/chapters/figures.ipynb",
    }


def test_launch_links_follow_the_nearest_config_with_a_repository(tmp_path, monkeypatch):
    (tmp_path / "_config.yml").write_text("repository:\n  url: https://github.com/someone/other-book\n"
                                          "  branch: dev\n  path_to_book: docs\n")
    nested = tmp_path / "docs" / "chapters"
    nested.mkdir(parents=True)
    (tmp_path / "docs" / "_config.yml").write_text("title: no repository here\n")
    monkeypatch.chdir(nested)
    links = figures.launch_links("chapters/a.ipynb")
    assert links["Colab"] == "https://colab.research.google.com/github/someone/other-book/blob/dev/docs/chapters/a.ipynb"
    assert links["Binder"] == "https://mybinder.org/v2/gh/someone/other-book/dev?urlpath=lab/tree/docs/chapters/a.ipynb"


def test_without_a_config_the_launch_note_has_no_links(tmp_path, monkeypatch):
    assert figures.book_repository(tmp_path) is None and figures.launch_links("a.ipynb", start=tmp_path) == {}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(figures, "__file__", str(tmp_path / "site-packages" / "gradclip_book" / "figures.py"))
    assert figures.launch_links("chapters/figures.ipynb") == {}
    note = figures.LaunchNote("chapters/figures.ipynb")._repr_html_()
    assert "<a " not in note and "Open this page live" not in note and "running Python kernel" in note


# --- the install target provides exactly what the notebooks import ------------------------------


def requirement_closure(roots: list[str]) -> set[str]:
    """Canonical names of the installed distributions ``roots`` need, transitively (extras followed)."""
    found: set[str] = set()
    done: set[tuple[str, str]] = set()
    todo = [Requirement(r) for r in roots]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        for extra in sorted(req.extras) or [""]:
            if (name, extra) in done:
                continue
            done.add((name, extra))
            found.add(name)
            try:
                requires = metadata.requires(req.name) or []
            except metadata.PackageNotFoundError:
                pytest.fail(f"{req} (needed by {roots}) is not installed; run pip install -r requirements.txt")
            for spec in requires:
                sub = Requirement(spec)
                if sub.marker is None or sub.marker.evaluate({"extra": extra}):
                    todo.append(sub)
    return found


def imported_modules(sources: list[str]) -> set[str]:
    """Top-level non-stdlib modules imported anywhere in ``sources`` (magics and shell lines dropped)."""
    names: set[str] = set()
    for source in sources:
        lines = "\n".join("" if l.lstrip().startswith(("%", "!")) else l for l in source.splitlines())
        for node in ast.walk(ast.parse(lines)):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names)


def notebook_imports(notebook: Path) -> set[str]:
    nb = nbformat.read(notebook, as_version=4)
    return imported_modules([c.source for c in nb.cells if c.cell_type == "code"])


def book_package_imports() -> set[str]:
    return imported_modules([p.read_text(encoding="utf-8") for p in sorted(BOOK_PACKAGE.rglob("*.py"))])


def distributions_of(module: str) -> set[str]:
    return {canonicalize_name(d) for d in metadata.packages_distributions().get(module, [])}


def book_extra() -> set[str]:
    """Canonical names the ``book`` extra declares (beyond the core requirements)."""
    extra = [Requirement(r) for r in metadata.requires("gradclip") or []]
    return {canonicalize_name(r.name) for r in extra
            if r.marker is not None and r.marker.evaluate({"extra": "book"}) and not r.marker.evaluate({"extra": ""})}


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_install_target_provides_every_module_the_notebook_imports(notebook):
    provided = requirement_closure(["gradclip[book]"])
    modules = notebook_imports(notebook)
    assert "gradclip" in modules or "gradclip_book" in modules
    checked_by_cell = set(re.search(r"for name in \[(.*?)\]", nbformat.read(notebook, as_version=4).cells[0].source)
                          .group(1).replace('"', "").split(", "))
    # The cell checks what the notebook imports, and what gradclip_book imports lazily when it is used.
    assert checked_by_cell == modules | (book_package_imports() if "gradclip_book" in modules else set())
    unprovided = {}
    for module in sorted(checked_by_cell - OWN):
        dists = distributions_of(module)
        if not dists & provided:
            unprovided[module] = sorted(dists) or "no installed distribution"
    assert not unprovided, f"gradclip[book] does not install: {unprovided}"


def test_book_extra_declares_only_what_the_book_imports():
    imported = set()
    # the book's Sphinx extensions (_ext/) are part of the book: book_assets checks the vendored plotly.js
    extensions = imported_modules([p.read_text(encoding="utf-8") for p in sorted((ROOT / "_ext").glob("*.py"))])
    for module in set().union(*map(notebook_imports, NOTEBOOKS), book_package_imports(), extensions) - OWN:
        imported |= distributions_of(module)
    # Nothing beyond imports is declared: ipykernel and jupyter are not in the extra, because every
    # place a chapter runs (Jupyter, Colab, Binder, the book's build) brings its own kernel.
    extra = book_extra()
    assert extra, "no book extra declared"
    assert extra <= imported, f"the book extra declares what nothing imports: {sorted(extra - imported)}"
    assert "gradclip" not in extra
