"""Chapter 5.2's figures, read from the stored batch-size grid (:func:`gradclip_book.scalability.load`).

Example:
    >>> from gradclip_book import scalability_figures as sf
    >>> frame = sf.batch_frame(1024)
    >>> len(frame["traces"])
    4
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any

from . import classification as cls
from . import scalability as sc
from .figures import Explorer, Param, PlotlyFigure, run_style

__all__ = ["batch_explorer", "batch_frame", "best_figure", "lines", "live_frame"]

LABELS = {"none": "no clipping", "agc": "AGC (best λ)", "norm": "global norm (best c)"}


@functools.lru_cache(maxsize=1)
def _cached() -> tuple[dict[str, Any], ...]:
    return tuple(sc.load())


def lines() -> list[dict[str, Any]]:
    """The stored grid's lines (read once per process)."""
    return list(_cached())


def _pct(x: float) -> float:
    """A mean accuracy in percent, unrounded: the notes round it once, with :func:`~gradclip_book.scalability.percent`."""
    return 100 * x


def _log_ticks(values: list[float]) -> dict[str, Any]:
    """Tick labels at the grid's own values (0.005, 0.02, ...) instead of plotly's minor log ticks."""
    return {"tickvals": list(values), "ticktext": [f"{v:g}" for v in values]}


HOVER = "%{x:g}: %{y:.1f}%"


def _frame(table: dict, batch: int) -> dict:
    """Accuracy against the clip factor (left) and the threshold (right) at one batch size, unclipped as a line."""
    agc_t = list(sc.THRESHOLDS["agc"])
    norm_t = list(sc.THRESHOLDS["norm"])
    none = _pct(table[batch, "none", None]["mean"])
    agc = [_pct(table[batch, "agc", t]["mean"]) for t in agc_t]
    norm = [_pct(table[batch, "norm", t]["mean"]) for t in norm_t]
    best_agc = max(agc_t, key=lambda t: (table[batch, "agc", t]["mean"], -t))
    best_norm = max(norm_t, key=lambda t: (table[batch, "norm", t]["mean"], -t))
    unclipped = table[batch, "none", None]
    note = [f"Batch {batch}, learning rate {sc.lr_for(batch):g}: without clipping the mean test accuracy is "
            f"{sc.percent(unclipped['mean'])} ({unclipped['diverged']} of {unclipped['seeds']} seeds diverged).",
            f"Best AGC factor λ = {best_agc:g} ({sc.percent(table[batch, 'agc', best_agc]['mean'])}); best global "
            f"threshold c = {best_norm:g} ({sc.percent(table[batch, 'norm', best_norm]['mean'])})."]
    return {"traces": [{"x": agc_t, "y": agc}, {"x": [agc_t[0], agc_t[-1]], "y": [none, none]},
                       {"x": norm_t, "y": norm}, {"x": [norm_t[0], norm_t[-1]], "y": [none, none]}],
            "note": note}


def batch_frame(batch: int) -> dict:
    """The explorer's frame for one batch size, from the stored grid."""
    return _frame(sc.cell_table(lines()), batch)


def live_frame(batch: int) -> dict:
    """The same frame from fresh runs (seed 0 only; about 10-30 seconds on one core)."""
    runs = []
    points = [("none", None)] + [(m, t) for m, ts in sc.THRESHOLDS.items() for t in ts]
    for method, t in points:
        config = replace(sc.BASE, batch=batch, lr=sc.lr_for(batch), method=method, threshold=t, seed=0)
        runs.append(cls.train(config).to_json())
    return _frame(sc.cell_table(runs), batch)


def _layout() -> dict[str, Any]:
    return {
        "height": 440,
        "margin": {"t": 70},  # the legend sits above the panels (the book's default), clear of the axis titles
        "xaxis": {"domain": [0, 0.46], "type": "log", "title": {"text": "AGC clip factor λ"}, "anchor": "y",
                  **_log_ticks(sc.THRESHOLDS["agc"])},
        "yaxis": {"range": [0, 100], "title": {"text": "test accuracy (%), mean of 3 seeds"}, "anchor": "x"},
        "xaxis2": {"domain": [0.56, 1], "type": "log", "title": {"text": "global-norm threshold c"}, "anchor": "y2",
                   **_log_ticks(sc.THRESHOLDS["norm"])},
        "yaxis2": {"range": [0, 100], "anchor": "x2"},
    }


def batch_explorer() -> Explorer:
    """A batch-size slider over the stored grid: accuracy against AGC's λ and against the global threshold c."""
    traces = [run_style("other", name="AGC", mode="lines+markers", hovertemplate=HOVER),
              run_style("plain", name="no clipping", mode="lines", showlegend=True, hovertemplate=HOVER),
              run_style("clipped", name="global norm", mode="lines+markers", xaxis="x2", yaxis="y2",
                        hovertemplate=HOVER),
              run_style("plain", name="no clipping", mode="lines", xaxis="x2", yaxis="y2", showlegend=False,
                        hovertemplate=HOVER)]
    return Explorer(
        "scal-batch", [Param("batch", list(sc.BATCHES), label="batch size", default=1024, fmt="d")],
        compute=batch_frame, traces=traces, layout=_layout(), label="fig-scal-batch",
        caption="Test accuracy of the depth-8 ReLU MLP without normalisation layers on the digits (200 SGD steps "
                "with momentum 0.9, learning rate 0.025 x batch/16; mean of 3 seeds, a diverged run counted at "
                "10%) against AGC's clip factor λ (left, or top on a phone) and the global-norm threshold c "
                "(right, or bottom on a phone); the dashed line is the same training without clipping.")


def best_figure() -> PlotlyFigure:
    """Per batch size: the best mean accuracy of AGC, of global-norm clipping and without clipping (left), and the best λ (right)."""
    best = sc.best_per_batch(lines())
    batches = list(best)
    styles = {"none": "plain", "agc": "other", "norm": "clipped"}  # blue: global norm, as in chapter 5.1
    traces = [run_style(styles[m], name=LABELS[m], mode="lines+markers", x=batches, hovertemplate=HOVER,
                        y=[_pct(best[b][m]["mean"]) for b in batches]) for m in ("none", "agc", "norm")]
    traces.append(run_style("other", name="best λ", mode="lines+markers", x=batches, xaxis="x2", yaxis="y2",
                            y=[best[b]["agc"]["threshold"] for b in batches], showlegend=False,
                            hovertemplate="batch %{x}: λ = %{y:g}<extra></extra>"))
    layout = {
        "height": 420,
        "margin": {"t": 70},  # the legend sits above the panels (the book's default), clear of the axis titles
        "xaxis": {"domain": [0, 0.56], "type": "log", "title": {"text": "batch size"}, "tickvals": batches,
                  "anchor": "y"},
        "yaxis": {"range": [0, 100], "title": {"text": "best mean test accuracy (%)"}, "anchor": "x"},
        "xaxis2": {"domain": [0.68, 1], "type": "log", "title": {"text": "batch size"}, "tickvals": batches,
                   "anchor": "y2"},
        "yaxis2": {"type": "log", "title": {"text": "best AGC λ"}, "anchor": "x2", **_log_ticks(sc.THRESHOLDS["agc"])},
    }
    return PlotlyFigure(traces, layout, "scal-best", label="fig-scal-best",
                        caption="Left (top on a phone): at each batch size, the best mean test accuracy over the grid's thresholds "
                                "for AGC and for global-norm clipping, and without clipping (learning rate scaled "
                                "linearly with the batch). Right (bottom on a phone): the AGC factor λ that gave AGC's best.")
