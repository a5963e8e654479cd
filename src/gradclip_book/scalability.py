r"""Chapter 5.2's experiments: AGC against global-norm clipping across batch sizes, and the cost of structure-aware clipping.

**The batch-size grid.** ``python -m gradclip_book.scalability grid [--jobs 2]`` trains, with chapter 4's
harness (:func:`gradclip_book.classification.train`, unchanged), the ReLU MLP of depth 8 without
normalisation layers at every batch size of :data:`BATCHES`, with the learning rate scaled linearly with
the batch (:func:`lr_for`, as Brock et al. 2021 do), once without clipping and with every threshold of
:data:`THRESHOLDS` for AGC and for global-norm clipping, for each seed of :data:`SEEDS`. It writes one JSON
line per run to ``chapters/data/scalability_grid.jsonl.gz`` (gzip), with the run's full config, so a
stored run can be re-trained from its line alone (:func:`config_of`). Interrupted, it resumes.

**The controls.** ``python -m gradclip_book.scalability controls [--jobs 1]`` trains, into
``chapters/data/scalability_controls.jsonl.gz``, the two checks the grid needs (:func:`control_configs`):
the strongest simple alternative to clipping, training without it at lower learning rates
(:data:`LOWER_LR_FACTORS` of the scaled one), and the whole grid again for :data:`SHORT_STEPS` steps, so that
each batch size is also seen at the number of images (epochs) the next-smaller batch size sees in 200 steps.

**The protocol** (chapter 4's, :mod:`gradclip_book.harness.select`). At each batch size each method's knob
is chosen on validation accuracy (:func:`choose`), test accuracy is reported once for the chosen setting,
and one chosen setting beats another only beyond the seed spread (:func:`~gradclip_book.harness.select.beats`).
A verdict is robust only if it stays the same with any one seed left out (:func:`leave_one_seed_out`).

**Structure-aware clipping.** :func:`clip_costs` times global, per-tensor, block-RMS and AGC clipping on the
same gradients (interleaved calls, medians); :func:`per_sample_check` compares gradclip's per-sample
(DP-SGD) clipping with a per-example loop (same clipped gradient, and the time of each);
:func:`dp_train` trains the digits MLP with DP-SGD.

**DP-SGD since 2023.** ``python -m gradclip_book.scalability dp`` writes ``chapters/data/dp_methods.json``
(:func:`compute_dp`, a progress bar, about 2 minutes): ``method="auto"`` against ``"ghost"`` and ``"vmap"``
(:func:`method_times`), and DP-SGD with Abadi clipping at three thresholds, per-layer thresholds and automatic
clipping at the same noise multiplier over :data:`DP_SEEDS` (:func:`dp_runs`), judged by :func:`dp_summary`;
then the same with each arm's learning rate chosen on validation (:func:`dp_lr_runs`, :func:`dp_lr_summary`, about
3 minutes more). The file is rewritten first, so this command always redoes the whole learning-rate search;
``python -m gradclip_book.scalability dp --lr-only`` adds the search's missing runs to the stored file alone.

References:
    * Brock, De, Smith, Simonyan (2021), "High-Performance Large-Scale Image Recognition Without
      Normalization", `arXiv:2102.06171 <https://arxiv.org/abs/2102.06171>`__.
    * Abadi et al. (2016), "Deep Learning with Differential Privacy", `arXiv:1607.00133 <https://arxiv.org/abs/1607.00133>`__.
    * Bu, Wang, Zha, Karypis (2023), "Automatic Clipping", `arXiv:2206.07136 <https://arxiv.org/abs/2206.07136>`__;
      Bu, Mao, Xu (2023), "Differentially Private Optimization on Large Model at Small Cost",
      `arXiv:2210.00038 <https://arxiv.org/abs/2210.00038>`__ (mixed ghost clipping).

Example:
    >>> configs = grid_configs()
    >>> len(configs), len(control_configs()), lr_for(1024)
    (720, 960, 1.6)
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import gradclip

from . import classification as cls
from . import grids, harness, timing

__all__ = [
    "BASE",
    "BATCHES",
    "GRID_FILE",
    "SEEDS",
    "THRESHOLDS",
    "CONTROLS_FILE",
    "CONTROLS_COMMAND",
    "SHORT_STEPS",
    "LOWER_LR_FACTORS",
    "cell_table",
    "choose",
    "chosen_per_batch",
    "clip_costs",
    "config_of",
    "control_configs",
    "dp_train",
    "epochs",
    "grid_configs",
    "load",
    "lr_for",
    "main",
    "per_sample_check",
    "percent",
    "run_grid",
    "sensitivity",
    "verdicts",
    "leave_one_seed_out",
    "without_each_seed",
    "robust_verdicts",
    "ARMS",
    "DP_ARMS",
    "DP_COMMAND",
    "DP_FILE",
    "DP_LR_ARMS",
    "DP_LR_COMMAND",
    "DP_LRS",
    "DP_SEEDS",
    "DP_SIGMA",
    "arm_name",
    "compute_dp",
    "compute_dp_lr",
    "dp_cnn",
    "dp_lr_runs",
    "dp_lr_summary",
    "dp_runs",
    "dp_summary",
    "load_dp",
    "method_times",
]

ROOT = Path(__file__).resolve().parents[2]
GRID_FILE = ROOT / "chapters" / "data" / "scalability_grid.jsonl.gz"
CONTROLS_FILE = ROOT / "chapters" / "data" / "scalability_controls.jsonl.gz"
COMMAND = "python -m gradclip_book.scalability grid --jobs 1"
CONTROLS_COMMAND = "python -m gradclip_book.scalability controls --jobs 1"

BATCHES = (16, 64, 256, 1024)
"""Batch sizes (images per step; the training set has 1,077)."""
BASE = cls.RunConfig(depth=8, width=64, steps=200)
"""Every grid run: ReLU MLP of depth 8 and width 64, He init, no normalisation, SGD with momentum 0.9, 200 steps."""
BASE_LR, BASE_BATCH = 0.025, 16
THRESHOLDS: dict[str, tuple[float, ...]] = {
    "agc": (0.000625, 0.00125, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64),
    "norm": (0.03, 0.1, 0.3, 1.0, 3.0, 10.0),
}
"""AGC's clip factors lambda (the paper's 0.01 .. 0.16, four halvings below it and two doublings above) and global-norm
thresholds c. Some good ranges still reach an end of these grids (:func:`sensitivity`'s ``open_low`` / ``open_high``)."""
SEEDS = tuple(range(10))
"""The seeds of the grid and the controls; :func:`leave_one_seed_out` tells which verdicts any one of them decides."""
CHANCE = 0.1
"""A diverged run counts at chance accuracy (10 classes) in the figures' means."""
LOWER_LR_FACTORS = (0.015625, 0.03125, 0.0625, 0.125, 0.25, 0.5)
"""Unclipped controls: the scaled learning rate times these (the grid has factor 1)."""
SHORT_STEPS = 50
"""Controls for the epochs the grid confounds with the batch size: every point of the grid for 50 steps instead of
200. A run at batch 4b for 50 steps sees as many images (epochs) as the grid's run at batch b for 200 steps."""
VALIDATION, TEST = "val_accuracy", "test_accuracy"


def lr_for(batch: int) -> float:
    """The linearly scaled learning rate: 0.025 at batch 16, so 0.1 at 64 and 1.6 at 1024 (the paper's lr at 4096)."""
    return BASE_LR * batch / BASE_BATCH


def epochs(batch: int, steps: int) -> float:
    """Passes over the training images (1,077) that ``steps`` minibatches of ``batch`` images make.

    Example:
        >>> round(epochs(16, 200), 2), round(epochs(1024, 200), 1)
        (2.97, 190.2)
    """
    return batch * steps / len(harness.image_split(BASE.split_seed)["train"][1])


def grid_configs() -> list[cls.RunConfig]:
    """Every run of the grid: :data:`BATCHES` x (none + each method's :data:`THRESHOLDS`) x :data:`SEEDS`."""
    out = []
    for batch in BATCHES:
        points = [("none", None)] + [(m, t) for m, ts in THRESHOLDS.items() for t in ts]
        for method, t in points:
            for seed in SEEDS:
                out.append(replace(BASE, batch=batch, lr=lr_for(batch), method=method, threshold=t, seed=seed))
    return out


def control_configs() -> list[cls.RunConfig]:
    """The controls (module docstring): no clipping at lower learning rates at every batch size, and every point of
    the grid for :data:`SHORT_STEPS` steps, for each seed of :data:`SEEDS`."""
    out = []
    for batch in BATCHES:
        for factor in LOWER_LR_FACTORS:
            out += [replace(BASE, batch=batch, lr=lr_for(batch) * factor, seed=seed) for seed in SEEDS]
    out += [replace(c, steps=SHORT_STEPS) for c in grid_configs()]
    return out


def _identity(config: dict[str, Any]) -> tuple:
    """What tells runs apart here: the fields these grids vary (stable if the harness gains defaulted fields)."""
    return (config["batch"], config["lr"], config["steps"], config["method"], config["threshold"], config["seed"])


def config_of(line: dict[str, Any]) -> cls.RunConfig:
    """The :class:`~gradclip_book.classification.RunConfig` a stored line was trained with.

    Fields the harness has gained since keep their defaults; a stored field the harness no longer has raises.
    """
    known = {f.name for f in fields(cls.RunConfig)}
    unknown = set(line["config"]) - known
    if unknown:
        raise ValueError(f"stored fields {sorted(unknown)} are not RunConfig fields: recompute with {COMMAND}")
    return cls.RunConfig(**line["config"])


def load(path: Path = GRID_FILE) -> list[dict[str, Any]]:
    """Every complete line of the grid file (``[]`` if there is none; a cut-off end is ignored)."""
    return grids.load(path)


def _one(config: cls.RunConfig) -> str:
    return json.dumps(cls.train(config).to_json(), separators=(",", ":"))


def run_grid(configs: Iterable[cls.RunConfig], path: Path = GRID_FILE, jobs: int = 2) -> float:
    """Train the runs of ``configs`` missing from ``path`` in ``jobs`` processes (tqdm bar); return the wall seconds.

    Lines are appended as runs finish; at the end the file is rewritten in ``configs`` order.
    """
    from tqdm import tqdm

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    configs = list(configs)
    kept = load(path)
    grids.write_lines(path, kept)  # repairs a file cut off by an interruption
    done = {_identity(line["config"]) for line in kept}
    todo = [c for c in configs if _identity(asdict(c)) not in done]
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs) as pool, gzip.open(path, "at", encoding="utf-8") as out:
        futures = [pool.submit(_one, c) for c in todo]
        for future in tqdm(as_completed(futures), total=len(todo), desc="runs", unit="run"):
            out.write(future.result() + "\n")
            out.flush()
    seconds = time.perf_counter() - start
    by_id = {_identity(line["config"]): line for line in load(path)}
    grids.write_lines(path, [by_id[_identity(asdict(c))] for c in configs if _identity(asdict(c)) in by_id])
    return seconds


