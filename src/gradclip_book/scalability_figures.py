"""Chapter 5.2's figures and table, read from the stored batch-size grid and its controls
(:func:`gradclip_book.scalability.load`).

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
from .figures import Explorer, Param, PlotlyFigure, run_style, table_html

__all__ = ["STEPS", "batch_explorer", "batch_frame", "best_figure", "comparison_table", "control_lines", "lines",
           "live_configs", "live_frame", "stored_runs"]


STEPS = (sc.BASE.steps, sc.SHORT_STEPS)
"""The explorer's training lengths: the grid's 200 steps, or the controls' 50 (at batch 4b, the images of batch b's
200 steps)."""


@functools.lru_cache(maxsize=1)
def _cached() -> tuple[dict[str, Any], ...]:
    return tuple(sc.load())


@functools.lru_cache(maxsize=1)
def _cached_controls() -> tuple[dict[str, Any], ...]:
    return tuple(sc.load(sc.CONTROLS_FILE))


def lines() -> list[dict[str, Any]]:
    """The stored grid's lines (read once per process)."""
    return list(_cached())


def control_lines() -> list[dict[str, Any]]:
    """The stored controls' lines (read once per process)."""
    return list(_cached_controls())


def stored_runs(batch: int, steps: int = sc.BASE.steps) -> list[dict[str, Any]]:
    """The stored runs the explorer draws at ``batch`` and ``steps``: the grid's (200 steps) or the controls' (50),
    at the scaled learning rate."""
    source = lines() if steps == sc.BASE.steps else control_lines()
    return [l for l in source if l["config"]["batch"] == batch and l["config"]["steps"] == steps
            and l["config"]["lr"] == sc.lr_for(batch)]


def _pct(x: float) -> float:
    """A mean accuracy in percent, unrounded: the notes round it once, with :func:`~gradclip_book.scalability.percent`."""
    return 100 * x


def _log_ticks(values: list[float]) -> dict[str, Any]:
    """Tick labels at the grid's own values (0.005, 0.02, ...) instead of plotly's minor log ticks."""
    return {"tickvals": list(values), "ticktext": [f"{v:g}" for v in values]}


HOVER = "%{x:g}: %{y:.1f}%"


def _acc(score: Any) -> str:
    """A test Score as the notes print it: "test" and the mean ± standard deviation over the seeds that finished,
    and divergences."""
    if score.mean is None:
        return f"all {score.seeds} seeds diverged"
    text = f"test {sc.percent(score.mean)} ± {100 * score.std:.1f}"
    return text + (f", {score.diverged} of {score.seeds} seeds diverged" if score.diverged else "")


def _frame(runs: list[dict[str, Any]], batch: int) -> dict:
    """Validation accuracy (mean ± std over the seeds) against λ (left) and c (right) at one batch size, unclipped as
    a line; the note gives the settings chosen on validation and their test accuracy."""
    table = sc.cell_table(runs)
    steps = runs[0]["config"]["steps"]
    chosen = sc.chosen_per_batch(runs, steps=steps)[batch]
    agc_t, norm_t = list(sc.THRESHOLDS["agc"]), list(sc.THRESHOLDS["norm"])
    none = _pct(table[batch, "none", None]["mean"])

    def trace(method: str, ts: list[float]) -> dict:
        cells = [table[batch, method, t] for t in ts]
        return {"x": ts, "y": [_pct(c["mean"]) for c in cells],
                "error_y": {"type": "data", "array": [_pct(c["std"]) for c in cells], "visible": True}}

    seeds = table[batch, "none", None]["seeds"]
    epochs = sc.epochs(batch, steps)
    note = [f"Batch {batch}, learning rate {sc.lr_for(batch):g}, {steps} steps ({epochs:.1f} epochs), {seeds} "
            f"seed{'s' if seeds > 1 else ''}: without clipping, {_acc(chosen['none']['test'])}.",
            f"Chosen on validation: AGC λ = {chosen['agc']['setting']:g} ({_acc(chosen['agc']['test'])}); "
            f"global c = {chosen['norm']['setting']:g} ({_acc(chosen['norm']['test'])})."]
    return {"traces": [trace("agc", agc_t), {"x": [agc_t[0], agc_t[-1]], "y": [none, none]},
                       trace("norm", norm_t), {"x": [norm_t[0], norm_t[-1]], "y": [none, none]}],
            "note": note}


