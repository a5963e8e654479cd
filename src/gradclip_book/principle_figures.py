"""The figures and experiment grids of the chapter *Principle: why gradients explode*.

Each ``*_explorer`` function runs the experiment over its slider grid and
returns a :class:`~gradclip_book.figures.Explorer` (or a
:class:`~gradclip_book.figures.PlotlyFigure`); the grids and runs they read
are cached functions, so the chapter's prose and asserts read the very runs
the figures draw. Notation follows the chapter: gain :math:`\\kappa`, depth
:math:`D`, threshold c, learning rate :math:`\\eta`.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy.stats import spearmanr

from .cliff import cliff_descent, cliff_loss
from .depth import depth_profile, predicted_layer_factor, predicted_norms
from .families import angle_degrees, apply_method, clip_vector, default_settings, record_gradient_stream
from .figures import PALETTE, Explorer, Param, PlotlyFigure, run_style
from .quartic import quartic_descent
from .rnn import gradient_through_time
from .smoothness import quartic_steps, smoothness_along_training, smoothness_envelope

# --- page weight: store what a reader can see -------------------------------------------------

def _sig(values, digits: int = 4, decimals: int | None = None) -> list:
    """``values`` rounded to ``digits`` significant digits (and at most ``decimals`` decimals); NaN/inf -> None.

    A log10 value plotted over several decades needs no more than 3 decimals.

    Example:
        >>> _sig([3.14159, -12.3456, float("inf"), 0.0001234], decimals=3)
        [3.142, -12.35, None, 0.0]
    """
    out = []
    for v in np.asarray(values, dtype=float).ravel().tolist():
        if not math.isfinite(v):
            out.append(None)
            continue
        if decimals is not None:
            v = round(v, decimals)
        out.append(float(f"{v:.{digits}g}") if v else 0.0)
    return out


def _line(x0: float, x1: float, y0: float, y1: float) -> dict:
    """A straight line (a power law on a log axis) as its two end points."""
    return {"x": [x0, x1], "y": _sig([y0, y1], decimals=3)}


# --- 2.2 depth -------------------------------------------------------------------------------

DEPTH_WIDTH, DEPTH_SEEDS = 64, 3
DEPTHS = (10, 20, 30, 50)
GAINS = (0.8, 0.9, 1.0, 1.1, 1.2)


@lru_cache(maxsize=None)
def depth_group(gain: float, activation: str, init: str) -> dict:
    """Measured profile and law for every depth and both losses at one (gain, activation, init).

    Uses :data:`DEPTH_SEEDS` seeds and width :data:`DEPTH_WIDTH`: the figure and the prose read these runs.
    """
    return {(d, loss): (depth_profile(d, DEPTH_WIDTH, gain, activation, init, loss, seeds=DEPTH_SEEDS),
                        predicted_norms(d, DEPTH_WIDTH, gain, activation, init, loss))
            for d in DEPTHS for loss in ("probe", "mse")}


def depth_change(depth: int, gain: float, activation: str = "linear", init: str = "xavier") -> float:
    """Decades by which the activation gradient grows from the top to the input, as the figure shows it."""
    logs = depth_group(gain, activation, init)[(depth, "probe")][0].log_activation_grads
    return logs[0] - logs[-1]


def depth_explorer() -> Explorer:
    """Per-layer and total gradient norms against depth, gain, activation and initialisation."""
    def frame(depth, gain, activation, init):
        group = depth_group(gain, activation, init)
        measured, law = group[(depth, "probe")]
        ratio = float(np.exp(np.mean(np.log(measured.layer_ratios))))
        q = predicted_layer_factor(gain, activation, init, DEPTH_WIDTH)
        bound = " (an upper bound for tanh)" if activation == "tanh" else ""
        law_y = np.asarray(law.log_activation_grads, dtype=float)
        assert np.allclose(law_y, np.linspace(law_y[0], law_y[-1], len(law_y)), atol=1e-6)  # a straight line
        spread = max(measured.log_weight_grads) - min(measured.log_weight_grads)
        return {
            "traces": [  # x is the layer index: plotly's default 0, 1, 2, ... (x0 = 1 for the weights)
                {"y": _sig(measured.log_activation_grads, decimals=3)},
                _line(0, depth, law_y[0], law_y[-1]),
                {"y": _sig(measured.log_weight_grads, decimals=3)},
                {"y": _sig([group[(d, "probe")][0].log_total_norm for d in DEPTHS], decimals=3)},
                {"y": _sig([group[(d, "probe")][1].log_total_norm for d in DEPTHS], decimals=3)},
                {"y": _sig([group[(d, "mse")][0].log_total_norm for d in DEPTHS], decimals=3)},
                {"y": _sig([group[(d, "mse")][1].log_total_norm for d in DEPTHS], decimals=3)},
            ],
            "note": f"Fitted per-layer ratio {ratio:.3f}; the law's factor q = {q:.3f}{bound}. Over {depth} layers "
                    f"the activation gradient changes by {depth_change(depth, gain, activation, init):+.2f} decades; "
                    f"the per-layer weight-gradient norms span {spread:.2f} decades.",
        }

    left, right = {"xaxis": "x", "yaxis": "y"}, {"xaxis": "x2", "yaxis": "y2"}
    return Explorer(
        "depth-explorer",
        [Param("depth", list(DEPTHS), label="depth D", default=50, fmt="d"),
         Param("gain", list(GAINS), label="gain κ", default=1.1),
         Param("activation", ["linear", "tanh", "relu"], label="activation", default="linear"),
         Param("init", ["naive", "xavier", "he", "orthogonal"], label="initialisation", default="xavier")],
        compute=frame,
        traces=[
            {**left, "mode": "markers", "name": "‖∂J/∂h_l‖ measured", "marker": {"color": PALETTE[0], "size": 6}},
            {**left, "mode": "lines", "name": "law q^(D−l)", "line": {"color": PALETTE[0]}},
            {**left, "mode": "markers", "name": "‖∂J/∂W_l‖ measured", "x0": 1,
             "marker": {"color": PALETTE[1], "symbol": "square", "size": 6}},
            {**right, "x": list(DEPTHS), "mode": "markers", "name": "total, probe loss", "marker": {"color": PALETTE[2], "size": 9}},
            {**right, "x": list(DEPTHS), "mode": "lines", "name": "law √D q^(D−1)", "line": {"color": PALETTE[2], "dash": "dot"}},
            {**right, "x": list(DEPTHS), "mode": "markers", "name": "total, squared error",
             "marker": {"color": PALETTE[3], "symbol": "diamond", "size": 9}},
            {**right, "x": list(DEPTHS), "mode": "lines", "name": "law √D q^(2D−1)", "line": {"color": PALETTE[3], "dash": "dot"}},
        ],
        layout={
            "height": 520,
            "xaxis": {"domain": [0, 0.55], "title": {"text": "layer l (0 = input)"}},
            "yaxis": {"title": {"text": "log10 norm"}},
            "xaxis2": {"domain": [0.68, 1], "title": {"text": "depth D"}, "anchor": "y2"},
            "yaxis2": {"anchor": "x2", "title": {"text": "log10 total gradient norm"}},
            "legend": {"orientation": "h", "x": 0, "y": -0.2, "yanchor": "top"},
            "margin": {"l": 60, "r": 20, "t": 20, "b": 140},
        },
        caption=(f"Left: gradient norms per layer of one backward pass at initialisation (geometric mean of "
                 f"{DEPTH_SEEDS} seeds, width {DEPTH_WIDTH}, probe loss): activation gradients (circles) with the "
                 "law q^(D−l) (line), and weight gradients (squares). Right: the total gradient norm "
                 "against depth for the probe loss and for a squared error on the output, with their laws."),
        label="fig-depth", share_traces=True,
    )


# --- 2.3 recurrent networks ------------------------------------------------------------------

RADII = (0.5, 0.8, 0.9, 1.0, 1.1, 1.2, 1.5, 2.0, 3.0, 5.0)
LENGTHS = (10, 25, 50, 100)
INPUT_SCALES = (0.1, 0.5, 1.0)
RNN_SEEDS, RNN_WIDTH = 3, 32


@lru_cache(maxsize=None)
def rnn_runs(radius: float, steps: int, activation: str, input_scale: float) -> tuple:
    """The :data:`RNN_SEEDS` runs of :func:`~gradclip_book.gradient_through_time` the figure averages."""
    return tuple(gradient_through_time(radius, steps, activation, width=RNN_WIDTH, input_scale=input_scale, seed=s)
                 for s in range(RNN_SEEDS))


def rnn_summary(radius: float, steps: int, activation: str, input_scale: float) -> dict:
    """Seed-averaged log10 norms back through time, mean lambda_1 and the mean-field factor.

    Returns:
        ``{"logs": [...], "lam1": float, "mean_field": float}``; ``mean_field`` is the mean over seeds
        of :math:`\\rho\\,\\overline{\\phi'(z)}`.
    """
    runs = rnn_runs(radius, steps, activation, input_scale)
    logs = np.mean([np.log10(np.maximum(r.norms, 1e-300)) for r in runs], axis=0)
    return {"logs": logs.tolist(), "lam1": float(np.mean([r.largest_singular_value for r in runs])),
            "mean_field": float(np.mean([r.mean_field_factor for r in runs]))}


def rnn_explorer() -> Explorer:
    """Gradient norm back through time against spectral radius, length and input scale."""
    def frame(radius, steps, input_scale):
        lin, tanh, sig = (rnn_summary(radius, steps, a, input_scale) for a in ("linear", "tanh", "sigmoid"))
        lam1 = lin["lam1"]
        bound = lambda gamma: _line(0, steps, 0.0, steps * math.log10(gamma * lam1))
        verdict = lambda gamma: "can explode" if gamma * lam1 > 1 else "must vanish"
        return {
            "traces": [
                # x is the step k: plotly's default 0, 1, 2, ...; the laws are straight lines
                {"y": _sig(lin["logs"], decimals=3)}, _line(0, steps, 0.0, steps * math.log10(radius)),
                {"y": _sig(tanh["logs"], decimals=3)}, bound(1.0),
                _line(0, steps, 0.0, steps * math.log10(tanh["mean_field"])),
                {"y": _sig(sig["logs"], decimals=3)}, bound(0.25),
            ],
            "note": f"λ1 ≈ {lam1:.2f}: tanh (γλ1 = {lam1:.2f}) {verdict(1.0)}, its mean-field factor "
                    f"ρ·mean tanh′ = {tanh['mean_field']:.2f}; sigmoid (γλ1 = {lam1 / 4:.2f}) {verdict(0.25)}. "
                    f"After {steps} steps: linear {lin['logs'][-1]:+.1f}, tanh {tanh['logs'][-1]:+.1f}, "
                    f"sigmoid {sig['logs'][-1]:+.1f} decades.",
        }

    return Explorer(
        "rnn-explorer",
        [Param("radius", list(RADII), label="spectral radius ρ", default=1.5),
         Param("steps", list(LENGTHS), label="length T", default=50, fmt="d"),
         Param("input_scale", list(INPUT_SCALES), label="input scale s", default=1.0, fmt="g")],
        compute=frame,
        traces=[
            {"mode": "markers", "name": "linear, measured", "marker": {"color": PALETTE[0], "size": 5}},
            {"mode": "lines", "name": "linear law ρ^k", "line": {"color": PALETTE[0]}},
            {"mode": "markers", "name": "tanh, measured", "marker": {"color": PALETTE[1], "size": 5, "symbol": "square"}},
            {"mode": "lines", "name": "tanh bound (γλ1)^k", "line": {"color": PALETTE[1], "dash": "dash"}},
            {"mode": "lines", "name": "tanh mean field (ρ·mean tanh′)^k", "line": {"color": PALETTE[1], "dash": "dot"}},
            {"mode": "markers", "name": "sigmoid, measured", "marker": {"color": PALETTE[2], "size": 5, "symbol": "diamond"}},
            {"mode": "lines", "name": "sigmoid bound (λ1/4)^k", "line": {"color": PALETTE[2], "dash": "dash"}},
        ],
        layout={"height": 500, "xaxis": {"title": {"text": "steps back in time k"}},
                "yaxis": {"title": {"text": "log10 ‖∂J/∂h_(T−k)‖"}},
                "legend": {"orientation": "h", "x": 0, "y": -0.2, "yanchor": "top"},
                "margin": {"l": 60, "r": 20, "t": 20, "b": 150}},
        caption=(f"The gradient of a probe loss at the last step of a {RNN_WIDTH}-unit recurrent network, back "
                 f"through time (geometric mean of {RNN_SEEDS} seeds; inputs N(0, s²)). Lines: the linear law ρ^k, "
                 "Pascanu et al.'s bound (γλ1)^k (γ = 1 for tanh, 1/4 for the sigmoid) and, for tanh, the "
                 "mean-field factor ρ times the mean slope tanh′ along the trajectory."),
        label="fig-rnn", share_traces=True,
    )


# --- 2.5 the cliff ---------------------------------------------------------------------------

CLIFF_START = (5.5, -2.3)
CLIFF_LRS = (0.002, 0.005, 0.01, 0.02)
CLIFF_THRESHOLDS = (None, 0.3, 1.0, 3.0)
CLIFF_HORIZONS = (40, 400)


@lru_cache(maxsize=None)
def _cliff_full_run(lr: float, max_norm: float | None):
    return cliff_descent(*CLIFF_START, lr=lr, max_norm=max_norm, iters=max(CLIFF_HORIZONS))


def cliff_run(lr: float, max_norm: float | None, iters: int = 40):
    """Descent from :data:`CLIFF_START`; a shorter horizon is the prefix of the longest run (computed once)."""
    full = _cliff_full_run(lr, max_norm)
    if iters == max(CLIFF_HORIZONS):
        return full
    n = min(iters + 1, len(full.w))
    return type(full)(full.w[:n], full.b[:n], full.losses[:n], full.grad_norms[:n])


def cliff_explorer() -> Explorer:
    """Plain and clipped descent on the one-unit RNN's loss, over learning rate, threshold and horizon."""
    w_grid = np.round(np.linspace(3.0, 7.0, 81), 4)
    b_grid = np.round(np.linspace(-4.5, -0.5, 81), 4)
    surface = np.log10(cliff_loss(w_grid[None, :], b_grid[:, None]) + 1e-4)

    def every(run):  # at most 201 points per curve: every second iteration of the long horizon
        return max(1, math.ceil((len(run.w) - 1) / 200))

    def path(run):
        k = every(run)
        return {"x": _sig(run.w[::k]), "y": _sig(run.b[::k])}

    def dist(run):
        k = every(run)
        d = [max(math.hypot(w - CLIFF_START[0], b - CLIFF_START[1]), 1e-4) for w, b in zip(run.w[::k], run.b[::k])]
        return {"x0": 0, "dx": k, "y": _sig(d)}

    def frame(lr, max_norm, iters):
        plain, clipped = cliff_run(lr, None, iters), cliff_run(lr, max_norm, iters)
        label = "" if max_norm is not None else " (threshold off: same as plain)"
        return {
            "traces": [
                {},
                path(plain), path(clipped), dist(plain), dist(clipped),
            ],
            "note": f"Start loss {plain.losses[0]:.3g}. Plain: farthest {plain.farthest():.2f} from the start, "
                    f"final loss {plain.losses[-1]:.3g}. Clipped{label}: farthest {clipped.farthest():.3f}, "
                    f"final loss {clipped.losses[-1]:.3g}.",
        }

    return Explorer(
        "cliff-explorer",
        [Param("lr", list(CLIFF_LRS), label="learning rate η", default=0.005),
         Param("max_norm", list(CLIFF_THRESHOLDS), label="threshold c", default=1.0),
         Param("iters", list(CLIFF_HORIZONS), label="iterations", default=40, fmt="d")],
        compute=frame,
        traces=[
            {"type": "heatmap", "x": w_grid.tolist(), "y": b_grid.tolist(), "z": np.round(surface, 2).tolist(),
             "colorscale": "Viridis", "colorbar": {"title": {"text": "log10 E"}, "x": 0.47, "xanchor": "left",
                                                   "thickness": 10, "len": 0.9},
             "name": "loss", "showlegend": False, "xaxis": "x", "yaxis": "y"},
            # the book's plain/clipped styles (vermillion dashed, blue solid), with different marker shapes
            run_style("plain", mode="lines+markers", name="plain descent", xaxis="x", yaxis="y",
                      marker={"size": 5, "symbol": "square"}),
            run_style("clipped", mode="lines+markers", name="clipped descent", xaxis="x", yaxis="y",
                      marker={"size": 5, "symbol": "circle"}),
            run_style("plain", mode="lines", name="plain: distance", xaxis="x2", yaxis="y2", showlegend=False),
            run_style("clipped", mode="lines", name="clipped: distance", xaxis="x2", yaxis="y2", showlegend=False),
        ],
        layout={
            "height": 500,
            "xaxis": {"domain": [0, 0.45], "title": {"text": "w"}, "range": [3, 7]},
            "yaxis": {"title": {"text": "b"}, "range": [-4.5, -0.5]},
            "xaxis2": {"domain": [0.68, 1], "title": {"text": "iteration"}, "anchor": "y2"},
            "yaxis2": {"anchor": "x2", "type": "log", "title": {"text": "distance from start"}},
            "legend": {"orientation": "h", "x": 0, "y": -0.15, "yanchor": "top"},
            "margin": {"l": 60, "r": 20, "t": 20, "b": 110},
        },
        caption=("Left: log10 of the loss E(w, b) of the one-unit RNN x_t = w·σ(x_(t−1)) + b (x0 = 0.5, target 0.7 "
                 f"at t = 50), with gradient descent from {CLIFF_START}, plain and with norm clipping; a run thrown "
                 "out of the frame continues off the picture. Right: the distance from the start at each iteration "
                 "(log scale)."),
        label="fig-cliff", share_traces=True,
    )


