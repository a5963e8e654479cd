r"""Recurrent networks: gradients through time, and the cliff of a one-unit RNN.

Both experiments follow Pascanu, Mikolov and Bengio (2013), "On the
difficulty of training recurrent neural networks",
`arXiv:1211.5063 <https://arxiv.org/abs/1211.5063>`_.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..clip import clip_grad_norm_

# The bound gamma on |phi'| of each activation (Pascanu et al. 2013, section 2.1).
GAMMA = {"linear": 1.0, "tanh": 1.0, "sigmoid": 0.25}

_PHI = {
    "linear": lambda z: z,
    "tanh": np.tanh,
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
}
_DPHI = {
    "linear": lambda z: np.ones_like(z),
    "tanh": lambda z: 1.0 - np.tanh(z) ** 2,
    "sigmoid": lambda z: (s := 1.0 / (1.0 + np.exp(-z))) * (1.0 - s),
}


def recurrent_matrix(width: int, radius: float, seed: int = 0) -> np.ndarray:
    r"""A random Gaussian matrix rescaled to spectral radius ``radius``.

    The entries are drawn from :math:`N(0, 1/n)`; the matrix is then divided by its
    spectral radius (largest :math:`|\lambda|`) and multiplied by ``radius``.

    Args:
        width: n, >= 1.
        radius: :math:`\rho`, the spectral radius wanted, >= 0.
        seed: seeds the draw.

    Returns:
        An ``(n, n)`` float64 array with spectral radius ``radius``.

    Example:
        >>> import numpy as np
        >>> from gradclip.experiments.rnn import recurrent_matrix
        >>> w = recurrent_matrix(16, 0.9)
        >>> round(float(max(abs(np.linalg.eigvals(w)))), 6)
        0.9
    """
    if width < 1 or radius < 0:
        raise ValueError(f"need width >= 1 and radius >= 0, got {width}, {radius}")
    raw = np.random.default_rng(seed).standard_normal((width, width)) / math.sqrt(width)
    return raw * (radius / max(abs(np.linalg.eigvals(raw))))


@dataclass(frozen=True)
class ThroughTime:
    r"""Gradient norms back through time of one recurrent network.

    Attributes:
        norms: :math:`\|\partial J/\partial h_{T-k}\|` for :math:`k = 0, \dots, T` steps back.
        radius: the spectral radius :math:`\rho` of :math:`W_\text{rec}`.
        largest_singular_value: :math:`\lambda_1`, the largest singular value of :math:`W_\text{rec}`.
        gamma: :math:`\gamma`, the bound on :math:`|\phi'|`.
    """

    norms: list[float]
    radius: float
    largest_singular_value: float
    gamma: float


def gradient_through_time(radius: float, steps: int, activation: str = "tanh", width: int = 32,
                          input_scale: float = 1.0, seed: int = 0) -> ThroughTime:
    r"""Backpropagate a probe loss through T steps of :math:`h_t = \phi(W h_{t-1} + x_t)`.

    The loss is :math:`J = u^\top h_T` with a random unit vector u, and

    .. math::

        \frac{\partial J}{\partial h_{t-1}} = W^\top \operatorname{diag}\big(\phi'(W h_{t-1} + x_t)\big)
        \frac{\partial J}{\partial h_t},

    a product of T Jacobians. Each factor has norm at most :math:`\gamma\lambda_1`,
    so :math:`\gamma\lambda_1 < 1` is *sufficient* for the gradient to vanish,
    and :math:`\gamma\lambda_1 > 1` is *necessary* for it to explode
    (Pascanu et al. 2013, `arXiv:1211.5063 <https://arxiv.org/abs/1211.5063>`_),
    with :math:`\gamma = 1` for tanh and 1/4 for the sigmoid. For a linear
    network the norm grows or shrinks like :math:`\rho^k`.

    Args:
        radius: the spectral radius of W (:func:`recurrent_matrix`).
        steps: T, >= 1.
        activation: ``linear``, ``tanh`` or ``sigmoid``.
        width: n, the hidden size.
        input_scale: the standard deviation of the inputs :math:`x_t \sim N(0, s^2 I)`.
        seed: seeds W, the inputs and the probe.

    Returns:
        The norms for k = 0..T steps back, and :math:`\rho`, :math:`\lambda_1`, :math:`\gamma`.

    Example:
        >>> from gradclip.experiments import gradient_through_time
        >>> r = gradient_through_time(radius=0.5, steps=20, activation="linear")
        >>> r.norms[20] < 1e-4 < r.norms[0]
        True
    """
    if activation not in GAMMA:
        raise ValueError(f"activation must be one of {tuple(GAMMA)}, got {activation!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    w = recurrent_matrix(width, radius, seed)
    rng = np.random.default_rng(seed + 10_000)
    inputs = input_scale * rng.standard_normal((steps, width))
    probe = rng.standard_normal(width)
    probe /= np.linalg.norm(probe)
    h = np.zeros(width)
    pre = []
    for t in range(steps):
        z = w @ h + inputs[t]
        pre.append(z)
        h = _PHI[activation](z)
    delta = probe
    norms = [float(np.linalg.norm(delta))]
    for z in reversed(pre):
        delta = w.T @ (_DPHI[activation](z) * delta)
        norms.append(float(np.linalg.norm(delta)))
    return ThroughTime(norms, float(radius), float(np.linalg.norm(w, 2)), GAMMA[activation])


# --- the one-unit RNN and its cliff -----------------------------------------------------------

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
        >>> from gradclip.experiments.rnn import cliff_loss
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
        >>> from gradclip.experiments.rnn import cliff_gradient
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
        >>> from gradclip.experiments import cliff_descent
        >>> run = cliff_descent(5.0, -2.55, lr=0.002, max_norm=1.0, iters=5)
        >>> run.farthest() <= 5 * 0.002 * 1.0 + 1e-12
        True
    """
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    params = torch.tensor([float(w0), float(b0)], dtype=torch.float64, requires_grad=True)
    ws, bs, losses, norms = [], [], [], []
    for step in range(iters + 1):
        params.grad = None
        loss = _cliff_objective(params, x0, steps, target)
        loss.backward()
        value, norm = float(loss.detach()), float(params.grad.norm())
        if not (math.isfinite(value) and math.isfinite(norm)):
            break
        ws.append(float(params[0].detach())), bs.append(float(params[1].detach())), losses.append(value), norms.append(norm)
        if step == iters:
            break
        if max_norm is not None:
            clip_grad_norm_([params], max_norm)
        with torch.no_grad():
            params -= lr * params.grad
    return CliffRun(ws, bs, losses, norms)
