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


def _eager(fault: str, fault_step: int, steps: int, before_step, scaler=None) -> list[float]:
    """An independent eager loop: chapter 4's model, optimizer and batch order, the fault's batches, and
    ``before_step(params, optimizer)`` (torch's own clipping or a GradScaler) between backward and the step."""
    base = safety.BASE
    fault_row = safety.FAULTS[fault]

    with safety.harness.deterministic():
        parts = safety.harness.image_split(base.split_seed)
        model = cls.build_model(base)
        optimizer = cls.OPTIMIZERS[base.optimizer](list(model.parameters()), base.lr)
        config = safety.SafetyConfig(fault=fault, fault_step=fault_step, steps=steps)
        batches = safety._faulty_batches(*parts["train"], config, base, fault_row, fault_row.span)
        losses = []
        for _, (xb, yb, faulty) in zip(range(steps), batches):
            optimizer.zero_grad(set_to_none=True)
            z = model(xb)
            if faulty and fault_row.grad_factor is not None:
                z.register_hook(lambda g: g * fault_row.grad_factor)
            loss = torch.nn.functional.cross_entropy(z, yb)
            losses.append(float(loss.detach()))
            if scaler is None:
                loss.backward()
                before_step(list(model.parameters()), optimizer)
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
    return losses


def test_clip_threshold_is_the_recipe_on_the_clean_run():
    # chapter 4's recipe (90th percentile of the first 50 unclipped norms) at seed 0; chosen without any fault
    assert safety.recipe_threshold(seed=0) == safety.CLIP_MAX_NORM


def test_clip_guard_equals_torch_clipping_in_an_eager_loop():
    clip = lambda params, optimizer: torch.nn.utils.clip_grad_norm_(params, safety.CLIP_MAX_NORM)
    reference = _eager("outliers", 40, SHORT, clip)
    run = safety.train(safety.SafetyConfig(fault="outliers", guard="clip", fault_step=40, steps=SHORT))
    plain = safety.train(safety.SafetyConfig(fault="outliers", fault_step=40, steps=SHORT))
    assert run.loss[41] != plain.loss[41]  # the guard acted on the faulty step
    np.testing.assert_allclose(run.loss, reference, rtol=1e-5)


def test_clip_guard_without_a_fault_is_chapter_4s_norm_method():
    reference = cls.train(replace(safety.BASE, method="norm", threshold=safety.CLIP_MAX_NORM, steps=SHORT))
    run = safety.train(safety.SafetyConfig(guard="clip", steps=SHORT))
    plain = cls.train(replace(safety.BASE, steps=SHORT))
    assert 0 < reference.clip_fraction < 0.5 and run.loss != plain.loss  # the threshold clips a minority of steps
    assert run.loss == reference.loss and run.test_accuracy == reference.test_accuracy


def test_skip_guard_is_gradscalers_skip_on_inf():
    # GradScaler (CPU, its default scale 2**16, a power of two: scaling and unscaling are exact) skips the step whose
    # gradients hold an inf or NaN; the guard does the same without scaling, and so does clip+skip below its threshold
    scaler = torch.amp.GradScaler("cpu")
    reference = _eager("nan-grad", 40, SHORT, None, scaler=scaler)
    assert scaler.get_scale() == 2.0 ** 15  # it backed off once: one skipped step
    for guard in ("skip", "clip+skip"):
        run = safety.train(safety.SafetyConfig(fault="nan-grad", guard=guard, fault_step=40, steps=SHORT))
        assert run.spike_skips == 1 and run.finite and all(math.isfinite(v) for v in run.loss)
        if guard == "skip":
            np.testing.assert_allclose(run.loss, reference, rtol=1e-5)
    clip = safety.train(safety.SafetyConfig(fault="nan-grad", guard="clip", fault_step=40, steps=SHORT))
    assert clip.outcome == "nan"  # clipping alone scales a NaN norm's gradients into NaN weights


def test_clip_max_norm_override_is_the_clip_guard_at_that_threshold():
    config = safety.SafetyConfig(fault="outliers", guard="clip", fault_step=40, steps=SHORT)
    assert safety.train(config, clip_max_norm=safety.CLIP_MAX_NORM).loss == safety.train(config).loss
    clip = lambda params, optimizer: torch.nn.utils.clip_grad_norm_(params, 2.0)
    np.testing.assert_allclose(safety.train(config, clip_max_norm=2.0).loss, _eager("outliers", 40, SHORT, clip),
                               rtol=1e-5)


