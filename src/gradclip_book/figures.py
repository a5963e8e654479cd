"""Interactive figures that work in a static page: plotly plus a few lines of JavaScript.

The book is read as static HTML, with no Python kernel behind the page, so a
slider cannot run an experiment. An :class:`Explorer` therefore runs the real
experiment for every combination of its parameters ahead of time, embeds the
results in the page, and ships a small controller that, on every slider move,
looks the combination up and redraws with ``Plotly.react``. Every combination
is reachable, nothing is fetched, and a redraw takes milliseconds.

In a live notebook, :meth:`Explorer.live` offers ipywidgets sliders that run
the experiment for values off the grid; in the built book (``GRADCLIP_STATIC=1``
is set by ``make book``) it shows a note with launch links instead of dead widgets.

plotly comes with the book extra: ``pip install "gradclip[book]"``.
"""

from __future__ import annotations

import html
import itertools
import json
import math
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Okabe & Ito (2008): distinguishable under the common colour-vision deficiencies.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]

# The repository and branch live in one place, the book's _config.yml (repository.url, .branch).
CONFIG_FILE = "_config.yml"
_DEFAULT_BRANCH = "master"  # Jupyter Book 1's default when _config.yml names no branch
_GITHUB = re.compile(r"^https?://github\.com/([\w.-]+/[\w.-]+?)(?:\.git)?/?$")

_SIGNIFICANT_DIGITS = 6
_NAME = re.compile(r"^[a-z][a-z0-9-]*$")


def is_static_build() -> bool:
    """True while the book is being built (``make book`` sets ``GRADCLIP_STATIC=1``)."""
    return os.environ.get("GRADCLIP_STATIC", "") == "1"


def book_repository(start: str | Path | None = None) -> dict[str, str] | None:
    """The book's ``repository`` settings (``url``, ``branch``, ``path_to_book``) from its _config.yml.

    The book root is the first directory holding a ``_config.yml`` with a
    ``repository:`` key, walking up from ``start`` (default: the current
    working directory, then this package's location). None when there is none,
    or it names no URL.
    """
    starts = [Path(start)] if start is not None else [Path.cwd(), Path(__file__).resolve().parent]
    for origin in starts:
        for folder in [origin.resolve(), *origin.resolve().parents]:
            config = folder / CONFIG_FILE
            if not config.is_file():
                continue
            import yaml  # the book extra installs PyYAML

            try:
                settings = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
            except (OSError, yaml.YAMLError):
                continue
            repository = settings.get("repository") if isinstance(settings, dict) else None
            if not isinstance(repository, dict):
                continue
            url = str(repository.get("url") or "").strip()
            if not url:
                return None
            return {
                "url": url.rstrip("/"),
                "branch": str(repository.get("branch") or _DEFAULT_BRANCH),
                "path_to_book": str(repository.get("path_to_book") or "").strip("/"),
            }
    return None


def launch_links(notebook: str, start: str | Path | None = None) -> dict[str, str]:
    """Binder and Colab links that open ``notebook`` (a path from the book root) live.

    The repository comes from the book's _config.yml (see :func:`book_repository`);
    with no such file, or a repository not on GitHub, there are no links.
    """
    repository = book_repository(start)
    match = _GITHUB.match(repository["url"]) if repository else None
    if not notebook or match is None:
        return {}
    slug, branch = match.group(1), repository["branch"]
    path = "/".join(part for part in (repository["path_to_book"], notebook.lstrip("/")) if part)
    return {
        "Binder": f"https://mybinder.org/v2/gh/{slug}/{branch}?urlpath=lab/tree/{path}",
        "Colab": f"https://colab.research.google.com/github/{slug}/blob/{branch}/{path}",
    }


