r"""Chapter 4's analysis and figures, read from the stored runs of :mod:`gradclip_book.images_grid`.

Every comparison follows the book's protocol (:mod:`gradclip_book.harness.select`): a setting (learning rate,
threshold, warm-up) is chosen on *validation* accuracy over the seeds it was run with; *test* accuracy is then
reported once, for the chosen settings; one setting beats another only when the gap in mean test accuracy
exceeds the larger of the two seed standard deviations (or when only the other has a diverged seed).

A run *trains* when it does not diverge and ends at :data:`TRAINS` validation accuracy or more; a learning rate
trains when every seed does. Where a method fires on most steps (:func:`regime`), it takes a normalised, smaller
step; where it fires on few, it acts as a guard against rare large gradients.

Nothing here is part of the grid's code version (:func:`gradclip_book.images.code_version`): editing it never
makes a stored run stale.

Example:
    >>> from gradclip_book import images_figures as imf
    >>> imf.regime(0.9), imf.regime(0.04), imf.regime(0.3)
    ('most steps', 'rare steps', 'some steps')
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from . import harness, images
from . import images_grid as ig
from .figures import PALETTE, Explorer, Param, PlotlyFigure, and_list, run_style, seed_range, table_html
from .harness import Score, beats, curves, score, select_best, values_of
from .images import ImageConfig

__all__ = [
    "LABELS", "MODEL_LABELS", "TRAINS", "choose", "clip_or_lower", "regime", "replicated", "runs", "scores",
    "stable_lrs", "standing", "summary_of",
]

TRAINS = 0.5
"""A run trains when it does not diverge and ends at this validation accuracy or more: five times guessing (0.1). A
learning rate trains when every seed does (a setting that fails for one seed in five is not one to rely on)."""

MODEL_LABELS = {"plain": "plain CNN", "plain+bn": "plain CNN + BatchNorm", "residual": "residual CNN",
                "residual+bn": "residual CNN + BatchNorm"}
LABELS = {"none": "no clipping", "norm": "global norm", "value": "value", "agc": "AGC", "autoclip": "AutoClip",
          "zclip": "ZClip", "soft": "soft norm", "spike-guard": "spike guard"}


def regime(fraction: float) -> str:
    """The words for a share of clipped steps: ``"most steps"`` above 1/2, ``"rare steps"`` at 1/10 or less.

    Example:
        >>> regime(0.5), regime(0.1)
        ('some steps', 'rare steps')
    """
    if fraction > 0.5:
        return "most steps"
    if fraction <= 0.1:
        return "rare steps"
    return "some steps"


def runs(config: ImageConfig, seeds: Sequence[int] = ig.SEEDS) -> list[dict[str, Any]]:
    """The stored runs of ``config`` for each seed of ``seeds``, in order."""
    return [images.stored(replace(config, seed=s)) for s in seeds]


def scores(config: ImageConfig, metric: str = "val_accuracy", seeds: Sequence[int] = ig.SEEDS) -> Score:
    """The :class:`~gradclip_book.harness.Score` of ``config`` over ``seeds`` (``None`` for a diverged seed)."""
    return score(config, values_of(runs(config, seeds), metric))


def trains(config: ImageConfig, seeds: Sequence[int] = ig.SEEDS) -> bool:
    """Every seed of ``config`` finishes at :data:`TRAINS` validation accuracy or more."""
    values = scores(config, seeds=seeds).values
    return all(v is not None and v >= TRAINS for v in values)


def choose(candidates: Sequence[ImageConfig], seeds: Sequence[int] = ig.SEEDS) -> harness.Selection:
    """The best of ``candidates`` on validation accuracy over ``seeds`` (the book's rule; list the most
    conservative first)."""
    return select_best([(c, values_of(runs(c, seeds), "val_accuracy")) for c in candidates])


def unclipped(base: ImageConfig, lrs: Sequence[float] = ig.LRS) -> list[ImageConfig]:
    """``base`` without clipping at each learning rate, smallest first."""
    return [replace(base, lr=lr, method="none", threshold=None) for lr in lrs]


def clipped(base: ImageConfig, lrs: Sequence[float] = ig.LRS,
            thresholds: Sequence[float] = ig.THRESHOLDS) -> list[ImageConfig]:
    """``base`` with global-norm clipping at each (learning rate, threshold), smallest lr and loosest threshold first."""
    return [replace(base, lr=lr, method="norm", threshold=c) for lr in lrs for c in sorted(thresholds, reverse=True)]


def summary_of(config: ImageConfig, seeds: Sequence[int] = ig.SEEDS) -> dict[str, Any]:
    """Validation and test accuracy (mean, std, per seed), diverged seeds and share of clipped steps of ``config``."""
    lines = runs(config, seeds)
    val, test = score(config, values_of(lines, "val_accuracy")), score(config, values_of(lines, "test_accuracy"))
    return {"config": config, "val": val, "test": test, "diverged": val.diverged,
            "clip_fraction": float(np.mean([float(line["clip_fraction"]) for line in lines])),
            "lines": lines}


def clip_or_lower(base: ImageConfig, seeds: Sequence[int] = ig.SEEDS, choice_seeds: Sequence[int] | None = None,
                  lrs: Sequence[float] = ig.LRS, thresholds: Sequence[float] = ig.THRESHOLDS,
                  rare: bool = False, plain_choice_seeds: Sequence[int] | None = None) -> dict[str, Any]:
    """Best against best for one network: the best unclipped learning rate against the best clipped (lr, threshold).

    Both are chosen on validation accuracy over ``choice_seeds`` (default ``seeds``; the unclipped side over
    ``plain_choice_seeds`` when given) and then summarised over ``seeds``. With ``rare``, the clipped candidates are
    only those that clip on rare steps (some, but at most 10% of the steps, averaged over ``choice_seeds``): clipping
    as a guard, not as a smaller step. Returns ``{"plain": summary, "clipped": summary, "regime": words for the
    clipped run's share of clipped steps, "verdict": "clipping" | "lower lr" | "no difference" (on test accuracy, by the book's rule),
    "rescue": True when the best unclipped setting does not train and the best clipped one does}``.
    """
    choice_seeds = seeds if choice_seeds is None else choice_seeds
    plain_seeds = choice_seeds if plain_choice_seeds is None else plain_choice_seeds
    plain = summary_of(choose(unclipped(base, lrs), plain_seeds).best.setting, seeds)
    candidates = clipped(base, lrs, thresholds)
    if rare:
        candidates = [c for c in candidates if 0 < summary_of(c, choice_seeds)["clip_fraction"] <= 0.1]
        if not candidates:
            return {"plain": plain, "clipped": None, "regime": None, "verdict": None, "rescue": False}
    clip = summary_of(choose(candidates, choice_seeds).best.setting, seeds)
    return _judged(plain, clip, seeds)


def _judged(plain: dict[str, Any], clip: dict[str, Any], seeds: Sequence[int]) -> dict[str, Any]:
    """:func:`clip_or_lower`'s result for two summaries over ``seeds``: the verdict and the rescue."""
    if beats(clip["test"], plain["test"]):
        verdict = "clipping"
    elif beats(plain["test"], clip["test"]):
        verdict = "lower lr"
    else:
        verdict = "no difference"
    rescue = not trains(plain["config"], seeds) and trains(clip["config"], seeds)
    return {"plain": plain, "clipped": clip, "regime": regime(clip["clip_fraction"]), "verdict": verdict,
            "rescue": rescue}


