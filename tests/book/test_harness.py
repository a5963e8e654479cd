"""The book's one experiment harness (gradclip_book.harness): loop, methods, selection, curves, grids, models."""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import gradclip
from gradclip_book import harness as H
from gradclip_book.harness import curves, grid, select


def _parts():
    return H.image_split()


def _run(model=None, steps=20, seed=0, lr=0.05, optimizer="sgd", **kwargs):
    model = model or H.build("mlp", depth=2, width=16, seed=seed)
    opt = H.make_optimizer(optimizer, model.parameters(), lr)
    return H.train(model, opt, H.minibatches(*_parts()["train"], 64, seed), steps, **kwargs)


# --- the loop ----------------------------------------------------------------------------------------


def test_same_arguments_same_run_bit_for_bit():
    a = _run(method="autoclip", threshold=25.0, seed=3)
    b = _run(method="autoclip", threshold=25.0, seed=3)
    assert a.loss == b.loss and a.grad_norm == b.grad_norm and a.clipped == b.clipped
    assert _run(seed=4).loss != a.loss


def test_matches_a_hand_written_loop():
    # an independent loop: forward, backward, clip_grad_norm_, SGD step, on the same batches
    torch.set_num_threads(1)
    reference = H.build("mlp", depth=2, width=16, seed=1)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    batches = H.minibatches(*_parts()["train"], 32, 1)
    expected = []
    for _ in range(15):
        x, y = next(batches)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(reference(x), y)
        expected.append(float(loss.detach()))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        opt.step()
    model = H.build("mlp", depth=2, width=16, seed=1)
    run = H.train(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                  H.minibatches(*_parts()["train"], 32, 1), 15, method="norm", threshold=0.5)
    assert run.loss == pytest.approx(expected, rel=1e-5)
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(model.parameters(), reference.parameters()))


def test_a_diverged_run_stops_without_updating_on_its_batch():
    model = H.build("mlp", depth=2, width=16, seed=0)
    seen = []

    class Snap(H.Hook):
        def after_forward(self, step):
            seen.append([p.detach().clone() for p in step.model.parameters()])

    run = H.train(model, torch.optim.SGD(model.parameters(), lr=0.1), H.minibatches(*_parts()["train"], 64, 0), 10,
                  loss_fn=lambda m, b: H.classification_loss(m, b) * (1e6 if len(seen) == 4 else 1.0),
                  hooks=[Snap()], evaluate=H.accuracy_evaluator(_parts()))
    assert run.diverged_at == 4 and run.steps_run == 4 and len(run.loss) == 5 and len(run.grad_norm) == 4
    assert run.metrics == {} and run.metric("val_accuracy") is None
    assert all(torch.equal(a, p) for a, p in zip(seen[-1], model.parameters()))  # no update after step 4's loss
    assert not H.is_diverged(H.DIVERGED_LOSS) and H.is_diverged(math.inf) and H.is_diverged(math.nan)


def test_divergence_none_never_stops_and_hooks_can_skip_and_stop():
    class Guard(H.Hook):
        def after_forward(self, step):
            step.skip = step.index in (2, 3)
            step.stop = step.index == 6

    run = _run(steps=20, divergence=None, hooks=[Guard()])
    assert run.skipped == [False, False, True, True, False, False, False]
    assert run.stopped_at == 6 and run.steps_run == 7 and math.isnan(run.grad_norm[2])


def test_warmup_and_schedule_set_every_group():
    model = H.build("mlp", depth=1, width=8)
    opt = torch.optim.SGD([{"params": [model[0].weight], "lr": 0.1}, {"params": list(model[2].parameters()) +
                                                                        [model[0].bias], "lr": 0.01}])
    lrs = []

    class Record(H.Hook):
        def before_step(self, step):
            lrs.append([g["lr"] for g in step.optimizer.param_groups])

    H.train(model, opt, H.minibatches(*_parts()["train"], 64, 0), 6, warmup=4, schedule=lambda t: 0.5 ** t,
            hooks=[Record()])
    factors = [H.warmup_factor(t, 4) * 0.5 ** t for t in range(6)]
    assert lrs == [pytest.approx([0.1 * f, 0.01 * f]) for f in factors]


def test_hook_moments_see_raw_then_clipped_gradients():
    norms = {}

    class Look(H.Hook):
        def after_backward(self, step):
            norms.setdefault("raw", []).append(float(gradclip.get_total_norm([p.grad for p in step.model.parameters()])))

        def before_step(self, step):
            norms.setdefault("clipped", []).append(float(gradclip.get_total_norm([p.grad for p in step.model.parameters()])))

    run = _run(steps=5, method="norm", threshold=0.1, hooks=[Look()])
    assert norms["raw"] == pytest.approx(run.grad_norm, rel=1e-6)
    assert all(c == pytest.approx(min(r, 0.1), rel=1e-4) for r, c in zip(norms["raw"], norms["clipped"]))


