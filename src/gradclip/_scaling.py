"""Acting on gradients in place: the clip coefficient, one factor for all, one per tensor, a clamp.

The last stage of the pipeline: each function walks the groups of a
:class:`~gradclip._groups.Plan` and acts on what the plan chose (the flat
buffer with one kernel, a group's tensors with one foreach kernel or a loop,
DTensors through their local shards with no communication). On the CPU a
factor of exactly 1 skips the pass (reading it is free there); on
accelerators, and while ``torch.compile`` traces, the multiply always runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from . import _groups
from ._norms import accumulation_dtype, exact_on_host

if TYPE_CHECKING:
    from .norms import TotalNorm

# torch's guard against dividing by a zero norm; kept for exact parity.
NORM_EPS = 1e-6


def clip_coefficient(max_norm: float | torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``min(1, max_norm / (norm + 1e-6))`` as a tensor (any shape), without a sync.

    A tensor ``max_norm`` on an accelerator is not checked on the host: if it is
    negative (or NaN) the factor is NaN, so the mistake shows in the gradients
    instead of silently flipping them.
    """
    factor = torch.clamp(max_norm / (norm + NORM_EPS), max=1.0)
    if isinstance(max_norm, torch.Tensor):
        factor = torch.where(max_norm >= 0, factor, torch.nan)
    return factor


def clip_(plan: _groups.Plan, max_norm: float | torch.Tensor, total: TotalNorm) -> torch.Tensor | float:
    """Scale the plan's tensors by ``min(1, max_norm / (norm + 1e-6))`` in place; return that factor.

    Where the norm was combined on the host (``total.value``, the CPU) the
    factor is a Python float, computed in float64 as :func:`clip_coefficient`
    does, and a factor of exactly 1 skips the pass. Elsewhere it is a tensor
    and the multiply always runs.
    """
    if total.value is not None and (not isinstance(max_norm, torch.Tensor) or max_norm.device.type == "cpu"):
        factor = float(max_norm) / (total.value + NORM_EPS)  # a CPU tensor max_norm is read for free
        if factor > 1.0:  # (NaN stays NaN, as in torch.clamp)
            factor = 1.0
        if factor != 1.0:
            scale_(plan, factor)
        return factor
    wide = total.wide if total.wide is not None else torch.scalar_tensor(
        total.value, dtype=torch.float64, device=total.norm.device)
    factor = clip_coefficient(max_norm, wide)
    scale_(plan, factor)
    return factor


def scale_(groups: Iterable[_groups.Group], factor: torch.Tensor | float, foreach: bool | None = None) -> None:
    """Multiply every tensor of a plan (or of a list of groups) in place by ``factor``, a 0-dim tensor or a float.

    The factor is cast to each group's accumulation dtype (float32 for
    half-precision gradients), in which the multiply is computed. The kernels
    are those the plan chose when the groups were made (``foreach`` is kept for
    callers that pass it; the groups already hold that choice).
    """
    work = groups.scale_work if isinstance(groups, _groups.Plan) else [
        _groups.ScaleWork(group, *group.targets(), accumulation_dtype(group.dtype)) for group in groups]
    if isinstance(factor, torch.Tensor):
        if _skippable([item.group for item in work], factor):
            return
    elif factor == 1.0:
        return
    for item in work:
        _check_scalable(item.group)
        if isinstance(factor, torch.Tensor):
            group_factor = factor.to(item.group.device, item.dtype)
        else:  # a tensor, not the number: torch's foreach multiply by a number is 4x slower on the CPU
            group_factor = torch.scalar_tensor(factor, dtype=item.dtype, device=item.group.device)
        if item.batched:
            torch._foreach_mul_(item.targets, group_factor)
        else:
            for tensor in item.targets:
                tensor.mul_(group_factor)


def _check_scalable(group: _groups.Group) -> None:
    """Refuse DTensors whose local values multiply together (``Partial("product")``).

    Scaling every rank's local value by s scales a sum, an average, a max or a
    min by s, and entries (``Shard``, ``Replicate``) by s; a product of R local
    values would be scaled by s to the power R.
    """
    if group.sharding is None:
        return
    for dim, placement in enumerate(group.sharding.placements):
        if str(getattr(placement, "reduce_op", "")).lower() in ("product", "prod"):
            raise ValueError(
                f"cannot scale DTensor gradients with placement {placement} on mesh dim {dim}: scaling "
                "each rank's factor would scale their product by a power of the factor. Redistribute "
                "them to Shard or Replicate first."
            )


def _skippable(groups: list[_groups.Group], factors: torch.Tensor) -> bool:
    """True when every gradient and the factors live on the CPU and every factor is exactly 1.

    Multiplying by 1 changes nothing, and on the CPU reading the factor costs
    no device synchronisation, so the pass over every gradient is skipped.
    On accelerators the multiply always runs: deciding would need a sync.
    """
    device = factors.device
    if not all(group.device == device for group in groups) or not exact_on_host(device):
        return False
    return bool((factors == 1).all())


def scale_each_(group: _groups.Group, factors: torch.Tensor, foreach: bool | None) -> None:
    """Multiply tensor i of one group (no flat buffer) in place by the 0-dim tensor ``factors[i]``."""
    if _skippable([group], factors):
        return
    _check_scalable(group)
    tensors = _groups.local(group).tensors
    factors = factors.to(group.device, accumulation_dtype(group.dtype))
    _groups.apply_(tensors, _groups.use_foreach(tensors, group.device, foreach), "mul", list(factors.unbind()))


def clamp_(groups: Iterable[_groups.Group], bound: float | torch.Tensor, foreach: bool | None = None) -> None:
    """Clamp every entry of every tensor into ``[-bound, bound]`` in place (NaN stays NaN).

    A tensor bound is used on the device, without reading it: one clamp per tensor.
    """
    work = groups.scale_work if isinstance(groups, _groups.Plan) else [
        _groups.ScaleWork(group, *group.targets(), accumulation_dtype(group.dtype)) for group in groups]
    for item in work:
        if isinstance(bound, torch.Tensor):
            high = bound.to(item.group.device, item.dtype)
            for tensor in item.targets:
                tensor.clamp_(min=-high, max=high)
        elif item.batched:
            torch._foreach_clamp_min_(item.targets, -bound)
            torch._foreach_clamp_max_(item.targets, bound)
        else:
            for tensor in item.targets:
                tensor.clamp_(min=-bound, max=bound)
