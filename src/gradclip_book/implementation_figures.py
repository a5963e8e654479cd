r"""Chapter 3's figure: a two-dimensional gradient playground (norm, value and soft clipping).

Sliders set the gradient's two components and the threshold c; buttons
choose the rule. The figure draws the gradient and its clipped version as
arrows, with the set the rule keeps gradients in: the ball
:math:`\lVert g\rVert \le c` (norm clipping), the box
:math:`|g_1|, |g_2| \le c` (value clipping), or, for soft clipping
:math:`g \cdot c/(\lVert g\rVert + c)`, the circle of radius c that it
approaches but never reaches and the circle where every gradient of the
current length lands. Every clipped vector is computed by gradclip itself.

Example:
    >>> from gradclip_book.implementation_figures import clip_2d
    >>> clip_2d((3.0, 4.0), 1.0, "norm")["after"]
    (0.6, 0.8)
"""

from __future__ import annotations

import math

import numpy as np
import torch

import gradclip

from .families import angle_degrees
from .figures import PALETTE, Explorer, Param

__all__ = ["COMPONENTS", "RULES", "THRESHOLDS", "clip_2d", "playground"]

COMPONENTS = tuple(range(-4, 5))
"""The grid of each gradient component: -4 .. 4 in steps of 1."""
THRESHOLDS = (1.0, 2.0)
"""The thresholds c on the grid."""
RULES = {"norm": "norm clipping", "value": "value clipping", "soft": "soft clipping"}
"""Rule name -> its label on the buttons."""

_CIRCLE = np.linspace(0.0, 2.0 * math.pi, 37)  # 10° chords: off the circle by under 0.4% of its radius


