"""The Python side of the interactive figures: embedded data is what the experiment returns."""

from __future__ import annotations

import json
import math
import re

import pytest

from gradclip_book import quartic_descent
from gradclip_book.exercise import Exercise, markdown_html
from gradclip_book.figures import (
    PLOTLY_TRACE_TYPES, RUN_STYLES, Explorer, Figures, LaunchNote, Param, PlotlyFigure, and_list, compact, pm,
    run_style, seed_range, soft_breaks, table_html,
)


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
    # numbers get sliders; a grid with None ("off") gets buttons, with the default checked
    assert [p["control"] for p in spec["params"]] == ["slider", "slider", "buttons"]
    assert 'id="gc-test-explorer-s0"' in page and 'type="range"' in page and 'max="1"' in page
    assert 'role="radiogroup"' in page and 'id="gc-test-explorer-s2-0" value="0" checked' in page


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


def test_live_controls_with_a_train_button_run_only_when_pressed(monkeypatch):
    monkeypatch.delenv("GRADCLIP_STATIC", raising=False)
    calls = []

    def compute(**values):
        calls.append(values)
        return {"traces": [{"x": [0, 1], "y": [1, 2]}]}

    explorer = make_explorer()
    box = explorer.live(compute, manual=True)
    assert calls == []                                   # building the controls trains nothing
    interactive = box.children[0]
    interactive.manual_button.click()
    assert len(calls) == 1 and interactive.manual_button.description == "Train"
    explorer.live(compute)                               # without it, the first state runs at once
    assert len(calls) == 2


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


def test_param_picks_buttons_for_categories_and_sliders_for_numbers():
    assert Param("lr", [0.1, 1.0]).control == "slider"
    assert Param("act", ["relu", "tanh"]).control == "buttons"
    assert Param("clip", [None, 1.0]).control == "buttons"
    assert Param("on", [False, True]).control == "buttons"
    assert Param("depth", [1, 2, 3], kind="buttons").control == "buttons"
    with pytest.raises(ValueError, match="kind"):
        Param("x", [1], kind="dial")


def test_a_note_may_be_a_list_of_sentences_and_nothing_else():
    explorer = make_explorer(compute=lambda **v: {"traces": [{"y": [1]}], "note": ["One.", "Two."]})
    assert explorer.frame(x0=1.0, lr=0.01, max_norm=None)["note"] == ["One.", "Two."]
    with pytest.raises(TypeError, match="note"):
        make_explorer(compute=lambda **v: {"traces": [{"y": [1]}], "note": 3})


def test_figures_are_numbered_per_chapter_and_shown_in_the_caption():
    figs = Figures(chapter=2, glue=False)
    assert figs.ref("fig-later") == "Figure 2.1"  # a reference may come first
    explorer = figs(make_explorer(caption="Quartic descent.", label="fig-quartic"))
    assert explorer.number == "Figure 2.2" and figs.ref("fig-quartic") == "Figure 2.2"
    assert explorer.full_caption().startswith("Figure 2.2. Quartic descent.")
    page = explorer.to_html()
    assert '<span class="gc-number">Figure 2.2.</span> Quartic descent.' in page and 'id="fig-quartic"' in page
    figure = figs(PlotlyFigure([{"y": [1]}], name="tiny", caption="A point.", label="fig-tiny"))
    assert "Figure 2.3." in figure._repr_html_()
    with pytest.raises(ValueError, match="label"):
        figs(make_explorer())


def test_compared_runs_differ_in_colour_and_dash_and_ticks_never_use_si_suffixes():
    colours = [style["line"]["color"] for style in RUN_STYLES.values()]
    dashes = [style["line"]["dash"] for style in RUN_STYLES.values()]
    assert len(set(colours)) == len(colours) and len(set(dashes)) == len(dashes)
    assert run_style("plain", name="a")["line"]["dash"] != run_style("clipped")["line"]["dash"]
    layout = make_explorer(layout={"xaxis": {"type": "log"}, "yaxis2": {"type": "log", "tickformat": ".0e"}}).spec()["layout"]
    # the author's axis settings are kept, and a log axis labels every tick in full (not "5" for 50) ...
    assert layout["xaxis"] == {"type": "log", "tickformat": "~g"} and layout["yaxis2"]["tickformat"] == ".0e"
    assert "tickformat" not in PlotlyFigure([{"y": [1]}], layout={"yaxis": {"type": "linear"}}).layout["yaxis"]
    for axis in ("xaxis", "yaxis"):  # ... and every axis gets power tick labels from the template
        assert layout["template"]["layout"][axis]["exponentformat"] == "power"