def replicated(case: dict[str, Any], seeds: Sequence[int] = ig.REPLICATION_SEEDS) -> dict[str, Any]:
    """A :func:`clip_or_lower` case judged again at ``seeds`` (by default the seeds no choice saw): the same two
    settings, summarised and compared over ``seeds`` alone; the result has :func:`clip_or_lower`'s keys."""
    return _judged(summary_of(case["plain"]["config"], seeds), summary_of(case["clipped"]["config"], seeds), seeds)


def standing(case: dict[str, Any], again: dict[str, Any], *more: dict[str, Any]) -> dict[str, Any]:
    """The verdict that stands when a case (:func:`clip_or_lower`) is judged again at other seeds, one or more groups
    of them (:func:`replicated`): a verdict other than ``"no difference"`` stands only if every seed group gives it,
    and a rescue only if every group is a rescue; otherwise ``"no difference"`` and no rescue.

    Example:
        >>> standing({"verdict": "clipping", "rescue": True}, {"verdict": "no difference", "rescue": True})
        {'verdict': 'no difference', 'rescue': True}
        >>> standing({"verdict": "clipping", "rescue": True}, {"verdict": "clipping", "rescue": True},
        ...          {"verdict": "clipping", "rescue": False})
        {'verdict': 'clipping', 'rescue': False}
    """
    groups = (again, *more)
    return {"verdict": harness.standing_verdict([g["verdict"] for g in (case, *groups)]),
            "rescue": bool(case["rescue"] and all(g["rescue"] for g in groups))}


def stable_lrs(base: ImageConfig, method: str = "none", threshold: float | None = None,
               lrs: Sequence[float] = ig.LRS, seeds: Sequence[int] = ig.SEEDS) -> list[float]:
    """The learning rates of ``lrs`` at which every seed of ``base`` (with ``method`` at ``threshold``) trains."""
    return [lr for lr in lrs if trains(replace(base, lr=lr, method=method, threshold=threshold), seeds)]


def range_words(lrs: Sequence[float], scan: Sequence[float] = ig.LRS) -> str:
    """A set of learning rates in words: ``"0.01 to 0.1"`` for neighbours on the scan, else a list; ``"none"``.

    Example:
        >>> range_words([0.01, 0.03, 0.1]), range_words([0.003, 0.1]), range_words([])
        ('0.01 to 0.1', '0.003 and 0.1', 'none')
    """
    if not lrs:
        return "none"
    if len(lrs) == 1:
        return f"{lrs[0]:g}"
    positions = [list(scan).index(lr) for lr in lrs]
    if positions == list(range(positions[0], positions[0] + len(lrs))):
        return f"{lrs[0]:g} to {lrs[-1]:g}"
    return and_list([f"{lr:g}" for lr in lrs])


def pct(x: float | None, digits: int = 1) -> str:
    """A fraction as a percentage for the prose: ``pct(0.9361) == "93.6%"``; ``"diverged"`` for ``None``.

    Example:
        >>> pct(0.93611), pct(None)
        ('93.6%', 'diverged')
    """
    return "diverged" if x is None else f"{100 * x:.{digits}f}%"


def mean_std(s: Score) -> str:
    """``"93.6% ± 1.2"`` (mean and sample standard deviation over the seeds that finished, in points), with
    the diverged seeds named.

    Example:
        >>> mean_std(score("x", [0.9, 0.92, None]))
        '91.0% ± 1.4 (1 of 3 diverged)'
    """
    if s.mean is None:
        return f"all {s.seeds} diverged"
    text = f"{100 * s.mean:.1f}% ± {100 * s.std:.1f}"
    return text + (f" ({s.diverged} of {s.seeds} diverged)" if s.diverged else "")


