"""The built book: every page in the table of contents exists, nothing is loaded from another host."""

from __future__ import annotations

import re
from pathlib import Path

from support.browser import toc_files

ROOT = Path(__file__).resolve().parents[1]


def test_every_toc_entry_has_a_source_and_a_page(built_book):
    for entry in toc_files():
        assert any((ROOT / f"{entry}{suffix}").exists() for suffix in (".md", ".ipynb")), entry
        assert (built_book / f"{entry}.html").exists(), f"{entry}.html was not built"


def test_pages_reference_no_other_host(built_book):
    external = re.compile(r'<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)="(https?:)?//', re.I)
    for page in built_book.rglob("*.html"):
        text = page.read_text(errors="replace")
        match = external.search(text)
        assert match is None, f"{page.relative_to(built_book)} loads {match.group(0)!r}"


def test_plotly_and_mathjax_are_served_locally(built_book):
    # the partial plotly.js bundle, loaded by the figures themselves on pages that have figures only
    assert (built_book / "_static" / "vendor" / "plotly-cartesian.min.js").stat().st_size > 1_000_000
    assert (built_book / "_static" / "vendor" / "mathjax" / "tex-chtml.js").exists()
    page = (built_book / "chapters" / "figures.html").read_text()
    assert "_static/vendor/plotly-cartesian.min.js" in page and "cdn.plot.ly" not in page
    assert "plotly" not in (built_book / "intro.html").read_text().lower()


def test_notebooks_are_committed_without_outputs():
    import json

    for notebook in (ROOT / "chapters").glob("*.ipynb"):
        cells = json.loads(notebook.read_text())["cells"]
        for cell in cells:
            if cell["cell_type"] == "code":
                assert not cell["outputs"] and cell["execution_count"] is None, notebook.name


def test_live_widgets_are_replaced_by_a_note_in_the_built_book(built_book):
    page = (built_book / "chapters" / "figures.html").read_text()
    assert "gc-launch-note" in page and "mybinder.org" in page
    assert "widget-view+json" not in page and "jupyter-widgets" not in page


def test_the_search_index_is_loaded_by_the_search_page_only(built_book):
    # the theme would load the whole book's index on every page for a search-as-you-type box that is off
    assert "searchindex.js" in (built_book / "search.html").read_text()
    assert (built_book / "searchindex.js").exists()
    for entry in toc_files():
        assert "searchindex.js" not in (built_book / f"{entry}.html").read_text(), entry
