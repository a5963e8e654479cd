r"""Chapter 4's figures and summaries, read from the precomputed grid (:func:`gradclip_book.grids.load`).

Everything here reads the stored runs of ``chapters/data/classification_grid.jsonl.gz`` (or, for the
analysis of section 4.4, trains a few steps with the harness's own pieces), and returns plain numbers,
:class:`~gradclip_book.figures.PlotlyFigure` objects or :class:`~gradclip_book.figures.Explorer` objects.
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
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import torch
from torch import nn

import gradclip

from . import classification as cls
from . import harness
from . import grids
from .depth import fit_layer_ratio
from .figures import PALETTE, Explorer, Param, PlotlyFigure, run_style, table_html

__all__ = [
    "EXPLORER_METHODS",
    "HEADLINE",
    "LABELS",
    "accuracy_table_html",
    "explosion_figure",
    "grid_config",
    "grid_explorer",
    "grid_frame",
    "live_frame",
    "grid_run",
    "headline_runs",
    "headline_summary",
    "layer_profile",
    "layer_figure",
    "rescue_explorer",
    "stability_figure",
    "threshold_figure",
    "warmup_thresholds",
]

LABELS = {
    "none": "no clipping", "value": "value", "norm": "global norm", "agc": "AGC", "autoclip": "AutoClip",
    "zclip": "ZClip", "soft": "soft norm", "spike-guard": "spike guard",
}
"""Each method's short name in figures and tables."""

HEADLINE: list[tuple[str, float | None]] = list(dict.fromkeys(
    [("none", None), ("norm", grids.HARD_THRESHOLD)] + [(m, ts[1]) for m, ts in grids.THRESHOLDS.items()]))
"""The (method, threshold) pairs run at the hard setting for the headline seeds, in the grid's order."""

EXPLORER_METHODS = ("none",) + grids.GRID_METHODS
"""The methods of the interactive grid (its buttons)."""

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


def accuracy_table_html(rows: Sequence[dict[str, Any]]) -> str:
    """An HTML table: method, its knob and threshold, test accuracy mean +- std, diverged seeds, share clipped."""
    head = ["method", "knob = threshold", "test accuracy (mean &plusmn; std)", "seeds diverged", "steps clipped"]
    body = []
    for row in rows:
        knob = "&ndash;" if row["threshold"] is None else f"{cls.METHODS[row['method']].knob} = {row['threshold']:g}"
        if row["mean"] is not None:
            acc = f"{100 * row['mean']:.1f}% &plusmn; {100 * row['std']:.1f}"
        else:
            trained = [a for a in row["accuracies"] if a is not None]
            acc = "diverged" if not trained else "per seed: " + ", ".join(
                "div." if a is None else f"{100 * a:.0f}%" for a in row["accuracies"])
        n = len(row["accuracies"])
        body.append([row["label"], knob, acc, f"{row['diverged']} of {n}", f"{100 * row['clip_fraction']:.0f}%"])
    caption = f"Test accuracy at depth 16, lr 0.5, over seeds {grids.HEADLINE_SEEDS[0]}&ndash;{grids.HEADLINE_SEEDS[-1]}"
    return table_html(head, body, caption)  # rows become labelled cards on a phone


# --- curves ------------------------------------------------------------------------------------------


def _spacing(run: dict[str, Any]) -> int:
    """Steps per stored point of a run's curves (the harness stores short runs step by step)."""
    steps = run["curve_step"]
    return steps[1] - steps[0] if len(steps) >= 2 else 1


def _coarse(run: dict[str, Any], points: int, factor: int | None = None) -> dict[str, Any]:
    """The run's curves merged ``factor`` points at a time, by default down to at most ``points`` bins
    (mean loss, max norm, mean clipped)."""
    steps, loss = run["curve_step"], [_num(v) for v in run["loss"]]
    norm, fired = [_num(v) for v in run["grad_norm"]], [_num(v) for v in run["clipped"]]
    factor = factor or max(1, math.ceil(len(steps) / points))
    if factor == 1:
        return {"step": steps, "loss": loss, "norm": norm, "clipped": fired}
    groups = [range(i, min(i + factor, len(steps))) for i in range(0, len(steps), factor)]

    out = {"step": [steps[g[0]] for g in groups]}
    out["loss"] = [float(np.mean([loss[j] for j in g])) for g in groups]
    out["norm"] = [max(norm[j] for j in g) for g in groups]
    out["clipped"] = [float(np.mean([fired[j] for j in g])) for g in groups]
    return out


# On a logarithmic step axis step s is drawn at s + LOG_SHIFT (step 0 has no logarithm); the tick
# labels give the steps themselves.
LOG_SHIFT = 1


