"""Grouping tensors for batched kernels, spotting gradients that tile one buffer, and the one dispatch."""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch.utils._foreach_utils import (
    _device_has_foreach_support,
    _group_tensors_by_device_and_dtype,
    _has_foreach_support,
)

GroupKey = tuple[torch.device, torch.dtype]


class Sharding(NamedTuple):
    """What a group of DTensors shares, and their local shards."""

    mesh: Any
    placements: tuple[Any, ...]
    tensors: list[torch.Tensor]
    buffer: torch.Tensor | None


class Group(NamedTuple):
    """Tensors of one device and dtype, and the flat buffer they tile, if any.

    ``sharding`` is ``None`` for plain tensors. A group of DTensors (same
    device, dtype, mesh and placements) keeps the DTensors in ``tensors``, has
    no ``buffer``, and a :class:`Sharding` with their local shards; see
    :func:`local`.
    """

    device: torch.device
    dtype: torch.dtype
    tensors: list[torch.Tensor]
    buffer: torch.Tensor | None
    sharding: Sharding | None = None


def local(group: Group) -> Group:
    """The group with its DTensors replaced by their local shards; a plain group as is.

    Scaling or clamping the local shards in place scales or clamps the DTensors,
    with no communication and no DTensor dispatch.
    """
    sharding = group.sharding
    if sharding is None:
        return group
    return Group(group.device, group.dtype, sharding.tensors, sharding.buffer, sharding)


def by_device_and_dtype(tensors: list[torch.Tensor]) -> dict[GroupKey, list[torch.Tensor]]:
    """Group tensors by (device, dtype), keeping their order inside each group."""
    if not tensors:
        return {}
    grouped = _group_tensors_by_device_and_dtype([tensors])
    return {key: group_tensors[0] for key, (group_tensors, _) in grouped.items()}


def groups_of(tensors: list[torch.Tensor], foreach: bool | None) -> list[Group]:
    """Group by (device, dtype) and find flat buffers (not when ``foreach=False``).

    DTensors (``torch.distributed.tensor.DTensor``, e.g. the gradients of
    ``fully_shard``) are grouped apart, by (device, dtype, mesh, placements),
    after the plain tensors; see :class:`Group`.
    """
    dtensor = dtensor_type()
    if dtensor is not None and any(issubclass(kind, dtensor) for kind in {type(t) for t in tensors}):
        return _groups_with_dtensors(tensors, foreach, dtensor)
    return [
        Group(device, dtype, group, None if foreach is False else single_buffer(group))
        for (device, dtype), group in by_device_and_dtype(tensors).items()
    ]


_DTENSOR: Any = None


def dtensor_type() -> Any:
    """``torch.distributed.tensor.DTensor`` if that module was imported, else None.

    No DTensor can exist before ``torch.distributed.tensor`` is imported, so the
    single-process path costs one dictionary look-up and imports nothing.
    """
    global _DTENSOR
    if _DTENSOR is None:
        module = sys.modules.get("torch.distributed.tensor")
        _DTENSOR = getattr(module, "DTensor", None) if module is not None else None
    return _DTENSOR


def _groups_with_dtensors(tensors: list[torch.Tensor], foreach: bool | None, dtensor: Any) -> list[Group]:
    plain: list[torch.Tensor] = []
    sharded: dict[tuple[Any, ...], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for tensor in tensors:
        if isinstance(tensor, dtensor):
            shard = tensor.to_local()
            key = (shard.device, shard.dtype, tensor.device_mesh, tuple(tensor.placements))
            whole, shards = sharded.setdefault(key, ([], []))
            whole.append(tensor)
            shards.append(shard)
        else:
            plain.append(tensor)
    groups = groups_of(plain, foreach) if plain else []
    for (device, dtype, mesh, placements), (whole, shards) in sharded.items():
        buffer = None if foreach is False else single_buffer(shards)
        groups.append(Group(device, dtype, whole, None, Sharding(mesh, placements, shards, buffer)))
    return groups


def use_foreach(tensors: list[torch.Tensor], device: torch.device, foreach: bool | None) -> bool:
    """torch's rule: None picks foreach where supported, True insists on it."""
    if foreach is None:
        return _has_foreach_support(tensors, device)
    if foreach and not _device_has_foreach_support(device):
        raise RuntimeError(f"foreach=True was passed, but can't use the foreach API on {device.type} tensors")
    return foreach


def targets(group: Group, foreach: bool | None) -> tuple[list[torch.Tensor], bool]:
    """What to act on in place for one group, and whether to use the foreach kernels.

    The flat buffer alone when the group tiles one (one kernel for everything),
    else the group's tensors (DTensors replaced by their local shards).
    """
    group = local(group)
    if group.buffer is not None:
        return [group.buffer], False
    return group.tensors, use_foreach(group.tensors, group.device, foreach)


def apply_(tensors: list[torch.Tensor], batched: bool, op: str, *args: Any) -> None:
    """The one dispatch of an in-place op: ``torch._foreach_<op>_`` when batched, else ``t.<op>_`` per tensor.

    An argument is shared by every tensor, or is a list with one entry per tensor.
    """
    if batched:
        getattr(torch, f"_foreach_{op}_")(tensors, *args)
        return
    for index, tensor in enumerate(tensors):
        getattr(tensor, f"{op}_")(*(arg[index] if isinstance(arg, list) else arg for arg in args))


def single_buffer(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """A 1-D view of the storage that the tensors tile exactly, or None.

    When every tensor is a contiguous view into one storage and together they
    cover one contiguous span without gaps or overlaps (what
    :class:`gradclip.GradBuffer` sets up), one kernel over the span does the
    work of one kernel per tensor. Only host metadata is read: no sync.
    """
    if len(tensors) < 2 or torch.compiler.is_compiling():
        return None  # storage pointers are not traceable; a compiled graph fuses the kernels anyway
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
    """The views a GradBuffer handed out over one buffer, held weakly, for an O(n) identity check.

    ``covers``, from the GradBuffer: whether some of the views (parameters that got no gradient
    leave gaps) cover the buffer with only zeros between them, so one kernel over it still fits.
    """

    def __init__(self, buffer: torch.Tensor, views: list[torch.Tensor],
                 covers: Callable[[list[torch.Tensor]], bool] | None = None) -> None:
        self.buffer = weakref.ref(buffer)
        self.views = [weakref.ref(view) for view in views]
        self.covers = covers

    def matches(self, base: torch.Tensor, tensors: list[torch.Tensor]) -> bool:
        if self.buffer() is not base:
            return False
        if len(tensors) == len(self.views) and all(t is v() for t, v in zip(tensors, self.views)):
            return True
        return self.covers is not None and self.covers(tensors)


# id(buffer) -> its views. Nothing here keeps a tensor alive; an entry leaves with its buffer.
_REGISTERED_VIEWS: dict[int, _BufferViews] = {}


def register_views(buffer: torch.Tensor, views: list[torch.Tensor],
                   covers: Callable[[list[torch.Tensor]], bool] | None = None) -> None:
    """Let single_buffer accept these views of ``buffer`` without re-checking offsets (some of them, if ``covers`` says so)."""
    key = id(buffer)
    _REGISTERED_VIEWS[key] = _BufferViews(buffer, views, covers)
    weakref.finalize(buffer, _REGISTERED_VIEWS.pop, key, None)
