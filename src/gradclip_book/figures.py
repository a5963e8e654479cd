"""Interactive figures that work in a static page: plotly plus a few lines of JavaScript.

The book is read as static HTML, with no Python kernel behind the page, so a
control cannot run an experiment. An :class:`Explorer` therefore runs the real
experiment for every combination of its parameters ahead of time, embeds the
results in the page, and ships a small controller that, on every change,
looks the combination up and redraws with ``Plotly.react``. Every combination
is reachable, nothing is fetched but the book's own plotly.js, and a redraw
takes milliseconds.

Controls
    A :class:`Param` decides its control: numbers become a slider; strings,
    booleans and ``None`` ("off") make it categorical and it becomes a row of
    buttons (radio inputs styled as a segmented control: Tab to the group,
    arrow keys to choose). ``Param(..., kind="buttons")`` or ``kind="slider"``
    overrides the choice.

Per-state notes and the caption
    ``experiment(**values)`` returns a frame ``{"traces": [...], "note": ...}``;
    ``note`` is a sentence or a list of sentences about *that* state (what
    diverged, by how much) and is shown under the figure, announced to screen
    readers. ``"shown": {"param name": "text"}`` (optional) replaces the text a
    slider shows for its position in that state (a slider of threshold levels
    can show the chosen method's own threshold). The static ``caption`` must say only what holds in every state
    (what is plotted, the axes, the fixed settings); anything that changes
    with the controls belongs in the note.

Numbering and references
    ``figs = Figures(chapter=2)`` numbers the figures of one notebook in
    order: ``figs(Explorer(..., label="fig-cliff"))`` sets its number, shown as
    "Figure 2.3" at the start of the caption, and (in a running notebook)
    glues the text under the label, so prose cites it with
    ``{glue:text}`fig-cliff``` and links to it with ``<a href="#fig-cliff">``.
    ``figs.ref("fig-cliff")`` returns the same text (numbering a label on first
    use, so a reference may come before its figure).

Compared runs
    :data:`RUN_STYLES` (and :func:`run_style`) give the "plain" and "clipped"
    runs, and a "reference" and "other" curve, colours far apart in the
    Okabe–Ito palette *and* different dash patterns, so they stay apart in
    grey print and for colour-blind readers. Default layouts write tick labels
    as powers (10⁻⁶, never SI suffixes such as "100u"), and colour bars sit
    beside their own panel.

Phone, dark mode, page weight
    Side-by-side panels (axes with different ``domain``) are stacked on
    narrow screens: the controller swaps to a stacked layout computed here.
    Figure backgrounds, fonts and grid lines follow the page's light or dark
    theme, and change with it. plotly.js is not on every page: the first
    figure on a page loads the book's vendored partial bundle
    (``_static/vendor/plotly-cartesian.min.js``, see :data:`PLOTLY_TRACE_TYPES`),
    and each figure draws when it scrolls near the viewport.
    ``Explorer(..., share_traces=True)`` stores a trace that recurs in several
    frames (a run that one control does not change) once per page. In a live
    notebook without plotly.js in the page, figures are offered in plotly's
    own mimetype; nothing is ever loaded from a CDN.

Example:
    >>> from gradclip_book.figures import Explorer, Figures, Param, RUN_STYLES
    >>> figs = Figures(chapter=2, glue=False)
    >>> ex = figs(Explorer("demo", [Param("a", [1, 2]), Param("clip", [None, 1.0])],
    ...                    compute=lambda a, clip: {"traces": [{"x": [0, 1], "y": [0, a]}],
    ...                                             "note": ["One sentence.", "Another."]},
    ...                    traces=[{"mode": "lines", **RUN_STYLES["clipped"]}],
    ...                    caption="A line.", label="fig-demo"))
    >>> ex.number, figs.ref("fig-demo"), ex.params[1].control
    ('Figure 2.1', 'Figure 2.1', 'buttons')

In a live notebook, :meth:`Explorer.live` offers ipywidgets that run the
experiment for values off the grid; in the built book (``GRADCLIP_STATIC=1``
is set by ``make book``) it shows a note with launch links instead of dead widgets.

plotly comes with the book extra: ``pip install "gradclip[book]"``.
"""

from __future__ import annotations

import copy
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


# The book's static folder (sphinx html_static_path in _config.yml), copied to _static/ in the build.
STATIC_FOLDER = "_assets"


def book_root(start: str | Path | None = None) -> Path | None:
    """The book's root folder: the first one holding a ``_config.yml`` and the static folder, walking up.

    From ``start`` (default: the current working directory, then this package's location).
    """
    starts = [Path(start)] if start is not None else [Path.cwd(), Path(__file__).resolve().parent]
    for origin in starts:
        for folder in [origin.resolve(), *origin.resolve().parents]:
            if (folder / CONFIG_FILE).is_file() and (folder / STATIC_FOLDER).is_dir():
                return folder
    return None


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


# The trace types in the book's partial plotly.js bundle (plotly.js-cartesian-dist-min).
PLOTLY_TRACE_TYPES = frozenset({
    "scatter", "bar", "box", "heatmap", "histogram", "histogram2d", "histogram2dcontour",
    "contour", "image", "pie", "violin",
})
PLOTLY_BUNDLE = "vendor/plotly-cartesian.min.js"  # under the book's _static/

