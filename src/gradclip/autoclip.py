"""AutoClip: clip to a percentile of the history of gradient norms, exactly and without a sync."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from . import _groups, _validate
from ._scaling import scale_
from .clippers import Clipper, StepCount
from .result import ClipResult

__all__ = ["AutoClip"]

_MIN_REBUILD = 16

# Inside torch.compile, without a window, the history is kept in a buffer of at least this many norms.
TRACED_CAPACITY = 1 << 16


def percentile_position(n: int, percentile: float) -> tuple[int, int, float]:
    """numpy's 'linear' percentile position: (lower index, upper index, weight), on the host.

    The same float64 operations as ``numpy.percentile``: ``(n - 1) * (p / 100)``.
    """
    virtual = (n - 1) * (percentile / 100)
    if virtual >= n - 1:
        return n - 1, n - 1, virtual - math.floor(virtual)
    lower = math.floor(virtual)
    return lower, lower + 1, virtual - lower


class AutoClip(Clipper):
    r"""Clip to the p-th percentile of the history of pre-clip global gradient norms.

    At step t, with :math:`G_t = \{\|g_1\|, \dots, \|g_t\|\}` the history
    (Seetharaman, Wichern, Pardo and Le Roux 2020, Algorithm 1,
    `arXiv:2007.14469 <https://arxiv.org/abs/2007.14469>`__):

    .. math::

        c_t = P_p(G_t), \qquad
        g_t \leftarrow \begin{cases} g_t \, c_t / \|g_t\| & \|g_t\| > c_t \\
        g_t & \text{otherwise} \end{cases}

    where :math:`P_p` is ``numpy.percentile`` with linear interpolation: with
    the history sorted as :math:`x_{(0)} \le \dots \le x_{(n-1)}`,
    :math:`v = (n-1)\,p/100`, :math:`i = \lfloor v \rfloor`, :math:`\gamma = v - i`,
    :math:`P_p = x_{(i)} + \gamma\,(x_{(i+1)} - x_{(i)})`.
    The paper keeps the whole history and includes the current norm
    (``include_current=True, window=None``, its recommended p = 10); the
    ``autoclip`` package uses only earlier norms over a window of 1000
    (``include_current=False, window=1000``; the first step is then not clipped).
    Both scale by :math:`\min(1, c_t/(\|g_t\| + 10^{-6}))` (torch's ``clip_grad_norm_``), which
    is below 1 also when :math:`\|g_t\| = c_t`, as happens whenever the current norm is the
    order statistic taken (the first step, every new maximum at p = 100), and which leaves a
    clipped norm near :math:`10^{-6}` far below :math:`c_t`. Here a gradient is scaled only when
    its norm exceeds the threshold, and then to exactly the threshold: p = 100 never clips,
    ``result.clipped`` counts real clipping, and results differ from the references by a
    relative :math:`10^{-6}/\|g_t\|` at most where both clip.

    **Exactness.** In ``dtype=torch.float64`` (the default) the threshold is
    bitwise ``numpy.percentile`` of the same history: the same host-side
    position arithmetic, the same order statistics and the same interpolation
    formula. In float32 it equals numpy's float32 result to rounding.
    A non-finite norm (inf or NaN: a step ``GradScaler`` skips) is not recorded:
    the call reports the threshold of the history without it and leaves the
    history as it was, so a run whose overflow steps reach the clipper (a fused
    optimizer under ``scaler.step``, a call by hand after ``scaler.unscale_``)
    clips the later steps exactly as a run whose overflow steps never do. The
    threshold is never NaN (``inf`` for an empty history).

    **On accelerators and inside torch.compile** the same threshold comes from
    buffers of a fixed size (the bookkeeping below needs the number of norms on
    the host, and whether a norm is finite is not read there): the live history
    kept sorted, one insertion per step (skipped on the device for a non-finite
    norm), positions computed on the device; O(capacity) work per step, where
    the capacity is ``window``, or without a window 65,536 norms (or twice the
    history when the buffers are made); outside compilation the buffers double
    before they can fill, and a compiled run that records more raises rather
    than drop norms (torch leaves grad mode disabled after an error raised
    inside a compiled graph: catch it within ``torch.enable_grad()``). The
    host-side state catches up when the history or ``state_dict`` is read (one
    read of the count) or on the next call on the CPU.

    **Attached** (``attach(optimizer)``), it clips inside the closure of
    ``optimizer.step(closure)`` (each LBFGS evaluation is a call and enters the
    history) and, with a fused optimizer under ``scaler.step``, decides on the
    unscaled norm; see :class:`~gradclip.Clipper`. ``state_dict()`` returns
    copies, and the clipper pickles (detached).

    **Cost on the CPU.** The history lives in tensors (doubling storage, or a ring
    buffer of ``window`` entries). A sorted snapshot S of the history is
    rebuilt (one ``torch.sort``) every :math:`m = \max(16, \lfloor\sqrt n\rfloor)`
    steps; in between, the values added (R) and evicted by the window (D)
    since the snapshot are kept in small buffers. The two order statistics
    needed lie among the slice ``S[i - |R| : i + 1 + |D| + 1]`` (indices known on
    the host) and R. Until the window first evicts, the union of those slices
    over the next m steps and R are kept sorted by inserting each new norm with
    one ``torch.clamp`` kernel (:math:`O(\sqrt n)` work), and the order
    statistics are read off at positions known on the host: a step is about
    five small kernels. Once the window evicts, the exact ranks of the
    candidates in :math:`S + R - D` come from ``torch.searchsorted``:
    :math:`O(\sqrt n \log n)` work in a fixed number of kernels. Either way,
    an :math:`O(n \log n)` sort every :math:`\sqrt n` steps:
    :math:`O(\sqrt n \log n)` amortised per step, with an :math:`O(n\log n)`
    step once every :math:`\sqrt n` steps. The
    reference implementation syncs once per parameter and calls
    ``numpy.percentile`` on a Python list: :math:`O(n)` per step. On the CPU
    a step reads one value on the host (whether the norm is finite), which
    costs no synchronisation there; on accelerators no step reads one.

    Args:
        percentile: p, in [0, 100]. 100 never clips; 0 clips to the smallest norm seen.
        window: keep only the last ``window`` norms (an int >= 1), or all (``None``).
        include_current: include this step's norm in the history before taking the percentile.
        norm_type: p of the global norm, in (0, inf].
        dtype: ``torch.float64`` (exact) or ``torch.float32`` for the history.
        foreach: as in :func:`gradclip.clip_grad_norm_`.
        scaler: the ``GradScaler`` of the loss, to check that gradients were unscaled.
        process_group, replicated: for sharded gradients under ``torch.distributed``,
            as in :class:`~gradclip.Clipper`.

    Raises:
        RuntimeError: no parameters were given (an empty list, or an iterator consumed earlier), no parameter has a gradient (call ``loss.backward()`` first, or inside the closure given to ``optimizer.step``), the clipper is called twice on the same gradients, or, with ``scaler=``, it is called by hand on gradients that are still scaled (call ``scaler.unscale_(optimizer)`` first, or attach it).
        ValueError: an argument is outside the range given above (the message names it).
        TypeError: an argument has the wrong type (the message names it), or a gradient is sparse.

    References:
        * Seetharaman, Wichern, Pardo and Le Roux (2020), "AutoClip: Adaptive Gradient Clipping for Source Separation Networks", `arXiv:2007.14469 <https://arxiv.org/abs/2007.14469>`__.

    Example:
        >>> import torch, gradclip
        >>> w = torch.zeros(2, requires_grad=True)
        >>> clipper = gradclip.AutoClip(percentile=50.0)
        >>> for g in ([3.0, 4.0], [0.6, 0.8], [30.0, 40.0]):
        ...     w.grad = torch.tensor(g)
        ...     result = clipper([w])
        >>> float(result.norm), float(result.threshold)
        (50.0, 5.0)
        >>> w.grad
        tensor([3., 4.])
    """

    def __init__(self, percentile: float = 10.0, window: int | None = None, include_current: bool = True,
                 *, norm_type: float | str = 2.0, dtype: torch.dtype = torch.float64,
                 foreach: bool | None = None, scaler: torch.amp.GradScaler | None = None,
                 process_group: Any = None,
                 replicated: Iterable[torch.Tensor] | None = None) -> None:
        super().__init__(norm_type=norm_type, foreach=foreach, scaler=scaler, process_group=process_group,
                         replicated=replicated)
        self.percentile = _validate.check_real("percentile", percentile, 0.0, 100.0)
        if 0.0 < self.percentile <= 1.0:  # the autoclip package's QuantileClip takes a quantile in [0, 1]
            warnings.warn(
                f"AutoClip(percentile={percentile}) clips to the {percentile}th percentile of the norms "
                f"seen, on a 0-100 scale (the paper recommends 10). If you meant the quantile {percentile} "
                f"(as autoclip's QuantileClip(quantile=...) takes), pass percentile={100 * percentile:g}.",
                UserWarning, stacklevel=_validate._outside_stacklevel())
        self.window = None if window is None else _validate.check_int("window", window, 1)
        self.include_current = _validate.check_bool("include_current", include_current)
        self.dtype = _validate.check_state_dtype(dtype)
        self._reset()

    def _reset(self) -> None:
        self._count = 0  # norms recorded so far (host int: known without reading a tensor)
        self._history: torch.Tensor | None = None  # chronological, or a ring when window is set
        # without a window, the norms recorded since the snapshot (0-dim tensors, not modified
        # after _record): written into the history at the next rebuild, in one copy
        self._pending: list[torch.Tensor] = []
        self._sorted: torch.Tensor | None = None
        self._sorted_n = 0
        self._added: torch.Tensor | None = None  # only with a window: for steps after an eviction
        self._removed: torch.Tensor | None = None
        self._n_added = 0
        self._n_removed = 0
        self._rebuild_every = _MIN_REBUILD
        # While nothing was evicted since the snapshot: [-inf, the span of S that holds the
        # order statistics, R, +inf padding], kept sorted by inserting each norm (two buffers).
        self._inserts: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...] = ()
        # for r = 0, 1, ... norms added: the two order statistics (views of the buffer that
        # holds the order after r insertions) and the interpolation weight
        self._statistics: list[tuple[torch.Tensor, torch.Tensor, float]] = []
        # Inside torch.compile (see _traced_step): the history in order (a ring of `window` slots,
        # or up to its capacity), the same norms sorted with +inf after them, and how many were
        # recorded; ahead of the host-side state above while _traced_ahead.
        self._traced_history: torch.Tensor | None = None
        self._traced_sorted: torch.Tensor | None = None
        self._traced_count: torch.Tensor | None = None
        self._traced_ahead = False
        self._traced_bound = 0  # outside compilation: at least the number of norms the buffers hold

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "percentile": self.percentile, "window": self.window,
                "include_current": self.include_current, "dtype": str(self.dtype)}

    def __len__(self) -> int:
        """The number of norms in the history."""
        self._catch_up()
        return self._count if self.window is None else min(self._count, self.window)

    def history(self) -> torch.Tensor:
        """The norms in the history, oldest first (a copy, on the device)."""
        n = len(self)
        if self._history is None:
            return torch.empty(0, dtype=self.dtype)
        if self.window is None and self._pending:
            return torch.cat([self._history[: self._sorted_n], torch.stack(self._pending)])
        if self.window is None or self._count <= self.window:
            return self._history[:n].clone()
        start = self._count % self.window
        return torch.cat([self._history[start:], self._history[:start]])

    # --- the history ----------------------------------------------------------------------

    def _record(self, value: torch.Tensor) -> None:
        """Append a one-value tensor to the history, which must not be modified afterwards.

        Without a window and before an eviction, one kernel: the sorted insertion.
        """
        if value.dim():
            value = value.reshape(())
        history = self._history
        if history is None or history.device != value.device:
            self._move_to(value.device)
            history = self._history
        assert history is not None and self._removed is not None
        count = self._count
        if self.window is None:
            self._pending.append(value)
        else:
            assert self._added is not None
            slot = count % self.window
            if count >= self.window:
                self._removed[self._n_removed] = history[slot]
                self._n_removed += 1
            history[slot] = value
            self._added[self._n_added] = value
        if not self._n_removed:
            # sorted insertion: new[k] = clamp(v, old[k - 1], old[k]) keeps the buffer sorted,
            # with v at its place, and drops the last entry (a +inf of the padding)
            low, high, out = self._inserts[self._n_added & 1]
            torch.clamp(value, low, high, out=out)
        self._n_added += 1
        self._count = count + 1
        if self._n_added >= self._rebuild_every:
            self._rebuild()

    def _move_to(self, device: torch.device) -> None:
        """Allocate (or move) the buffers on ``device``, keeping the live history."""
        live = None if self._history is None else self.history().to(device)
        self._history = torch.empty(max(self.window or 1024, 1), dtype=self.dtype, device=device)
        count = 0 if live is None else live.numel()
        if live is not None and count:
            if self.window is None and count > self._history.numel():
                self._history = torch.empty(2 * count, dtype=self.dtype, device=device)
            self._history[:count].copy_(live)
        # the ring now starts at slot 0: renumber so that slot = count % window still holds
        self._count = count
        self._pending = []
        self._rebuild()

    def _rebuild(self) -> None:
        """Sort the live history into the snapshot and empty the pending buffers."""
        assert self._history is not None
        n = len(self)
        device = self._history.device
        if self._pending:  # no window: write the norms recorded since the snapshot
            if n > self._history.numel():
                grown = torch.empty(2 * n, dtype=self.dtype, device=device)
                grown[: self._sorted_n].copy_(self._history[: self._sorted_n])
                self._history = grown
            self._history[self._sorted_n : n].copy_(torch.stack(self._pending))
            self._pending = []
        self._sorted = torch.sort(self._history[:n]).values
        self._sorted_n = n
        every = self._rebuild_every = max(_MIN_REBUILD, math.isqrt(n))
        # Until the next rebuild, a step with nothing evicted sees the n + r norms S + R, r < every.
        # Their `lower`-th smallest is >= S[lower - r] (at most r of the lower + 1 smallest are in
        # R) and their `upper`-th is <= S[upper]: so S[:first] ranks before both and S[stop:]
        # after both, for first <= lower - r and stop >= upper + 1 (or stop = n), and they are the
        # (k - first)-th smallest of S[first:stop] + R. Take first and stop good for every r.
        first, stop = n, 0
        positions = []
        for r in range(every):
            position = percentile_position(n + r, self.percentile) if n + r else (0, 0, 0.0)
            positions.append(position)
            if n + r:
                first = min(first, max(0, position[0] - r))
                stop = max(stop, min(n, position[1] + 1))
        span = max(0, stop - first)
        buffers = torch.full((2, span + every + 1), math.inf, dtype=self.dtype, device=device)
        buffers[:, 0] = -math.inf
        if span:
            buffers[:, 1 : span + 1] = self._sorted[first:stop]
        one, two = buffers[0], buffers[1]
        self._inserts = ((one[:-1], one[1:], two[1:]), (two[:-1], two[1:], one[1:]))
        # after r insertions the order is in `one` (r even) or `two` (r odd); the k-th
        # smallest live norm at index k - first + 1
        self._statistics = [
            ((two if r & 1 else one)[lower - first + 1], (two if r & 1 else one)[upper - first + 1], gamma)
            for r, (lower, upper, gamma) in enumerate(positions)
        ]
        if self.window is not None and (self._added is None or self._added.numel() < every
                                        or self._added.device != device):
            self._added = torch.empty(every, dtype=self.dtype, device=device)
        if self._removed is None or self._removed.numel() < every or self._removed.device != device:
            self._removed = torch.empty(every, dtype=self.dtype, device=device)
        self._n_added = self._n_removed = 0

    def _order_statistics(self, lower: int, upper: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``lower``-th and ``upper``-th smallest live norms (0-based), as 0-dim tensors.

        Only for steps after an eviction (``_n_removed > 0``); before one, :meth:`_threshold`
        reads them from the sorted buffer.
        """
        assert self._sorted is not None and self._added is not None and self._removed is not None
        r, d, s = self._n_added, self._n_removed, self._sorted_n
        snapshot = self._sorted
        start = max(0, lower - r)
        added = torch.sort(self._added[:r]).values if r else None
        removed = torch.sort(self._removed[:d]).values if d else None
        # The k-th smallest of S + R - D has a copy in S[k - |R| : k + |D| + 1] or in R.
        stop = min(s, upper + d + 1)
        pieces = [snapshot[start:stop]] + ([added] if added is not None else [])
        candidates = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        at_most = torch.searchsorted(snapshot, candidates, right=True)
        if added is not None:
            at_most = at_most + torch.searchsorted(added, candidates, right=True)
        if removed is not None:
            at_most = at_most - torch.searchsorted(removed, candidates, right=True)
        low = torch.where(at_most > lower, candidates, math.inf).amin()
        high = low if upper == lower else torch.where(at_most > upper, candidates, math.inf).amin()
        return low, high

    def _threshold(self) -> torch.Tensor:
        """numpy.percentile(history, p) of the live history, as a 0-dim tensor."""
        if self._n_removed:
            lower, upper, gamma = percentile_position(len(self), self.percentile)
            low, high = self._order_statistics(lower, upper)
        else:
            # nothing evicted: read them off the sorted [-inf, S[first:stop], R, +inf...] (_rebuild)
            low, high, gamma = self._statistics[self._n_added]
            if gamma == 0.0:
                return low.clone()  # a view of a buffer that later insertions overwrite
        if gamma == 0.0:
            return low
        # numpy's _lerp, operation for operation (torch.lerp fuses a multiply-add: not bitwise)
        diff = high - low
        value = high - diff * (1 - gamma) if gamma >= 0.5 else low + diff * gamma
        # inf - inf gives nan where the interpolation touches +inf entries; the answer there is inf
        return value.nan_to_num_(nan=math.inf, posinf=math.inf)

    # --- the step --------------------------------------------------------------------------

    def _step(self, groups: _groups.Plan, norm: torch.Tensor, wide: torch.Tensor, count: StepCount) -> ClipResult:
        if count.on_device:  # accelerators, torch.compile: whether the norm is finite is not read
            return self._traced_step(groups, norm, wide)
        self._catch_up()
        value = wide.to(self.dtype)
        norm_value = wide.item()  # (on the CPU: free)
        finite = math.isfinite(norm_value)  # a non-finite norm is not recorded
        if self.include_current and finite:
            self._record(value)
        threshold = (self._threshold() if len(self) else
                     torch.full((), math.inf, dtype=self.dtype, device=norm.device))
        if not self.include_current and finite:
            self._record(value)
        # unchanged unless the norm exceeds the threshold (with the current norm in the history the
        # threshold can equal it), and then scaled to exactly the threshold: torch's c / (g + 1e-6)
        # would shrink norms near 1e-6 far below c. NaN and inf norms give NaN and 0, as torch's.
        # On floats here (one IEEE division, as the traced step's tensors compute it), a factor of 1 multiplying
        # nothing.
        limit = float(threshold)  # (exact: a float32 or float64 state)
        factor = 1.0 if norm_value <= limit else limit / norm_value
        scale_(groups, factor, self.foreach)
        return ClipResult(norm=norm, threshold=threshold,
                          scale=torch.scalar_tensor(factor, dtype=norm.dtype, device=norm.device))

    # --- inside torch.compile --------------------------------------------------------------

    def _traced_step(self, groups: _groups.Plan, norm: torch.Tensor, wide: torch.Tensor) -> ClipResult:
        """The step inside ``torch.compile``: the same threshold, from buffers of a fixed size.

        The host-side bookkeeping above (which slice of the sorted snapshot
        holds the order statistics, when to rebuild it) changes every step,
        and a compiled graph would recompile for each of its values. Here the
        whole live history is kept sorted, padded with +inf: each norm is
        inserted with one clamp (``new[k] = clamp(v, old[k-1], old[k])``), a
        norm leaving the window is taken out by shifting the entries after its
        first copy down by one, and the two order statistics are gathered at
        positions computed on the device with numpy's arithmetic. So the
        threshold is bitwise the one of the eager step, at O(capacity) work
        per step (capacity: ``window``, or without a window
        :data:`TRACED_CAPACITY` norms or twice the history, whichever is more;
        a run that records more raises inside the graph rather than drop
        norms). The host-side state catches up on the next call outside
        compilation, or when the history or ``state_dict`` is read.
        """
        device = wide.device
        if self._traced_history is None or self._traced_history.device != device:
            self._start_traced(device)
        if not torch.compiler.is_compiling():
            self._grow_traced()
        finite = torch.isfinite(wide)
        value = torch.nan_to_num(wide.to(self.dtype), nan=math.inf, posinf=math.inf)
        if self.include_current:
            self._traced_record(value, finite)
            threshold = self._traced_threshold()
        else:
            empty = self._traced_live() == 0
            threshold = torch.where(empty, math.inf, self._traced_threshold())
            self._traced_record(value, finite)
        self._traced_ahead = True
        scale = torch.where(wide <= threshold, torch.ones_like(wide), threshold / wide).to(norm.dtype)
        scale_(groups, scale, self.foreach)
        return ClipResult(norm=norm, threshold=threshold, scale=scale)

    def _start_traced(self, device: torch.device) -> None:
        """The compiled step's buffers, from the host-side history (traced once, in the first compiled call)."""
        history = self.history().to(device)
        n = history.numel()
        capacity = self.window if self.window is not None else max(TRACED_CAPACITY, 2 * n)
        self._traced_history = torch.full((capacity,), math.nan, dtype=self.dtype, device=device)
        self._traced_history[:n] = history  # the ring starts at slot 0, as after _move_to
        self._traced_sorted = torch.full((capacity,), math.inf, dtype=self.dtype, device=device)
        self._traced_sorted[:n] = torch.sort(history).values
        self._traced_count = torch.full((), n, dtype=torch.int64, device=device)
        self._traced_bound = n

    def _grow_traced(self) -> None:
        """Outside compilation, without a window: double the buffers before they can fill up.

        The host knows a bound on the number of norms recorded (the calls since the buffers were
        made), not the number itself: non-finite norms are not recorded, and that is not read.
        """
        self._traced_bound += 1
        history = self._traced_history
        if self.window is not None or self._traced_bound <= history.numel():
            return
        capacity, device = 2 * history.numel(), history.device
        grown = torch.full((capacity,), math.nan, dtype=self.dtype, device=device)
        grown[: history.numel()] = history
        ordered = torch.full((capacity,), math.inf, dtype=self.dtype, device=device)
        ordered[: history.numel()] = self._traced_sorted
        self._traced_history, self._traced_sorted = grown, ordered

    def _traced_live(self) -> torch.Tensor:
        count = self._traced_count
        return count if self.window is None else torch.clamp(count, max=self.window)

    def _traced_record(self, value: torch.Tensor, finite: torch.Tensor) -> None:
        """Enter ``value`` where ``finite`` (a 0-dim bool tensor); else leave every buffer as it is."""
        history, ordered, count = self._traced_history, self._traced_sorted, self._traced_count
        capacity = history.numel()
        slots = torch.arange(capacity, device=history.device)
        inf = torch.full((1,), math.inf, dtype=self.dtype, device=history.device)
        if self.window is None:
            torch._assert_async(count < capacity, "AutoClip inside torch.compile: the history is full "
                                "(TRACED_CAPACITY norms); pass window=, or run a step outside compilation first")
            slot = count
        else:
            slot = count % capacity
            evicted = history.gather(0, slot.reshape(1))
            first = torch.searchsorted(ordered, evicted)  # the first copy of the norm leaving the window
            first = torch.where((count >= capacity) & finite, first, capacity)
            ordered = torch.where(slots < first, ordered, torch.cat([ordered[1:], inf]))
        history.copy_(torch.where((slots == slot) & finite, value, history))
        below = torch.cat([-inf, ordered[:-1]])
        self._traced_sorted.copy_(torch.where(finite, torch.minimum(torch.maximum(value, below), ordered), ordered))
        count.add_(finite.to(count.dtype))

    def _traced_threshold(self) -> torch.Tensor:
        """numpy.percentile of the live history, from the sorted buffer at device-computed positions."""
        n = self._traced_live()
        virtual = (n.to(torch.float64) - 1) * (self.percentile / 100)
        floor = torch.floor(virtual)
        top = virtual >= n.to(torch.float64) - 1
        lower = torch.where(top, n - 1, floor.to(torch.int64)).clamp(min=0)
        upper = torch.where(top, n - 1, lower + 1).clamp(min=0)
        gamma = virtual - floor
        low = self._traced_sorted.gather(0, lower.reshape(1)).reshape(())
        high = self._traced_sorted.gather(0, upper.reshape(1)).reshape(())
        # numpy's _lerp, operation for operation, with the weights rounded to the state dtype as
        # the Python floats of the eager step are
        diff = high - low
        value = torch.where(gamma >= 0.5, high - diff * (1 - gamma).to(self.dtype), low + diff * gamma.to(self.dtype))
        value = value.nan_to_num(nan=math.inf, posinf=math.inf)
        return torch.where(gamma == 0, low, value)

    def _catch_up(self) -> None:
        """Bring the host-side state up to the norms recorded inside compiled steps (one read of their count)."""
        if not self._traced_ahead:
            return
        assert self._traced_history is not None and self._traced_count is not None
        count, history = int(self._traced_count), self._traced_history
        if self.window is None:
            live = history[:count]
        elif count <= self.window:
            live = history[:count]
        else:
            start = count % self.window
            live = torch.cat([history[start:], history[:start]])
        self._load_history(live.clone(), history.device)  # (which drops the compiled step's buffers)

    # --- state -----------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {"history": self.history().cpu()}

    def _load_state(self, state: Mapping[str, Any]) -> None:
        history = state.get("history")
        if not isinstance(history, torch.Tensor) or history.dim() != 1:
            raise ValueError("state_dict['history'] must be a 1-D tensor of norms")
        if self.window is not None and history.numel() > self.window:
            raise ValueError(f"state_dict['history'] has {history.numel()} norms, more than window={self.window}")
        device = self._history.device if self._history is not None else history.device
        self._load_history(history, device)

    def _load_history(self, history: torch.Tensor, device: torch.device) -> None:
        """Start over from ``history`` (oldest first), with the buffers on ``device``."""
        self._reset()
        n = history.numel()
        capacity = self.window if self.window is not None else max(1024, 2 * n)
        self._history = torch.empty(capacity, dtype=self.dtype, device=device)
        self._history[:n].copy_(history.to(device=device, dtype=self.dtype))
        self._count = n  # slot = count % window is the next to overwrite: the oldest, as saved
        self._rebuild()

    # --- pickling --------------------------------------------------------------------------

    # the history's buffers and the views into them that the sorted insertion uses: pickle does
    # not keep views of one storage together, so they are rebuilt from the history on unpickling
    _BUFFERS = ("_history", "_pending", "_sorted", "_added", "_removed", "_inserts", "_statistics",
                "_traced_history", "_traced_sorted", "_traced_count", "_traced_ahead", "_traced_bound")

    def __getstate__(self) -> dict[str, Any]:
        self._catch_up()
        state = super().__getstate__()
        for key in self._BUFFERS:
            state.pop(key, None)
        state["_pickled_history"] = None if self._history is None else self.history()
        return state

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        state = dict(state)
        history = state.pop("_pickled_history", None)
        super().__setstate__(state)
        self._reset()
        if history is not None:
            self._load_history(history, history.device)