def _xs(steps: list[int], shift: int = 0) -> dict[str, Any]:
    """``x0``/``dx`` when the steps are evenly spaced (a much lighter page), else the ``x`` array."""
    if len(steps) >= 2 and all(b - a == steps[1] - steps[0] for a, b in zip(steps, steps[1:])):
        return {"x0": steps[0] + shift, "dx": steps[1] - steps[0]}
    return {"x": [s + shift for s in steps]}


# A curve of this many points or fewer is drawn with markers too: a single point drawn as a line is invisible.
SHORT_CURVE = 3


def _curves(run: dict[str, Any], points: int = cls.CURVE_POINTS, shift: int = 0,
            spacing: int | None = None) -> dict[str, Any]:
    """Plot-ready curves of a run; ``spacing``: bin them to this many steps per point (to match another run)."""
    factor = max(1, spacing // _spacing(run)) if spacing else None
    c = _coarse(run, points, factor)
    fired_norm = [n if f and f > 0 else None for n, f in zip(c["norm"], c["clipped"])]
    mode = {"mode": "lines+markers"} if len(c["step"]) <= SHORT_CURVE else {}
    return {"xs": {**_xs(c["step"], shift), **mode}, "loss": [_r4(v) for v in c["loss"]],
            "norm": [_r4(v) for v in c["norm"]],
            "fired": [_r4(v) for v in fired_norm] if any(v is not None for v in fired_norm) else []}


def _common_spacing(runs: Sequence[dict[str, Any]], points: int = cls.CURVE_POINTS) -> int:
    """The steps per plotted point of the most coarsely binned run: bin every run alike, so that
    runs that share their first steps share their first points."""
    return max(_spacing(r) * max(1, math.ceil(len(r["curve_step"]) / points)) for r in runs)


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


def describe(run: dict[str, Any]) -> str:
    """One sentence about a stored run: where it diverged, or its test accuracy and share of clipped steps."""
    if run["diverged_at"] is not None:
        loss = _num(run["diverged_loss"])
        shown = "not a number" if loss is None or not math.isfinite(loss) else f"{loss:.3g}"
        return f"Diverged at step {run['diverged_at']} (training loss {shown})."
    acc, frac = _num(run["test_accuracy"]), _num(run["clip_fraction"])
    return (f"Ran all {run['steps_run']} steps without diverging: test accuracy {100 * acc:.1f}%, clipped at "
            f"{100 * frac:.0f}% of steps.")


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


# The right panel's markers where a method fired (scaled, clamped or skipped the step).
FIRED_TRACE = {"mode": "markers", "name": "the method fired", "xaxis": "x2", "yaxis": "y2",
               "marker": {"symbol": "circle-open", "size": 7, "color": "#009E73", "line": {"width": 1.5}}}


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


def rescue_explorer() -> Explorer:
    """Each headline method against no clipping at the hard setting, per seed: loss, norms and clipping events."""
    methods = [(m, t) for m, t in HEADLINE if m != "none"]
    names = [f"{m}@{t:g}" for m, t in methods]
    shown = {f"{m}@{t:g}": f"{LABELS[m]} {t:g}" for m, t in methods}

    def compute(method: str, seed: int) -> dict:
        name, t = method.split("@")
        run = run_of(replace(grids.HARD, method=name, threshold=float(t), seed=seed))
        plain = run_of(replace(grids.HARD, seed=seed))
        spacing = _common_spacing([run, plain])
        c = _curves(run, shift=LOG_SHIFT, spacing=spacing)
        p = _curves(plain, shift=LOG_SHIFT, spacing=spacing)
        note = [f"{shown[method]} ({cls.METHODS[name].knob} = {float(t):g}), seed {seed}: {describe(run)}",
                f"Without clipping this seed: {describe(plain)}"]
        if c["loss"] == p["loss"] and c["norm"] == p["norm"]:
            note.append("The two runs are identical here: the dashed line lies on the solid one.")
        # the method's run first, the unclipped run drawn over it (dashed, so both show where they coincide)
        return {"traces": [
            {"y": c["loss"], **c["xs"]}, {"y": p["loss"], **p["xs"]}, _divergence(run, LOG_SHIFT),
            _divergence(plain, LOG_SHIFT),
            {"y": c["norm"], **c["xs"]}, {"y": p["norm"], **p["xs"]}, {"y": c["fired"], **c["xs"]},
        ], "note": note}

    traces = [
        run_style("clipped", name="with the method", mode="lines"),
        run_style("plain", name="no clipping", mode="lines"),
        {"mode": "markers", "name": "diverged (method)", "marker": {"symbol": "x", "size": 17, "color": "#0072B2"}},
        {"mode": "markers", "name": "diverged (no clipping)",
         "marker": {"symbol": "x-open", "size": 11, "color": "#D55E00", "line": {"width": 2}}},
        run_style("clipped", name="with the method", mode="lines", xaxis="x2", yaxis="y2", showlegend=False),
        run_style("plain", name="no clipping", mode="lines", xaxis="x2", yaxis="y2", showlegend=False),
        dict(FIRED_TRACE),
    ]
    layout = _two_panels(log_steps_to=grids.HARD.steps)
    return Explorer(
        "cls-rescue",
        [Param("method", names, label="method", default=names[0], fmt=lambda v: shown[v]),
         Param("seed", list(grids.HEADLINE_SEEDS), label="seed", default=0, fmt="d")],
        compute=compute, traces=traces, layout=layout, share_traces=True, label="fig-cls-rescue",
        caption="Each clipping method at the hard setting (depth 16, learning rate 0.5, 300 steps of SGD with "
                "momentum) against the same seed without clipping. First panel (left, or top on a phone): training "
                "loss (mean over each plotted bin of steps); second panel: the largest gradient norm before clipping in each bin, with open circles "
                "where the method fired in the bin. A cross marks where a run diverged and stopped. The step axes are "
                "logarithmic, so that runs that stop in the first few steps stay visible beside runs of all 300.")


# --- the stable region and the threshold -------------------------------------------------------------


def stability_figure(table: dict[int, dict[str, float | None]]) -> PlotlyFigure:
    """Largest stable lr per depth without clipping and with global-norm clipping (from :func:`grids.stable_lrs`)."""
    depths = sorted(table)
    traces = []
    for method, kind, name in (("none", "plain", "no clipping"),
                               ("norm", "clipped", f"global norm, max_norm = {grids.HARD_THRESHOLD:g}")):
        traces.append(run_style(kind, x=depths, y=[table[d][method] for d in depths], mode="lines+markers",
                                name=name, marker={"size": 9, "symbol": "circle" if kind == "clipped" else "square"}))
    lrs = grids.STABILITY_LRS
    layout = {"height": 400, "xaxis": {"title": {"text": "depth (hidden layers)"}, "tickvals": depths},
              "yaxis": {"type": "log", "title": {"text": "largest stable learning rate"},
                        "range": [math.log10(lrs[0] / 1.6), math.log10(lrs[-1] * 1.6)]}}
    return PlotlyFigure(traces, layout, name="cls-stability", label="fig-cls-stability",
                        caption="The largest learning rate (of 0.025 to 1.6, doubling) at which every one of "
                                f"{len(grids.STABILITY_SEEDS)} seeds trains (no divergence and test accuracy at least "
                                "90%), per depth, without clipping and with global-norm clipping. A depth without a "
                                "point has no such learning rate on the scan.")


def warmup_thresholds(config: cls.RunConfig, steps: int, quantiles: Sequence[float] = (0.5, 0.9)) -> dict[str, Any]:
    """Run ``config`` unclipped and apply :func:`gradclip.suggest_threshold` to its first ``steps`` norms (past only).

    Returns ``{"record": RunRecord, "norms": the first steps' norms, "suggested": {q: threshold}}``.
    """
    record = cls.train(replace(config, method="none", threshold=None))
    norms = record.grad_norm[:steps]
    suggested = {q: float(gradclip.suggest_threshold(norms, q=q)) for q in quantiles}
    return {"record": record, "norms": norms, "suggested": suggested}


def threshold_figure(depth: int, lr: float, suggested: dict[float, float]) -> PlotlyFigure:
    """Test accuracy against the global-norm threshold at ``depth``, ``lr`` (grid, seed 0, and headline seeds)."""
    ts = grids.THRESHOLDS["norm"]
    accs = [_num(grid_run(depth, lr, "norm", t)["test_accuracy"]) for t in ts]
    traces = [run_style("clipped", x=list(ts), y=[None if a is None else 100 * a for a in accs],
                        mode="lines+markers", name="global norm, seed 0", marker={"size": 9})]
    heads = [(t, headline_runs("norm", t)) for t in sorted({t for m, t in HEADLINE if m == "norm"})]
    traces.append(run_style("reference", x=[t for t, _ in heads],
                            y=[100 * np.mean([_num(r["test_accuracy"]) or 0 for r in runs]) for _, runs in heads],
                            error_y={"type": "data", "array": [100 * np.std([_num(r["test_accuracy"]) or 0 for r in runs])
                                                               for _, runs in heads], "visible": True},
                            mode="markers", name=f"mean ± std over {len(grids.HEADLINE_SEEDS)} seeds",
                            marker={"size": 9, "symbol": "diamond"}))
    styles = {0.5: run_style("other", mode="lines"), 0.9: run_style("plain", mode="lines")}
    for q, c in suggested.items():
        traces.append({**styles.get(q, run_style("other", mode="lines")), "x": [c, c], "y": [0, 100],
                       "name": f"suggest_threshold, q = {q:g}"})
    # room on both sides, so that no vertical line sits on the plot's edge
    xs = list(ts) + list(suggested.values())
    x_range = [math.log10(min(xs) / 2), math.log10(max(xs) * 2)]
    layout = {"height": 400, "xaxis": {"type": "log", "title": {"text": "max_norm (global-norm threshold)"},
                                       "range": x_range},
              "yaxis": {"title": {"text": "test accuracy (%)"}, "range": [0, 100]}}
    return PlotlyFigure(traces, layout, name="cls-threshold", label="fig-cls-threshold",
                        caption=f"Test accuracy after global-norm clipping at depth {depth}, learning rate {lr:g}, "
                                "against the threshold max_norm (a diverged run counts as 0%). Vertical lines: the "
                                "thresholds gradclip.suggest_threshold gives from the gradient norms of an "
                                "unclipped warm-up run.")


# --- section 4.4: per-layer gradients ----------------------------------------------------------------


def layer_profile(config: cls.RunConfig, steps: int = 1) -> dict[str, Any]:
    """Per-layer gradient norms (:class:`gradclip.GradientMonitor`) over the first ``steps`` + 1 steps of ``config``.

    Replays :func:`gradclip_book.classification.train`'s loop (same model, optimizer, clipping method and batch
    order) for ``steps`` optimizer steps and records after each ``backward()`` and once more after the last step.
    Returns ``{"norms": [per step, per layer (input layer first, head last)], "total": [global norm per step],
    "ratio": [per step, fitted per-layer ratio over the hidden layers], "gain": [per step, the geometric
    mean over hidden layers 2..D of the forward gain ||h_l|| / ||h_(l-1)|| of the activations on that minibatch]}``; the ratio r > 1 means the weight
    gradients grow towards the input, r < 1 that they shrink.
    """
    with harness.deterministic():
        x, y = harness.image_split(config.split_seed)["train"]
        model = cls.build_model(config)
        params = list(model.parameters())
        optimizer = cls.OPTIMIZERS[config.optimizer](params, config.lr)
        clip = cls.METHODS[config.method].build(model, optimizer, config.threshold)
        monitor = gradclip.GradientMonitor(model)
        outputs: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(lambda mod, inp, out: outputs.append(out.detach()))
                 for m in model if isinstance(m, type(model[1]))]
        gains = []
        batches = harness.batch_indices(len(y), config.batch, config.seed)
        totals = []
        for step in range(steps + 1):
            index = next(batches)
            optimizer.zero_grad(set_to_none=True)
            outputs.clear()
            nn.functional.cross_entropy(model(x[index]), y[index]).backward()
            sizes = [float(o.norm()) for o in outputs]
            gains.append(float(np.exp(np.mean(np.log(np.array(sizes[1:]) / np.array(sizes[:-1]))))))
            monitor.record(step)
            totals.append(float(gradclip.get_total_norm([p.grad for p in params])))
            if step < steps:
                clip()
                optimizer.step()
        rows = monitor.table()
        for hook in hooks:
            hook.remove()
    norms = [[r["grad_norm"] for r in rows if r["step"] == s] for s in range(steps + 1)]
    # weight-gradient norms listed input-first; fit_layer_ratio expects the values for l = 0..L with the
    # backward direction running from L to 0, so the hidden layers' list is passed as is
    ratios = [fit_layer_ratio(n[:-1]) for n in norms]
    return {"norms": norms, "total": totals, "ratio": ratios, "gain": gains}


