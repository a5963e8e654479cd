r"""Chapter 5.1's figures: learning rate x threshold heatmaps, clipping against a lower learning rate, warm-up against
clipping, Adam against SGD, and the benchmark measured on the building machine.

Every figure reads the numbers of :mod:`gradclip_book.performance` (stored grids, or a benchmark result passed
in) and returns a :class:`~gradclip_book.figures.PlotlyFigure` or an :class:`~gradclip_book.figures.Explorer`.

Example:
    >>> from gradclip_book import performance_figures as pf
    >>> frame = pf.heatmap_frame(16, "norm")
    >>> len(frame["traces"][0]["z"]), len(frame["traces"][0]["z"][0])
    (5, 6)
"""

from __future__ import annotations

import html
import math
from typing import Any

from . import classification as cls
from . import classification_figures as cf
from . import grids
from . import performance as perf
from . import step_costs as sc
from .figures import Explorer, Param, PlotlyFigure, run_style, seed_range, soft_breaks, table_html

__all__ = [
    "adam_figure",
    "benchmark_figure",
    "benchmark_table_html",
    "clip_style",
    "heatmap_explorer",
    "heatmap_frame",
    "live_heatmap_frame",
    "lower_lr_explorer",
    "warmup_explorer",
]

LABELS = cf.LABELS


def _pct(value: float | None) -> float | None:
    return None if value is None else round(100 * value, 1)


# --- learning rate x threshold -----------------------------------------------------------------------

TRAINS_RULE = (f"A run trains when it does not diverge and ends at {100 * perf.TRAINS:.0f}% test accuracy or more "
               "(chapter 4's rule).")


def _cells_frame(cells: dict[str, Any], depth: int, method: str) -> dict:
    """The heatmap frame of :func:`gradclip_book.performance.heatmap_cells`-shaped ``cells``."""
    z = [[_pct(a) for a in row] for row in cells["accuracy"]]
    text = [["div." if d else f"{100 * a:.0f}" for a, d in zip(row, drow)]
            for row, drow in zip(cells["accuracy"], cells["diverged"])]
    rows = ["off"] + [f"{t:g}" for t in cells["thresholds"][1:]]
    usable = perf.usable_lrs(cells)
    fixed = perf.fixed_threshold(cells)
    lrs = cells["lrs"]
    name = LABELS[method] + (" clipping" if method in ("value", "norm") else "")  # not "AGC clipping"
    note = [f"Depth {depth}, {name} ({cls.METHODS[method].knob}). Learning rates at which the "
            f"run trains without clipping: {perf.lrs_words(usable['none'], lrs)}; with some threshold (each lr "
            f"its own): {perf.lrs_words(usable['clipped'], lrs)}; with one threshold for all, picked on validation "
            f"({fixed['threshold']:g}): {perf.lrs_words(fixed['lrs'], lrs)}."]
    return {"traces": [{"z": z, "text": text, "y": rows}], "note": note}


def heatmap_frame(depth: int, method: str) -> dict:
    """One frame of :func:`heatmap_explorer` from chapter 4's stored grid (seed 0)."""
    return _cells_frame(perf.heatmap_cells(depth, method), depth, method)


def live_heatmap_frame(depth: int, method: str) -> dict:
    """The same frame from fresh runs (30 trainings of seed 0: about half a minute at depth 16)."""
    rows = [("none", 0)] + [(method, level) for level in range(len(grids.THRESHOLDS[method]))]
    accuracy, val_accuracy, diverged = [], [], []
    for name, level in rows:  # the bottom row unclipped, then the method's thresholds, tightest first
        runs = [cls.train(cf.grid_config(depth, lr, level, name)) for lr in grids.LRS]
        accuracy.append([r.test_accuracy for r in runs])
        val_accuracy.append([r.val_accuracy for r in runs])
        diverged.append([r.diverged for r in runs])
    cells = {"lrs": list(grids.LRS), "thresholds": [None, *grids.THRESHOLDS[method]], "accuracy": accuracy,
             "val_accuracy": val_accuracy, "diverged": diverged}
    return _cells_frame(cells, depth, method)