# --- 2.6 smoothness --------------------------------------------------------------------------

QUARTIC_X0S = (2.0, 5.0, 10.0, 20.0, 100.0)


def quartic_table() -> dict:
    """Steps to f < 1e-4 on x^4 from each start in :data:`QUARTIC_X0S`: fixed step 0.9/(2x0²) and clipped (0.1, c = 1)."""
    return {"x0": list(QUARTIC_X0S),
            "fixed": [quartic_steps(x0, 0.9 / (2 * x0**2)) for x0 in QUARTIC_X0S],
            "clipped": [quartic_steps(x0, 0.1, max_norm=1.0) for x0 in QUARTIC_X0S]}


def quartic_figure(table: dict, gd_const: float, clip_offset: float) -> PlotlyFigure:
    """Steps against start, log-log, with the laws C x0² and x0/(eta c) + C."""
    x0s = table["x0"]
    xs = np.logspace(math.log10(x0s[0]), math.log10(x0s[-1]), 40)
    return PlotlyFigure([
        {"x": x0s, "y": table["fixed"], "mode": "markers", "name": "fixed step, measured",
         "marker": {"color": PALETTE[5], "size": 9}},
        {"x": xs.tolist(), "y": (gd_const * xs**2).tolist(), "mode": "lines", "name": "law C·x₀²",
         "line": {"color": PALETTE[5], "dash": "dot"}},
        {"x": x0s, "y": table["clipped"], "mode": "markers", "name": "clipped, measured",
         "marker": {"color": PALETTE[0], "size": 9, "symbol": "square"}},
        {"x": xs.tolist(), "y": (xs / 0.1 + clip_offset).tolist(), "mode": "lines", "name": "law x₀/(ηc) + C",
         "line": {"color": PALETTE[0], "dash": "dot"}},
    ], {"height": 420, "xaxis": {"type": "log", "title": {"text": "start x₀"}},
        "yaxis": {"type": "log", "title": {"text": "steps to f < 1e-4"}},
        "legend": {"orientation": "h", "x": 0, "y": -0.28, "yanchor": "top"},  # below "start x₀" when 4 rows stack at 390 px
        "margin": {"l": 60, "r": 20, "t": 20, "b": 120}}, name="quartic-steps",
        caption="Steps of gradient descent on f(x) = x⁴ to reach f < 1e-4, against the start x₀ (log–log). "
                "Markers are measured; the dotted lines are the laws C·x₀² (fixed step) and x₀/(ηc) + C (clipped). "
                "Hover for values; drag to zoom.",
        label="fig-quartic-steps")


