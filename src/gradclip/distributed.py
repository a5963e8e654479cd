r"""Global gradient norms over ``torch.distributed``: sharded, replicated and DTensor gradients.

When a model is split across processes, the norm that clipping needs is the
norm of the *whole* gradient, not of the shard a rank holds:

.. math::

    \begin{aligned}
    \|g\|_p &= \Big(\sum_{r=0}^{R-1} \sum_{i \in S_r} \|g_i\|_p^p
               + \sum_{i \in \mathcal{R}} \|g_i\|_p^p\Big)^{1/p}, \\
    \|g\|_\infty &= \max\Big(\max_r \max_{i \in S_r} \|g_i\|_\infty,\;
                             \max_{i \in \mathcal{R}} \|g_i\|_\infty\Big)
    \end{aligned}

where :math:`S_r` are the gradients (or gradient shards) held by rank
:math:`r` only, and :math:`\mathcal{R}` those that every rank holds an
identical copy of (replicated parameters, counted once). Each rank computes
its partial sum of :math:`\|g_i\|_p^p` (the max, for :math:`p=\infty`)
in float64, one all-reduce (``SUM``, or ``MAX``) combines them, the replicated
part is added locally after the all-reduce (it is the same on every rank, so
it costs no communication), and every rank takes the same root. This is the
recipe of Megatron-LM (Shoeybi et al. 2019, `arXiv:1909.08053
<https://arxiv.org/abs/1909.08053>`__) and of PyTorch FSDP (Zhao et al. 2023,
`arXiv:2304.11277 <https://arxiv.org/abs/2304.11277>`__).

You rarely call this module directly: the public functions take the keywords.

* DTensor gradients (what ``torch.distributed.fsdp.fully_shard`` and tensor
  parallelism produce) need nothing: :func:`gradclip.clip_grad_norm_`,
  :func:`gradclip.get_total_norm` and the clippers read each mesh
  dimension's placement, by its exact type, and reduce accordingly:

  - ``Shard(d)`` and ``_StridedShard(d, split_factor)`` (``fully_shard`` of a
    parameter that tensor parallelism already sharded on ``d``: the
    ``"dp"`` dimension of a 2-D ``("dp", "tp")`` mesh): the ranks hold
    disjoint pieces, so :math:`\|g\|_p^p` is summed (the max taken, for
    :math:`p=\infty`) over that dimension's ranks;
  - ``Replicate()``: the ranks hold identical copies, counted once, no
    communication;
  - ``Partial(op)`` for ``op`` in ``sum``, ``avg``, ``max``, ``min``,
    ``product``, and ``_MaskPartial`` (a row-wise sharded embedding's
    output, masked first, on a copy): the ranks hold operands of the full
    values, so the values are first all-reduced with ``op`` over that
    dimension (one extra all-reduce of those gradients), which is then
    treated as ``Replicate``.

  Any other placement (a custom ``Placement`` subclass, ``_NormPartial``,
  a bitwise ``Partial``) raises ``ValueError`` rather than give a wrong
  norm: gradclip cannot tell whether its local values are disjoint pieces;
  redistribute such gradients to ``Shard`` or ``Replicate``. Elementwise
  clipping (:func:`gradclip.clip_grad_value_`) acts on the local values of
  ``Shard``, ``_StridedShard`` and ``Replicate`` gradients and refuses the
  partial ones. The norm comes back as a plain tensor, equal on every rank.
* Manually sharded plain tensors: pass ``process_group=`` (a
  ``ProcessGroup``, a 1-D ``DeviceMesh``, or :data:`WORLD`/``True`` for the
  default group) and mark the parameters every rank holds a copy of with
  ``replicated=``.
* Under ``DistributedDataParallel`` every rank holds the full, already
  averaged gradient: clip as on one process, *without* ``process_group``
  (which would count every gradient once per rank).

Every rank must make the call, with the same ``norm_type``, as for any
collective. Nothing here reads a tensor's value on the host: the all-reduce is
a collective, not a host-device synchronisation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from . import _groups, _norms
from ._norms import accumulation_dtype

__all__ = ["WORLD", "global_norm", "mean_over_ranks", "replicated_ids", "resolve_process_group", "sharded_tensor_norms"]

WORLD: Any = "WORLD"
"""``process_group=WORLD`` (or ``True``): reduce over the default process group."""

# The partial sums travel in float64 (float32 where the device has no float64):
# the same dtype on every rank whatever gradients it holds, and no overflow of
# ||g||^p for float32 norms above 1e19.
_REDUCE_DTYPE = torch.float64


def resolve_process_group(process_group: Any) -> Any:
    """The ``ProcessGroup`` that ``process_group`` names, or None for no reduction.

    Accepts None or False (no reduction), True or :data:`WORLD` (the default
    group), a ``ProcessGroup``, or a one-dimensional ``DeviceMesh``.

    Raises:
        RuntimeError: a group is asked for but ``torch.distributed`` is not initialized.
        TypeError: ``process_group`` is none of the above.
    """
    if process_group is None or process_group is False:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "process_group was given but torch.distributed is not initialized: call "
            "torch.distributed.init_process_group(...) first (or torchrun), or drop process_group"
        )
    if process_group is True or (isinstance(process_group, str) and process_group == WORLD):
        return dist.group.WORLD
    if isinstance(process_group, dist.ProcessGroup):
        return process_group
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(process_group, DeviceMesh):
        if process_group.ndim != 1:
            raise ValueError(
                f"process_group as a DeviceMesh must be 1-D, got {process_group.ndim}-D; pass "
                "mesh[dim_name] for the dimension the parameters are sharded over"
            )
        return process_group.get_group()
    raise TypeError(
        "process_group must be None, True, gradclip.distributed.WORLD, a ProcessGroup or a "
        f"1-D DeviceMesh, got {type(process_group).__name__}"
    )


def replicated_ids(replicated: Iterable[torch.Tensor] | torch.Tensor | None) -> set[int]:
    """``id`` of every tensor in ``replicated`` and of its ``.grad``, if any.

    Parameters and gradients are both accepted, so ``replicated=[model.bias]``
    marks ``model.bias.grad``.
    """
    if replicated is None:
        return set()
    if isinstance(replicated, torch.Tensor):
        replicated = [replicated]
    ids: set[int] = set()
    for index, item in enumerate(replicated):
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"replicated[{index}] must be a torch.Tensor, got {type(item).__name__}")
        ids.add(id(item))
        if item.grad is not None:
            ids.add(id(item.grad))
    return ids


def _reduce_device(process_group: Any, preferred: torch.device | None) -> torch.device:
    """A device the group's backend can all-reduce on: ``preferred`` when it can."""
    if preferred is not None and preferred.type != "cpu":
        return preferred
    import torch.distributed as dist

    backend = str(dist.get_backend(process_group)).lower()
    if any(name in backend for name in ("gloo", "mpi", "ucc")) or not torch.cuda.is_available():
        return preferred if preferred is not None else torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def mean_over_ranks(value: torch.Tensor, process_group: Any) -> torch.Tensor:
    """The mean of a 0-dim tensor over the ranks of ``process_group`` (one ``all_reduce``; no host sync).

    ``process_group``: as :func:`resolve_process_group` accepts; ``None`` returns ``value`` unchanged.
    The sum is taken in float64 (float32 on MPS) on a device the group's backend can reduce on
    (``value``'s own when it is an accelerator); the mean is returned on ``value``'s device.

    Raises:
        RuntimeError: a group is asked for but ``torch.distributed`` is not initialized.
        TypeError: ``process_group`` is none of the accepted kinds.

    Example:
        >>> mean_over_ranks(torch.tensor(2.5), None)
        tensor(2.5000)
    """
    group = resolve_process_group(process_group)
    if group is None:
        return value
    import torch.distributed as dist

    device = _reduce_device(group, value.device)
    total = value.detach().to(device=device, dtype=_reduce_dtype(device)).reshape(()).clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return (total / dist.get_world_size(group)).to(device=value.device, dtype=value.dtype)


