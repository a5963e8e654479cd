"""Chapter 5.3's figures, read from the stored fault grid (:func:`gradclip_book.safety.load`).

Example:
    >>> from gradclip_book import safety_figures as sf
    >>> frame = sf.loss_frame("nan-grad", 200)
    >>> len(frame["traces"]) == len(sf.safety.GUARDS) + 1
    True
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import safety
from .figures import PALETTE, RUN_STYLES, Explorer, Param, PlotlyFigure, and_list, run_style

__all__ = ["OUTCOME_WORDS", "accuracy_figure", "coinciding", "loss_explorer", "loss_frame"]

LABELS = {"none": "no guard", "softcap": "soft-capping", "activation": "activation check", "loss": "loss guard",
          "layerwise": "per-layer hooks", "spike": "SpikeGuard", "rollback": "rollback",
          "clip": "global-norm clipping", "skip": "skip non-finite", "clip+skip": "clipping + skip"}
# One colour per run, readable on the light and the dark page (contrast at least 3:1 on both): the Okabe-Ito colours
# of the book's PALETTE except its black and yellow (black vanishes on the dark page, yellow on the light one), a
# neutral grey for the fault-free reference, and a purple, a golden brown, an olive and a magenta for the others.
# Global-norm clipping keeps the book's "clipped" style (blue, solid, wide). Each line has its own dash pattern but
# soft-capping's (solid, thin, orange beside clipping's wide blue), so lines of near colours (the two blues, orange and
# brown, vermillion and magenta) differ in dash too, and a line drawn over another with the same losses leaves the
# one below visible in its gaps.
CLEAN_STYLE = {"color": "#999999", "dash": "dot", "width": 2.5}
STYLES = {
    "none": RUN_STYLES["plain"]["line"],  # vermillion, dashed: the unprotected run of every chapter
    "softcap": {"color": PALETTE[1], "dash": "solid", "width": 1.5},  # orange
    "activation": {"color": PALETTE[4], "dash": "longdash", "width": 4},  # sky blue, wide: shows round a loss guard on top
    "loss": {"color": PALETTE[2], "dash": "dashdot", "width": 2},  # bluish green
    "layerwise": {"color": PALETTE[3], "dash": "longdashdot", "width": 1.5},  # reddish purple
    "spike": {"color": "#A6761D", "dash": "8px,3px,2px,3px,2px,3px", "width": 1.5},  # golden brown, dash-dot-dot
    "rollback": {"color": "#9370DB", "dash": "2px,5px", "width": 2},  # purple, sparse dots: 4:1 contrast on both pages
    "clip": dict(RUN_STYLES["clipped"]["line"]),  # blue, solid, wide: clipping in every chapter
    "skip": {"color": "#808000", "dash": "12px,4px", "width": 2.5},  # olive, long dashes, wider for the dark page
    "clip+skip": {"color": "#E7298A", "dash": "5px,2px,1px,2px", "width": 1.5},  # magenta, over the clipping line it often equals
}
FAULT_LABELS = {"outliers": "outlier inputs", "nan-grad": "NaN gradients", "scaled": "gradients x1000",
                "labels": "random labels"}
FAULT_SHORT = {"outliers": "outlier<br>inputs", "nan-grad": "NaN<br>gradients", "scaled": "gradients<br>x1000",
               "labels": "random<br>labels"}
"""Fault labels in two lines, for a column a phone shows 60 px wide."""
BIN = 3  # steps per plotted point: the largest loss of each bin, so a one-step spike survives
TOP = 5  # the loss axis ends at 10**TOP nats; a note names the runs that go higher
SUPERSCRIPT = str.maketrans("0123456789-", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻")
OUTCOME_WORDS = {
    "finished": "finished: test accuracy above 50%",
    "diverged": "diverged: weights finite, test accuracy below 50% (here at chance, 10%); its loss line goes on "
                "unless the loss itself became non-finite",
    "nan": "NaN: weights non-finite; its loss line stops or has a gap",
}
"""What the outcome words of :func:`gradclip_book.safety.train` mean, as the page and the figures say it."""


def _curve(loss: list[float | str]) -> list[float | None]:
    """Each bin's largest loss, ``None`` (a gap) where the loss was non-finite or the run had stopped."""
    values = np.array([float(v) for v in loss] + [math.nan] * (safety.BASE.steps - len(loss)))
    out = []
    for start in range(0, len(values), BIN):
        chunk = values[start:start + BIN]
        out.append(None if not np.isfinite(chunk).all() else float(chunk.max()))
    return out