def quartic_explorer() -> Explorer:
    """Loss curves on x^4, fixed step against clipped, for a chosen start."""
    def frame(x0):
        lr = 0.9 / (2 * x0**2)
        plain = quartic_descent(x0, lr, steps=quartic_steps(x0, lr))
        clipped = quartic_descent(x0, 0.1, max_norm=1.0, steps=quartic_steps(x0, 0.1, max_norm=1.0))

        def curve(run):  # log-spaced samples keep the page small
            idx = np.unique(np.round(np.logspace(0, np.log10(len(run.losses)), 120)).astype(int) - 1)
            return {"x": (idx + 1).tolist(), "y": _sig([run.losses[i] for i in idx])}
        return {"traces": [curve(plain), curve(clipped)],
                "note": f"Fixed step η = {lr:.2g}: {len(plain.losses) - 1} steps; clipped (η = 0.1, c = 1): "
                        f"{len(clipped.losses) - 1} steps."}

    return Explorer(
        "quartic-x0",
        [Param("x0", [1.0, 2.0, 4.0, 8.0, 16.0], label="start x₀", default=8.0, fmt="g")],
        compute=frame,
        traces=[{"mode": "lines", "name": "fixed step η = 0.9/(2x₀²)", "line": {"color": PALETTE[5]}},
                {"mode": "lines", "name": "clipped, η = 0.1, c = 1", "line": {"color": PALETTE[0], "width": 3}}],
        layout={"height": 420, "xaxis": {"type": "log", "title": {"text": "step (log scale)"}},
                "yaxis": {"type": "log", "title": {"text": "loss f(x) = x⁴"}, "range": [-4.5, 5]}},
        caption="Gradient descent on x⁴ until the loss is below 1e-4: fixed step size 0.9/(2x₀²), just below the "
                "largest stable one, against clipped descent with η = 0.1 and c = 1.",
        label="fig-quartic-curves",
    )