def test_batch_sources():
    x, y = _parts()["train"]
    few = [(x[:8], y[:8]), (x[8:16], y[8:16])]
    model = H.build("mlp", depth=1, width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert H.train(model, opt, few, 5).steps_run == 5                                # a list: epoch after epoch
    assert H.train(model, opt, lambda: iter(few), 5).steps_run == 5                  # a factory
    with pytest.raises(ValueError, match="ran out"):
        H.train(model, opt, iter(few), 5)                                            # a one-shot iterator
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:40], y[:40]), batch_size=16)
    assert H.train(model, opt, loader, 7).steps_run == 7


def test_a_loss_without_graph_is_not_backpropagated():
    # a loss_fn that fills .grad itself (as DP-SGD's per-sample clipping does) returns a detached loss
    def filled(model, batch):
        x, y = batch
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        for p in model.parameters():
            p.grad.mul_(2.0)
        return loss.detach()

    doubled = _run(steps=3, loss_fn=filled, lr=0.01)
    plain = _run(steps=1, lr=0.01)
    assert doubled.grad_norm[0] == pytest.approx(2 * plain.grad_norm[0], rel=1e-6)


def test_evaluation_runs_in_eval_mode_and_training_resumes():
    modes = []

    def evaluate(model):
        modes.append(model.training)
        return {"val_accuracy": H.accuracy(model, *_parts()["validation"])}

    model = H.build("plain_cnn", depth=1, width=4, norm="batch")
    run = _run(model=model, steps=4, evaluate=evaluate, eval_every=2)
    assert modes == [False, False] and model.training          # every 2 steps, the last one reused at the end
    assert [s for s, _ in run.evals] == [2, 4] and run.metrics == run.evals[-1][1]


@pytest.mark.parametrize("method,threshold", [("none", None), ("value", 1e-3), ("norm", 0.1), ("agc", 0.01),
                                              ("autoclip", 50.0), ("zclip", 2.0), ("soft", 0.1),
                                              ("spike-guard", 3.0)])
def test_every_method_reports_the_raw_global_norm(method, threshold):
    norms = []

    class Raw(H.Hook):
        def after_backward(self, step):
            norms.append(float(gradclip.get_total_norm([p.grad for p in step.model.parameters()])))

    run = _run(steps=4, method=method, threshold=threshold, hooks=[Raw()])
    assert run.grad_norm == pytest.approx(norms, rel=1e-6)
    if method == "none":
        assert not any(run.clipped)
    if method == "norm":
        assert run.clipped == [n > threshold for n in norms]


def test_bind_refuses_a_threshold_that_does_not_fit():
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="threshold must be None"):
        H.bind("none", model, opt, 1.0)
    with pytest.raises(ValueError, match="method must be one of"):
        H.bind("clip", model, opt, 1.0)


def test_update_lengths_obey_their_bounds():
    lr, c = 0.1, 0.05
    plain, momentum = H.UpdateStats(), H.UpdateStats()
    model = H.build("mlp", depth=2, width=16)
    H.train(model, torch.optim.SGD(model.parameters(), lr=lr), H.minibatches(*_parts()["train"], 64, 0), 30,
            method="norm", threshold=c, hooks=[plain])
    assert max(plain.update) <= lr * c * 1.0001 and max(plain.clipped_norm) <= c * 1.0001
    model = H.build("mlp", depth=2, width=16)
    H.train(model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), H.minibatches(*_parts()["train"], 64, 0),
            30, method="norm", threshold=c, hooks=[momentum])
    assert max(momentum.update) > 1.5 * lr * c                       # momentum exceeds eta c ...
    assert max(momentum.update) <= lr * c / (1 - 0.9) * 1.0001       # ... but never eta c / (1 - beta)


def test_layer_stats_relative_step_is_update_over_weight():
    model = H.build("mlp", depth=2, width=8)
    stats = H.LayerStats(model, every=2)
    before = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    _run(model=model, steps=1, hooks=[stats])
    moved = torch.cat([(model[0].weight - before[0]).flatten(), (model[0].bias - before[1]).flatten()]).norm()
    weight = torch.cat([before[0].flatten(), before[1].flatten()]).norm()
    assert stats.steps == [0] and stats.relative["0"][0] == pytest.approx(float((moved / weight).detach()), rel=1e-5)


