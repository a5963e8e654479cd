"""Chapter 5.3's fault-injection loop and guards (src/gradclip_book/safety.py)."""

import math
import random
import statistics
from dataclasses import replace

import numpy as np
import pytest
import torch

import gradclip
from gradclip_book import classification as cls
from gradclip_book import safety
from gradclip_book.reproducibility import rerun_differences

SHORT = 60


def test_without_fault_or_guard_it_is_chapter_4s_train():
    # the same network, split, batch order and optimizer: every loss and the final accuracy agree bit for bit
    config = replace(safety.BASE, steps=SHORT)
    reference = cls.train(config)
    run = safety.train(safety.SafetyConfig(steps=SHORT))
    assert run.loss == reference.loss
    assert run.test_accuracy == reference.test_accuracy
    assert run.actions == ["step"] * SHORT and run.outcome == "finished"


def test_softcap_is_cap_tanh_and_bounded():
    z = torch.tensor([-1e6, -30.0, -1.0, 0.0, 0.5, 15.0, 1e6], dtype=torch.float64)
    capped = safety.GUARDS["softcap"].build().logits(z)
    expected = safety.SOFTCAP * np.tanh(z.numpy() / safety.SOFTCAP)
    np.testing.assert_allclose(capped.numpy(), expected, rtol=1e-12)
    assert capped.abs().max() <= safety.SOFTCAP


