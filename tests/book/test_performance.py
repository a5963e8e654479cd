"""Chapter 5.1: the harness's warm-up, the optimization grid, gradclip_book.performance and its figures."""

from __future__ import annotations

import importlib.util
import random
import statistics
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradclip
from gradclip_book import classification as cls, harness
from gradclip_book import grids
from gradclip_book import performance as perf
from gradclip_book import performance_figures as pf
from gradclip_book import timing
from gradclip_book.classification import RunConfig, code_version, compact, config_key, train
from gradclip_book.reproducibility import rerun_differences

HINT = f"recompute it with `{grids.OPTIMIZATION_COMMAND}` (then update chapters/data/README.md)"
ROOT = Path(__file__).resolve().parents[2]


# --- warm-up in the harness ---------------------------------------------------------------------------


def test_warmup_zero_reproduces_the_stored_chapter_4_records():
    """warmup=0 is the harness as it was: stored chapter-4 runs come back identical, curve for curve."""
    lines = grids.load(grids.CLASSIFICATION_FILE)
    assert lines, f"no chapter 4 grid; run `{grids.COMMAND}`"
    cheap = [line for line in lines if line["config"]["depth"] <= 8 and line["config"]["steps"] == 300]
    for line in random.Random(51).sample(cheap, 2):
        assert line["config"]["warmup"] == 0
        fresh = compact(train(RunConfig(**line["config"])))
        fresh = {key: fresh[key] for key in ("steps_run", "diverged_at", "test_accuracy", "val_accuracy", "loss",
                                             "grad_norm", "clipped", "curve_step")}
        # bit for bit on the grids' kind of machine, the first steps elsewhere (gradclip_book.reproducibility)
        assert not rerun_differences(fresh, line), (rerun_differences(fresh, line)[:5], line["config"])


def _reference_losses(config: RunConfig) -> list[float]:
    """The harness's loop written with torch's own LambdaLR scheduler for the warm-up (the reference)."""
    with harness.deterministic():
        x, y = harness.image_split(config.split_seed)["train"]
        model = cls.build_model(config)
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: min(1.0, (t + 1) / config.warmup))
        batches = harness.batch_indices(len(y), config.batch, config.seed)
        losses = []
        for _ in range(config.steps):
            index = next(batches)
            loss = nn.functional.cross_entropy(model(x[index]), y[index])
            losses.append(float(loss.detach()))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return losses


def test_warmup_is_linear_like_torchs_lambda_scheduler():
    config = RunConfig(depth=3, width=16, lr=0.5, warmup=7, steps=15, seed=2)
    record = train(config)
    np.testing.assert_allclose(record.loss, _reference_losses(config), rtol=1e-5, atol=1e-7)
    # and it matters: without warm-up the same run takes other steps from the second one on
    plain = train(replace(config, warmup=0))
    assert plain.loss[0] == record.loss[0] and plain.loss[1] != record.loss[1]


def test_warmup_is_part_of_the_identity_and_checked():
    assert config_key(RunConfig(warmup=0)) != config_key(RunConfig(warmup=50))
    with pytest.raises(ValueError, match="warmup"):
        RunConfig(warmup=-1)


# --- the optimization grid -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def opt_lines():
    lines = grids.load(grids.OPTIMIZATION_FILE)
    assert lines, f"{grids.OPTIMIZATION_FILE} is missing: {HINT}"
    return lines


def test_optimization_grid_is_current_and_complete(opt_lines):
    assert {line["code_version"] for line in opt_lines} == {code_version()}, HINT
    wanted = [config_key(c) for _, c in grids.optimization_configs()]
    assert len(wanted) == len(set(wanted)) <= 360   # 330 runs at 5 seeds: about 25 min on one core
    assert set(wanted) <= {line["key"] for line in opt_lines}, HINT
    for line in opt_lines:
        assert line["key"] == config_key(RunConfig(**line["config"]))


def test_optimization_grid_records_match_a_rerun(opt_lines):
    short = [line for line in opt_lines if line["config"]["steps"] == grids.HARD.steps]
    for line in random.Random(5).sample(short, 3):
        fresh = compact(train(RunConfig(**line["config"])))
        # every field bit for bit on the grid's kind of machine, the first steps elsewhere (reproducibility)
        assert not rerun_differences(fresh, line), (rerun_differences(fresh, line)[:5], line["config"], HINT)


def test_readme_documents_the_optimization_grid():
    text = (grids.OPTIMIZATION_FILE.parent / "README.md").read_text(encoding="utf-8")
    assert grids.OPTIMIZATION_COMMAND in text and grids.OPTIMIZATION_FILE.name in text


