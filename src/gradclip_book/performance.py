r"""Chapter 5.1's analysis: clipping and the learning rate, warm-up, Adam against SGD, and what clipping costs.

Three sources:

* chapter 4's grid (``chapters/data/classification_grid.jsonl.gz``, read through
  :mod:`gradclip_book.classification_figures`): test accuracy over learning rate x threshold, and the
  ``"stability"`` runs (three seeds) for the learning rate that is best with and without clipping;
* chapter 5.1's grid (``chapters/data/optimization_grid.jsonl.gz``, :func:`gradclip_book.grids.optimization_configs`):
  warm-up against clipping, Adam against SGD (unclipped SGD at depth 16 from a learning rate of 0.0125 up);
* a small benchmark timed on the machine that runs this module (:func:`benchmark`): calls interleaved in one
  process, medians, the method of ``benchmarks/timing.py``; the call against a whole training step, from the
  book's networks to ResNet-50, is measured by :mod:`gradclip_book.step_costs` and stored.

"Trains" is chapter 4's rule, used everywhere on the page: a run trains when it does not diverge and ends at
test accuracy at least :data:`TRAINS` (90%); a learning rate with several seeds trains when every seed does. A
range of learning rates is the *set* that trains (:func:`lrs_words`), which need not be contiguous.

This module is not part of the grids' code version (``classification.code_version()``): editing it never makes
a stored grid stale.

Example:
    >>> from gradclip_book import performance as perf
    >>> perf.speed_words(1.3), perf.speed_words(0.5), perf.speed_words(1.02)
    ('is 1.3 times as fast as', 'takes 2.0 times as long as', 'is as fast as')
"""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Sequence
from dataclasses import replace
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from torch import nn

import gradclip

from . import classification as cls
from . import classification_figures as cf
from . import grids, harness
from .figures import and_list
from .timing import interleaved

__all__ = [
    "LOSS_WINDOW",
    "TARGET_LOSS",
    "TRAINS",
    "WARMUP_ARMS",
    "arm_score",
    "benchmark",
    "best_lr",
    "describe_machine",
    "fixed_threshold",
    "heatmap_cells",
    "loop_agc_",
    "loop_clip_",
    "lrs_words",
    "lower_lr_comparison",
    "machine",
    "model_shaped",
    "opt_run",
    "opt_runs",
    "optimizer_summary",
    "overhead_words",
    "small_tensors",
    "smoothed_loss",
    "speed_words",
    "steps_to_loss",
    "usable_lrs",
    "verdict",
    "warmup_summary",
]

TRAINS = 0.9
"""A run trains when it does not diverge and reaches at least this test accuracy."""

TARGET_LOSS = 0.3
"""The training loss (nats, smoothed over :data:`LOSS_WINDOW` steps) that :func:`steps_to_loss` waits for."""
LOSS_WINDOW = 20


_num = grids.number


def _trains(run: dict[str, Any]) -> bool:
    return run["diverged_at"] is None and (_num(run["test_accuracy"]) or 0.0) >= TRAINS


def lrs_words(lrs: Sequence[float], scan: Sequence[float]) -> str:
    """The set ``lrs`` (a subset of the scanned ``scan``) in words: a run of neighbours as "a to b", else a list.

    Example:
        >>> scan = [0.01, 0.03, 0.1, 0.3, 1.0]
        >>> lrs_words([0.03, 0.1, 0.3], scan), lrs_words([0.3, 1.0], scan), lrs_words([0.01, 0.3, 1.0], scan)
        ('0.03 to 0.3 (3 of 5)', '0.3 and 1 (2 of 5)', '0.01, 0.3 and 1 (3 of 5)')
        >>> lrs_words([], scan), lrs_words([0.1], scan)
        ('none of the 5', 'only 0.1 (1 of 5)')
    """
    chosen = sorted(lrs)
    count = f"({len(chosen)} of {len(scan)})"
    if not chosen:
        return f"none of the {len(scan)}"
    if len(chosen) == 1:
        return f"only {chosen[0]:g} {count}"
    positions = [sorted(scan).index(lr) for lr in chosen]
    if len(chosen) > 2 and positions == list(range(positions[0], positions[0] + len(chosen))):
        return f"{chosen[0]:g} to {chosen[-1]:g} {count}"
    return and_list([f"{lr:g}" for lr in chosen]) + " " + count


