"""Per-tensor clipping: each gradient to its own norm (Keras ``clipnorm``) or RMS (optax)."""

from __future__ import annotations

import functools
import math

import torch

from . import _groups, _validate, distributed
from ._norms import accumulation_dtype, tensor_norms
from ._scaling import clip_coefficient, scale_each_

__all__ = ["clip_grad_block_rms_", "clip_grad_norm_per_tensor_"]


def _norms_by_group(grads: list[torch.Tensor], p: float,
                    foreach: bool | None) -> list[tuple[_groups.Group, torch.Tensor]]:
    """Group the gradients (no flat buffers) and take each tensor's p-norm, group by group."""
    return [(group, distributed.sharded_tensor_norms(group, p, foreach) if group.sharding is not None
             else tensor_norms(group.tensors, p, group.device, foreach))
            for group in _groups.groups_of(grads, False)]


def _in_original_order(grads: list[torch.Tensor], results: list[tuple[_groups.Group, torch.Tensor]]) -> torch.Tensor:
    if not grads:
        return torch.zeros(0)
    # reported in the accumulation dtype (float32 at least); the factors used the wide norms
    dtype = functools.reduce(torch.promote_types, [accumulation_dtype(group.dtype) for group, _ in results])
    if len(results) == 1:
        return results[0][1].to(dtype)
    position = {id(g): i for i, g in enumerate(grads)}
    first = grads[0].device
    out = torch.empty(len(grads), dtype=dtype, device=first)
    for group, values in results:
        index = torch.tensor([position[id(t)] for t in group.tensors], device=first)
        out.index_copy_(0, index, values.to(device=first, dtype=dtype))
    return out


@torch.no_grad()
def clip_grad_norm_per_tensor_(
    parameters: _validate.TensorOrTensors,
    max_norm: float,
    norm_type: float | str = 2.0,
    foreach: bool | None = None,
) -> torch.Tensor:
    r"""Clip each gradient tensor to its own norm ``max_norm``, in place; return the norms.

    .. math::

        g_l \leftarrow g_l \cdot \min\Big(1, \frac{c}{\|g_l\|_p + 10^{-6}}\Big)
        \quad \text{for every tensor } l

    This is Keras's ``clipnorm`` (per variable, not global): every tensor is
    capped separately, so a layer with a large gradient no longer shrinks the
    others, but the direction of the whole gradient changes. It is
    :func:`gradclip.clip_grad_norm_` applied to each tensor on its own, with the
    same coefficient (Keras computes :math:`c/\max(\|g_l\|, c)`, which differs
    by the 1e-6 guard only). Batched: one norm kernel and one multiply per
    group of tensors, no host-device synchronisation.

    Non-finite values: as in :func:`gradclip.clip_grad_norm_`, per tensor: a
    NaN makes its tensor all NaN; an inf gives its tensor a factor 0, so the
    inf becomes NaN. Other tensors are untouched.

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` is clipped.
        max_norm: c, a number in [0, inf].
        norm_type: p, in (0, inf].
        foreach: as in :func:`gradclip.clip_grad_norm_`.

    Returns:
        A 1-D tensor of the norms before clipping, one per gradient, in the
        order of the tensors that have one (float32 at least).

    Raises:
        TypeError: ``parameters`` is not a tensor or an iterable of tensors, or a gradient is sparse, or ``max_norm`` is a tensor.
        ValueError: ``max_norm`` is negative or NaN (it must be in [0, inf]).
        ValueError: ``norm_type`` is not in (0, inf] (0, negative, -inf or NaN).
        RuntimeError: ``foreach=True`` on a device without foreach kernels.

    References:
        * Keras optimizers' ``clipnorm`` (per variable), `keras.io/api/optimizers <https://keras.io/api/optimizers/>`__; optax ``clip_by_block_rms``, `optax.readthedocs.io <https://optax.readthedocs.io/en/latest/api/transformations.html>`__.

    Example:
        >>> import torch, gradclip
        >>> a = torch.zeros(2, requires_grad=True); a.grad = torch.tensor([3.0, 4.0])
        >>> b = torch.zeros(1, requires_grad=True); b.grad = torch.tensor([0.5])
        >>> gradclip.clip_grad_norm_per_tensor_([a, b], max_norm=1.0)
        tensor([5.0000, 0.5000])
        >>> a.grad, b.grad
        (tensor([0.6000, 0.8000]), tensor([0.5000]))
    """
    max_norm = _validate.check_threshold("max_norm", max_norm, tensor_ok=False)
    p = _validate.check_norm_type(norm_type)
    _validate.check_foreach(foreach)
    grads = _validate.grads_of(parameters)
    results = _norms_by_group(grads, p, foreach)
    for group, norms in results:
        scale_each_(group, clip_coefficient(max_norm, norms), foreach)
    return _in_original_order(grads, results)


