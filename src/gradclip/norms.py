"""The global gradient norm: one pipeline from a plan to a 0-dim norm, local or distributed.

:func:`total_norm` is the only way the library computes a global norm:
:func:`get_total_norm`, :func:`gradclip.clip_grad_norm_`, the soft and
report variants and every stateful clipper call it, on the
:class:`~gradclip._groups.Plan` of their tensors. It takes the norm in one of
two ways, each entered once: locally (:func:`gradclip._norms.local_total`:
per-group partial norms, combined in float64), or, for DTensors and
``process_group=``, over the ranks (:func:`gradclip.distributed.wide_global_norm`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch

from . import _groups, _norms, _validate, distributed

__all__ = ["get_total_norm"]

_F32_MAX = torch.finfo(torch.float32).max


class TotalNorm:
    """A global norm as the pipeline hands it on: what is returned, and the float64 value factors come from.

    Attributes:
        norm: the 0-dim tensor returned to the caller (float32 at least, float64 for float64
            gradients), on the first tensor's device.
        value: the norm in float64 as a Python float when it was combined on the host (the CPU,
            outside compilation), else ``None``: nothing was read from a device.
        wide: the norm as a 0-dim float64 tensor (float32 on MPS) on ``norm``'s device; ``None``
            where it was combined on the host and no tensor was asked for (``total_norm(wide=True)``).
    """

    __slots__ = ("norm", "value", "wide")

    def __init__(self, norm: torch.Tensor, wide: torch.Tensor | None = None, value: float | None = None) -> None:
        self.norm = norm
        self.value = value
        self.wide = wide

    def divided_by(self, scale: torch.Tensor | float) -> TotalNorm:
        """The norm of gradients still multiplied by ``scale`` (a GradScaler's), divided on the device (no sync)."""
        wide = self.wide
        if wide is None:
            wide = torch.scalar_tensor(self.value, dtype=torch.float64, device=self.norm.device)
        if isinstance(scale, torch.Tensor):
            scale = scale.detach().to(device=wide.device, dtype=wide.dtype).reshape(())
        wide = wide / scale
        return TotalNorm(wide.to(self.norm.dtype), wide)


def total_norm(
    plan: _groups.Plan,
    p: float,
    foreach: bool | None,
    *,
    process_group: Any = None,
    replicated: Iterable[torch.Tensor] | None = None,
    error_if_nonfinite: bool = False,
    wide: bool = False,
) -> TotalNorm:
    """The p-norm of every tensor of ``plan``, as if concatenated; over the ranks for DTensors or a ``process_group``.

    The returned norm lies on the first tensor's device, in
    :func:`gradclip._norms.output_dtype`; ``tensor(0.)`` for no tensors. Its
    float64 ("wide") value is what clipping factors are computed from: it is
    finite whenever the true norm is, even when the returned dtype cannot hold
    it (see :mod:`gradclip._norms`). With DTensor groups, or a
    ``process_group``, it is the global norm over the ranks (see
    :mod:`gradclip.distributed`) and every rank must call. ``wide=True`` makes
    sure the float64 tensor exists (where the norm was combined on the host it
    is only made when asked for); ``error_if_nonfinite`` raises for a NaN or
    inf norm.
    """
    want_wide = wide
    out_dtype = plan.output_dtype
    distributed_now = plan.distributed or (process_group is not None and process_group is not False)
    if replicated is not None and not distributed_now and _in_multi_rank_run():
        warnings.warn(
            "`replicated` was given without `process_group`, so nothing is reduced over the ranks and each "
            "rank gets the norm of its own tensors only. For tensors sharded by hand pass process_group=True "
            "(or the group); for DDP, whose gradients are already identical on every rank, pass neither.",
            UserWarning, stacklevel=_validate._outside_stacklevel())
    if distributed_now:
        wide = distributed.wide_global_norm(plan.groups, p, foreach, plan.device, process_group, replicated)
        total = TotalNorm(wide.to(out_dtype), wide)
    elif not plan.groups:
        total = TotalNorm(torch.zeros((), dtype=out_dtype), value=0.0)
    else:
        value, wide = _norms.local_total(plan, p)
        if wide is not None:
            total = TotalNorm(wide.to(out_dtype), wide)
        elif want_wide or (value > _F32_MAX and out_dtype != torch.float64):  # (a float32 tensor rounds past the max to inf)
            wide = torch.scalar_tensor(value, dtype=torch.float64, device=plan.device)
            total = TotalNorm(_narrowed(value, wide, out_dtype), wide, value)
        else:
            total = TotalNorm(torch.scalar_tensor(value, dtype=out_dtype, device=plan.device), value=value)
    if error_if_nonfinite:
        raise_if_nonfinite(total, p)
    return total


def _narrowed(value: float, wide: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``wide.to(out_dtype)``, made from the float where it fits (one small op instead of a conversion, which
    costs more right after the norm's kernels); ``torch.scalar_tensor`` refuses a finite float32 overflow."""
    if out_dtype == torch.float64 or not value > _F32_MAX or value == math.inf:
        return torch.scalar_tensor(value, dtype=out_dtype, device=wide.device)
    return wide.to(out_dtype)


def grouped_norm(
    tensors: list[torch.Tensor],
    p: float,
    foreach: bool | None,
    *,
    process_group: Any = None,
    replicated: Iterable[torch.Tensor] | None = None,
) -> tuple[_groups.Plan, torch.Tensor, torch.Tensor]:
    """(plan, norm, wide norm) of already-checked tensors: :func:`total_norm` on their plan (not kept for reuse)."""
    plan = _groups.Plan(tensors, _groups.groups_of(tensors, foreach))
    total = total_norm(plan, p, foreach, process_group=process_group, replicated=replicated, wide=True)
    return plan, total.norm, total.wide


def _in_multi_rank_run() -> bool:
    """Whether torch.distributed is initialised with more than one rank (host metadata only)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def raise_if_nonfinite(total: TotalNorm, p: float) -> None:
    """Raise when the norm is NaN or inf. Reads the value: one host-device sync (none on the CPU)."""
    value = total.value if total.value is not None else float(total.norm)
    if value != value or value in (float("inf"), float("-inf")):
        raise RuntimeError(
            f"The total norm of order {p} for gradients from `parameters` is non-finite, so it "
            "cannot be clipped. To disable this error and scale the gradients by the non-finite "
            "norm anyway, set `error_if_nonfinite=False`"
        )


@torch.no_grad()
def get_total_norm(
    tensors: _validate.TensorOrTensors,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    process_group: Any = None,
    replicated: Iterable[torch.Tensor] | None = None,
) -> torch.Tensor:
    r"""Norm of all entries of ``tensors``, as if concatenated into one vector.

    .. math::

        \|g\|_p = \Big(\sum_i \sum_j |g_{i,j}|^p\Big)^{1/p},
        \qquad \|g\|_\infty = \max_{i,j} |g_{i,j}|

    Same contract as ``torch.nn.utils.get_total_norm`` (torch >= 2.6), with
    one deliberate difference: float16 and bfloat16 tensors are reduced in
    float32 and the norm is returned in float32. torch reduces them into their
    own dtype, so a float16 norm above 65504 becomes ``inf``. Where torch is
    wrong the norm is right: squares that overflow or underflow (float64
    ``[2e200, 0.]`` gives 2e200, torch ``inf``). A tensor with no entries
    contributes nothing for every p, the inf-norm included (torch raises
    there: a max over no entries has no identity); with no entries at all the
    norm is 0.

    Synchronisation and distributed training follow the conventions of
    :mod:`gradclip`: DTensors give the norm of the full tensors as a plain
    tensor equal on every rank (torch returns a DTensor whose ``.item()`` is
    only a partial value); see :mod:`gradclip.distributed`.

    Args:
        tensors: a tensor or an iterable of tensors (typically gradients).
        norm_type: p, in (0, inf]; ``'inf'`` or ``float('inf')`` for the max-norm.
        error_if_nonfinite: raise ``RuntimeError`` if the norm is NaN or inf.
            Checking reads the value, which synchronises with the device.
        foreach: ``None`` picks the fastest batched path available,
            ``True`` insists on torch's foreach kernels, ``False`` loops.
        process_group: ``None`` (no reduction over plain tensors), ``True`` or
            :data:`gradclip.distributed.WORLD` (the default group), a
            ``ProcessGroup`` or a 1-D ``DeviceMesh``: the ranks ``tensors`` are
            sharded over.
        replicated: tensors (or parameters whose ``.grad`` is in ``tensors``)
            that are identical on every rank of ``process_group``.

    Returns:
        A 0-dim tensor on the first tensor's device; ``tensor(0.)`` for no tensors
        (with ``process_group``, a rank without tensors still gets the global norm).

    Raises:
        TypeError: ``tensors`` is not a tensor or an iterable of tensors, or one is sparse.
        ValueError: ``norm_type`` is not in (0, inf] (0, negative, -inf or NaN).
        RuntimeError: ``error_if_nonfinite=True`` and the norm is NaN or inf.
        RuntimeError: ``foreach=True`` on a device without foreach kernels.
        RuntimeError: ``process_group`` is given but ``torch.distributed`` is not initialized.

    References:
        * PyTorch, ``torch.nn.utils.clip_grad_norm_`` and ``get_total_norm``: `pytorch.org/docs <https://pytorch.org/docs/stable/generated/torch.nn.utils.clip_grad_norm_.html>`__.

    Example:
        >>> import torch, gradclip
        >>> gradclip.get_total_norm([torch.tensor([3.0]), torch.tensor([4.0])])
        tensor(5.)
    """
    checked = _validate.check_call(tensors, norm_type=norm_type, foreach=foreach,
                                   error_if_nonfinite=error_if_nonfinite, of_grads=False, name="tensors")
    plan = _groups.plan_for(checked, foreach)
    return total_norm(plan, checked.p, foreach, process_group=process_group, replicated=replicated,
                      error_if_nonfinite=checked.nonfinite).norm
