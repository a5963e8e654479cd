"""Per-sample gradient clipping for differentially private SGD, with ``torch.func``."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from . import _args
from .clip import NORM_EPS
from .norms import accumulation_dtype

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class PerSampleClipResult(NamedTuple):
    """What :func:`per_sample_clipped_grad` computed.

    Attributes:
        grads: parameter name to the averaged, clipped (and noised) gradient.
        norms: each example's gradient norm before clipping, a 1-D tensor of length B.
        scales: each example's clipping factor :math:`\\min(1, C/(\\|g_i\\| + 10^{-6}))`.
    """

    grads: dict[str, torch.Tensor]
    norms: torch.Tensor
    scales: torch.Tensor


def _check_batch(inputs: torch.Tensor, targets: torch.Tensor) -> int:
    for name, value in (("inputs", inputs), ("targets", targets)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.ndim == 0:
            raise ValueError(f"{name} must have a batch dimension (dim 0), got a 0-dim tensor")
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"inputs and targets must have the same batch size (dim 0), got {inputs.shape[0]} and {targets.shape[0]}"
        )
    if inputs.shape[0] == 0:
        raise ValueError("inputs must hold at least one example, got a batch of 0")
    return inputs.shape[0]


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, p in model.named_parameters():
        if isinstance(p, nn.parameter.UninitializedParameter) or p.is_meta:
            raise ValueError(f"parameter {name!r} has no data (meta or uninitialised); run a forward pass first")
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("model has no parameters with requires_grad=True")
    return params


def per_sample_grads(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    r"""Each example's gradient of its own loss, for every trainable parameter, with ``vmap(grad(...))``.

    .. math::

        g_i = \nabla_\theta\, \ell\big(f_\theta(x_i), y_i\big), \qquad i = 1..B

    The per-example gradients that DP-SGD clips (Abadi et al. 2016,
    `arXiv:1607.00133 <https://arxiv.org/abs/1607.00133>`_), vectorised with
    ``torch.func``. The model is called on one example at a time (``x_i.unsqueeze(0)``), so
    ``loss_fn(output, target)`` receives a batch of one and must return a
    scalar. Modules that mix examples (BatchNorm in training mode) have no
    per-example gradient: use GroupNorm or LayerNorm, as DP-SGD requires anyway.
    Random modules (dropout) raise under ``vmap``'s default ``randomness="error"``.

    Args:
        model: the network; its parameters with ``requires_grad`` are differentiated.
        loss_fn: ``loss_fn(output, target) -> scalar``, e.g. ``torch.nn.functional.cross_entropy``.
        inputs: the batch, examples along dim 0.
        targets: the targets, examples along dim 0.
        chunk_size: examples per vectorised chunk (less memory), or ``None`` for all at once.

    Returns:
        Parameter name to a tensor of shape ``(B, *param.shape)``.

    Example:
        >>> import torch, gradclip
        >>> model = torch.nn.Linear(3, 1, bias=False)
        >>> x, y = torch.ones(4, 3), torch.zeros(4, 1)
        >>> grads = gradclip.per_sample_grads(model, torch.nn.functional.mse_loss, x, y)
        >>> grads["weight"].shape
        torch.Size([4, 1, 3])
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    _check_batch(inputs, targets)
    params = _trainable(model)
    frozen = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def loss_of_one(trainable: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        output = functional_call(model, {**frozen, **buffers, **trainable}, (x.unsqueeze(0),))
        return loss_fn(output, y.unsqueeze(0))

    return vmap(grad(loss_of_one), in_dims=(None, 0, 0), chunk_size=chunk_size)(params, inputs, targets)


def _check_dp_args(max_norm: float, noise_multiplier: float, generator: torch.Generator | None) -> float:
    max_norm = _args.check_threshold("max_norm", max_norm)
    if isinstance(max_norm, torch.Tensor):
        raise TypeError("max_norm must be a number, not a tensor")
    if isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, numbers.Real):
        raise TypeError(f"noise_multiplier must be a number >= 0, got {type(noise_multiplier).__name__}")
    if not 0 <= noise_multiplier < math.inf:
        raise ValueError(f"noise_multiplier must be a finite number in [0, inf), got {noise_multiplier!r}")
    if noise_multiplier > 0 and math.isinf(max_norm):
        raise ValueError("max_norm must be finite when noise_multiplier > 0 (the noise std is noise_multiplier * max_norm)")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return float(max_norm)


