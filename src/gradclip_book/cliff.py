"""Pascanu, Mikolov and Bengio's one-unit RNN: its loss surface, its cliff, and descent across it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from gradclip import clip_grad_norm_

# The constants of the experiment in the chapter: start state, sequence length, target.
CLIFF = {"x0": 0.5, "steps": 50, "target": 0.7}


def cliff_loss(w: np.ndarray | float, b: np.ndarray | float, x0: float = 0.5, steps: int = 50,
               target: float = 0.7) -> np.ndarray:
    r"""The loss of Pascanu et al.'s one-unit RNN, on a grid or at a point.

    .. math::

        x_t = w\,\sigma(x_{t-1}) + b, \qquad E(w, b) = (x_T - x^\ast)^2,

    with :math:`\sigma` the logistic sigmoid. For w above 4 the map has two
    stable fixed points; where one of them disappears (a saddle-node
    bifurcation, near :math:`w = 5, b \approx -2.61` for these constants) the
    final state jumps, and E has a wall.

    Args:
        w: the recurrent weight(s), any shape broadcastable with ``b``.
        b: the bias(es).
        x0: :math:`x_0`.
        steps: T.
        target: :math:`x^\ast`.

    Returns:
        E, with the broadcast shape of ``w`` and ``b``.

    Example:
        >>> from gradclip_book.cliff import cliff_loss
        >>> round(float(cliff_loss(5.0, -2.62)), 2), round(float(cliff_loss(5.0, -2.61)), 2)
        (7.56, 0.49)
    """
    w, b = np.asarray(w, dtype=float), np.asarray(b, dtype=float)
    x = np.full(np.broadcast(w, b).shape, float(x0))
    for _ in range(steps):
        x = w / (1.0 + np.exp(-x)) + b
    return (x - target) ** 2


def cliff_gradient(w: float, b: float, x0: float = 0.5, steps: int = 50, target: float = 0.7) -> tuple[float, float, float]:
    r"""E(w, b) and its gradient :math:`(\partial E/\partial w, \partial E/\partial b)`, by backpropagation through time.

    Args:
        w: the recurrent weight.
        b: the bias.
        x0: :math:`x_0`.
        steps: T.
        target: :math:`x^\ast`.

    Returns:
        ``(E, dE/dw, dE/db)`` as floats.

    Example:
        >>> from gradclip_book.cliff import cliff_gradient
        >>> loss, dw, db = cliff_gradient(5.0, -2.55)
        >>> db > 0
        True
    """
    params = torch.tensor([float(w), float(b)], dtype=torch.float64, requires_grad=True)
    loss = _cliff_objective(params, x0, steps, target)
    loss.backward()
    return float(loss.detach()), float(params.grad[0]), float(params.grad[1])


def _cliff_objective(params: torch.Tensor, x0: float, steps: int, target: float) -> torch.Tensor:
    x = torch.tensor(float(x0), dtype=torch.float64)
    for _ in range(steps):
        x = params[0] * torch.sigmoid(x) + params[1]
    return (x - target) ** 2


@dataclass(frozen=True)
class CliffRun:
    """A gradient-descent path on the one-unit RNN's loss.

    Attributes:
        w: the weight after each update (index 0 is the start).
        b: the bias after each update.
        losses: E at each point.
        grad_norms: the gradient norm at each point before clipping (the last point's too).
    """

    w: list[float]
    b: list[float]
    losses: list[float]
    grad_norms: list[float]

    def farthest(self) -> float:
        """The largest distance from the start reached in the (w, b) plane."""
        return max(math.hypot(w - self.w[0], b - self.b[0]) for w, b in zip(self.w, self.b))


def cliff_descent(w0: float, b0: float, lr: float, max_norm: float | None = None, iters: int = 40,
                  x0: float = 0.5, steps: int = 50, target: float = 0.7) -> CliffRun:
    r"""Gradient descent on the one-unit RNN, optionally with norm clipping by :func:`gradclip.clip_grad_norm_`.

    .. math::

        \theta \leftarrow \theta - \eta\, \min\Big(1, \frac{c}{\|\nabla E\|}\Big) \nabla E,
        \qquad \theta = (w, b)

    Near the wall :math:`\|\nabla E\|` is orders of magnitude above its typical
    size, so one plain step throws the parameters far away; a clipped step
    moves at most :math:`\eta c` (Pascanu et al. 2013, `arXiv:1211.5063
    <https://arxiv.org/abs/1211.5063>`_, their figure of the cliff).

    Args:
        w0: the starting weight.
        b0: the starting bias.
        lr: :math:`\eta`, > 0.
        max_norm: c, or None for no clipping.
        iters: the number of updates.
        x0: :math:`x_0` of the RNN.
        steps: T.
        target: :math:`x^\ast`.

    Returns:
        The path, its losses and gradient norms; a non-finite step ends the path.

    Example:
        >>> from gradclip_book import cliff_descent
        >>> run = cliff_descent(5.0, -2.55, lr=0.002, max_norm=1.0, iters=5)
        >>> run.farthest() <= 5 * 0.002 * 1.0 + 1e-12
        True
    """
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    params = torch.tensor([float(w0), float(b0)], dtype=torch.float64)
    ws, bs, losses, norms = [], [], [], []
    for step in range(iters + 1):
        w, b = params.tolist()
        value, dw, db = _cliff_value_and_gradient(w, b, x0, steps, target)
        params.grad = torch.tensor([dw, db], dtype=torch.float64)
        norm = float(params.grad.norm())
        if not (math.isfinite(value) and math.isfinite(norm)):
            break
        ws.append(w), bs.append(b), losses.append(value), norms.append(norm)
        if step == iters:
            break
        if max_norm is not None:
            clip_grad_norm_([params], max_norm)
        params -= lr * params.grad
    return CliffRun(ws, bs, losses, norms)


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)  # never overflows for x < 0
    return z / (1.0 + z)


def _cliff_value_and_gradient(w: float, b: float, x0: float, steps: int, target: float) -> tuple[float, float, float]:
    """E and its gradient in float64, carrying dx/dw and dx/db forward through the T steps.

    The same numbers as backpropagation through :func:`_cliff_objective` (to rounding; a test checks it)
    at a few hundred times the speed: a descent takes hundreds of these for a figure's every frame.
    """
    x, dx_dw, dx_db = float(x0), 0.0, 0.0
    for _ in range(steps):
        s = _sigmoid(x)
        slope = w * s * (1.0 - s)  # d x_t / d x_{t-1}
        dx_dw, dx_db = s + slope * dx_dw, 1.0 + slope * dx_db
        x = w * s + b
    error = x - target
    return error * error, 2.0 * error * dx_dw, 2.0 * error * dx_db


def bistable_window(w: float) -> tuple[float, float]:
    r"""The biases b for which :math:`x \mapsto w\,\sigma(x) + b` has two stable fixed points.

    A fixed point is born or dies where the map touches the diagonal,
    :math:`w\,\sigma'(x) = 1`, i.e. :math:`\sigma(x) = (1 \pm \sqrt{1 - 4/w})/2`;
    the bias there is :math:`b = x - w\,\sigma(x)`. Between the two values
    (a saddle-node bifurcation at each end) the map has two stable fixed
    points; outside, one. Only :math:`w > 4` has a window at all.

    Args:
        w: the recurrent weight, > 4.

    Returns:
        ``(b_low, b_high)``, the open window of biases.

    Example:
        >>> from gradclip_book.cliff import bistable_window
        >>> [round(v, 3) for v in bistable_window(5.0)]
        [-2.656, -2.344]
    """
    if not w > 4:
        raise ValueError(f"two stable fixed points need w > 4, got {w}")
    root = math.sqrt(1.0 - 4.0 / w)
    ends = []
    for s in ((1 + root) / 2, (1 - root) / 2):
        x = math.log(s / (1 - s))
        ends.append(x - w * s)
    return min(ends), max(ends)