# --- curves ---------------------------------------------------------------------------------------------------

DRAWN_POINTS = 50
"""Points per drawn curve: every step of a run of up to 50 steps, log-spaced bins beyond (:func:`~harness.log_bins`)."""


def _r4(value: Any) -> float | None:
    """4 significant digits; non-finite or missing -> ``None`` (a gap in the line)."""
    if value is None:
        return None
    value = float(value)
    return float(f"{value:.4g}") if math.isfinite(value) else None


_DRAWN: dict[tuple[str, int], dict[str, list]] = {}


@functools.lru_cache(maxsize=None)
def _edges(steps: int, points: int) -> tuple[int, ...]:
    return tuple(curves.log_bins(steps, points))


def _rebin(curve: dict[str, list], steps: int, points: int, steps_run: int) -> dict[str, list]:
    """What :func:`gradclip_book.harness.rebin` computes, with the bin edges searched for once per (steps, points):
    a page draws hundreds of runs of the same length. Checked against it by ``tests/book/test_images.py``."""
    if steps_run <= points:
        return {k: list(curve[k]) for k in ("step", "loss", "grad_norm", "clipped")}
    edges = np.array(_edges(steps, points))
    starts = np.array(curve["step"])
    ends = np.append(starts[1:], steps_run)
    bins = np.searchsorted(edges, starts, side="right") - 1
    weights = (ends - starts).astype(float)
    values = {k: np.array([math.nan if v is None else float(v) for v in curve[k]]) for k in ("loss", "grad_norm",
                                                                                             "clipped")}
    out: dict[str, list] = {"step": [], "loss": [], "grad_norm": [], "clipped": []}
    for b in np.unique(bins):
        members = bins == b
        w = weights[members]
        norms = values["grad_norm"][members]
        finite = norms[np.isfinite(norms)]
        out["step"].append(int(starts[members][0]))
        out["loss"].append(curves.round_float(float(np.sum(values["loss"][members] * w) / w.sum())))
        out["grad_norm"].append(curves.round_float(float(finite.max())) if len(finite) else "nan")
        out["clipped"].append(curves.round_float(float(np.sum(values["clipped"][members] * w) / w.sum())))
    return out


def drawn_curve(line: dict[str, Any], points: int = DRAWN_POINTS) -> dict[str, list]:
    """A stored run's curve as drawn: :func:`gradclip_book.harness.rebin` to ``points`` log bins (a run of at most
    ``points`` steps step by step), x = step + 1 for a logarithmic axis, values to 4 digits (cached per stored run)."""
    cached = _DRAWN.get((line.get("key", ""), points)) if "key" in line else None
    if cached is not None:
        return cached
    c = _rebin(line["curve"], line["steps"], points, line["steps_run"])
    drawn = {"x": [s + 1 for s in c["step"]], "loss": [_r4(v) for v in c["loss"]],
             "norm": [_r4(v) for v in c["grad_norm"]], "clipped": [_r4(v) for v in c["clipped"]]}
    if "key" in line:
        _DRAWN[line["key"], points] = drawn
    return drawn


def _cross(line: dict[str, Any]) -> dict[str, list]:
    """The diverged marker (a cross at the step and loss that stopped the run); empty for a run that finished."""
    if line["diverged_at"] is None:
        return {"x": [], "y": []}
    loss = _r4(line["diverged_loss"])
    return {"x": [line["diverged_at"] + 1], "y": [loss if loss is not None else harness.DIVERGED_LOSS]}


def _step_axis(steps: int) -> dict[str, Any]:
    ticks = [s for s in (0, 1, 3, 10, 30, 100, 300, 1000) if s <= steps]
    return {"type": "log", "title": {"text": "step (logarithmic)"}, "tickangle": 0,
            "range": [math.log10(0.9), math.log10((steps + 1) * 1.05)],
            "tickvals": [s + 1 for s in ticks], "ticktext": [str(s) for s in ticks]}


def two_panels(steps: int, height: int = 430) -> dict[str, Any]:
    """Training loss (left) and the gradient norm before clipping (right), both logarithmic, over the steps."""
    axis = _step_axis(steps)
    return {
        "height": height,
        "xaxis": {"domain": [0, 0.46], "anchor": "y", **axis},
        "yaxis": {"type": "log", "title": {"text": "training loss (nats)"}, "anchor": "x"},
        "xaxis2": {"domain": [0.56, 1], "anchor": "y2", **axis},
        "yaxis2": {"type": "log", "title": {"text": "gradient norm before clipping"}, "anchor": "x2"},
    }


CROSS = {"symbol": "x", "size": 13, "line": {"width": 1}}  # a diverged run, nothing else
"""The book's marker for a diverged run: a cross at the step and loss that stopped it."""
DIVERGED_LEGEND = {"mode": "markers", "name": "diverged (in the seed's colour)", "marker": {**CROSS, "color": "#777777"}}
"""The one legend entry for the crosses of a figure, in a neutral grey (each cross is drawn in its run's colour)."""
FIRED = {"mode": "markers", "name": "clipped (in that bin)", "xaxis": "x2", "yaxis": "y2",
         "marker": {"symbol": "circle-open", "size": 7, "color": "#009E73", "line": {"width": 1.5}}}