def per_sample_clipped_grad(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    max_norm: float,
    noise_multiplier: float = 0.0,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> PerSampleClipResult:
    r"""The DP-SGD gradient: clip each example's gradient to C, sum, add noise, average.

    .. math::

        \bar g = \frac{1}{B}\Big(\sum_{i=1}^{B} g_i \min\Big(1, \frac{C}{\|g_i\|_2 + 10^{-6}}\Big)
        + \mathcal N(0, \sigma^2 C^2 I)\Big)

    Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar and Zhang (2016), "Deep
    Learning with Differential Privacy",
    `arXiv:1607.00133 <https://arxiv.org/abs/1607.00133>`_. :math:`\|g_i\|_2`
    is the norm of example i's gradient over all trainable parameters
    together (flat clipping); the 1e-6 guard is Opacus's (and torch's)
    convention. B is the actual batch size. The noise is drawn from
    ``generator``, one ``randn`` of each parameter's shape, in
    ``model.named_parameters()`` order, only when ``noise_multiplier > 0``.

    Per-example gradients come from :func:`per_sample_grads` (``vmap`` over
    ``grad``), one vectorised pass instead of B backward passes. Norms are
    accumulated in float32 at least. No host-device synchronisation.

    Non-finite values: an example whose gradient holds a NaN or inf has a
    non-finite norm and factor, and makes the averaged gradient NaN; it is not
    dropped silently.

    Args:
        model: the network (no BatchNorm in training mode; see :func:`per_sample_grads`).
        loss_fn: ``loss_fn(output, target) -> scalar`` for a batch of one example.
        inputs: the batch, examples along dim 0.
        targets: the targets, examples along dim 0.
        max_norm: C, a number in [0, inf] (finite when there is noise).
        noise_multiplier: :math:`\sigma`, a finite number >= 0.
        generator: the random generator for the noise; the global one if ``None``.
        chunk_size: as in :func:`per_sample_grads`.

    Returns:
        A :class:`PerSampleClipResult`: the averaged gradients by parameter name,
        the per-example norms before clipping, and the per-example factors.

    Example:
        >>> import torch, gradclip
        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> torch.nn.init.ones_(model.weight)
        Parameter containing:
        tensor([[1.]], requires_grad=True)
        >>> x, y = torch.tensor([[1.0], [10.0]]), torch.zeros(2, 1)
        >>> result = gradclip.per_sample_clipped_grad(model, torch.nn.functional.mse_loss, x, y, max_norm=1.0)
        >>> result.norms  # d/dw (w x)^2 = 2 w x^2
        tensor([  2., 200.])
        >>> result.grads["weight"]  # (1 + 1) / 2, to within the 1e-6 guard
        tensor([[1.0000]])
    """
    max_norm = _check_dp_args(max_norm, noise_multiplier, generator)
    batch = _check_batch(inputs, targets)
    samples = per_sample_grads(model, loss_fn, inputs, targets, chunk_size)
    first = next(iter(samples.values()))
    acc = accumulation_dtype(first.dtype)
    partial = [
        torch.linalg.vector_norm(g.reshape(batch, -1), dim=1, dtype=accumulation_dtype(g.dtype)).to(first.device)
        for g in samples.values()
    ]
    norms = torch.linalg.vector_norm(torch.stack(partial, dim=1), dim=1).to(acc)
    scales = torch.clamp(max_norm / (norms + NORM_EPS), max=1.0)
    grads: dict[str, torch.Tensor] = {}
    for name, g in samples.items():
        summed = torch.tensordot(scales.to(device=g.device, dtype=accumulation_dtype(g.dtype)),
                                 g.to(accumulation_dtype(g.dtype)), dims=1)
        if noise_multiplier > 0:
            noise = torch.randn(summed.shape, generator=generator, dtype=summed.dtype, device=summed.device)
            summed.add_(noise, alpha=noise_multiplier * max_norm)
        grads[name] = summed.div_(batch).to(g.dtype)
    return PerSampleClipResult(grads, norms, scales)


def per_sample_clip_grad_(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    max_norm: float,
    noise_multiplier: float = 0.0,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    r"""Compute the DP-SGD gradient and accumulate it into each parameter's ``.grad``; return the per-example norms.

    .. math::

        \theta.\mathrm{grad} \mathrel{+}= \frac{1}{B}\Big(\sum_{i} g_i
        \min\Big(1, \frac{C}{\|g_i\| + 10^{-6}}\Big) + \mathcal N(0, \sigma^2 C^2 I)\Big)

    :func:`per_sample_clipped_grad` (Abadi et al. 2016,
    `arXiv:1607.00133 <https://arxiv.org/abs/1607.00133>`_), then written into
    ``.grad`` as a backward pass would: added to an existing gradient, set
    where there is none. Call it instead of ``loss.backward()``, then step the
    optimizer.

    Args:
        model: the network.
        loss_fn: ``loss_fn(output, target) -> scalar`` for a batch of one example.
        inputs: the batch, examples along dim 0.
        targets: the targets, examples along dim 0.
        max_norm: C, a number in [0, inf] (finite when there is noise).
        noise_multiplier: :math:`\sigma`, a finite number >= 0.
        generator: the random generator for the noise.
        chunk_size: examples per vectorised chunk, or ``None``.

    Returns:
        Each example's gradient norm before clipping, a 1-D tensor of length B.

    Example:
        >>> import torch, gradclip
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> norms = gradclip.per_sample_clip_grad_(model, torch.nn.functional.cross_entropy, x, y, max_norm=0.1)
        >>> norms.shape, bool(model.weight.grad.norm() <= 0.1 + 1e-6)
        (torch.Size([8]), True)
    """
    result = per_sample_clipped_grad(model, loss_fn, inputs, targets, max_norm, noise_multiplier, generator, chunk_size)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in result.grads:
                continue
            if p.grad is None:
                p.grad = result.grads[name]
            else:
                p.grad.add_(result.grads[name])
    return result.norms