# --- reading the grid ------------------------------------------------------------------------------


def percent(fraction: float, digits: int = 1) -> str:
    """A fraction as chapter 5.2 prints it, rounded once from the unrounded value.

    The figures' notes and the page's prose both call this, so a mean of 0.90648 reads 90.6% in
    both (rounding to 90.65 first and then to one digit would give 90.7%).

    Example:
        >>> percent(0.90648), percent(0.9435167), percent(0.25, 0)
        ('90.6%', '94.4%', '25%')
    """
    return f"{100 * fraction:.{digits}f}%"


def _score(line: dict[str, Any], metric: str) -> float:
    return CHANCE if line["diverged_at"] is not None else float(line[metric])


def cell_table(lines: list[dict[str, Any]], metric: str = VALIDATION) -> dict[tuple[int, str, float | None], dict[str, Any]]:
    """Per (batch, method, threshold): the seeds' accuracies (``metric``; a diverged run at chance), their mean and
    standard deviation (sample), and how many seeds diverged. For the figures, which draw every setting; the
    choices and comparisons go through :func:`chosen_per_batch`, where a diverged seed is not averaged in."""
    cells: dict[tuple[int, str, float | None], list[dict[str, Any]]] = {}
    for line in sorted(lines, key=lambda l: l["config"]["seed"]):
        c = line["config"]
        cells.setdefault((c["batch"], c["method"], c["threshold"]), []).append(line)
    out = {}
    for key, runs in cells.items():
        scores = [_score(r, metric) for r in runs]
        out[key] = {"scores": scores, "mean": float(np.mean(scores)),
                    "std": float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0,
                    "diverged": sum(r["diverged_at"] is not None for r in runs), "seeds": len(runs)}
    return out