def heatmap_explorer() -> Explorer:
    """Final test accuracy over learning rate x threshold, a depth slider and method buttons (chapter 4's grid)."""
    # The numbers are in the cells, so the colour bar only needs to say what the colours run over: a thin
    # horizontal bar under the plot leaves the cells the whole width on a phone.
    trace = {"type": "heatmap", "x": [f"{lr:g}" for lr in grids.LRS], "colorscale": "Viridis", "zmin": 0,
             "zmax": 100, "texttemplate": "%{text}", "textfont": {"size": 12}, "xgap": 2, "ygap": 2,
             "colorbar": {"orientation": "h", "x": 0.5, "xanchor": "center", "y": -0.3, "yanchor": "top",
                          "len": 0.8, "thickness": 8, "tickvals": [0, 25, 50, 75, 100],
                          "title": {"text": "test accuracy (%)", "side": "top"}},
             "hovertemplate": "learning rate %{x}, threshold %{y}: %{text}<extra></extra>"}
    layout = {"height": 420, "margin": {"l": 60, "r": 10, "t": 20, "b": 110},
              "xaxis": {"title": {"text": "learning rate"}, "type": "category", "tickangle": 0},
              "yaxis": {"title": {"text": "threshold"}, "type": "category"}}
    return Explorer(
        "perf-heatmap",
        [Param("depth", list(grids.DEPTHS), label="depth", default=grids.HARD.depth, fmt="d"),
         Param("method", list(grids.GRID_METHODS), label="method", default="norm", fmt=lambda m: LABELS[m])],
        compute=heatmap_frame, traces=[trace], layout=layout, label="fig-perf-heatmap",
        caption="Final test accuracy (%) after 300 steps of chapter 4's stored runs (seed 0, ReLU MLP of width 64, "
                "SGD with momentum 0.9, batch 64) for each learning rate (columns) and threshold (rows; the bottom "
                "row, \"off\", is the same network without clipping). \"div.\" marks a run that diverged. "
                f"{TRAINS_RULE} The thresholds are each method's own knob: value clip_value, global norm max_norm, "
                "AGC clip_factor, AutoClip percentile, ZClip z_thresh, tightest at the second row from the bottom.")


# --- lowering the learning rate instead ----------------------------------------------------------------


def _mean_smoothed(runs: list[dict[str, Any]], window: int) -> dict[str, list[float]]:
    """The seeds' :func:`gradclip_book.performance.smoothed_loss` averaged step by step (the steps all share)."""
    curves = [perf.smoothed_loss(r, window) for r in runs]
    common = sorted(set.intersection(*(set(c["step"]) for c in curves)))
    by_step = [dict(zip(c["step"], c["loss"])) for c in curves]
    return {"step": common, "loss": [sum(b[s] for b in by_step) / len(by_step) for s in common]}