def describe(line: dict[str, Any]) -> str:
    """One sentence about a stored run: where it diverged, or its accuracies and share of clipped steps."""
    if line["diverged_at"] is not None:
        loss = _r4(line["diverged_loss"])
        shown = "not a number" if loss is None else f"{loss:.3g}"
        return f"Diverged at step {line['diverged_at']} (training loss {shown}, above {harness.DIVERGED_LOSS:g})."
    m, fraction = line["metrics"], float(line["clip_fraction"])
    text = f"Validation accuracy {pct(m['val_accuracy'])}, test {pct(m['test_accuracy'])}"
    if line["config"]["method"] != "none":
        text += f"; clipped at {100 * fraction:.0f}% of the steps ({regime(fraction)})"
    return text + "."


# --- figure: the residual CNN explodes --------------------------------------------------------------------------


def explosion_explorer() -> Explorer:
    """The residual CNN without normalisation, no clipping: loss and gradient norm per step for every seed, with
    depth and learning-rate sliders."""
    seeds = ig.SEEDS

    def compute(depth: int, lr: float) -> dict:
        lines = runs(replace(ig.HEADLINE, depth=depth, lr=lr), seeds)
        traces = []
        for line in lines:
            c = drawn_curve(line)
            traces.append({"x": c["x"], "y": c["loss"]})
        for line in lines:
            c = drawn_curve(line)
            traces.append({"x": c["x"], "y": c["norm"]})
        traces += [_cross(line) for line in lines]
        traces.append({"x": [None], "y": [None]})   # the legend's grey cross stays empty
        diverged = [line["config"]["seed"] for line in lines if line["diverged_at"] is not None]
        vals = [line["metrics"].get("val_accuracy") for line in lines if line["diverged_at"] is None]
        first = [float(line["curve"]["grad_norm"][0]) for line in lines]
        note = [f"Depth {depth}, learning rate {lr:g}: the first gradient's norm is {min(first):.3g} to "
                f"{max(first):.3g} over the seeds."]
        if diverged:
            note.append(f"{len(diverged)} of {len(lines)} seeds diverged (at steps "
                        + ", ".join(str(line["diverged_at"]) for line in lines if line["diverged_at"] is not None)
                        + ").")
        if vals:
            note.append(f"The {len(vals)} that finished end at {pct(min(vals))} to {pct(max(vals))} validation "
                        f"accuracy{' (guessing gives 10%)' if min(vals) < 0.2 else ''}.")
        return {"traces": traces, "note": note}

    base = []
    for i, s in enumerate(seeds):
        style = {"line": {"color": PALETTE[i], "width": 2}, "legendgroup": f"s{s}", "mode": "lines"}
        base.append({**style, "name": f"seed {s}"})
    for i, s in enumerate(seeds):
        base.append({"line": {"color": PALETTE[i], "width": 2}, "legendgroup": f"s{s}", "mode": "lines",
                     "name": f"seed {s}", "showlegend": False, "xaxis": "x2", "yaxis": "y2"})
    for i, s in enumerate(seeds):
        base.append({"mode": "markers", "name": f"seed {s} diverged", "showlegend": False, "legendgroup": f"s{s}",
                     "marker": {**CROSS, "color": PALETTE[i]}})
    # one legend entry for every seed's cross, in a neutral colour (the book's convention, as in Figure 4.1)
    base.append(dict(DIVERGED_LEGEND))
    return Explorer(
        "cls-explode", [Param("depth", list(ig.DEPTHS), label="depth", default=ig.HARD.depth, fmt="d"),
                        Param("lr", list(ig.LRS), label="learning rate", default=0.3, fmt="g")],
        compute=compute, traces=base, layout=two_panels(ig.HEADLINE.steps), label="fig-cls-explode",
        caption=f"The residual CNN without normalisation (width {ig.HEADLINE.width}, He initialisation), trained "
                f"without clipping by SGD with momentum 0.9, {ig.HEADLINE.steps} steps of {ig.HEADLINE.batch} "
                f"images, one line per seed ({seed_range(seeds)}). First panel (left, or top on a phone): "
                "training loss; second panel: the global gradient norm before the step. Each point is one step "
                f"for the first steps, then the mean loss and the largest norm of a bin of steps. A cross marks "
                f"the loss that stopped a diverged run (above {harness.DIVERGED_LOSS:g} or not a number). All "
                "axes are logarithmic.")


def norm_histogram(norms: Sequence[float], percentiles: dict[float, float], title: str) -> PlotlyFigure:
    """A histogram of one run's unclipped gradient norms (logarithmic bins), with its percentiles as lines."""
    values = np.array([n for n in norms if math.isfinite(n)])
    edges = np.logspace(math.log10(values.min() * 0.9), math.log10(values.max() * 1.1), 31)
    counts, _ = np.histogram(values, bins=edges)
    centres = np.sqrt(edges[:-1] * edges[1:])
    traces = [{"type": "bar", "x": [float(f"{c:.4g}") for c in centres], "y": counts.tolist(),
               "width": [float(f"{w:.4g}") for w in np.diff(edges) * 0.95], "name": "steps",
               "marker": {"color": "#56B4E9"}}]
    styles = ["dot", "dash", "solid", "dashdot"]
    top = int(counts.max()) + 1
    for i, (q, v) in enumerate(sorted(percentiles.items())):
        traces.append({"x": [v, v], "y": [0, top], "mode": "lines", "name": f"{q:g}th percentile = {v:.3g}",
                       "line": {"color": PALETTE[[1, 3, 5, 7][i % 4]], "dash": styles[i % 4], "width": 2}})
    layout = {"height": 380, "bargap": 0, "xaxis": {"type": "log", "title": {"text": "gradient norm before clipping"}},
              "yaxis": {"title": {"text": "steps"}, "range": [0, top]}}
    return PlotlyFigure(traces, layout, name="cls-histogram", label="fig-cls-histogram", caption=title)


# --- figure: every stored run of the explorer grid ----------------------------------------------------------------

