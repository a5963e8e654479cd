"""Gradient quantization: signSGD's sign and QSGD's unbiased stochastic rounding."""

from __future__ import annotations

import math

import torch

from . import _groups, _validate, distributed
from ._norms import accumulation_dtype, tensor_norms

__all__ = ["qsgd_quantize", "qsgd_quantize_grad_", "sign_grad_"]


@torch.no_grad()
def sign_grad_(parameters: _validate.TensorOrTensors, foreach: bool | None = None) -> None:
    r"""Replace every gradient entry by its sign, in place (signSGD).

    .. math::

        g_j \leftarrow \operatorname{sign}(g_j) \in \{-1, 0, 1\}

    Bernstein, Wang, Azizzadenesheli and Anandkumar (2018), "signSGD:
    Compressed Optimisation for Non-Convex Problems",
    `arXiv:1802.04434 <https://arxiv.org/abs/1802.04434>`__. It is the limit of
    value clipping, :math:`\lim_{v\to 0} \mathrm{clamp}(g, -v, v)/v`; one bit
    per entry. Scale the learning rate accordingly.

    Non-finite values: NaN stays NaN (``torch.sign`` alone would turn it into
    0, a silently wrong finite value); :math:`\pm\infty` becomes :math:`\pm 1`,
    its exact sign.

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` is replaced.
        foreach: as in :func:`gradclip.clip_grad_norm_`.

    Raises:
        TypeError: ``parameters`` is not a tensor or an iterable of tensors, or a gradient is sparse or complex.
        RuntimeError: ``foreach=True`` on a device without foreach kernels.

    References:
        * Bernstein, Wang, Azizzadenesheli and Anandkumar (2018), "signSGD", `arXiv:1802.04434 <https://arxiv.org/abs/1802.04434>`__.

    Example:
        >>> import torch, gradclip
        >>> w = torch.zeros(4, requires_grad=True); w.grad = torch.tensor([-2.0, 0.0, 0.1, float("nan")])
        >>> gradclip.sign_grad_([w])
        >>> w.grad
        tensor([-1.,  0.,  1., nan])
    """
    _validate.check_foreach(foreach)
    grads = _validate.grads_of(parameters, entrywise="sign_grad_")
    groups = _groups.groups_of(grads, foreach)
    distributed.check_not_partial(groups, "sign_grad_")
    for group in groups:
        tensors, batched = _groups.targets(group, foreach)
        nan_masks = [t.isnan() for t in tensors]
        _groups.apply_(tensors, batched, "sign")
        for t, mask in zip(tensors, nan_masks):
            t.masked_fill_(mask, float("nan"))


def qsgd_quantize(v: torch.Tensor, levels: int, generator: torch.Generator | None = None) -> torch.Tensor:
    r"""QSGD's stochastic quantization of one tensor, out of place (see :func:`qsgd_quantize_grad_`).

    Args:
        v: the tensor to quantize.
        levels: s, the number of levels, an int >= 1.
        generator: the random generator (on ``v``'s device); the global one if ``None``.

    Returns:
        A new tensor of ``v``'s shape and dtype.

    Raises:
        TypeError: ``v`` is not a tensor or is complex, or ``levels`` is not an int.
        ValueError: ``levels`` < 1.

    References:
        * Alistarh, Grubic, Li, Tomioka and Vojnovic (2017), "QSGD", `arXiv:1610.02132 <https://arxiv.org/abs/1610.02132>`__.

    Example:
        >>> import torch
        >>> from gradclip.quantize import qsgd_quantize
        >>> qsgd_quantize(torch.tensor([0.0, 3.0, -4.0]), levels=5)  # exact levels: no randomness
        tensor([ 0.,  3., -4.])
    """
    _validate.check_int("levels", levels, 1)
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"v must be a torch.Tensor, got {type(v).__name__}")
    _validate.check_real_one(v, "v", "qsgd_quantize")
    out = v.detach().clone()
    _quantize_(out, tensor_norms([out], 2.0, out.device, False)[0], levels, generator)
    return out


def _quantize_(v: torch.Tensor, norm: torch.Tensor, s: int, generator: torch.Generator | None,
               largest: torch.Tensor | None = None) -> torch.Tensor:
    """In place: v <- scale sign(v) xi / s, xi = floor(r) + Bernoulli(r - floor(r)), r = s |v| / scale.

    ``norm`` is ||v||_2 in the wide dtype. The scale is that norm, unless it
    exceeds the largest value of v's dtype (then no level above the first could
    be stored): the scale is then max |v|, which keeps the estimator unbiased
    and every level representable. Returns the scale used (a 0-dim tensor).
    """
    acc = accumulation_dtype(v.dtype)
    too_large = norm > torch.finfo(v.dtype).max
    if largest is None:  # max |v| of the whole tensor (given for a DTensor's local piece)
        largest = v.abs().amax().to(norm.dtype) if v.numel() else norm
    scale = torch.where(too_large, largest.to(norm.dtype), norm)
    # A zero scale means an all-zero tensor, which stays zero; NaN and inf scales stay non-finite.
    safe_scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    ratio = v.abs().to(acc).mul_((s / safe_scale).to(acc))
    level = ratio.floor()
    uniform = torch.rand(v.shape, generator=generator, dtype=acc, device=v.device)
    level.add_(uniform.lt_(ratio.sub_(level)).to(acc))  # round up with probability r - floor(r)
    v.copy_(level.mul_(v.sign()).mul_((scale / s).to(acc)))
    return scale


