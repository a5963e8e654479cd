r"""The deep-MLP runs' readers and figures (:func:`gradclip_book.grids.load`): chapter 4's first illustration, and
the stored runs chapters 5.1 and 6 read.

Everything here reads the stored runs of ``chapters/data/classification_grid.jsonl.gz`` (and, for
:func:`mlp_best_vs_best`, chapter 5.1's ``optimization_grid.jsonl.gz``) and returns plain numbers or
:class:`~gradclip_book.figures.PlotlyFigure` objects. Chapter 4's CNN experiments are in
:mod:`gradclip_book.images_figures`.
This module is not part of the grid's code version (``classification.code_version()``), so editing it
never makes the stored grid stale.

Example:
    >>> from gradclip_book import classification_figures as cf
    >>> rows = cf.headline_summary()
    >>> rows[0]["method"], len(rows[0]["accuracies"])
    ('none', 5)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from . import classification as cls
from . import grids
from .figures import PALETTE, PlotlyFigure

__all__ = [
    "HEADLINE",
    "LABELS",
    "better",
    "explosion_figure",
    "grid_config",
    "grid_run",
    "headline_runs",
    "headline_summary",
    "lines",
    "mlp_best_vs_best",
    "run_of",
]

LABELS = {
    "none": "no clipping", "value": "value", "norm": "global norm", "agc": "AGC", "autoclip": "AutoClip",
    "zclip": "ZClip", "soft": "soft norm", "spike-guard": "spike guard",
}
"""Each method's short name in figures and tables."""

HEADLINE: list[tuple[str, float | None]] = list(dict.fromkeys(
    [("none", None), ("norm", grids.HARD_THRESHOLD)] + [(m, ts[1]) for m, ts in grids.THRESHOLDS.items()]))
"""The (method, threshold) pairs run at the hard setting for the headline seeds, in the grid's order."""

DASHES = ["solid", "dash", "dot", "dashdot", "longdash"]


_num = grids.number


def _r4(value: float | None) -> float | None:
    """4 significant digits; non-finite -> None (JSON null)."""
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.4g}")


@functools.lru_cache(maxsize=2)
def _lines() -> tuple[dict[str, Any], ...]:
    return tuple(grids.load())


def lines() -> list[dict[str, Any]]:
    """Every stored run of the grid file (cached), each run once."""
    seen: dict[str, dict[str, Any]] = {}
    for line in _lines():
        seen.setdefault(line["key"], line)
    return list(seen.values())


@functools.lru_cache(maxsize=None)
def _by_key() -> dict[str, dict[str, Any]]:
    return {line["key"]: line for line in lines()}


def run_of(config: cls.RunConfig) -> dict[str, Any]:
    """The stored run of ``config``; ``KeyError`` naming the config when the grid lacks it."""
    try:
        return _by_key()[cls.config_key(config)]
    except KeyError:
        raise KeyError(f"the grid has no run {config}; recompute it with `{grids.COMMAND}`") from None


def grid_run(depth: int, lr: float, method: str, threshold: float | None, seed: int = 0) -> dict[str, Any]:
    """The stored run at ``depth``, ``lr`` with ``method`` at ``threshold`` (the hard setting's other fields)."""
    return run_of(replace(grids.HARD, depth=depth, lr=lr, method=method, threshold=threshold, seed=seed))


def headline_runs(method: str, threshold: float | None) -> list[dict[str, Any]]:
    """The stored runs of ``method`` at the hard setting, one per headline seed, in seed order."""
    return [run_of(replace(grids.HARD, method=method, threshold=threshold, seed=s)) for s in grids.HEADLINE_SEEDS]