def batch_frame(batch: int, steps: int = sc.BASE.steps) -> dict:
    """The explorer's frame for one batch size and training length, from the stored runs (every seed)."""
    return _frame(stored_runs(batch, steps), batch)


def live_configs(batch: int, steps: int = sc.BASE.steps, seeds: tuple[int, ...] = (0,)) -> list[cls.RunConfig]:
    """The runs :func:`live_frame` trains: the stored configs at ``batch`` and ``steps`` for ``seeds``."""
    return [replace(c, steps=steps) for c in sc.grid_configs() if c.batch == batch and c.seed in seeds]


def live_frame(batch: int, steps: int = sc.BASE.steps, seeds: tuple[int, ...] = (0,)) -> dict:
    """The explorer's frame from fresh runs of the stored configs at ``batch`` and ``steps``, for ``seeds`` only.

    With the default (seed 0: 18 runs, some seconds to a minute on one core) the points are seed 0's accuracies and
    the choices seed 0's, not the stored frame's means over every seed: the frame :func:`batch_frame` draws from
    seed 0's stored runs alone (a stored run re-trains exactly on the grid's kind of machine).
    """
    return _frame([cls.train(c).to_json() for c in live_configs(batch, steps, seeds)], batch)


def _layout() -> dict[str, Any]:
    return {
        "height": 440,
        "margin": {"t": 70},  # the legend sits above the panels (the book's default), clear of the axis titles
        "xaxis": {"domain": [0, 0.46], "type": "log", "title": {"text": "AGC clip factor λ"}, "anchor": "y",
                  "tickangle": -60, **_log_ticks(sc.THRESHOLDS["agc"])},
        "yaxis": {"range": [0, 100], "title": {"text": "validation accuracy (%)"}, "anchor": "x"},
        "xaxis2": {"domain": [0.56, 1], "type": "log", "title": {"text": "global-norm threshold c"}, "anchor": "y2",
                   **_log_ticks(sc.THRESHOLDS["norm"])},
        "yaxis2": {"range": [0, 100], "anchor": "x2"},
    }


def batch_explorer() -> Explorer:
    """A batch-size slider and a training-length choice over the stored runs: validation accuracy against AGC's λ and
    against the global threshold c."""
    traces = [run_style("other", name="AGC", mode="lines+markers", hovertemplate=HOVER),
              run_style("plain", name="no clipping", mode="lines", showlegend=True, hovertemplate=HOVER),
              run_style("clipped", name="global norm", mode="lines+markers", xaxis="x2", yaxis="y2",
                        hovertemplate=HOVER),
              run_style("plain", name="no clipping", mode="lines", xaxis="x2", yaxis="y2", showlegend=False,
                        hovertemplate=HOVER)]
    return Explorer(
        "scal-batch", [Param("batch", list(sc.BATCHES), label="batch size", default=1024, fmt="d"),
                       Param("steps", list(STEPS), label="steps", default=sc.BASE.steps, fmt="d", kind="buttons")],
        compute=batch_frame, traces=traces, layout=_layout(), label="fig-scal-batch",
        caption=f"Validation accuracy of the depth-8 ReLU MLP without normalisation layers on the digits (SGD with "
                f"momentum 0.9, learning rate 0.025 x batch/16; mean over {len(sc.SEEDS)} seeds, the bars one "
                f"standard deviation, a diverged run counted at 10%) against AGC's clip factor λ (left, or top on a "
                f"phone) and the global-norm threshold c (right, or bottom on a phone); the dashed line is the same "
                f"training without clipping. {sc.BASE.steps} or {sc.SHORT_STEPS} steps: at batch 4b, {sc.SHORT_STEPS} "
                f"steps see the images (epochs) that batch b sees in {sc.BASE.steps}. The note gives the settings "
                f"chosen on validation and their test accuracy.")


