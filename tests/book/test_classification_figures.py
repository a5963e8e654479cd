"""The deep-MLP readers and figures (gradclip_book.classification_figures): chapter 4's first illustration and
the stored runs chapters 5.1 and 6 read."""

from __future__ import annotations

import math

from gradclip_book import classification as cls
from gradclip_book import classification_figures as cf
from gradclip_book import grids, harness


def test_the_grid_was_computed_by_the_harness_of_today():
    assert {line["code_version"] for line in cf.lines()} == {cls.code_version()}


def test_headline_summary_matches_the_stored_runs():
    rows = {(r["method"], r["threshold"]): r for r in cf.headline_summary()}
    assert rows["none", None]["diverged"] == len(grids.HEADLINE_SEEDS)
    norm = rows["norm", grids.HARD_THRESHOLD]
    assert norm["accuracies"] == [grids.number(r["test_accuracy"]) for r in cf.headline_runs("norm", 0.1)]
    assert min(norm["accuracies"]) >= 0.9


def test_explosion_figure_draws_every_step_of_the_diverged_runs():
    fig = cf.explosion_figure()
    runs = cf.headline_runs("none", None)
    losses = [t for t in fig.data if t.get("mode") == "lines+markers" and "xaxis" not in t]
    assert len(losses) == len(runs)
    for trace, run in zip(losses, runs):
        assert trace["x"] == [s + cf.LOG_SHIFT for s in range(run["steps_run"])]   # one point per step
    lo, hi = fig.layout["xaxis"]["range"]
    assert all(lo <= math.log10(x) <= hi for t in losses for x in t["x"])


def test_mlp_best_vs_best_is_chosen_on_validation():
    from dataclasses import replace

    from gradclip_book import performance as perf

    result = cf.mlp_best_vs_best()
    plain, clipped = result["plain"], result["clipped"]
    assert plain["config"].method == "none" and clipped["config"].method == "norm"

    def mean_val(config):
        values = [perf.opt_run(replace(config, seed=s)) for s in grids.OPT_SEEDS]
        return sum(grids.number(r["val_accuracy"]) or 0.0 for r in values) / len(values)

    best = max(mean_val(replace(grids.HARD, lr=lr)) for lr in grids.SGD_LRS)
    assert math.isclose(plain["val"].mean, best)            # nothing diverges among the best: the means agree
    assert clipped["clip_fraction"] > 0.5