def _reduce_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else _REDUCE_DTYPE


def _local_partial(group: _groups.Group, p: float, device: torch.device) -> torch.Tensor:
    """Sum of ||g_i||_p^p (max of ||g_i||_inf for p = inf) over one group, a 0-dim tensor."""
    norms = _norms.group_norms(group, p).to(device=device, dtype=_reduce_dtype(device))
    return norms.max() if math.isinf(p) else norms.pow(p).sum()


def _part(group: _groups.Group, tensors: list[torch.Tensor]) -> _groups.Group:
    """A plain group of some of ``group``'s tensors (its kernel choice kept; empty tensors apart)."""
    nonempty = [t for t in tensors if t.numel()]
    return group._replace(tensors=tensors, buffer=None, sharding=None, small=None,
                          large=None if len(nonempty) == len(tensors) else nonempty)


# DTensor placements, by exact type: what a rank's local values are on that mesh dimension.
SHARD, REPLICATE, PARTIAL, MASK_PARTIAL = "shard", "replicate", "partial", "mask_partial"
_KNOWN_PLACEMENTS: dict[type, str] | None = None

# Partial reduce ops -> the ReduceOp that turns the local values into full values ("avg" divides after).
_PARTIAL_OPS = {"sum": "SUM", "avg": "SUM", "max": "MAX", "min": "MIN", "product": "PRODUCT"}


