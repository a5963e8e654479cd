r"""The ground floor of every norm in the library: per-tensor, per-group and combined p-norms.

Everything that measures gradients (the global norm, its distributed
reduction, per-tensor clipping, AGC, the monitor) goes through these
functions, so there is one place where the accumulation dtype, the batched
kernels, the CPU small-tensor optimisation and overflow safety are decided.

**Overflow and underflow.** A p-norm computed naively overflows when
:math:`|g|^p` does (float32 entries above about 1.8e19 for p = 2) and
underflows to 0 when every :math:`|g|^p` is below the smallest normal number
(float32 entries below about 1e-19), although the norm itself is
representable. Three rules keep the library right:

* per-tensor norms come back in a *wide* dtype (float64; float32 on MPS,
  which has no float64), so a norm too large for the gradients' dtype is
  still a finite number;
* partial norms are combined in float64, where their powers cannot over- or
  underflow for float32-or-narrower gradients (p <= 6), and otherwise with the
  largest one factored out, :math:`\|n\|_p = m\,\|n/m\|_p` with
  :math:`m = \max_i n_i`, so combining never overflows;
* per-tensor norms are computed where they cannot go wrong. On the CPU,
  where reading a value costs no device synchronisation, they are accumulated
  in float32 (fast; tensors of 4 M entries or more row by row, rows of 4 k
  entries combined in float64, within 10% of torch's kernel and far more accurate there) and a norm that may have under- or overflowed (0, tiny or
  inf) is recomputed exactly, with its largest entry factored out. Elsewhere
  (accelerators, and while ``torch.compile`` traces) no value may be read, so
  every norm is made safe up front: float32-or-narrower gradients are
  accumulated in float64 (torch's foreach kernels accumulate in the output
  dtype's precision), where their powers cannot over- or underflow for
  p <= 6; float64 gradients, and larger p, have each tensor's largest entry
  factored out first (two more passes; on MPS, which has no float64, only
  this factored form is exact and it is not used: MPS keeps float32).

Nothing here reads a value on the host except that CPU check, which is
skipped while ``torch.compile`` traces.
"""

from __future__ import annotations

import functools
import math

from typing import Any

import torch
from torch._utils import _flatten_dense_tensors
from torch.utils._foreach_utils import _device_has_foreach_support, _foreach_supported_types

# Which small CPU tensors are normed as one concatenation is the plan's choice
# (gradclip._groups.CPU_CONCAT_MAX_NUMEL).

# On the CPU, the 2-norm of a float32/float64 tensor of 4 M entries or more is taken as the norm of its rows
# of ``_ROW`` entries (one torch kernel over a (rows, _ROW) view, and the remainder), the row norms then
# combined in float64. torch's CPU norm kernel accumulates float32 in float32 and drifts with size: off
# by 1e-3 (relative) on 20 M normal entries and up to 1.7e-2 on 38 M equal ones (tests/test_norms.py).
# Each row is accumulated in float32 too, so the row length bounds the drift: on one thread of an AMD
# EPYC, 20 M entries of 0.3 were off by 7e-7 with rows of 4 k entries (1.3e-5 with 16 k, 1.1e-4 with 256 k;
# BLAS ``dot`` on pieces of 256 k entries, the path before: 1.3e-5), for 3-9% more time than torch's
# kernel on the whole tensor (``dot`` on pieces took 16-17% more). Smaller tensors keep torch's kernel.
_ROWS_MIN_NUMEL = 1 << 22
_ROW = 1 << 12

_LOW_PRECISION = (torch.float16, torch.bfloat16)

# A norm below tiny ** (1/p) times this margin may have lost entries to underflow.
_UNDERFLOW_MARGIN = 1e4

# Partial norms of float32/bfloat16/float16 gradients lie within about [1e-45, 1e43] (a tensor's norm
# is at most its largest entry times the square root of its size): their float64 powers up to this
# order neither overflow nor underflow, so a plain float64 norm of them, or of their entries, is exact there.
_PLAIN_COMBINE_MAX_P = 6.0


