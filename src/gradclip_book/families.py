r"""The clipping rule and its families, applied side by side to the same gradients.

Norm clipping rescales the whole gradient and keeps its direction; value
clipping clamps each entry and turns it. The families the book compares:
norm and value clipping (Pascanu, Mikolov and Bengio 2013,
`arXiv:1211.5063 <https://arxiv.org/abs/1211.5063>`_), adaptive clipping (AGC,
Brock et al. 2021, `arXiv:2102.06171 <https://arxiv.org/abs/2102.06171>`_;
AutoClip, Seetharaman et al. 2020, `arXiv:2007.14469 <https://arxiv.org/abs/2007.14469>`_;
ZClip, Kumar et al. 2025, `arXiv:2504.02507 <https://arxiv.org/abs/2504.02507>`_),
soft clipping, and quantisation (signSGD, Bernstein et al. 2018,
`arXiv:1802.04434 <https://arxiv.org/abs/1802.04434>`_; QSGD, Alistarh et al. 2017,
`arXiv:1610.02132 <https://arxiv.org/abs/1610.02132>`_).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from gradclip import clip_grad_norm_, clip_grad_value_

from .data import digits

METHODS = ("none", "norm", "value", "agc", "autoclip", "zclip", "soft-norm", "soft-value", "sign", "qsgd")


def angle_degrees(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    r"""The angle between two vectors in degrees, :math:`\arccos\big(a\cdot b / (\|a\|\|b\|)\big)`.

    Computed as :math:`2\operatorname{atan2}(\|\hat a - \hat b\|, \|\hat a + \hat b\|)` with
    unit vectors :math:`\hat a, \hat b`, which stays accurate for nearly parallel vectors.

    Args:
        a: a vector (any shape; flattened).
        b: a vector of the same size.

    Returns:
        The angle in [0, 180]; 0 when either vector is zero.

    Example:
        >>> from gradclip_book import angle_degrees
        >>> angle_degrees([1.0, 0.0], [1.0, 1.0])
        45.0
    """
    a = np.asarray(a, dtype=float).ravel()
    b = np.asarray(b, dtype=float).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 0.0
    ua, ub = a / na, b / nb  # 2 atan2(|ua - ub|, |ua + ub|) is accurate near 0 and 180, unlike acos
    return round(math.degrees(2.0 * math.atan2(np.linalg.norm(ua - ub), np.linalg.norm(ua + ub))), 10)


def clip_vector(g: list[float] | np.ndarray, threshold: float, rule: str) -> np.ndarray:
    r"""Clip one vector by ``rule``, with :func:`gradclip.clip_grad_norm_` or :func:`gradclip.clip_grad_value_`.

    .. math::

        \text{norm: } g \cdot \min\Big(1, \frac{c}{\|g\|}\Big), \qquad
        \text{value: } \big(\max(-c, \min(c, g_j))\big)_j

    Args:
        g: the gradient.
        threshold: c.
        rule: ``norm`` or ``value``.

    Returns:
        The clipped vector, a new array.

    Example:
        >>> from gradclip_book.families import clip_vector
        >>> clip_vector([3.0, 0.5], 1.0, "value").tolist()
        [1.0, 0.5]
    """
    param = torch.zeros(len(g), dtype=torch.float64, requires_grad=True)
    param.grad = torch.tensor(np.asarray(g, dtype=float))
    if rule == "norm":
        clip_grad_norm_([param], threshold)
    elif rule == "value":
        clip_grad_value_([param], threshold)
    else:
        raise ValueError(f"rule must be 'norm' or 'value', got {rule!r}")
    return param.grad.numpy().copy()


@dataclass
class GradientStream:
    """Gradients recorded along a training run, to feed every method the same input.

    Attributes:
        model: the network (its weights are set to ``weights[t]`` before a method sees step t).
        grads: per step, one gradient tensor per parameter.
        weights: per step, the parameters at which the gradient was taken.
        spike_at: the step whose batch was corrupted.
    """

    model: torch.nn.Module
    grads: list[list[torch.Tensor]]
    weights: list[list[torch.Tensor]]
    spike_at: int

    @property
    def norms(self) -> list[float]:
        """The global norm of each step's gradient."""
        return [float(torch.cat([g.flatten() for g in step]).norm()) for step in self.grads]