# --- the analysis ------------------------------------------------------------------------------------


def test_steps_to_loss_matches_a_moving_average_of_the_raw_losses():
    record = train(RunConfig(depth=2, steps=120, lr=0.1))
    stored = compact(record)  # 120 steps <= 150 points: one point per step
    assert stored["curve_step"] == list(range(120))
    losses = np.array(record.loss)
    window, target = 10, float(np.median(losses))
    moving = np.convolve(losses, np.ones(window) / window, mode="valid")  # moving[i]: steps i .. i + window - 1
    expected = int(np.argmax(moving <= target)) + window
    assert perf.steps_to_loss(stored, target, window) == expected
    assert perf.steps_to_loss(stored, -1.0, window) is None


def test_steps_to_loss_weights_unequal_bins_by_their_length():
    run = {"curve_step": [0, 1, 4], "loss": [9.0, 1.0, 0.0], "steps_run": 5}
    # after 4 steps the window holds bin 0 (1 step of 9) and bin 1 (3 steps of 1): mean 3;
    # after 5 steps it holds bins 1 and 2 (4 steps: 3 of 1, 1 of 0): mean 0.75
    assert perf.steps_to_loss(run, 3.0, window=4) == 4
    assert perf.steps_to_loss(run, 1.0, window=4) == 5
    assert perf.steps_to_loss(run, 0.5, window=4) is None


def test_usable_lrs_and_best_lr():
    cells = {"lrs": [0.1, 1.0, 2.0], "accuracy": [[0.95, None, 0.1], [0.5, 0.92, None], [0.95, 0.2, 0.91]]}
    assert perf.usable_lrs(cells) == {"none": [0.1], "clipped": [0.1, 1.0, 2.0]}
    good = {"diverged_at": None, "test_accuracy": 0.95, "val_accuracy": 0.95}
    better = {"diverged_at": None, "test_accuracy": 0.97, "val_accuracy": 0.97}
    bad = {"diverged_at": 3, "test_accuracy": None, "val_accuracy": None}
    assert perf.best_lr({0.1: [good, good], 0.2: [better, good], 0.4: [better, bad]}) == 0.2
    assert perf.best_lr({0.4: [bad]}) is None
    # the choice is made on validation: a better test accuracy does not pick the lr
    test_only = {"diverged_at": None, "test_accuracy": 0.99, "val_accuracy": 0.91}
    assert perf.best_lr({0.1: [good, good], 0.2: [test_only, test_only]}) == 0.1


def test_fixed_threshold_is_chosen_on_validation_and_counted_on_test():
    # validation prefers 1.0 (two lrs >= 90%), test would prefer 0.1: the choice follows validation
    cells = {"lrs": [0.1, 1.0], "thresholds": [None, 0.1, 1.0],
             "accuracy": [[0.5, None], [0.95, 0.95], [0.95, 0.5]],
             "val_accuracy": [[0.5, None], [0.95, 0.5], [0.95, 0.91]]}
    fixed = perf.fixed_threshold(cells)
    assert fixed["threshold"] == 1.0 and fixed["lrs"] == [0.1] and fixed["largest"] == 2
    assert fixed["per_threshold"] == {0.1: [0.1, 1.0], 1.0: [0.1]}
    # a tie on the count goes to the higher mean validation accuracy, a diverged run counting 0
    cells["val_accuracy"] = [[0.5, None], [0.95, None], [0.91, 0.2]]
    assert perf.fixed_threshold(cells)["threshold"] == 1.0


def test_one_fixed_threshold_trains_at_fewer_lrs_than_a_threshold_per_lr():
    """Issue 24: at depth 16 the stored grid gives at most 3 of 6 lrs per fixed global-norm threshold, 5 of 6 only
    with a threshold per lr; counted here from the raw grid lines, independently of performance.py."""
    per_threshold, val_ok = {}, {}
    for line in grids.load(grids.CLASSIFICATION_FILE):
        c = line["config"]
        if (c["depth"], c["seed"], c["steps"], c["warmup"], c["method"]) != (16, 0, 300, 0, "norm") \
                or c["lr"] not in grids.LRS or c["threshold"] not in grids.THRESHOLDS["norm"]:
            continue
        ok = line["diverged_at"] is None and float(line["test_accuracy"]) >= perf.TRAINS
        per_threshold.setdefault(c["threshold"], set()).update({c["lr"]} if ok else set())
        val_ok.setdefault(c["threshold"], 0)
        val_ok[c["threshold"]] += line["diverged_at"] is None and float(line["val_accuracy"]) >= perf.TRAINS
    fixed = perf.fixed_threshold(perf.heatmap_cells(16, "norm"))
    assert {t: set(v) for t, v in fixed["per_threshold"].items()} == per_threshold
    assert fixed["largest"] == max(len(v) for v in per_threshold.values()) == 3
    assert val_ok[fixed["threshold"]] == max(val_ok.values())
    assert len(set().union(*per_threshold.values())) == 5 == len(perf.usable_lrs(perf.heatmap_cells(16, "norm"))["clipped"])