# Compared runs: colours far apart in the Okabe-Ito palette and different dash patterns.
RUN_STYLES: dict[str, dict] = {
    "plain": {"line": {"color": "#D55E00", "dash": "dash", "width": 2}, "marker": {"color": "#D55E00"}},
    "clipped": {"line": {"color": "#0072B2", "dash": "solid", "width": 3}, "marker": {"color": "#0072B2"}},
    "reference": {"line": {"color": "#009E73", "dash": "dot", "width": 2}, "marker": {"color": "#009E73"}},
    "other": {"line": {"color": "#CC79A7", "dash": "dashdot", "width": 2}, "marker": {"color": "#CC79A7"}},
}


def run_style(kind: str, **trace: Any) -> dict:
    """A trace dict in the style of a compared run (``"plain"``, ``"clipped"``, ...), plus ``trace``.

    Example:
        >>> run_style("plain", name="no clipping")["line"]["dash"]
        'dash'
    """
    return _deep_merge(RUN_STYLES[kind], trace)


def _deep_merge(base: Mapping, extra: Mapping) -> dict:
    merged = copy.deepcopy(dict(base))
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _check_trace_types(traces: Sequence[Mapping]) -> None:
    for trace in traces:
        kind = trace.get("type", "scatter")
        if kind not in PLOTLY_TRACE_TYPES:
            raise ValueError(f"trace type {kind!r} is not in the book's plotly.js bundle "
                             f"({', '.join(sorted(PLOTLY_TRACE_TYPES))})")


@dataclass(frozen=True)
class Param:
    """One control: a name, the values on the grid, and how to show them.

    Args:
        name: the keyword the experiment function receives.
        values: the grid, in order. ``None`` may stand for "off".
        label: the control's visible label.
        default: the value shown first; the middle of the grid if omitted.
        fmt: a format spec for the value readout (``".3g"``), or a callable.
        kind: ``"slider"`` or ``"buttons"``; by default numbers get a slider and
            a grid holding a string, a boolean or ``None`` gets buttons.
    """

    name: str
    values: Sequence[Any]
    label: str = ""
    default: Any = None
    fmt: str | Callable[[Any], str] = ".3g"
    kind: str | None = None

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"Param name must be a Python identifier, got {self.name!r}")
        if len(self.values) < 1:
            raise ValueError(f"Param {self.name!r}: values must not be empty")
        if self.default is not None and self.default not in list(self.values):
            raise ValueError(f"Param {self.name!r}: default {self.default!r} is not one of its values")
        if self.kind not in (None, "slider", "buttons"):
            raise ValueError(f"Param {self.name!r}: kind must be 'slider' or 'buttons', got {self.kind!r}")

    @property
    def control(self) -> str:
        """``"buttons"`` for categorical grids (strings, booleans, None), else ``"slider"``."""
        if self.kind:
            return self.kind
        categorical = any(v is None or isinstance(v, (str, bool)) for v in self.values)
        return "buttons" if categorical else "slider"

    @property
    def default_index(self) -> int:
        if self.default is None:
            if None in list(self.values) and self.control == "buttons":
                pass  # an explicit default=None is indistinguishable from none given: use the middle
            return (len(self.values) - 1) // 2
        return list(self.values).index(self.default)

    def show(self, value: Any) -> str:
        if value is None:
            return "off"
        if isinstance(value, bool):
            return "on" if value else "off"
        if callable(self.fmt):
            return self.fmt(value)
        return format(value, self.fmt) if isinstance(value, (int, float)) else str(value)

    def describe(self) -> str:
        shown = [self.show(v) for v in self.values]
        unit = "choices" if self.control == "buttons" else "positions"
        span = ", ".join(shown) if len(shown) <= 6 else f"{len(shown)} {unit} from {shown[0]} to {shown[-1]}"
        return f"{self.label or self.name}: {span} (starts at {self.show(self.values[self.default_index])})"


class Figures:
    """Numbers the figures of one chapter: "Figure 2.1", "Figure 2.2", ... in order of first use.

    Args:
        chapter: the chapter number.
        glue: also glue each number under its label (``myst_nb.glue``) when
            running in a kernel, so prose can write ``{glue:text}`fig-cliff```.

    Example:
        >>> figs = Figures(chapter=2, glue=False)
        >>> figs.ref("fig-a"), figs.ref("fig-b"), figs.ref("fig-a")
        ('Figure 2.1', 'Figure 2.2', 'Figure 2.1')
    """

    def __init__(self, chapter: int | str, glue: bool = True) -> None:
        self.chapter = chapter
        self.glue = glue
        self.numbers: dict[str, str] = {}

    def ref(self, label: str) -> str:
        """The figure's number as text; numbers ``label`` now if it is new."""
        if not _LABEL.match(label):
            raise ValueError(f"label must match {_LABEL.pattern}, got {label!r}")
        if label not in self.numbers:
            self.numbers[label] = f"Figure {self.chapter}.{len(self.numbers) + 1}"
            if self.glue:
                _glue(label, self.numbers[label])
        return self.numbers[label]

    def __call__(self, figure: Any) -> Any:
        """Number ``figure`` (an :class:`Explorer` or :class:`PlotlyFigure` with a ``label``); returns it."""
        if not getattr(figure, "label", ""):
            raise ValueError("give the figure a label=... to number it")
        figure.number = self.ref(figure.label)
        return figure


def _glue(label: str, text: str) -> None:
    try:
        from IPython import get_ipython
    except ImportError:
        return
    if get_ipython() is None:
        return
    from myst_nb import glue

    glue(label, text, display=False)


_LABEL = re.compile(r"^[a-z][a-z0-9_-]*$")


def _note_text(note: Any) -> str | list[str]:
    if note is None:
        return ""
    if isinstance(note, str):
        return note
    if isinstance(note, (list, tuple)) and all(isinstance(s, str) for s in note):
        return list(note)
    raise TypeError(f"a frame's note must be a string or a list of strings, got {note!r}")