_COMPLEX_TO_REAL = {torch.complex32: torch.float32, torch.complex64: torch.float32, torch.complex128: torch.float64}


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs, the real dtype for complex ones, the input dtype otherwise.

    A norm of complex entries is real (of their moduli), and a real factor scales them.
    """
    if dtype in _COMPLEX_TO_REAL:
        return _COMPLEX_TO_REAL[dtype]
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def output_dtype(dtypes: list[torch.dtype]) -> torch.dtype:
    """The dtype a global norm is returned in: float32 at least, float64 when any gradient is float64."""
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, accumulation_dtype(dtype))
    return out


_FOREACH_TYPES = (torch.Tensor, torch.nn.Parameter)


def use_foreach(tensors: list[torch.Tensor], device: torch.device, foreach: bool | None) -> bool:
    """Whether torch's foreach kernels take ``tensors``: None picks them where supported, True insists.

    torch's rule, with ``nn.Parameter`` supported as ``torch.optim`` has it
    (``get_total_norm`` of the parameters themselves), and what torch adds
    (DTensor, once imported).

    Raises:
        RuntimeError: ``foreach=True`` on a device without foreach kernels.
    """
    if foreach is None:
        return _device_has_foreach_support(device) and all(
            kind in _FOREACH_TYPES or kind in _foreach_supported_types for kind in {type(t) for t in tensors})
    if foreach and not _device_has_foreach_support(device):
        raise RuntimeError(f"foreach=True was passed, but can't use the foreach API on {device.type} tensors")
    return foreach


def wide_dtype(device: torch.device) -> torch.dtype:
    """The dtype norms are combined in: float64, or float32 where the device has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


# Tests of the accelerator paths switch this off, so that CPU tensors stand in for device tensors.
HOST_CHECKS_ON_CPU = True


def exact_on_host(device: torch.device) -> bool:
    """Whether suspicious norms on ``device`` may be checked on the host: the CPU, outside compilation."""
    return HOST_CHECKS_ON_CPU and device.type == "cpu" and not torch.compiler.is_compiling()


def scaled_norm(tensor: torch.Tensor, p: float, dim: tuple[int, ...] | None = None) -> torch.Tensor:
    """The p-norm with the largest magnitude factored out, in the wide dtype: never over- or underflows.

    :math:`\\|x\\|_p = m \\|x / m\\|_p`, :math:`m = \\max |x|`; exact up to rounding
    whenever the result is representable. Costs a copy of the tensor in float64.
    """
    if tensor.is_complex():  # moduli computed in the wide precision: a float32 modulus can overflow
        wide = tensor.to(torch.complex64 if wide_dtype(tensor.device) == torch.float32 else torch.complex128).abs()
    else:
        wide = tensor.to(wide_dtype(tensor.device))
    largest = wide.abs().amax(dim=dim, keepdim=True) if wide.numel() else wide.new_zeros([1] * wide.ndim)
    if math.isinf(p):
        return largest.squeeze(dim) if dim is not None else largest.reshape(())
    divisor = torch.where((largest > 0) & torch.isfinite(largest), largest, torch.ones_like(largest))
    norm = torch.linalg.vector_norm(wide / divisor, p, dim=dim, keepdim=True) * divisor
    # all zero -> 0; an inf entry -> inf; a NaN entry -> NaN (through the sum)
    norm = torch.where(torch.isinf(largest) & ~torch.isnan(norm), largest, norm)
    return norm.squeeze(dim) if dim is not None else norm.reshape(())