EXPLORER_METHODS = ("none", "norm")


def explore_config(model: str, method: str, depth: int, lr: float, threshold: float) -> ImageConfig:
    """The stored seed-0 run for one state of :func:`grid_explorer`'s controls (``threshold`` ignored without
    clipping)."""
    t = None if method == "none" else threshold
    return ImageConfig(model=model, depth=depth, lr=lr, method=method, threshold=t)


def grid_frame(line: dict[str, Any]) -> dict:
    """The explorer frame of one run (a stored line, or ``Run.to_json()`` with its config of a fresh run)."""
    c = line["config"]
    curve = drawn_curve(line)
    fired = [n if f else None for n, f in zip(curve["norm"], curve["clipped"])]
    what = (f"{MODEL_LABELS[c['model']]}, depth {c['depth']}, learning rate {c['lr']:g}, "
            + ("no clipping" if c["method"] == "none" else f"global-norm clipping at max_norm {c['threshold']:g}"))
    note = [what[0].upper() + what[1:] + ".", describe(line)]
    frame = {"traces": [{"x": curve["x"], "y": curve["loss"]}, _cross(line), {"x": curve["x"], "y": curve["norm"]},
                        {"x": curve["x"] if any(v is not None for v in fired) else [], "y": [v for v in fired]
                         if any(v is not None for v in fired) else []},
                        {"x": [None], "y": [None]}],   # the legend's grey cross stays empty
             "note": note}
    if c["method"] == "none":   # the threshold slider says "off" rather than a threshold no run used
        note.append("(The threshold slider does nothing without clipping.)")
        frame["shown"] = {"threshold": "off"}
    return frame


def live_frame(model: str, method: str, depth: int, lr: float, threshold: float) -> dict:
    """A fresh run (a few seconds) for one state of the controls, as an explorer frame (the notebook's live mode)."""
    from dataclasses import asdict

    config = explore_config(model, method, depth, lr, threshold)
    return grid_frame({"config": asdict(config), **images.run(config).to_json()})


def grid_explorer() -> Explorer:
    """Model and method buttons, depth, learning-rate and threshold sliders over the stored seed-0 runs."""

    def compute(model: str, method: str, depth: int, lr: float, threshold: float) -> dict:
        return grid_frame(images.stored(explore_config(model, method, depth, lr, threshold)))

    traces = [
        run_style("clipped", name="training loss", mode="lines"),
        {"mode": "markers", "name": "diverged", "showlegend": False, "marker": {**CROSS, "color": "#0072B2"}},
        run_style("clipped", name="gradient norm", mode="lines", xaxis="x2", yaxis="y2", showlegend=False),
        dict(FIRED),
        dict(DIVERGED_LEGEND, name="diverged (in the run's colour)"),
    ]
    return Explorer(
        "cls-grid",
        [Param("model", list(images.MODELS), label="network", default="residual", fmt=lambda m: MODEL_LABELS[m]),
         Param("method", list(EXPLORER_METHODS), label="clipping", default="norm", fmt=lambda m: LABELS[m]),
         Param("depth", list(ig.DEPTHS), label="depth", default=ig.HEADLINE.depth, fmt="d"),
         Param("lr", list(ig.LRS), label="learning rate", default=0.1, fmt="g"),
         Param("threshold", list(ig.THRESHOLDS), label="max_norm", default=1.0, fmt="g")],
        compute=compute, traces=traces, layout=two_panels(ig.HEADLINE.steps), share_traces=True, data_file=True,
        label="fig-cls-grid",
        caption=f"One stored run (seed 0) per combination of the controls: width {ig.HEADLINE.width}, He "
                f"initialisation, SGD with momentum 0.9, {ig.HEADLINE.steps} steps of {ig.HEADLINE.batch} images. "
                "First panel (left, or top on a phone): training loss; second panel: the gradient norm before "
                "clipping (the largest in each bin of steps), with open circles where clipping fired. A cross "
                "marks a divergence. Step axes are logarithmic; the first steps are drawn one by one.")


# --- what clipping caps: the update with momentum and with Adam (fresh runs) --------------------------------------


def update_lengths(config: ImageConfig) -> dict[str, Any]:
    r"""Train ``config`` afresh with :class:`gradclip_book.harness.UpdateStats`: per step the update length
    :math:`\lVert\theta_{t+1}-\theta_t\rVert`, the gradient norm the optimizer received, the learning rate.

    Returns ``{"update", "received", "lr", "run", "params"}`` (``params``: the number of trainable values).
    """
    stats = harness.UpdateStats()
    result = images.run(config, hooks=[stats])
    params = sum(p.numel() for p in images.build_model(config).parameters())
    return {"update": stats.update, "received": stats.clipped_norm, "lr": stats.lr, "run": result, "params": params}


def momentum_figure(sgd: dict[str, Any], threshold: float, beta: float = 0.9, seed: int | None = None) -> PlotlyFigure:
    r"""The update length of a clipped SGD-momentum run in units of :math:`\eta c`, per step, with the bounds 1
    (one clipped gradient) and :math:`1/(1-\beta)` (the momentum buffer's geometric sum); ``seed`` names the run's
    seed in the caption."""
    lr = sgd["lr"][0]
    ratio = [_r4(u / (lr * threshold)) for u in sgd["update"]]
    steps = list(range(1, len(ratio) + 1))
    traces = [run_style("clipped", x=steps, y=ratio, mode="lines", name="measured update / (η c)")]
    for value, kind, name in ((1.0, "plain", "η c: one clipped gradient"),
                              (1 / (1 - beta), "reference", f"η c / (1 − β), β = {beta:g}")):
        traces.append(run_style(kind, x=[1, len(ratio)], y=[value, value], mode="lines", name=name))
    layout = {"height": 380, "xaxis": _step_axis(len(ratio) - 1),
              "yaxis": {"type": "log", "title": {"text": "update length / (η c)"}}}
    return PlotlyFigure(traces, layout, name="cls-momentum", label="fig-cls-momentum",
                        caption=f"The length of each SGD-with-momentum update of the residual CNN (depth "
                                f"{ig.HEADLINE.depth}, learning rate η = {lr:g}, global-norm clipping at c = "
                                f"{threshold:g}{'' if seed is None else f', seed {seed}'}), in units of η c, against "
                                f"the two bounds. Both axes are logarithmic.")