@dataclass
class Explorer:
    """A plotly figure driven by one control per parameter, over precomputed results.

    Args:
        name: a stable id (lowercase letters, digits, dashes), unique on its page.
        params: the controls (sliders for numbers, buttons for categories).
        compute: ``compute(**values) -> frame`` for one combination, where a
            frame is ``{"traces": [{"x": ..., "y": ...}, ...], "note": ...}``;
            the i-th entry of ``traces`` updates the i-th base trace, and
            ``note`` (optional) is a sentence or a list of sentences about this
            state only, shown under the figure.
        traces: the base traces (style, name, mode), shared by every frame.
        layout: the plotly layout.
        caption: what the figure shows *in every state*: what is plotted and
            what is held fixed. Never a statement that only holds for some
            settings (put that in the frame's ``note``). The control ranges
            and starting values are appended from ``params``, so the text
            cannot drift from the figure.
        frames: precomputed frames keyed by :meth:`key` (from :meth:`load`);
            computed from ``compute`` when omitted.
        label: an anchor id (``fig-cliff``) for numbering with :class:`Figures`
            and for links.
        number: the number shown before the caption ("Figure 2.3"); set by
            :class:`Figures`.
        share_traces: store a frame trace that recurs in several frames once in
            the page (``spec()["shared"]``) and let the frames point to it
            (``{"gcShared": i}``); the drawn figure is the same, the page lighter.
        data_file: in the built book, write the frames to a script the book
            serves (``_static/data/<name>.js``) and load it only when the
            figure comes near the viewport, instead of inlining them in the
            page. A script tag loads from disk (``file://``) as well as over
            HTTP, where ``fetch`` would not. Outside the book build the frames
            stay inline.

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
    label: str = ""
    number: str = ""
    share_traces: bool = False
    data_file: bool = False

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"name must match {_NAME.pattern}, got {self.name!r}")
        if self.label and not _LABEL.match(self.label):
            raise ValueError(f"label must match {_LABEL.pattern}, got {self.label!r}")
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"params must have distinct names, got {names}")
        _check_trace_types(self.traces)
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
        """The frame key of a combination: control indices joined by ``|``."""
        return "|".join(str(list(p.values).index(values[p.name])) for p in self.params)

    def _run(self, values: dict[str, Any]) -> dict:
        frame = compact(self.compute(**values))
        if not isinstance(frame, dict) or not isinstance(frame.get("traces"), list):
            raise TypeError("compute must return a dict with a list under 'traces'")
        if "note" in frame:
            frame["note"] = _note_text(frame["note"])
        unknown = set(frame.get("shown", {})) - {p.name for p in self.params}
        if unknown:
            raise ValueError(f"a frame's 'shown' names no control: {sorted(unknown)}; use the params' names")
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
        controls = "; ".join(p.describe() for p in self.params)
        text = f"{self.caption} Controls: {controls}.".strip()
        return f"{self.number}. {text}" if self.number else text

    def spec(self) -> dict:
        layout = _layout(self.layout)
        return {
            "params": [
                {"name": p.name, "label": p.label or p.name, "shown": [p.show(v) for v in p.values],
                 "start": p.default_index, "control": p.control}
                for p in self.params
            ],
            "base": _place_colorbars(self.traces, layout),
            "layout": layout,
            "stacked": _stacked(layout, self.traces),
            **(_shared_frames(self.frames) if self.share_traces else {"frames": self.frames}),
        }

    def to_html(self) -> str:
        root = f"gc-{self.name}"
        controls = "".join(_control_html(root, i, p) for i, p in enumerate(self.params))
        payload = json.dumps(self.spec(), separators=(",", ":")).replace("</", "<\\/")
        data_element = f'<script type="application/json" id="{root}-data">{payload}</script>'
        source = self._write_data_file(root, payload) if self.data_file and is_static_build() else None
        if source is not None:
            data_element = f'<script type="application/json" id="{root}-data" data-src="{source}"></script>'
        return (
            f'<figure class="gc-explorer gc-box" id="{root}">'
            + (f'<span class="gc-anchor" id="{self.label}"></span>' if self.label else "")
            + f'<div class="gc-plot" id="{root}-plot" style="width:100%;min-height:320px"></div>'
            f'<div class="gc-controls">{controls}</div>'
            f'<p class="gc-note" id="{root}-note" aria-live="polite"></p>'
            f"<figcaption>{_caption_html(self.number, self.full_caption(), self.number)}</figcaption>"
            + data_element
            + f"<script>{_boot('gcFig.explorer(' + json.dumps(root) + ')')}</script>"
            "</figure>"
        )

    def _write_data_file(self, root: str, payload: str) -> str | None:
        """Write the frames under the book's static folder; the path the page loads them from, or None."""
        book = book_root()
        if book is None:
            return None
        folder = book / STATIC_FOLDER / "data"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{self.name}.js").write_text(
            f"(window.gcData=window.gcData||{{}})[{json.dumps(root)}]={payload};\n", encoding="utf-8")
        return f"data/{self.name}.js"

    def _repr_html_(self) -> str:
        return self.to_html()

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict:
        bundle = {"text/html": self.to_html()}
        if not is_static_build():  # a front end without plotly.js in the page draws the starting state
            start = {p.name: p.values[p.default_index] for p in self.params}
            spec = self.spec()
            bundle["application/vnd.plotly.v1+json"] = {
                "data": _merge(spec["base"], self.frame(**start)), "layout": spec["layout"]}
        return bundle

    def live(self, compute: Callable[..., dict] | None = None, notebook: str = "", manual: bool = False) -> Any:
        """ipywidgets controls that re-run ``compute`` live, for values off the grid.

        With ``manual=True`` the controls get a "Train" button and ``compute`` runs only when it is
        pressed (never when the cell runs): for experiments that take seconds, where re-running on
        every move of a slider would queue up trainings.

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
                if isinstance(controls[p.name], (widgets.SelectionSlider, widgets.ToggleButtons)):
                    values[p.name] = p.values[values[p.name]]
            frame = compact(compute(**values))
            output.clear_output(wait=True)
            with output:
                display(PlotlyFigure(_merge(self.traces, frame), self.layout, f"{self.name}-live"))

        options = {"manual": True, "manual_name": "Train"} if manual else {}
        return widgets.VBox([widgets.interactive(redraw, options, **controls), output])


def _shared_frames(frames: Mapping[str, dict]) -> dict:
    """``{"frames": ..., "shared": [...]}``: each trace found in two or more frames is stored once."""
    text = {key: [json.dumps(t, sort_keys=True, separators=(",", ":")) for t in frame["traces"]]
            for key, frame in frames.items()}
    counts: dict[str, int] = {}
    for traces in text.values():
        for t in traces:
            counts[t] = counts.get(t, 0) + 1
    shared: dict[str, int] = {}
    out = {}
    for key, frame in frames.items():
        traces = []
        for trace, t in zip(frame["traces"], text[key]):
            if counts[t] > 1 and len(t) > 24:
                traces.append({"gcShared": shared.setdefault(t, len(shared))})
            else:
                traces.append(trace)
        out[key] = {**frame, "traces": traces}
    return {"frames": out, "shared": [json.loads(t) for t in shared]}


def _caption_html(number: str, text: str, strip: str) -> str:
    if number and text.startswith(f"{number}. "):
        text = text[len(number) + 2:]
        return f'<span class="gc-number">{html.escape(number)}.</span> {html.escape(text)}'
    return html.escape(text)


def _live_widget(param: Param) -> Any:
    import ipywidgets as widgets

    values = list(param.values)
    label = param.label or param.name
    if param.control == "buttons":
        return widgets.ToggleButtons(options=[(param.show(v), i) for i, v in enumerate(values)],
                                     value=param.default_index, description=label)
    numeric = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    start = values[param.default_index]
    if len(numeric) == len(values) and all(v > 0 for v in numeric) and max(numeric) / min(numeric) >= 100:
        return widgets.FloatLogSlider(value=start, base=10, min=math.log10(min(numeric)),
                                      max=math.log10(max(numeric)), description=label)
    if len(numeric) == len(values) and all(isinstance(v, int) for v in numeric):
        return widgets.IntSlider(value=start, min=min(numeric), max=max(numeric), description=label)
    # Options carry grid positions: a selection widget cannot hold None (our "off") as a value.
    return widgets.SelectionSlider(options=[(param.show(v), i) for i, v in enumerate(values)],
                                   index=param.default_index, description=label)


def _merge(base: list[dict], frame: dict) -> list[dict]:
    updates = frame.get("traces", [])
    return [{**trace, **(updates[i] if i < len(updates) else {})} for i, trace in enumerate(base)]


_AXIS = {"exponentformat": "power", "showexponent": "all", "automargin": True,
         "gridcolor": "#e4e4e4", "zerolinecolor": "#bdbdbd", "linecolor": "#6b6b6b"}
_COLORBAR = {"exponentformat": "power", "thickness": 12, "outlinewidth": 0}


def _layout(layout: dict) -> dict:
    defaults = {
        "autosize": True,
        "margin": {"l": 60, "r": 20, "t": 40, "b": 50},
        "colorway": PALETTE,
        "font": {"size": 13},
        "legend": {"orientation": "h", "x": 0, "y": 1.02, "yanchor": "bottom"},
        "template": {
            "layout": {"paper_bgcolor": "white", "plot_bgcolor": "white", "xaxis": _AXIS, "yaxis": _AXIS},
            "data": {kind: [{"colorbar": _COLORBAR}] for kind in ("heatmap", "contour", "histogram2d")},
        },
    }
    return _label_log_ticks(_deep_merge(defaults, layout))


LOG_TICK_FORMAT = "~g"
"""Tick labels on log axes: plotly labels the minor ticks of a log axis (its ``D1``/``D2`` ticks) with their leading
digit alone ("5" for 50 or 0.05), unreadable on a phone where the decade labels are far apart; any tickformat makes
it write every tick in full (50, 0.05, 2e-05)."""


def _label_log_ticks(layout: dict) -> dict:
    """Every log axis without a tickformat of its own gets :data:`LOG_TICK_FORMAT`."""
    for key in _axis_keys(layout, "x") + _axis_keys(layout, "y"):
        axis = layout[key]
        if isinstance(axis, Mapping) and axis.get("type") == "log" and "tickformat" not in axis:
            layout[key] = {**axis, "tickformat": LOG_TICK_FORMAT}
    return layout


def _axis_keys(layout: Mapping, letter: str) -> list[str]:
    return sorted(k for k in layout if re.fullmatch(f"{letter}axis\\d*", k))


def _columns(layout: Mapping) -> dict[str, tuple[float, float]]:
    """Each x axis's domain, for layouts with panels side by side (two or more distinct domains)."""
    domains = {k: tuple(layout[k].get("domain", (0, 1))) for k in _axis_keys(layout, "x")
               if isinstance(layout[k], Mapping)}
    return domains if len(set(domains.values())) > 1 else {}