@torch.no_grad()
def clip_grad_block_rms_(
    parameters: _validate.TensorOrTensors,
    max_rms: float,
    foreach: bool | None = None,
) -> torch.Tensor:
    r"""Clip the root mean square of each gradient tensor to ``max_rms``, in place; return the RMS values.

    .. math::

        \operatorname{rms}(g_l) = \sqrt{\tfrac{1}{n_l}\textstyle\sum_j g_{l,j}^2},
        \qquad
        g_l \leftarrow \frac{g_l}{\max\big(1, \operatorname{rms}(g_l)/c\big)}

    optax's ``clip_by_block_rms``: as per-tensor norm clipping, but on the RMS
    (the L2 norm divided by :math:`\sqrt{n_l}`), so one threshold suits
    tensors of every size. No epsilon: a tensor at or below the threshold is
    left exactly as it was. Empty tensors are left alone.

    Non-finite values: a NaN makes its tensor all NaN; an inf makes the RMS
    inf, the divisor inf, the inf entry NaN and its neighbours 0.

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` is clipped.
        max_rms: c, a number in (0, inf].
        foreach: as in :func:`gradclip.clip_grad_norm_`.

    Returns:
        A 1-D tensor of each gradient's RMS before clipping, in order (float32 at least).

    Raises:
        TypeError: ``parameters`` is not a tensor or an iterable of tensors, or a gradient is sparse, or ``max_rms`` is a tensor.
        ValueError: ``max_rms`` is not in (0, inf].
        RuntimeError: ``foreach=True`` on a device without foreach kernels.

    References:
        * Keras optimizers' ``clipnorm`` (per variable), `keras.io/api/optimizers <https://keras.io/api/optimizers/>`__; optax ``clip_by_block_rms``, `optax.readthedocs.io <https://optax.readthedocs.io/en/latest/api/transformations.html>`__.

    Example:
        >>> import torch, gradclip
        >>> w = torch.zeros(4, requires_grad=True); w.grad = torch.tensor([2.0, -2.0, 2.0, -2.0])
        >>> gradclip.clip_grad_block_rms_([w], max_rms=0.5)
        tensor([2.])
        >>> w.grad
        tensor([ 0.5000, -0.5000,  0.5000, -0.5000])
    """
    max_rms = _validate.check_threshold("max_rms", max_rms, tensor_ok=False, zero_ok=False)
    _validate.check_foreach(foreach)
    grads = _validate.grads_of(parameters)
    results = []
    for group, norms in _norms_by_group(grads, 2.0, foreach):
        counts = torch.tensor([1.0 / math.sqrt(max(t.numel(), 1)) for t in group.tensors], dtype=norms.dtype)
        rms = norms * counts.to(norms.device, non_blocking=True)
        scale_each_(group, 1.0 / torch.clamp(rms / max_rms, min=1.0), foreach)
        results.append((group, rms))
    return _in_original_order(grads, results)