def _known_placements() -> dict[type, str]:
    """Every placement class gradclip can reduce, mapped to its kind; looked up once, by exact type.

    Exact types, not ``isinstance`` nor ``is_shard()``: torch's private
    placements change their base classes between releases (``_StridedShard``
    subclassed ``Shard`` in older releases, not in 2.13, where its ``is_shard()``
    is False), and a subclass may redefine what the local values are
    (``_NormPartial`` holds local norms, not summands).
    """
    global _KNOWN_PLACEMENTS
    if _KNOWN_PLACEMENTS is None:
        import importlib

        modules = [getattr(torch._C, "_distributed", None)]
        for name in ("torch.distributed.tensor.placement_types",
                     "torch.distributed.tensor._ops._embedding_ops"):  # _MaskPartial's home in older torch
            try:
                modules.append(importlib.import_module(name))
            except ImportError:
                pass
        names = {"Shard": SHARD, "_StridedShard": SHARD, "StridedShard": SHARD, "Replicate": REPLICATE,
                 "Partial": PARTIAL, "_Partial": PARTIAL, "_MaskPartial": MASK_PARTIAL}
        known: dict[type, str] = {}
        for module in modules:
            for name, kind in names.items():
                cls = getattr(module, name, None)
                if isinstance(cls, type):
                    known.setdefault(cls, kind)
        _KNOWN_PLACEMENTS = known
    return _KNOWN_PLACEMENTS


def placement_kinds(placements: Any, what: str = "gradclip") -> tuple[str, ...]:
    """The kind of each placement: ``"shard"``, ``"replicate"``, ``"partial"`` or ``"mask_partial"``.

    * ``Shard(d)`` and ``_StridedShard(d, split_factor)`` (what ``fully_shard``
      gives a parameter that tensor parallelism already sharded on ``d``):
      the ranks of that mesh dimension hold disjoint pieces of the tensor.
    * ``Replicate()``: they hold identical copies.
    * ``Partial(op)`` and ``_MaskPartial``: they hold summands (operands of
      ``op``) of the full values.

    Raises:
        ValueError: a placement of any other type (a custom ``Placement``,
            ``_NormPartial``, a subclass of the above), whose local values
            gradclip cannot interpret.
    """
    known = _known_placements()
    kinds = []
    for dim, placement in enumerate(placements):
        kind = known.get(type(placement))
        if kind is None:
            cls = type(placement)
            raise ValueError(
                f"{what} does not know the DTensor placement {placement!r} "
                f"({cls.__module__}.{cls.__qualname__}) on mesh dimension {dim}: it cannot tell whether "
                "its local values are disjoint pieces of the tensor (Shard), copies (Replicate) or "
                "summands (Partial), so the result would be wrong. Redistribute these gradients to "
                "Shard or Replicate placements first, e.g. grad.redistribute(grad.device_mesh, "
                "[Shard(0)] * grad.device_mesh.ndim), or use torch.nn.utils on full_tensor()."
            )
        kinds.append(kind)
    return tuple(kinds)


def _mask_partial_values(dtensors: list[Any], shards: list[torch.Tensor], dims: list[int]) -> list[torch.Tensor]:
    """Local values of ``_MaskPartial`` DTensors with their masked entries zeroed, as reduction does.

    ``_MaskPartial`` (a row-wise sharded embedding's output) keeps, until it
    is reduced, the mask of the lookups that fell outside this rank's rows;
    those entries are garbage until masked. Each DTensor has its own mask
    (equal placements compare equal whatever the mask), so it is read from
    each DTensor's own placement, on a copy: the mask stays for the real
    reduction.
    """
    values = []
    for dtensor, shard in zip(dtensors, shards):
        shard = shard.clone()
        for dim in dims:
            placement = dtensor.placements[dim]
            buffer = getattr(placement, "mask_buffer", None)
            if buffer is None or getattr(buffer, "data", None) is None:
                raise ValueError(
                    f"{placement!r} DTensor whose mask is not materialized (already reduced, or never "
                    "computed): its local values are not summands. Redistribute it to Shard or Replicate first."
                )
            buffer.apply_mask(shard)
        values.append(shard)
    return values


