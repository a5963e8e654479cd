"""The ground floor of every norm in the library: per-tensor and per-group p-norms.

Everything that measures gradients (the global norm, its distributed
reduction, per-tensor clipping, AGC, the monitor) calls these two functions, so
there is one place where the accumulation dtype, the batched kernels and the
CPU small-tensor optimisation are decided. Nothing here reads a value on the host.
"""

from __future__ import annotations

import torch
from torch._utils import _flatten_dense_tensors

from . import _groups

# On the CPU, torch's foreach norm is a loop of one kernel per tensor. Below
# this size a tensor is cheaper to copy into one concatenated buffer and
# reduce there with a single kernel; above it the copy costs more than the
# kernel launch it saves (measured with benchmarks/bench_core.py).
CPU_CONCAT_MAX_NUMEL = 256

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs, the input dtype otherwise."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def tensor_norms(tensors: list[torch.Tensor], p: float, device: torch.device, foreach: bool | None) -> torch.Tensor:
    """A 1-D tensor with the p-norm of each tensor (all of one device and dtype), in order.

    Accumulated in float32 at least; one foreach kernel where supported, a loop otherwise.
    """
    dtype = accumulation_dtype(tensors[0].dtype)
    if _groups.use_foreach(tensors, device, foreach):
        return torch.stack(torch._foreach_norm(tensors, p, dtype=dtype))
    return torch.stack([torch.linalg.vector_norm(t, p, dtype=dtype) for t in tensors])


def group_norms(group: _groups.Group, p: float, foreach: bool | None) -> torch.Tensor:
    """A 1-D tensor of partial p-norms whose own p-norm is the group's total norm.

    A flat buffer gives one norm; on the CPU (with ``foreach=None``) the small
    tensors are concatenated and reduced together; the rest get one norm each.
    """
    dtype = accumulation_dtype(group.dtype)
    if group.buffer is not None:
        return torch.linalg.vector_norm(group.buffer, p, dtype=dtype).reshape(1)
    tensors = group.tensors
    if not _groups.use_foreach(tensors, group.device, foreach):
        return tensor_norms(tensors, p, group.device, False)
    partial_norms = []
    if group.device.type == "cpu" and foreach is None:
        small = [t for t in tensors if t.numel() <= CPU_CONCAT_MAX_NUMEL]
        if len(small) > 1:
            flat = _flatten_dense_tensors(small)
            partial_norms.append(torch.linalg.vector_norm(flat, p, dtype=dtype).reshape(1))
            tensors = [t for t in tensors if t.numel() > CPU_CONCAT_MAX_NUMEL]
    if tensors:
        partial_norms.append(tensor_norms(tensors, p, group.device, True))
    return torch.cat(partial_norms) if len(partial_norms) > 1 else partial_norms[0]