def _axis_of(trace: Mapping, letter: str) -> str:
    ref = str(trace.get(f"{letter}axis", letter))
    return f"{letter}axis{ref[1:]}"


def _has_colorbar(trace: Mapping) -> bool:
    kind = trace.get("type", "scatter")
    if kind in ("heatmap", "contour", "histogram2d", "histogram2dcontour"):
        return trace.get("showscale", True) is not False
    return bool(trace.get("marker", {}).get("showscale")) if isinstance(trace.get("marker"), Mapping) else False


def _place_colorbars(traces: list[dict], layout: Mapping) -> list[dict]:
    """Side-by-side panels: a colour bar with no explicit place goes just right of its own panel."""
    columns = _columns(layout)
    placed = []
    for trace in traces:
        domain = columns.get(_axis_of(trace, "x"))
        colorbar = trace.get("colorbar", {})
        if domain and _has_colorbar(trace) and "x" not in colorbar and domain[1] < 1:
            trace = _deep_merge(trace, {"colorbar": {"x": domain[1] + 0.01, "xanchor": "left", "thickness": 10}})
        placed.append(trace)
    return placed


def _stacked(layout: Mapping, traces: list[dict]) -> dict | None:
    """For a phone: the same panels one above the other, with colour bars beside their own panel.

    Returns ``{"layout": ..., "colorbars": {trace index: colorbar}}``, or None
    when the panels are not side by side.
    """
    columns = _columns(layout)
    if not columns:
        return None
    order = sorted(set(columns.values()))
    rows = len(order)
    gap = 0.14 / rows * 2
    stacked = copy.deepcopy(dict(layout))
    stacked["height"] = max(int(layout.get("height", 450)), 340 * rows)
    stacked["margin"] = {**layout.get("margin", {}), "l": 55, "r": 20}
    bands = {}
    for index, domain in enumerate(order):
        top = 1 - index / rows
        bottom = 1 - (index + 1) / rows + (gap if index < rows - 1 else 0)
        bands[domain] = (bottom, top - (gap / 3 if index else 0))
    for key, domain in columns.items():
        bottom, top = bands[domain]
        stacked[key] = {**stacked[key], "domain": [0, 1]}
        anchor = str(layout[key].get("anchor", "y" + key[5:]))
        ykey = f"yaxis{anchor[1:]}"
        yaxis = dict(stacked.get(ykey, {}))
        lo, hi = yaxis.get("domain", (0, 1))
        span = top - bottom
        yaxis["domain"] = [round(bottom + lo * span, 4), round(bottom + hi * span, 4)]
        stacked[ykey] = yaxis
    colorbars = {}
    for index, trace in enumerate(traces):
        domain = columns.get(_axis_of(trace, "x"))
        if domain and _has_colorbar(trace):
            bottom, top = bands[domain]
            colorbars[str(index)] = {**trace.get("colorbar", {}), "x": 1.0, "xanchor": "left",
                                     "y": (bottom + top) / 2, "yanchor": "middle", "len": (top - bottom) * 0.95,
                                     "thickness": 10}
    if colorbars:
        stacked["margin"]["r"] = 70
    return {"layout": stacked, "colorbars": colorbars}