def _sum_partial_shards(
    group: _groups.Group, dtensors: list[Any], kinds: tuple[str, ...]
) -> tuple[_groups.Group, tuple[str, ...]]:
    """Reduce the partial mesh dimensions of a local DTensor group to full values (one all-reduce each).

    ``dtensors`` are the group's DTensors (for the masks of ``_MaskPartial``);
    the kinds come back with those dimensions marked replicated.
    """
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    assert group.sharding is not None
    mesh, placements = group.sharding.mesh, group.sharding.placements
    tensors = group.tensors
    masked = [dim for dim, kind in enumerate(kinds) if kind == MASK_PARTIAL]
    values = _mask_partial_values(dtensors, tensors, masked) if masked and tensors else tensors
    flat = _flatten_dense_tensors(values) if values else torch.zeros(0, dtype=group.dtype, device=group.device)
    flat = flat.to(accumulation_dtype(group.dtype), copy=True)
    new_kinds = list(kinds)
    for dim, kind in enumerate(kinds):
        if kind not in (PARTIAL, MASK_PARTIAL):
            continue
        reduce_op = str(getattr(placements[dim], "reduce_op", "sum"))
        if reduce_op not in _PARTIAL_OPS:
            raise ValueError(
                f"cannot take the norm of a DTensor gradient with placement {placements[dim]!r}: reduce op "
                f"{reduce_op!r} is none of {sorted(_PARTIAL_OPS)} (bitwise ops apply to integer tensors, "
                "which have no norm). Redistribute it to Shard or Replicate first."
            )
        dim_group = mesh.get_group(dim)
        dist.all_reduce(flat, op=getattr(dist.ReduceOp, _PARTIAL_OPS[reduce_op]), group=dim_group)
        if reduce_op == "avg":
            flat.div_(dist.get_world_size(dim_group))
        new_kinds[dim] = REPLICATE
    full = list(_unflatten_dense_tensors(flat, tensors)) if tensors else []
    return _part(group._replace(dtype=flat.dtype), full), tuple(new_kinds)


def _all_reduce(value: torch.Tensor, groups: tuple[Any, ...], inf: bool) -> torch.Tensor:
    """All-reduce a 1-D vector of partials over each group in turn; NaN survives a MAX."""
    import torch.distributed as dist

    if not groups:
        return value
    if inf:
        # MAX implementations may drop NaN (std::max); carry a NaN flag beside each max.
        nan = value.isnan()
        packed = torch.cat([torch.where(nan, 0.0, value), nan.to(value.dtype)])
        for group in groups:
            dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
        half = value.numel()
        return torch.where(packed[half:] > 0, math.nan, packed[:half])
    value = value.clone()
    for group in groups:
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return value


def _reduce_buckets(keys: list[tuple[Any, ...]], values: list[torch.Tensor], inf: bool) -> list[torch.Tensor]:
    """Reduce each 0-dim partial in ``values`` over the process groups of its key, one collective per group.

    The partials reduced over the same process group travel together, in one
    vector: with gradients placed ``(_StridedShard, Shard)`` and ``(Shard,
    Replicate)`` on a ("dp", "tp") mesh the two partials reduce over "dp" in
    one all-reduce and the first over "tp" in another, two collectives as the
    docstring of :func:`global_norm` promises (one per bucket would make three).
    The order of the groups is the order of first appearance, the same on
    every rank.
    """
    order: list[Any] = []
    for key in keys:
        for group in key:
            if not any(group is seen for seen in order):
                order.append(group)
    values = list(values)
    for group in order:
        members = [i for i, key in enumerate(keys) if any(group is k for k in key)]
        device = values[members[0]].device
        reduced = _all_reduce(torch.stack([values[i].to(device) for i in members]), (group,), inf)
        for position, i in enumerate(members):
            values[i] = reduced[position]
    return values


