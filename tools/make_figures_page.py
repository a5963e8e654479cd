import sys; sys.path.insert(0, "/work/main/tools")
from nbtool import md, code, write

cells = [
md("""
# How to read the figures

Every figure in this book is interactive, and it stays interactive in the
static web page you are reading: there is no Python kernel behind it. This
page shows how that works on a small experiment that the chapter *Principle*
returns to: gradient descent on $f(x) = x^4$, with and without clipping.

The function $f(x) = x^4$ has gradient $f'(x) = 4x^3$ and curvature
$f''(x) = 12x^2$. Far from the minimum the curvature is large, so a learning
rate that is safe near $x = 1$ overshoots near $x = 8$, and each overshoot
lands further out: the iterates explode. Norm clipping caps each step at
$\\eta c$, so the same learning rate walks down safely.
"""),
code("""
import math
import numpy as np
import gradclip
from gradclip.toys import quartic_descent
from gradclip.viz import Explorer, Param, PlotlyFigure
from myst_nb import glue
"""),
md("""
## One run, drawn once

A plain figure first: three runs from $x_0 = 4$ with learning rate $0.1$.
Without clipping the run diverges; clipping at $c = 1$ or $c = 10$ keeps it
finite. The y-axis is logarithmic.
"""),
code("""
start, rate = 4.0, 0.1
runs = {c: quartic_descent(start, rate, max_norm=c, steps=60) for c in (None, 10.0, 1.0)}
traces = [
    {"x": list(range(len(run.losses))), "y": run.losses, "mode": "lines+markers",
     "name": "no clipping" if c is None else f"clipped at c = {c:g}"}
    for c, run in runs.items()
]
PlotlyFigure(traces, {"xaxis": {"title": {"text": "step"}},
                      "yaxis": {"title": {"text": "loss f(x)"}, "type": "log"}}, name="quartic-three-runs")
"""),
code("""
glue("unclipped_diverged_at", runs[None].diverged_at, display=False)
glue("clipped_final_loss", f"{runs[1.0].final_loss:.2g}", display=False)
""", tags=["remove-cell"]),
code("""
# The sentence below states these facts; if a measurement changes, the build fails.
assert runs[None].diverged_at is not None and runs[None].diverged_at <= 3
assert runs[1.0].diverged_at is None and runs[1.0].final_loss < 1e-2 < runs[1.0].losses[0]
""", tags=["remove-cell"]),
md("""
Without clipping the loss passes $10^{12}$ at step {glue:text}`unclipped_diverged_at`
and the run is stopped and drawn as diverged; clipped at $c = 1$, it ends
at a loss of {glue:text}`clipped_final_loss`.

## Three sliders, every combination precomputed

The figure below has one slider per parameter: the starting point $x_0$, the
learning rate $\\eta$ and the clipping threshold $c$ (or no clipping). All
combinations were run with `gradclip` when this page was built, and the
page looks each one up as you move a slider. Sliders also work from the
keyboard: focus one with Tab and press the arrow keys.
"""),
code("""
params = [
    Param("x0", [0.5, 1.0, 2.0, 4.0, 8.0], label="start x₀", default=4.0),
    Param("lr", [0.001, 0.003, 0.01, 0.03, 0.1], label="learning rate η", default=0.1),
    Param("max_norm", [None, 0.1, 1.0, 10.0, 100.0], label="threshold c", default=1.0),
]

def experiment(x0, lr, max_norm):
    clipped = quartic_descent(x0, lr, max_norm=max_norm, steps=100)
    plain = quartic_descent(x0, lr, max_norm=None, steps=100)
    def curve(run):
        return {"x": list(range(len(run.losses))), "y": run.losses}
    def status(run, name):
        return f"{name} diverged at step {run.diverged_at}." if run.diverged_at is not None else \\
               f"{name} ends at loss {run.final_loss:.3g}."
    def blowup(*runs):  # where a run stopped, drawn at the top edge of the plot
        stops = [run.diverged_at for run in runs if run.diverged_at is not None]
        return {"x": stops, "y": [1e12] * len(stops)}
    return {"traces": [curve(plain), curve(clipped), blowup(plain, clipped)],
            "note": status(plain, "Without clipping, the run") + " " + status(clipped, "With this threshold, it")}

explorer = Explorer(
    "quartic-explorer", params, compute=experiment,
    traces=[{"mode": "lines", "name": "no clipping", "line": {"dash": "dot"}},
            {"mode": "lines", "name": "with the threshold c", "line": {"width": 3}},
            {"mode": "markers", "name": "diverged", "marker": {"symbol": "x", "size": 12, "color": "#D55E00"}}],
    layout={"xaxis": {"title": {"text": "step"}, "range": [0, 100]},
            "yaxis": {"title": {"text": "loss f(x)"}, "type": "log", "range": [-12, 13]}},
    caption="Gradient descent on f(x) = x⁴ for 100 steps; a run whose loss passes 1e12 stops and is reported as diverged.",
)
explorer
"""),
code("""
grid = explorer.combinations()
diverged_plain = sum(quartic_descent(c["x0"], c["lr"]).diverged_at is not None for c in grid if c["max_norm"] is None)
rescued = sum(
    1 for c in grid if c["max_norm"] == 1.0
    and quartic_descent(c["x0"], c["lr"]).diverged_at is not None
    and quartic_descent(c["x0"], c["lr"], max_norm=1.0).diverged_at is None
)
glue("grid_size", len(grid), display=False)
glue("diverged_plain", diverged_plain, display=False)
glue("rescued", rescued, display=False)
assert len(grid) == 125
assert 0 < rescued == diverged_plain, "clipping at 1 should rescue every diverging setting of this grid"
""", tags=["remove-cell"]),
md("""
The grid has {glue:text}`grid_size` combinations. Of the 25 settings of
$(x_0, \\eta)$, {glue:text}`diverged_plain` diverge without clipping, and
clipping at $c = 1$ turns all {glue:text}`rescued` of them into runs that stay
finite. Clipping does not make them fast, though: move $c$ to $0.1$ and
watch the clipped curve crawl. The chapter *Principle* explains why clipped
descent still wins on this function as $x_0$ grows.

## Live sliders in a notebook

When this page runs in Jupyter, Binder or Colab, the cell below shows
ipywidgets sliders that re-run the experiment for any value, not only those
on the grid. In the static book there is no kernel to run them, so it shows a
note with launch links instead.
"""),
code("""
explorer.live(notebook="chapters/figures.ipynb")
""", tags=["nbval-ignore-output"]),
md("""
## How it works

`gradclip.viz.Explorer` takes the parameter grid and the experiment
function, runs every combination, and writes one plotly figure, one HTML
range input per parameter, and the results into the page. A few lines of
JavaScript look up the combination on every slider move and redraw with
`Plotly.react`. The figure's caption lists the slider ranges from the same
parameter description, so the text and the figure cannot disagree. Colours
come from the Okabe–Ito palette, which stays distinguishable under the
common forms of colour blindness.

Grids that take too long to compute at every build are saved with
`Explorer.save` by a documented command and loaded with `Explorer.load`; a test
re-runs a sample of their points and checks that they match the file.
"""),
]
write("/work/main/chapters/figures.ipynb", cells)