def layer_figure(profiles: dict[str, dict[str, Any]]) -> PlotlyFigure:
    """Per-layer gradient norms, one line per named profile (``{"name": layer_profile(...) step index}``)."""
    traces = []
    for name, norms in profiles.items():
        # the book's convention: no clipping vermillion dashed, clipped blue solid, the rest neutral
        kind = "plain" if "no clipping" in name else "clipped" if "clipped" in name else "reference"
        traces.append(run_style(kind, x=list(range(1, len(norms) + 1)), y=list(norms),
                                mode="lines+markers", name=name, marker={"size": 6}))
    layout = {"height": 400, "xaxis": {"title": {"text": "layer (1 = input layer, last = head)"}},
              "yaxis": {"type": "log", "title": {"text": "gradient norm of the layer's weights and bias"}}}
    return PlotlyFigure(traces, layout, name="cls-layers", label="fig-cls-layers",
                        caption="Per-layer gradient norms of the depth-16 network (recorded with "
                                "gradclip.GradientMonitor) on the first minibatch of seed 0: at initialisation, "
                                "and on the second minibatch after one step of SGD at learning rate 0.5, "
                                "with and without global-norm clipping.")


# --- the interactive grid ----------------------------------------------------------------------------


GRID_POINTS = 50
"""Points per curve in the interactive grid (the stored runs have up to 150; fewer keep the page light)."""