def global_norm(
    groups: list[_groups.Group],
    p: float,
    foreach: bool | None,
    first_device: torch.device | None,
    process_group: Any = None,
    replicated: Iterable[torch.Tensor] | None = None,
) -> torch.Tensor:
    r"""The p-norm of the gradients of the whole model, the same on every rank.

    The engine behind the ``process_group=`` and ``replicated=`` keywords of
    :func:`gradclip.clip_grad_norm_`, :func:`gradclip.get_total_norm` and
    :func:`gradclip.norms.grouped_norm`, and behind their handling of DTensors.
    With :math:`S_r` the tensors only rank r holds and :math:`\mathcal{R}` the
    replicated ones,

    .. math::

        \|g\|_p = \Big(\operatorname{AllReduce}_{\mathrm{SUM}}
        \Big(\sum_{i \in S_r} \|g_i\|_p^p\Big) + \sum_{i \in \mathcal{R}} \|g_i\|_p^p\Big)^{1/p}

    and ``MAX`` instead of the sums for :math:`p = \infty`
    (Megatron-LM, `arXiv:1909.08053 <https://arxiv.org/abs/1909.08053>`__;
    PyTorch FSDP, `arXiv:2304.11277 <https://arxiv.org/abs/2304.11277>`__).

    * Plain tensors count as rank-local when ``process_group`` is given,
      except those in ``replicated``; without ``process_group`` they count
      as replicated (each rank's copy once).
    * DTensor groups (``group.sharding`` set by :func:`gradclip._groups.groups_of`):
      the partial sums of their local shards are all-reduced over the mesh
      dimensions whose placement splits the tensor into disjoint pieces
      (``Shard``, ``_StridedShard``) only, not over ``Replicate`` ones;
      ``Partial`` and ``_MaskPartial`` placements are reduced into full
      values first (one extra all-reduce of those gradients). Other
      placements raise (see :func:`placement_kinds`).
    * Partial sums are reduced in float64 whatever the gradients' dtype
      (float16/bfloat16 norms are first computed in float32), one collective
      per distinct process group (usually exactly one): the partials that
      reduce over the same group travel together in one vector, so gradients
      placed ``(_StridedShard, Shard)`` and ``(Shard, Replicate)`` on a
      ("dp", "tp") mesh make two all-reduces, as torch does. A NaN or inf
      anywhere gives a NaN or inf norm on every rank.
    * A rank holding no gradient still takes part and gets the global norm.

    Args:
        groups: the gradients, as :func:`gradclip._groups.groups_of` groups them.
        p: the norm order, in (0, inf].
        foreach: as in :func:`gradclip.clip_grad_norm_`.
        first_device: where the result goes; ``None`` (no local gradient)
            puts it on a device the group's backend reduces on.
        process_group: None, True, :data:`WORLD`, a ``ProcessGroup`` or a 1-D
            ``DeviceMesh``: the ranks over which plain tensors are sharded.
        replicated: parameters or gradients that every rank of
            ``process_group`` holds identically; counted once.

    Returns:
        A 0-dim plain tensor (never a DTensor), with the same value on every
        rank, in the dtype a single process would give for this rank's
        gradients (float32 when it holds none). Only when float64 gradients
        are sharded by hand onto some ranks and not others do the dtypes, and
        so the float32 roundings, differ between ranks.

    Example:
        >>> import torch
        >>> from gradclip import _groups, distributed
        >>> groups = _groups.groups_of([torch.tensor([3.0]), torch.tensor([4.0])], None)
        >>> distributed.global_norm(groups, 2.0, None, torch.device("cpu"))  # no group: local
        tensor(5.)
    """
    wide = wide_global_norm(groups, p, foreach, first_device, process_group, replicated)
    return wide.to(_norms.output_dtype([group.dtype for group in groups]))


def _local_pieces(group: _groups.Group) -> tuple[_groups.Group, tuple[Any, ...]]:
    """A DTensor group's local pieces (``Partial`` values summed first) and the process groups to reduce over.

    Sums of :math:`|g|^p` are reduced over the mesh dimensions whose ranks hold disjoint pieces
    (``Shard``, ``_StridedShard``) only; replicated dimensions already hold the whole sum.
    """
    kinds = placement_kinds(group.sharding.placements)
    local = _groups.local(group)
    if PARTIAL in kinds or MASK_PARTIAL in kinds:
        local, kinds = _sum_partial_shards(local, group.tensors, kinds)
    mesh = group.sharding.mesh
    return local, tuple(mesh.get_group(dim) for dim, kind in enumerate(kinds) if kind == SHARD)