def record_gradient_stream(steps: int = 120, spike_at: int = 90, spike_scale: float = 30.0,
                           batch: int = 32, lr: float = 0.1, seed: int = 0) -> GradientStream:
    r"""Record the gradients of SGD on a small MLP (scikit-learn digits), with one corrupted batch.

    A 64-32-10 ReLU network is trained with plain SGD on mini-batches. At step
    ``spike_at`` the batch's inputs are multiplied by ``spike_scale``, a stand-in
    for a bad batch; that gradient is recorded but not applied, so the rest of
    the run is ordinary. Every clipping method is later applied to this one
    stream, so differences come from the methods alone.

    Args:
        steps: the number of steps recorded.
        spike_at: the step with the corrupted batch (0 <= spike_at < steps).
        spike_scale: how much its inputs are scaled.
        batch: the mini-batch size.
        lr: the SGD learning rate.
        seed: seeds the initialisation and the batches.

    Returns:
        The stream.

    Example:
        >>> from gradclip_book.families import record_gradient_stream
        >>> s = record_gradient_stream(steps=6, spike_at=4)
        >>> max(range(6), key=lambda t: s.norms[t])
        4
    """
    if not 0 <= spike_at < steps:
        raise ValueError(f"need 0 <= spike_at < steps, got {spike_at}, {steps}")
    inputs, labels = digits()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)).double()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    grads, weights = [], []
    for step in range(steps):
        index = order[(step * batch) % len(order):][:batch]
        x = inputs[index] * (spike_scale if step == spike_at else 1.0)
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), labels[index]).backward()
        weights.append([p.detach().clone() for p in model.parameters()])
        grads.append([p.grad.detach().clone() for p in model.parameters()])
        if step != spike_at:
            with torch.no_grad():
                for p in model.parameters():
                    p -= lr * p.grad
    return GradientStream(model, grads, weights, spike_at)


@dataclass(frozen=True)
class MethodTrace:
    """What one method made of each gradient in a stream.

    Attributes:
        norm_before: the global norm of each original gradient.
        norm_after: the global norm of what the method returned.
        angle: the angle in degrees between the returned and the original gradient.
    """

    norm_before: list[float]
    norm_after: list[float]
    angle: list[float]


def default_settings(stream: GradientStream, warmup: int | None = None) -> dict[str, dict]:
    r"""The hyperparameters :func:`apply_method` uses for each method on ``stream``.

    The norm threshold c is the 90th percentile of the stream's norms (the
    Tuning Playbook's starting point), over the first ``warmup`` steps only
    when given (:func:`gradclip.suggest_threshold` on the past, as a user
    could compute it before the steps it is applied to); the value threshold is :math:`c/\sqrt d`
    for d parameters, so a value-clipped gradient is never longer than c; the
    soft variants use the same c and :math:`\alpha = \sqrt d / c`; AGC uses
    :math:`\lambda = 0.05`; AutoClip its paper's 10th percentile; ZClip the
    authors' defaults without the fixed cap; QSGD 4 levels.

    Args:
        stream: the recorded gradients.
        warmup: how many leading steps the norm threshold is computed from; all when None.

    Returns:
        A dict from method name to keyword arguments.

    Example:
        >>> from gradclip_book.families import record_gradient_stream, default_settings
        >>> sorted(default_settings(record_gradient_stream(steps=4, spike_at=3)))[:3]
        ['agc', 'autoclip', 'norm']
    """
    from gradclip import suggest_threshold
    past = stream.norms if warmup is None else stream.norms[:warmup]
    if not past:
        raise ValueError(f"warmup must be >= 1, got {warmup}")
    c = float(suggest_threshold(past, 0.9))
    d = sum(g.numel() for g in stream.grads[0])
    v = c / math.sqrt(d)
    return {
        "norm": {"max_norm": c}, "value": {"clip_value": v}, "agc": {"clip_factor": 0.05},
        "autoclip": {"percentile": 10.0}, "zclip": {"max_grad_norm": None},
        "soft-norm": {"max_norm": c}, "soft-value": {"alpha": 1.0 / v}, "sign": {}, "qsgd": {"levels": 4},
    }