def lower_lr_explorer(table: dict[int, dict[str, Any]], target: float = perf.TARGET_LOSS,
                      window: int = perf.LOSS_WINDOW) -> Explorer:
    """Smoothed training loss of the best clipped lr against the best unclipped lr per depth, and where each seed
    reaches the target loss: exactly what the note's step counts measure."""

    last = grids.HARD.steps

    def compute(depth: int) -> dict:
        row = table[depth]
        curves, marks, note = [], [], []
        for side, name in (("plain", "without clipping"), ("clipped", f"with max_norm {grids.HARD_THRESHOLD:g}")):
            if row[side]["lr"] is None:
                curves.append({"x": [], "y": []})
                marks.append({"x": [], "y": []})
                note.append(f"Without clipping no learning rate of the scan trains every seed at depth {depth}.")
                continue
            mean = _mean_smoothed(row[side]["runs"], window)
            curves.append({"x": mean["step"], "y": [cf._r4(v) for v in mean["loss"]]})
            reached = [s for s in row[side]["per_seed"] if s is not None]
            marks.append({"x": reached, "y": [target] * len(reached)})
            steps = row[side]["steps"]
            per_seed = ", ".join("never" if s is None else str(s) for s in row[side]["per_seed"])
            got = (f"reaches {target:g} nats after {steps:.0f} steps on average ({per_seed} for the seeds)" if steps
                   else f"does not reach {target:g} nats in {row[side]['max_steps']} steps for every seed "
                        f"({per_seed})")
            fired = "" if side == "plain" else f", clipped at {100 * row[side]['clip_fraction']:.0f}% of the steps"
            note.append(f"{name[0].upper() + name[1:]}: best learning rate {row[side]['lr']:g} "
                        f"(mean test accuracy {100 * row[side]['accuracy']:.1f}%{fired}); the smoothed loss {got}.")
        return {"traces": [*curves, *marks, {"x": [1, last + 1], "y": [target, target]}], "note": note}

    def marker(kind: str, symbol: str) -> dict:
        return run_style(kind, mode="markers", showlegend=False, hovertemplate="step %{x}<extra>a seed</extra>",
                         marker={"size": 11, "symbol": symbol, "line": {"width": 2}})

    traces = [run_style("plain", name="no clipping, its best lr", mode="lines", legendgroup="plain"),
              run_style("clipped", name="clipped, its best lr", mode="lines", legendgroup="clipped"),
              {**marker("plain", "triangle-up-open"), "legendgroup": "plain"},
              {**marker("clipped", "circle-open"), "legendgroup": "clipped"},
              run_style("reference", name=f"target {target:g}", mode="lines")]
    # the x axis starts where the first {window}-step mean exists; y ticks labelled down to the lowest loss reached
    x_axis = {**cf._log_step_axis(last), "range": [math.log10(window - 1 + cf.LOG_SHIFT), math.log10((last + cf.LOG_SHIFT) * 1.05)]}
    ticks = [(window + cf.LOG_SHIFT, str(window))] + [(v, t) for v, t in zip(x_axis["tickvals"], x_axis["ticktext"])
                                                       if v > window + cf.LOG_SHIFT]
    x_axis["tickvals"], x_axis["ticktext"] = [v for v, _ in ticks], [t for _, t in ticks]
    y_ticks = [10.0 ** k * m for k in range(-6, 1) for m in (1, 3)]
    layout = {"height": 400, "xaxis": x_axis,
              "yaxis": {"type": "log", "title": {"text": f"training loss, {window}-step mean (nats)"},
                        "tickvals": y_ticks, "ticktext": [f"{t:g}" for t in y_ticks]}}
    return Explorer(
        "perf-lower", [Param("depth", list(grids.DEPTHS), label="depth", default=grids.HARD.depth, fmt="d")],
        compute=compute, traces=traces, layout=layout, label="fig-perf-lower",
        caption=f"Training loss averaged over the last {window} steps, then over the seeds (three of chapter 4's "
                f"scan; {len(grids.OPT_SEEDS)} for the lower learning rates at depth {grids.HARD.depth}), at the learning "
                f"rate that is best with global-norm clipping at max_norm {grids.HARD_THRESHOLD:g} and at the one "
                "that is best without clipping, from the scan 0.025 to 1.6 (doubling; best = every seed trains, "
                f"highest mean validation accuracy); at depth {grids.HARD.depth}, where no unclipped "
                f"learning rate of that scan trains, from a scan starting lower ({grids.SGD_LRS[0]:g}). All runs "
                f"take 300 steps. The marks on the flat target line are the steps at which each seed's {window}-step "
                f"mean first reaches it; the note gives their mean. The step axis is logarithmic. {TRAINS_RULE}")


# --- warm-up against clipping ----------------------------------------------------------------------------

# One meaning, one style, across the page: the colour (and dash) says which clipping, as in every figure here
# (no clipping, max_norm 0.1, max_norm 1); a warm-up adds a dotted line with open diamonds in that colour.
CLIP_KINDS = {None: "plain", grids.HARD_THRESHOLD: "clipped", 1.0: "other"}
WARMUP_MARK = {"line": {"dash": "dot", "width": 2}, "marker": {"symbol": "diamond-open", "size": 10,
                                                               "line": {"width": 2}}}


