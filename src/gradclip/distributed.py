r"""Global gradient norms over ``torch.distributed``: sharded, replicated and DTensor gradients.

When a model is split across processes, the norm that clipping needs is the
norm of the *whole* gradient, not of the shard a rank holds:

.. math::

    \|g\|_p = \Big(\sum_{r=0}^{R-1} \sum_{i \in S_r} \|g_i\|_p^p
              \;+\; \sum_{i \in \mathcal{R}} \|g_i\|_p^p\Big)^{1/p},
    \qquad
    \|g\|_\infty = \max\Big(\max_r \max_{i \in S_r} \|g_i\|_\infty,\;
                            \max_{i \in \mathcal{R}} \|g_i\|_\infty\Big)

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
  :func:`gradclip.get_total_norm` and the clippers reduce their local shards
  over the mesh dimensions they are sharded on (``Shard``), not over those
  they are replicated on (``Replicate``); ``Partial`` gradients are summed
  first. The norm comes back as a plain tensor, equal on every rank.
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

__all__ = ["WORLD", "global_norm", "replicated_ids", "resolve_process_group"]

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


def _reduce_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else _REDUCE_DTYPE


def _local_partial(group: _groups.Group, p: float, foreach: bool | None, device: torch.device) -> torch.Tensor:
    """Sum of ||g_i||_p^p (max of ||g_i||_inf for p = inf) over one group, a 0-dim tensor."""
    tensors = [t for t in group.tensors if t.numel() > 0]
    dtype = _reduce_dtype(device)
    if not tensors:
        return torch.zeros((), dtype=dtype, device=device)
    if len(tensors) != len(group.tensors):
        group = _groups.Group(group.device, group.dtype, tensors, None)
    norms = _norms.group_norms(group, p, foreach).to(device=device, dtype=dtype)
    return norms.max() if math.isinf(p) else norms.pow(p).sum()


def _sum_partial_shards(group: _groups.Group) -> tuple[_groups.Group, tuple[Any, ...]]:
    """Reduce ``Partial`` placements of a local DTensor group to full values (one all-reduce each)."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
    from torch.distributed.tensor import Replicate

    assert group.sharding is not None
    mesh, placements = group.sharding.mesh, group.sharding.placements
    tensors = group.tensors
    flat = _flatten_dense_tensors(tensors) if tensors else torch.zeros(0, dtype=group.dtype, device=group.device)
    flat = flat.to(accumulation_dtype(group.dtype), copy=True)
    ops = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    new_placements = list(placements)
    for dim, placement in enumerate(placements):
        if not placement.is_partial():
            continue
        reduce_op = getattr(placement, "reduce_op", "sum")
        if reduce_op not in ops:
            raise ValueError(f"cannot take the norm of a Partial({reduce_op!r}) DTensor gradient")
        dim_group = mesh.get_group(dim)
        dist.all_reduce(flat, op=ops[reduce_op], group=dim_group)
        if reduce_op == "avg":
            flat.div_(dist.get_world_size(dim_group))
        new_placements[dim] = Replicate()
    full = list(_unflatten_dense_tensors(flat, tensors)) if tensors else []
    return _groups.Group(group.device, flat.dtype, full, None), tuple(new_placements)


def _all_reduce(value: torch.Tensor, groups: tuple[Any, ...], inf: bool) -> torch.Tensor:
    """All-reduce a 0-dim partial over each group in turn; NaN survives a MAX."""
    import torch.distributed as dist

    if not groups:
        return value
    if inf:
        # MAX implementations may drop NaN (std::max); carry a NaN flag beside the max.
        nan = value.isnan()
        packed = torch.stack([torch.where(nan, 0.0, value), nan.to(value.dtype)])
        for group in groups:
            dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
        return torch.where(packed[1] > 0, math.nan, packed[0])
    value = value.clone()
    for group in groups:
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return value


def wide_global_norm(
    groups: list[_groups.Group],
    p: float,
    foreach: bool | None,
    first_device: torch.device | None,
    process_group: Any = None,
    replicated: Iterable[torch.Tensor] | None = None,
) -> torch.Tensor:
    """:func:`global_norm` in the wide dtype (float64; float32 on MPS), for clipping factors."""
    return _global_norm(groups, p, foreach, first_device, process_group, replicated)


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
      the partial sums of their local shards are all-reduced over the mesh's
      ``Shard`` dimensions only;
      ``Partial`` placements are summed into full values first (one extra
      all-reduce of those gradients).
    * Partial sums are reduced in float64 whatever the gradients' dtype
      (float16/bfloat16 norms are first computed in float32), one collective
      per distinct process group, usually exactly one. A NaN or inf anywhere
      gives a NaN or inf norm on every rank.
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
    out_dtype = torch.float32
    for group in groups:
        out_dtype = torch.promote_types(out_dtype, accumulation_dtype(group.dtype))
    return _global_norm(groups, p, foreach, first_device, process_group, replicated).to(out_dtype)


def _global_norm(
    groups: list[_groups.Group],
    p: float,
    foreach: bool | None,
    first_device: torch.device | None,
    process_group: Any,
    replicated: Iterable[torch.Tensor] | None,
) -> torch.Tensor:
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
                local.append(_local_partial(group, p, foreach, local_device))
                continue
            mine = [t for t in group.tensors if id(t) not in rep] if rep else group.tensors
            if len(mine) == len(group.tensors):
                buckets[(pg,)][1].append(_local_partial(group, p, foreach, buckets[(pg,)][0]))
                continue
            shared = [t for t in group.tensors if id(t) in rep]
            local.append(_local_partial(_groups.Group(group.device, group.dtype, shared, None), p, foreach,
                                        local_device))
            if mine:
                sub = _groups.Group(group.device, group.dtype, mine, None)
                buckets[(pg,)][1].append(_local_partial(sub, p, foreach, buckets[(pg,)][0]))
            continue
        mesh, placements = group.sharding.mesh, group.sharding.placements
        group = _groups.local(group)
        if any(placement.is_partial() for placement in placements):
            group, placements = _sum_partial_shards(group)
        key = tuple(mesh.get_group(dim) for dim, placement in enumerate(placements) if placement.is_shard())
        if key not in buckets:
            buckets[key] = [group.device, []]
        buckets[key][1].append(_local_partial(group, p, foreach, buckets[key][0]))

    totals = []
    for key, (device, partials) in buckets.items():
        if not partials:
            value = torch.zeros((), dtype=_reduce_dtype(device), device=device)
        else:
            stacked = torch.stack(partials)
            value = stacked.max() if inf else stacked.sum()
        totals.append(_all_reduce(value, key, inf))
    result_device = first_device if first_device is not None else (
        totals[0].device if totals else local_device)
    values = [t.to(device=result_device, dtype=_reduce_dtype(result_device)) for t in totals + local]
    if not values:
        return torch.zeros((), dtype=_reduce_dtype(result_device), device=result_device)
    stacked = torch.stack(values)
    return stacked.max() if inf else stacked.sum().pow(1.0 / p)



def check_not_partial(groups: list[_groups.Group], what: str) -> None:
    """Raise ``ValueError`` when a DTensor group has a ``Partial`` placement (for elementwise clipping)."""
    for group in groups:
        if group.sharding is not None and any(pl.is_partial() for pl in group.sharding.placements):
            raise ValueError(
                f"{what} cannot act on DTensor gradients with a Partial placement: their local "
                "values are summands, not entries. Redistribute them to Shard or Replicate first."
            )