def test_clip_skip_equals_clip_when_every_norm_is_finite():
    runs = [safety.train(safety.SafetyConfig(fault="scaled", guard=g, fault_step=40, steps=SHORT))
            for g in ("clip", "clip+skip")]
    assert runs[0].loss == runs[1].loss and runs[1].spike_skips == 0


def test_recovery_rule_against_the_clean_seeds():
    s = safety.summary()
    runs = safety.load()
    clean = [runs["none", "none", -1, seed]["test_accuracy"] for seed in safety.SEEDS]
    assert s["clean_min"] == min(clean) and s["clean_max"] == max(clean) and len(clean) >= 5
    for fault, cells in s["faults"].items():
        for guard, cell in cells.items():
            accs = [runs[fault, guard, safety.DEFAULT_FAULT_STEP, seed]["test_accuracy"] for seed in safety.SEEDS]
            ok = all(a is not None and a >= safety.LOST_ACCURACY for a in accs) and statistics.fmean(accs) >= min(clean)
            assert cell["recovers"] == ok, (fault, guard)


def test_leave_one_seed_out_recomputes_the_rule_without_each_seed():
    s = safety.summary()
    n = len(safety.SEEDS)
    for fault, cells in s["faults"].items():
        for guard, cell in cells.items():
            hinges = []
            for drop, seed in enumerate(safety.SEEDS):   # by hand: the rule on the other seeds' numbers
                accs = [a for i, a in enumerate(cell["accuracies"]) if i != drop]
                clean = [a for i, a in enumerate(s["clean_seeds"]) if i != drop]
                ok = all(a is not None and a >= safety.LOST_ACCURACY for a in accs) and \
                    statistics.fmean(accs) >= min(clean)
                if ok != cell["recovers"]:
                    hinges.append(seed)
            assert cell["hinges_on"] == hinges, (fault, guard)
            # only a verdict no single seed decides is a recovery or a miss; the rest are fragile
            assert cell["verdict"] == ("fragile" if hinges else "recovers" if cell["recovers"] else "misses")
    # a verdict that one seed decides: the mean over three seeds passes only without the low one
    assert safety.leave_one_seed_out([0.95, 0.96, 0.90], [0.94, 0.95, 0.96]) == [False, False, True]
    assert safety.leave_one_seed_out([0.95, None, 0.96], [0.94, 0.95, 0.96]) == [False, True, False]
    assert safety.verdict([0.95, 0.96, 0.90], [0.94, 0.95, 0.96]) == "fragile"
    assert safety.verdict([0.95, 0.96, 0.97], [0.94, 0.95, 0.96]) == "recovers"
    assert safety.verdict([0.95, 0.90, 0.90], [0.94, 0.95, 0.96]) == "misses"
    assert n >= 5


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
    assert s["faults"]["nan-grad"]["skip"]["recovers"] and not s["faults"]["nan-grad"]["clip"]["recovers"]


# --- the figures (src/gradclip_book/safety_figures.py) -----------------------------------------------


def test_every_run_has_its_own_colour_readable_on_both_pages():
    from gradclip_book import safety_figures as sf
    traces = sf.loss_explorer().traces
    colours = [t["line"]["color"].lower() for t in traces]
    assert len(traces) == len(safety.GUARDS) + 1 and len(set(colours)) == len(colours)
    assert not {"#000000", "#f0e442"} & set(colours)  # black vanishes on the dark page, yellow on the light one
    # near colours (the two blues, orange and brown, vermillion and magenta) must differ in dash too: every line has
    # its own dash pattern but soft-capping, solid and thin beside clipping's wide solid blue
    dashes = {name: t["line"]["dash"] for name, t in zip(["clean", *safety.GUARDS], traces)}
    shared = {d for d in dashes.values() if list(dashes.values()).count(d) > 1}
    assert shared == {"solid"} and {n for n, d in dashes.items() if d == "solid"} == {"softcap", "clip"}
    assert dashes["clip"] == "solid" and sf.STYLES["clip"]["width"] > sf.STYLES["softcap"]["width"]