def headline_summary() -> list[dict[str, Any]]:
    """Per headline (method, threshold): accuracies per seed (``None`` when diverged) and their summary.

    Keys: ``method``, ``threshold``, ``label``, ``accuracies``, ``diverged_at`` (per seed), ``diverged``
    (count), ``mean``, ``std`` (population std over the seeds; ``None`` unless every seed trained),
    ``clip_fraction`` (mean over seeds of the share of steps that fired, over the steps run).
    """
    rows = []
    for method, threshold in HEADLINE:
        runs = headline_runs(method, threshold)
        accs = [_num(r["test_accuracy"]) for r in runs]
        done = [a for a in accs if a is not None]
        rows.append({
            "method": method, "threshold": threshold, "label": LABELS[method], "accuracies": accs,
            "diverged_at": [r["diverged_at"] for r in runs], "diverged": sum(a is None for a in accs),
            "mean": float(np.mean(done)) if len(done) == len(accs) else None,
            "std": float(np.std(done)) if len(done) == len(accs) else None,
            "clip_fraction": float(np.mean([_num(r["clip_fraction"]) for r in runs])),
        })
    return rows


def better(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """``a`` beats ``b``: both trained every seed and a's mean exceeds b's by more than the larger seed std."""
    if a["mean"] is None or b["mean"] is None:
        return False
    return a["mean"] - b["mean"] > max(a["std"], b["std"])


# --- curves ------------------------------------------------------------------------------------------


# On a logarithmic step axis step s is drawn at s + LOG_SHIFT (step 0 has no logarithm); the tick
# labels give the steps themselves.
LOG_SHIFT = 1


def _divergence(run: dict[str, Any], shift: int = 0) -> dict[str, Any]:
    """A marker trace update at the step and loss that stopped a diverged run (empty otherwise)."""
    if run["diverged_at"] is None:
        return {"x": [], "y": []}
    loss = _num(run["diverged_loss"])
    y = loss if loss is not None and math.isfinite(loss) else cls.DIVERGED_LOSS
    return {"x": [run["diverged_at"] + shift], "y": [_r4(y)]}


def _log_step_axis(last_step: int, title: str = "step (logarithmic)") -> dict[str, Any]:
    """A logarithmic x axis over steps 0..last_step (drawn at step + LOG_SHIFT), ticks labelled with the steps.

    A run that diverges at step 2 then takes a fifth of the axis instead of a sliver at
    its left edge, while a run of all the steps is still drawn whole.
    """
    # about evenly spaced on the log axis, few enough to stay level on a phone
    ticks = [s for s in (0, 1, 3, 10, 30, 100, 300, 1000) if s <= last_step]
    return {"type": "log", "title": {"text": title}, "tickangle": 0,
            "range": [math.log10(LOG_SHIFT * 0.9), math.log10((last_step + LOG_SHIFT) * 1.05)],
            "tickvals": [s + LOG_SHIFT for s in ticks], "ticktext": [str(s) for s in ticks]}


def _two_panels(x_title: str = "step", height: int = 430, x_range: list[float] | None = None,
                log_steps_to: int | None = None) -> dict[str, Any]:
    """Loss (left) and gradient norm before clipping (right), both log, over the same step range.

    ``log_steps_to``: a logarithmic step axis up to this step (see :func:`_log_step_axis`).
    """
    axis = {"title": {"text": x_title}} if x_range is None else {"title": {"text": x_title}, "range": list(x_range)}
    if log_steps_to is not None:
        axis = _log_step_axis(log_steps_to)
    return {
        "height": height,
        "xaxis": {"domain": [0, 0.46], "anchor": "y", **axis},
        "yaxis": {"type": "log", "title": {"text": "training loss (nats)"}, "anchor": "x"},
        "xaxis2": {"domain": [0.56, 1], "anchor": "y2", **axis},
        "yaxis2": {"type": "log", "title": {"text": "gradient norm before clipping"}, "anchor": "x2"},
    }


def explosion_figure(steps: int = 30) -> PlotlyFigure:
    """Unclipped runs at the hard setting, one per headline seed: loss and gradient norm per step, divergence marked."""
    traces = []
    for i, run in enumerate(headline_runs("none", None)):
        seed = run["config"]["seed"]
        colour, dash = PALETTE[i % len(PALETTE)], DASHES[i % len(DASHES)]
        n = min(steps, run["steps_run"])
        xs = [s + LOG_SHIFT for s in run["curve_step"][:n]]
        style = {"line": {"color": colour, "dash": dash, "width": 2}, "legendgroup": f"s{seed}"}
        traces.append({"x": xs, "y": [_num(v) for v in run["loss"][:n]], "mode": "lines+markers",
                       "name": f"seed {seed}", **style, "marker": {"size": 4}})
        traces.append({"x": xs, "y": [_num(v) for v in run["grad_norm"][:n]],
                       "mode": "lines+markers", "name": f"seed {seed}", "showlegend": False, "xaxis": "x2",
                       "yaxis": "y2", **style, "marker": {"size": 4}})
        traces.append({**_divergence(run, LOG_SHIFT), "mode": "markers", "name": f"seed {seed} diverged",
                       "showlegend": False, "legendgroup": f"s{seed}",
                       "marker": {"symbol": "x", "size": 12, "color": colour, "line": {"width": 1}}})
    # one legend entry for every seed's cross, in a neutral colour
    traces.append({"x": [None], "y": [None], "mode": "markers", "name": "diverged (in the seed's colour)",
                   "marker": {"symbol": "x", "size": 12, "color": "#777777"}})
    layout = _two_panels(log_steps_to=steps)
    return PlotlyFigure(traces, layout, name="cls-explosion", label="fig-cls-explosion",
                        caption="No clipping at the hard setting (ReLU MLP of depth 16, width 64, SGD with momentum "
                                "0.9 at learning rate 0.5), one line per seed. First panel (left, or top on a phone): training loss of each "
                                f"step's minibatch; second panel: the global gradient norm of that step. A cross marks the loss "
                                f"that stopped a run (non-finite or above {cls.DIVERGED_LOSS:g}). All axes are "
                                "logarithmic; only the first steps are shown.")


def grid_config(depth: int, lr: float, level: int, method: str) -> cls.RunConfig:
    """The grid's seed-0 run at ``depth``, ``lr`` with ``method`` at its ``level``-th threshold (0 = tightest)."""
    t = None if method == "none" else grids.THRESHOLDS[method][level]
    return replace(grids.HARD, depth=depth, lr=lr, method=method, threshold=t)


# --- chapter 4's first illustration: best against best on the deep MLP (chapter 5.1's stored grid) -----------------


def mlp_best_vs_best(threshold_choices: Sequence[float] = (0.1, 1.0)) -> dict[str, Any]:
    """At the MLP's hard depth, the best unclipped learning rate against the best clipped (lr, max_norm).

    Read from chapter 5.1's stored runs (``grids.optimization_configs``, section ``"warmup"`` without warm-up: SGD
    with momentum at :data:`grids.SGD_LRS`, no clipping or max_norm 0.1 or 1, seeds :data:`grids.OPT_SEEDS`).
    Both are chosen on validation accuracy over the seeds (:func:`gradclip_book.harness.select_best`); returns
    ``{"plain": {...}, "clipped": {...}, "seeds"}`` with, per side, ``config``, ``val`` and ``test``
    (:class:`~gradclip_book.harness.Score`) and ``clip_fraction`` (mean over seeds).
    """
    from . import harness, performance as perf

    def side(candidates):
        choice = harness.select_best([(c, harness.values_of(
            [_as_line(perf.opt_run(replace(c, seed=s))) for s in grids.OPT_SEEDS], "val_accuracy"))
            for c in candidates])
        best = choice.best.setting
        found = [perf.opt_run(replace(best, seed=s)) for s in grids.OPT_SEEDS]
        return {"config": best, "val": choice.best,
                "test": harness.score(best, harness.values_of([_as_line(r) for r in found], "test_accuracy")),
                "clip_fraction": float(np.mean([_num(r["clip_fraction"]) for r in found]))}

    plain = side([replace(grids.HARD, lr=lr) for lr in grids.SGD_LRS])
    clipped = side([replace(grids.HARD, lr=lr, method="norm", threshold=t) for lr in grids.SGD_LRS
                    for t in sorted(threshold_choices, reverse=True)])
    return {"plain": plain, "clipped": clipped, "seeds": len(grids.OPT_SEEDS)}


def _as_line(run: dict[str, Any]) -> dict[str, Any]:
    """A stored deep-MLP run in the harness's line shape (``diverged_at`` and ``metrics``), for its selection rules."""
    return {"diverged_at": run["diverged_at"],
            "metrics": {k: _num(run[k]) for k in ("val_accuracy", "test_accuracy") if run[k] is not None}}