def compact(value: Any) -> Any:
    """Round floats to 6 significant digits and map non-finite ones to None (JSON null)."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return float(f"{value:.{_SIGNIFICANT_DIGITS}g}")
    if isinstance(value, Mapping):
        return {str(k): compact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [compact(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and torch tensors
        return compact(value.tolist())
    return value


@dataclass(frozen=True)
class Param:
    """One slider: a name, the values on the grid, and how to show them.

    Args:
        name: the keyword the experiment function receives.
        values: the grid, in slider order. ``None`` may stand for "off".
        label: the slider's visible label.
        default: the value shown first; the middle of the grid if omitted.
        fmt: a format spec for the value readout (``".3g"``), or a callable.
    """

    name: str
    values: Sequence[Any]
    label: str = ""
    default: Any = None
    fmt: str | Callable[[Any], str] = ".3g"

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"Param name must be a Python identifier, got {self.name!r}")
        if len(self.values) < 1:
            raise ValueError(f"Param {self.name!r}: values must not be empty")
        if self.default is not None and self.default not in list(self.values):
            raise ValueError(f"Param {self.name!r}: default {self.default!r} is not one of its values")

    @property
    def default_index(self) -> int:
        if self.default is None:
            return (len(self.values) - 1) // 2
        return list(self.values).index(self.default)

    def show(self, value: Any) -> str:
        if value is None:
            return "off"
        if callable(self.fmt):
            return self.fmt(value)
        return format(value, self.fmt) if isinstance(value, (int, float)) else str(value)

    def describe(self) -> str:
        shown = [self.show(v) for v in self.values]
        span = ", ".join(shown) if len(shown) <= 6 else f"{shown[0]} to {shown[-1]} in {len(shown)} steps"
        return f"{self.label or self.name}: {span} (starts at {self.show(self.values[self.default_index])})"


@dataclass
class Explorer:
    """A plotly figure driven by one slider per parameter, over precomputed results.

    Args:
        name: a stable id (lowercase letters, digits, dashes), unique on its page.
        params: the sliders.
        compute: ``compute(**values) -> frame`` for one combination, where a
            frame is ``{"traces": [{"x": ..., "y": ...}, ...], "note": "..."}``;
            the i-th entry of ``traces`` updates the i-th base trace.
        traces: the base traces (style, name, mode), shared by every frame.
        layout: the plotly layout.
        caption: what the figure shows; the slider ranges and defaults are
            appended from ``params``, so the text cannot drift from the figure.
        frames: precomputed frames keyed by :meth:`key` (from :meth:`load`);
            computed from ``compute`` when omitted.

    Example:
        >>> from gradclip_book.figures import Explorer, Param
        >>> ex = Explorer("demo", [Param("a", [1, 2])],
        ...               compute=lambda a: {"traces": [{"x": [0, 1], "y": [0, a]}]},
        ...               traces=[{"mode": "lines"}])
        >>> ex.frame(a=2)["traces"][0]["y"]
        [0, 2]
    """

    name: str
    params: list[Param]
    compute: Callable[..., dict] | None = None
    traces: list[dict] = field(default_factory=list)
    layout: dict = field(default_factory=dict)
    caption: str = ""
    frames: dict[str, dict] | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"name must match {_NAME.pattern}, got {self.name!r}")
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"params must have distinct names, got {names}")
        if self.frames is None:
            if self.compute is None:
                raise ValueError("give either compute or frames")
            self.frames = {self.key(c): self._run(c) for c in self.combinations()}
        missing = [k for k in map(self.key, self.combinations()) if k not in self.frames]
        if missing:
            raise ValueError(f"frames lacks {len(missing)} combinations, e.g. {missing[0]}")

    # --- the grid ---------------------------------------------------------------------------

    def combinations(self) -> list[dict[str, Any]]:
        grids = [list(p.values) for p in self.params]
        return [dict(zip([p.name for p in self.params], combo)) for combo in itertools.product(*grids)]

    def key(self, values: Mapping[str, Any]) -> str:
        """The frame key of a combination: slider indices joined by ``|``."""
        return "|".join(str(list(p.values).index(values[p.name])) for p in self.params)

    def _run(self, values: dict[str, Any]) -> dict:
        frame = compact(self.compute(**values))
        if not isinstance(frame, dict) or not isinstance(frame.get("traces"), list):
            raise TypeError("compute must return a dict with a list under 'traces'")
        return frame

    def frame(self, **values: Any) -> dict:
        """The embedded frame of one combination."""
        return self.frames[self.key(values)]

    def sample(self, count: int, seed: int = 0) -> list[dict[str, Any]]:
        """``count`` combinations drawn reproducibly, to spot-check a saved grid."""
        combos = self.combinations()
        return random.Random(seed).sample(combos, min(count, len(combos)))

    # --- saving a grid that is too slow to compute at build time ----------------------------

    def save(self, path: str | Path) -> None:
        """Write the frames to a JSON file, with the grid they belong to."""
        grid = {p.name: compact(list(p.values)) for p in self.params}
        Path(path).write_text(json.dumps({"grid": grid, "frames": self.frames}, separators=(",", ":")))

    @classmethod
    def load(cls, path: str | Path, **kwargs: Any) -> Explorer:
        """An Explorer whose frames come from :meth:`save`'s file; the grid must match."""
        stored = json.loads(Path(path).read_text())
        grid = {p.name: compact(list(p.values)) for p in kwargs["params"]}
        if stored["grid"] != grid:
            raise ValueError(f"{path} holds a different grid: {stored['grid']} != {grid}")
        return cls(frames=stored["frames"], **kwargs)

    # --- rendering ---------------------------------------------------------------------------

    def full_caption(self) -> str:
        sliders = "; ".join(p.describe() for p in self.params)
        return f"{self.caption} Sliders: {sliders}.".strip()

    def spec(self) -> dict:
        return {
            "params": [
                {"name": p.name, "label": p.label or p.name, "shown": [p.show(v) for v in p.values],
                 "start": p.default_index}
                for p in self.params
            ],
            "base": self.traces,
            "layout": _layout(self.layout),
            "frames": self.frames,
        }

    def to_html(self) -> str:
        root = f"gc-{self.name}"
        sliders = "".join(_slider_html(root, i, p) for i, p in enumerate(self.params))
        payload = json.dumps(self.spec(), separators=(",", ":")).replace("</", "<\\/")
        return (
            f'<figure class="gc-explorer" id="{root}">'
            f'<div class="gc-plot" id="{root}-plot" style="width:100%;min-height:320px"></div>'
            f'<div class="gc-sliders">{sliders}</div>'
            f'<p class="gc-note" id="{root}-note" aria-live="polite"></p>'
            f"<figcaption>{html.escape(self.full_caption())}</figcaption>"
            f'<script type="application/json" id="{root}-data">{payload}</script>'
            f"<script>{_with_plotly(_CONTROLLER_JS.replace('__ROOT__', root))}</script>"
            "</figure>"
        )

    def _repr_html_(self) -> str:
        return self.to_html()

    def live(self, compute: Callable[..., dict] | None = None, notebook: str = "") -> Any:
        """ipywidgets sliders that re-run ``compute`` live, for values off the grid.

        In the built book there is no kernel, so this returns a note with
        launch links instead of widgets that would not respond.
        """
        compute = compute or self.compute
        if is_static_build() or compute is None:
            return LaunchNote(notebook)
        import ipywidgets as widgets
        from IPython.display import display

        controls = {p.name: _live_widget(p) for p in self.params}
        output = widgets.Output()

        def redraw(**values: Any) -> None:
            for p in self.params:
                if isinstance(controls[p.name], widgets.SelectionSlider):
                    values[p.name] = p.values[values[p.name]]
            frame = compact(compute(**values))
            output.clear_output(wait=True)
            with output:
                display(PlotlyFigure(_merge(self.traces, frame), self.layout, f"{self.name}-live"))

        return widgets.VBox([widgets.interactive(redraw, **controls), output])