# --- why it explodes: per-layer norms, weight growth, dead units (fresh runs) -------------------------------------


class DeadUnits(harness.Hook):
    """After every forward pass, per ReLU in the network, the share of its units (channel x position) that are off
    (output 0) for every image of the batch: such a unit passes no gradient back on that batch.

    The ReLUs watched: ``nn.ReLU`` modules, a residual block's output (a ReLU of the sum) and the ReLU inside a
    block (watched through the input it gets, the output of ``norm1``).
    """

    def __init__(self, model: Any) -> None:
        from torch import nn

        from .harness.models import BasicBlock

        self.share: list[list[float]] = []
        self._now: list[float] = []
        for module in model.modules():
            if isinstance(module, (nn.ReLU, BasicBlock)):
                module.register_forward_hook(self._record)
            if isinstance(module, BasicBlock):
                module.norm1.register_forward_hook(self._record)

    def _record(self, module: Any, inputs: Any, output: Any) -> None:
        self._now.append(float((output.detach() <= 0).all(dim=0).float().mean()))

    def after_forward(self, step: harness.Step) -> None:
        self.share.append(self._now)
        self._now = []


def layer_story(config: ImageConfig, steps: int | None = None) -> dict[str, Any]:
    """Train ``config`` afresh (``steps`` steps, default the config's) with per-layer statistics
    (:class:`gradclip_book.harness.LayerStats`) and :class:`DeadUnits`.

    Returns ``{"run", "names", "grad", "weight", "relative", "dead" (mean share of dead units per step), "loss"}``.
    """
    config = config if steps is None else replace(config, steps=steps)
    model_probe = images.build_model(config)
    stats = harness.LayerStats(model_probe)
    dead = DeadUnits(model_probe)
    # the run builds the same model from the same seed; the hooks need that very model, so train it here
    with harness.deterministic():
        parts = images.corrupted_split(config.split_seed, config.outliers, config.outlier_std, config.label_noise)
        optimizer = harness.make_optimizer(config.optimizer, model_probe.parameters(), config.lr)
        result = harness.train(model_probe, optimizer, harness.minibatches(*parts["train"], config.batch, config.seed),
                               config.steps, method=config.method, threshold=config.threshold, warmup=config.warmup,
                               hooks=[stats, dead], evaluate=harness.accuracy_evaluator(parts), threads=None)
    return {"run": result, "names": stats.names, "grad": stats.grad, "weight": stats.weight,
            "relative": stats.relative, "dead": [float(np.mean(s)) if s else 0.0 for s in dead.share],
            "loss": result.loss}


# --- the threshold recipe against the grid's thresholds (section 4.7) ------------------------------------------


def recipe_check(base: ImageConfig, tried: Sequence[ImageConfig], seed: int = 0) -> dict[str, Any]:
    """The threshold recipe's runs ``tried`` (one per learning rate, :func:`gradclip_book.images_grid.recipe_points`)
    against the best global-norm setting of the grid's thresholds (:func:`clipped` of ``base``), both chosen on
    validation accuracy at ``seed`` (the book's rule, one seed).

    Returns ``{"recipe", "grid", "dropping"`` (the configs chosen; ``"dropping"``: the recipe's choice among the learning
    rates whose unclipped probe finished only, as step 1 once ruled), ``"diverged_lrs"`` (where the unclipped
    probe diverged), ``"val"`` and ``"test"`` (each choice's accuracy; 0 for a diverged run), ``"gap"`` (grid minus
    recipe, validation), ``"gap_dropping"`` (grid minus the dropping rule's choice, validation), ``"clip_fraction"``
    (of the recipe's choice)}``.

    Raises:
        ValueError: no run of ``tried`` is at a learning rate whose probe at ``seed`` finished (the recipe's runs of
            ``seed`` always start at the lowest such rate: ``tried`` was made at another seed).
    """
    base = replace(base, seed=0)
    probes = {lr: ig.probe_norms(images.stored(replace(base, lr=lr, seed=seed))) for lr in ig.LRS}
    diverged = [lr for lr, norms in probes.items() if norms is None]
    tried = [replace(c, seed=0) for c in tried]
    kept = [c for c in tried if c.lr not in diverged]
    if not kept:   # rather than a dropping choice of None, scored as 0 and reported as the grid's whole accuracy
        raise ValueError(f"none of the recipe's runs is at a learning rate whose probe finished at seed {seed}")
    chosen = {"recipe": choose(tried, (seed,)).best.setting, "grid": choose(clipped(base), (seed,)).best.setting,
              "dropping": choose(kept, (seed,)).best.setting}

    def metric(config: ImageConfig, name: str) -> float:
        line = images.stored(replace(config, seed=seed))
        return 0.0 if line["diverged_at"] is not None else float(line["metrics"][name])

    val = {k: metric(c, "val_accuracy") for k, c in chosen.items()}
    return {**chosen, "diverged_lrs": diverged, "val": val,
            "test": {k: metric(c, "test_accuracy") for k, c in chosen.items()}, "gap": val["grid"] - val["recipe"], "gap_dropping": val["grid"] - val["dropping"],
            "clip_fraction": float(images.stored(replace(chosen["recipe"], seed=seed))["clip_fraction"])}


