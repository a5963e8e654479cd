"""Sphinx glue for the book's browser assets: plotly.js check, page weight, duplicate scripts.

plotly.js is not added to every page. The book vendors the partial bundle
``_assets/vendor/plotly-cartesian.min.js`` (from the npm registry, see
``_assets/vendor/README.md``) and the figures of :mod:`gradclip_book.figures`
load it themselves, once per page, only on pages that have figures. The build
fails when that bundle's version is not the plotly.js bundled with the
installed plotly, so the figures and the library that draws them agree.

Also:

- ``gradclip.css`` (figures, exercises, phone-width and dark-mode fixes) is
  added to every page;
- the theme's ``fontawesome.js`` (1.5 MB, icons as SVG) is removed from the
  written pages: the theme's stylesheet already draws the same icons with its
  web font, so nothing changes on screen;
- the theme loads ``searchindex.js`` (the whole book's search index, which grows
  with every chapter) on every page, for a search-as-you-type box this book does
  not enable (``search_as_you_type`` is off): it is kept on ``search.html`` only,
  where the search runs;
- Sphinx 7.4 + sphinx-thebe emit the same inline script twice (THEBE_JS_URL
  redeclared): duplicates are dropped;
- the theme's light/dark switch starts from ``default_mode``, which Jupyter Book
  leaves empty: every page logged "Got invalid theme mode" until it is set to
  ``"auto"`` (follow the reader's system), which is what the page did anyway.
"""

from __future__ import annotations

import re
from pathlib import Path

from sphinx.builders.html._assets import _JavaScript
from sphinx.errors import ExtensionError

BUNDLE = Path("_assets") / "vendor" / "plotly-cartesian.min.js"
_VERSION = re.compile(rb"plotly\.js \(cartesian - minified\) v(\d+\.\d+\.\d+)")
_FONTAWESOME_JS = re.compile(r'<script defer src="[^"]*_static/scripts/fontawesome\.js[^"]*"></script>\s*')
_SEARCH_INDEX = re.compile(r'<script src="[^"]*searchindex\.js"></script>\s*')


def _check_plotly_bundle(app) -> None:
    from plotly.offline import get_plotlyjs_version

    bundle = Path(app.srcdir) / BUNDLE
    if not bundle.exists():
        raise ExtensionError(f"{BUNDLE} is missing: see _assets/vendor/README.md")
    match = _VERSION.search(bundle.read_bytes()[:400])
    wanted = get_plotlyjs_version()
    if match is None or match.group(1).decode() != wanted:
        found = match.group(1).decode() if match else "unknown"
        raise ExtensionError(f"{BUNDLE} is plotly.js {found}, but plotly bundles {wanted}: "
                             f"npm pack plotly.js-cartesian-dist-min@{wanted} (see _assets/vendor/README.md)")


def _drop_duplicate_scripts(app, pagename, templatename, context, doctree) -> None:
    """Sphinx 7.4 + sphinx-thebe emit the same inline script twice (THEBE_JS_URL redeclared)."""
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for script in scripts:
        if isinstance(script, _JavaScript):
            key = (str(script.filename or ""), script.attributes.get("body", ""))
        else:  # a plain file name
            key = (str(script), "")
        if key in seen:
            continue
        seen.add(key)
        unique.append(script)
    context["script_files"] = unique


def _lighten_pages(app, exception) -> None:
    """Drop ``fontawesome.js`` from every written page, and ``searchindex.js`` from all but the search page."""
    if exception is not None or app.builder.format != "html":
        return
    for page in Path(app.outdir).rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        lighter = _FONTAWESOME_JS.sub("", text)
        if page.name != "search.html":
            lighter = _SEARCH_INDEX.sub("", lighter)
        if lighter != text:
            page.write_text(lighter, encoding="utf-8")


def _default_mode_auto(app, config) -> None:
    """The theme's mode starts as "auto" unless the book sets one (an empty mode logs a console error).

    pydata-sphinx-theme reads ``default_mode`` from the page context (its layout.html), not from the theme
    options: as a theme option it is ignored, and Sphinx's -W turns "unsupported theme option" into an error.
    """
    context = dict(config.html_context or {})
    context.setdefault("default_mode", "auto")
    config.html_context = context


def setup(app):
    app.connect("config-inited", _default_mode_auto)
    app.connect("builder-inited", _check_plotly_bundle)
    app.connect("html-page-context", _drop_duplicate_scripts)
    app.connect("build-finished", _lighten_pages)
    app.add_css_file("gradclip.css")
    return {"parallel_read_safe": True, "parallel_write_safe": True}