def _runs_by_setting(lines: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """Lines grouped by (batch, lr, steps, method, threshold), each group in seed order."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for line in sorted(lines, key=lambda l: l["config"]["seed"]):
        c = line["config"]
        groups.setdefault((c["batch"], c["lr"], c["steps"], c["method"], c["threshold"]), []).append(line)
    return groups


def _values(runs: list[dict[str, Any]], metric: str) -> list[float | None]:
    """One accuracy per seed, ``None`` for a seed that diverged (the harness's convention)."""
    return [None if r["diverged_at"] is not None else float(r[metric]) for r in runs]


def choose(candidates: dict[Any, list[dict[str, Any]]], within: bool = True) -> dict[str, Any]:
    """The book's protocol over ``{setting: runs}`` (listed from the most conservative setting).

    The setting is chosen on validation accuracy by :func:`~gradclip_book.harness.select.select_best` (fewest
    diverged seeds, then the best mean); its test accuracy is reported once. ``within`` lists the settings the
    chosen one does not beat on validation (:func:`~gradclip_book.harness.select.beats`): those within the seed
    spread of the best.

    Returns ``{"setting", "val": Score, "test": Score, "ranked": [validation Score, best first], "within",
    "runs"}``; ``within=False`` leaves ``within`` as ``None`` (it is most of the cost: exact standard deviations).
    """
    selection = harness.select_best([(s, _values(runs, VALIDATION)) for s, runs in candidates.items()])
    best = selection.best
    runs = candidates[best.setting]
    return {"setting": best.setting, "val": best, "test": harness.score(best.setting, _values(runs, TEST)),
            "ranked": selection.ranked,
            "within": [s.setting for s in selection.ranked if not harness.beats(best, s)] if within else None,
            "runs": runs}


def chosen_per_batch(lines: list[dict[str, Any]], controls: list[dict[str, Any]] | None = None,
                     steps: int = BASE.steps, within: bool = True) -> dict[int, dict[str, dict[str, Any]]]:
    """Per batch size: each method's :func:`choose` over its thresholds (at the scaled learning rate, ``steps``).

    Keys per batch: ``"agc"`` and ``"norm"`` (threshold chosen), ``"none"`` (no clipping at the scaled learning
    rate) and, when ``controls`` are given, ``"none_tuned"``: no clipping with its learning rate chosen among the
    scaled one and the lower ones of :data:`LOWER_LR_FACTORS` (setting = the learning rate). Thresholds are listed
    loosest first and learning rates smallest first, so an exact tie goes to the more conservative setting.
    """
    groups = _runs_by_setting(lines + (controls or []))
    out: dict[int, dict[str, dict[str, Any]]] = {}
    for batch in sorted({k[0] for k in groups if k[2] == steps}):
        lr = lr_for(batch)
        row = {"none": choose({None: groups[batch, lr, steps, "none", None]}, within)}
        for method, thresholds in THRESHOLDS.items():
            present = [t for t in sorted(thresholds, reverse=True) if (batch, lr, steps, method, t) in groups]
            row[method] = choose({t: groups[batch, lr, steps, method, t] for t in present}, within)
        if controls:
            lrs = sorted(k[1] for k in groups if k[0] == batch and k[2] == steps and k[3] == "none")
            row["none_tuned"] = choose({x: groups[batch, x, steps, "none", None] for x in lrs}, within)
        out[batch] = row
    return out


def sensitivity(choice: dict[str, Any]) -> dict[str, Any]:
    """How much a method's knob matters: of the thresholds tried, how many are within the seed spread of the chosen
    one on validation (``within``), how many have a diverged seed, and the range of their validation means.

    ``open_low`` / ``open_high`` say that the good range contains the smallest / largest value tried: the range may
    go on past that end of the grid, so its span is only a lower bound.

    Example:
        >>> score = lambda t, v: harness.score(t, [v, v + 0.01])
        >>> sensitivity({"ranked": [score(0.1, 0.9), score(0.3, 0.9), score(1.0, 0.5)], "within": [0.1, 0.3]})
        {'n': 3, 'within': 2, 'diverged': 0, 'settings_within': [0.1, 0.3], 'low': 0.505, 'high': 0.905, 'open_low': True, 'open_high': False}
    """
    ranked = choice["ranked"]
    means = [s.mean for s in ranked if s.mean is not None and not s.diverged]
    tried, within = [s.setting for s in ranked], sorted(choice["within"])
    return {"n": len(ranked), "within": len(within), "diverged": sum(s.diverged > 0 for s in ranked),
            "settings_within": within, "low": min(means) if means else None,
            "high": max(means) if means else None,
            "open_low": within[0] == min(tried), "open_high": within[-1] == max(tried)}


ARMS = ("none_tuned", "agc", "norm")
"""The arms of a batch size's comparison: no clipping at its chosen learning rate, AGC, global-norm clipping."""


def verdicts(lines: list[dict[str, Any]], controls: list[dict[str, Any]],
             steps: int = BASE.steps) -> dict[int, dict[tuple[str, str], str | None]]:
    """Per batch size and pair of :data:`ARMS` (in that order): the arm whose chosen setting beats the other's on
    test accuracy by the book's rule (:func:`~gradclip_book.harness.select.beats`), or ``None`` for neither.

    At ``steps`` other than the grid's there is no tuned unclipped arm (the controls' lower learning rates are
    trained for 200 steps only), so only AGC against global clipping is compared there.
    """
    out: dict[int, dict[tuple[str, str], str | None]] = {}
    for batch, row in chosen_per_batch(lines, controls, steps, within=False).items():
        arms = [a for a in ARMS if a in row and (a != "none_tuned" or steps == BASE.steps)]
        out[batch] = {}
        for i, a in enumerate(arms):
            for b in arms[i + 1:]:
                x, y = row[a]["test"], row[b]["test"]
                out[batch][a, b] = a if harness.beats(x, y) else b if harness.beats(y, x) else None
    return out


def without_each_seed(verdict: Callable[[list[dict[str, Any]], list[dict[str, Any]]], Any],
                      lines: list[dict[str, Any]], controls: list[dict[str, Any]]) -> dict[str, Any]:
    """``verdict(lines, controls)`` over all seeds and with each seed left out of both: ``{"all": value, "flips":
    [(seed, value without it)] for the seeds whose removal changes it}``. A verdict with no flips is robust."""
    value = verdict(lines, controls)
    flips = []
    for seed in sorted({line["config"]["seed"] for line in lines}):
        other = verdict([l for l in lines if l["config"]["seed"] != seed], [l for l in controls if l["config"]["seed"] != seed])
        if other != value:
            flips.append((seed, other))
    return {"all": value, "flips": flips}


def leave_one_seed_out(lines: list[dict[str, Any]], controls: list[dict[str, Any]],
                       steps: int = BASE.steps) -> dict[str, Any]:
    """Each verdict of :func:`verdicts` over all seeds, and again with each seed left out of the grid and the controls.

    A verdict (one arm better, or neither) is *robust* when every leave-one-seed-out subset gives the same verdict;
    otherwise no result of that comparison is robust, and ``flips`` says which seed's removal gives which verdict.

    Returns ``{"seeds", "all": verdicts over all seeds, "without": {seed: verdicts}, "robust": {batch: {pair:
    bool}}, "flips": {batch: {pair: [(seed, verdict without it)]}}}``.
    """
    seeds = sorted({line["config"]["seed"] for line in lines})
    everything = verdicts(lines, controls, steps)
    without = {s: verdicts([l for l in lines if l["config"]["seed"] != s],
                           [l for l in controls if l["config"]["seed"] != s], steps) for s in seeds}
    flips = {batch: {pair: [(s, without[s][batch][pair]) for s in seeds if without[s][batch][pair] != verdict]
                     for pair, verdict in row.items()} for batch, row in everything.items()}
    return {"seeds": seeds, "all": everything, "without": without, "flips": flips,
            "robust": {batch: {pair: not f for pair, f in row.items()} for batch, row in flips.items()}}


def robust_verdicts(loso: dict[str, Any], pair: tuple[str, str]) -> dict[str, Any]:
    """One comparison of :func:`leave_one_seed_out` sorted by batch size into what survives leaving out any one seed.

    Returns ``{"wins": {batch: arm robustly better}, "ties": [batches where neither is better at every subset],
    "fragile": {batch: (verdict over all seeds, [(seed, verdict without it)])}}``: at a fragile batch size there is
    no robust winner.
    """
    out: dict[str, Any] = {"wins": {}, "ties": [], "fragile": {}}
    for batch, row in loso["all"].items():
        verdict = row[pair]
        if not loso["robust"][batch][pair]:
            out["fragile"][batch] = (verdict, loso["flips"][batch][pair])
        elif verdict is None:
            out["ties"].append(batch)
        else:
            out["wins"][batch] = verdict
    return out


# --- structure-aware clipping: cost and DP-SGD ------------------------------------------------------


def _gradients(config: cls.RunConfig = BASE, batch: int = 64) -> tuple[nn.Module, list[torch.Tensor]]:
    """The harness's model for ``config`` and the gradients of one training minibatch (cloned)."""
    model = cls.build_model(config)
    x, y = harness.image_split(config.split_seed)["train"]
    nn.functional.cross_entropy(model(x[:batch]), y[:batch]).backward()
    return model, [p.grad.detach().clone() for p in model.parameters()]


def clip_costs(repeats: int = 30, config: cls.RunConfig = BASE) -> dict[str, dict[str, float]]:
    """Median time of one call of each clipping function on the same gradients, interleaved, and its ratio to global.

    Each round restores the gradients (untimed) and times every method once, in turn, so a slow
    moment of a shared machine hits all of them alike. Thresholds are chosen so every method
    scales its gradients: global norm 0.1, per-tensor norm 0.01, block RMS 1e-4, AGC lambda 0.001.

    Returns ``{method: {"seconds": median, "ratio": median / global's median}}``.
    """
    model, saved = _gradients(config)
    params = list(model.parameters())
    agc_params = gradclip.agc_parameters(model)
    calls: dict[str, Callable[[], Any]] = {
        "global": lambda: gradclip.clip_grad_norm_(params, 0.1),
        "per_tensor": lambda: gradclip.clip_grad_norm_per_tensor_(params, 0.01),
        "block_rms": lambda: gradclip.clip_grad_block_rms_(params, 1e-4),
        "agc": lambda: gradclip.adaptive_clip_grad_(agc_params, clip_factor=0.001),
    }
    def restore() -> None:
        for p, g in zip(params, saved):
            p.grad.copy_(g)

    with harness.deterministic():
        ms = timing.interleaved(calls, repeats, before=restore)
    return {name: {"seconds": t / 1000, "ratio": t / ms["global"]} for name, t in ms.items()}


def _loop_clipped(model: nn.Module, x: torch.Tensor, y: torch.Tensor, max_norm: float) -> list[torch.Tensor]:
    """The reference DP-SGD gradient: one backward pass per example, each clipped to ``max_norm``, averaged.

    The forward pass runs once over the whole batch, as gradclip's does, so both see the same activations:
    two forward passes of different batch shapes round differently, and a ReLU pre-activation within float32
    rounding of zero (5e-8 in one digit of chapter 5's batch) then switches a unit on in one and off in the
    other, which changed that example's gradient by 60% under MKL's AVX2 kernels.
    """
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    losses = nn.functional.cross_entropy(model(x), y, reduction="none")
    for i in range(len(y)):
        grads = torch.autograd.grad(losses[i], params, retain_graph=i + 1 < len(y))
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        factor = min(1.0, max_norm / (float(norm) + 1e-6))  # the same guard as gradclip and Opacus
        for t, g in zip(total, grads):
            t.add_(g, alpha=factor)
    return [t / len(y) for t in total]


def per_sample_check(config: cls.RunConfig = BASE, batch: int = 64, max_norm: float = 1.0,
                     repeats: int = 5) -> dict[str, Any]:
    """gradclip's per-sample clipping (``method="auto"``) against a per-example loop on one minibatch.

    Same clipped gradient (largest absolute difference), and the median times of each, interleaved,
    next to an ordinary ``loss.backward()`` plus ``clip_grad_norm_`` on the same batch.
    """
    model = cls.build_model(config)
    x, y = harness.image_split(config.split_seed)["train"]
    x, y = x[:batch], y[:batch]
    params = list(model.parameters())

    def fast() -> list[torch.Tensor]:
        for p in params:
            p.grad = None
        gradclip.per_sample_clip_grad_(model, nn.functional.cross_entropy, x, y, max_norm=max_norm)
        return [p.grad.clone() for p in params]

    def plain() -> None:
        for p in params:
            p.grad = None
        nn.functional.cross_entropy(model(x), y).backward()
        gradclip.clip_grad_norm_(params, max_norm)

    out: dict[str, Any] = {}  # the last clipped gradients of each side, compared below
    calls = {"fast": lambda: out.__setitem__("fast", fast()),
             "loop": lambda: out.__setitem__("loop", _loop_clipped(model, x, y, max_norm)),
             "plain": plain}
    with harness.deterministic():
        median = {name: t / 1000 for name, t in timing.interleaved(calls, repeats).items()}
    scale = max(float(g.abs().max()) for g in out["loop"])
    diff = max(float((a - b).abs().max()) for a, b in zip(out["fast"], out["loop"]))
    return {"max_abs_difference": diff, "relative_difference": diff / scale, "seconds": median,
            "speedup": median["loop"] / median["fast"], "versus_plain": median["fast"] / median["plain"],
            "batch": batch, "max_norm": max_norm}


def dp_train(noise_multiplier: float = 1.0, max_norm: float = 1.0, steps: int = 300, batch: int = 64,
             lr: float = 0.5, depth: int = 2, seed: int = 0, clipping_fn: str = "abadi",
             clipping: str = "flat") -> dict[str, Any]:
    """Train a ReLU MLP (width 64, He init) on the digits with DP-SGD through ``gradclip.per_sample_clip_grad_``.

    Each step: every example's gradient clipped to ``max_norm``, summed, Gaussian noise of standard
    deviation ``noise_multiplier * max_norm`` added, divided by the batch size (Abadi et al. 2016),
    then plain SGD. The minibatches are a seeded shuffle (not Poisson sampling, so no privacy budget is
    claimed). ``noise_multiplier=0`` gives per-sample clipping without noise. The loop is the book's harness
    (:func:`gradclip_book.harness.train`) with a loss function that fills the gradients itself.

    ``clipping_fn="automatic"`` normalises every example instead (AUTO-S, Bu et al. 2023: factor
    ``max_norm / (norm + 0.01)``); ``clipping="per_layer"`` gives each of the K trainable tensors the threshold
    ``max_norm / sqrt(K)``, so an example's clipped gradient, and the noise, have the flat run's bound ``max_norm``.

    Returns the validation and test accuracy, the share of examples (of example-tensor pairs with
    ``"per_layer"``) whose norm exceeded its threshold, and the wall seconds.
    """
    config = replace(cls.DEFAULT, depth=depth, seed=seed)
    noise = torch.Generator().manual_seed(seed + 1)
    clipped: list[float] = []

    def private_gradient(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Fills ``p.grad`` with the noisy clipped mean (no backward by the harness); returns the batch's loss."""
        xb, yb = batch
        tensors = sum(p.requires_grad for p in model.parameters())
        threshold = max_norm if clipping == "flat" else max_norm / math.sqrt(tensors)
        norms = gradclip.per_sample_clip_grad_(model, nn.functional.cross_entropy, xb, yb,
                                               max_norm=threshold if clipping == "flat" else [threshold] * tensors,
                                               noise_multiplier=noise_multiplier, generator=noise,
                                               clipping=clipping, clipping_fn=clipping_fn)
        clipped.append(float((norms > threshold).float().mean()))
        with torch.no_grad():
            return nn.functional.cross_entropy(model(xb), yb)

    with harness.deterministic():
        parts = harness.image_split(config.split_seed)
        model = cls.build_model(config)
        run = harness.train(model, torch.optim.SGD(model.parameters(), lr=lr),
                            harness.minibatches(*parts["train"], batch, seed), steps, loss_fn=private_gradient,
                            evaluate=harness.accuracy_evaluator(parts), divergence=None, threads=None)
    return {"val_accuracy": run.metrics["val_accuracy"], "test_accuracy": run.metrics["test_accuracy"],
            "clipped_share": float(np.mean(clipped)), "seconds": run.seconds, "noise_multiplier": noise_multiplier,
            "max_norm": max_norm, "clipping_fn": clipping_fn, "clipping": clipping, "steps": steps, "batch": batch,
            "lr": lr, "depth": depth, "seed": seed}


# --- DP-SGD since 2023: method="auto", automatic clipping, per-layer thresholds ---------------------

DP_FILE = ROOT / "chapters" / "data" / "dp_methods.json"
DP_COMMAND = "python -m gradclip_book.scalability dp"
DP_SEEDS = tuple(range(10))
"""Seeds of the DP-SGD comparison (each seed: the model's initialisation, the shuffle and the noise)."""
DP_SIGMA = 1.0
"""The noise multiplier of every run of the comparison."""
DP_ARMS: tuple[dict[str, Any], ...] = (
    {"clipping_fn": "abadi", "clipping": "flat", "max_norm": 0.1},
    {"clipping_fn": "abadi", "clipping": "flat", "max_norm": 1.0},
    {"clipping_fn": "abadi", "clipping": "flat", "max_norm": 10.0},
    {"clipping_fn": "abadi", "clipping": "per_layer", "max_norm": 1.0},
    {"clipping_fn": "automatic", "clipping": "flat", "max_norm": 1.0},
)
"""Abadi clipping at three thresholds C a decade apart; per-layer thresholds C/sqrt(K) with the flat bound C = 1
(the same noise); automatic clipping (AUTO-S, gamma 0.01) with C = 1, which only scales the step."""


def arm_name(arm: dict[str, Any]) -> str:
    """``"abadi C=1"``, ``"per-layer C=1"`` or ``"automatic"``: one arm of :data:`DP_ARMS`."""
    if arm["clipping_fn"] == "automatic":
        return "automatic"
    return f"{'abadi' if arm['clipping'] == 'flat' else 'per-layer'} C={arm['max_norm']:g}"


def dp_cnn(seed: int = 0) -> nn.Module:
    """A small CNN for the 8x8 digits: two 3x3 convolutions without padding (16 and 32 channels, ReLU), a linear head."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(32 * 4 * 4, 10))


def method_times(repeats: int = 30, batch: int = 64, max_norm: float = 1.0) -> dict[str, dict[str, Any]]:
    """Median ms of one ``per_sample_clip_grad_`` call with ``method`` "auto", "ghost" and "vmap", interleaved.

    On chapter 5.2's depth-8 MLP (:data:`BASE`) and on :func:`dp_cnn`, one training minibatch of ``batch``
    digits, no noise. Also the largest difference of the "auto" and "ghost" clipped gradients from "vmap"'s,
    relative to the largest entry (they must agree).

    Returns ``{model: {"ms": {method: median}, "relative_difference": {method: ...}, "parameters": int}}``.
    """
    x, y = harness.image_split(BASE.split_seed)["train"]
    x, y = x[:batch], y[:batch]
    out: dict[str, dict[str, Any]] = {}
    for name, model in (("mlp", cls.build_model(BASE)), ("cnn", dp_cnn())):
        params = list(model.parameters())
        grads: dict[str, list[torch.Tensor]] = {}

        def call(method: str, model: nn.Module = model, params: list = params) -> None:
            for p in params:
                p.grad = None
            gradclip.per_sample_clip_grad_(model, nn.functional.cross_entropy, x, y, max_norm=max_norm, method=method)
            grads[method] = [p.grad for p in params]

        with harness.deterministic():
            ms = timing.interleaved({m: (lambda m=m: call(m)) for m in ("auto", "ghost", "vmap")}, repeats)
        scale = max(float(g.abs().max()) for g in grads["vmap"])
        out[name] = {"ms": ms, "parameters": sum(p.numel() for p in params),
                     "relative_difference": {m: max(float((a - b).abs().max()) for a, b in zip(grads[m], grads["vmap"]))
                                             / scale for m in ("auto", "ghost")}}
    return out


def dp_runs(seeds: Iterable[int] = DP_SEEDS, progress: bool = False) -> list[dict[str, Any]]:
    """:func:`dp_train` at noise multiplier :data:`DP_SIGMA` for every arm of :data:`DP_ARMS` and seed."""
    todo = [(arm, seed) for arm in DP_ARMS for seed in seeds]
    if progress:
        from tqdm import tqdm
        todo = tqdm(todo, desc="DP-SGD runs", unit="run")
    return [dp_train(noise_multiplier=DP_SIGMA, seed=seed, **arm) for arm, seed in todo]


def compute_dp(path: Path = DP_FILE) -> dict[str, Any]:
    """Writes :data:`DP_FILE`: :func:`method_times` and :func:`dp_runs` (with a progress bar), and the machine."""
    from . import reproducibility
    start = time.perf_counter()
    data = {"command": DP_COMMAND, "machine": reproducibility.machine(), "threads": torch.get_num_threads(),
            "method_times": method_times(), "runs": dp_runs(progress=True)}
    data["seconds"] = time.perf_counter() - start
    path.write_text(json.dumps(data, indent=1) + "\n")
    return data


def load_dp(path: Path = DP_FILE) -> dict[str, Any]:
    """The stored :data:`DP_FILE`."""
    return json.loads(path.read_text())


def _dp_values(runs: list[dict[str, Any]], metric: str) -> list[float]:
    """One accuracy per seed (DP-SGD runs never stop early: ``dp_train`` trains without a divergence check)."""
    return [float(r[metric]) for r in runs]


def dp_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The book's protocol on the DP-SGD runs: Abadi's threshold chosen on validation, then test compared once.

    Returns ``{"scores": {arm: test Score}, "val": {arm: validation Score}, "chosen": the Abadi arm chosen on
    validation, "automatic_beats": automatic beats the chosen Abadi arm on test, "abadi_beats": the reverse,
    "threshold_matters": the chosen Abadi threshold beats the worst of the three on test,
    "per_layer_beats" / "flat_beats": per-layer against flat Abadi at the same bound C = 1}``.
    """
    by_arm: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_arm.setdefault(arm_name(run), []).append(run)
    val = {arm: harness.score(arm, _dp_values(rs, VALIDATION)) for arm, rs in by_arm.items()}
    test = {arm: harness.score(arm, _dp_values(rs, TEST)) for arm, rs in by_arm.items()}
    flat = [arm_name(a) for a in DP_ARMS if a["clipping_fn"] == "abadi" and a["clipping"] == "flat"]
    chosen = harness.select_best([(arm, _dp_values(by_arm[arm], VALIDATION)) for arm in flat]).best.setting
    worst = min(flat, key=lambda arm: test[arm].mean)
    return {"scores": test, "val": val, "chosen": chosen, "worst": worst,
            "automatic_beats": harness.beats(test["automatic"], test[chosen]),
            "abadi_beats": harness.beats(test[chosen], test["automatic"]),
            "threshold_matters": harness.beats(test[chosen], test[worst]),
            "per_layer_beats": harness.beats(test["per-layer C=1"], test["abadi C=1"]),
            "flat_beats": harness.beats(test["abadi C=1"], test["per-layer C=1"])}


DP_LR_COMMAND = "python -m gradclip_book.scalability dp --lr-only"
DP_LRS = (0.25, 0.5, 1.0)
"""Where the learning-rate search of the DP-SGD comparison starts: :func:`dp_train`'s 0.5, halved and doubled.
An arm whose best rate on validation is the smallest (largest) it has tried is also tried at half (twice) that
rate, until its best has a worse rate on either side (:func:`dp_lr_runs`)."""
DP_LR_ARMS: tuple[dict[str, Any], ...] = tuple(a for a in DP_ARMS if a["clipping"] == "flat")
"""The arms whose learning rate is tuned: Abadi clipping at the three thresholds and automatic clipping."""


def _dp_key(run: dict[str, Any]) -> tuple[str, int, float]:
    return arm_name(run), int(run["seed"]), float(run["lr"])


def _dp_cells(runs: Iterable[dict[str, Any]], seeds: Iterable[int]) -> dict[tuple[str, float], list[dict[str, Any]]]:
    """``{(arm, lr): [run per seed]}`` for every arm and learning rate that has a run at each of ``seeds``."""
    by_key = {_dp_key(r): r for r in runs}
    seeds = list(seeds)
    cells = {(arm, lr) for arm, _, lr in by_key}
    return {(arm, lr): [by_key[(arm, s, lr)] for s in seeds] for arm, lr in sorted(cells)
            if all((arm, s, lr) in by_key for s in seeds)}


def _best_lr(runs: Iterable[dict[str, Any]], arm: str, seeds: Iterable[int]) -> float:
    """The learning rate of ``arm`` with the best validation accuracy over ``seeds`` (the book's selection rule)."""
    cells = _dp_cells(runs, seeds)
    return harness.select_best([(lr, _dp_values(rs, VALIDATION)) for (a, lr), rs in cells.items() if a == arm]
                               ).best.setting


def dp_lr_runs(stored: list[dict[str, Any]], seeds: Iterable[int] = DP_SEEDS, progress: bool = False,
               max_extensions: int = 8, save: Callable[[list[dict[str, Any]]], None] | None = None
               ) -> list[dict[str, Any]]:
    """The runs of every arm of :data:`DP_LR_ARMS` at every learning rate of :data:`DP_LRS` that ``stored`` lacks.

    An arm whose best rate on validation (over every rate it has at all ``seeds``, stored ones included) is the
    smallest (largest) it has also gets half (twice) that rate, up to ``max_extensions`` times, so that each arm's
    chosen rate has a worse tried rate on both sides (a local search: validation accuracy against the rate is
    assumed to have one peak). ``save``, if given, gets the new runs so far after each rate (to resume an
    interrupted computation).

    Raises:
        RuntimeError: an arm's best rate is still the edge of its rates after ``max_extensions`` extensions (the
            runs so far have gone to ``save``; rerun with a larger ``max_extensions`` to go on).
    """
    seeds = list(seeds)
    done = {_dp_key(r): r for r in stored}
    new: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(desc="DP-SGD runs over learning rates", unit="run")
    for arm in DP_LR_ARMS:
        name = arm_name(arm)
        lrs = sorted(set(DP_LRS) | {lr for a, lr in _dp_cells(done.values(), seeds) if a == name})
        for _ in range(max_extensions + 1):
            for lr in lrs:
                for seed in seeds:
                    if (name, seed, lr) not in done:
                        run = dp_train(noise_multiplier=DP_SIGMA, seed=seed, lr=lr, **arm)
                        done[_dp_key(run)] = run
                        new.append(run)
                        if bar is not None:
                            bar.update()
                if save is not None:
                    save(new)
            best = _best_lr(done.values(), name, seeds)
            if best == min(lrs):
                lrs.insert(0, best / 2)
            elif best == max(lrs):
                lrs.append(best * 2)
            else:
                break
        else:   # the rate just added was never run: the promise of a worse rate on both sides does not hold
            tried = sorted(lr for a, lr in _dp_cells(done.values(), seeds) if a == name)
            raise RuntimeError(f"{name}: the best learning rate {best:g} is still an edge of the rates tried "
                               f"({tried[0]:g} to {tried[-1]:g}) after {max_extensions} extensions")
    if bar is not None:
        bar.close()
    return new


def dp_lr_summary(runs: list[dict[str, Any]], seeds: Iterable[int] = DP_SEEDS) -> dict[str, Any]:
    """The DP-SGD comparison with each arm at its own learning rate, chosen on validation.

    ``runs``: the stored ``runs`` and ``lr_runs`` together. Returns ``{"lrs": {arm: rates tried}, "best_lr": {arm:
    rate chosen on validation}, "scores" / "val": {arm: test / validation Score at its chosen rate}, "chosen": the
    Abadi arm whose (threshold, rate) is best on validation, "automatic_beats" / "abadi_beats": automatic clipping
    against it on test, "threshold_matters": {other Abadi arm: the chosen one beats it, each at its own rate}}``.
    """
    cells = _dp_cells(runs, seeds)
    names = [arm_name(a) for a in DP_LR_ARMS]
    lrs = {arm: sorted(lr for a, lr in cells if a == arm) for arm in names}
    best_lr = {arm: _best_lr(runs, arm, seeds) for arm in names}
    test = {arm: harness.score(arm, _dp_values(cells[(arm, best_lr[arm])], TEST)) for arm in names}
    val = {arm: harness.score(arm, _dp_values(cells[(arm, best_lr[arm])], VALIDATION)) for arm in names}
    abadi = [arm for arm in names if arm != "automatic"]
    chosen = harness.select_best([(arm, _dp_values(cells[(arm, best_lr[arm])], VALIDATION)) for arm in abadi]
                                 ).best.setting
    return {"lrs": lrs, "best_lr": best_lr, "scores": test, "val": val, "chosen": chosen,
            "automatic_beats": harness.beats(test["automatic"], test[chosen]),
            "abadi_beats": harness.beats(test[chosen], test["automatic"]),
            "threshold_matters": {arm: harness.beats(test[chosen], test[arm]) for arm in abadi if arm != chosen}}


def compute_dp_lr(path: Path = DP_FILE) -> dict[str, Any]:
    """Adds to the stored :data:`DP_FILE` the runs of :func:`dp_lr_runs` it lacks (its other entries kept), saving
    after each learning rate: interrupted, it resumes."""
    from . import reproducibility
    start = time.perf_counter()
    data = load_dp(path)
    kept = data.setdefault("lr_runs", [])[:]
    data.update(lr_command=DP_LR_COMMAND, lr_machine=reproducibility.machine(), lr_threads=torch.get_num_threads())

    def save(new: list[dict[str, Any]]) -> None:
        data["lr_runs"] = kept + new
        data["lr_seconds"] = previous + time.perf_counter() - start   # over every invocation that added runs
        path.write_text(json.dumps(data, indent=1) + "\n")

    previous = float(data.get("lr_seconds", 0.0))
    save(dp_lr_runs(data["runs"] + kept, progress=True, save=save))
    return data


def _print_dp_lr(data: dict[str, Any]) -> None:
    summary = dp_lr_summary(data["runs"] + data["lr_runs"])
    for arm, s in summary["scores"].items():
        print(f"{arm:12s} lr {summary['best_lr'][arm]:g} of {summary['lrs'][arm]}: val {summary['val'][arm].mean:.4f} "
              f"test {s.mean:.4f} +- {s.std:.4f}")
    print({k: v for k, v in summary.items() if k not in ("scores", "val", "lrs")}, f"{data['lr_seconds']:.0f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gradclip_book.scalability", description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["grid", "controls", "dp"])
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="the file (default: the chapter's file of `what`)")
    parser.add_argument("--lr-only", action="store_true",
                        help="dp: only add the learning-rate comparison's missing runs to the stored file")
    args = parser.parse_args(argv)
    if args.what == "dp" and args.lr_only:
        torch.set_num_threads(1)
        _print_dp_lr(compute_dp_lr(args.out or DP_FILE))
        return
    if args.what == "dp":
        torch.set_num_threads(1)
        data = compute_dp(args.out or DP_FILE)
        for model, t in data["method_times"].items():
            print(model, {m: f"{v:.2f} ms" for m, v in t["ms"].items()}, t["relative_difference"])
        summary = dp_summary(data["runs"])
        for arm, s in summary["scores"].items():
            print(f"{arm:16s} val {summary['val'][arm].mean:.4f} test {s.mean:.4f} +- {s.std:.4f}")
        print({k: v for k, v in summary.items() if k not in ("scores", "val")}, f"{data['seconds']:.0f} s")
        _print_dp_lr(compute_dp_lr(args.out or DP_FILE))
        return
    configs = grid_configs() if args.what == "grid" else control_configs()
    out = args.out or (GRID_FILE if args.what == "grid" else CONTROLS_FILE)
    seconds = run_grid(configs, out, args.jobs)
    lines = load(out)
    print(f"{len(configs)} runs in {out} ({out.stat().st_size / 1e3:.0f} kB); this invocation took {seconds:.0f} s "
          f"with {args.jobs} processes; the stored runs' own wall times (one thread each) add up to "
          f"{sum(l['seconds'] for l in lines) / 60:.1f} minutes")
    if args.what == "grid":
        def mean(score: harness.Score) -> str:
            return "-" if score.mean is None else f"{score.mean:.3f}"

        for batch, row in chosen_per_batch(lines).items():
            print(f"batch {batch}: " + ", ".join(
                f"{m} {r['setting']} -> val {mean(r['val'])}, test {mean(r['test'])} ({r['val'].diverged} diverged)"
                for m, r in row.items()))


if __name__ == "__main__":
    main()
