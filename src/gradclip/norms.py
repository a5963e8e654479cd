"""Total norms of many tensors: batched, sync-free, accumulated in float32 at least."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch._utils import _flatten_dense_tensors

from . import _args, _groups

# On the CPU, torch's foreach norm is a loop of one kernel per tensor. Below
# this size a tensor is cheaper to copy into one concatenated buffer and
# reduce there with a single kernel; above it the copy costs more than the
# kernel launch it saves (measured with benchmarks/bench_core.py).
CPU_CONCAT_MAX_NUMEL = 256

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs, the input dtype otherwise."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _norms_of_group(group: _groups.Group, p: float, foreach: bool | None) -> torch.Tensor:
    """A 1-D tensor of partial p-norms whose p-norm is the group's total norm."""
    dtype = accumulation_dtype(group.dtype)
    if group.buffer is not None:
        return torch.linalg.vector_norm(group.buffer, p, dtype=dtype).reshape(1)
    tensors = group.tensors
    if not _groups.use_foreach(tensors, group.device, foreach):
        return torch.stack([torch.linalg.vector_norm(t, p, dtype=dtype) for t in tensors])
    partial_norms = []
    if group.device.type == "cpu" and foreach is None:
        small = [t for t in tensors if t.numel() <= CPU_CONCAT_MAX_NUMEL]
        if len(small) > 1:
            flat = _flatten_dense_tensors(small)
            partial_norms.append(torch.linalg.vector_norm(flat, p, dtype=dtype).reshape(1))
            tensors = [t for t in tensors if t.numel() > CPU_CONCAT_MAX_NUMEL]
    if tensors:
        partial_norms.append(torch.stack(torch._foreach_norm(tensors, p, dtype=dtype)))
    return torch.cat(partial_norms) if len(partial_norms) > 1 else partial_norms[0]


def total_norm(
    groups: list[_groups.Group],
    p: float,
    foreach: bool | None,
    first_device: torch.device | None,
    *,
    process_group: Any = None,
    replicated: Iterable[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The p-norm of all entries of the grouped tensors, on ``first_device``.

    With DTensor groups, or a ``process_group``, the global norm over the
    ranks (see :func:`gradclip.distributed.global_norm`, which documents
    ``process_group`` and ``replicated``); every rank must call it then.
    """
    if (process_group is not None and process_group is not False) or any(
        group.sharding is not None for group in groups
    ):
        from .distributed import global_norm

        return global_norm(groups, p, foreach, first_device, process_group, replicated)
    if not groups:
        return torch.tensor(0.0)
    partial_norms = [_norms_of_group(group, p, foreach).to(first_device) for group in groups]
    return torch.linalg.vector_norm(torch.cat(partial_norms), p)


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
    tensors: _args.TensorOrTensors,
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
    own dtype, so a float16 norm above 65504 becomes ``inf``.

    No host-device synchronisation happens unless ``error_if_nonfinite=True``.

    Distributed: DTensors (e.g. gradients of ``fully_shard``) give the norm of
    the full tensors, as a plain tensor equal on every rank (torch returns a
    DTensor whose ``.item()`` is only a partial value). For tensors sharded by
    hand, ``process_group`` all-reduces the partial sums of
    :math:`|g|^p` (the max for p = inf) in float64 and ``replicated`` marks
    the tensors every rank holds a copy of, counted once; see
    :mod:`gradclip.distributed`. Every rank must then make the call.

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

    Example:
        >>> import torch, gradclip
        >>> gradclip.get_total_norm([torch.tensor([3.0]), torch.tensor([4.0])])
        tensor(5.)
    """
    tensors = _args.as_tensor_list(tensors, "tensors")
    _args.check_dense(tensors, "tensor")
    p = _args.check_norm_type(norm_type)
    _args.check_foreach(foreach)
    detached = [t.detach() for t in tensors]
    if replicated is not None and process_group is not None and process_group is not False:
        from .distributed import replicated_ids

        marked = replicated_ids(replicated)  # match the caller's tensors, not our detached copies
        replicated = [d for t, d in zip(tensors, detached) if id(t) in marked]
    tensors = detached
    first_device = tensors[0].device if tensors else None
    norm = total_norm(_groups.groups_of(tensors, foreach), p, foreach, first_device,
                      process_group=process_group, replicated=replicated)
    if error_if_nonfinite:
        raise_if_nonfinite(norm, p)
    return norm
