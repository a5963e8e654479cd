"""Chapter 4's text page: its summaries and figures read the stored runs right (gradclip_book.text_figures)."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import numpy as np
import pytest

from gradclip_book import harness, text_grid
from gradclip_book import text_figures as tf
from gradclip_book.figures import seed_range
from gradclip_book.text_runs import RNN


def _stored(seeds=text_grid.SEEDS, **fields):
    """The stored lines at ``seeds`` (by default the choice's seeds: the grid also holds replication seeds at some
    settings) whose config has these fields, read straight from the file (an independent lookup)."""
    return [line for line in text_grid.lines()
            if line["config"]["seed"] in seeds and all(line["config"][k] == v for k, v in fields.items())]


def _val(line):
    return None if line["diverged_at"] is not None else float(line["metrics"]["val_loss"])


def _test(line):
    return None if line["diverged_at"] is not None else float(line["metrics"]["test_loss"])


@pytest.mark.parametrize("model,threshold", [("rnn", None), ("rnn", 1.0), ("lstm", None), ("lstm", 1.0)])
def test_recurrent_choice_is_the_lowest_mean_validation_loss_among_the_seeds(model, threshold):
    method = "none" if threshold is None else "norm"
    table = {}
    for lr in text_grid.RNN_LRS:
        lines = _stored(model=model, seq_len=text_grid.HEADLINE_SEQ_LEN, lr=lr, method=method, threshold=threshold)
        values = [_val(line) for line in sorted(lines, key=lambda line: line["config"]["seed"])]
        assert len(values) == len(text_grid.SEEDS)
        finished = [v for v in values if v is not None]
        table[lr] = (sum(v is None for v in values), float(np.mean(finished)) if finished else math.inf)
    want = min(text_grid.RNN_LRS, key=lambda lr: (table[lr], text_grid.RNN_LRS.index(lr)))
    choice = tf.recurrent_choice(model, threshold)
    assert choice.best.setting == want
    assert choice.best.mean == pytest.approx(table[want][1])


def test_recurrent_explorer_draws_the_stored_runs():
    explorer = tf.recurrent_explorer()
    for values in explorer.sample(5, seed=random.randrange(1 << 30)):
        run = tf.recurrent_run("rnn", values["seq_len"], values["lr"], values["threshold"])
        plain = tf.recurrent_run("rnn", values["seq_len"], values["lr"], None)
        traces = explorer.frame(**values)["traces"]
        stored_norms = [float(v) for v in run["curve"]["grad_norm"] if v != "nan"]
        assert max(v for v in traces[4]["y"] if v is not None) == pytest.approx(max(stored_norms), rel=1e-3)
        assert traces[1]["y"][0] == pytest.approx(float(plain["curve"]["loss"][0]), rel=1e-3)
        fired = [v for v in traces[6]["y"] if v is not None]
        assert bool(fired) == (float(run["clip_fraction"]) > 0)
        # the drawn steps are the stored bins' first steps, merged into at most PLOT_POINTS, drawn at step + 1
        assert len(traces[0]["x"]) <= tf.PLOT_POINTS and traces[0]["x"][0] == 1
        assert set(traces[0]["x"]) <= {s + 1 for s in run["curve"]["step"]}


def test_through_time_frame_reads_the_stored_profiles():
    run = tf.recurrent_run("rnn", 128, 3.0, None)
    frame = tf.through_time_frame(run)
    start = [float(v) for v in run["through_time"][0][1]]
    end = [float(v) for v in run["through_time"][-1][1]]
    assert frame["traces"][0]["y"][:3] == pytest.approx(start[:3], rel=1e-3)
    assert frame["traces"][2]["y"][0] == pytest.approx(end[0], rel=1e-3)
    assert all(y is None or y > 0 for trace in frame["traces"][:3] for y in trace["y"])  # zeros are not drawn on a log axis
    assert f"at step {run['through_time'][-1][0]}" in frame["note"][0]


def test_through_time_note_states_each_checkpoint_once_with_nonzero_ratios():
    # the default state (window 128, lr 3, max_norm 1) once read '0 times ... at step 499 and 0 times at step 499'
    for seq_len, lr, threshold in [(128, 3.0, 1.0), (128, 3.0, None), (32, 3.0, None), (32, 10.0, None)]:
        run = tf.recurrent_run("rnn", seq_len, lr, threshold)
        note = tf.through_time_frame(run)["note"][0]
        steps = [f"at step {s} " for s, _ in run["through_time"]]
        assert all(note.count(s) <= 1 for s in steps), note
        assert " 0 times" not in note and "underflow)" not in note, note
        lag = int(note.split("the gradient ")[1].split(" steps back")[0])
        profiles = [v for _, v in run["through_time"]]
        lags = [0, 1, 2, 4, 8, 16, 32, 64, 127]
        assert lag < seq_len and all(float(v[lags.index(lag)]) > 0 for v in (profiles[0], profiles[-1]))
        start_ratio = float(profiles[0][lags.index(lag)]) / float(profiles[0][0])
        assert tf.power_text(start_ratio, 2) in note or f"{start_ratio:.2g} times" in note


def test_recurrent_lr_figure_lists_every_point_above_its_axis():
    fig = tf.recurrent_lr_figure()
    top = fig.layout["yaxis"]["range"][1]
    for model in ("rnn", "lstm"):
        frame = fig.frame(model=model)
        above = [(i, x) for i, t in enumerate(frame["traces"]) for x, y in zip(t["x"], t["y"]) if y > top]
        assert above or model == "lstm"
        off_notes = {n.split(",")[0]: n for n in frame["note"] if "off the scale" in n}
        for i, x in above:
            assert f" {x:g} (" in off_notes[("Without clipping", f"Clipped at max_norm {text_grid.RNN_CLIP:g}")[i]]
        assert len(off_notes) == len({i for i, _ in above})


def test_cliff_slice_re_runs_the_stored_start_and_probes_without_a_trace():
    config = replace(RNN, seq_len=128, lr=3.0)
    cliff = tf.cliff_slice(config, steps=6)
    stored = tf.recurrent_run("rnn", 128, 3.0, None)["curve"]
    assert [harness.curves.round_float(v) for v in cliff["run"].loss] == stored["loss"][:6]
    assert [harness.curves.round_float(v) for v in cliff["run"].grad_norm] == stored["grad_norm"][:6]
    assert cliff["distance"][-1] == pytest.approx(cliff["lr"] * cliff["norm"])
    assert cliff["along"][-1] == pytest.approx(cliff["after"], rel=1e-5)
    assert cliff["jumps"][cliff["step"]] > 1 and all(j <= 1 for j in cliff["jumps"][:cliff["step"]])


def test_power_text_and_describe():
    assert tf.power_text(3.6e-12) == "4×10⁻¹²"
    run = tf.recurrent_run("rnn", 32, 1.0, 1.0)
    assert f"{float(run['metrics']['val_loss']):.3f}" in tf.describe(run) and "fired at" in tf.describe(run)


# --- the transformer ------------------------------------------------------------------------------------------


def _transformer_lines(arm, lr, seeds):
    want = {harness.config_key(text_grid.arm_config(arm, lr, s)) for s in seeds}
    return [line for line in text_grid.lines() if line["key"] in want]


def test_headline_learning_rates_are_the_sweep_choice_on_validation_loss():
    # an independent choice: per arm, the lowest seed-0 validation loss among the runs that finished
    for arm in text_grid.ARMS:
        finished = {lr: _val(line) for lr in text_grid.TRANSFORMER_LRS
                    for line in _transformer_lines(arm, lr, text_grid.SWEEP_SEEDS) if _val(line) is not None}
        want = min(finished, key=lambda lr: (finished[lr], lr))
        assert text_grid.HEADLINE_LR[arm] == want, arm
        assert tf.arm_choices()[arm]["lr"] == want


def test_arm_verdicts_follow_the_spread_rule_on_the_test_loss_over_five_seeds():
    choices = tf.arm_choices()
    verdicts = tf.arm_verdicts(choices)
    lines = {arm: _transformer_lines(arm, text_grid.HEADLINE_LR[arm], text_grid.SEEDS) for arm in text_grid.ARMS}
    values = {arm: [_test(line) for line in arm_lines] for arm, arm_lines in lines.items()}
    assert all(len(v) == len(text_grid.SEEDS) for v in values.values())
    base = values["none"]
    for arm, verdict in verdicts.items():
        mine = values[arm]
        assert choices[arm]["score"].mean == pytest.approx(np.mean([_val(line) for line in lines[arm]]))
        assert choices[arm]["test"].mean == pytest.approx(np.mean([v for v in mine if v is not None]))
        if None in mine or None in base:
            continue
        gap, spread = np.mean(base) - np.mean(mine), max(np.std(base, ddof=1), np.std(mine, ddof=1))
        want = "better" if gap > spread else "worse" if -gap > spread else "no difference"
        assert verdict == want, (arm, gap, spread)


def test_arm_verdicts_judge_on_test_not_on_the_validation_that_chose():
    # validation says the arm is better, test says no difference: the verdict is test's
    same, low = harness.score(0.01, [1.0, 1.01, 0.99]), harness.score(0.01, [0.5, 0.51, 0.49])
    choices = {"none": {"score": same, "test": same}, "norm": {"score": low, "test": same}}
    assert tf.arm_verdicts(choices) == {"norm": "no difference"}
    assert tf.arm_verdicts(choices, on="score") == {"norm": "better"}


def test_spikes_are_the_stored_rises_largest_first():
    runs = [line for line in text_grid.lines() if line["config"]["model"] == "transformer"]
    found = tf.spikes(runs)
    assert [s["rise"] for s in found] == sorted((s["rise"] for s in found), reverse=True)
    finished = [line for line in runs if line["diverged_at"] is None]
    assert len(found) == len(finished)
    top = max(finished, key=lambda line: float(line["rise"]["rise"]))
    assert found[0]["rise"] == pytest.approx(float(top["rise"]["rise"])) and found[0]["step"] >= 50


def test_sensitivity_figure_draws_the_seed_zero_losses():
    figure = tf.sensitivity_figure()
    for trace, arm in zip(figure.data, text_grid.ARMS):
        for lr, y in zip(trace["x"], trace["y"]):
            (line,) = _transformer_lines(arm, lr, text_grid.SWEEP_SEEDS)
            assert y == pytest.approx(_val(line), rel=1e-3)


def test_live_recurrent_frame_reproduces_the_stored_frame():
    # a fresh run (window 16, lr 1, unclipped: one run of a few seconds) draws what the stored run draws
    from gradclip_book.reproducibility import EARLY_STEPS, on_grid_machine

    stored = tf.recurrent_run("rnn", 16, 1.0, None)
    live, then = tf.live_recurrent_frame(16, 1.0, None), tf.recurrent_frame(stored, stored)
    if on_grid_machine():
        assert live == then
        return
    # elsewhere the curves' first steps (drawn to 4 significant digits: 1.1e-3 apart at most by rounding)
    assert len(live["traces"]) == len(then["traces"])
    for a, b in zip(live["traces"], then["traces"]):
        first_a, first_b = a["y"][:EARLY_STEPS], b["y"][:EARLY_STEPS]   # (None: a gap in the curve)
        assert a["x"] == b["x"] and [v is None for v in first_a] == [v is None for v in first_b]
        assert [v for v in first_a if v is not None] == pytest.approx([v for v in first_b if v is not None], rel=1.1e-3)


def test_guide_evidence_is_best_against_best_by_the_spread_rule():
    ev = tf.guide_evidence()
    for model in ("rnn", "lstm"):
        row = ev["recurrent"][model]
        plain = [_val(line) for line in _stored(model=model, seq_len=text_grid.HEADLINE_SEQ_LEN, lr=row["plain_lr"],
                                                method="none")]
        clipped = [_val(line) for line in _stored(model=model, seq_len=text_grid.HEADLINE_SEQ_LEN, lr=row["clip_lr"],
                                                  method="norm", threshold=text_grid.RNN_CLIP)]
        assert None not in plain + clipped and len(plain) == len(clipped) == len(text_grid.SEEDS)
        assert row["plain"] == pytest.approx((np.mean(plain), np.std(plain, ddof=1)))
        assert row["clip"] == pytest.approx((np.mean(clipped), np.std(clipped, ddof=1)))
        # the verdict is on the test losses of the same runs
        plain = [_test(line) for line in _stored(model=model, seq_len=text_grid.HEADLINE_SEQ_LEN, lr=row["plain_lr"],
                                                 method="none")]
        clipped = [_test(line) for line in _stored(model=model, seq_len=text_grid.HEADLINE_SEQ_LEN, lr=row["clip_lr"],
                                                   method="norm", threshold=text_grid.RNN_CLIP)]
        assert row["plain_test"] == pytest.approx((np.mean(plain), np.std(plain, ddof=1)))
        assert row["clip_test"] == pytest.approx((np.mean(clipped), np.std(clipped, ddof=1)))
        gap, spread = np.mean(plain) - np.mean(clipped), max(np.std(plain, ddof=1), np.std(clipped, ddof=1))
        assert row["verdict"] == ("better" if gap > spread else "worse" if -gap > spread else "no difference")
    t = ev["transformer"]
    assert t["lr"] == text_grid.HEADLINE_LR["none"] and set(t["verdicts"]) == set(text_grid.ARMS) - {"none"}
    base = [_test(line) for line in _transformer_lines("none", t["lr"], text_grid.SEEDS)]
    assert t["plain_test"] == pytest.approx((np.mean(base), np.std(base, ddof=1)))
    norm = [float(line["clip_fraction"]) for line in _transformer_lines("norm", t["lr"], text_grid.SEEDS)]
    assert t["norm_clip_fraction"] == pytest.approx(np.mean(norm))


def test_clip_verdicts_recounted_per_seed_group_and_standing_only_where_every_group_agrees():
    import statistics

    for model, lr in text_grid.REPLICATION_ROWS:
        v = tf.clip_verdicts(model, lr)
        assert [g["seeds"] for g in v["groups"]] == [tuple(text_grid.SEEDS), *text_grid.UNSEEN_SEED_GROUPS]
        verdicts = []
        for g in v["groups"]:
            losses = {}
            for threshold in (None, text_grid.RNN_CLIP):
                lines = _stored(seeds=g["seeds"], model=model, seq_len=text_grid.HEADLINE_SEQ_LEN, lr=lr,
                                method="none" if threshold is None else "norm", threshold=threshold)
                by_seed = {line["config"]["seed"]: _test(line) for line in lines}
                losses[threshold] = [by_seed[s] for s in g["seeds"]]
            plain, clipped = losses[None], losses[text_grid.RNN_CLIP]
            assert list(g["plain"].values) == plain and list(g["clipped"].values) == clipped
            assert None not in plain + clipped       # no stored recurrent run of these rows diverged
            gap, spread = statistics.mean(plain) - statistics.mean(clipped), max(map(statistics.stdev, (plain, clipped)))
            want = "clipping" if gap > spread else "no clipping" if -gap > spread else "no difference"
            assert g["verdict"] == want, (model, lr, g["seeds"])
            verdicts.append(want)
        assert v["standing"] == (verdicts[0] if len(set(verdicts)) == 1 else "no difference")
        words = tf.verdict_words(v)
        assert all(f"{seed_range(g['seeds'])} (" in words for g in v["groups"]), words
