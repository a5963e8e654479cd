"""The global gradient norm: one pipeline from tensors to a 0-dim norm, local or distributed.

:func:`grouped_norm` is the only way the library computes a global norm:
:func:`get_total_norm`, :func:`gradclip.clip_grad_norm_`, the soft and
report variants and every stateful clipper call it. It groups the tensors by
(device, dtype) (finding flat buffers), takes per-group partial norms with
:func:`gradclip._norms.group_norms`, and combines them locally, or, for
DTensors and ``process_group=``, through :func:`gradclip.distributed.wide_global_norm`.
"""

from __future__ import annotations

import warnings

from collections.abc import Iterable
from typing import Any

import torch

from . import _groups, _norms, _validate, distributed

__all__ = ["get_total_norm"]


def _is_distributed(groups: list[_groups.Group], process_group: Any) -> bool:
    return (process_group is not None and process_group is not False) or any(
        group.sharding is not None for group in groups)


def grouped_norm(
    tensors: list[torch.Tensor],
    p: float,
    foreach: bool | None,
    *,
    process_group: Any = None,
    replicated: Iterable[torch.Tensor] | None = None,
) -> tuple[list[_groups.Group], torch.Tensor, torch.Tensor]:
    """Group already-checked tensors; return the groups, their total p-norm, and that norm in float64.

    The norm lies on the first tensor's device, in :func:`gradclip._norms.output_dtype`;
    ``tensor(0.)`` for no tensors. The float64 ("wide") copy is what clipping
    factors are computed from: it is finite whenever the true norm is, even
    when the returned dtype cannot hold it (see :mod:`gradclip._norms`). With
    DTensor groups, or a ``process_group``, it is the global norm over the
    ranks (see :mod:`gradclip.distributed`) and every rank must call.
    """
    groups = _groups.groups_of(tensors, foreach)
    first_device = tensors[0].device if tensors else None
    distributed_now = _is_distributed(groups, process_group)
    if replicated is not None and not distributed_now and _in_multi_rank_run():
        warnings.warn(
            "`replicated` was given without `process_group`, so nothing is reduced over the ranks and each "
            "rank gets the norm of its own tensors only. For tensors sharded by hand pass process_group=True "
            "(or the group); for DDP, whose gradients are already identical on every rank, pass neither.",
            UserWarning, stacklevel=_validate._outside_stacklevel())
    if distributed_now:
        wide = distributed.wide_global_norm(groups, p, foreach, first_device, process_group, replicated)
    elif not groups:
        wide = torch.zeros((), dtype=torch.float64)
    else:
        partial_norms = [_norms.group_norms(group, p, foreach).to(first_device) for group in groups]
        narrow = all(_norms.accumulation_dtype(group.dtype) != torch.float64 for group in groups)
        wide = _norms.combine(torch.cat(partial_norms), p, narrow_inputs=narrow)
    return groups, wide.to(_norms.output_dtype([group.dtype for group in groups])), wide


def _in_multi_rank_run() -> bool:
    """Whether torch.distributed is initialised with more than one rank (host metadata only)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def raise_if_nonfinite(norm: torch.Tensor, p: float) -> None:
    """Raise when ``norm`` is NaN or inf. Reads the value: one host-device sync."""
    if torch.logical_or(norm.isnan(), norm.isinf()):
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
    tensors = _validate.as_tensor_list(tensors, "tensors")
    _validate.check_dense(tensors, "tensor")
    p = _validate.check_norm_type(norm_type)
    _validate.check_foreach(foreach)
    detached = [t.detach() for t in tensors]
    if replicated is not None and process_group is not None and process_group is not False:
        marked = distributed.replicated_ids(replicated)  # match the caller's tensors, not our detached copies
        replicated = [d for t, d in zip(tensors, detached) if id(t) in marked]
    _, norm, _ = grouped_norm(detached, p, foreach, process_group=process_group, replicated=replicated)
    if _validate.check_bool("error_if_nonfinite", error_if_nonfinite):
        raise_if_nonfinite(norm, p)
    return norm
