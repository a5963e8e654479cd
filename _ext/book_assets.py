"""Sphinx glue for the book: copy plotly.js from the installed plotly, drop duplicate scripts.

plotly.js is taken from the plotly package at build time so that the figures
the notebooks produce and the library that draws them are always the same
version; nothing is fetched from a CDN.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sphinx.builders.html._assets import _JavaScript


def _copy_plotly_js(app) -> None:
    import plotly

    source = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    target = Path(app.srcdir) / "_assets" / "vendor" / "plotly.min.js"
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists() or target.stat().st_size != source.stat().st_size:
        shutil.copyfile(source, target)


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


def setup(app):
    app.connect("builder-inited", _copy_plotly_js)
    app.connect("html-page-context", _drop_duplicate_scripts)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