# --- the stored runs ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _opt_by_key() -> dict[str, dict[str, Any]]:
    lines = grids.load(grids.OPTIMIZATION_FILE)
    return {line["key"]: line for line in lines}


def opt_run(config: cls.RunConfig) -> dict[str, Any]:
    """The stored run of ``config`` in chapter 5.1's grid; ``KeyError`` naming the command when it is missing."""
    try:
        return _opt_by_key()[cls.config_key(config)]
    except KeyError:
        raise KeyError(f"the optimization grid has no run {config}; recompute it with "
                       f"`{grids.OPTIMIZATION_COMMAND}`") from None


def opt_runs(lr: float, threshold: float | None, warmup: int = 0, optimizer: str = "sgd") -> list[dict[str, Any]]:
    """The stored runs (one per seed of :data:`grids.OPT_SEEDS`) of one setting at the hard depth."""
    method = "none" if threshold is None else "norm"
    return [opt_run(replace(grids.HARD, lr=lr, method=method, threshold=threshold, warmup=warmup,
                            optimizer=optimizer, seed=s)) for s in grids.OPT_SEEDS]


def _exact_accuracy(runs: Sequence[dict[str, Any]], field: str = "test_accuracy") -> Fraction:
    """Mean test (or ``field``) accuracy over the runs, a diverged run counting as 0, exactly
    (:func:`gradclip_book.harness.exact_mean`): what the choices below compare, so that equal totals tie."""
    return harness.exact_mean([_num(r[field]) or 0.0 for r in runs])


def _mean_accuracy(runs: Sequence[dict[str, Any]], field: str = "test_accuracy") -> float:
    """Mean test (or ``field``) accuracy over the runs, a diverged run counting as 0 (:func:`_exact_accuracy`)."""
    return float(_exact_accuracy(runs, field))


# --- 1. learning rate x threshold (chapter 4's grid, seed 0) -----------------------------------------


def heatmap_cells(depth: int, method: str) -> dict[str, Any]:
    """Test accuracy of the grid's runs at ``depth``: rows = off + the method's 4 thresholds, columns = :data:`grids.LRS`.

    Returns ``{"lrs", "thresholds" (None first), "accuracy" (test, rows x columns, None when diverged),
    "val_accuracy" (the same for validation), "diverged" (rows x columns of bool)}``.
    """
    thresholds = [None, *grids.THRESHOLDS[method]]
    accuracy, val_accuracy, diverged = [], [], []
    for t in thresholds:
        runs = [cf.grid_run(depth, lr, "none" if t is None else method, t) for lr in grids.LRS]
        accuracy.append([_num(r["test_accuracy"]) for r in runs])
        val_accuracy.append([_num(r["val_accuracy"]) for r in runs])
        diverged.append([r["diverged_at"] is not None for r in runs])
    return {"lrs": list(grids.LRS), "thresholds": thresholds, "accuracy": accuracy, "val_accuracy": val_accuracy,
            "diverged": diverged}


def usable_lrs(cells: dict[str, Any]) -> dict[str, list[float]]:
    """From :func:`heatmap_cells`: the lrs at which the unclipped run trains, and at which some threshold does."""
    ok = [[a is not None and a >= TRAINS for a in row] for row in cells["accuracy"]]
    lrs = cells["lrs"]
    return {"none": [lr for lr, good in zip(lrs, ok[0]) if good],
            "clipped": [lr for j, lr in enumerate(lrs) if any(row[j] for row in ok[1:])]}


