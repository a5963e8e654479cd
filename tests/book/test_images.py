"""Chapter 4's image experiments (gradclip_book.images, images_grid, images_figures) and their stored grid."""

from __future__ import annotations

import random
from dataclasses import asdict, replace

import pytest
import torch

from gradclip_book import harness, images, images_grid as ig, images_figures as imf
from gradclip_book.images import ImageConfig

HINT = f"recompute it with `{images.COMMAND}` (then update chapters/data/README.md)"


# --- runs ------------------------------------------------------------------------------------------------------


def test_a_run_is_the_harness_on_the_config():
    config = ImageConfig(model="plain+bn", depth=2, steps=12, lr=0.05, method="norm", threshold=0.5, seed=3)
    fresh = images.run(config)
    with harness.deterministic():
        parts = harness.image_split()
        model = harness.build("plain_cnn", seed=3, depth=2, width=8, norm="batch")
        reference = harness.train(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                  harness.minibatches(*parts["train"], 64, 3), 12, method="norm", threshold=0.5,
                                  evaluate=harness.accuracy_evaluator(parts), threads=None)
    assert fresh.loss == reference.loss and fresh.metrics == reference.metrics
    assert images.run(config).grad_norm == fresh.grad_norm          # deterministic


def test_config_validation():
    with pytest.raises(ValueError, match="threshold must be None"):
        ImageConfig(method="none", threshold=1.0)
    with pytest.raises(ValueError, match="model must be one of"):
        ImageConfig(model="vgg")
    with pytest.raises(ValueError):
        ImageConfig(label_noise=1.5)


def test_corrupted_split_changes_only_the_training_set_and_is_fixed_per_split():
    clean = harness.image_split(0)
    a, b = images.corrupted_split(0, 7, 30.0, 0.05), images.corrupted_split(0, 7, 30.0, 0.05)
    changed = (a["train"][0] != clean["train"][0]).any(dim=1)
    assert int(changed.sum()) == 7 and float(a["train"][0][changed].std()) > 20
    assert int((a["train"][1] != clean["train"][1]).sum()) == round(0.05 * 1077)
    assert torch.equal(a["train"][0], b["train"][0]) and torch.equal(a["validation"][0], clean["validation"][0])


def test_the_four_networks():
    for name, (kind, norm) in images.MODELS.items():
        counts = harness.count_layers(images.build_model(ImageConfig(model=name, depth=4)))
        assert counts["conv"] == 5 and counts["norm"] == (5 if norm else 0), name


def test_the_code_version_covers_what_decides_a_run():
    assert len(images.code_version()) == 16
    # the grid's definitions are not part of it: editing them never makes a stored run stale
    import inspect
    assert "phase_one" not in inspect.getsource(images)


# --- the stored grid ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lines():
    stored = images.load()
    assert stored, f"{images.GRID_FILE} is missing: {HINT}"
    return stored


def test_grid_was_computed_by_the_current_code(lines):
    versions = {line["code_version"] for line in lines}
    assert versions == {images.code_version()}, f"stored versions {sorted(versions)}: {HINT}"


def test_grid_is_complete(lines):
    wanted = {harness.config_key(c) for _, c in ig.grid_points(lines)}
    stored = {line["key"] for line in lines}
    assert wanted <= stored, f"{len(wanted - stored)} runs missing: {HINT}"
    for line in lines:
        assert line["key"] == harness.config_key(images.config_of(line["config"]))


def test_the_verdicts_settings_are_stored_at_seeds_no_choice_saw(lines):
    points = ig.replication_points(lines)
    assert len(points) == 7 * len(ig.REPLICATION_SEEDS)  # 7 settings (see its docstring), none chosen twice
    assert {c.seed for _, c in points} == set(ig.REPLICATION_SEEDS) and not set(ig.REPLICATION_SEEDS) & set(ig.SEEDS)
    stored = {line["key"] for line in lines}
    assert all(harness.config_key(c) in stored for _, c in points), HINT


def test_three_random_stored_runs_are_reproduced_exactly(lines):
    cheap = [line for line in lines if line["config"]["depth"] == 4 and line["section"] == "explore"]
    problems = harness.spot_check(cheap, images.record, images.config_of, count=3, seed=20261207)
    assert not problems, problems