def _control_html(root: str, index: int, param: Param) -> str:
    label = html.escape(param.label or param.name)
    ident = f"{root}-s{index}"
    start = param.default_index
    name = html.escape(param.name)
    if param.control == "buttons":
        options = "".join(
            f'<label class="gc-option"><input type="radio" name="{ident}" id="{ident}-{j}" value="{j}"'
            f'{" checked" if j == start else ""}><span>{html.escape(param.show(v))}</span></label>'
            for j, v in enumerate(param.values)
        )
        return (f'<fieldset class="gc-choice" id="{ident}" data-index="{index}" data-param="{name}" '
                f'role="radiogroup" aria-label="{label}"><legend>{label}</legend>'
                f'<div class="gc-options">{options}</div></fieldset>')
    shown = html.escape(param.show(param.values[start]))
    return (
        f'<label class="gc-slider" for="{ident}">'
        f'<span class="gc-label">{label}</span>'
        f'<input type="range" id="{ident}" data-index="{index}" data-param="{name}" min="0" '
        f'max="{len(param.values) - 1}" step="1" value="{start}" aria-valuetext="{shown}">'
        f'<output for="{ident}">{shown}</output>'
        "</label>"
    )


# No mode bar: on a phone it covers the legend, and the figures' controls are the sliders and buttons
# (dragging still zooms, a double click resets).
_PLOTLY_CONFIG = {"responsive": True, "displaylogo": False, "displayModeBar": False}


def _boot(call: str) -> str:
    """The shared controller (defined once per page) and then ``call``."""
    return "(function(){" + _RUNTIME_JS + call + ";})();"