def fixed_threshold(cells: dict[str, Any]) -> dict[str, Any]:
    """From :func:`heatmap_cells`: one threshold for every learning rate, chosen on validation, and where it trains.

    The choice: the threshold whose runs reach :data:`TRAINS` *validation* accuracy without diverging at the most
    learning rates, ties broken by the higher mean validation accuracy over the grid's lrs (a diverged run
    counting 0). Returns ``{"threshold", "lrs" (where the chosen threshold trains, by the page's test rule),
    "per_threshold" ({threshold: the lrs where it trains, test rule}), "largest" (the most lrs any one threshold
    trains at, test rule: an upper bound that picks the threshold on test)}``.

    Example:
        >>> cells = {"lrs": [0.1, 1.0], "thresholds": [None, 0.1, 1.0],
        ...          "accuracy": [[0.5, None], [0.95, 0.92], [0.95, 0.5]],
        ...          "val_accuracy": [[0.5, None], [0.9, 0.93], [0.97, 0.6]]}
        >>> fixed_threshold(cells)["threshold"], fixed_threshold(cells)["lrs"]
        (0.1, [0.1, 1.0])
    """
    lrs = cells["lrs"]

    def good(row: Sequence[float | None]) -> list[float]:
        return [lr for lr, a in zip(lrs, row) if a is not None and a >= TRAINS]

    rows = range(1, len(cells["thresholds"]))
    per_threshold = {cells["thresholds"][i]: good(cells["accuracy"][i]) for i in rows}
    chosen = max(rows, key=lambda i: (len(good(cells["val_accuracy"][i])),
                                      harness.exact_mean([a or 0.0 for a in cells["val_accuracy"][i]])))
    threshold = cells["thresholds"][chosen]
    return {"threshold": threshold, "lrs": per_threshold[threshold], "per_threshold": per_threshold,
            "largest": max(len(v) for v in per_threshold.values())}


# --- 2. "lower the learning rate instead": steps to a training loss ------------------------------------


def smoothed_loss(run: dict[str, Any], window: int = LOSS_WINDOW) -> dict[str, list[float]]:
    """A stored run's training loss averaged over the last ``window`` steps, after each bin that completes one.

    Read from the stored curve (bin means over consecutive steps, :func:`gradclip_book.classification.compact`):
    the moving average covers the bins of the last ``window`` steps, weighted by their length. Returns
    ``{"step": steps done when the window ends, "loss": the moving average in nats}``.
    """
    steps, loss = run["curve_step"], [_num(v) for v in run["loss"]]
    ends = [*steps[1:], run["steps_run"]]  # bin i covers steps steps[i] .. ends[i] - 1
    out: dict[str, list[float]] = {"step": [], "loss": []}
    for i, end in enumerate(ends):
        if end < window:
            continue
        inside = [j for j in range(i + 1) if steps[j] >= end - window]
        sizes = [ends[j] - steps[j] for j in inside]
        out["step"].append(end)
        out["loss"].append(float(np.average([loss[j] for j in inside], weights=sizes)))
    return out


def steps_to_loss(run: dict[str, Any], target: float = TARGET_LOSS, window: int = LOSS_WINDOW) -> int | None:
    """Steps a stored run took until its training loss, averaged over the last ``window`` steps, fell to ``target``.

    The first step of :func:`smoothed_loss` at or below ``target``; ``None`` when the run never gets there (or
    diverged first).
    """
    smooth = smoothed_loss(run, window)
    return next((end for end, value in zip(smooth["step"], smooth["loss"]) if value <= target), None)


def best_lr(runs_by_lr: dict[float, list[dict[str, Any]]]) -> float | None:
    """The lr whose runs all train with the highest mean *validation* accuracy (``None`` if no lr trains every seed),
    means compared exactly (:func:`gradclip_book.harness.exact_mean`), an exact tie to the smaller lr.

    The learning rate is a knob, so it is chosen on validation; its test accuracy is then reported once.
    """
    good = {lr: runs for lr, runs in runs_by_lr.items() if all(_trains(r) for r in runs)}
    # an exact tie goes to the smaller lr, the more conservative setting (the book's rule, harness.select)
    return max(good, key=lambda lr: (_exact_accuracy(good[lr], "val_accuracy"), -lr)) if good else None


def _stability_runs(depth: int, threshold: float | None) -> dict[float, list[dict[str, Any]]]:
    method = "none" if threshold is None else "norm"
    return {lr: [cf.grid_run(depth, lr, method, threshold, seed=s) for s in grids.STABILITY_SEEDS]
            for lr in grids.STABILITY_LRS}