def _live_widget(param: Param) -> Any:
    import ipywidgets as widgets

    values = list(param.values)
    numeric = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    start = values[param.default_index]
    if len(numeric) == len(values) and all(v > 0 for v in numeric) and max(numeric) / min(numeric) >= 100:
        return widgets.FloatLogSlider(value=start, base=10, min=math.log10(min(numeric)),
                                      max=math.log10(max(numeric)), description=param.label or param.name)
    if len(numeric) == len(values) and all(isinstance(v, int) for v in numeric):
        return widgets.IntSlider(value=start, min=min(numeric), max=max(numeric), description=param.label or param.name)
    # Options carry grid positions: a selection widget cannot hold None (our "off") as a value.
    return widgets.SelectionSlider(options=[(param.show(v), i) for i, v in enumerate(values)],
                                   index=param.default_index, description=param.label or param.name)


def _merge(base: list[dict], frame: dict) -> list[dict]:
    updates = frame.get("traces", [])
    return [{**trace, **(updates[i] if i < len(updates) else {})} for i, trace in enumerate(base)]


def _layout(layout: dict) -> dict:
    defaults = {
        "autosize": True,
        "margin": {"l": 60, "r": 20, "t": 40, "b": 50},
        "colorway": PALETTE,
        "font": {"size": 13},
        "legend": {"orientation": "h", "x": 0, "y": 1.02, "yanchor": "bottom"},
        "template": {"layout": {"paper_bgcolor": "white", "plot_bgcolor": "white"}},
    }
    return {**defaults, **layout}


def _slider_html(root: str, index: int, param: Param) -> str:
    label = html.escape(param.label or param.name)
    ident = f"{root}-s{index}"
    start = param.default_index
    return (
        f'<label class="gc-slider" for="{ident}" style="display:flex;align-items:center;gap:.5em">'
        f'<span style="flex:0 0 7.5em">{label}</span>'
        f'<input type="range" id="{ident}" data-param="{html.escape(param.name)}" min="0" '
        f'max="{len(param.values) - 1}" step="1" value="{start}" style="flex:1 1 auto;min-width:0" '
        f'aria-valuetext="{html.escape(param.show(param.values[start]))}">'
        f'<output for="{ident}" style="flex:0 0 3.5em">{html.escape(param.show(param.values[start]))}</output>'
        "</label>"
    )


_PLOTLY_CONFIG = {"responsive": True, "displaylogo": False}