def wide_global_norm(
    groups: list[_groups.Group],
    p: float,
    foreach: bool | None,
    first_device: torch.device | None,
    process_group: Any = None,
    replicated: Iterable[torch.Tensor] | None = None,
) -> torch.Tensor:
    """:func:`global_norm` in the wide dtype (float64; float32 on MPS), for clipping factors."""
    inf = math.isinf(p)
    pg = resolve_process_group(process_group)
    rep = replicated_ids(replicated) if pg is not None else set()

    # reduce path (a tuple of process groups) -> [device, list of 0-dim partials]
    buckets: dict[tuple[Any, ...], list[Any]] = {}
    if pg is not None:  # every rank makes this collective, with or without gradients
        plain_device = next((g.device for g in groups if g.sharding is None), first_device)
        buckets[(pg,)] = [_reduce_device(pg, plain_device), []]
    local: list[torch.Tensor] = []
    local_device = first_device if first_device is not None else torch.device("cpu")

    for group in groups:
        if group.sharding is None:
            if pg is None:
                local.append(_local_partial(group, p, local_device))
                continue
            mine = [t for t in group.tensors if id(t) not in rep] if rep else group.tensors
            if len(mine) == len(group.tensors):
                buckets[(pg,)][1].append(_local_partial(group, p, buckets[(pg,)][0]))
                continue
            shared = [t for t in group.tensors if id(t) in rep]
            local.append(_local_partial(_part(group, shared), p, local_device))
            if mine:
                buckets[(pg,)][1].append(_local_partial(_part(group, mine), p, buckets[(pg,)][0]))
            continue
        group, key = _local_pieces(group)
        if key not in buckets:
            buckets[key] = [group.device, []]
        buckets[key][1].append(_local_partial(group, p, buckets[key][0]))

    keys, partial_sums = [], []
    for key, (device, partials) in buckets.items():
        keys.append(key)
        if not partials:
            partial_sums.append(torch.zeros((), dtype=_reduce_dtype(device), device=device))
        else:
            stacked = torch.stack(partials)
            partial_sums.append(stacked.max() if inf else stacked.sum())
    totals = _reduce_buckets(keys, partial_sums, inf)
    result_device = first_device if first_device is not None else (
        totals[0].device if totals else local_device)
    values = [t.to(device=result_device, dtype=_reduce_dtype(result_device)) for t in totals + local]
    if not values:
        return torch.zeros((), dtype=_reduce_dtype(result_device), device=result_device)
    stacked = torch.stack(values)
    return stacked.max() if inf else stacked.sum().pow(1.0 / p)


def sharded_tensor_norms(group: _groups.Group, p: float, foreach: bool | None) -> torch.Tensor:
    r"""The p-norm of each full DTensor of one sharded group, a 1-D wide tensor equal on every rank.

    For per-tensor methods (per-tensor and block-RMS clipping, QSGD): each
    rank takes :math:`\|g_i\|_p^p` of its local pieces (the max for
    :math:`p = \infty`), one all-reduce of the whole vector over the mesh
    dimensions that split the tensors (``Shard``, ``_StridedShard``) sums them,
    and every rank takes the root; ``Partial`` values are summed first.
    Every rank of the mesh must call.

    Args:
        group: a group of DTensors, as :func:`gradclip._groups.groups_of` makes them.
        p: the norm order, in (0, inf].
        foreach: as in :func:`gradclip.clip_grad_norm_`.

    Returns:
        A 1-D tensor with one norm per DTensor, in float64 (float32 on MPS).

    Raises:
        ValueError: a placement gradclip does not know (see :func:`placement_kinds`).
    """
    assert group.sharding is not None, "sharded_tensor_norms takes a group of DTensors"
    local, groups = _local_pieces(group)
    inf = math.isinf(p)
    norms = _norms.tensor_norms(local.tensors, p, local.device, foreach).to(_reduce_dtype(local.device))
    reduced = _all_reduce(norms if inf else norms.pow(p), groups, inf)
    return reduced if inf else reduced.pow(1.0 / p)


def check_not_partial(groups: list[_groups.Group], what: str) -> None:
    """Raise ``ValueError`` unless every DTensor group's local values are entries (for elementwise clipping).

    ``Shard``, ``_StridedShard`` and ``Replicate`` local values are entries of
    the tensor: clamping them clamps the tensor. ``Partial`` and
    ``_MaskPartial`` ones are summands, and unknown placements are refused
    (see :func:`placement_kinds`).
    """
    for group in groups:
        if group.sharding is None:
            continue
        kinds = placement_kinds(group.sharding.placements, what)
        if PARTIAL in kinds or MASK_PARTIAL in kinds:
            raise ValueError(
                f"{what} cannot act on DTensor gradients with a Partial placement: their local "
                "values are summands, not entries. Redistribute them to Shard or Replicate first."
            )