def _outcome(line: dict[str, Any]) -> str:
    """One run's ending in the words of :data:`OUTCOME_WORDS`."""
    if line["outcome"] == "nan":
        return "NaN weights (line stops)"
    acc = f"{100 * line['test_accuracy']:.1f}%"
    if line["outcome"] != "diverged":
        return acc
    bad = [i for i, v in enumerate(line["loss"]) if not math.isfinite(float(v))]
    if bad and bad[-1] == len(line["loss"]) - 1:  # finite weights, but the loss non-finite to the end
        first = next(i for i in range(len(line["loss"])) if all(j in set(bad) for j in range(i, len(line["loss"]))))
        return f"diverged, {acc} with finite weights (loss non-finite from step {first}: line stops)"
    return f"diverged, {acc} with finite weights (line goes on)"


def coinciding(curves: dict[str, list[float | None]]) -> list[list[str]]:
    """Groups (two or more) of runs whose plotted curves are identical at every point, in the given order."""
    groups: dict[tuple, list[str]] = {}
    for name, curve in curves.items():
        groups.setdefault(tuple(curve), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def loss_frame(fault: str, fault_step: int) -> dict[str, Any]:
    """Loss curves (seed 0) of the clean run and of the faulty run with each guard, and a note on the outcomes,
    on the lines that coincide and on the runs whose loss leaves the top of the axis."""
    runs = safety.load()
    x = list(range(0, safety.BASE.steps, BIN))
    lines = {g: runs[fault, g, fault_step, 0] for g in safety.GUARDS}
    curves = {g: _curve(line["loss"]) for g, line in lines.items()}
    traces = [{"x": x, "y": _curve(runs["none", "none", -1, 0]["loss"])}]
    traces += [{"x": x, "y": curves[g]} for g in safety.GUARDS]
    clean = runs["none", "none", -1, 0]["test_accuracy"]
    note = [f"{FAULT_LABELS[fault]} at step {fault_step}; clean run {100 * clean:.1f}% test accuracy (seed 0).",
            "Endings: " + "; ".join(f"{LABELS[g]}: {_outcome(line)}" for g, line in lines.items()) + "."]
    for group in coinciding(curves):
        names = and_list([LABELS[g] for g in group])
        note.append(f"{names[0].upper()}{names[1:]} have identical losses: their lines lie on each other.")
    high = [(g, max(v for v in c if v is not None)) for g, c in curves.items() if any(v is not None for v in c)]
    high = [(g, m) for g, m in high if m > 10 ** TOP]
    if high:
        note.append("Above the top of the axis: " + "; ".join(f"{LABELS[g]} (up to {m:.0e} nats)" for g, m in high)
                    + ".")
    return {"traces": traces, "note": note}


def loss_explorer() -> Explorer:
    """Fault type (buttons) x fault step (slider): the training loss without a guard and with each guard."""
    traces = [run_style("reference", name="no fault (clean)", mode="lines", line=CLEAN_STYLE)]
    traces += [{"mode": "lines", "name": LABELS[g], "line": dict(STYLES[g])} for g in safety.GUARDS]
    layout = {"height": 540, "margin": {"t": 30, "l": 60, "r": 15},  # room for the legend's rows on a phone
              "xaxis": {"title": {"text": "step"}, "range": [0, safety.BASE.steps]},
              "yaxis": {"type": "log", "title": {"text": "training loss (nats), max of 3 steps"},
                        "range": [-5, TOP], "exponentformat": "power"},
              # above the plot, clear of the ticks and the axis title at every width
              "legend": {"orientation": "h", "x": 0, "xanchor": "left", "y": 1.02, "yanchor": "bottom",
                         "entrywidth": 100, "entrywidthmode": "pixels", "font": {"size": 11}}}  # two a row on a phone
    return Explorer(
        "safety-loss",
        [Param("fault", list(safety.FAULTS)[1:], label="fault", default="nan-grad", kind="buttons",
               fmt=lambda f: FAULT_LABELS[f]),
         Param("fault_step", list(safety.FAULT_STEPS), label="fault step", default=safety.DEFAULT_FAULT_STEP, fmt="d")],
        compute=loss_frame, traces=traces, layout=layout, label="fig-safety-loss", share_traces=True,
        caption="Training loss of chapter 4's depth-8 ReLU MLP on the digits (SGD with momentum 0.9, learning rate "
                f"{safety.BASE.lr:g}, {safety.BASE.steps} steps of {safety.BASE.batch}, seed 0) with one fault "
                "injected at the chosen step (the random labels hit 10 consecutive batches), without a guard and "
                "with each guard alone; the grey dotted line is the same run without a fault. The note under the "
                "plot gives each run's ending: a test accuracy when it finished; diverged when its weights stayed "
                "finite but its accuracy ended below 50% (most end at chance, 10%), so its line goes on to the "
                "last step unless its loss became non-finite (the note says from which step); NaN weights when they became non-finite, where its line stops (a gap is a non-finite "
                "loss). The note also names lines that lie on each other and runs whose loss leaves the top of "
                f"the axis (10{str(TOP).translate(SUPERSCRIPT)} nats).")


def accuracy_figure() -> PlotlyFigure:
    """Mean test accuracy over the seeds per guard (rows) and fault (columns), at the default fault step.

    Every cell is labelled (an annotation, so the NaN cells, which have no colour, are labelled too): the mean
    accuracy, ✓ where the guard recovers the run with any one seed left out too (``verdict`` "recovers" of
    :func:`gradclip_book.safety.summary`), * where the verdict changes with one seed left out ("fragile": no ✓,
    not counted as a recovery) and, when some seed was lost, how many and how.
    """
    s = safety.summary()
    faults, guards = list(s["faults"]), list(safety.GUARDS)
    seeds = len(s["seeds"])
    z, notes = [], []
    for gi, g in enumerate(guards):
        row = []
        for fi, f in enumerate(faults):
            cell = s["faults"][f][g]
            acc = cell["accuracy"]
            nan = sum(o == "nan" for o in cell["outcomes"])
            diverged = sum(o == "diverged" for o in cell["outcomes"])
            row.append(None if acc is None else round(100 * acc, 1))
            if acc is None:
                text, colour = f"NaN<br>{nan} of {seeds}", None  # no colour behind it: the page's text colour
            else:
                text = (f"{100 * acc:.1f}" + (" ✓" if cell["verdict"] == "recovers" else "")
                        + ("*" if cell["verdict"] == "fragile" else "")
                        + (f"<br>{diverged} div." if diverged else ""))
                colour = "#000000" if acc >= 0.5 else "#ffffff"  # Viridis is dark below the middle
            font = {"size": 12} if colour is None else {"size": 12, "color": colour}
            notes.append({"x": fi, "y": gi, "text": text, "showarrow": False, "font": font})
        z.append(row)
    trace = {"type": "heatmap", "x": list(range(len(faults))), "y": list(range(len(guards))), "z": z,
             "zmin": 0, "zmax": 100, "colorscale": "Viridis", "showscale": False, "xgap": 2, "ygap": 2,
             "customdata": [[f"{FAULT_LABELS[f]}, {LABELS[g]}" for f in faults] for g in guards],
             "hovertemplate": "%{customdata}: %{z:.1f}%<extra></extra>", "hoverongaps": False}
    layout = {"height": 60 + 38 * len(guards), "margin": {"l": 125, "r": 10, "t": 10, "b": 50}, "annotations": notes,
              "xaxis": {"tickvals": list(range(len(faults))), "ticktext": [FAULT_SHORT[f] for f in faults],
                        "side": "bottom", "showgrid": False, "zeroline": False, "fixedrange": True},
              "yaxis": {"tickvals": list(range(len(guards))), "ticktext": [LABELS[g] for g in guards],
                        "autorange": "reversed", "showgrid": False, "zeroline": False, "fixedrange": True}}
    return PlotlyFigure([trace], layout, "safety-accuracy", label="fig-safety-accuracy",
                        caption=f"Mean test accuracy (%) over {seeds} seeds with each fault (columns) at step "
                                f"{s['fault_step']} and each guard alone (rows); the clean run reaches "
                                f"{100 * s['clean']:.1f}%. Colour follows the number, from dark (0%) to yellow "
                                "(100%). ✓ marks a guard that recovers the run: every seed finishes and the "
                                f"mean is not below the lowest clean seed's {100 * s['clean_min']:.1f}%, with any "
                                "one seed left out too (from the faulty and the clean runs); * marks a fragile "
                                "verdict, one that changes when one seed is left out, which is not counted as a "
                                "recovery. \"div.\" "
                                "counts the seeds that diverged (weights finite, accuracy below 50%), which the "
                                "mean includes; a cell reading NaN, without colour, had non-finite "
                                "weights at the end for the seeds counted (no accuracy exists).")