def test_loss_note_words_match_the_drawn_curves():
    # "diverged" runs keep a finite loss to the last step, "NaN weights" runs end in a gap; the note names the
    # runs whose stored losses are identical (compared here on the raw stored curves, not the plotted bins)
    from gradclip_book import safety_figures as sf
    runs = safety.load()
    for fault, step in (("scaled", 200), ("nan-grad", 200), ("outliers", 50), ("scaled", 50)):
        frame = sf.loss_frame(fault, step)
        note = " ".join(frame["note"])
        for trace, guard in zip(frame["traces"][1:], safety.GUARDS):
            line = runs[fault, guard, step, 0]
            if line["outcome"] == "diverged":
                finite_end = math.isfinite(float(line["loss"][-1]))
                assert (trace["y"][-1] is not None) == finite_end and f"{sf.LABELS[guard]}: diverged" in note
                assert ("line goes on" if finite_end else "line stops") in note
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
                assert ("✓" in text) == (cell["recovers"] and not cell["hinges_on"])   # fragile: no ✓
                assert ("*" in text) == bool(cell["hinges_on"])


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
    help_text = capsys.readouterr().out
    assert exit_info.value.code == 0 and "rewrites the file" in help_text and "--append" in help_text
    with pytest.raises(SystemExit) as exit_info:
        safety.main([])  # the argument is required
    assert exit_info.value.code == 2
    assert not (tmp_path / "x.jsonl.gz").exists()


def test_append_adds_the_missing_runs_of_new_seeds_and_keeps_stored_lines_byte_for_byte(tmp_path, monkeypatch):
    # the runs are replaced by a stand-in (a real one takes ~2 s); what is tested is which runs the command computes
    # and what it does to the stored lines
    import gzip

    computed = []

    def fake_train(config, clip_max_norm=None):
        computed.append(safety.key(config))
        return safety.SafetyRun(config=safety._config_dict(config), loss=[1.0, float("nan")], actions=["step"] * 2,
                                spike_skips=0, finite=True, test_accuracy=0.5 + config.base.seed / 100,
                                outcome="finished", seconds=0.0)

    monkeypatch.setattr(safety, "train", fake_train)
    path = tmp_path / "grid.jsonl.gz"
    stored = safety.grid_configs([0, 1])
    safety.grids.write_lines(path, [safety.to_json(fake_train(c)) for c in stored])
    before, before_bytes, computed[:] = gzip.open(path, "rt").read(), path.read_bytes(), []

    added = safety.append([1, 2], path, progress=False)   # seed 1 is complete already: only seed 2 is computed
    assert added == computed == [safety.key(c) for c in safety.grid_configs([2])]
    assert len(added) == len(safety.GUARDS) * len(safety.FAULTS)        # one run per fault (and none) x guard
    after = gzip.open(path, "rt").read()
    assert after.startswith(before) and len(after.splitlines()) == len(stored) + len(added)
    assert {safety.key(line["config"]) for line in safety.grids.load(path)} == \
        {safety.key(c) for c in safety.grid_configs([0, 1, 2])}
    assert safety.append([2], path, progress=False) == []                # nothing left to compute
    # interrupted: a gzip member cut off at the end loses only that run; the next call repairs the file first, so
    # the runs it appends can be read
    whole = gzip.open(path, "rt").read()
    with gzip.open(path, "ab") as out:
        out.write(b'{"config": {"fault": "none"')
    path.write_bytes(path.read_bytes()[:-7])
    added = safety.append([2, 3], path, progress=False)
    assert added == [safety.key(c) for c in safety.grid_configs([3])]
    assert gzip.open(path, "rt").read().startswith(whole)
    assert len(safety.grids.load(path)) == len(whole.splitlines()) + len(added)
    # the stored text of seeds 0 and 1 is the same text, in one gzip member as write_lines makes it
    again = tmp_path / "again" / path.name   # gzip's header holds the file's name
    again.parent.mkdir()
    safety.grids.write_lines(again, safety.grids.load(path)[: len(stored)])
    assert again.read_bytes() == before_bytes


def test_the_grid_has_whole_seeds_only():
    # every seed of the page has all its runs, and the file holds no run of a seed the page does not use
    runs = safety.load()
    by_seed = {}
    for fault, guard, step, seed in runs:
        by_seed.setdefault(seed, set()).add((fault, guard, step))
    assert sorted(by_seed) == sorted(safety.SEEDS)
    assert all(by_seed[seed] >= {safety.key(c)[:3] for c in safety.grid_configs([1])} for seed in by_seed)


# --- the stored guard costs (chapters/data/guard_costs.json) ---------------------------------------------