def apply_method(method: str, stream: GradientStream, **settings: float | None) -> MethodTrace:
    r"""Apply one clipping method, from the library, to every gradient of ``stream`` in order.

    ``none`` returns the gradients unchanged; ``norm`` and ``value`` are
    :func:`gradclip.clip_grad_norm_` and :func:`gradclip.clip_grad_value_`;
    ``agc`` is ``gradclip.agc.adaptive_clip_grad_`` at the recorded weights;
    ``autoclip`` and ``zclip`` are the stateful ``gradclip.autoclip.AutoClip``
    and ``gradclip.zclip.ZClip``, fed the stream in order; ``soft-norm`` scales
    by :math:`c/(\|g\|+c)` and ``soft-value`` maps each entry to
    :math:`g_j/(1+\alpha|g_j|)` (``gradclip.soft``); ``sign`` and ``qsgd`` are
    ``gradclip.quantize``'s signSGD and QSGD. Unset settings come from
    :func:`default_settings`.

    Args:
        method: one of :data:`METHODS`.
        stream: the recorded gradients.
        **settings: keyword arguments for the method.

    Returns:
        The norms before and after and the angle turned, per step.

    Example:
        >>> from gradclip_book.families import record_gradient_stream, apply_method
        >>> s = record_gradient_stream(steps=6, spike_at=4)
        >>> t = apply_method("norm", s, max_norm=0.1)
        >>> max(t.norm_after) <= 0.1 + 1e-6, max(t.angle) < 1e-5
        (True, True)
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    settings = {**default_settings(stream).get(method, {}), **settings}
    params = list(stream.model.parameters())
    clipper = None
    if method == "autoclip":
        from gradclip import AutoClip
        clipper = AutoClip(**settings)
    elif method == "zclip":
        from gradclip import ZClip
        clipper = ZClip(**settings)
    generator = torch.Generator().manual_seed(0)
    before, after, angles = [], [], []
    for grads, weights in zip(stream.grads, stream.weights):
        with torch.no_grad():
            for p, w, g in zip(params, weights, grads):
                p.copy_(w)
                p.grad = g.clone()
        _apply_one(method, params, stream.model, clipper, generator, settings)
        original = torch.cat([g.flatten() for g in grads])
        result = torch.cat([p.grad.flatten() for p in params])
        before.append(float(original.norm()))
        after.append(float(result.norm()))
        angles.append(angle_degrees(original.numpy(), result.numpy()))
    return MethodTrace(before, after, angles)


def _apply_one(method: str, params: list[torch.Tensor], model: torch.nn.Module, clipper: object,
               generator: torch.Generator, settings: dict) -> None:
    if method == "norm":
        clip_grad_norm_(params, **settings)
    elif method == "value":
        clip_grad_value_(params, **settings)
    elif method == "agc":
        from gradclip import adaptive_clip_grad_
        adaptive_clip_grad_(model, **settings)
    elif method in ("autoclip", "zclip"):
        clipper(params)
    elif method == "soft-norm":
        from gradclip import soft_clip_grad_norm_
        soft_clip_grad_norm_(params, **settings)
    elif method == "soft-value":
        from gradclip import soft_clip_grad_value_
        soft_clip_grad_value_(params, **settings)
    elif method == "sign":
        from gradclip import sign_grad_
        sign_grad_(params)
    elif method == "qsgd":
        from gradclip import qsgd_quantize_grad_
        qsgd_quantize_grad_(params, generator=generator, **settings)