def clip_style(threshold: float | None, warmup: bool = False, **trace: Any) -> dict:
    """The page's style of a run clipped at ``threshold`` (None: unclipped), dotted with open diamonds if warmed up."""
    style = run_style(CLIP_KINDS[threshold], **trace)
    if warmup:
        colour = style["line"]["color"]
        style = {**style, "line": {**WARMUP_MARK["line"], "color": colour},
                 "marker": {**style.get("marker", {}), **WARMUP_MARK["marker"], "color": colour}}
    return style


def _clip_name(threshold: float | None) -> str:
    return "no clipping" if threshold is None else f"max_norm {threshold:g}"


def _lr_axis(lrs: tuple[float, ...], title: str, ticks: tuple[float, ...]) -> dict:
    """A log learning-rate axis with labelled ticks at ``ticks`` only (no minor digits, level on a phone)."""
    return {"type": "log", "title": {"text": title}, "tickangle": 0, "tickvals": list(ticks),
            "ticktext": [f"{t:g}" for t in ticks], "range": [math.log10(lrs[0] / 1.4), math.log10(lrs[-1] * 1.4)]}


SGD_TICKS = (0.0125, 0.05, 0.2, 1.0)


def warmup_explorer() -> Explorer:
    """Mean test accuracy over the learning rate for neither, warm-up, clipping and both; threshold buttons."""
    arms = list(perf.WARMUP_ARMS)
    seeds = len(grids.OPT_SEEDS)

    def compute(threshold: float) -> dict:
        summary = perf.warmup_summary(threshold)
        traces, note = [], []
        for arm in arms:
            s = summary[arm]
            warmup, t = perf.WARMUP_ARMS[arm]
            clip = threshold if t == "t" else None
            lrs = list(s["mean_accuracy"])
            name = {"neither": "neither", "warm-up": "warm-up", "clipping": _clip_name(clip),
                    "both": f"{_clip_name(clip)} + warm-up"}[arm]
            style = clip_style(clip, warmup > 0)
            traces.append({"x": lrs, "y": [_pct(s["mean_accuracy"][lr]) for lr in lrs], "name": name,
                           "line": style["line"], "marker": {"size": 8, **style["marker"]},
                           "text": [f"{s['trained'][lr]} of {seeds} seeds train, {s['diverged'][lr]} diverged"
                                    for lr in lrs]})
            said = {"neither": "Neither", "warm-up": "Warm-up alone", "clipping": f"Clipping at {_clip_name(clip)}",
                    "both": f"Clipping at {_clip_name(clip)} with warm-up"}[arm]
            note.append(f"{said}: trains at {perf.lrs_words(s['stable_lrs'], lrs)}; at the learning rate "
                        f"chosen on validation ({s['chosen_lr']:g}) {100 * s['chosen_accuracy']:.1f}% mean test accuracy.")
        return {"traces": traces, "note": note}

    traces = [{"mode": "lines+markers", "marker": {"size": 8}, "hovertemplate": "lr %{x}: %{y:.1f}% (%{text})"}
              for _ in arms]
    traces = [{**clip_style(None, arm in ("warm-up", "both")), **t} for arm, t in zip(arms, traces)]
    layout = {"height": 440, "margin": {"r": 15},
              "xaxis": _lr_axis(grids.SGD_LRS, "peak learning rate (SGD)", SGD_TICKS),
              "yaxis": {"title": {"text": "mean test accuracy (%)"}, "range": [0, 100]},
              "shapes": [_trains_line()]}
    return Explorer(
        "perf-warmup",
        [Param("threshold", [grids.HARD_THRESHOLD, 1.0], label="max_norm", default=grids.HARD_THRESHOLD,
               fmt="g", kind="buttons")],
        compute=compute, traces=traces, layout=layout, label="fig-perf-warmup",
        caption=f"The depth-{grids.HARD.depth} network of chapter 4 (300 steps of SGD with momentum 0.9), mean test "
                f"accuracy over seeds {seed_range(grids.OPT_SEEDS)} against the peak learning rate "
                f"({', '.join(f'{lr:g}' for lr in grids.SGD_LRS)}), with neither remedy, a linear warm-up over the "
                f"first {grids.WARMUP_STEPS} steps (dotted, open diamonds), global-norm clipping at max_norm, or both. "
                "A diverged run counts as 0% here (chapter 5.2 counts it as 10%, chance). "
                f"{TRAINS_RULE} A learning rate trains when all {len(grids.OPT_SEEDS)} seeds do (the hover text counts "
                "them): a mean "
                f"above the {100 * perf.TRAINS:.0f}% line is not enough.")