# The page-side runtime, shared by every figure on a page (defined by the first one).
_RUNTIME_JS = r"""
if(!window.gcFig){(function(){
var G=window.gcFig={waiting:[],loading:false,figures:[]};
var CONFIG=__CONFIG__;
G.asset=function(path){
  var root=document.documentElement.getAttribute('data-content_root');
  if(root===null&&window.DOCUMENTATION_OPTIONS&&DOCUMENTATION_OPTIONS.URL_ROOT!=null){root=DOCUMENTATION_OPTIONS.URL_ROOT;}
  return root===null?null:root+path;
};
G.bundle=function(){return G.asset('_static/__BUNDLE__');};
G.script=function(url,done,fail){
  if(!url){fail();return;}
  var s=document.createElement('script');s.src=url;s.async=true;s.onload=done;s.onerror=fail;
  document.head.appendChild(s);
};
G.withPlotly=function(done,fail){
  if(window.Plotly){done();return;}
  var url=G.bundle();
  if(!url){fail();return;}
  G.waiting.push(done);
  if(G.loading){return;}
  G.loading=true;
  var s=document.createElement('script');s.src=url;s.async=true;
  s.onload=function(){var w=G.waiting;G.waiting=[];w.forEach(function(f){f();});};
  document.head.appendChild(s);
};
G.whenNear=function(el,run){
  if(!('IntersectionObserver' in window)){run();return;}
  var io=new IntersectionObserver(function(entries){
    if(entries.some(function(e){return e.isIntersecting;})){io.disconnect();run();}
  },{rootMargin:'400px 0px'});
  io.observe(el);
};
G.colours=function(el){
  var fg=getComputedStyle(el).color,bg='',node=el;
  while(node&&node.nodeType===1){var c=getComputedStyle(node).backgroundColor;
    if(c&&c!=='transparent'&&!/rgba\(.*,\s*0\)$/.test(c)){bg=c;break;}node=node.parentElement;}
  var dark=document.documentElement.getAttribute('data-theme')==='dark';
  return {fg:fg||(dark?'#ced6dd':'#222'),bg:bg||(dark?'#14181e':'#ffffff'),dark:dark};
};
G.themed=function(layout,el){
  var L=JSON.parse(JSON.stringify(layout)),c=G.colours(el);
  var grid=c.dark?'rgba(255,255,255,0.14)':'rgba(0,0,0,0.10)',line=c.dark?'rgba(255,255,255,0.45)':'rgba(0,0,0,0.5)';
  L.paper_bgcolor=c.bg;L.plot_bgcolor=c.bg;L.font=Object.assign({},L.font||{},{color:c.fg});
  var T=L.template=L.template||{};T.layout=T.layout||{};
  ['xaxis','yaxis'].forEach(function(a){T.layout[a]=Object.assign({},T.layout[a]||{},{gridcolor:grid,zerolinecolor:line,linecolor:line});});
  T.layout.paper_bgcolor=c.bg;T.layout.plot_bgcolor=c.bg;
  if(L.legend){L.legend=Object.assign({},L.legend,{bgcolor:'rgba(0,0,0,0)'});}
  return L;
};
G.narrow=function(el){return el.clientWidth>0&&el.clientWidth<560;};
// Tick labels that would lie on each other. Log axes: plotly picks all nine digits per decade (D1), 1-2-5
// (D2) or whole decades from a tick count that ignores how wide our full labels (~g: 50, 0.05) are, so at
// 390 px, or on a narrow subplot, labels overlap: after each draw, coarsen an automatic log axis until its
// closest two labels are a gap apart. Numeric ticks given as a list (a grid's learning rates): label every
// k-th one, the smallest k whose labels do not touch (category names are never dropped).
G.LOG_GAP={D1:Math.log10(10/9),D2:Math.log10(2)};
G.NUMBER=/^[-+\u2212]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?%?$/i;
G.fitTicks=function(plot){
  var L=plot._fullLayout,update={};if(!L){return;}
  var touch=function(a,b){return a.left<b.right+3&&b.left<a.right+3&&a.top<b.bottom+1&&b.top<a.bottom+1;};
  Object.keys(L).forEach(function(k){
    var a=L[k],own=(plot.layout||{})[k]||{};
    if(!/^[xy]axis\d*$/.test(k)||!a||!a._length){return;}
    var texts=Array.prototype.slice.call(plot.querySelectorAll('.'+a._id+'tick text')).filter(function(t){return t.textContent.trim();});
    if(texts.length<2){return;}
    if(a.tickmode==='array'){
      var vals=own.tickvals,labels=own.ticktext;
      if(!Array.isArray(vals)||!Array.isArray(labels)||labels.length!==vals.length||
         !labels.every(function(t){return G.NUMBER.test(String(t).trim());})){return;}
      var boxes=texts.map(function(t){return t.getBoundingClientRect();}),step=1;
      var clash=function(s){for(var j=0;j+s<boxes.length;j++){if(touch(boxes[j],boxes[j+s])){return true;}}return false;};
      while(step<boxes.length&&clash(step)){step++;}
      if(step>1){update[k+'.ticktext']=labels.map(function(t,i){return i%step===0?t:'';});}
      return;
    }
    if(a.type!=='log'||own.dtick!=null){return;}
    var decades=Math.abs(a.range[1]-a.range[0]);if(!(decades>=1)){return;}
    var across=a._id.charAt(0)==='x',size=0;
    texts.forEach(function(t){var b=t.getBBox();size=Math.max(size,across?b.width:b.height);});
    var perDecade=a._length/decades,need=size+(across?10:4),dt=a.dtick;
    var gap=G.LOG_GAP[dt]!=null?G.LOG_GAP[dt]:+dt;
    if(gap*perDecade>=need){return;}
    update[k+'.dtick']=(dt==='D1'&&G.LOG_GAP.D2*perDecade>=need)?'D2':Math.max(1,Math.ceil(need/perDecade));
  });
  if(Object.keys(update).length){return Plotly.relayout(plot,update);}
};
G.fail=function(note){if(note){note.textContent='This figure needs plotly.js, which this page does not load: run the notebook in Jupyter, or read it in the book.';}};
G.redrawAll=function(){G.figures.forEach(function(f){if(f.drawn){f.draw();}});};
G.watch=function(){
  if(G.watching){return;}G.watching=true;
  new MutationObserver(G.redrawAll).observe(document.documentElement,{attributes:true,attributeFilter:['data-theme']});
  var t=null;window.addEventListener('resize',function(){clearTimeout(t);t=setTimeout(function(){
    G.figures.forEach(function(f){if(f.drawn&&f.narrow!==G.narrow(f.plot)){f.draw();}});},150);});
};
G.explorer=function(id){
  var el=document.getElementById(id+'-data'),src=el.getAttribute('data-src');
  window.gcData=window.gcData||{};
  if(!src){window.gcData[id]=JSON.parse(el.textContent);G.explorerWith(id);return;}
  G.whenNear(document.getElementById(id),function(){
    G.script(G.asset('_static/'+src),function(){G.explorerWith(id);},function(){G.fail(document.getElementById(id+'-note'));});
  });
};
G.explorerWith=function(id){
  var root=document.getElementById(id),spec=window.gcData[id];
  var plot=document.getElementById(id+'-plot'),note=document.getElementById(id+'-note');
  var controls=spec.params.map(function(p,i){return root.querySelector('.gc-controls [data-index="'+i+'"]');});
  function position(i){var el=controls[i];if(el.tagName==='INPUT'){return +el.value;}
    var c=el.querySelector('input:checked');return c?+c.value:spec.params[i].start;}
  var fig={plot:plot,drawn:false};
  fig.draw=function(){
    var t0=performance.now(),idx=spec.params.map(function(p,i){return position(i);}),key=idx.join('|');
    var frame=spec.frames[key],narrow=G.narrow(plot),stack=narrow&&spec.stacked;
    var data=spec.base.map(function(tr,i){var ft=frame.traces[i]||{};
      if(ft.gcShared!=null){ft=spec.shared[ft.gcShared];}var d=Object.assign({},tr,ft);
      if(stack&&spec.stacked.colorbars[i]){d.colorbar=spec.stacked.colorbars[i];}return d;});
    Plotly.react(plot,data,G.themed(stack?spec.stacked.layout:spec.layout,root),CONFIG).then(function(){G.fitTicks(plot);});
    var own=frame.shown||{};
    controls.forEach(function(el,i){if(el.tagName==='INPUT'){var p=spec.params[i],shown=own[p.name]!=null?own[p.name]:p.shown[idx[i]];
      el.setAttribute('aria-valuetext',shown);el.nextElementSibling.textContent=shown;}});
    var n=frame.note||'';note.textContent=Array.isArray(n)?n.join(' '):n;
    fig.drawn=true;fig.narrow=narrow;
    root.dataset.key=key;root.dataset.updateMs=(performance.now()-t0).toFixed(2);
  };
  controls.forEach(function(el){el.addEventListener(el.tagName==='INPUT'?'input':'change',function(){if(window.Plotly){fig.draw();}});});
  root.gcDraw=fig.draw;G.figures.push(fig);G.watch();
  G.withPlotly(function(){G.whenNear(root,fig.draw);},function(){G.fail(note);});
};
G.figure=function(id){
  var root=document.getElementById(id),spec=JSON.parse(document.getElementById(id+'-data').textContent);
  var plot=root.querySelector('.gc-figure')||root,fig={plot:plot,drawn:false};
  fig.draw=function(){var narrow=G.narrow(plot),stack=narrow&&spec.stacked;
    var data=spec.data.map(function(tr,i){return stack&&spec.stacked.colorbars[i]?Object.assign({},tr,{colorbar:spec.stacked.colorbars[i]}):tr;});
    Plotly.react(plot,data,G.themed(stack?spec.stacked.layout:spec.layout,root),CONFIG).then(function(){G.fitTicks(plot);});fig.drawn=true;fig.narrow=narrow;};
  G.figures.push(fig);G.watch();
  G.withPlotly(function(){G.whenNear(root,fig.draw);},function(){G.fail(root.querySelector('.gc-note'));});
};
})();}
""".replace("__CONFIG__", json.dumps(_PLOTLY_CONFIG)).replace("__BUNDLE__", PLOTLY_BUNDLE)