@torch.no_grad()
def qsgd_quantize_grad_(
    parameters: _validate.TensorOrTensors,
    levels: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""Quantize every gradient tensor to ``levels`` levels, unbiasedly, in place (QSGD); return the norms.

    For each tensor v (quantized on its own, with its own norm), with
    :math:`r_i = s|v_i|/\|v\|_2` and :math:`\ell_i = \lfloor r_i \rfloor`:

    .. math::

        Q_s(v)_i = \|v\|_2 \,\operatorname{sign}(v_i)\, \xi_i, \qquad
        \xi_i = \begin{cases}
        (\ell_i + 1)/s & \text{with probability } r_i - \ell_i \\
        \ell_i / s & \text{otherwise}
        \end{cases}

    Alistarh, Grubic, Li, Tomioka and Vojnovic (2017), "QSGD:
    Communication-Efficient SGD via Gradient Quantization and Encoding",
    `arXiv:1610.02132 <https://arxiv.org/abs/1610.02132>`__. It is unbiased,
    :math:`\mathbb{E}[Q_s(v)] = v`, with variance
    :math:`\mathbb{E}\|Q_s(v) - v\|^2 \le \min(d/s^2, \sqrt{d}/s)\,\|v\|^2`
    for a tensor of d entries (Lemma 3.1). Each entry becomes one of the
    :math:`2s+1` values :math:`\|v\| k/s`, :math:`k = -s..s`. Draws come from
    ``generator``, one uniform number per entry, tensor after tensor in order,
    so a seeded generator reproduces the result.

    The rounding is computed in float32 at least; the result is written back
    in the gradient's dtype (so float16/bfloat16 levels are rounded).

    Non-finite values: a NaN or inf anywhere in a tensor makes its norm
    non-finite and the whole tensor NaN: a quantized value cannot be finite
    without a finite scale.

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` is quantized.
        levels: s, the number of quantization levels, an int >= 1 (s = 1 sends
            sign and norm only).
        generator: the random generator, on the gradients' device; the global
            one if ``None``.

    Returns:
        A 1-D tensor of each gradient's scale (float32 at least): its L2 norm, or,
        when that norm exceeds the largest value of the gradient's dtype (float16
        ``[60000, 30000]``), its largest magnitude, which keeps every level
        representable and the estimate unbiased.

    Raises:
        TypeError: ``parameters`` is not a tensor or an iterable of tensors, or a gradient is sparse or complex, ``levels`` is not an int, or ``generator`` is not a ``torch.Generator``.
        ValueError: ``levels`` < 1.

    References:
        * Alistarh, Grubic, Li, Tomioka and Vojnovic (2017), "QSGD", `arXiv:1610.02132 <https://arxiv.org/abs/1610.02132>`__.

    Example:
        >>> import torch, gradclip
        >>> w = torch.zeros(3, requires_grad=True); w.grad = torch.tensor([0.6, -0.8, 0.0])
        >>> gen = torch.Generator().manual_seed(0)
        >>> gradclip.qsgd_quantize_grad_([w], levels=1, generator=gen)
        tensor([1.])
        >>> set(w.grad.abs().tolist()) <= {0.0, 1.0}  # each entry is 0 or +-||v||
        True
    """
    _validate.check_int("levels", levels, 1)
    _validate.check_generator(generator)
    grads = _validate.grads_of(parameters, entrywise="qsgd_quantize_grad_")
    norms = []
    dtensor = _validate.dtensor_types(grads)
    for grad in grads:
        if dtensor is not None and isinstance(grad, dtensor):
            scale = _quantize_dtensor_(grad, levels, generator)
        else:
            scale = _quantize_(grad, tensor_norms([grad], 2.0, grad.device, False)[0], levels, generator)
        norms.append(scale.to(grads[0].device, accumulation_dtype(grad.dtype)))
    if not norms:
        return torch.zeros(0)
    return torch.stack(norms)


def _quantize_dtensor_(grad: torch.Tensor, levels: int, generator: torch.Generator | None) -> torch.Tensor:
    """QSGD of one DTensor: its local piece, quantized with the norm of the whole tensor.

    The norm (and the max, for the overflow case) are reduced over the mesh, so
    every piece uses the scale the full tensor would. Replicated pieces stay
    identical across ranks when every rank seeds ``generator`` alike.
    """
    (group,) = _groups.groups_of([grad], False)
    distributed.check_not_partial([group], "qsgd_quantize_grad_")
    norm = distributed.sharded_tensor_norms(group, 2.0, False)[0]
    largest = distributed.sharded_tensor_norms(group, math.inf, False)[0]
    return _quantize_(grad.to_local(), norm, levels, generator, largest)