# --- models ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["plain_cnn", "residual_cnn"])
@pytest.mark.parametrize("norm", [None, "batch", "group"])
def test_cnn_factories(name, norm):
    model = H.build(name, depth=4, width=8, norm=norm, seed=0)
    counts = H.count_layers(model)
    assert counts["conv"] == 5 and counts["linear"] == 1 and counts["norm"] == (0 if norm is None else 5)
    assert tuple(model(torch.zeros(3, 64)).shape) == (3, 10)
    conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][2]
    assert float(conv.weight.detach().std()) == pytest.approx(math.sqrt(2 / (8 * 9)), rel=0.15)   # He: N(0, 2 / fan-in)


def test_residual_depth_must_be_even():
    with pytest.raises(ValueError, match="even"):
        H.build("residual_cnn", depth=3)


# --- selection -----------------------------------------------------------------------------------------


def test_selection_rule():
    choice = H.select_best([(0.01, [0.9, 0.9]), (0.03, [0.9, 0.9]), (0.1, [0.99, None]), (0.3, [None, None])])
    assert choice.best.setting == 0.01                                    # exact tie: the first listed
    assert [s.setting for s in choice.ranked] == [0.01, 0.03, 0.1, 0.3]   # a diverged seed ranks below
    assert H.select_best({"a": [1.0, 1.2], "b": [0.9, 1.0]}, mode="min").best.setting == "b"
    with pytest.raises(ValueError, match="mode"):
        H.select_best({"a": [1.0]}, mode="best")


# Chapter 5.2's grid at 10 seeds, batch 64, seed 3 left out: validation accuracy of the unclipped runs at lr 0.0125
# and 0.025. Both add up to 8.56389 exactly (3,083 of 9 x 360 validation images), but in binary floating point, whatever
# the summation (fsum, pairwise, in seed order), the second mean comes out 2 ulp above the first.
TIE_LOW_LR = [0.97778, 0.95556, 0.95, 0.94444, 0.94722, 0.94167, 0.95, 0.94722, 0.95]
TIE_HIGH_LR = [0.93889, 0.95, 0.94444, 0.96389, 0.94722, 0.95833, 0.95556, 0.95, 0.95556]


def test_a_tie_of_exact_totals_is_a_tie_whatever_the_float_rounding():
    import statistics
    from fractions import Fraction

    assert statistics.fmean(TIE_LOW_LR) < statistics.fmean(TIE_HIGH_LR)                 # the float means differ...
    assert sum(round(360 * v) for v in TIE_LOW_LR) == sum(round(360 * v) for v in TIE_HIGH_LR) == 3083   # ...not the data
    assert H.exact_mean(TIE_LOW_LR) == H.exact_mean(TIE_HIGH_LR) == H.exact_mean(TIE_HIGH_LR[::-1])
    for mode in ("max", "min"):
        for a, b in ((TIE_LOW_LR, TIE_HIGH_LR), (TIE_HIGH_LR, TIE_LOW_LR), (TIE_LOW_LR[::-1], TIE_HIGH_LR)):
            assert H.select_best([("first", a), ("second", b)], mode=mode).best.setting == "first"   # listed first
    assert H.score("a", TIE_LOW_LR).mean == H.score("b", TIE_HIGH_LR).mean == float(Fraction("8.56389") / 9)


def test_every_choice_by_a_mean_over_seeds_treats_an_exact_tie_as_a_tie():
    from gradclip_book import performance as perf, safety, scalability as sc

    def runs(values):
        return [{"diverged_at": None, "val_accuracy": v, "test_accuracy": v, "seed": i} for i, v in enumerate(values)]

    # chapter 5.2: each knob chosen over the seeds, smallest learning rate listed first
    assert sc.choose({0.0125: runs(TIE_LOW_LR), 0.025: runs(TIE_HIGH_LR)})["setting"] == 0.0125
    # chapter 5.1: the learning rate chosen on validation, an exact tie to the smaller one (the test upper bound too)
    assert perf.best_lr({0.025: runs(TIE_HIGH_LR), 0.0125: runs(TIE_LOW_LR)}) == 0.0125
    scan = perf._scan({0.025: runs(TIE_HIGH_LR), 0.0125: runs(TIE_LOW_LR)})
    assert scan["chosen_lr"] == scan["best_lr"] == 0.0125
    # chapter 5.3: a guard recovers when its mean is not below the lowest clean seed's; 0.925 exactly is not below it
    assert safety.recovers([0.91667, 0.91944, 0.93889], clean=[0.925, 0.95])
    assert not safety.recovers([0.91667, 0.91944, 0.93888], clean=[0.925, 0.95])


def test_comparison_rule_needs_a_gap_beyond_the_seed_spread():
    a, b = H.score("a", [0.96, 0.95, 0.97]), H.score("b", [0.94, 0.95, 0.93])
    assert a.std == pytest.approx(0.01) and H.beats(a, b) is True         # gap 0.02 > 0.01
    close = H.score("c", [0.955, 0.935, 0.975])                           # gap 0.005 < its spread 0.02
    assert not H.beats(close, b) and not H.beats(b, close)
    assert H.beats(b, H.score("d", [0.99, None, 0.99]))                   # no divergence beats some
    assert not H.beats(H.score("e", [1.0, 1.1]), H.score("f", [2.0, 2.1]), mode="max") and \
        H.beats(H.score("e", [1.0, 1.1]), H.score("f", [2.0, 2.1]), mode="min")


