"""The Python side of the interactive figures: embedded data is what the experiment returns."""

from __future__ import annotations

import json
import math
import re

import pytest

from gradclip_book import quartic_descent
from gradclip_book.figures import Explorer, LaunchNote, Param, PlotlyFigure, compact


def quartic_frame(x0, lr, max_norm):
    run = quartic_descent(x0, lr, max_norm=max_norm, steps=30)
    return {"traces": [{"x": list(range(len(run.losses))), "y": run.losses}], "note": str(run.diverged_at)}


PARAMS = [
    Param("x0", [1.0, 4.0], label="start"),
    Param("lr", [0.01, 0.1], label="learning rate"),
    Param("max_norm", [None, 1.0], label="threshold", default=None),
]


def make_explorer(**overrides):
    kwargs = dict(name="test-explorer", params=PARAMS, compute=quartic_frame, traces=[{"mode": "lines"}])
    return Explorer(**{**kwargs, **overrides})


def embedded_spec(explorer):
    match = re.search(r'<script type="application/json" id="gc-test-explorer-data">(.*?)</script>',
                      explorer.to_html(), re.S)
    return json.loads(match.group(1).replace("<\\/", "</"))


def test_embedded_frames_equal_the_experiment_for_every_combination():
    explorer = make_explorer()
    spec = embedded_spec(explorer)
    assert len(spec["frames"]) == 8
    for combination in explorer.combinations():
        run = quartic_descent(combination["x0"], combination["lr"], max_norm=combination["max_norm"], steps=30)
        embedded = spec["frames"][explorer.key(combination)]
        assert embedded["note"] == str(run.diverged_at)
        ys = embedded["traces"][0]["y"]
        assert len(ys) == len(run.losses)
        assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(ys, run.losses))


def test_caption_and_slider_defaults_come_from_the_params():
    explorer = make_explorer(caption="Quartic descent.")
    spec = embedded_spec(explorer)
    assert [p["start"] for p in spec["params"]] == [0, 0, 0]
    assert spec["params"][2]["shown"] == ["off", "1"]
    caption = explorer.full_caption()
    assert caption.startswith("Quartic descent.") and "threshold: off, 1 (starts at off)" in caption
    page = explorer.to_html()
    assert 'aria-valuetext="off"' in page and 'max="1"' in page


def test_saved_grid_round_trips_and_a_sample_re_runs_to_the_same_values(tmp_path):
    path = tmp_path / "grid.json"
    make_explorer().save(path)
    loaded = Explorer.load(path, name="test-explorer", params=PARAMS, compute=quartic_frame, traces=[{}])
    for combination in loaded.sample(3, seed=1):
        assert loaded.frame(**combination) == compact(quartic_frame(**combination))
    other_grid = [Param("x0", [1.0, 2.0]), PARAMS[1], PARAMS[2]]
    with pytest.raises(ValueError, match="different grid"):
        Explorer.load(path, name="test-explorer", params=other_grid, traces=[{}])


def test_compact_maps_non_finite_to_null_and_rounds():
    assert compact([1.23456789, float("inf"), float("nan"), 2]) == [1.23457, None, None, 2]


def test_bad_declarations_are_refused():
    with pytest.raises(ValueError, match="default"):
        Param("x", [1, 2], default=3)
    with pytest.raises(ValueError, match="identifier"):
        Param("not a name", [1])
    with pytest.raises(ValueError, match="name"):
        make_explorer(name="Bad Name")
    with pytest.raises(ValueError, match="distinct"):
        make_explorer(params=[PARAMS[0], PARAMS[0]])
    with pytest.raises(TypeError, match="traces"):
        make_explorer(compute=lambda **kw: {"y": [1]})


def test_static_build_shows_a_launch_note_instead_of_widgets(monkeypatch):
    monkeypatch.setenv("GRADCLIP_STATIC", "1")
    note = make_explorer().live(notebook="chapters/figures.ipynb")
    assert isinstance(note, LaunchNote)
    assert "mybinder.org" in note._repr_html_() and "colab.research.google.com" in note._repr_html_()


def test_live_notebook_gets_real_widgets(monkeypatch):
    monkeypatch.delenv("GRADCLIP_STATIC", raising=False)
    import ipywidgets

    box = make_explorer().live()
    assert isinstance(box, ipywidgets.VBox)
    controls = box.children[0].children
    assert [c.description for c in controls[:3]] == ["start", "learning rate", "threshold"]


def test_plotly_figure_offers_plotly_json_live_and_only_html_in_the_book(monkeypatch):
    import plotly.graph_objects as go

    figure = PlotlyFigure(go.Figure(go.Scatter(x=[0, 1], y=[2, 3])), name="tiny")
    monkeypatch.delenv("GRADCLIP_STATIC", raising=False)
    bundle = figure._repr_mimebundle_()
    assert set(bundle) == {"text/html", "application/vnd.plotly.v1+json"}
    assert bundle["application/vnd.plotly.v1+json"]["data"][0]["y"] == [2, 3]
    monkeypatch.setenv("GRADCLIP_STATIC", "1")
    assert set(figure._repr_mimebundle_()) == {"text/html"}
    assert 'id="gc-tiny"' in figure._repr_html_()