def clip_2d(g: tuple[float, float], threshold: float, rule: str) -> dict:
    r"""Clip the 2-D gradient ``g`` by ``rule`` with gradclip; the clipped vector, both norms and the angle turned.

    ``norm`` is :func:`gradclip.clip_grad_norm_` (max_norm c), ``value``
    :func:`gradclip.clip_grad_value_` (clip_value c), ``soft``
    :func:`gradclip.soft_clip_grad_norm_` (max_norm c), on a float64 tensor.

    Returns:
        ``{"after": (g1, g2) rounded to 4 decimals, "norm_before", "norm_after", "angle": degrees}``.

    Raises:
        ValueError: ``rule`` is not one of :data:`RULES`.

    Example:
        >>> r = clip_2d((3.0, 1.0), 2.0, "value")
        >>> r["after"], round(r["angle"], 1)
        ((2.0, 1.0), 8.1)
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {sorted(RULES)}, got {rule!r}")
    param = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    param.grad = torch.tensor(g, dtype=torch.float64)
    if rule == "norm":
        gradclip.clip_grad_norm_([param], threshold)
    elif rule == "value":
        gradclip.clip_grad_value_([param], threshold)
    else:
        gradclip.soft_clip_grad_norm_([param], threshold)
    after = param.grad.numpy()
    return {"after": (round(float(after[0]), 4) + 0.0, round(float(after[1]), 4) + 0.0),
            "norm_before": float(np.hypot(*g)), "norm_after": float(np.hypot(*after)),
            "angle": angle_degrees(np.asarray(g, dtype=float), after)}


def _circle(radius: float) -> dict:
    return {"x": (radius * np.cos(_CIRCLE)).round(3).tolist(), "y": (radius * np.sin(_CIRCLE)).round(3).tolist()}


def _arrow(vector: tuple[float, float]) -> dict:
    if vector[0] == 0 and vector[1] == 0:
        return {"x": [], "y": []}  # no arrow: an arrowhead at the origin would point nowhere
    return {"x": [0.0, float(vector[0])], "y": [0.0, float(vector[1])]}


def _num(value: float) -> str:
    """A clipped component for the note: whole numbers as such, others with three significant digits (1.90, 0.632)."""
    return f"{value:g}" if float(value).is_integer() else f"{value:#.3g}"


def _note(g: tuple[float, float], c: float, rule: str, r: dict) -> str:
    """One short sentence per state (the page stores one per frame): the vectors, the norms, the turn."""
    if r["norm_before"] == 0:
        return "g = (0, 0): nothing to clip."
    change = "unchanged" if r["norm_after"] == r["norm_before"] else f"× {r['norm_after'] / r['norm_before']:.2f}"
    return (f"{RULES[rule].capitalize()}, c = {c:g}: ({g[0]:g}, {g[1]:g}) → ({_num(r['after'][0])}, {_num(r['after'][1])}); "
            f"‖g‖ {r['norm_before']:.2f} → {r['norm_after']:.2f} ({change}); turned {r['angle']:.1f}°.")


def _frame(g1: int, g2: int, threshold: float, rule: str) -> dict:
    g = (float(g1), float(g2))
    r = clip_2d(g, threshold, rule)
    c = threshold
    if rule == "value":
        region = {"x": [-c, c, c, -c, -c], "y": [-c, -c, c, c, -c], "name": f"box |g₁|, |g₂| ≤ {c:g}"}
        level = {"x": [], "y": []}
    elif rule == "norm":
        region = {**_circle(c), "name": f"ball ‖g‖ ≤ {c:g}"}
        level = {"x": [], "y": []}
    else:
        region = {**_circle(c), "name": f"‖g‖ = {c:g}, approached, never reached"}
        level = {**_circle(r["norm_after"]), "name": f"every g of length {r['norm_before']:.2f} lands here"}
    return {"traces": [region, level, _arrow(g), _arrow(r["after"])], "note": _note(g, c, rule, r)}


def _arrow_style(color: str, width: float, name: str, dash: str = "solid") -> dict:
    return {"mode": "lines+markers", "name": name, "line": {"color": color, "width": width, "dash": dash},
            "marker": {"symbol": "arrow", "angleref": "previous", "size": [0, 15], "color": color},
            "hoverinfo": "skip"}


def playground() -> Explorer:
    """The interactive 2-D playground: gradient components, threshold and rule; 486 precomputed frames.

    Example:
        >>> ex = playground()
        >>> len(ex.frames), ex.frame(g1=3, g2=1, threshold=2.0, rule="norm")["traces"][3]["x"][1]
        (486, 1.8974)
    """
    limit = max(abs(v) for v in COMPONENTS) + 0.6
    axis = {"range": [-limit, limit], "zeroline": True, "dtick": 1, "fixedrange": True}
    return Explorer(
        "grad-playground",
        [Param("g1", list(COMPONENTS), label="g₁", default=3, fmt="d"),
         Param("g2", list(COMPONENTS), label="g₂", default=1, fmt="d"),
         Param("threshold", list(THRESHOLDS), label="threshold c", default=2.0, fmt="g"),
         Param("rule", list(RULES), label="rule", default="norm", fmt=lambda v: RULES[v])],
        compute=_frame,
        traces=[{"mode": "lines", "line": {"color": PALETTE[0], "dash": "dot", "width": 1.5}, "hoverinfo": "skip"},
                {"mode": "lines", "line": {"color": PALETTE[2], "dash": "dash", "width": 1.5}, "hoverinfo": "skip"},
                _arrow_style("#6b6b6b", 2, "gradient g", "dash"),
                _arrow_style(PALETTE[5], 3.5, "clipped")],
        # the legend above the plot: below it, it would sit on the g₁ axis title
        layout={"height": 500, "margin": {"l": 40, "r": 10, "t": 40, "b": 40},
                "xaxis": {**axis, "title": {"text": "g₁"}},
                "yaxis": {**axis, "title": {"text": "g₂"}, "scaleanchor": "x", "scaleratio": 1, "constrain": "domain"},
                "legend": {"orientation": "h", "x": 0, "y": 1.02, "yanchor": "bottom"}},
        caption="A two-dimensional gradient g (grey, dashed) and the vector a clipping rule makes of it (orange), "
                "computed by gradclip. Norm clipping keeps g inside the ball ‖g‖ ≤ c (dotted circle), value "
                "clipping inside the box |g₁|, |g₂| ≤ c (dotted square); soft clipping multiplies g by "
                "c/(‖g‖ + c), so the result approaches the dotted circle of radius c without reaching it and "
                "every gradient of the same length lands on the dashed circle. Both axes have the same scale. "
                "The note under the figure gives the vector, its norm before and after, and the angle turned.",
        label="fig-playground", share_traces=True,
    )