SMOOTH_LRS = (0.5, 1.0, 2.0)
SMOOTH_THRESHOLDS = (None, 1.0)


@lru_cache(maxsize=None)
def smooth_run(lr: float, max_norm: float | None):
    """250 full-batch steps of the 64-32-32-10 tanh network on 512 digits (:func:`smoothness_along_training`)."""
    return smoothness_along_training(steps=250, lr=lr, max_norm=max_norm, samples=512)


def smooth_stats(lr: float, max_norm: float | None) -> dict:
    """Spearman correlation (whole run and second half), the envelope (L0, L1) and the final loss of one run."""
    t = smooth_run(lr, max_norm)
    g, s = np.array(t.grad_norms), np.array(t.smoothness)
    half = len(g) // 2
    l0, l1 = smoothness_envelope(t.grad_norms, t.smoothness)
    return {"rho": float(spearmanr(g, s).statistic), "rho_late": float(spearmanr(g[half:], s[half:]).statistic),
            "l0": l0, "l1": l1, "final": t.losses[-1], "start": t.losses[0]}


def smoothness_explorer() -> Explorer:
    """Local smoothness against gradient norm, coloured by step, under the (L0, L1) envelope."""
    def frame(lr, max_norm):
        t, st = smooth_run(lr, max_norm), smooth_stats(lr, max_norm)
        grid = np.logspace(np.log10(min(t.grad_norms)), np.log10(max(t.grad_norms)), 30)
        return {"traces": [
                    {"x": _sig(t.grad_norms), "y": _sig(t.smoothness)},
                    {"x": _sig(grid), "y": _sig(st["l0"] + st["l1"] * grid)}],
                "note": f"Spearman correlation {st['rho']:.2f} over the run ({st['rho_late']:.2f} over its second "
                        f"half); envelope L0 = {st['l0']:.3g}, L1 = {st['l1']:.3g}; training loss "
                        f"{st['start']:.3g} → {st['final']:.3g}."}

    return Explorer(
        "smoothness-explorer",
        [Param("lr", list(SMOOTH_LRS), label="learning rate η", default=1.0),
         Param("max_norm", list(SMOOTH_THRESHOLDS), label="threshold c", default=None)],
        compute=frame,
        traces=[{"mode": "markers", "name": "one step (colour: step number)",
                 "marker": {"size": 6, "colorscale": "Viridis", "showscale": True, "color": list(range(250)),
                            "colorbar": {"title": {"text": "step"}, "thickness": 10}}},
                {"mode": "lines", "name": "bound L0 + L1‖∇f‖ (envelope)", "line": {"color": PALETTE[5]}}],
        layout={"height": 440, "xaxis": {"type": "log", "title": {"text": "gradient norm ‖∇f(x_t)‖"}},
                "yaxis": {"type": "log", "title": {"text": "local smoothness L̂_t"}},
                "legend": {"orientation": "h", "x": 0, "y": -0.2, "yanchor": "top"},
                "margin": {"l": 60, "r": 20, "t": 20, "b": 110}},
        caption="Gradient norm against local smoothness at each of 250 full-batch steps of a 64–32–32–10 tanh "
                "network on 512 digits from scikit-learn, coloured by step. The line is the smallest bound "
                "L0 + L1‖∇f‖ above every point, with L0 the smallest measured L̂: an envelope, not a fit.",
        label="fig-smoothness",
    )