def _lower_runs() -> dict[float, list[dict[str, Any]]]:
    """Unclipped SGD without warm-up at depth 16 over :data:`grids.SGD_LRS` (chapter 5.1's grid, 300 steps)."""
    return {lr: opt_runs(lr, None) for lr in grids.SGD_LRS}


def _side(runs_by_lr: dict[float, list[dict[str, Any]]], target: float) -> dict[str, Any]:
    lr = best_lr(runs_by_lr)
    if lr is None:
        return {"lr": None, "accuracy": None, "steps": None, "per_seed": [], "runs": [], "clip_fraction": None}
    runs = runs_by_lr[lr]
    per_seed = [steps_to_loss(r, target) for r in runs]
    steps = float(np.mean(per_seed)) if all(s is not None for s in per_seed) else None
    return {"lr": lr, "accuracy": _mean_accuracy(runs), "steps": steps, "per_seed": per_seed,
            "max_steps": runs[0]["config"]["steps"], "runs": runs,
            "clip_fraction": float(np.mean([_num(r["clip_fraction"]) for r in runs]))}


def lower_lr_comparison(target: float = TARGET_LOSS) -> dict[int, dict[str, Any]]:
    """Per depth: the best lr with global-norm clipping against the best lr without, and steps to ``target`` loss.

    "Best": the lr of chapter 4's stability scan (0.025 to 1.6, three seeds) whose runs all train, with the
    highest mean validation accuracy (:func:`best_lr`); clipping at :data:`grids.HARD_THRESHOLD`. Where no unclipped lr of the scan
    trains (depth 16), the unclipped side comes from chapter 5.1's grid (:data:`grids.SGD_LRS`, which reach
    lower, same 300 steps). Returns ``{depth: {"clipped": side, "plain": side, "slowdown": plain steps /
    clipped steps or None}}``, each side ``{"lr", "accuracy" (mean over seeds), "steps" (mean steps to the target,
    None unless every seed reaches it), "per_seed", "max_steps", "runs" (the stored runs, one per seed),
    "clip_fraction" (mean share of clipped steps)}``.
    """
    table = {}
    for depth in grids.DEPTHS:
        clipped = _side(_stability_runs(depth, grids.HARD_THRESHOLD), target)
        plain = _side(_stability_runs(depth, None), target)
        if plain["lr"] is None and depth == grids.HARD.depth:
            plain = _side(_lower_runs(), target)
        slowdown = plain["steps"] / clipped["steps"] if plain["steps"] and clipped["steps"] else None
        table[depth] = {"clipped": clipped, "plain": plain, "slowdown": slowdown}
    return table


# --- 3. warm-up against clipping, Adam against SGD (chapter 5.1's grid) --------------------------------

WARMUP_ARMS = {
    "neither": (0, None),
    "warm-up": (grids.WARMUP_STEPS, None),
    "clipping": (0, "t"),
    "both": (grids.WARMUP_STEPS, "t"),
}
"""The four arms of the warm-up comparison: (warm-up steps, threshold; ``"t"`` = the chosen threshold)."""


def _arm_runs(arm: str, threshold: float, lrs: Sequence[float] = grids.SGD_LRS,
              optimizer: str = "sgd") -> dict[float, list[dict[str, Any]]]:
    warmup, t = WARMUP_ARMS[arm]
    return {lr: opt_runs(lr, threshold if t == "t" else None, warmup, optimizer) for lr in lrs}