def test_guard_cost_timing_trains_every_step_under_every_guard():
    # a tiny case, re-measured: every guard's timed calls are full training steps (nothing skipped or undone), the
    # activation check reads the head's input, and the ratios are the stored formula
    from gradclip_book import guard_costs, step_costs

    def tiny(generator):
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        return model, torch.randn(16, 4, generator=generator), torch.randint(3, (16,)), None

    out = guard_costs.measure_case(step_costs.Case("tiny", "an MLP", 16, 1, "sgd", tiny), repeats=2, steps=3)
    assert set(out["ratio"]) == set(safety.GUARDS) | {guard_costs.CONTROL}
    assert out["not_stepped"] == {name: 0 for name in guard_costs.GUARD_NAMES}
    assert out["parameters"] == 4 * 8 + 8 + 8 * 3 + 3
    assert out["step_ms"] == pytest.approx((out["ms"]["none"] + out["ms"][guard_costs.CONTROL]) / 2)
    for name, ms in out["ms"].items():
        assert out["ratio"][name] == pytest.approx(ms / out["step_ms"])
        assert out["extra_ns_per_value"][name] == pytest.approx((ms - out["step_ms"]) * 1e6 / out["parameters"])


def test_guard_cost_measurement_stores_what_else_ran(monkeypatch):
    # each round keeps the load average after it, and the file says how the calls were ordered
    import os

    from gradclip_book import guard_costs, step_costs
    from gradclip_book.timing import interleaved

    def tiny(generator):
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        return model, torch.randn(16, 4, generator=generator), torch.randint(3, (16,)), None

    monkeypatch.setattr(guard_costs, "CASES", ((step_costs.Case("tiny", "an MLP", 16, 1, "sgd", tiny), 1),))
    monkeypatch.setattr(os, "getloadavg", lambda: (1.234, 2.0, 3.0))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)   # (the command's one thread, not the suite's)
    # the stored "order" names timing.interleaved: every round's calls go through it (the order it gives the
    # calls is tested in test_performance)
    timed = []
    monkeypatch.setattr(guard_costs, "interleaved", lambda *a, **k: timed.append(1) or interleaved(*a, **k))
    out = guard_costs.measure(rounds=2, progress=False)
    assert len(timed) == 2 and "(timing.interleaved)" in out["order"]
    assert [r["load"] for r in out["cases"][0]["rounds"]] == [1.23, 1.23]


def test_guard_cost_activation_hook_is_the_pages():
    # on the page's MLP the module hooked for the timing (the head's input) is the one the guard's own setup hooks
    model = cls.build_model(safety.BASE)
    guard = safety.GUARDS["activation"].build()
    guard.setup(model, None)
    assert list(model[-2]._forward_hooks.values()) == [guard._record]


def test_stored_guard_costs_are_documented_consistent_and_trained():
    from pathlib import Path

    from gradclip_book import guard_costs, shapes
    stored = guard_costs.load()
    assert [c["name"] for c in stored["cases"]] == [case.name for case, _ in guard_costs.CASES]
    assert stored["machine"]["cpu"] and stored["machine"]["threads"] == 1 and stored["rounds"] >= 3
    for case in stored["cases"]:
        assert set(case["ratio"]) == set(guard_costs.GUARD_NAMES)
        assert case["not_stepped"] == {name: 0 for name in guard_costs.GUARD_NAMES}
        assert case["step_ms"] == pytest.approx(statistics.median(r["step_ms"] for r in case["rounds"]))
        for name in guard_costs.GUARD_NAMES:
            per_round = case["rounds"]
            assert case["ratio"][name] == pytest.approx(statistics.median(r["ratio"][name] for r in per_round))
            for r in per_round:   # a plain step is the mean of the two unguarded copies, as relative() takes it
                assert r["step_ms"] == pytest.approx((r["ms"]["none"] + r["ms"][guard_costs.CONTROL]) / 2)
                assert r["ratio"][name] == pytest.approx(r["ms"][name] / r["step_ms"])
                assert guard_costs.relative(r)[name] == pytest.approx(r["ratio"][name])
    assert stored["cases"][-1]["parameters"] == shapes.RESNET50_NUMEL
    readme = (Path(__file__).resolve().parents[2] / "chapters" / "data" / "README.md").read_text(encoding="utf-8")
    assert guard_costs.COMMAND in readme and guard_costs.RESULTS_FILE.name in readme
    with pytest.raises(FileNotFoundError, match="gradclip_book.guard_costs"):
        guard_costs.load("/no/such/guard_costs.json")