# --- 2.4 the clipping rule -------------------------------------------------------------------

ARROW_ANGLES = (0, 10, 20, 30, 45, 60, 70, 80, 90)


def clip_arrows(angle: float, length: float, threshold: float) -> dict:
    """The gradient at ``angle`` degrees and ``length``, norm- and value-clipped at ``threshold``, with turns.

    Example:
        >>> from gradclip_book.principle_figures import clip_arrows
        >>> round(clip_arrows(45, 2.0, 1.0)["value_turn"], 6)
        0.0
    """
    g = length * np.array([math.cos(math.radians(angle)), math.sin(math.radians(angle))])
    by_norm, by_value = clip_vector(g, threshold, "norm"), clip_vector(g, threshold, "value")
    return {"g": g, "norm": by_norm, "value": by_value,
            "norm_turn": angle_degrees(g, by_norm), "value_turn": angle_degrees(g, by_value)}


def arrows_explorer() -> Explorer:
    """A 2-D gradient and its norm- and value-clipped versions."""
    def arrow(vec):
        return {"x": [0.0, round(float(vec[0]), 4)], "y": [0.0, round(float(vec[1]), 4)]}

    def frame(angle, length, threshold):
        a, c = clip_arrows(angle, length, threshold), threshold
        t = np.linspace(0, 2 * math.pi, 73)
        return {"traces": [
                    {"x": (c * np.cos(t)).round(4).tolist(), "y": (c * np.sin(t)).round(4).tolist()},
                    {"x": [-c, c, c, -c, -c], "y": [-c, -c, c, c, -c]},
                    arrow(a["g"]), arrow(a["norm"]), arrow(a["value"])],
                "note": f"Norm clipping: length {np.linalg.norm(a['norm']):.2f}, turned {a['norm_turn']:.1f}°. "
                        f"Value clipping: length {np.linalg.norm(a['value']):.2f}, turned {a['value_turn']:.1f}°."}

    def style(color, width):
        return {"mode": "lines+markers", "line": {"color": color, "width": width},
                "marker": {"symbol": "arrow", "angleref": "previous", "size": [0, 16], "color": color}}

    return Explorer(
        "clip-arrows",
        [Param("angle", list(ARROW_ANGLES), label="direction (°)", default=20, fmt="d"),
         Param("length", [0.5, 1.0, 2.0, 3.0, 5.0], label="length ‖g‖", default=3.0, fmt="g"),
         Param("threshold", [0.5, 1.0, 2.0], label="threshold", default=1.0, fmt="g")],
        compute=frame,
        traces=[{"mode": "lines", "name": "norm ball ‖g‖ ≤ c", "line": {"color": PALETTE[0], "dash": "dot", "width": 1}},
                {"mode": "lines", "name": "value box |g_j| ≤ v", "line": {"color": PALETTE[1], "dash": "dot", "width": 1}},
                {**style("#555555", 2), "name": "original g"},
                {**style(PALETTE[0], 4), "name": "norm-clipped"},
                {**style(PALETTE[1], 3), "name": "value-clipped"}],
        layout={"height": 460, "xaxis": {"range": [-1, 5.2], "title": {"text": "g₁"}, "zeroline": True},
                "yaxis": {"range": [-1, 5.2], "title": {"text": "g₂"}, "scaleanchor": "x", "zeroline": True}},
        caption="A two-dimensional gradient g and its norm-clipped and value-clipped versions, with the same "
                "threshold for the norm (c) and for each entry (v). The note gives the angle each one turned.",
        label="fig-arrows", share_traces=True,
    )