def test_side_by_side_panels_stack_on_a_phone_with_colour_bars_beside_their_panel():
    layout = {"xaxis": {"domain": [0, 0.45]}, "xaxis2": {"domain": [0.6, 1], "anchor": "y2"},
              "yaxis2": {"anchor": "x2"}}
    traces = [{"type": "heatmap", "z": [[1, 2]]}, {"xaxis": "x2", "yaxis": "y2", "mode": "lines"}]
    spec = make_explorer(traces=traces, layout=layout,
                         compute=lambda **v: {"traces": [{}, {"y": [1]}]}).spec()
    # desktop: the heat map's colour bar sits in the gap right of its own panel, not on the next one
    assert 0.45 < spec["base"][0]["colorbar"]["x"] < 0.6
    stacked = spec["stacked"]["layout"]
    assert stacked["xaxis"]["domain"] == [0, 1] and stacked["xaxis2"]["domain"] == [0, 1]
    top, bottom = stacked["yaxis"]["domain"], stacked["yaxis2"]["domain"]
    assert bottom[1] < top[0], (top, bottom)  # first panel above the second, not overlapping
    bar = spec["stacked"]["colorbars"]["0"]
    assert top[0] <= bar["y"] <= top[1]
    assert make_explorer().spec()["stacked"] is None  # one panel: nothing to stack


def test_only_trace_types_of_the_vendored_bundle_are_accepted_and_no_cdn_is_named():
    assert {"scatter", "heatmap", "bar", "contour"} <= PLOTLY_TRACE_TYPES
    with pytest.raises(ValueError, match="bundle"):
        PlotlyFigure([{"type": "scatter3d", "x": [1], "y": [1], "z": [1]}], name="three-d")
    for page in (make_explorer().to_html(), PlotlyFigure([{"y": [1]}], name="tiny")._repr_html_()):
        assert "cdn." not in page and "https://" not in page
        assert "_static/vendor/plotly-cartesian.min.js" in page  # the book's own copy, found from the page


def test_explorer_offers_its_starting_state_as_plotly_json_outside_the_book(monkeypatch):
    monkeypatch.delenv("GRADCLIP_STATIC", raising=False)
    bundle = make_explorer().__class__._repr_mimebundle_(make_explorer())
    assert set(bundle) == {"text/html", "application/vnd.plotly.v1+json"}
    monkeypatch.setenv("GRADCLIP_STATIC", "1")
    assert set(make_explorer()._repr_mimebundle_()) == {"text/html"}


def test_exercise_accepts_the_answer_other_answers_and_intervals(capsys):
    exercise = Exercise("step", "Pick $\\eta$.", answer=1 / 64, tolerance=0.01, accept=[(0.0, 1 / 32), 0.5],
                        hint="Use $x_1$.", solution_md="So $0 < \\eta < 1/32$.")
    assert exercise.accepts(0.0156) and exercise.accepts(0.03) and exercise.accepts(0.5)
    assert not exercise.accepts(1 / 32) and not exercise.accepts(0.0) and not exercise.accepts(float("nan"))
    assert exercise.check(0.1) is False and "Not quite" in capsys.readouterr().out
    page = exercise._repr_html_()
    assert "<details" in page and "\\(x_1\\)" in page and "gc-ex-step-check" in page
    assert "0.015625" in page  # the page checks with the same targets
    with pytest.raises(ValueError, match="interval"):
        Exercise("bad", "?", answer=1, accept=[(2, 1)])


def test_markdown_keeps_math_for_mathjax():
    assert markdown_html("a $x_1 < 2$ b") == "<p>a \\(x_1 &lt; 2\\) b</p>"