# --- curves ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps,points", [(300, 150), (300, 60), (1000, 50), (50, 60), (61, 60)])
def test_log_bins(steps, points):
    edges = curves.log_bins(steps, points)
    widths = [b - a for a, b in zip(edges, edges[1:])]
    assert edges[0] == 0 and edges[-1] == steps and len(widths) <= points and min(widths) >= 1
    assert widths == sorted(widths) or max(widths) - min(widths) <= 1 or widths[:5] == [1] * 5
    assert widths[: min(10, len(widths))] == [1] * min(10, len(widths))   # the first steps one by one


def test_a_short_run_shares_its_bins_with_a_long_one():
    long = _run(steps=120).to_json(points=40)
    short = H.Run(loss=[2.0] * 31, grad_norm=[1.0] * 30, clipped=[False] * 30, skipped=[False] * 30,
                  lr=[0.1] * 30, steps=120, steps_run=30, diverged_at=30, stopped_at=None, metrics={}).to_json(40)
    assert short["curve"]["step"] == list(range(30)) and short["diverged_loss"] == 2.0   # step by step
    first = [s for s in long["curve"]["step"] if s < 30]
    assert first[:10] == list(range(10))                                   # a long run's first steps one by one too
    drawn = curves.rebin(short["curve"], steps=120, points=40, steps_run=30)
    assert drawn["step"] == list(range(30))                                # no drawn point merges two steps


# --- grids ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Point:
    x: int


def _square_plus(config: _Point) -> dict:
    return {"y": config.x ** 2}


def test_run_grid_resumes_drops_other_versions_and_rewrites_in_order(tmp_path, monkeypatch):
    from gradclip_book import reproducibility

    monkeypatch.setattr(reproducibility, "on_grid_machine", lambda: True)  # spot_check compares every field
    path = tmp_path / "g.jsonl.gz"
    points = [("a", _Point(3)), ("a", _Point(1)), ("b", _Point(2))]
    grid.write_lines(path, [{"key": grid.config_key(_Point(1)), "code_version": "v1", "config": {"x": 1}, "y": -1},
                            {"key": grid.config_key(_Point(2)), "code_version": "old", "config": {"x": 2}, "y": -2}])
    with gzip.open(path, "at") as f:
        f.write('{"key": "cut off')                                       # an interrupted write
    grid.run_grid(points, path, _square_plus, version="v1", jobs=1, progress=False)
    lines = grid.load_lines(path)
    assert [line["config"]["x"] for line in lines] == [3, 1, 2]
    assert [line["y"] for line in lines] == [9, -1, 4]                    # v1's line kept, "old" recomputed
    assert grid.spot_check(lines, _square_plus, lambda c: _Point(**c), count=3, seed=0) == \
        ["config {'x': 1}: y stored -1, now 1"]


def test_run_grid_in_worker_processes(tmp_path):
    path = tmp_path / "p.jsonl.gz"
    grid.run_grid([("s", _Point(k)) for k in range(4)], path, _square_plus, version="v", jobs=2, progress=False)
    assert [line["y"] for line in grid.load_lines(path)] == [0, 1, 4, 9]


def test_code_version_ignores_docstrings_not_code(tmp_path, monkeypatch):
    import importlib
    import sys

    monkeypatch.syspath_prepend(str(tmp_path))
    versions = []
    for text in ['def f():\n    """One."""\n    return 1\n', 'def f():\n    """Two."""\n    # a comment\n    return 1\n',
                 'def f():\n    return 2\n']:
        (tmp_path / "probe_mod.py").write_text(text)
        sys.modules.pop("probe_mod", None)
        versions.append(grid.code_version(importlib.import_module("probe_mod")))
    assert versions[0] == versions[1] != versions[2]


def test_lr_grid_is_one_and_three_per_decade():
    ratios = [b / a for a, b in zip(H.LR_GRID, H.LR_GRID[1:])]
    assert all(r == pytest.approx(3, rel=0.12) or r == pytest.approx(10 / 3, rel=0.01) for r in ratios)
    assert H.lr_range(0.01, 0.3) == (0.01, 0.03, 0.1, 0.3)
    with pytest.raises(ValueError):
        H.lr_range(0.02, 0.3)


def test_stored_lines_are_json():
    line = _run(steps=3).to_json()
    assert json.loads(json.dumps(line)) == line and set(line["curve"]) == {"step", "loss", "grad_norm", "clipped"}