LEVEL_NAMES = ["1 (tightest)", "2", "3", "4 (loosest)"]


def grid_config(depth: int, lr: float, level: int, method: str) -> cls.RunConfig:
    """The grid's run for one state of :func:`grid_explorer`'s controls (seed 0)."""
    t = None if method == "none" else grids.THRESHOLDS[method][level]
    return replace(grids.HARD, depth=depth, lr=lr, method=method, threshold=t)


def grid_frame(run: dict[str, Any], points: int = GRID_POINTS) -> dict:
    """The explorer frame of one run (a stored grid line, or ``RunRecord.to_json()`` of a fresh run)."""
    c = run["config"]
    method, t = c["method"], c["threshold"]
    curves = _curves(run, points, shift=LOG_SHIFT)
    what = "No clipping" if t is None else f"{LABELS[method]} clipping with {cls.METHODS[method].knob} = {t:g}"
    what = what[0].upper() + what[1:]
    note = [f"{what}, depth {c['depth']}, learning rate {c['lr']:g}: {describe(run)}"]
    if t is None:
        note.append("(The threshold slider does nothing without clipping.)")
    # the slider's position read as this method's own threshold
    shown = {"level": "off" if t is None else f"{t:g}"}
    return {"traces": [{"y": curves["loss"], **curves["xs"]}, _divergence(run, LOG_SHIFT),
                       {"y": curves["norm"], **curves["xs"]},
                       {"y": curves["fired"], **curves["xs"]}], "note": note, "shown": shown}