# --- words shared by the chapters' prose, captions and tables -------------------------------------------------


def and_list(items: Sequence[str], word: str = "and") -> str:
    """Items as prose lists them: one alone, two joined by ``word``, more with commas and ``word`` before the last.

    Example:
        >>> and_list(["a"]), and_list(["a", "b"]), and_list(["a", "b", "c"], word="or")
        ('a', 'a and b', 'a, b or c')
    """
    items = list(items)
    return ", ".join(items[:-1]) + f" {word} " + items[-1] if len(items) > 1 else "".join(items)


def seed_range(seeds: Sequence[int]) -> str:
    """Consecutive seeds as first-last (one seed alone as itself).

    Raises:
        ValueError: the seeds are not consecutive and increasing: a range would name seeds that did not run (list
            them with :func:`and_list` instead).

    Example:
        >>> seed_range((5, 6, 7, 8, 9)), seed_range([0])
        ('5-9', '0')
    """
    seeds = list(seeds)
    if not seeds or seeds != list(range(seeds[0], seeds[0] + len(seeds))):
        raise ValueError(f"seeds {seeds} are not consecutive: a range would name seeds that did not run")
    return f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"


def pm(score: Any, digits: int = 3, html: bool = False) -> str:
    """A :class:`~gradclip_book.harness.Score`'s mean ± standard deviation (``&plusmn;`` with ``html``), or
    ``"diverged"`` where it has no mean.

    Example:
        >>> from gradclip_book.harness import score
        >>> pm(score("a", [1.0, 1.2]), 2), pm(score("a", [1.0, 1.2]), 1, html=True), pm(score("a", [None]))
        ('1.10 ± 0.14', '1.1 &plusmn; 0.1', 'diverged')
    """
    if score.mean is None:
        return "diverged"
    return f"{score.mean:.{digits}f} {'&plusmn;' if html else '±'} {score.std:.{digits}f}"


