r"""Recurrent networks: how a gradient grows or fades through time.

The experiment follows Pascanu, Mikolov and Bengio (2013), "On the
difficulty of training recurrent neural networks",
`arXiv:1211.5063 <https://arxiv.org/abs/1211.5063>`_.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


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
        >>> from gradclip_book.rnn import recurrent_matrix
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
        mean_slope: the mean of :math:`\phi'(z)` over every unit and step of the forward pass;
            :math:`\rho` times it is the mean-field estimate of the per-step factor.
    """

    norms: list[float]
    radius: float
    largest_singular_value: float
    gamma: float
    mean_slope: float = 1.0

    @property
    def mean_field_factor(self) -> float:
        r"""The mean-field per-step factor :math:`\rho\,\overline{\phi'(z)}`.

        A random :math:`W` with spectral radius :math:`\rho` stretches a random
        vector by about :math:`\rho`; the diagonal of slopes then scales it by
        about their root mean square. This uses their mean, which predicts the
        measured factor of a tanh network far better than the bound
        :math:`\gamma\lambda_1`.
        """
        return self.radius * self.mean_slope



def _setup(width: int, radius: float, steps: int, input_scale: float, seed: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The recurrent matrix, the input sequence (steps, width) and a unit probe, all seeded by ``seed``."""
    w = recurrent_matrix(width, radius, seed)
    rng = np.random.default_rng(seed + 10_000)
    inputs = input_scale * rng.standard_normal((steps, width))
    probe = rng.standard_normal(width)
    return w, inputs, probe / np.linalg.norm(probe)

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
        >>> from gradclip_book import gradient_through_time
        >>> r = gradient_through_time(radius=0.5, steps=20, activation="linear")
        >>> r.norms[20] < 1e-4 < r.norms[0]
        True
    """
    if activation not in GAMMA:
        raise ValueError(f"activation must be one of {tuple(GAMMA)}, got {activation!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    w, inputs, probe = _setup(width, radius, steps, input_scale, seed)
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
    slope = float(np.mean([_DPHI[activation](z) for z in pre]))
    return ThroughTime(norms, float(radius), float(np.linalg.norm(w, 2)), GAMMA[activation], slope)


def gated_gradient_through_time(radius: float, steps: int, gate_bias: float = -3.0, width: int = 32,
                                input_scale: float = 1.0, seed: int = 0) -> ThroughTime:
    r"""The same probe gradient through T steps of a GRU-style cell whose update gate keeps its state.

    The cell is :math:`h_t = (1 - z_t) \odot h_{t-1} + z_t \odot \tanh(W h_{t-1} + x_t)` with the
    update gate :math:`z_t = \sigma(b + V x_t)`; a negative bias b makes :math:`z_t` small, so the
    cell mostly keeps its state. W, the inputs and the probe are those of
    :func:`gradient_through_time` with the same ``radius``, ``width``, ``input_scale`` and ``seed``,
    so the two functions compare the vanilla tanh network with its gated version. The step Jacobian

    .. math::

        \frac{\partial h_t}{\partial h_{t-1}} = \operatorname{diag}(1 - z_t)
        + \operatorname{diag}\big(z_t \odot \tanh'(W h_{t-1} + x_t)\big)\,W

    has an identity path scaled by :math:`1 - z_t` (the GRU's form of the LSTM's forget
    gate), which the vanilla cell lacks. V is drawn from :math:`N(0, 1/n)` and has no recurrent part,
    so the gate depends on the input only.

    Args:
        radius: the spectral radius of W.
        steps: T, >= 1.
        gate_bias: b; :math:`\sigma(-3) \approx 0.047`.
        width: n.
        input_scale: the standard deviation of the inputs.
        seed: seeds W, the inputs and the probe (as :func:`gradient_through_time`) and V.

    Returns:
        The norms for k = 0..T steps back (``mean_slope`` is the mean gate value :math:`\bar z`).

    Example:
        >>> from gradclip_book.rnn import gated_gradient_through_time, gradient_through_time
        >>> gated = gated_gradient_through_time(0.9, 100)
        >>> plain = gradient_through_time(0.9, 100, "tanh")
        >>> gated.norms[-1] > 1e6 * plain.norms[-1]
        True
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    w, inputs, probe = _setup(width, radius, steps, input_scale, seed)
    v = np.random.default_rng(seed + 20_000).standard_normal((width, width)) / math.sqrt(width)
    h = np.zeros(width)
    gates, pre = [], []
    for t in range(steps):
        z = 1.0 / (1.0 + np.exp(-(gate_bias + v @ inputs[t])))
        a = w @ h + inputs[t]
        gates.append(z)
        pre.append(a)
        h = (1.0 - z) * h + z * np.tanh(a)
    delta = probe
    norms = [float(np.linalg.norm(delta))]
    for z, a in zip(reversed(gates), reversed(pre)):
        delta = (1.0 - z) * delta + w.T @ (z * (1.0 - np.tanh(a) ** 2) * delta)
        norms.append(float(np.linalg.norm(delta)))
    return ThroughTime(norms, float(radius), float(np.linalg.norm(w, 2)), 1.0, float(np.mean(gates)))