# --- tables and figures of the comparisons ----------------------------------------------------------------------


def _setting(config: ImageConfig) -> str:
    text = f"lr {config.lr:g}"
    if config.method != "none":
        text += f", {images.harness.METHODS[config.method].knob} {config.threshold:g}"
    if config.warmup:
        text += f", warm-up {config.warmup}"
    return text


_VERDICT_WORDS = {"clipping": "clipping", "lower lr": "lower lr", "no difference": "no difference"}


def _verdict(case: dict[str, Any]) -> str:
    return _VERDICT_WORDS[case["verdict"]] + (" (rescue)" if case["rescue"] else "")


NEVER_FIRED = " (never fired)"
"""The mark of a clipped cell whose threshold clipped no step at any of its seeds (:func:`comparison_rows`)."""


def never_fired(summary: dict[str, Any]) -> bool:
    """Whether a clipped summary's threshold clipped no step at any of its seeds (its runs are then the unclipped runs
    at the same learning rate)."""
    return all(float(line["clip_fraction"]) == 0 for line in summary["lines"])


def clipped_share_words(summary: dict[str, Any]) -> str:
    """The table's "steps clipped" cell: the mean share of clipped steps over the seeds and its regime (most, some,
    rare), ``"0% (never fired)"`` when no step of any seed was clipped, and one decimal below 1%.

    Example:
        >>> [clipped_share_words({"clip_fraction": f, "lines": [{"clip_fraction": f}]}) for f in (0.98, 0.19, 0.002, 0.0)]
        ['98% (most)', '19% (some)', '0.2% (rare)', '0% (never fired)']
    """
    fraction = float(summary["clip_fraction"])
    if never_fired(summary):
        return "0%" + NEVER_FIRED
    share = f"{100 * fraction:.1f}%" if fraction < 0.01 else f"{100 * fraction:.0f}%"
    return f"{share} ({regime(fraction).split()[0]})"


def comparison_rows(cases: Sequence[tuple[str, dict[str, Any]]],
                    again: dict[str, Sequence[dict[str, Any]]] | None = None) -> list[list[str]]:
    """Table rows for :func:`clip_or_lower` results: case, best unclipped, best clipped, share clipped, verdict.

    With ``again`` (case name -> one :func:`replicated` result per group of other seeds), each setting's cell adds
    its test accuracy at each group and the verdict cell reads ``"<first seeds>; <each other group> → <the verdict
    that stands>"`` (:func:`standing`).

    A clipped group whose threshold fired at no step of any seed is marked :data:`NEVER_FIRED`: its runs are the
    unclipped runs at its learning rate (equal to the unclipped cell where both chose that rate)."""
    rows = []
    for name, c in cases:
        p, k = c["plain"], c["clipped"]
        groups = [] if again is None else list(again[name])
        marks = [NEVER_FIRED if never_fired(g["clipped"]) else "" for g in [c, *groups]]
        cells = [f"{_setting(p['config'])}: {mean_std(p['test'])}",
                 f"{_setting(k['config'])}: {mean_std(k['test'])}{marks[0]}"]
        if again is not None:
            cells = ["; ".join([cell] + [mean_std(g[part]["test"]) + (mark if part == "clipped" else "")
                                         for g, mark in zip(groups, marks[1:])])
                     for cell, part in zip(cells, ("plain", "clipped"))]
        rows.append([name, *cells, clipped_share_words(k),
                     _verdict(c) if again is None else
                     "; ".join([_verdict(c)] + [_verdict(g) for g in groups]) + f" → {_verdict(standing(c, *groups))}"])
    return rows


def comparison_table_html(cases: Sequence[tuple[str, dict[str, Any]]], caption: str,
                          again: dict[str, Sequence[dict[str, Any]]] | None = None,
                          seed_groups: Sequence[str] = ("seeds 0-4", "seeds 5-9", "seeds 10-14")) -> str:
    """The best unclipped run against the best clipped run, per case, as an HTML table (cards on a phone); with
    ``again`` (see :func:`comparison_rows`) also at the other seeds, the groups named by ``seed_groups`` (the
    chapter's seeds first)."""
    if again is None:
        head = ["network, depth", "best without clipping (test)", "best with global-norm clipping (test)",
                "steps clipped", "better by the seed-spread rule"]
        return table_html(head, [[_escape(c) for c in row] for row in comparison_rows(cases)], caption)
    groups = "; ".join(seed_groups)
    head = ["network, depth", f"best without clipping (test, {groups})",
            f"best with global-norm clipping (test, {groups})", f"steps clipped ({seed_groups[0]})",
            f"better by the seed-spread rule ({groups} → stands)"]
    return table_html(head, [[_escape(c) for c in row] for row in comparison_rows(cases, again)], caption,
                      widths=[17, 21, 21, 13, 28])


def _escape(text: str) -> str:
    import html
    return html.escape(text)


