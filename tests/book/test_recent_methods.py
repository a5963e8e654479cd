"""Chapter 6's runs of the 2023 methods on chapter 4.11's transformer (gradclip_book.recent_methods) and their data."""

from __future__ import annotations

import pytest

from gradclip_book import harness, recent_methods as rm, text_figures
from gradclip_book.reproducibility import EARLY_RTOL, on_grid_machine

HINT = f"recompute it with `{rm.COMMAND}`"
STEPS = 3  # the spot check's steps: the first update of each method acts at the first step


def test_the_data_file_holds_every_run_of_the_current_code():
    lines = rm.runs()
    assert [line["key"] for line in lines] == [harness.config_key(c) for _, c in rm.points()], HINT
    assert {line["code_version"] for line in lines} == {rm.version()}, f"stored runs of other code: {HINT}"
    assert all(line["steps_run"] == 500 and line["diverged_at"] is None for line in lines)


def test_the_plain_run_through_this_module_is_the_chapters_stored_run():
    # the same model, batches, loss, loop and evaluation as chapter 4.11's grid: the plain run of seed 0 agrees
    check = next(line for line in rm.runs() if line["section"] == "check")
    stored = text_figures.transformer_run("none", check["config"]["lr"], check["config"]["seed"])
    for field in ("metrics", "curve", "clip_fraction", "final_loss", "steps_run"):
        assert check[field] == stored[field], field


@pytest.mark.parametrize("arm", sorted(rm.ARMS))
def test_each_methods_stored_run_reproduces_in_its_first_steps(arm):
    # the first steps of each method's seed-0 run, afresh (the full runs re-run bit for bit on the grids' machine
    # kind; the first steps agree anywhere, chapters/data/README.md)
    line = next(line for line in rm.runs() if line["config"]["arm"] == arm)
    fresh = rm.train(rm.MethodConfig(**line["config"]), steps=STEPS, evaluate=False).to_json()
    stored = dict(zip(line["curve"]["step"], line["curve"]["loss"]))
    # exactly (both rounded to 4 digits, as stored) on the grids' machine kind; to 2e-4 on others
    tolerance = 0.0 if on_grid_machine() else EARLY_RTOL
    assert fresh["curve"]["step"] == list(range(STEPS))
    assert [stored[step] for step in range(STEPS)] == pytest.approx(fresh["curve"]["loss"], rel=tolerance, abs=0)


def test_each_method_acts_where_it_should_and_the_guard_never_skipped():
    # on this well-tuned run: AdaGC and the update clipping act on most steps, the loss guard on none; the
    # guard's runs are then the plain runs bit for bit
    by = {(line["config"]["arm"], line["config"]["seed"]): line for line in rm.runs()}
    for seed in rm.RUN_SEEDS:
        assert by["adagc", seed]["fired"] > 0.5 and by["update-clip", seed]["fired"] > 0.5
        guard, plain = by["loss-guard", seed], text_figures.transformer_run("none", rm.HEADLINE_LR["none"], seed)
        assert guard["fired"] == 0 and guard["curve"] == plain["curve"] and guard["metrics"] == plain["metrics"]


def test_summary_judges_by_the_books_rule_on_the_same_seeds():
    s = rm.summary()
    assert s["seeds"] == len(rm.RUN_SEEDS) and set(s["arms"]) == set(rm.ARMS)
    for arm, row in s["arms"].items():
        plain = s["plain"]["test"]
        expected = "better" if harness.beats(row["test"], plain, mode="min") else \
            "worse" if harness.beats(plain, row["test"], mode="min") else "no difference"
        assert row["vs_plain"] == expected
        assert row["test"].seeds == plain.seeds == len(rm.RUN_SEEDS)


def test_a_method_name_outside_the_arms_is_refused():
    with pytest.raises(ValueError, match="arm"):
        rm.MethodConfig("zclip")


def test_the_seeds_that_flip_a_verdict_are_recounted_by_hand():
    # an independent recount of the leave-one-seed-out verdicts: numpy means and sample deviations of the stored
    # test losses, a difference only beyond the larger spread (the book's rule, chapter 2)
    import numpy as np

    s = rm.summary()

    def verdict(a, b):
        gap, spread = np.mean(b) - np.mean(a), max(np.std(a, ddof=1), np.std(b, ddof=1))
        return "better" if gap > spread else "worse" if -gap > spread else "no difference"

    for arm, row in s["arms"].items():
        mine = np.array(row["test"].values)
        for name, key in (("plain", "plain"), ("norm", "norm")):
            theirs = np.array(s[key]["test"].values)
            assert verdict(mine, theirs) == row[f"vs_{name}"], (arm, name)
            flips = [seed for i, seed in enumerate(rm.RUN_SEEDS)
                     if verdict(np.delete(mine, i), np.delete(theirs, i)) != row[f"vs_{name}"]]
            assert row["flips_without"][name] == flips, (arm, name)
