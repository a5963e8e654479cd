r"""Gradients through a deep network: which norm grows by the gain per layer, and which does not.

A network of depth L computes :math:`h_l = \phi(W_l h_{l-1})`, :math:`l = 1..L`.
By the chain rule the gradient of a loss J with respect to an early activation
is a product of Jacobians,

.. math::

    \frac{\partial J}{\partial h_{l-1}}
    = W_l^\top \operatorname{diag}\big(\phi'(W_l h_{l-1})\big)\, \frac{\partial J}{\partial h_l}
    = \Big(\prod_{k=l}^{L} D_k W_k\Big)^{\!\top} \frac{\partial J}{\partial h_L},

so its norm changes by a roughly constant factor per layer: the gain g when
the initialisation is matched to the activation (Glorot and Bengio 2010; He et
al. 2015, `arXiv:1502.01852 <https://arxiv.org/abs/1502.01852>`_).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

ACTIVATIONS = ("linear", "tanh", "relu")
INITS = ("naive", "xavier", "he", "orthogonal")
LOSSES = ("probe", "mse")


def _check(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def init_weights(depth: int, width: int, gain: float, init: str, rng: np.random.Generator) -> torch.Tensor:
    r"""Square weight matrices :math:`W_1, \dots, W_L`, stacked as a ``(depth, width, width)`` float64 tensor.

    With n = ``width`` and g = ``gain``, the entries are Gaussian with standard deviation

    * ``naive``: :math:`g` (``torch.randn`` times the gain, no fan-in scaling);
    * ``xavier``: :math:`g\sqrt{2/(n_\text{in}+n_\text{out})} = g/\sqrt n`
      (Glorot and Bengio 2010, `PMLR <https://proceedings.mlr.press/v9/glorot10a.html>`_);
    * ``he``: :math:`g\sqrt{2/n}` (He et al. 2015, `arXiv:1502.01852 <https://arxiv.org/abs/1502.01852>`_);

    and ``orthogonal`` gives g times a random orthogonal matrix (Saxe, McClelland
    and Ganguli 2014, `arXiv:1312.6120 <https://arxiv.org/abs/1312.6120>`_).

    Args:
        depth: L, the number of layers, >= 1.
        width: n, the width of every layer, >= 1.
        gain: g, > 0.
        init: one of ``naive``, ``xavier``, ``he``, ``orthogonal``.
        rng: the numpy random generator to draw from.

    Returns:
        A ``(depth, width, width)`` float64 tensor.

    Example:
        >>> import numpy as np, torch
        >>> from gradclip_book.depth import init_weights
        >>> w = init_weights(2, 4, 1.0, "orthogonal", np.random.default_rng(0))
        >>> torch.allclose(w[0] @ w[0].T, torch.eye(4, dtype=torch.float64))
        True
    """
    _check("init", init, INITS)
    if depth < 1 or width < 1 or not gain > 0:
        raise ValueError(f"need depth >= 1, width >= 1 and gain > 0, got {depth}, {width}, {gain}")
    raw = rng.standard_normal((depth, width, width))
    if init == "orthogonal":
        q, r = np.linalg.qr(raw)
        signs = np.sign(np.diagonal(r, axis1=-2, axis2=-1))  # makes Q Haar-distributed
        return torch.from_numpy(gain * q * signs[:, None, :])
    std = {"naive": 1.0, "xavier": 1.0 / math.sqrt(width), "he": math.sqrt(2.0 / width)}[init]
    return torch.from_numpy(gain * std * raw)


def predicted_layer_factor(gain: float, activation: str, init: str, width: int) -> float:
    r"""The factor by which :math:`\|\partial J/\partial h_l\|` changes per layer, from the variance argument.

    For a random vector :math:`\delta`, :math:`\mathbb E\|W^\top D\delta\|^2 = n\sigma^2\,
    \mathbb E[\phi'^2]\,\|\delta\|^2`, with :math:`\sigma` the weight standard deviation, so
    the factor is :math:`q = g\, s_\text{init}\, s_\phi` with :math:`s_\text{init} = \sqrt n,
    1, \sqrt 2, 1` (naive, Xavier, He, orthogonal) and :math:`s_\phi = 1` (linear),
    :math:`1/\sqrt 2` (ReLU: half the units pass). For tanh, :math:`\phi' \le 1`, so the
    linear value is an upper bound, reached only while the units stay unsaturated.

    Args:
        gain: g, > 0.
        activation: ``linear``, ``tanh`` or ``relu``.
        init: ``naive``, ``xavier``, ``he`` or ``orthogonal``.
        width: n.

    Returns:
        q, the predicted per-layer factor (an upper bound for tanh).

    Example:
        >>> from gradclip_book.depth import predicted_layer_factor
        >>> predicted_layer_factor(1.1, "relu", "he", 64)
        1.1
    """
    _check("activation", activation, ACTIVATIONS)
    scale = {"naive": math.sqrt(width), "xavier": 1.0, "he": math.sqrt(2.0), "orthogonal": 1.0}[_check("init", init, INITS)]
    act = 1.0 / math.sqrt(2.0) if activation == "relu" else 1.0
    return round(gain * scale * act, 12)


@dataclass(frozen=True)
class PredictedNorms:
    """The variance-argument prediction of :class:`DepthGradients`, in log10.

    Attributes:
        log_activation_grads: predicted :math:`\\log_{10}\\|\\partial J/\\partial h_l\\|`, l = 0..L.
        log_weight_grads: predicted :math:`\\log_{10}\\|\\partial J/\\partial W_l\\|`, l = 1..L.
        log_total_norm: predicted :math:`\\log_{10}` of the total gradient norm.
    """

    log_activation_grads: list[float]
    log_weight_grads: list[float]
    log_total_norm: float


def predicted_norms(depth: int, width: int = 64, gain: float = 1.0, activation: str = "linear",
                    init: str = "xavier", loss: str = "probe") -> PredictedNorms:
    r"""The law for every norm :func:`deep_gradients` measures, from the per-layer factor q.

    With :math:`q` from :func:`predicted_layer_factor`, :math:`\|x\| \approx \sqrt n`,
    activations grow forward as :math:`\|h_l\| \approx q^l \sqrt n` and gradients
    backward as :math:`\|\partial J/\partial h_l\| \approx q^{L-l}\,\|\partial J/\partial h_L\|`,
    where :math:`\|\partial J/\partial h_L\| = 1` for the probe loss and :math:`\|h_L\|`
    for the squared error. A weight gradient is an outer product,
    :math:`\partial J/\partial W_l = (D_l\,\partial J/\partial h_l)\, h_{l-1}^\top`, so

    .. math::

        \Big\|\frac{\partial J}{\partial W_l}\Big\| \approx s\, q^{L-l}\, q^{l-1} \sqrt n
        \,\Big\|\frac{\partial J}{\partial h_L}\Big\| = s\, q^{L-1} \sqrt n\,
        \Big\|\frac{\partial J}{\partial h_L}\Big\|,

    the same for every layer (s = :math:`1/\sqrt2` for ReLU, else 1), and the
    total norm is :math:`\sqrt L` times that: with the probe it grows like
    :math:`q^{L-1}`, with the squared error like :math:`q^{2L-1}`. For tanh these
    are the linear network's values, upper bounds.

    Args:
        depth: L.
        width: n.
        gain: g.
        activation: ``linear``, ``tanh`` or ``relu``.
        init: ``naive``, ``xavier``, ``he`` or ``orthogonal``.
        loss: ``probe`` or ``mse``.

    Returns:
        The predicted log10 norms.

    Example:
        >>> from gradclip_book.depth import predicted_norms
        >>> p = predicted_norms(10, width=100, gain=1.1, loss="probe")
        >>> round(p.log_activation_grads[0] - p.log_activation_grads[-1], 4)  # 10 * log10(1.1)
        0.4139
    """
    _check("loss", loss, LOSSES)
    log_q = math.log10(predicted_layer_factor(gain, activation, init, width))
    log_x = 0.5 * math.log10(width)
    log_out = log_x + depth * log_q if loss == "mse" else 0.0
    log_s = -0.5 * math.log10(2.0) if activation == "relu" else 0.0
    acts = [log_out + (depth - layer) * log_q for layer in range(depth + 1)]
    per_layer = log_s + log_out + (depth - 1) * log_q + log_x
    return PredictedNorms(acts, [per_layer] * depth, per_layer + 0.5 * math.log10(depth))


@dataclass(frozen=True)
class DepthGradients:
    """The gradient norms of one deep network at initialisation.

    Attributes:
        activation_grad_norms: :math:`\\|\\partial J/\\partial h_l\\|` for :math:`l = 0, \\dots, L`.
        weight_grad_norms: :math:`\\|\\partial J/\\partial W_l\\|_F` for :math:`l = 1, \\dots, L`.
        total_norm: the norm of all weight gradients together.
        output_norm: :math:`\\|h_L\\|`.
    """

    activation_grad_norms: list[float]
    weight_grad_norms: list[float]
    total_norm: float
    output_norm: float


def deep_gradients(depth: int, width: int = 64, gain: float = 1.0, activation: str = "linear",
                   init: str = "xavier", loss: str = "probe", seed: int = 0) -> DepthGradients:
    r"""Backpropagate once through a random deep network and record every gradient norm.

    The network is :math:`h_l = \phi(W_l h_{l-1})` with an input :math:`h_0 = x \sim N(0, I_n)`
    and weights from :func:`init_weights`. Two losses:

    * ``probe``: :math:`J = u^\top h_L` with a random unit vector u, so that
      :math:`\partial J/\partial h_L = u` does not depend on the gain;
    * ``mse``: :math:`J = \tfrac12\|h_L\|^2` (a zero target), whose output error
      :math:`h_L` itself scales like :math:`q^L`: the loss couples in.

    Args:
        depth: L, >= 1.
        width: n, >= 1.
        gain: g, > 0.
        activation: ``linear``, ``tanh`` or ``relu``.
        init: ``naive``, ``xavier``, ``he`` or ``orthogonal``.
        loss: ``probe`` or ``mse``.
        seed: seeds the weights, the input and the probe.

    Returns:
        The per-layer activation- and weight-gradient norms and the total norm.

    Example:
        >>> from gradclip_book import deep_gradients
        >>> r = deep_gradients(depth=3, width=8, gain=2.0, init="orthogonal")
        >>> round(r.activation_grad_norms[0] / r.activation_grad_norms[-1], 6)  # exactly g**L
        8.0
    """
    _check("activation", activation, ACTIVATIONS)
    _check("loss", loss, LOSSES)
    rng = np.random.default_rng(int(seed))
    weights = [w.requires_grad_(True) for w in init_weights(depth, width, gain, init, rng).unbind(0)]
    x = torch.from_numpy(rng.standard_normal(width))
    probe = torch.from_numpy(rng.standard_normal(width))
    probe = probe / probe.norm()
    phi = {"linear": lambda z: z, "tanh": torch.tanh, "relu": torch.relu}[activation]
    hs = [x.clone().requires_grad_(True)]
    for layer in range(depth):
        h = phi(weights[layer] @ hs[-1])
        h.retain_grad()
        hs.append(h)
    out = hs[-1]
    objective = probe @ out if loss == "probe" else 0.5 * (out @ out)
    objective.backward()
    act = [float(h.grad.norm()) for h in hs]
    per_layer = torch.stack([w.grad.norm() for w in weights])
    return DepthGradients(act, per_layer.tolist(), float(per_layer.norm()), float(out.detach().norm()))


def fit_layer_ratio(activation_grad_norms: list[float]) -> float:
    r"""The per-layer ratio r fitted to :math:`\log_{10}\|\partial J/\partial h_l\| \approx a + (L-l)\log_{10} r`.

    A least-squares line through the log-norms against the layer index; r > 1
    means the gradient grows as it travels back towards the input.

    Args:
        activation_grad_norms: :math:`\|\partial J/\partial h_l\|` for l = 0..L (at least two).

    Returns:
        r, the fitted factor per layer.

    Example:
        >>> from gradclip_book.depth import fit_layer_ratio
        >>> round(fit_layer_ratio([8.0, 4.0, 2.0, 1.0]), 6)
        2.0
    """
    count = len(activation_grad_norms)
    if count < 2:
        raise ValueError("need at least two layers to fit a ratio")
    ys = [math.log10(max(v, 1e-300)) for v in activation_grad_norms]  # an underflowed 0 stays finite
    xs = list(range(count))
    mx, my = sum(xs) / count, sum(ys) / count
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return 10.0 ** (-slope)


@dataclass(frozen=True)
class DepthProfile:
    """Seed-averaged gradient norms (geometric means, stored as log10).

    Attributes:
        log_activation_grads: mean over seeds of :math:`\\log_{10}\\|\\partial J/\\partial h_l\\|`, l = 0..L.
        log_weight_grads: mean over seeds of :math:`\\log_{10}\\|\\partial J/\\partial W_l\\|`, l = 1..L.
        log_total_norm: mean over seeds of :math:`\\log_{10}` of the total gradient norm.
        layer_ratios: :func:`fit_layer_ratio` of each seed.
    """

    log_activation_grads: list[float]
    log_weight_grads: list[float]
    log_total_norm: float
    layer_ratios: list[float]


def depth_profile(depth: int, width: int = 64, gain: float = 1.0, activation: str = "linear",
                  init: str = "xavier", loss: str = "probe", seeds: int = 4) -> DepthProfile:
    r"""Average :func:`deep_gradients` over seeds 0..``seeds``-1, in log10 (a geometric mean).

    Args:
        depth: L.
        width: n.
        gain: g.
        activation: ``linear``, ``tanh`` or ``relu``.
        init: ``naive``, ``xavier``, ``he`` or ``orthogonal``.
        loss: ``probe`` or ``mse``.
        seeds: how many networks to average, >= 1.

    Returns:
        The averaged profile, with each seed's fitted per-layer ratio.

    Example:
        >>> from gradclip_book.depth import depth_profile
        >>> p = depth_profile(4, width=8, gain=1.0, init="orthogonal", seeds=2)
        >>> [round(r, 6) for r in p.layer_ratios]
        [1.0, 1.0]
    """
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    runs = [deep_gradients(depth, width, gain, activation, init, loss, seed) for seed in range(seeds)]

    def mean_log(rows: list[list[float]]) -> list[float]:
        return [sum(math.log10(max(v, 1e-300)) for v in col) / len(col) for col in zip(*rows)]

    return DepthProfile(
        mean_log([r.activation_grad_norms for r in runs]),
        mean_log([r.weight_grad_norms for r in runs]),
        mean_log([[r.total_norm] for r in runs])[0],
        [fit_layer_ratio(r.activation_grad_norms) for r in runs],
    )