def stable_figure(ranges: dict[int, dict[str, list[float]]], names: dict[str, str]) -> PlotlyFigure:
    """Per depth, the learning rates at which every seed trains, one row per arm (``{depth: {arm: lrs}}``)."""
    traces = []
    symbols = ["square", "circle", "diamond", "triangle-up"]
    kinds = ["plain", "clipped", "reference", "other"]
    arms = list(names)
    depths = sorted(ranges)
    for i, arm in enumerate(arms):
        offset = (i - (len(arms) - 1) / 2) * 0.18   # the arms of one depth side by side, not on top of each other
        xs = [lr for d in depths for lr in ranges[d][arm]]
        ys = [depths.index(d) + offset for d in depths for _ in ranges[d][arm]]
        style = run_style(kinds[i % 4], mode="markers", name=names[arm])
        if not xs:   # an arm with no learning rate that trains still gets its legend entry (plotly drops empty traces)
            xs, ys = [None], [None]
        traces.append({**style, "x": xs, "y": ys, "marker": {**style["marker"], "size": 11, "symbol": symbols[i % 4]}})
    layout = {"height": 360,
              "xaxis": {"type": "log", "title": {"text": "learning rate"},   # short enough for a phone; the optimizer is in the caption
                        "tickvals": list(ig.LRS), "ticktext": [f"{lr:g}" for lr in ig.LRS],
                        "range": [math.log10(ig.LRS[0] / 1.6), math.log10(ig.LRS[-1] * 1.6)]},
              "yaxis": {"title": {"text": "depth"}, "tickvals": list(range(len(depths))),
                        "ticktext": [str(d) for d in depths], "range": [-0.6, len(depths) - 0.4]}}
    return PlotlyFigure(traces, layout, name="cls-stable", label="fig-cls-stable",
                        caption=f"The learning rates at which every one of {len(ig.SEEDS)} seeds trains (does not "
                                f"diverge and ends at {pct(TRAINS, 0)} validation accuracy or more), per depth of the "
                                f"residual CNN without normalisation (SGD with momentum 0.9, {ig.HEADLINE.steps} steps), "
                                "without clipping and with global-norm clipping at fixed thresholds. A learning rate "
                                "with no marker does not train for every seed; an arm in the legend with no marker "
                                "anywhere trains every seed at no learning rate of the scan.")


def dot_figure(rows: Sequence[dict[str, Any]], name: str, label: str, caption: str,
               axis: str = "test accuracy (%)") -> PlotlyFigure:
    """Mean ± standard deviation over seeds per row (``{"name", "group", "score", "kind"}``), grouped by ``group``."""
    groups = list(dict.fromkeys(r["group"] for r in rows))
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    traces = []
    styles = {"plain": "plain", "clipped": "clipped", "fix": "reference", "other": "other"}
    symbols = {"plain": "square", "clipped": "circle", "fix": "diamond", "other": "triangle-up"}
    for kind in kinds:
        chosen = [r for r in rows if r["kind"] == kind]
        ys = [f"{r['group']}: {r['name']}" for r in chosen]
        traces.append({**run_style(styles[kind], mode="markers", name=chosen[0].get("legend", kind)),
                       "x": [None if r["score"].mean is None else 100 * r["score"].mean for r in chosen], "y": ys,
                       "error_x": {"type": "data", "visible": True,
                                   "array": [0 if r["score"].std is None else 100 * r["score"].std for r in chosen]},
                       "marker": {**run_style(styles[kind])["marker"], "size": 10, "symbol": symbols[kind]}})
    order = [f"{r['group']}: {r['name']}" for r in rows]
    layout = {"height": 120 + 26 * len(rows), "margin": {"l": 10},
              "xaxis": {"title": {"text": axis}, "range": [0, 100]},
              "yaxis": {"categoryorder": "array", "categoryarray": order[::-1], "automargin": True}}
    return PlotlyFigure(traces, layout, name=name, label=label, caption=caption)


def layers_figure(stories: dict[str, dict[str, Any]], kinds: dict[str, str]) -> PlotlyFigure:
    """Left: the share of dead ReLU units per step; right: each layer's relative step
    :math:`\\lVert\\Delta w\\rVert/\\lVert w\\rVert` at the first step, for each named :func:`layer_story`."""
    traces = []
    for name, story in stories.items():
        style = run_style(kinds[name], mode="lines", name=name, legendgroup=name)
        steps = list(range(1, len(story["dead"]) + 1))
        traces.append({**style, "x": steps, "y": [_r4(100 * v) for v in story["dead"]]})
        names = story["names"]
        traces.append({**run_style(kinds[name], mode="lines+markers", name=name, legendgroup=name, showlegend=False),
                       "x": list(range(1, len(names) + 1)), "y": [_r4(story["relative"][n][0]) for n in names],
                       "xaxis": "x2", "yaxis": "y2"})
    first = next(iter(stories.values()))
    layout = {"height": 420,
              "xaxis": {"domain": [0, 0.46], "anchor": "y", **_step_axis(len(first["dead"]) - 1)},
              "yaxis": {"title": {"text": "dead ReLU units (%)"}, "anchor": "x", "rangemode": "tozero"},
              "xaxis2": {"domain": [0.56, 1], "anchor": "y2", "title": {"text": "layer (1 = stem, last = head)"},
                         "dtick": 1},
              "yaxis2": {"type": "log", "title": {"text": "relative step at step 0"}, "anchor": "x2"}}
    return PlotlyFigure(traces, layout, name="cls-layers", label="fig-cls-layers",
                        caption=f"The residual CNN without normalisation at depth {ig.HEADLINE.depth}, seed 0, first "
                                f"{len(first['dead'])} steps. First panel (left, or top on a phone): the share of ReLU "
                                "units that are off for every image of the step's minibatch (they pass no gradient "
                                "back); second panel: each layer's update length divided by its weight norm at the "
                                "first step (a layer is a convolution with its bias, or the head).")