def suspicious(norms: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask of norms that may have under- or overflowed when computed in ``dtype``."""
    if math.isinf(p):
        return torch.zeros_like(norms, dtype=torch.bool)  # the max needs no powers
    tiny = _tiny_norm(dtype, p)
    return (norms < tiny) | torch.isinf(norms)


def tensor_norms(tensors: list[torch.Tensor], p: float, device: torch.device, foreach: bool | None) -> torch.Tensor:
    """A 1-D tensor with the p-norm of each tensor (all of one device and dtype), in order, in the wide dtype.

    Accumulated in float32 at least; one foreach kernel where supported, a
    loop otherwise; empty tensors have norm 0. On the CPU, norms that may have
    under- or overflowed are recomputed exactly (see the module docstring).
    """
    nonempty = [t for t in tensors if t.numel()] if not all(t.numel() for t in tensors) else tensors
    if len(nonempty) < len(tensors):
        out = torch.zeros(len(tensors), dtype=wide_dtype(device), device=device)
        if nonempty:
            where = torch.tensor([i for i, t in enumerate(tensors) if t.numel()], device=device)
            out.index_copy_(0, where, tensor_norms(nonempty, p, device, foreach))
        return out
    return safe_norms(tensors, p, device, use_foreach(tensors, device, foreach))


def safe_norms(tensors: list[torch.Tensor], p: float, device: torch.device, batched: bool) -> torch.Tensor:
    """:func:`tensor_norms` of non-empty tensors, with the kernel choice made (``batched``: foreach)."""
    originals = tensors
    if tensors[0].is_complex():  # the norm of complex entries is the norm of their moduli
        tensors = [t.abs() for t in tensors]
    wide = wide_dtype(device)
    if exact_on_host(device) or wide != torch.float64 or math.isinf(p):
        dtype = accumulation_dtype(tensors[0].dtype)
        if exact_on_host(device) and p == 2 and tensors[0].dtype in (torch.float32, torch.float64):
            norms = _cpu_two_norms(tensors, batched).to(torch.float64)
        else:
            norms = _plain_norms(tensors, p, dtype, batched).to(wide)
        if exact_on_host(device):
            _repair_(norms, originals, p, dtype)
        return norms
    if tensors[0].dtype != torch.float64 and p <= _PLAIN_COMBINE_MAX_P:
        return _plain_norms(tensors, p, torch.float64, batched)
    return _factored_norms(tensors, p, batched)


def _plain_norms(tensors: list[torch.Tensor], p: float, dtype: torch.dtype, use_foreach: bool) -> torch.Tensor:
    """The p-norm of each tensor accumulated in ``dtype``: one foreach kernel, or a loop."""
    if dtype == tensors[0].dtype:
        dtype = None  # the same accumulation, without the slower explicit-dtype kernel
    if use_foreach:
        return torch.stack(torch._foreach_norm(tensors, p, dtype=dtype))
    return torch.stack([torch.linalg.vector_norm(t, p, dtype=dtype) for t in tensors])


def _cpu_two_norms(tensors: list[torch.Tensor], use_foreach: bool) -> torch.Tensor:
    """The 2-norm of each CPU float32/float64 tensor: large contiguous ones row by row.

    In float64 when some tensor took that path, else in the tensors' dtype. A large tensor's rows of
    ``_ROW`` entries (and the remainder) are normed in the tensors' dtype, so over- and underflow show as
    inf or a tiny norm, which :func:`_repair_` then recomputes exactly; the row norms are combined in
    float64.
    """
    large = [] if max(map(torch.Tensor.numel, tensors)) < _ROWS_MIN_NUMEL else [  # (the common case: one C loop)
        i for i, t in enumerate(tensors) if t.numel() >= _ROWS_MIN_NUMEL and t.is_contiguous()]
    if not large:
        return _plain_norms(tensors, 2.0, tensors[0].dtype, use_foreach)
    norms = torch.zeros(len(tensors), dtype=torch.float64)
    for index in large:
        flat = tensors[index].view(-1)
        whole = flat.numel() - flat.numel() % _ROW
        rows = torch.linalg.vector_norm(flat[:whole].view(-1, _ROW), dim=1)
        if whole < flat.numel():
            rows = torch.cat((rows, torch.linalg.vector_norm(flat[whole:]).reshape(1)))
        norms[index] = torch.linalg.vector_norm(rows, dtype=torch.float64)
    if len(large) < len(tensors):
        large_set = set(large)
        rest = [i for i in range(len(tensors)) if i not in large_set]
        rest_norms = _plain_norms([tensors[i] for i in rest], 2.0, tensors[0].dtype, use_foreach)
        norms.index_copy_(0, torch.tensor(rest), rest_norms.to(torch.float64))
    return norms


def _factored_norms(tensors: list[torch.Tensor], p: float, use_foreach: bool) -> torch.Tensor:
    """The p-norm of each tensor with its largest magnitude factored out, in float64, without a host read.

    :math:`\\|x\\|_p = m \\|x / m\\|_p`: three passes (max, divide, norm) and a temporary
    copy of the tensors; used where float64 accumulation alone could over- or underflow.
    """
    largest = _plain_norms(tensors, math.inf, torch.float64, use_foreach)
    divisors = torch.where((largest > 0) & torch.isfinite(largest), largest, torch.ones_like(largest))
    wide = [t.to(torch.float64) for t in tensors]
    if use_foreach:
        scaled = torch._foreach_div(wide, list(divisors.unbind()))
    else:
        scaled = [t / d for t, d in zip(wide, divisors.unbind())]
    norms = _plain_norms(scaled, p, torch.float64, use_foreach) * divisors
    # an inf entry gives inf (a NaN entry stays NaN through the sum)
    return torch.where(torch.isinf(largest) & ~torch.isnan(norms), largest, norms)


def axis_norms(tensor: torch.Tensor, p: float, dim: tuple[int, ...]) -> torch.Tensor:
    """The p-norms of ``tensor`` over the axes ``dim`` (one per unit), in the wide dtype, as safe as :func:`tensor_norms`.

    On the CPU accumulated in float32 and recomputed exactly if any unit may have under- or
    overflowed; elsewhere accumulated in float64, or with each unit's largest entry factored out.
    """
    original = tensor
    if tensor.is_complex():  # the moduli's norms
        tensor = tensor.abs()
    device, wide = tensor.device, wide_dtype(tensor.device)
    if exact_on_host(device) or wide != torch.float64 or math.isinf(p):
        dtype = accumulation_dtype(tensor.dtype)
        norms = torch.linalg.vector_norm(tensor, p, dim=dim, dtype=dtype).to(wide)
        if exact_on_host(device) and bool(suspicious(norms, p, dtype).any()):
            norms = scaled_norm(original, p, dim=dim)
        return norms
    if tensor.dtype != torch.float64 and p <= _PLAIN_COMBINE_MAX_P:
        return torch.linalg.vector_norm(tensor, p, dim=dim, dtype=torch.float64)
    return scaled_norm(original, p, dim=dim)


def _repair_(norms: torch.Tensor, tensors: list[torch.Tensor], p: float, dtype: torch.dtype) -> None:
    """Recompute in place, exactly, the norms that may have under- or overflowed (CPU only: reads values)."""
    suspect = suspicious(norms, p, dtype)
    if not bool(suspect.any()):
        return
    for index in suspect.nonzero().flatten().tolist():
        norms[index] = scaled_norm(tensors[index], p)


def group_norms(group: Any, p: float) -> torch.Tensor:
    """A 1-D tensor of partial p-norms (wide dtype) whose own p-norm is the norm of one group of a plan.

    As the plan chose: a flat buffer gives one norm; the small CPU tensors one
    norm of their concatenation; the others one norm each. A group of
    DTensors gives the norms of its local shards.
    """
    targets = group.norm_targets()
    if group.buffer is not None and not group.buffer.numel():
        targets = []
    return _work_norms(group.device, group.small, targets, group.batched and group.buffer is None, p)


def _work_norms(device: torch.device, small: list[torch.Tensor] | None, targets: list[torch.Tensor],
                batched: bool, p: float) -> torch.Tensor:
    pieces = []
    if small:
        pieces.append(safe_norms([_flatten_dense_tensors(small)], p, device, False))
    if targets:
        pieces.append(safe_norms(targets, p, device, batched))
    if not pieces:
        return torch.zeros(1, dtype=wide_dtype(device), device=device)
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def local_total(plan: Any, p: float) -> tuple[float | None, torch.Tensor | None]:
    """The p-norm of every tensor of a plan of plain tensors: ``(value, None)`` or ``(None, wide)``.

    Takes the plan's ``norm_work`` (see :class:`gradclip._groups.Plan`). On
    the CPU outside compilation (:func:`exact_on_host`) the partial norms are
    read once per kernel and combined on the host in float64: ``value`` is a
    Python float and no tensor is made for it. Anywhere else ``wide`` is a
    0-dim float64 tensor (float32 on MPS) on the plan's device, and nothing is
    read.
    """
    work = plan.norm_work
    if all(exact_on_host(item.device) for item in work):
        values: list[float] = []
        for item in work:  # (the small tensors' concatenation in the same kernel and read as the others: a
            # separate one cost 0.04-0.09 ms more per call on the 67 tensors of the model-shaped benchmark)
            tensors = [_flatten_dense_tensors(item.small), *item.targets] if item.small else item.targets
            values += _host_norms(tensors, p, item.batched)
        return host_combine(values, p, plan.narrow), None
    device = plan.device
    partial_norms = [_work_norms(item.device, item.small, item.targets, item.batched, p).to(device) for item in work]
    if not partial_norms:
        return None, torch.zeros((), dtype=wide_dtype(device), device=device)
    return None, combine(torch.cat(partial_norms), p, narrow_inputs=plan.narrow)


def _host_norms(tensors: list[torch.Tensor], p: float, batched: bool) -> list[float]:
    """The p-norm of each non-empty CPU tensor, as Python floats, recomputed exactly where they may have over- or underflowed.

    Accumulated in float32 at least (2-norms of tensors of 4 M entries or
    more row by row, see :func:`_cpu_two_norms`), then read in one go;
    the check for under- and overflow runs on the host floats.
    """
    originals = tensors
    if tensors[0].is_complex():
        tensors = [t.abs() for t in tensors]
    dtype = accumulation_dtype(tensors[0].dtype)
    if p == 2 and tensors[0].dtype in (torch.float32, torch.float64):
        norms = _cpu_two_norms(tensors, batched)
    elif len(tensors) == 1:
        norms = torch.linalg.vector_norm(tensors[0], p, dtype=None if dtype == tensors[0].dtype else dtype).reshape(1)
    else:
        norms = _plain_norms(tensors, p, dtype, batched)
    values = norms.tolist()
    if math.isinf(p):
        return values  # the max needs no powers
    tiny = _tiny_norm(dtype, p)
    if min(values) < tiny or max(values) == math.inf:
        for index, value in enumerate(values):
            if value < tiny or value == math.inf:
                values[index] = float(scaled_norm(originals[index], p))
    return values


@functools.lru_cache(maxsize=64)
def _tiny_norm(dtype: torch.dtype, p: float) -> float:
    """A p-norm accumulated in ``dtype`` below this may have lost entries to underflow."""
    return torch.finfo(dtype).tiny ** (1.0 / p) * _UNDERFLOW_MARGIN


def host_combine(values: list[float], p: float, narrow_inputs: bool) -> float:
    """The p-norm of non-negative floats, in float64, never overflowing: :func:`combine` on the host.

    NaN anywhere gives NaN; inf (and no NaN) gives inf; no values, or all zeros, give 0.
    """
    if not values:
        return 0.0
    total = sum(values)
    if total != total:
        return math.nan
    if math.isinf(p):
        return max(values)
    if p == 2:
        return math.hypot(*values)  # correctly scaled: no overflow, no underflow
    largest = max(values)
    if largest == 0 or largest == math.inf:
        return largest
    if p == 1:  # exactly rounded; only a sum beyond float64's range overflows, to inf
        return total if math.isinf(total) else math.fsum(values)
    if narrow_inputs and p <= _PLAIN_COMBINE_MAX_P:
        return math.fsum(v ** p for v in values) ** (1.0 / p)
    return largest * math.fsum((v / largest) ** p for v in values) ** (1.0 / p)


def combine(partial_norms: torch.Tensor, p: float, narrow_inputs: bool = False) -> torch.Tensor:
    """The p-norm of a 1-D tensor of norms, in the wide dtype, never overflowing.

    ``narrow_inputs``: every partial norm comes from float32 or narrower
    gradients; then, for p <= 6 in float64, a plain norm is exact and cheaper.
    Otherwise the largest is factored out first. NaN anywhere gives NaN; inf
    (and no NaN) gives inf; all zeros give 0.
    """
    wide = partial_norms.to(wide_dtype(partial_norms.device))
    if narrow_inputs and wide.dtype == torch.float64 and p <= _PLAIN_COMBINE_MAX_P:
        return torch.linalg.vector_norm(wide, p)
    return scaled_norm(wide, p)