def _trains_line() -> dict:
    return {"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": 100 * perf.TRAINS, "y1": 100 * perf.TRAINS,
            "line": {"color": "#6b6b6b", "dash": "dot", "width": 1}}


# --- Adam against SGD -------------------------------------------------------------------------------------


def adam_figure(summary: dict[str, dict[Any, dict[str, Any]]]) -> PlotlyFigure:
    """Mean test accuracy over the learning rate, SGD (first panel) and Adam (second), without and with clipping."""
    seeds = len(grids.OPT_SEEDS)
    traces = []
    for panel, optimizer in enumerate(("sgd", "adam")):
        for t, s in summary[optimizer].items():
            name = _clip_name(t)
            axes = {} if panel == 0 else {"xaxis": "x2", "yaxis": "y2"}
            lrs = list(s["mean_accuracy"])
            traces.append(clip_style(t, x=lrs, y=[_pct(s["mean_accuracy"][lr]) for lr in lrs],
                                     mode="lines+markers", name=name, legendgroup=name, showlegend=panel == 0,
                                     marker={"size": 8},
                                     text=[f"{s['trained'][lr]} of {seeds} seeds train" for lr in lrs],
                                     hovertemplate="lr %{x}: %{y:.1f}% (%{text})<extra>" + name + "</extra>", **axes))
    line = _trains_line()
    layout = {"height": 420,
              "xaxis": {**_lr_axis(grids.SGD_LRS, "learning rate, SGD", SGD_TICKS), "domain": [0, 0.46],
                        "anchor": "y"},
              "yaxis": {"title": {"text": "mean test accuracy (%)"}, "range": [0, 100], "anchor": "x"},
              "xaxis2": {**_lr_axis(grids.ADAM_LRS, "learning rate, Adam", grids.ADAM_LRS), "domain": [0.56, 1],
                         "anchor": "y2"},
              "yaxis2": {"range": [0, 100], "anchor": "x2", "title": {"text": "mean test accuracy (%)"}},
              "shapes": [{**line, "xref": "x domain", "yref": "y"}, {**line, "xref": "x2 domain", "yref": "y2"}]}
    return PlotlyFigure(traces, layout, name="perf-adam", label="fig-perf-adam",
                        caption=f"The depth-{grids.HARD.depth} network, 300 steps, no warm-up: mean test accuracy over "
                                f"seeds {seed_range(grids.OPT_SEEDS)} against the learning rate, without "
                                "clipping and with global-norm clipping at two thresholds (the same styles as the "
                                "figures above). A diverged run counts as 0% here (chapter 5.2 counts it as 10%, "
                                f"chance). {TRAINS_RULE} The dotted line marks {100 * perf.TRAINS:.0f}%. First panel "
                                "(left, or top on a phone): SGD with momentum 0.9; second panel: Adam with torch's "
                                "defaults.")


# --- the benchmark ----------------------------------------------------------------------------------------


def benchmark_table_html(result: dict[str, Any]) -> str:
    """An HTML table of :func:`gradclip_book.performance.benchmark`'s rows (a card per row on a phone), its caption
    naming the machine; the first column holds the figure's short labels."""
    head = ["case", "what", "gradclip", "compared with", "its time", "ratio (above 1: gradclip faster)"]
    # long names break after "." or "_" (soft_breaks), numbers and "ms" never (no-break space): the columns have
    # fixed shares
    rows = [[f"<b>{html.escape(r['short'].split('.')[0])}</b>", html.escape(r["what"]), f"{r['ms']:.2f}&nbsp;ms",
             soft_breaks(r["reference"]), f"{r['reference_ms']:.2f}&nbsp;ms", f"{r['ratio']:.2f}"]
            for r in result["rows"]]
    caption = (f"Medians of {result['repeats']} interleaved calls each, measured while this page was built on "
               f"{html.escape(perf.describe_machine(result['machine']))}. The letters label the bars of the "
               "figure below.")
    return table_html(head, rows, caption, widths=[8, 26, 14, 23, 14, 15], small=True)