def test_phase_two_is_chosen_on_validation_at_seed_zero(lines):
    by_key = {line["key"]: line for line in lines}
    for section, config in ig.phase_two(lines):
        if section != "methods-seeds" or config.seed != 1:
            continue
        candidates = [replace(ig.HEADLINE, lr=lr, method=config.method, threshold=t)
                      for lr in ig.METHOD_LRS for t in ig.METHOD_THRESHOLDS[config.method]]
        vals = {c: harness.values_of([by_key[harness.config_key(c)]], "val_accuracy")[0] for c in candidates}
        chosen = replace(config, seed=0)
        assert all((vals[chosen] or 0) >= (v or 0) for v in vals.values()), config.method


def test_budget_runs_are_the_validation_choices_with_four_times_the_steps(lines):
    points = ig.budget_points(lines)
    plain = imf.choose(imf.unclipped(ig.HEADLINE)).best.setting          # on the 200-step runs, all five seeds
    clip = imf.choose(imf.clipped(ig.HEADLINE)).best.setting
    chosen = {replace(c, seed=0, steps=ig.HEADLINE.steps) for _, c in points}
    assert chosen == {replace(ig.HEADLINE, lr=lr) for lr in ig.LRS if lr <= plain.lr} | {clip}
    assert len(points) == len(ig.SEEDS) * len(chosen) and {c.steps for _, c in points} == {4 * ig.HEADLINE.steps}


def test_recipe_thresholds_come_from_the_unclipped_probe(lines):
    for section, config in ig.recipe_points(lines)[:5]:
        probe = images.stored(replace(config, method="none", threshold=None))
        norms = [float(n) for n in probe["curve"]["grad_norm"][:harness.recipe.PROBE_STEPS]]
        assert config.threshold == harness.recommend_threshold(norms)


def test_explorer_frames_are_the_stored_runs(lines):
    explorer = imf.grid_explorer()
    for values in explorer.sample(6, seed=4):
        line = images.stored(imf.explore_config(**values))
        assert explorer.frame(**values) == imf.grid_frame(line) or \
            explorer.frame(**values)["note"] == imf.grid_frame(line)["note"]
        assert explorer.frame(**values).get("shown") == ({"threshold": "off"} if values["method"] == "none" else None)
        curve = imf.drawn_curve(line)
        if line["steps_run"] <= imf.DRAWN_POINTS:                       # a short run: every step drawn
            assert curve["x"] == [s + 1 for s in range(line["steps_run"])]


def test_drawn_curves_are_the_harness_rebin(lines):
    from gradclip_book.harness import curves

    for line in random.Random(3).sample(list(lines), 40):
        assert imf._rebin(line["curve"], line["steps"], 50, line["steps_run"]) == \
            curves.rebin(line["curve"], line["steps"], 50, line["steps_run"])


def test_figure_legends_name_every_arm_and_diverged_once_in_grey():
    # an arm with no learning rate that trains keeps its legend entry (plotly drops a trace with no points)
    fig = imf.stable_figure({4: {"none": [], "norm@1": [0.1, 0.3]}, 8: {"none": [], "norm@1": []}},
                            {"none": "no clipping", "norm@1": "max_norm 1"})
    assert [t["name"] for t in fig.data if t["x"]] == ["no clipping", "max_norm 1"]
    assert len(fig.layout["xaxis"]["title"]["text"]) <= 20                       # readable at 390 px
    # the explosion explorer: the seeds' crosses share one legend entry, in grey, as Figure 4.1's does
    explorer = imf.explosion_explorer()
    crosses = [t for t in explorer.traces if t.get("marker", {}).get("symbol") == "x"]
    assert [t["name"] for t in crosses if t.get("showlegend", True)] == ["diverged (in the seed's colour)"]
    assert [t["marker"]["color"] for t in crosses if t.get("showlegend", True)] == ["#777777"]
    assert len(explorer.frame(depth=16, lr=1.0)["traces"]) == len(explorer.traces)
    grid = imf.grid_explorer()
    legend_crosses = [t for t in grid.traces if t.get("marker", {}).get("symbol") == "x" and t.get("showlegend", True)]
    assert [t["marker"]["color"] for t in legend_crosses] == ["#777777"]
