"""The plan: a list of gradients as the kernels see it, decided once and reused while it stays the same.

Every function that measures or changes gradients starts here.
:func:`plan_for` turns ``parameters`` (or, for :func:`gradclip.get_total_norm`,
the tensors themselves) into a :class:`Plan`: the distinct tensors, grouped by
(device, dtype), DTensors apart by (mesh, placements), with the flat buffer a
:class:`gradclip.GradBuffer` made, and the kernel choices for each group
(torch's foreach kernels or a loop; on the CPU, which small tensors are normed
together as one concatenation). The norm (:mod:`gradclip._norms`,
:mod:`gradclip.distributed`) and the scaling (:mod:`gradclip._scaling`) only
read the plan.

**Reuse.** Building a plan reads every tensor's metadata and checks it (dense,
real for the entrywise rules), which costs as much as the kernels of a small
model. So the layout of a plan (which tensor goes in which group, with which
kernel) is kept, at most :data:`CACHE_SIZE` of them, and reused when the same
call comes again:

* the same gradient objects as last time (``zero_grad(set_to_none=False)``,
  a :class:`gradclip.GradBuffer`): checked by identity through weak
  references, so nothing here keeps a gradient alive;
* new gradient objects (torch's default ``zero_grad()``), when every one has
  the type, dtype, device, layout and shape the plan was made for (one pass
  over the metadata). Anything else (a gradient replaced by one of another
  dtype, device, type, layout or shape, one that became ``None``, a parameter
  added) builds a new plan.

A gradient changed in place (``resize_``, ``set_``) keeps its plan: the
kernels take whatever shape it has, so its norm and scaling stay right; only
for the inf-norm, a gradient emptied in place raises torch's error about the
max of an empty tensor.

Plans of DTensors are not kept (their placements would have to be compared on
every call; their collectives cost more than building the plan). While
``torch.compile`` traces, nothing is kept either: the plan is built in the
traced code, so the compiled graph holds it, and dynamo guards on the same
metadata (types, dtypes, devices, shapes) instead of identities, so new
gradient objects every step do not recompile.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from . import _norms, _validate

GroupKey = tuple[torch.device, torch.dtype]

# On the CPU, torch's foreach norm is a loop of one kernel per tensor. Below
# this size a tensor is cheaper to copy into one concatenated buffer and
# reduce there with a single kernel; above it the copy costs more than the
# kernel launch it saves (measured with benchmarks/bench_core.py).
CPU_CONCAT_MAX_NUMEL = 256

# How many plan layouts are kept (a training loop clips one or two parameter lists; a GAN two).
CACHE_SIZE = 8


class Sharding(NamedTuple):
    """What a group of DTensors shares, and their local shards."""

    mesh: Any
    placements: tuple[Any, ...]
    tensors: list[torch.Tensor]
    buffer: torch.Tensor | None


class Group(NamedTuple):
    """Tensors of one device and dtype, the flat buffer they tile, if any, and how the kernels take them.

    ``sharding`` is ``None`` for plain tensors. A group of DTensors (same
    device, dtype, mesh and placements) keeps the DTensors in ``tensors``, has
    no ``buffer``, and a :class:`Sharding` with their local shards; see
    :func:`local`.

    The kernel choices, made with the plan: ``batched``, whether torch's
    foreach kernels take the (local) tensors; ``small``, on the CPU with
    ``foreach=None``, the tensors of 1 to :data:`CPU_CONCAT_MAX_NUMEL` entries
    whose norms are taken as one concatenation (``None``: none); ``large``,
    the other non-empty tensors, each normed on its own (``None``: all of
    ``tensors``, local shards for DTensors). A flat buffer is normed and
    scaled alone, with one kernel each.
    """

    device: torch.device
    dtype: torch.dtype
    tensors: list[torch.Tensor]
    buffer: torch.Tensor | None
    sharding: Sharding | None = None
    batched: bool = False
    small: list[torch.Tensor] | None = None
    large: list[torch.Tensor] | None = None

    def targets(self) -> tuple[list[torch.Tensor], bool]:
        """What to act on in place, and whether with foreach kernels: the buffer alone, or the (local) tensors."""
        if self.buffer is not None:
            return [self.buffer], False
        if self.sharding is not None:
            return self.sharding.tensors, self.batched
        return self.tensors, self.batched

    def norm_targets(self) -> list[torch.Tensor]:
        """The non-empty tensors normed one by one (all but ``small``; the buffer when there is one)."""
        if self.buffer is not None:
            return [self.buffer]
        if self.large is not None:
            return self.large
        return self.sharding.tensors if self.sharding is not None else self.tensors


class NormWork(NamedTuple):
    """What the norm kernels take from one group: ``small`` (normed as one concatenation, or None) and ``targets`` (one norm each)."""

    device: torch.device
    small: list[torch.Tensor] | None
    targets: list[torch.Tensor]
    batched: bool
    dtype: torch.dtype  # the tensors' dtype


class ScaleWork(NamedTuple):
    """What an in-place factor acts on in one group: ``targets``, with foreach kernels or not, a factor in ``dtype``."""

    group: Group
    targets: list[torch.Tensor]
    batched: bool
    dtype: torch.dtype  # the accumulation dtype, in which the multiply is computed


class Plan:
    """The distinct tensors of one call and their groups, in order: plain groups first, then DTensor groups.

    Iterating a plan gives its groups, so code written for a list of groups takes a plan.

    Attributes:
        tensors: the distinct tensors (gradients, for ``parameters``), in order of first appearance.
        groups: the :class:`Group` list.
        device: the first tensor's device (where a global norm is returned), or ``None`` for no tensor.
        dtypes: the groups' dtypes.
        distributed: whether some group holds DTensors.
        output_dtype: the dtype a global norm of these tensors is returned in.
        narrow: whether every group accumulates in less than float64 (a plain float64 combine is exact).
        norm_work: per group, what the norm kernels take (:class:`NormWork`; empty groups left out).
        scale_work: per group, what a factor acts on (:class:`ScaleWork`).
    """

    __slots__ = ("tensors", "groups", "device", "dtypes", "distributed", "output_dtype", "narrow",
                 "norm_work", "scale_work")

    def __init__(self, tensors: list[torch.Tensor], groups: list[Group],
                 dtype_facts: tuple[torch.dtype, bool, list[torch.dtype]] | None = None) -> None:
        self.tensors = tensors
        self.groups = groups
        self.device = tensors[0].device if tensors else None
        self.dtypes = [group.dtype for group in groups]
        self.distributed = any(group.sharding is not None for group in groups)
        self.output_dtype, self.narrow, factor_dtypes = dtype_facts or _dtype_facts(self.dtypes)
        self.norm_work = []
        for group in groups:
            targets = group.norm_targets()
            if group.buffer is not None and not group.buffer.numel():
                targets = []
            if group.small or targets:
                self.norm_work.append(NormWork(group.device, group.small, targets,
                                               group.batched and group.buffer is None, group.dtype))
        self.scale_work = [ScaleWork(group, *group.targets(), dtype) for group, dtype in zip(groups, factor_dtypes)]

    def __iter__(self) -> Iterator[Group]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __bool__(self) -> bool:
        return bool(self.groups)

    def __repr__(self) -> str:
        return f"Plan({len(self.tensors)} tensors in groups {[(g.device, g.dtype, len(g.tensors)) for g in self.groups]})"


def _dtype_facts(dtypes: list[torch.dtype]) -> tuple[torch.dtype, bool, list[torch.dtype]]:
    """(output dtype, narrow, accumulation dtype per group): asked of the norms once per plan layout."""
    accumulation = [_norms.accumulation_dtype(dtype) for dtype in dtypes]
    return _norms.output_dtype(dtypes), all(dtype != torch.float64 for dtype in accumulation), accumulation


# --- the entry point ------------------------------------------------------------------------


def plan_for(checked: _validate.Checked, foreach: bool | None, *, entrywise: str | None = None) -> Plan:
    """The plan for the tensors of a checked call (:func:`gradclip._validate.check_call`).

    Reused as the module docstring says (``foreach`` and ``entrywise`` are
    part of the key); a new plan checks that every tensor is dense and, with
    ``entrywise`` (the name of a function that acts on entries' values), real.

    Raises:
        TypeError: a tensor is not dense, or (with ``entrywise``) complex; the message names it.
        RuntimeError: ``foreach=True`` on a device without foreach kernels.
    """
    tensors = checked.tensors
    if not tensors:
        return Plan([], [])
    if torch.compiler.is_compiling():
        return _build(checked, foreach, entrywise)
    cached = _lookup(tensors, foreach, entrywise)
    if cached is not None:
        return cached
    plan = _build(checked, foreach, entrywise)
    _remember(plan, foreach, entrywise)
    return plan


_SIGNATURE = operator.attrgetter("dtype", "device", "layout", "shape")


def _build(checked: _validate.Checked, foreach: bool | None, entrywise: str | None) -> Plan:
    """Check the tensors and group them (the slow path, and the one ``torch.compile`` traces)."""
    tensors = checked.tensors
    _check(checked, entrywise)
    return Plan(tensors, _group(tensors, foreach))


def _check(checked: _validate.Checked, entrywise: str | None) -> None:
    """Dense (and real, for entrywise rules) tensors, or a ``TypeError`` naming the first that is not."""
    tensors = checked.tensors
    dense = {t.layout for t in tensors} <= {torch.strided}
    real = entrywise is None or not any(t.is_complex() for t in tensors)
    if dense and real:
        return
    for index, tensor in enumerate(tensors):
        label = _label(tensor, checked.items, checked.of_grads, checked.name, index)
        _validate.check_dense_one(tensor, label)
        if entrywise is not None:
            _validate.check_real_one(tensor, label, entrywise)


def _label(tensor: torch.Tensor, items: list[torch.Tensor], of_grads: bool, name: str, index: int) -> str:
    """How an error names ``tensor``: ``parameters[3].grad`` by the parameter's own index, or ``tensor 3``."""
    if not of_grads:
        return f"tensor {index}"
    position = next(i for i, item in enumerate(items) if item.grad is tensor)
    return f"{name}[{position}].grad"


def _group(tensors: list[torch.Tensor], foreach: bool | None) -> list[Group]:
    """Group by (device, dtype), find flat buffers (not with ``foreach=False``) and choose the kernels.

    DTensors (``torch.distributed.tensor.DTensor``, e.g. the gradients of
    ``fully_shard``) are grouped apart, by (device, dtype, mesh, placements),
    after the plain tensors; see :class:`Group`.
    """
    dtensor = _validate.dtensor_types(tensors)
    if dtensor is not None:
        return _groups_with_dtensors(tensors, foreach, dtensor)
    return [_plain_group(device, dtype, members, foreach)
            for (device, dtype), members in by_device_and_dtype(tensors).items()]


def _plain_group(device: torch.device, dtype: torch.dtype, tensors: list[torch.Tensor],
                 foreach: bool | None) -> Group:
    buffer = None if foreach is False else single_buffer(tensors)
    if buffer is not None:
        return Group(device, dtype, tensors, buffer)
    batched = use_foreach(tensors, device, foreach)
    sizes = [t.numel() for t in tensors]
    small = None
    if batched and device.type == "cpu" and foreach is None:
        concat = [t for t, n in zip(tensors, sizes) if 0 < n <= CPU_CONCAT_MAX_NUMEL]
        if len(concat) > 1:
            small = concat
    if small is None and all(sizes):
        return Group(device, dtype, tensors, None, None, batched, None, None)
    limit = CPU_CONCAT_MAX_NUMEL if small is not None else 0
    large = [t for t, n in zip(tensors, sizes) if n > limit]
    return Group(device, dtype, tensors, None, None, batched, small, large)


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
    groups = _group(plain, foreach) if plain else []
    for (device, dtype, mesh, placements), (whole, shards) in sharded.items():
        buffer = None if foreach is False else single_buffer(shards)
        nonempty = [s for s in shards if s.numel()]
        groups.append(Group(device, dtype, whole, None, Sharding(mesh, placements, shards, buffer),
                            use_foreach(shards, device, foreach), None,
                            None if len(nonempty) == len(shards) else nonempty))
    return groups


# --- reuse ----------------------------------------------------------------------------------


class _Layout(NamedTuple):
    """One group of a kept plan, by positions in the plan's tensor list (``None``: all of them)."""

    device: torch.device
    dtype: torch.dtype
    members: tuple[int, ...] | None
    buffer: weakref.ReferenceType | None  # only for plans reused on the same tensor objects
    partial: bool  # the buffer holds other views too (a GradBuffer vouched that they held zeros): ask again
    batched: bool
    small: tuple[int, ...] | None
    large: tuple[int, ...] | None


class _Kept(NamedTuple):
    foreach: bool | None
    entrywise: str | None
    refs: list[weakref.ReferenceType]
    types: list[type]
    signature: list[tuple[torch.dtype, torch.device, torch.layout, torch.Size]]
    layouts: list[_Layout]
    dtype_facts: tuple[torch.dtype, bool, list[torch.dtype]]


_KEPT: list[_Kept] = []  # most recently used first


def _lookup(tensors: list[torch.Tensor], foreach: bool | None, entrywise: str | None) -> Plan | None:
    """The kept plan for these tensors, bound to them, or None."""
    candidates = [kept for kept in _KEPT if len(kept.refs) == len(tensors) and kept.foreach is foreach
                  and kept.entrywise == entrywise]
    if not candidates:
        return None
    for kept in candidates:  # the same tensor objects: the plan holds as it is, buffers included
        if all(map(operator.is_, tensors, map(_DEREF, kept.refs))):
            return _bind(kept, tensors, same_objects=True)
    types = list(map(type, tensors))
    signature = list(map(_SIGNATURE, tensors))
    for kept in candidates:
        if kept.types == types and kept.signature == signature and all(
                layout.buffer is None for layout in kept.layouts):
            return _bind(kept, tensors, same_objects=False)
    return None


_DEREF = weakref.ref.__call__


def _bind(kept: _Kept, tensors: list[torch.Tensor], same_objects: bool) -> Plan | None:
    """The kept layout with these tensors in it, or None where it cannot hold.

    New tensor objects never take a kept flat buffer; and when two of a
    group's new tensors share a storage (a GradBuffer's views), the group may
    tile a buffer the kept layout lacks, so a new plan is built.
    """
    groups = []
    for layout in kept.layouts:
        members = tensors if layout.members is None else [tensors[i] for i in layout.members]
        buffer = None
        if layout.buffer is not None:
            buffer = layout.buffer()
            if buffer is None or not same_objects:
                return None
            if layout.partial and not _REGISTERED_VIEWS[id(buffer)].matches(buffer, members):
                return None  # the gradients between these views are no longer known zeros
        elif (not same_objects and kept.foreach is not False and len(members) > 1
              and _same_storage(members[0], members[-1])):
            return None
        small = None if layout.small is None else [tensors[i] for i in layout.small]
        large = None if layout.large is None else [tensors[i] for i in layout.large]
        groups.append(Group(layout.device, layout.dtype, members, buffer, None, layout.batched, small, large))
    return Plan(tensors, groups, kept.dtype_facts)


def _same_storage(first: torch.Tensor, last: torch.Tensor) -> bool:
    return first.untyped_storage().data_ptr() == last.untyped_storage().data_ptr()


def _remember(plan: Plan, foreach: bool | None, entrywise: str | None) -> None:
    """Keep the layout of a plan of plain tensors (not DTensors: see the module docstring).

    A flat buffer is kept only when a :class:`gradclip.GradBuffer` registered it (it lives as long
    as the buffer); one found by comparing storage offsets is a view made for this call.
    """
    if plan.distributed or any(group.buffer is not None and id(group.buffer) not in _REGISTERED_VIEWS
                               for group in plan.groups):
        return
    tensors = plan.tensors
    position = {id(t): i for i, t in enumerate(tensors)}

    def positions(members: list[torch.Tensor] | None) -> tuple[int, ...] | None:
        return None if members is None else tuple(position[id(t)] for t in members)

    layouts = []
    for group in plan.groups:
        members = None if len(plan.groups) == 1 else positions(group.tensors)
        buffer = None if group.buffer is None else weakref.ref(group.buffer)
        partial = buffer is not None and len(group.tensors) != len(_REGISTERED_VIEWS[id(group.buffer)].views)
        layouts.append(_Layout(group.device, group.dtype, members, buffer, partial, group.batched,
                               positions(group.small), positions(group.large)))
    kept = _Kept(foreach, entrywise, [weakref.ref(t) for t in tensors], list(map(type, tensors)),
                 list(map(_SIGNATURE, tensors)), layouts,
                 (plan.output_dtype, plan.narrow, [work.dtype for work in plan.scale_work]))
    _KEPT.insert(0, kept)
    del _KEPT[CACHE_SIZE:]


def forget_plans() -> None:
    """Drop every kept plan layout (for tests, and after changing module-level settings)."""
    _KEPT.clear()


# --- helpers the methods share ------------------------------------------------------------------


def local(group: Group) -> Group:
    """The group with its DTensors replaced by their local shards; a plain group as is.

    Scaling or clamping the local shards in place scales or clamps the DTensors,
    with no communication and no DTensor dispatch.
    """
    sharding = group.sharding
    if sharding is None:
        return group
    return group._replace(tensors=sharding.tensors, buffer=sharding.buffer)


def by_device_and_dtype(tensors: list[torch.Tensor]) -> dict[GroupKey, list[torch.Tensor]]:
    """Group tensors by (device, dtype), keeping their order inside each group."""
    if not tensors:
        return {}
    grouped = _group_tensors_by_device_and_dtype([tensors])
    return {key: group_tensors[0] for key, (group_tensors, _) in grouped.items()}


def groups_of(tensors: list[torch.Tensor], foreach: bool | None) -> list[Group]:
    """The groups of already-checked tensors (not kept for reuse): see :func:`plan_for`."""
    return _group(tensors, foreach) if tensors else []


dtensor_type = _validate.dtensor_type


use_foreach = _norms.use_foreach  # which kernels exist is the norms' knowledge; the plan asks once


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