def soft_breaks(text: str) -> str:
    """``text`` escaped for HTML, its long names (``gradclip.suggest_threshold``) breakable after ``.``, ``_``,
    ``(`` and ``/`` between two word characters; a token (between spaces) shorter than 16 characters is left whole.

    For the columns of a table with fixed shares (``table_html(widths=...)``): without these, a name wider than
    its column breaks between two letters.

    Example:
        >>> soft_breaks("use gradclip.clip_grad_norm_ here, not clip_value_")
        'use gradclip.<wbr>clip_<wbr>grad_<wbr>norm_ here, not clip_value_'
    """
    def word(token: str) -> str:
        escaped = html.escape(token)
        if len(token) < 16:
            return escaped
        return re.sub(r"(?<=\w)([._(/])(?=\w)", r"\1<wbr>", escaped)
    return " ".join(word(token) for token in text.split(" "))


def table_html(head: Sequence[str], rows: Sequence[Sequence[str]], caption: str = "",
               widths: Sequence[int] | None = None, small: bool = False) -> str:
    """An HTML table that reads on a phone: below 560 px each row becomes a card of labelled lines.

    ``head`` and the cells are HTML (escape text yourself); each cell carries its column's name
    (``data-label``), which the book's stylesheet shows before it on narrow screens, so no
    column is ever hidden behind a sideways scroll. ``widths`` (percentages, one per column)
    fixes the columns' shares on wider screens, for tables of long text that would otherwise
    grow wider than the page column. ``small`` sets the table in a 0.9em font (for many columns).

    Example:
        >>> table_html(["a", "b"], [["1", "<code>x</code>"]])[:46]
        '<table class="table gc-table gc-cards"><thead>'
    """
    # the label is the header's text: tags dropped, entities read (&amp;, a soft hyphen &shy; is dropped too)
    labels = [html.escape(html.unescape(re.sub("<[^>]+>", "", h)).replace("\u00ad", ""), quote=True) for h in head]
    body = "".join("<tr>" + "".join(f'<td data-label="{label}">{cell}</td>' for label, cell in zip(labels, row))
                   + "</tr>" for row in rows)
    cap = f"<caption>{caption}</caption>" if caption else ""
    cols, kind = "", "gc-cards"
    if widths is not None:
        if len(widths) != len(head):
            raise ValueError(f"widths needs one percentage per column ({len(head)}), got {len(widths)}")
        cols, kind = "<colgroup>" + "".join(f'<col style="width:{w}%">' for w in widths) + "</colgroup>", "gc-cards gc-text"
    table = (f'<table class="table gc-table {kind}">{cap}{cols}<thead><tr>' + "".join(f"<th>{h}</th>" for h in head)
             + f"</tr></thead><tbody>{body}</tbody></table>")
    return f'<div style="font-size:0.9em">{table}</div>' if small else table


class PlotlyFigure:
    """Display a plotly figure so that it renders in the book, JupyterLab, Colab and nbval.

    plotly >= 6 shows figures through a mimetype the book's builder cannot
    render. This object offers two representations: plotly's own JSON
    mimetype, which JupyterLab and VS Code draw natively, and HTML with a
    stable element id, which the book embeds and which draws itself (when it
    scrolls into view) with the plotly.js the book serves.

    Args:
        data: a plotly figure, or a list of trace dicts (with ``layout``).
        layout: the layout, when ``data`` is a list of traces.
        name: a stable id for the figure's element.
        caption: an optional caption (what the figure shows).
        label: an anchor id for numbering with :class:`Figures`.

    Example:
        >>> from gradclip_book.figures import PlotlyFigure
        >>> fig = PlotlyFigure([{"x": [0, 1], "y": [1, 0]}], {"title": {"text": "a line"}}, "a-line")
        >>> 'id="gc-a-line"' in fig._repr_html_()
        True
    """

    def __init__(self, data: Any, layout: dict | None = None, name: str = "figure",
                 caption: str = "", label: str = "") -> None:
        if not _NAME.match(name):
            raise ValueError(f"name must match {_NAME.pattern}, got {name!r}")
        if label and not _LABEL.match(label):
            raise ValueError(f"label must match {_LABEL.pattern}, got {label!r}")
        if hasattr(data, "to_plotly_json"):
            spec = data.to_plotly_json()
            data, layout = spec["data"], {**spec.get("layout", {}), **(layout or {})}
        self.data = compact(list(data))
        _check_trace_types(self.data)
        self.layout = _layout(compact(layout or {}))
        self.name = name
        self.caption = caption
        self.label = label
        self.number = ""

    def _repr_html_(self) -> str:
        root = f"gc-{self.name}"
        payload = json.dumps({"data": _place_colorbars(self.data, self.layout), "layout": self.layout,
                              "stacked": _stacked(self.layout, self.data)},
                             separators=(",", ":")).replace("</", "<\\/")
        text = f"{self.number}. {self.caption}" if self.number else self.caption
        caption = f"<figcaption>{_caption_html(self.number, text, self.number)}</figcaption>" if text else ""
        anchor = f'<span class="gc-anchor" id="{self.label}"></span>' if self.label else ""
        return (f'<figure class="gc-box gc-static" id="{root}-box">{anchor}'
                f'<div class="gc-figure" id="{root}" style="width:100%;min-height:320px"></div>'
                f'<p class="gc-note"></p>{caption}'
                f'<script type="application/json" id="{root}-box-data">{payload}</script>'
                f"<script>{_boot('gcFig.figure(' + json.dumps(root + '-box') + ')')}</script></figure>")

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