# --- 2.7 the families ------------------------------------------------------------------------

FAMILY_NAMES = {"none": "no clipping", "norm": "norm clipping", "value": "value clipping", "agc": "AGC (λ = 0.2)",
                "autoclip": "AutoClip (p = 10)", "zclip": "ZClip (defaults)", "soft-norm": "soft norm clipping",
                "soft-value": "soft value clipping", "sign": "signSGD", "qsgd": "QSGD (4 levels)"}
FAMILY_WARMUP = 30


@lru_cache(maxsize=None)
def family_traces() -> tuple:
    """The recorded stream, the settings (threshold from the first :data:`FAMILY_WARMUP` steps) and every method's trace."""
    stream = record_gradient_stream(steps=120, spike_at=90, spike_scale=30.0)
    settings = default_settings(stream, warmup=FAMILY_WARMUP)
    settings["agc"] = {"clip_factor": 0.2}
    traces = {m: apply_method(m, stream, **settings.get(m, {})) for m in FAMILY_NAMES}
    return stream, settings, traces


def family_summary(method: str) -> dict:
    """For one method: spike-to-typical output norm, mean turn, the steps it changed and their scale factors.

    Example:
        >>> from gradclip_book.principle_figures import family_summary
        >>> family_summary("none")["changed"]
        []
    """
    stream, _, traces = family_traces()
    tr = traces[method]
    post, pre = np.array(tr.norm_after), np.array(tr.norm_before)
    typical = float(np.median(np.delete(post, stream.spike_at)))
    changed = np.nonzero(np.abs(post - pre) > 1e-9 * pre)[0]
    return {"spike_ratio": float(post[stream.spike_at] / typical), "typical": typical,
            "spike_after": float(post[stream.spike_at]), "mean_angle": float(np.mean(tr.angle)),
            "changed": changed.tolist(), "scale": {int(i): float(post[i] / pre[i]) for i in changed}}