def _scan(runs_by_lr: dict[float, list[dict[str, Any]]]) -> dict[str, Any]:
    """The lrs at which every seed trains, the lr chosen on validation and its test accuracy, per lr the mean
    accuracy and counts.

    ``stable_lrs`` is the set that trains (sorted; it need not be contiguous), ``largest_stable_lr`` its largest
    member (None when empty); ``chosen_lr`` the lr with the highest mean validation accuracy
    (``chosen_val_accuracy``), ``chosen_accuracy`` its mean test accuracy (the number to report: the lr is a knob,
    picked on validation); ``best_lr`` / ``best_accuracy`` the highest mean *test* accuracy over the lrs and its lr
    (an upper bound that picks on test; kept for chapter 6); ``trained`` / ``diverged`` per lr the number of seeds
    that train / diverge.
    """
    exact = {lr: _exact_accuracy(runs) for lr, runs in runs_by_lr.items()}   # compared exactly: equal totals tie
    val_exact = {lr: _exact_accuracy(runs, "val_accuracy") for lr, runs in runs_by_lr.items()}
    means = {lr: float(m) for lr, m in exact.items()}
    stable = [lr for lr, runs in runs_by_lr.items() if all(_trains(r) for r in runs)]
    best = max(exact, key=lambda lr: (exact[lr], -lr))   # an exact tie to the smaller lr (best_lr)
    chosen = max(val_exact, key=lambda lr: (val_exact[lr], -lr))
    return {"largest_stable_lr": max(stable) if stable else None, "stable_lrs": sorted(stable),
            "best_accuracy": means[best], "best_lr": best, "chosen_lr": chosen, "chosen_accuracy": means[chosen],
            "chosen_val_accuracy": float(val_exact[chosen]), "mean_accuracy": means,
            "trained": {lr: sum(_trains(r) for r in runs) for lr, runs in runs_by_lr.items()},
            "diverged": {lr: sum(r["diverged_at"] is not None for r in runs) for lr, runs in runs_by_lr.items()}}


def arm_score(arm: str, threshold: float, lr: float, optimizer: str = "sgd") -> harness.Score:
    """Test accuracy per seed of one arm of :data:`WARMUP_ARMS` at ``lr`` (``"clipping"`` and ``"both"`` clip at
    ``threshold``), as a :class:`gradclip_book.harness.Score` for the book's rule of a difference
    (:func:`gradclip_book.harness.beats`); a diverged seed is ``None``, so a setting with one loses to one without."""
    warmup, t = WARMUP_ARMS[arm]
    runs = opt_runs(lr, threshold if t == "t" else None, warmup, optimizer)
    return harness.score((arm, threshold, lr), [None if r["diverged_at"] is not None else _num(r["test_accuracy"])
                                                for r in runs])


def verdict(scores: dict[str, harness.Score]) -> list[tuple[str, str]]:
    """Every ordered pair ``(a, b)`` of ``scores`` such that ``a`` beats ``b`` by the book's rule
    (:func:`gradclip_book.harness.beats`: the gap in means exceeds both standard deviations over the seeds).

    Example:
        >>> from gradclip_book.harness import score
        >>> verdict({"a": score("a", [0.95, 0.96]), "b": score("b", [0.90, 0.91]), "c": score("c", [0.9, 0.97])})
        [('a', 'b')]
    """
    return [(a, b) for a in scores for b in scores if a != b and harness.beats(scores[a], scores[b])]


def warmup_summary(threshold: float) -> dict[str, dict[str, Any]]:
    """Per arm of :data:`WARMUP_ARMS` (SGD, depth 16, global-norm ``threshold``): :func:`_scan` over :data:`grids.SGD_LRS`."""
    return {arm: _scan(_arm_runs(arm, threshold)) for arm in WARMUP_ARMS}


def optimizer_summary() -> dict[str, dict[Any, dict[str, Any]]]:
    """Per optimizer (``"sgd"``, ``"adam"``) and threshold (None and :data:`grids.OPT_THRESHOLDS`): :func:`_scan`.

    SGD over :data:`grids.SGD_LRS`, Adam over :data:`grids.ADAM_LRS`; no warm-up, depth 16, seeds
    :data:`grids.OPT_SEEDS`.
    """
    out: dict[str, dict[Any, dict[str, Any]]] = {}
    for optimizer, lrs in (("sgd", grids.SGD_LRS), ("adam", grids.ADAM_LRS)):
        out[optimizer] = {t: _scan({lr: opt_runs(lr, t, 0, optimizer) for lr in lrs}) for t in grids.OPT_THRESHOLDS}
    return out


# --- 4. what clipping costs: a small benchmark on this machine -----------------------------------------


def machine() -> dict[str, Any]:
    """The machine this runs on: CPU model, logical CPUs, OS, torch version and the threads torch uses."""
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": cpu or platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "system": f"{platform.system()} {platform.machine()}", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version()}


