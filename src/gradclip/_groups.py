"""Grouping tensors for batched kernels, and spotting gradients that tile one buffer."""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
from torch.utils._foreach_utils import (
    _device_has_foreach_support,
    _group_tensors_by_device_and_dtype,
    _has_foreach_support,
)

GroupKey = tuple[torch.device, torch.dtype]


class Group(NamedTuple):
    """Tensors of one device and dtype, and the flat buffer they tile, if any."""

    device: torch.device
    dtype: torch.dtype
    tensors: list[torch.Tensor]
    buffer: torch.Tensor | None


def by_device_and_dtype(tensors: list[torch.Tensor]) -> dict[GroupKey, list[torch.Tensor]]:
    """Group tensors by (device, dtype), keeping their order inside each group."""
    if not tensors:
        return {}
    grouped = _group_tensors_by_device_and_dtype([tensors])
    return {key: group_tensors[0] for key, (group_tensors, _) in grouped.items()}


def groups_of(tensors: list[torch.Tensor], foreach: bool | None) -> list[Group]:
    """Group by (device, dtype) and find flat buffers (not when ``foreach=False``)."""
    return [
        Group(device, dtype, group, None if foreach is False else single_buffer(group))
        for (device, dtype), group in by_device_and_dtype(tensors).items()
    ]


def use_foreach(tensors: list[torch.Tensor], device: torch.device, foreach: bool | None) -> bool:
    """torch's rule: None picks foreach where supported, True insists on it."""
    if foreach is None:
        return _has_foreach_support(tensors, device)
    if foreach and not _device_has_foreach_support(device):
        raise RuntimeError(f"foreach=True was passed, but can't use the foreach API on {device.type} tensors")
    return foreach


def single_buffer(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """A 1-D view of the storage that the tensors tile exactly, or None.

    When every tensor is a contiguous view into one storage and together they
    cover one contiguous span without gaps or overlaps (what
    :class:`gradclip.GradBuffer` sets up), one kernel over the span does the
    work of one kernel per tensor. Only host metadata is read: no sync.
    """
    if len(tensors) < 2:
        return None
    first, last = tensors[0], tensors[-1]
    storage_ptr = first.untyped_storage().data_ptr()
    if last.untyped_storage().data_ptr() != storage_ptr:
        return None  # the common case, rejected in constant time
    registered = _REGISTERED_VIEWS.get(id(first._base))
    if registered is not None and registered.matches(first._base, tensors):
        return first._base
    spans = []
    for tensor in tensors:
        if tensor.untyped_storage().data_ptr() != storage_ptr or not tensor.is_contiguous():
            return None
        spans.append((tensor.storage_offset(), tensor.numel()))
    spans.sort()
    start = end = spans[0][0]
    for offset, numel in spans:
        if offset != end:
            return None
        end += numel
    flat = torch.empty(0, dtype=first.dtype, device=first.device)
    return flat.set_(first.untyped_storage(), start, (end - start,), (1,))


class _BufferViews:
    """The views a GradBuffer handed out over one buffer, held weakly, for an O(n) identity check."""

    def __init__(self, buffer: torch.Tensor, views: list[torch.Tensor]) -> None:
        self.buffer = weakref.ref(buffer)
        self.views = [weakref.ref(view) for view in views]

    def matches(self, base: torch.Tensor, tensors: list[torch.Tensor]) -> bool:
        return (
            self.buffer() is base
            and len(tensors) == len(self.views)
            and all(t is v() for t, v in zip(tensors, self.views))
        )


# id(buffer) -> its views. Nothing here keeps a tensor alive; an entry leaves with its buffer.
_REGISTERED_VIEWS: dict[int, _BufferViews] = {}


def register_views(buffer: torch.Tensor, views: list[torch.Tensor]) -> None:
    """Let single_buffer accept exactly these views of ``buffer`` without re-checking offsets."""
    key = id(buffer)
    _REGISTERED_VIEWS[key] = _BufferViews(buffer, views)
    weakref.finalize(buffer, _REGISTERED_VIEWS.pop, key, None)
