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
from .figures import Explorer, Param, PlotlyFigure, run_style

__all__ = [
    "adam_figure",
    "benchmark_figure",
    "benchmark_table_html",
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


def _cells_frame(cells: dict[str, Any], depth: int, method: str) -> dict:
    """The heatmap frame of :func:`gradclip_book.performance.heatmap_cells`-shaped ``cells``."""
    z = [[_pct(a) for a in row] for row in cells["accuracy"]]
    text = [["div." if d else f"{100 * a:.0f}" for a, d in zip(row, drow)]
            for row, drow in zip(cells["accuracy"], cells["diverged"])]
    rows = ["off"] + [f"{t:g}" for t in cells["thresholds"][1:]]
    usable = perf.usable_lrs(cells)
    n = len(cells["lrs"])

    def span(lrs: list[float]) -> str:
        return f"{len(lrs)} of {n} learning rates (up to {max(lrs):g})" if lrs else f"none of the {n} learning rates"

    note = [f"Depth {depth}, {LABELS[method]} clipping ({cls.METHODS[method].knob}): test accuracy reaches "
            f"{100 * perf.TRAINS:.0f}% without clipping at {span(usable['none'])}, and with some threshold at "
            f"{span(usable['clipped'])}."]
    return {"traces": [{"z": z, "text": text, "y": rows}], "note": note}


def heatmap_frame(depth: int, method: str) -> dict:
    """One frame of :func:`heatmap_explorer` from chapter 4's stored grid (seed 0)."""
    return _cells_frame(perf.heatmap_cells(depth, method), depth, method)


def live_heatmap_frame(depth: int, method: str) -> dict:
    """The same frame from fresh runs (30 trainings of seed 0: about half a minute at depth 16)."""
    rows = [("none", 0)] + [(method, level) for level in range(len(grids.THRESHOLDS[method]))]
    accuracy, diverged = [], []
    for name, level in rows:  # the bottom row unclipped, then the method's thresholds, tightest first
        runs = [cls.train(cf.grid_config(depth, lr, level, name)) for lr in grids.LRS]
        accuracy.append([r.test_accuracy for r in runs])
        diverged.append([r.diverged for r in runs])
    cells = {"lrs": list(grids.LRS), "thresholds": [None, *grids.THRESHOLDS[method]], "accuracy": accuracy,
             "diverged": diverged}
    return _cells_frame(cells, depth, method)


def heatmap_explorer() -> Explorer:
    """Final test accuracy over learning rate x threshold, a depth slider and method buttons (chapter 4's grid)."""
    trace = {"type": "heatmap", "x": [f"{lr:g}" for lr in grids.LRS], "colorscale": "Viridis", "zmin": 0,
             "zmax": 100, "texttemplate": "%{text}", "xgap": 2, "ygap": 2,
             "colorbar": {"title": {"text": "test accuracy (%)"}},
             "hovertemplate": "learning rate %{x}, threshold %{y}: %{text}<extra></extra>"}
    layout = {"height": 380,
              "xaxis": {"title": {"text": "learning rate (SGD with momentum 0.9)"}, "type": "category"},
              "yaxis": {"title": {"text": "threshold (off = no clipping)"}, "type": "category"}}
    return Explorer(
        "perf-heatmap",
        [Param("depth", list(grids.DEPTHS), label="depth", default=grids.HARD.depth, fmt="d"),
         Param("method", list(grids.GRID_METHODS), label="method", default="norm", fmt=lambda m: LABELS[m])],
        compute=heatmap_frame, traces=[trace], layout=layout, label="fig-perf-heatmap",
        caption="Final test accuracy (%) after 300 steps of chapter 4's stored runs (seed 0, ReLU MLP of width 64, "
                "SGD with momentum 0.9, batch 64) for each learning rate (columns) and threshold (rows; the bottom "
                "row is the same network without clipping). \"div.\" marks a run that diverged. The thresholds are "
                "each method's own knob: value clip_value, global norm max_norm, AGC clip_factor, AutoClip "
                "percentile, ZClip z_thresh, tightest at the second row from the bottom.")


# --- lowering the learning rate instead ----------------------------------------------------------------


def lower_lr_explorer(table: dict[int, dict[str, Any]], target: float = perf.TARGET_LOSS) -> Explorer:
    """Training loss of the best clipped lr against the best unclipped lr per depth (seed 0), with the target loss."""

    last = grids.HARD.steps

    def compute(depth: int) -> dict:
        row = table[depth]
        traces, note = [], []
        for side, name in (("plain", "no clipping"), ("clipped", f"global norm {grids.HARD_THRESHOLD:g}")):
            if row[side]["lr"] is None:
                traces.append({"x": [], "y": []})
                note.append(f"Without clipping no learning rate of the scan trains every seed at depth {depth}.")
                continue
            run = row[side]["runs"][0]  # seed 0
            c = cf._coarse(run, 100)
            traces.append({"x": [s + 1 for s in c["step"]], "y": [cf._r4(v) for v in c["loss"]]})
            steps = row[side]["steps"]
            reached = (f"reaches {target:g} nats after {steps:.0f} steps on average over the seeds" if steps
                       else f"does not reach {target:g} nats in {row[side]['max_steps']} steps for every seed")
            fired = "" if side == "plain" else f", clipped at {100 * row[side]['clip_fraction']:.0f}% of the steps"
            note.append(f"{name[0].upper() + name[1:]}: best learning rate {row[side]['lr']:g} "
                        f"(mean test accuracy {100 * row[side]['accuracy']:.1f}%{fired}); the training loss {reached}.")
        traces.append({"x": [1, last + 1], "y": [target, target]})
        return {"traces": traces, "note": note}

    traces = [run_style("plain", name="no clipping, its best lr", mode="lines"),
              run_style("clipped", name="clipped, its best lr", mode="lines"),
              run_style("reference", name=f"target loss {target:g}", mode="lines")]
    layout = {"height": 400, "xaxis": cf._log_step_axis(last),
              "yaxis": {"type": "log", "title": {"text": "training loss (nats)"}}}
    return Explorer(
        "perf-lower", [Param("depth", list(grids.DEPTHS), label="depth", default=grids.HARD.depth, fmt="d")],
        compute=compute, traces=traces, layout=layout, label="fig-perf-lower",
        caption="Training loss (seed 0, mean over each plotted bin of steps) at the learning rate that is best with "
                f"global-norm clipping at max_norm {grids.HARD_THRESHOLD:g}, and at the one that is best without "
                "clipping, from the scan 0.025 to 1.6 (doubling; three seeds; best = every seed trains, highest mean "
                f"test accuracy); at depth {grids.HARD.depth}, where no unclipped learning rate of that scan trains "
                f"every seed, from a scan starting lower ({grids.SGD_LRS[0]:g}). All runs take 300 steps. The flat "
                "line is the target loss; the step axis is logarithmic.")


# --- warm-up against clipping ----------------------------------------------------------------------------

ARM_STYLES = {"neither": "plain", "warm-up": "other", "clipping": "clipped", "both": "reference"}


def warmup_explorer() -> Explorer:
    """Mean test accuracy over the learning rate for neither, warm-up, clipping and both; threshold buttons."""
    arms = list(perf.WARMUP_ARMS)

    def compute(threshold: float) -> dict:
        summary = perf.warmup_summary(threshold)
        traces = []
        for arm in arms:
            s = summary[arm]
            lrs = list(s["mean_accuracy"])
            traces.append({"x": lrs, "y": [_pct(s["mean_accuracy"][lr]) for lr in lrs],
                           "text": [f"{s['diverged'][lr]} of {len(grids.OPT_SEEDS)} seeds diverged" for lr in lrs]})
        note = []
        for arm in arms:
            s = summary[arm]
            top = "no learning rate" if s["largest_stable_lr"] is None else f"up to {s['largest_stable_lr']:g}"
            note.append(f"{arm[0].upper() + arm[1:]}: every seed trains at {top}; best mean accuracy "
                        f"{100 * s['best_accuracy']:.1f}% at learning rate {s['best_lr']:g}.")
        return {"traces": traces, "note": note}

    traces = [run_style(ARM_STYLES[arm], name=arm, mode="lines+markers", marker={"size": 8},
                        hovertemplate="lr %{x}: %{y:.1f}% (%{text})<extra>" + arm + "</extra>") for arm in arms]
    lrs = grids.SGD_LRS
    layout = {"height": 420,
              "xaxis": {"type": "log", "title": {"text": "peak learning rate (SGD with momentum 0.9)"},
                        "range": [math.log10(lrs[0] / 1.4), math.log10(lrs[-1] * 1.4)]},
              "yaxis": {"title": {"text": "mean test accuracy (%)"}, "range": [0, 100]}}
    return Explorer(
        "perf-warmup",
        [Param("threshold", [grids.HARD_THRESHOLD, 1.0], label="max_norm", default=grids.HARD_THRESHOLD,
               fmt="g", kind="buttons")],
        compute=compute, traces=traces, layout=layout, label="fig-perf-warmup",
        caption=f"The depth-{grids.HARD.depth} network of chapter 4 (300 steps of SGD with momentum 0.9), mean test "
                f"accuracy over seeds {grids.OPT_SEEDS[0]}-{grids.OPT_SEEDS[-1]} (a diverged run counts as 0%) "
                f"against the learning rate, with neither, a linear warm-up over the first {grids.WARMUP_STEPS} "
                "steps, global-norm clipping at max_norm, or both.")


# --- Adam against SGD -------------------------------------------------------------------------------------


def adam_figure(summary: dict[str, dict[Any, dict[str, Any]]]) -> PlotlyFigure:
    """Mean test accuracy over the learning rate, SGD (first panel) and Adam (second), without and with clipping."""
    kinds = {None: "plain", grids.HARD_THRESHOLD: "clipped", 1.0: "other"}
    traces = []
    for panel, optimizer in enumerate(("sgd", "adam")):
        for t, s in summary[optimizer].items():
            name = "no clipping" if t is None else f"max_norm {t:g}"
            axes = {} if panel == 0 else {"xaxis": "x2", "yaxis": "y2"}
            lrs = list(s["mean_accuracy"])
            traces.append(run_style(kinds[t], x=lrs, y=[_pct(s["mean_accuracy"][lr]) for lr in lrs],
                                    mode="lines+markers", name=name, legendgroup=name, showlegend=panel == 0,
                                    marker={"size": 8}, **axes))
    axis = {"type": "log"}
    layout = {"height": 420,
              "xaxis": {**axis, "domain": [0, 0.46], "anchor": "y", "title": {"text": "learning rate, SGD (momentum 0.9)"}},
              "yaxis": {"title": {"text": "mean test accuracy (%)"}, "range": [0, 100], "anchor": "x"},
              "xaxis2": {**axis, "domain": [0.56, 1], "anchor": "y2", "title": {"text": "learning rate, Adam"}},
              "yaxis2": {"range": [0, 100], "anchor": "x2", "title": {"text": "mean test accuracy (%)"}}}
    return PlotlyFigure(traces, layout, name="perf-adam", label="fig-perf-adam",
                        caption=f"The depth-{grids.HARD.depth} network, 300 steps, no warm-up: mean test accuracy over "
                                f"seeds {grids.OPT_SEEDS[0]}-{grids.OPT_SEEDS[-1]} (a diverged run counts as 0%) against "
                                "the learning rate, without clipping and with global-norm clipping at two thresholds. "
                                "First panel (left, or top on a phone): SGD with momentum 0.9; second panel: Adam "
                                "with torch's defaults.")


# --- the benchmark ----------------------------------------------------------------------------------------


def benchmark_table_html(result: dict[str, Any]) -> str:
    """An HTML table of :func:`gradclip_book.performance.benchmark`'s rows, its caption naming the machine."""
    body = "".join(
        f"<tr><td>{html.escape(r['what'])}</td><td>{r['ms']:.2f} ms</td><td>{html.escape(r['reference'])}</td>"
        f"<td>{r['reference_ms']:.2f} ms</td><td>{r['ratio']:.2f}</td></tr>" for r in result["rows"])
    head = ("<tr><th>what</th><th>gradclip</th><th>compared with</th><th>its time</th>"
            "<th>ratio (above 1: gradclip faster)</th></tr>")
    caption = (f"Medians of {result['repeats']} interleaved calls each, measured while this page was built on "
               f"{html.escape(perf.describe_machine(result['machine']))}")
    return (f'<table class="table gc-table"><caption>{caption}</caption><thead>{head}</thead>'
            f"<tbody>{body}</tbody></table>")


def benchmark_figure(result: dict[str, Any]) -> PlotlyFigure:
    """The benchmark's ratios as horizontal bars (log axis), a line at 1 (equal speed)."""
    rows = result["rows"]
    labels = [f"{r['what'].split(',')[0]} vs {r['reference']}{',' + ','.join(r['what'].split(',')[1:])}"
              for r in rows]
    ratios = [r["ratio"] for r in rows]
    trace = {"type": "bar", "orientation": "h", "x": ratios, "y": labels, "marker": {"color": "#0072B2"},
             "text": [f"{x:.2f}" for x in ratios], "textposition": "outside",
             "hovertemplate": "%{y}: %{x:.2f}<extra></extra>"}
    low, high = min(ratios + [1.0]), max(ratios + [1.0])
    layout = {"height": 120 + 55 * len(rows), "margin": {"l": 10},
              "xaxis": {"type": "log", "title": {"text": "reference time / gradclip time (above 1: gradclip faster)"},
                        "range": [math.log10(low / 1.6), math.log10(high * 1.6)]},
              "yaxis": {"automargin": True, "autorange": "reversed"},
              "shapes": [{"type": "line", "x0": 1, "x1": 1, "yref": "paper", "y0": 0, "y1": 1,
                          "line": {"color": "#6b6b6b", "dash": "dot", "width": 2}}]}
    return PlotlyFigure([trace], layout, name="perf-bench", label="fig-perf-bench",
                        caption="How much faster (above 1) or slower (below 1) gradclip's call was than the one it "
                                "replaces, measured while this page was built (the machine is named in the table "
                                "above); the dotted line marks equal speed. The axis is logarithmic.")