def test_data_file_frames_are_written_for_the_book_and_inline_elsewhere(tmp_path, monkeypatch):
    from gradclip_book.figures import Explorer, Param

    book = tmp_path / "book"
    (book / "_assets").mkdir(parents=True)
    (book / "_config.yml").write_text("title: t\n")
    (book / "chapters").mkdir()
    monkeypatch.chdir(book / "chapters")
    ex = Explorer("lazy-demo", [Param("a", [1, 2])], compute=lambda a: {"traces": [{"x": [0, 1], "y": [0, a]}]},
                  traces=[{"mode": "lines"}], data_file=True)
    monkeypatch.delenv("GRADCLIP_STATIC", raising=False)
    inline = ex.to_html()
    assert '"frames"' in inline and 'id="gc-lazy-demo-data" data-src' not in inline  # live: inline
    monkeypatch.setenv("GRADCLIP_STATIC", "1")
    page = ex.to_html()
    assert 'id="gc-lazy-demo-data" data-src="data/lazy-demo.js"></script>' in page and '"frames"' not in page
    written = (book / "_assets" / "data" / "lazy-demo.js").read_text()
    prefix = '(window.gcData=window.gcData||{})["gc-lazy-demo"]='
    assert written.startswith(prefix)
    spec = json.loads(written[len(prefix):].rstrip().rstrip(";"))
    assert spec["frames"][ex.key({"a": 2})]["traces"][0]["y"] == [0, 2]


def test_a_frame_may_name_the_text_its_slider_shows_and_only_for_real_controls():
    def compute(level, method):
        return {"traces": [{"x": [0], "y": [level]}], "shown": {"level": f"{method} {10 ** -level:g}"}}

    ex = Explorer("levels", [Param("level", [1, 2], kind="slider"), Param("method", ["a", "b"])],
                  compute=compute, traces=[{"mode": "lines"}])
    assert ex.frame(level=2, method="b")["shown"] == {"level": "b 0.01"}
    assert "own[p.name]" in ex.to_html()  # the controller reads it
    with pytest.raises(ValueError, match="names no control"):
        Explorer("levels", [Param("level", [1, 2])], traces=[{"mode": "lines"}],
                 compute=lambda level: {"traces": [{"y": [level]}], "shown": {"threshold": "x"}})


def test_a_text_table_fixes_its_column_shares_and_checks_them():
    from gradclip_book.figures import table_html

    html_text = table_html(["a", "b"], [["x", "y"]], widths=[30, 70])
    assert 'class="table gc-table gc-cards gc-text"' in html_text and '<col style="width:70%">' in html_text
    assert 'data-label="b">y</td>' in html_text
    with pytest.raises(ValueError, match="one percentage per column"):
        table_html(["a", "b"], [["x", "y"]], widths=[100])
    # a phone card labels each cell with its header's text: a soft hyphen or an entity is not shown as code
    cards = table_html(["para&shy;meters", "<b>a</b> &amp; b"], [["1", "2"]])
    assert 'data-label="parameters">1</td>' in cards and 'data-label="a &amp; b">2</td>' in cards


def test_a_cross_marks_a_diverged_run_and_nothing_else_in_any_figure_module():
    # one meaning per marker across the book: every x-shaped marker sits in a trace about divergence
    from pathlib import Path

    import gradclip_book

    crosses = re.compile(r'"symbol": "x(-thin)?(-open)?(-dot)?"|"x-(thin|open|dot)[a-z-]*"')
    for module in sorted(Path(gradclip_book.__file__).parent.glob("*figures*.py")):
        lines = module.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines):
            if crosses.search(line):
                context = " ".join(lines[max(0, number - 3):number + 1])
                assert "diverged" in context, f"{module.name}:{number + 1} uses a cross for something else"


# --- the shared words ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seeds", [(0, 2, 4), (3, 1, 2, 4), (5, 5), ()])
def test_seed_range_refuses_seeds_that_are_not_a_run(seeds):
    # a "first-last" range of these would name seeds that did not run (or none at all)
    with pytest.raises(ValueError, match="not consecutive"):
        seed_range(seeds)


def test_shared_words():
    from gradclip_book.harness import score

    assert seed_range(range(10, 15)) == "10-14" and seed_range([3]) == "3"
    assert [and_list(["a", "b", "c", "d"][:n]) for n in range(5)] == ["", "a", "a and b", "a, b and c",
                                                                      "a, b, c and d"]
    assert pm(score("x", [0.5, 0.7]), 1) == "0.6 ± 0.1" and pm(score("x", [None, None])) == "diverged"
    assert soft_breaks("a <b> torch.nn.utils.clip_grad_norm_(") == (
        "a &lt;b&gt; torch.<wbr>nn.<wbr>utils.<wbr>clip_<wbr>grad_<wbr>norm_(")
    assert table_html(["a"], [["1"]], small=True) == f'<div style="font-size:0.9em">{table_html(["a"], [["1"]])}</div>'