def speed_words(ratio: float, tolerance: float = 0.05) -> str:
    """A verb phrase for ``ratio`` = reference time / gradclip time, to read "gradclip {words} the reference".

    "is as fast as" within ``tolerance``, else how many times faster, or how many times as long it takes.

    Example:
        >>> speed_words(2.0), speed_words(0.8)
        ('is 2.0 times as fast as', 'takes 1.2 times as long as')
    """
    if abs(ratio - 1) <= tolerance:
        return "is as fast as"
    if ratio > 1:
        return f"is {ratio:.1f} times as fast as"
    return f"takes {1 / ratio:.1f} times as long as"


def model_shaped(seed: int = 0) -> list[nn.Parameter]:
    """67 parameters shaped like a small convolutional network (3.4 M values), with random gradients.

    ``benchmarks/shapes.py``'s ``model_shapes`` (13.6 M values) at half the channels, so that a build
    times it in seconds: a 64x3x7x7 stem, sixteen 128x128x3x3 convolutions, eight 512x128 projections,
    forty 128-vectors, a 1000x512 classifier and its bias.
    """
    shapes = ([(64, 3, 7, 7)] + [(128, 128, 3, 3)] * 16 + [(512, 128)] * 8 + [(128,)] * 40
              + [(1000, 512), (1000,)])
    return _with_grads(shapes, seed)


def small_tensors(count: int = 2000, seed: int = 0) -> list[nn.Parameter]:
    """``count`` small parameters cycling through one tiny transformer block's shapes (d = 32)."""
    block = [(32,), (32,), (96, 32), (96,), (32, 32), (32,), (32,), (32,), (128, 32), (128,), (32, 128), (32,)]
    return _with_grads([block[i % len(block)] for i in range(count)], seed)


def _with_grads(shapes: list[tuple[int, ...]], seed: int) -> list[nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, generator=generator) * 0.05) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    return params