def step_cost_table_html(stored: dict[str, Any]) -> str:
    """An HTML table of :func:`gradclip_book.step_costs.load`'s cases: model, size, step, clipping call and its
    share of the step; the caption names the machine, the date and the command that measured them."""
    # fixed column shares at 1280 px: headers break at a soft hyphen or after "_", numbers and "ms" never
    # (a no-break space), so no number is cut between two digits
    head = ["model", "para&shy;meters", "examples x posi&shy;tions per step", "step", "clip_grad_<wbr>norm_",
            "share of the step", "ns per para&shy;meter"]
    rows = [[html.escape(c["label"]), f"{c['parameters']:,}", f"{c['batch']}&nbsp;x {c['positions']:,}",
             f"{c['step_ms']:.1f}&nbsp;ms", f"{c['clip_ms']:.2f}&nbsp;ms", f"{100 * c['clip_share']:.1f}%",
             f"{c['clip_ns_per_value']:.2f}"] for c in stored["cases"]]
    caption = (f"Medians over {stored['rounds']} rounds of {stored['repeats']} interleaved calls each "
               f"({html.escape(stored['clock'])}), measured on {stored['date']} on "
               f"{html.escape(perf.describe_machine(stored['machine']))} by <code>{html.escape(sc.COMMAND)}</code>; "
               "the clipping call fires at every call. Stored in chapters/data/step_costs.json.")
    return table_html(head, rows, caption, widths=[16, 15, 14, 15, 15, 11, 14], small=True)


def benchmark_figure(result: dict[str, Any]) -> PlotlyFigure:
    """The benchmark's ratios as horizontal bars (log axis) under short labels, a line at 1 (equal speed)."""
    rows = result["rows"]
    labels = [r["short"] for r in rows]
    ratios = [r["ratio"] for r in rows]
    trace = {"type": "bar", "orientation": "h", "x": ratios, "y": labels, "marker": {"color": "#0072B2"},
             "text": [f"{x:.2f}" for x in ratios], "textposition": "outside", "cliponaxis": False,
             "customdata": [f"{r['what']} against {r['reference']}" for r in rows],
             "hovertemplate": "%{customdata}: %{x:.2f}<extra></extra>"}
    big = ", ".join(rows[0]["what"].split(", ")[1:3])        # "67 tensors, 3.4 M values"
    small = rows[3]["what"].split(", ")[1]                     # "2,000 small tensors"
    low, high = min(ratios + [1.0]), max(ratios + [1.0])
    span = [math.log10(low / 1.5), math.log10(high * 2.2)]  # room on the right for the value labels
    ticks = [t for t in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100) if span[0] <= math.log10(t) <= span[1]]
    if len(ticks) > 5:
        ticks = [t for t in ticks if str(t)[0] == "1"]
    layout = {"height": 110 + 38 * len(rows), "margin": {"l": 10, "r": 15, "t": 10, "b": 50},
              "xaxis": {"type": "log", "title": {"text": "times faster than the reference"}, "range": span,
                        "tickvals": ticks, "ticktext": [f"{t:g}" for t in ticks], "tickangle": 0},
              "yaxis": {"automargin": True, "autorange": "reversed"},
              "shapes": [{"type": "line", "x0": 1, "x1": 1, "yref": "paper", "y0": 0, "y1": 1,
                          "line": {"color": "#6b6b6b", "dash": "dot", "width": 2}}]}
    return PlotlyFigure([trace], layout, name="perf-bench", label="fig-perf-bench",
                        caption="How many times faster (above 1) or slower (below 1) gradclip's call was than the "
                                "one it replaces (reference time / gradclip time), measured while this page was "
                                "built. The letters are the rows of the table above, which names each case in full "
                                f"(big: {big}; small: {small}) and the machine. The "
                                "dotted line marks equal speed; the axis is logarithmic.")