def test_heatmap_cells_are_the_stored_accuracies():
    cells = perf.heatmap_cells(grids.HARD.depth, "norm")
    from gradclip_book import classification_figures as cf
    for i, t in enumerate(cells["thresholds"]):
        for j, lr in enumerate(cells["lrs"]):
            run = cf.grid_run(grids.HARD.depth, lr, "none" if t is None else "norm", t)
            assert cells["accuracy"][i][j] == (None if run["test_accuracy"] is None else float(run["test_accuracy"]))
            assert cells["val_accuracy"][i][j] == (None if run["val_accuracy"] is None else float(run["val_accuracy"]))


def test_heatmap_explorer_frames_spot_checked_against_the_grid():
    explorer = pf.heatmap_explorer()
    assert explorer.params[0].control == "slider" and explorer.params[1].control == "buttons"
    for values in explorer.sample(4, seed=2):
        z = explorer.frame(**values)["traces"][0]["z"]
        cells = perf.heatmap_cells(values["depth"], values["method"])
        for row, stored in zip(z, cells["accuracy"]):
            assert row == [None if a is None else pytest.approx(100 * a, abs=0.051) for a in stored]


def test_warmup_and_optimizer_summaries_read_the_grid(opt_lines):
    summary = perf.warmup_summary(grids.HARD_THRESHOLD)
    assert set(summary) == set(perf.WARMUP_ARMS)
    runs = perf.opt_runs(grids.SGD_LRS[-1], None)  # the largest lr, no clipping, no warm-up
    assert summary["neither"]["mean_accuracy"][grids.SGD_LRS[-1]] == pytest.approx(
        np.mean([float(r["test_accuracy"] or 0) for r in runs]))
    adam = perf.optimizer_summary()
    assert set(adam) == {"sgd", "adam"} and set(adam["adam"]) == set(grids.OPT_THRESHOLDS)
    assert set(adam["adam"][None]["mean_accuracy"]) == set(grids.ADAM_LRS)


def test_warmup_verdicts_recounted_from_the_raw_lines(opt_lines):
    """The warm-up section's comparisons at the lrs chosen on validation, by the seed-spread rule written out here
    (gap in means > both sample standard deviations, over the 5 seeds), from the raw lines."""
    assert len(grids.OPT_SEEDS) == 5
    by_setting = defaultdict(dict)
    for line in opt_lines:
        c = line["config"]
        if c["optimizer"] == "sgd" and c["depth"] == 16:
            by_setting[c["warmup"], c["threshold"], c["lr"]][c["seed"]] = line
    for t in (0.1, 1.0):
        arms = {"neither": (0, None), "warm-up": (50, None), "clipping": (0, t), "both": (50, t)}
        values = {}
        for arm, (w, tt) in arms.items():
            runs = {lr: [by_setting[w, tt, lr][s] for s in grids.OPT_SEEDS] for lr in grids.SGD_LRS}
            val = {lr: np.mean([float(r["val_accuracy"] or 0) for r in rs]) for lr, rs in runs.items()}
            lr = max(val, key=lambda lr: (val[lr], lr))
            assert all(r["diverged_at"] is None for r in runs[lr])
            values[arm] = np.array([float(r["test_accuracy"]) for r in runs[lr]])
            assert perf.arm_score(arm, t, lr).values == pytest.approx(tuple(values[arm]))
        wins = [(a, b) for a in arms for b in arms if a != b and
                values[a].mean() - values[b].mean() > max(values[a].std(ddof=1), values[b].std(ddof=1))]
        assert perf.verdict({a: perf.arm_score(a, t, perf.warmup_summary(t)[a]["chosen_lr"]) for a in arms}) == wins
        assert wins == ([] if t == 0.1 else [("both", "clipping")])


# --- the benchmark ------------------------------------------------------------------------------------