def loop_clip_(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """The hand-written pattern found in tutorials: a Python sum over parameters, a host read, a loop of scalings."""
    norm = torch.sqrt(sum(torch.sum(p.grad ** 2) for p in params))
    if norm > max_norm:  # reads the norm on the host
        for p in params:
            p.grad.mul_(max_norm / norm)
    return norm


def loop_agc_(params: list[nn.Parameter], clip_factor: float, eps: float = 1e-3) -> None:
    """AGC written the straightforward way: per parameter, unit norms of weight and gradient, then a ``where``.

    Brock et al. 2021 (arXiv:2102.06171), eq. 3: a unit's gradient G_i is scaled to ``clip_factor *
    max(||W_i||, eps)`` when its norm exceeds that; units are the rows of the (out, -1) view, a vector is one unit.
    """
    for p in params:
        w = p.detach().reshape(p.shape[0], -1) if p.dim() > 1 else p.detach().reshape(1, -1)
        g = p.grad.reshape(w.shape)
        limit = w.norm(dim=1, keepdim=True).clamp(min=eps) * clip_factor
        g_norm = g.norm(dim=1, keepdim=True)
        g.copy_(torch.where(g_norm > limit, g * (limit / g_norm.clamp(min=1e-6)), g))


def _clip_pair(params: list[nn.Parameter], clip: bool, repeats: int, extra: dict | None = None) -> dict[str, float]:
    """torch against gradclip on ``params``; clipping halves every gradient each call (an untimed refresh doubles it back)."""
    norm = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
    max_norm = norm / 2 if clip else 1e9
    grads = [p.grad for p in params]
    functions = {"torch": lambda: torch.nn.utils.clip_grad_norm_(params, max_norm),
                 "gradclip": lambda: gradclip.clip_grad_norm_(params, max_norm)}
    for name, fn in (extra or {}).items():
        functions[name] = lambda fn=fn: fn(max_norm)
    return interleaved(functions, repeats, before=(lambda: torch._foreach_mul_(grads, 2.0)) if clip else None)


def benchmark(repeats: int = 15) -> dict[str, Any]:
    """Time gradclip against torch and the hand-written patterns here and now; return the rows and the machine.

    Each row: ``{"what", "reference" (its name), "ms" (gradclip), "reference_ms", "ratio" (reference / gradclip:
    above 1, gradclip is faster), "short" (a lettered label for a narrow figure; the table spells it out)}``. Before timing, each pair is checked to give the same gradients.
    ``repeats`` timed calls per candidate (the repository's benchmarks use 30 and more; fewer keep a page fast).
    What the call costs against a whole training step is measured once and stored (:mod:`gradclip_book.step_costs`).
    """
    _check_same_answers()
    rows = []

    def row(what: str, reference: str, ms: float, reference_ms: float, short: str) -> None:
        rows.append({"what": what, "reference": reference, "ms": ms, "reference_ms": reference_ms,
                     "ratio": reference_ms / ms, "short": short})

    big = model_shaped()
    values = sum(p.numel() for p in big)
    size = f"{len(big)} tensors, {values / 1e6:.1f} M values"
    timed = _clip_pair(big, True, repeats, {"loop": lambda c: loop_clip_(big, c)})
    row(f"clip_grad_norm_, {size}, clipping", "torch.nn.utils.clip_grad_norm_", timed["gradclip"], timed["torch"],
        "A. big, clips, vs torch")
    row(f"clip_grad_norm_, {size}, clipping", "hand-written loop", timed["gradclip"], timed["loop"],
        "B. big, clips, vs loop")
    timed = _clip_pair(big, False, repeats)
    row(f"clip_grad_norm_, {size}, norm below the threshold", "torch.nn.utils.clip_grad_norm_",
        timed["gradclip"], timed["torch"], "C. big, no clip, vs torch")
    small = small_tensors()
    flat = small_tensors(seed=1)
    gradclip.GradBuffer(flat)
    timed = _clip_pair(small, True, repeats, {"buffer": lambda c: gradclip.clip_grad_norm_(flat, c)})
    row(f"clip_grad_norm_, {len(small):,} small tensors, clipping", "torch.nn.utils.clip_grad_norm_",
        timed["gradclip"], timed["torch"], "D. small, vs torch")
    row(f"clip_grad_norm_ on a GradBuffer, {len(small):,} small tensors, clipping", "torch.nn.utils.clip_grad_norm_",
        timed["buffer"], timed["torch"], "E. GradBuffer, vs torch")
    saved = [p.grad.clone() for p in big]
    timed = interleaved({"gradclip": lambda: gradclip.adaptive_clip_grad_(big, 0.01),
                         "loop": lambda: loop_agc_(big, 0.01)}, repeats,
                        before=lambda: torch._foreach_copy_([p.grad for p in big], saved))
    row(f"adaptive_clip_grad_ (AGC), {size}", "per-parameter loop", timed["gradclip"], timed["loop"],
        "F. AGC, vs loop")
    return {"rows": rows, "machine": machine(), "repeats": repeats}


def _check_same_answers() -> None:
    """The compared calls give the same gradients (small sets, so the check is quick)."""
    for clip, reference in ((lambda ps, c: gradclip.clip_grad_norm_(ps, c), torch.nn.utils.clip_grad_norm_),
                            (lambda ps, c: gradclip.clip_grad_norm_(ps, c), loop_clip_)):
        a, b = small_tensors(24, seed=3), small_tensors(24, seed=3)
        clip(a, 1.0)
        reference(b, 1.0)
        assert all(torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7) for p, q in zip(a, b))
    a, b = small_tensors(24, seed=4), small_tensors(24, seed=4)
    gradclip.adaptive_clip_grad_(a, 0.01)
    loop_agc_(b, 0.01)
    assert all(torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7) for p, q in zip(a, b))


def overhead_words(fraction: float, noise: float = 0.03) -> str:
    """What a measured relative overhead says: "adds about N%", or "no cost measurable" within ``noise``.

    Example:
        >>> overhead_words(0.12), overhead_words(-0.01)
        ('adds about 12% to', 'adds no cost measurable here (under 3%) to')
    """
    if fraction <= noise:
        return f"adds no cost measurable here (under {100 * noise:.0f}%) to"
    return f"adds about {100 * fraction:.0f}% to"


def describe_machine(m: dict[str, Any]) -> str:
    """One line naming the machine, e.g. for a table caption."""
    return (f"{m['cpu']} ({m['cpus']} logical CPUs, {m['system']}), torch {m['torch']} on {m['threads']} "
            f"thread{'s' if m['threads'] != 1 else ''}, Python {m['python']}")