def test_layerwise_hook_equals_gradclip_per_tensor_clipping():
    torch.manual_seed(0)
    model = cls.build_model(replace(safety.BASE, depth=3))
    x, y = torch.randn(32, 64) * 5, torch.randint(0, 10, (32,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    params = list(model.parameters())
    reference = [p.grad.clone() for p in params]
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, g in zip(ref_params, reference):
        p.grad = g.clone()
    gradclip.clip_grad_norm_per_tensor_(ref_params, safety.LAYER_MAX_NORM)
    model.zero_grad(set_to_none=True)
    safety.GUARDS["layerwise"].build().setup(model, None)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert any(g.norm() > safety.LAYER_MAX_NORM for g in reference)  # the case clips something
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-5, atol=1e-7)


def test_outlier_rule_against_a_hand_median():
    rule = safety._Running(window=5, min_history=3, floor=1.0)
    history = []
    rng = random.Random(0)
    for _ in range(40):
        v = rng.choice([0.5, 0.6, 0.7, 10.0, 0.4])
        window = history[-5:]
        expected = len(window) >= 3 and v > max(2.0 * statistics.median(window), 1.0)
        assert rule.outlier(v, 2.0) == expected
        history.append(v)
    assert rule.outlier(math.nan, 2.0) and rule.outlier(math.inf, 2.0)


@pytest.mark.parametrize("fault", ["nan-grad", "scaled"])
def test_backward_faults_leave_the_loss_finite_and_break_the_gradients(fault):
    config = safety.SafetyConfig(fault=fault, steps=12, fault_step=10)
    run = safety.train(config)
    assert math.isfinite(run.loss[10])  # the forward pass of the faulty batch is intact
    if fault == "nan-grad":
        assert run.outcome == "nan" and not math.isfinite(run.loss[11])
    else:
        assert run.loss[11] > 100 * run.loss[9]


def test_spike_guard_and_rollback_skip_the_nan_batch():
    spike = safety.train(safety.SafetyConfig(fault="nan-grad", guard="spike", steps=SHORT, fault_step=40))
    back = safety.train(safety.SafetyConfig(fault="nan-grad", guard="rollback", steps=SHORT, fault_step=40))
    assert spike.spike_skips == 1 and spike.finite
    assert back.actions.count("rollback") == 1 and back.actions[41] == "rollback" and back.finite


def test_stored_runs_spot_check():
    runs = safety.load()
    assert len(runs) == len(safety.grid_configs())
    for config in random.Random(1).sample(safety.grid_configs(), 3):
        fresh = safety.to_json(safety.train(config))
        # every field bit for bit on the grid's kind of machine, the first steps elsewhere (reproducibility)
        problems = rerun_differences(fresh, runs[safety.key(config)])
        assert not problems, (config, problems[:5])


def test_the_issue_assertions_hold_on_the_stored_runs():
    s = safety.summary()
    for fault in ("outliers", "nan-grad", "scaled"):
        assert s["faults"][fault]["none"]["lost"]  # without a guard the run is lost
    assert not s["faults"]["labels"]["none"]["lost"]  # random labels degrade the run; the page says so
    for fault, cells in s["faults"].items():
        good = [g for g, c in cells.items() if c["recovers"]]
        assert good, fault
        assert all(cells[g]["finite"] for g in good)
    assert s["faults"]["nan-grad"]["spike"]["recovers"] and s["faults"]["nan-grad"]["rollback"]["recovers"]


# --- the figures (src/gradclip_book/safety_figures.py) -----------------------------------------------


def test_every_run_has_its_own_colour_readable_on_both_pages():
    from gradclip_book import safety_figures as sf
    traces = sf.loss_explorer().traces
    colours = [t["line"]["color"].lower() for t in traces]
    assert len(traces) == len(safety.GUARDS) + 1 and len(set(colours)) == len(colours)
    assert not {"#000000", "#f0e442"} & set(colours)  # black vanishes on the dark page, yellow on the light one


def test_loss_note_words_match_the_drawn_curves():
    # "diverged" runs keep a finite loss to the last step, "NaN weights" runs end in a gap; the note names the
    # runs whose stored losses are identical (compared here on the raw stored curves, not the plotted bins)
    from gradclip_book import safety_figures as sf
    runs = safety.load()
    for fault, step in (("scaled", 200), ("nan-grad", 200), ("outliers", 50)):
        frame = sf.loss_frame(fault, step)
        note = " ".join(frame["note"])
        for trace, guard in zip(frame["traces"][1:], safety.GUARDS):
            line = runs[fault, guard, step, 0]
            if line["outcome"] == "diverged":
                assert trace["y"][-1] is not None and f"{sf.LABELS[guard]}: diverged" in note
            if line["outcome"] == "nan":
                assert trace["y"][-1] is None and f"{sf.LABELS[guard]}: NaN weights" in note
        raw = {g: [str(v) for v in runs[fault, g, step, 0]["loss"]] for g in safety.GUARDS}
        same = [(a, b) for a in raw for b in raw if a < b and raw[a] == raw[b]]
        for a, b in same:
            assert any(a in group and b in group for group in sf.coinciding(dict(zip(
                safety.GUARDS, [t["y"] for t in frame["traces"][1:]]))))
    assert ["activation", "loss"] in sf.coinciding({"activation": [1.0, None], "loss": [1.0, None],
                                                   "none": [1.0, 2.0]})


def test_accuracy_figure_labels_every_cell_including_nan():
    from gradclip_book import safety_figures as sf
    s = safety.summary()
    fig = sf.accuracy_figure()
    notes = {(a["x"], a["y"]): a["text"] for a in fig.layout["annotations"]}
    faults, guards = list(s["faults"]), list(safety.GUARDS)
    assert len(notes) == len(faults) * len(guards)
    for fi, fault in enumerate(faults):
        for gi, guard in enumerate(guards):
            cell = s["faults"][fault][guard]
            text = notes[fi, gi]
            if cell["accuracy"] is None:
                assert text.startswith("NaN") and f"{cell['outcomes'].count('nan')} of" in text
            else:
                assert text.startswith(f"{100 * cell['accuracy']:.1f}")


def test_outcomes_by_fault_step_come_from_the_grid_and_read_as_a_phrase():
    runs = safety.load()
    scaled = safety.by_fault_step("scaled")
    assert [step for step, _ in scaled] == list(safety.FAULT_STEPS)
    assert all(runs["scaled", "none", step, 0]["outcome"] == outcome for step, outcome in scaled)
    assert safety.step_phrase([(50, "nan"), (100, "finished"), (150, "nan")]) == \
        "nan at steps 50 and 150; finished at step 100"
    assert safety.step_phrase([(50, "nan"), (100, "nan"), (150, "nan")]) == "nan at steps 50, 100 and 150"


def test_the_grid_command_has_a_help_and_does_not_run_without_its_argument(tmp_path, capsys):
    # `python -m gradclip_book.safety --help` used to start recomputing (and rewriting) the stored grid
    with pytest.raises(SystemExit) as exit_info:
        safety.main(["--help"])
    assert exit_info.value.code == 0 and "rewrites the file" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        safety.main([])  # the argument is required
    assert exit_info.value.code == 2
    assert not (tmp_path / "x.jsonl.gz").exists()