def _load_benchmark_timing():
    spec = importlib.util.spec_from_file_location("bench_timing", ROOT / "benchmarks" / "timing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_interleaved_alternates_the_calls_and_takes_medians(monkeypatch):
    """On a fake clock: warm-up calls first, then the candidates in turn (reversed every other round),
    ``before`` ahead of each timed call."""
    clock = {"now": 0.0}
    calls: list[str] = []
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["now"])

    def make(name, costs):
        it = iter(costs)

        def fn():
            calls.append(name)
            clock["now"] += next(it)
        return fn

    functions = {"a": make("a", [9, 1, 2, 3, 50]), "b": make("b", [9, 4, 4, 4, 1])}
    medians = timing.interleaved(functions, 4, before=lambda: calls.append("before"))
    assert medians == {"a": 2500.0, "b": 4000.0}
    assert calls == ["a", "b"] + ["before", "a", "before", "b", "before", "b", "before", "a"] * 2
    # the benchmarks time with the same function, and so do chapters 5.1-5.3
    assert _load_benchmark_timing().interleaved is timing.interleaved is perf.interleaved


def test_paired_ratio_sees_through_a_machine_that_slows_down_mid_run(monkeypatch):
    """b costs twice a; the machine turns 10x slower from the sixth timed call (round 2's second call) on.
    The ratio of the medians says 20; the median of the per-round ratios says 2."""
    clock = {"now": 0.0}
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["now"])
    slowdown = iter([1, 1] + [1] * 5 + [10] * 5)  # two warm-up calls, then ten timed calls

    def make(cost):
        def fn():
            clock["now"] += cost * next(slowdown)
        return fn

    times = timing.interleaved_times({"a": make(1.0), "b": make(2.0)}, 5)
    assert times == {"a": [1000.0, 1000.0, 1000.0, 10000.0, 10000.0],
                     "b": [2000.0, 2000.0, 20000.0, 20000.0, 20000.0]}
    assert statistics.median(times["b"]) / statistics.median(times["a"]) == 20.0
    assert timing.paired_ratio(times, "b", "a") == 2.0
    with pytest.raises(ValueError):  # rounds must pair up
        timing.paired_ratio({"a": [1.0], "b": [1.0, 2.0]}, "a", "b")


def test_the_hand_written_patterns_agree_with_torch_and_the_reference():
    from support.references import timm_adaptive_clip_grad
    a, b = perf.small_tensors(30, seed=7), perf.small_tensors(30, seed=7)
    norm = perf.loop_clip_(a, 0.5)
    expected = torch.nn.utils.clip_grad_norm_(b, 0.5)
    assert float(norm) == pytest.approx(float(expected), rel=1e-5)
    assert all(torch.allclose(p.grad, q.grad, rtol=1e-5) for p, q in zip(a, b))
    a, b = perf.model_shaped(seed=1)[:6], perf.model_shaped(seed=1)[:6]
    perf.loop_agc_(a, 0.01)
    timm_adaptive_clip_grad(b, 0.01)
    assert all(torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-8) for p, q in zip(a, b))
    assert sum(p.numel() for p in perf.model_shaped()) == (64 * 3 * 7 * 7 + 16 * 128 * 128 * 9 + 8 * 512 * 128
                                                       + 40 * 128 + 1000 * 512 + 1000)


def test_benchmark_rows_and_words():
    result = perf.benchmark(repeats=1)
    assert len(result["rows"]) == 6 and result["machine"]["cpus"] >= 1 and result["machine"]["cpu"]
    for row in result["rows"]:
        assert row["ms"] > 0 and row["ratio"] == pytest.approx(row["reference_ms"] / row["ms"])
    html = pf.benchmark_table_html(result)
    assert perf.describe_machine(result["machine"]) in html.replace("&amp;", "&")
    # a long name breaks after "." and "_" but not after its last character; the table is set small
    assert ">torch.<wbr>nn.<wbr>utils.<wbr>clip_<wbr>grad_<wbr>norm_</td>" in html
    assert html.startswith('<div style="font-size:0.9em"><table') and html.endswith("</table></div>")
    assert perf.speed_words(1.04) == "is as fast as" and perf.speed_words(1.5).startswith("is 1.5 times")
    assert perf.speed_words(0.5) == "takes 2.0 times as long as"
    assert perf.overhead_words(0.2) == "adds about 20% to" and "no cost" in perf.overhead_words(0.0)


