r"""Soft clipping: smooth, saturating scalings in place of the hard ``min(1, c/||g||)``.

What the article calls "gradient inhibition" is, read honestly, a smooth
version of clipping: the gradient is scaled by a factor that decreases
smoothly with its size instead of switching at a threshold.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from . import _groups, _validate, distributed
from ._norms import wide_dtype
from ._scaling import scale_
from .clip import grad_norm

__all__ = ["soft_clip_grad_norm_", "soft_clip_grad_value_"]


@torch.no_grad()
def soft_clip_grad_norm_(
    parameters: _validate.TensorOrTensors,
    max_norm: float,
    norm_type: float | str = 2.0,
    foreach: bool | None = None,
    *,
    process_group: Any = None,
    replicated: Iterable[torch.Tensor] | None = None,
) -> torch.Tensor:
    r"""Scale the gradients by :math:`c/(\|g\|+c)` in place; return the norm before scaling.

    .. math::

        g \leftarrow g \cdot \frac{c}{\|g\|_p + c} = \frac{g}{1 + \|g\|_p / c}

    The smooth counterpart of :func:`gradclip.clip_grad_norm_`: the result's
    norm :math:`c\|g\|/(\|g\|+c)` is always below c and grows smoothly with
    :math:`\|g\|`, and the direction is kept. It is within a factor of 2 of
    hard clipping:

    .. math::

        \tfrac12 \min\Big(1, \frac{c}{\|g\|}\Big) \;\le\; \frac{c}{\|g\| + c}
        \;\le\; \min\Big(1, \frac{c}{\|g\|}\Big)

    (for :math:`\|g\| \le c` the factor lies in [1/2, 1]; above, it lies in
    :math:`[\tfrac12 c/\|g\|, c/\|g\|]`). Unlike hard clipping it is never a
    no-op: a small gradient is still scaled by up to one half, so it acts on
    the effective learning rate everywhere. This is the smoothed clipping
    analysed by Zhang, He, Sra and Jadbabaie (2020), "Why gradient clipping
    accelerates training", `arXiv:1905.11881 <https://arxiv.org/abs/1905.11881>`__;
    with per-example gradients it is the AUTO-S rule of Bu et al.
    (`arXiv:2206.07136 <https://arxiv.org/abs/2206.07136>`__) up to their
    small constant.

    One norm pass and one multiply, batched, with no host-device synchronisation.

    Non-finite values: a NaN norm makes every gradient NaN; an inf norm gives
    the factor 0, so inf entries become NaN (as in :func:`gradclip.clip_grad_norm_`).

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` is scaled.
        max_norm: c, a number in (0, inf]; ``inf`` leaves the gradients unchanged.
        norm_type: p, in (0, inf].
        foreach: as in :func:`gradclip.clip_grad_norm_`.
        process_group, replicated: for sharded gradients, as in :func:`gradclip.clip_grad_norm_`.

    Returns:
        The total norm before scaling, a 0-dim tensor.

    Raises:
        TypeError: as :func:`gradclip.clip_grad_norm_`, or ``max_norm`` is a tensor.
        ValueError: ``max_norm`` is not in (0, inf], or as :func:`gradclip.clip_grad_norm_`.
        RuntimeError: as :func:`gradclip.clip_grad_norm_`.

    References:
        * Zhang, He, Sra and Jadbabaie (2020), "Why gradient clipping accelerates training", `arXiv:1905.11881 <https://arxiv.org/abs/1905.11881>`__.
        * Bu, Wang, Zha and Karypis (2022), "Automatic Clipping" (AUTO-S), `arXiv:2206.07136 <https://arxiv.org/abs/2206.07136>`__.

    Example:
        >>> import torch, gradclip
        >>> w = torch.zeros(2, requires_grad=True); w.grad = torch.tensor([3.0, 4.0])
        >>> gradclip.soft_clip_grad_norm_([w], max_norm=5.0)
        tensor(5.)
        >>> w.grad  # factor 5 / (5 + 5) = 0.5, where hard clipping would give 1
        tensor([1.5000, 2.0000])
    """
    max_norm = _validate.check_threshold("max_norm", max_norm, tensor_ok=False, zero_ok=False)
    plan, total = grad_norm(parameters, norm_type, foreach, process_group=process_group, replicated=replicated)
    if total.value is not None:  # combined on the host (the CPU): the factor is a float too
        scale_(plan, 1.0 / (1.0 + total.value / max_norm))
    else:
        scale_(plan, 1.0 / (1.0 + total.wide / max_norm))
    return total.norm


@torch.no_grad()
def soft_clip_grad_value_(
    parameters: _validate.TensorOrTensors,
    alpha: float,
    foreach: bool | None = None,
) -> None:
    r"""Tame every gradient entry as :math:`g_j/(1+\alpha|g_j|)`, in place.

    .. math::

        g_j \leftarrow \frac{g_j}{1 + \alpha |g_j|}

    The smooth counterpart of :func:`gradclip.clip_grad_value_` with
    :math:`v = 1/\alpha`: every entry ends strictly inside
    :math:`(-1/\alpha, 1/\alpha)`, signs are kept, the map is odd, monotone and
    smooth, and it is within a factor of 2 of value clipping:
    :math:`\tfrac12 |\mathrm{clamp}(g_j, \pm v)| \le |g_j|/(1+\alpha|g_j|)
    \le |\mathrm{clamp}(g_j, \pm v)|`. Like value clipping it changes the
    gradient's direction. This is the "tamed" component-wise soft clipping
    analysed by Williamson, Eisenmann and Stillfjord (2024),
    `arXiv:2406.16640 <https://arxiv.org/abs/2406.16640>`__. ``alpha=0`` is a no-op.

    Non-finite values: NaN stays NaN; :math:`\pm\infty` becomes NaN
    (:math:`\infty/\infty`) rather than the finite limit :math:`\pm 1/\alpha`,
    so an overflow is not hidden.

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` is tamed.
        alpha: :math:`\alpha`, a finite number >= 0.
        foreach: as in :func:`gradclip.clip_grad_norm_`.

    Raises:
        TypeError: ``parameters`` is not a tensor or an iterable of tensors, or a gradient is sparse or complex, or ``alpha`` is not a number.
        ValueError: ``alpha`` is negative, infinite or NaN.
        RuntimeError: ``foreach=True`` on a device without foreach kernels.

    References:
        * Williamson, Eisenmann and Stillfjord (2024), component-wise tamed (soft) clipping, `arXiv:2406.16640 <https://arxiv.org/abs/2406.16640>`__.

    Example:
        >>> import torch, gradclip
        >>> w = torch.zeros(3, requires_grad=True); w.grad = torch.tensor([-3.0, 0.5, 1.0])
        >>> gradclip.soft_clip_grad_value_([w], alpha=1.0)
        >>> w.grad
        tensor([-0.7500,  0.3333,  0.5000])
    """
    alpha = _validate.check_real("alpha", alpha, 0.0, float("inf"), high_open=True)
    plan = _groups.plan_for(_validate.check_call(parameters, foreach=foreach), foreach,
                            entrywise="soft_clip_grad_value_")
    if plan.distributed:
        distributed.check_not_partial(plan.groups, "soft_clip_grad_value_")
    for group in plan:
        tensors, _ = group.targets()
        for tensor in tensors:
            tensor.copy_(_tamed(tensor, alpha))


def _tamed(g: torch.Tensor, alpha: float) -> torch.Tensor:
    """g / (1 + alpha |g|), computed where it cannot overflow or underflow.

    Where alpha |g| > 1 the equal form sign(g) / (alpha + 1/|g|) is used, so a
    huge entry gives about 1/alpha instead of g / inf = 0; elsewhere the plain
    form, so a tiny entry keeps its value instead of 1/(1/g) = 1/inf = 0.
    Computed in the wide dtype (float64), so that alpha itself may lie beyond
    the gradients' range (alpha = 1e39 for bfloat16 entries of 1e-39).
    """
    x = g.to(wide_dtype(g.device))
    magnitude = x.abs()
    large = magnitude * alpha > 1
    plain = x / (1.0 + torch.where(large, 0.0, magnitude) * alpha)
    saturated = torch.sign(x) / (alpha + 1.0 / torch.where(large, magnitude, 1.0))
    # non-finite entries: NaN stays NaN, inf / inf gives NaN (an overflow is not hidden)
    out = torch.where(large, saturated, plain)
    return torch.where(torch.isinf(x), x / x.abs().mul(alpha).add(1.0), out)