def best_figure() -> PlotlyFigure:
    """Per batch size: the test accuracy of each method's setting chosen on validation (left), and the chosen λ (right)."""
    best = sc.chosen_per_batch(lines(), control_lines())
    batches = list(best)
    styles = {"none_tuned": "plain", "agc": "other", "norm": "clipped"}  # blue: global norm, as in chapter 5.1
    names = {"none_tuned": "no clipping (best lr)", "agc": "AGC (λ chosen)", "norm": "global norm (c chosen)"}
    traces = []
    for m in ("none_tuned", "agc", "norm"):
        tests = [best[b][m]["test"] for b in batches]
        traces.append(run_style(
            styles[m], name=names[m], mode="lines+markers", x=batches, hovertemplate=HOVER,
            y=[_pct(t.mean) if t.mean is not None else None for t in tests],
            error_y={"type": "data", "array": [_pct(t.std) if t.std is not None else 0 for t in tests],
                     "visible": True}))
    traces.append(run_style("other", name="chosen λ", mode="lines+markers", x=batches, xaxis="x2", yaxis="y2",
                            y=[best[b]["agc"]["setting"] for b in batches], showlegend=False,
                            hovertemplate="batch %{x}: λ = %{y:g}<extra></extra>"))
    layout = {
        "height": 420,
        "margin": {"t": 70},  # the legend sits above the panels (the book's default), clear of the axis titles
        "xaxis": {"domain": [0, 0.56], "type": "log", "title": {"text": "batch size"}, "tickvals": batches,
                  "anchor": "y"},
        "yaxis": {"range": [0, 100], "title": {"text": "test accuracy (%)"}, "anchor": "x"},
        "xaxis2": {"domain": [0.68, 1], "type": "log", "title": {"text": "batch size"}, "tickvals": batches,
                   "anchor": "y2"},
        "yaxis2": {"type": "log", "title": {"text": "chosen AGC λ"}, "anchor": "x2", **_log_ticks(sc.THRESHOLDS["agc"])},
    }
    return PlotlyFigure(traces, layout, "scal-best", label="fig-scal-best",
                        caption=f"Left (top on a phone): at each batch size, the test accuracy (mean over "
                                f"{len(sc.SEEDS)} seeds, bars one standard deviation) of AGC and of global-norm "
                                f"clipping with the λ and c chosen on validation accuracy, and of training without "
                                f"clipping at the learning rate chosen on validation (the linearly scaled one or "
                                f"{', '.join(f'{f:g}' for f in sc.LOWER_LR_FACTORS)} times it); {sc.BASE.steps} "
                                f"steps. Right (bottom on a phone): the chosen AGC factor λ.")


def _cell(choice: dict[str, Any], knob: str) -> str:
    test = choice["test"]
    if test.mean is None:
        return f"diverged ({test.diverged} of {test.seeds} seeds)"
    setting = "" if choice["setting"] is None else f"{knob} {choice['setting']:g}: "
    text = f"{setting}{sc.percent(test.mean)} ± {100 * test.std:.1f}"
    return text + (f" ({test.diverged} of {test.seeds} seeds diverged)" if test.diverged else "")


def comparison_table(caption: str = "") -> str:
    """Best against best at every batch size (HTML, cards on a phone): test accuracy (mean ± standard deviation over
    the seeds) of no clipping at the scaled learning rate, no clipping at the learning rate chosen on validation, and
    AGC and global-norm clipping with the knob chosen on validation; the grid's 200 steps."""
    import html

    best = sc.chosen_per_batch(lines(), control_lines())
    head = ["batch (scaled lr)", "no clipping", "no clipping, lr chosen", "AGC, λ chosen", "global norm, c chosen"]
    rows = [[f"{b} ({sc.lr_for(b):g})", _cell(r["none"], ""), _cell(r["none_tuned"], "lr"), _cell(r["agc"], "λ"),
             _cell(r["norm"], "c")] for b, r in best.items()]
    return table_html(head, [[html.escape(c) for c in row] for row in rows], caption=html.escape(caption))