def live_frame(depth: int, lr: float, level: int, method: str) -> dict:
    """A fresh training run (about a second) for one state of the controls, as an explorer frame."""
    return grid_frame(cls.train(grid_config(depth, lr, level, method)).to_json())


def grid_explorer(points: int = GRID_POINTS) -> Explorer:
    """Depth, learning rate and threshold sliders and method buttons over the stored grid (seed 0)."""

    def compute(depth: int, lr: float, level: int, method: str) -> dict:
        return grid_frame(run_of(grid_config(depth, lr, level, method)), points)

    # one run in both panels: one colour (chapter 4's orange dashes mean "no clipping" elsewhere)
    traces = [
        run_style("clipped", name="training loss", mode="lines"),
        {"mode": "markers", "name": "diverged", "marker": {"symbol": "x", "size": 15, "color": "#0072B2"}},
        run_style("clipped", name="gradient norm", mode="lines", xaxis="x2", yaxis="y2", showlegend=False),
        dict(FIRED_TRACE),
    ]
    layout = _two_panels(log_steps_to=grids.HARD.steps)
    return Explorer(
        "cls-grid",
        [Param("depth", list(grids.DEPTHS), label="depth", default=grids.HARD.depth, fmt="d"),
         Param("lr", list(grids.LRS), label="learning rate", default=grids.HARD.lr, fmt="g"),
         Param("level", [0, 1, 2, 3], label="threshold", default=0, fmt=lambda i: LEVEL_NAMES[i]),
         Param("method", list(EXPLORER_METHODS), label="method", default="norm", fmt=lambda m: LABELS[m])],
        compute=compute, traces=traces, layout=layout, share_traces=True, data_file=True, label="fig-cls-grid",
        caption="One stored training run (seed 0, ReLU MLP of width 64, SGD with momentum 0.9, batch 64, 300 "
                "steps) per combination of the controls. First panel (left, or top on a phone): training loss; "
                "second panel: largest gradient norm before "
                "clipping per bin of steps, open circles where the method fired. A cross marks a divergence. Step "
                "axes are logarithmic, so that runs that stop in the first few steps stay visible. The "
                "threshold slider picks one of each method's four thresholds, from tightest to loosest (value "
                "0.001-0.03, global norm 0.1-3, AGC 0.01-0.3, AutoClip percentile 10-90, ZClip z 1.5-3), and "
                "shows the chosen method's value.")
