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
from .figures import Explorer, Param, PlotlyFigure, run_style

__all__ = ["accuracy_figure", "loss_explorer", "loss_frame"]

LABELS = {"none": "no guard", "softcap": "soft-capping", "activation": "activation check", "loss": "loss guard",
          "layerwise": "per-layer hooks", "spike": "SpikeGuard", "rollback": "rollback"}
COLORS = {"none": "#D55E00", "softcap": "#E69F00", "activation": "#56B4E9", "loss": "#009E73",
          "layerwise": "#CC79A7", "spike": "#0072B2", "rollback": "#000000"}
FAULT_LABELS = {"outliers": "outlier inputs", "nan-grad": "NaN gradients", "scaled": "gradients x1000",
                "labels": "random labels"}
BIN = 3  # steps per plotted point: the largest loss of each bin, so a one-step spike survives


def _curve(loss: list[float | str]) -> list[float | None]:
    """Each bin's largest loss, ``None`` (a gap) where the loss was non-finite or the run had stopped."""
    values = np.array([float(v) for v in loss] + [math.nan] * (safety.BASE.steps - len(loss)))
    out = []
    for start in range(0, len(values), BIN):
        chunk = values[start:start + BIN]
        out.append(None if not np.isfinite(chunk).all() else float(chunk.max()))
    return out


def loss_frame(fault: str, fault_step: int) -> dict[str, Any]:
    """Loss curves (seed 0) of the clean run and of the faulty run with each guard, and a note on the outcomes."""
    runs = safety.load()
    x = list(range(0, safety.BASE.steps, BIN))
    lines = [runs[fault, g, fault_step, 0] for g in safety.GUARDS]
    traces = [{"x": x, "y": _curve(runs["none", "none", -1, 0]["loss"])}]
    traces += [{"x": x, "y": _curve(line["loss"])} for line in lines]
    described = []
    for g, line in zip(safety.GUARDS, lines):
        acc = line["test_accuracy"]
        described.append(f"{LABELS[g]}: " + ("NaN weights" if line["outcome"] == "nan" else
                                             f"{100 * acc:.1f}%" + (" (diverged)" if line["outcome"] == "diverged" else "")))
    clean = runs["none", "none", -1, 0]["test_accuracy"]
    note = [f"{FAULT_LABELS[fault]} at step {fault_step}; clean run {100 * clean:.1f}% test accuracy (seed 0).",
            "; ".join(described) + "."]
    return {"traces": traces, "note": note}


def loss_explorer() -> Explorer:
    """Fault type (buttons) x fault step (slider): the training loss without a guard and with each guard."""
    traces = [run_style("reference", name="clean run, no fault", mode="lines")]
    for g in safety.GUARDS:
        style = run_style("plain", name=LABELS[g], mode="lines") if g == "none" else \
            {"mode": "lines", "name": LABELS[g], "line": {"color": COLORS[g], "width": 1.5}}
        traces.append(style)
    layout = {"height": 460, "xaxis": {"title": {"text": "step"}, "range": [0, safety.BASE.steps]},
              "yaxis": {"type": "log", "title": {"text": "training loss (nats), largest of 3 steps"},
                        "range": [-5, 5], "exponentformat": "power"},
              "legend": {"orientation": "h", "y": -0.2}}
    return Explorer(
        "safety-loss",
        [Param("fault", list(safety.FAULTS)[1:], label="fault", default="nan-grad", kind="buttons",
               fmt=lambda f: FAULT_LABELS[f]),
         Param("fault_step", list(safety.FAULT_STEPS), label="fault step", default=safety.DEFAULT_FAULT_STEP, fmt="d")],
        compute=loss_frame, traces=traces, layout=layout, label="fig-safety-loss", share_traces=True,
        caption="Training loss of chapter 4's depth-8 ReLU MLP on the digits (SGD with momentum 0.9, learning rate "
                f"{safety.BASE.lr:g}, {safety.BASE.steps} steps of {safety.BASE.batch}, seed 0) with one fault "
                "injected at the chosen step (the random labels hit 10 consecutive batches), without a guard and "
                "with each guard alone; the green dotted line is the same run without a fault. A gap is a "
                "non-finite loss, or a run stopped with NaN weights.")


def accuracy_figure() -> PlotlyFigure:
    """Mean test accuracy over the seeds per fault (rows) and guard (columns), at the default fault step."""
    s = safety.summary()
    faults, guards = list(s["faults"]), list(safety.GUARDS)
    z, text = [], []
    for f in faults:
        row, labels = [], []
        for g in guards:
            cell = s["faults"][f][g]
            nan = sum(o == "nan" for o in cell["outcomes"])
            acc = cell["accuracy"]
            row.append(None if acc is None else round(100 * acc, 1))
            labels.append(f"NaN ({nan}/{len(cell['outcomes'])})" if acc is None else f"{100 * acc:.1f}")
        z.append(row)
        text.append(labels)
    trace = {"type": "heatmap", "x": [LABELS[g] for g in guards], "y": [FAULT_LABELS[f] for f in faults], "z": z,
             "text": text, "texttemplate": "%{text}", "zmin": 0, "zmax": 100, "colorscale": "Viridis",
             "colorbar": {"title": {"text": "test acc. (%)"}}, "hoverongaps": False}
    layout = {"height": 340, "yaxis": {"autorange": "reversed"}, "xaxis": {"side": "bottom"},
              "margin": {"l": 120}}
    return PlotlyFigure([trace], layout, "safety-accuracy", label="fig-safety-accuracy",
                        caption=f"Mean test accuracy (%) over {len(s['seeds'])} seeds with each fault at step "
                                f"{s['fault_step']} and each guard alone; the clean run reaches "
                                f"{100 * s['clean']:.1f}%. A cell reading NaN had non-finite weights at the end "
                                "for the seeds counted in brackets (blank: no accuracy exists).")