def _plotlyjs_url() -> str:
    try:
        from plotly.offline import get_plotlyjs_version

        return f"https://cdn.plot.ly/plotly-{get_plotlyjs_version()}.min.js"
    except ImportError:  # plotly is optional; the page then needs plotly.js some other way
        return "https://cdn.plot.ly/plotly-latest.min.js"


def _with_plotly(body: str) -> str:
    """Run ``body`` once plotly.js is there.

    The book serves plotly.js itself, so nothing is fetched there; a live
    notebook whose front end lacks it (Colab, classic HTML output) loads it.
    """
    return (
        "(function(){var run=function(){" + body + "};"
        "if(window.Plotly){run();}else{var s=document.createElement('script');"
        f"s.src='{_plotlyjs_url()}';s.onload=run;document.head.appendChild(s);}}}})();"
    )


_CONTROLLER_JS = """
var root=document.getElementById('__ROOT__');
var spec=JSON.parse(document.getElementById('__ROOT__-data').textContent);
var plot=document.getElementById('__ROOT__-plot');
var note=document.getElementById('__ROOT__-note');
var inputs=Array.prototype.slice.call(root.querySelectorAll('input[type=range]'));
var config=%s;
function draw(){
  var t0=performance.now();
  var key=inputs.map(function(el){return el.value;}).join('|');
  var frame=spec.frames[key];
  var data=spec.base.map(function(tr,i){return Object.assign({},tr,(frame.traces[i]||{}));});
  Plotly.react(plot,data,spec.layout,config);
  inputs.forEach(function(el,i){var shown=spec.params[i].shown[+el.value];
    el.setAttribute('aria-valuetext',shown);el.nextElementSibling.textContent=shown;});
  note.textContent=frame.note||'';
  root.dataset.key=key;root.dataset.updateMs=(performance.now()-t0).toFixed(2);
}
inputs.forEach(function(el){el.addEventListener('input',draw);});
root.gcDraw=draw;
draw();
""" % json.dumps(_PLOTLY_CONFIG)


class PlotlyFigure:
    """Display a plotly figure so that it renders in the book, JupyterLab, Colab and nbval.

    plotly >= 6 shows figures through a mimetype the book's builder cannot
    render. This object offers two representations: plotly's own JSON
    mimetype, which JupyterLab and VS Code draw natively, and HTML with a
    stable element id, which the book embeds and which draws itself with the
    plotly.js the book serves.

    Args:
        data: a plotly figure, or a list of trace dicts (with ``layout``).
        layout: the layout, when ``data`` is a list of traces.
        name: a stable id for the figure's element.

    Example:
        >>> from gradclip_book.figures import PlotlyFigure
        >>> fig = PlotlyFigure([{"x": [0, 1], "y": [1, 0]}], {"title": {"text": "a line"}}, "a-line")
        >>> 'id="gc-a-line"' in fig._repr_html_()
        True
    """

    def __init__(self, data: Any, layout: dict | None = None, name: str = "figure") -> None:
        if not _NAME.match(name):
            raise ValueError(f"name must match {_NAME.pattern}, got {name!r}")
        if hasattr(data, "to_plotly_json"):
            spec = data.to_plotly_json()
            data, layout = spec["data"], {**spec.get("layout", {}), **(layout or {})}
        self.data = compact(list(data))
        self.layout = _layout(compact(layout or {}))
        self.name = name

    def _repr_html_(self) -> str:
        root = f"gc-{self.name}"
        payload = json.dumps({"data": self.data, "layout": self.layout}, separators=(",", ":")).replace("</", "<\\/")
        body = (f"var s={payload};Plotly.newPlot(document.getElementById('{root}'),s.data,s.layout,"
                f"{json.dumps(_PLOTLY_CONFIG)});")
        return (f'<div class="gc-figure" id="{root}" style="width:100%;min-height:320px"></div>'
                f"<script>{_with_plotly(body)}</script>")

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict:
        bundle = {"text/html": self._repr_html_()}
        if not is_static_build():  # the book's builder cannot render plotly's mimetype and warns on it
            bundle["application/vnd.plotly.v1+json"] = {"data": self.data, "layout": self.layout}
        return bundle


class LaunchNote:
    """What a live widget becomes in the static book: a note and launch links."""

    def __init__(self, notebook: str) -> None:
        self.notebook = notebook

    def _repr_html_(self) -> str:
        links = " ".join(
            f'<a href="{html.escape(url)}" rel="noopener">{name}</a>'
            for name, url in launch_links(self.notebook).items()
        )
        if links:
            links = f" Open this page live: {links}."
        return (
            '<div class="gc-launch-note admonition note"><p>'
            "Live sliders that re-run the experiment for any value need a running Python kernel, "
            f"which this page does not have. The figure above works without one.{links}</p></div>"
        )

    def __repr__(self) -> str:
        return "Live sliders need a running kernel; the precomputed figure works without one."