def test_lrs_words_names_the_set_and_scan_counts_every_seed():
    scan = list(grids.SGD_LRS)
    assert perf.lrs_words([0.5, 1.0], scan) == "0.5 and 1 (2 of 8)"  # neighbours, but only two: no "to"
    assert perf.lrs_words([0.05, 0.1, 0.2], scan) == "0.05 to 0.2 (3 of 8)"
    assert perf.lrs_words([0.0125, 0.5, 1.0], scan) == "0.0125, 0.5 and 1 (3 of 8)"
    summary = perf.warmup_summary(grids.HARD_THRESHOLD)["both"]
    for lr in grids.SGD_LRS:  # a learning rate is in the set exactly when all its seeds train (chapter 4's rule)
        runs = perf.opt_runs(lr, grids.HARD_THRESHOLD, grids.WARMUP_STEPS)
        trained = sum(r["diverged_at"] is None and float(r["test_accuracy"] or 0) >= 0.9 for r in runs)
        assert summary["trained"][lr] == trained
        assert (lr in summary["stable_lrs"]) == (trained == len(runs))


def test_live_heatmap_frame_trains_exactly_the_stored_runs_it_replaces(monkeypatch):
    # The live frame's trainings are the grid's own configs (the stored runs re-train exactly, above); so with
    # each training answered from the grid, the live frame must be the stored frame, cell for cell.
    from types import SimpleNamespace

    from gradclip_book import classification_figures as cf

    trained = []

    def from_the_grid(config):
        trained.append(config)
        run = cf.run_of(config)
        return SimpleNamespace(test_accuracy=run["test_accuracy"], val_accuracy=run["val_accuracy"],
                               diverged=run["diverged_at"] is not None)

    monkeypatch.setattr(pf.cls, "train", from_the_grid)
    for depth, method in [(grids.HARD.depth, "norm"), (min(grids.DEPTHS), "agc")]:
        assert pf.live_heatmap_frame(depth, method) == pf.heatmap_frame(depth, method)
    assert len(trained) == 2 * len(grids.LRS) * (1 + len(grids.THRESHOLDS["norm"]))


# --- the stored step costs (chapters/data/step_costs.json) ---------------------------------------------


def test_resnet50_has_the_shapes_the_benchmarks_clip():
    from gradclip_book import shapes, step_costs
    spec = importlib.util.spec_from_file_location("bench_shapes", ROOT / "benchmarks" / "shapes.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.resnet50_shapes is shapes.resnet50_shapes          # one list, shared, not a copy
    with torch.device("meta"):                                     # shapes only: nothing allocated, fast
        model = step_costs.resnet50()
        assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 1000)
    assert [tuple(p.shape) for p in model.parameters()] == shapes.resnet50_shapes()
    assert sum(p.numel() for p in model.parameters()) == shapes.RESNET50_NUMEL


def test_measure_case_clips_at_every_timed_call(monkeypatch):
    from gradclip_book import step_costs
    calls = []
    original = step_costs.gradclip.clip_grad_norm_

    def recording(params, max_norm, *args, **kwargs):
        norm = original(params, max_norm, *args, **kwargs)
        calls.append((float(norm), max_norm))
        return norm

    monkeypatch.setattr(step_costs.gradclip, "clip_grad_norm_", recording)

    def tiny(generator):
        return nn.Linear(4, 3), torch.randn(8, 4, generator=generator), torch.randint(3, (8,)), \
            nn.functional.cross_entropy

    out = step_costs.measure_case(step_costs.Case("tiny", "a linear layer", 8, 1, "sgd", tiny), repeats=3)
    assert len(calls) == 2 * (1 + 3)                    # step with clipping and the call alone, warm-up + timed
    # the timed calls fire (the call alone after the untimed doubling); the first two are the untimed warm-ups
    assert all(norm > 1.5 * max_norm for norm, max_norm in calls[2:])
    assert out["parameters"] == 15 and out["clip_share"] == pytest.approx(out["clip_ms"] / out["step_ms"])
    assert out["overhead"] == pytest.approx(out["step_clip_ms"] / out["step_ms"] - 1)


def test_stored_step_costs_are_documented_and_cover_the_cases():
    from gradclip_book import step_costs
    stored = step_costs.load()
    assert [c["name"] for c in stored["cases"]] == [c.name for c in step_costs.CASES]
    assert stored["machine"]["cpu"] and stored["rounds"] >= 3
    for case in stored["cases"]:
        for key in ("step_ms", "clip_ms", "clip_share"):
            assert case[key] == pytest.approx(float(np.median([r[key] for r in case["rounds"]])))
    readme = (ROOT / "chapters" / "data" / "README.md").read_text(encoding="utf-8")
    assert step_costs.COMMAND in readme and step_costs.RESULTS_FILE.name in readme
    with pytest.raises(FileNotFoundError, match="gradclip_book.step_costs"):
        step_costs.load(ROOT / "no-such-file.json")