def families_explorer() -> Explorer:
    """The recorded gradient stream passed through each method: norms before and after, and the angle turned."""
    stream, _, traces = family_traces()

    def frame(method):
        tr, s = traces[method], family_summary(method)
        steps = list(range(len(tr.norm_before)))  # x is the step: plotly's default 0, 1, 2, ...
        return {"traces": [{"y": _sig(tr.norm_before)}, {"y": _sig(tr.norm_after)},
                           {"y": _sig(tr.angle, decimals=2)}],
                "note": f"{FAMILY_NAMES[method]}: at the spike the norm goes from "
                        f"{tr.norm_before[stream.spike_at]:.3g} to {s['spike_after']:.3g} ({s['spike_ratio']:.1f} "
                        f"times its typical output {s['typical']:.3g}); {len(s['changed'])} of {len(steps)} steps "
                        f"changed; mean turn {s['mean_angle']:.1f}°."}

    return Explorer(
        "families-explorer",
        [Param("method", list(FAMILY_NAMES), label="method", default="norm", fmt=lambda m: FAMILY_NAMES[m])],
        compute=frame,
        traces=[{"mode": "lines", "name": "norm before", "line": {"color": "#999999"}, "xaxis": "x", "yaxis": "y"},
                {"mode": "lines+markers", "name": "norm after", "line": {"color": PALETTE[0]}, "marker": {"size": 4},
                 "xaxis": "x", "yaxis": "y"},
                {"mode": "lines+markers", "name": "angle turned (°)", "line": {"color": PALETTE[5]},
                 "marker": {"size": 4}, "xaxis": "x2", "yaxis": "y2"}],
        layout={"height": 520, "grid": {"rows": 2, "columns": 1, "pattern": "independent"},
                # ticks at 1, 2 and 5 of each decade: plotly's default labels every digit of the 1.5-2.5
                # decades shown, which pile up ("10 9 8 7 6 5") in the short top panel on a phone
                "yaxis": {"type": "log", "title": {"text": "gradient norm"}, "domain": [0.45, 1], "dtick": "D2"},
                "xaxis": {"anchor": "y", "matches": "x2", "showticklabels": False},
                "yaxis2": {"title": {"text": "angle (°)"}, "range": [0, 90], "domain": [0, 0.35]},
                "xaxis2": {"anchor": "y2", "title": {"text": "step"}},
                "legend": {"orientation": "h", "x": 0, "y": 1.02, "yanchor": "bottom"}},
        caption="The same 120 recorded gradients (a corrupted batch at step 90) passed through each method. Top: "
                "the global norm before and after (log scale). Bottom: the angle between the method's output and "
                "the original gradient.",
        label="fig-families", share_traces=True,
    )


def families_table_html() -> str:
    """An HTML table: per method, spike / typical output norm, mean angle turned, steps changed."""
    rows = ""
    for m, name in FAMILY_NAMES.items():
        s = family_summary(m)
        rows += (f"<tr><td>{name}</td><td>{s['spike_ratio']:.1f}×</td><td>{s['mean_angle']:.1f}°</td>"
                 f"<td>{len(s['changed'])}</td></tr>")
    return ("<table><thead><tr><th>method</th><th>spike / typical norm after</th><th>mean angle turned</th>"
            "<th>steps changed (of 120)</th></tr></thead><tbody>" + rows + "</tbody></table>")
