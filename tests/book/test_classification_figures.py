"""Chapter 4's figures (gradclip_book.classification_figures): built from the stored grid, light, and honest."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from gradclip_book import classification as cls
from gradclip_book import classification_figures as cf
from gradclip_book import grids

ROOT = Path(__file__).resolve().parents[2]
CODE_VERSION = "613190212635ea17"


def test_this_module_leaves_the_grid_code_version_unchanged():
    assert cls.code_version() == CODE_VERSION == {line["code_version"] for line in cf.lines()}.pop()


def test_headline_summary_matches_the_measured_story():
    rows = {(r["method"], r["threshold"]): r for r in cf.headline_summary()}
    assert rows["none", None]["diverged"] == len(grids.HEADLINE_SEEDS)
    assert min(rows["norm", grids.HARD_THRESHOLD]["accuracies"]) >= 0.9
    assert rows["agc", 0.03]["mean"] < 0.12
    assert cf.better(rows["norm", 0.1], rows["value", 0.003]) and not cf.better(rows["norm", 0.1], rows["soft", 0.3])


def test_grid_explorer_frames_are_the_stored_runs_and_light():
    ex = cf.grid_explorer()
    assert len(ex.frames) == len(grids.DEPTHS) * len(grids.LRS) * 4 * len(cf.EXPLORER_METHODS)
    for values in ex.sample(20, seed=3):
        run = cf.run_of(cf.grid_config(**values))
        frame = ex.frame(**values)
        assert frame == cf.grid_frame(run)
        diverged = run["diverged_at"] is not None
        assert frame["traces"][1]["x"] == ([run["diverged_at"] + cf.LOG_SHIFT] if diverged else [])
        assert any(("Diverged at step" in n) == diverged for n in frame["note"])
        t = run["config"]["threshold"]
        assert frame["shown"]["level"] == ("off" if t is None else f"{t:g}")
    size = len(json.dumps(ex.spec(), separators=(",", ":")))
    assert size < 1_500_000, size  # the page budget is 4.5 MB with a 1.5 MB plotly.js


def test_live_frame_reproduces_the_stored_frame():
    values = {"depth": 4, "lr": 0.1, "level": 0, "method": "norm"}
    assert cf.live_frame(**values) == cf.grid_frame(cf.run_of(cf.grid_config(**values)))


def test_rescue_explorer_marks_divergence_and_never_crashes():
    ex = cf.rescue_explorer()
    frame = ex.frame(method="zclip@2", seed=0)
    assert frame["traces"][2]["x"] and "Diverged at step" in frame["note"][0]
    frame = ex.frame(method="norm@0.1", seed=0)
    assert frame["traces"][2]["x"] == [] and "test accuracy" in frame["note"][0]


def test_layer_profile_replays_the_harness():
    profile = cf.layer_profile(grids.HARD, steps=1)
    stored = cf.headline_runs("none", None)[0]["grad_norm"]
    assert math.isclose(profile["total"][0], float(stored[0]), rel_tol=1e-3)
    assert math.isclose(profile["total"][1], float(stored[1]), rel_tol=1e-3)
    assert abs(profile["gain"][0] - 1) < 0.06 < profile["gain"][1] - 1


# --- the built page: moving each slider shows the stored record for that combination ---------------


def test_log_step_axes_keep_a_run_that_stops_at_step_2_visible():
    # the issue: on a 0-300 linear axis a run that diverges at step 2 is a sliver at the left edge
    axis = cf._two_panels(log_steps_to=grids.HARD.steps)["xaxis"]
    lo, hi = axis["range"]
    share = (math.log10(2 + cf.LOG_SHIFT) - lo) / (hi - lo)
    assert share > 0.15, share  # steps 0-2 take more than a sixth of the panel
    assert axis["ticktext"][0] == "0" and axis["tickvals"][0] == cf.LOG_SHIFT
    # and every plotted point of every run lies inside the range
    frame = cf.rescue_explorer().frame(method="norm@0.1", seed=0)
    for trace in frame["traces"]:
        xs = trace.get("x") or ([trace["x0"] + i * trace["dx"] for i in range(len(trace["y"]))] if "x0" in trace else [])
        assert all(lo <= math.log10(x) <= hi for x in xs)


def test_threshold_lines_sit_inside_the_plot():
    fig = cf.threshold_figure(8, 0.5, {0.5: 0.2, 0.9: 3.0})
    lo, hi = fig.layout["xaxis"]["range"]
    for trace in fig.data:
        for x in trace["x"]:
            assert lo + 0.1 < math.log10(x) < hi - 0.1


def test_both_runs_of_figure_4_2_are_binned_alike_and_visible_when_they_coincide():
    ex = cf.rescue_explorer()
    frame = ex.frame(method="norm@0.1", seed=0)
    method_loss, plain_loss = frame["traces"][0], frame["traces"][1]
    # same seed, same first steps: the first plotted point is the same mean over the same bin
    assert method_loss["x0"] == plain_loss.get("x0", (plain_loss.get("x") or [None])[0]) == cf.LOG_SHIFT
    assert method_loss["dx"] == plain_loss.get("dx", method_loss["dx"])
    # ZClip at seed 0 behaves exactly as no clipping (no history yet): the note says the lines coincide
    frame = ex.frame(method="zclip@2", seed=0)
    assert frame["traces"][0]["y"] == frame["traces"][1]["y"] and "identical" in frame["note"][-1]
    # and the dashed unclipped line is drawn over the solid one, so it shows where they coincide
    assert ex.traces[0]["line"]["dash"] == "solid" and ex.traces[1]["line"]["dash"] == "dash"


def test_a_run_that_stops_at_step_1_is_drawn_with_markers():
    ex = cf.grid_explorer()
    short = [v for v in ex.sample(200, seed=1)
             if cf.run_of(cf.grid_config(**v))["steps_run"] <= cf.SHORT_CURVE]
    assert short, "the grid has runs that stop within three steps"
    for values in short[:5]:
        frame = ex.frame(**values)
        assert frame["traces"][0]["mode"] == frame["traces"][2]["mode"] == "lines+markers"
