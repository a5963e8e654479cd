r"""Storing a run's curves at the resolution a reader sees: every early step, wider bins later.

A figure with a logarithmic step axis gives step 1 as much room as steps 100-300. The stored curves
therefore keep each of the first steps on its own and merge later steps into bins that widen
geometrically (:func:`log_bins`). The bins depend only on the number of steps *asked for*, not on how
many a run took, so two runs share their first bins; and a run of at most ``points`` steps (one that
diverged early) is stored and drawn step by step: **no stored or drawn point of a short run merges two
steps.**

Per bin, ``loss`` is the mean, ``grad_norm`` the maximum (so spikes survive) and ``clipped`` the share of
steps where the method fired.

Example:
    >>> from gradclip_book.harness.curves import log_bins
    >>> bins = log_bins(300, points=60)
    >>> bins[:5], bins[-1], all(b - a == 1 for a, b in zip(bins[:18], bins[1:19]))
    ([0, 1, 2, 3, 4], 300, True)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["CURVE_POINTS", "compact", "log_bins", "rebin", "round_float"]

CURVE_POINTS = 150
"""Stored curves have at most about this many points."""


def log_bins(steps: int, points: int = CURVE_POINTS) -> list[int]:
    """Bin edges over steps ``0 .. steps``: single steps first, then bins that grow by a constant factor, at most
    ``points`` bins (every step its own bin when ``steps <= points``).

    Bin ``i`` holds the steps ``edges[i] <= s < edges[i + 1]``. The growth factor r is the smallest that covers
    ``steps`` in ``points`` bins; the steps below 1/(r - 1), where a geometric bin would be narrower than one
    step, are single bins (63 of them for 300 steps in 150 bins, 18 in 60).

    Example:
        >>> log_bins(10, points=20)
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
        >>> edges = log_bins(1000, points=50)
        >>> len(edges) - 1 <= 50, edges[:8], edges[-1]
        (True, [0, 1, 2, 3, 4, 5, 6, 7], 1000)
    """
    if steps <= points:
        return list(range(steps + 1))
    lo, hi = 1.0 + 1e-9, float(steps)
    for _ in range(100):  # bisection on the growth factor: fewer bins as it grows
        mid = (lo + hi) / 2
        if len(_edges(steps, mid)) - 1 <= points:
            hi = mid
        else:
            lo = mid
    return _edges(steps, hi)


def _edges(steps: int, factor: float) -> list[int]:
    singles = max(1, math.ceil(1 / (factor - 1)))
    edges = list(range(min(singles, steps) + 1))
    position = float(edges[-1])
    while edges[-1] < steps:
        position *= factor
        edges.append(min(steps, max(edges[-1] + 1, int(round(position)))))
    return edges


def round_float(x: float | None, digits: int = 5) -> float | str | None:
    """``x`` to ``digits`` significant digits; non-finite values as the strings ``"nan"``, ``"inf"``, ``"-inf"``.

    Example:
        >>> round_float(3.14159265), round_float(float("inf")), round_float(None)
        (3.1416, 'inf', None)
    """
    if x is None:
        return None
    if not math.isfinite(x):
        return str(x)
    return float(f"{x:.{digits}g}")


def _bin_values(values: np.ndarray, edges: list[int], how: str) -> list[float | str | None]:
    out = []
    for a, b in zip(edges, edges[1:]):
        part = values[a:b]
        if len(part) == 0:
            break
        finite = part[np.isfinite(part)] if how == "max" else part
        if how == "mean":
            value = float(np.mean(part))
        elif how == "max":
            value = float(np.max(finite)) if len(finite) else float("nan")
        else:
            raise ValueError(how)
        out.append(round_float(value))
    return out


def compact(run: Any, points: int = CURVE_POINTS) -> dict[str, Any]:
    """A JSON-ready dict of a :class:`~gradclip_book.harness.Run`: scalars, and curves in :func:`log_bins` bins.

    Keys: ``steps``, ``steps_run``, ``diverged_at``, ``diverged_loss`` (the loss that stopped a diverged run),
    ``stopped_at``, ``metrics`` (5 significant digits), ``evals``, ``clip_fraction``, ``final_loss`` (mean over
    the last 10% of the steps run), ``seconds``, and ``curve`` (step by step for a run of at most ``points``
    steps): ``step`` (each bin's first step), ``loss`` (bin mean), ``grad_norm`` (bin max of the finite pre-clip norms), ``clipped`` (share of the bin's steps that fired).
    Non-finite floats are stored as the strings ``"nan"``/``"inf"``.

    Example:
        >>> from gradclip_book.harness import Run
        >>> run = Run([2.0, 1.0, 0.5, 0.25], [4.0, 3.0, 2.0, 1.0], [True, False, False, False], [False] * 4,
        ...           [0.1] * 4, steps=4, steps_run=4, diverged_at=None, stopped_at=None, metrics={"acc": 0.9})
        >>> c = compact(run)
        >>> c["curve"]["step"], c["curve"]["grad_norm"], c["clip_fraction"]
        ([0, 1, 2, 3], [4.0, 3.0, 2.0, 1.0], 0.25)
    """
    n = run.steps_run
    if n <= points:  # a short run (one that diverged early) is stored step by step
        edges = list(range(n + 1))
    else:
        edges = [e for e in log_bins(run.steps, points) if e <= n]
        if edges[-1] < n:
            edges.append(n)
    loss = np.array(run.loss[:n], dtype=float)
    norm = np.array(run.grad_norm[:n], dtype=float)
    fired = np.array(run.clipped[:n], dtype=float)
    tail = loss[-max(1, n // 10):] if n else loss
    return {
        "steps": run.steps,
        "steps_run": n,
        "diverged_at": run.diverged_at,
        "diverged_loss": round_float(run.loss[n]) if run.diverged_at is not None else None,
        "stopped_at": run.stopped_at,
        "metrics": {k: round_float(v) for k, v in run.metrics.items()},
        "evals": [[step, {k: round_float(v) for k, v in m.items()}] for step, m in run.evals],
        "clip_fraction": round_float(run.clip_fraction),
        "final_loss": round_float(float(tail.mean())) if n else None,
        "seconds": round(run.seconds, 3),
        "curve": {
            "step": [int(a) for a, b in zip(edges, edges[1:])],
            "loss": _bin_values(loss, edges, "mean"),
            "grad_norm": _bin_values(norm, edges, "max"),
            "clipped": _bin_values(fired, edges, "mean"),
        },
    }


def rebin(curve: dict[str, list], steps: int, points: int, steps_run: int | None = None) -> dict[str, list]:
    """A stored ``curve`` (of a run of ``steps_run`` steps out of ``steps``) merged into the coarser
    :func:`log_bins` ``(steps, points)``, or left as stored when the run took at most ``points`` steps (a short run
    is drawn step by step). Loss and clipped share are weighted by the steps each stored bin holds, the norm is a
    maximum; stored bins are merged whole, by the coarse bin their first step falls in.

    Example:
        >>> curve = {"step": [0, 1, 2, 3], "loss": [4.0, 2.0, 1.0, 1.0], "grad_norm": [1.0, 5.0, 2.0, 2.0],
        ...          "clipped": [0.0, 1.0, 0.0, 0.0]}
        >>> rebin(curve, steps=300, points=5, steps_run=4) == curve
        True
        >>> rebin(curve, steps=4, points=2)["grad_norm"]
        [1.0, 5.0]
    """
    starts = list(curve["step"])
    steps_run = steps if steps_run is None else steps_run
    if not starts or steps_run <= points:
        return {k: list(curve[k]) for k in ("step", "loss", "grad_norm", "clipped")}
    edges = log_bins(steps, points)
    ends = starts[1:] + [steps_run]
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(starts):
        groups.setdefault(int(np.searchsorted(edges, s, side="right")) - 1, []).append(i)
    out: dict[str, list] = {"step": [], "loss": [], "grad_norm": [], "clipped": []}
    for k in sorted(groups):
        members = groups[k]
        weights = np.array([ends[i] - starts[i] for i in members], dtype=float)
        loss = np.array([_f(curve["loss"][i]) for i in members])
        norm = np.array([_f(curve["grad_norm"][i]) for i in members])
        fired = np.array([_f(curve["clipped"][i]) for i in members])
        finite = norm[np.isfinite(norm)]
        out["step"].append(starts[members[0]])
        out["loss"].append(round_float(float(np.sum(loss * weights) / weights.sum())))
        out["grad_norm"].append(round_float(float(finite.max())) if len(finite) else "nan")
        out["clipped"].append(round_float(float(np.sum(fired * weights) / weights.sum())))
    return out


def _f(value: Any) -> float:
    return float(value) if value is not None else math.nan
