"""AutoClip: clip to a percentile of the history of gradient norms, exactly and without a sync."""

from __future__ import annotations

import bisect
import math
import warnings
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from . import _groups, _validate
from ._scaling import scale_
from .clippers import Clipper, StepCount
from .result import ClipResult

__all__ = ["AutoClip"]

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
    host-side history catches up when the history, its length or
    ``state_dict`` is read (one read of the count and of the norms: a sync on
    an accelerator), keeping the buffers; once they exist, eager calls on the
    CPU take the same path, so a run switching between compiled and eager
    calls does not recompile for it.

    **Attached** (``attach(optimizer)``), it clips inside the closure of
    ``optimizer.step(closure)`` (each LBFGS evaluation is a call and enters the
    history) and, with a fused optimizer under ``scaler.step``, decides on the
    unscaled norm; see :class:`~gradclip.Clipper`. ``state_dict()`` returns
    copies, and the clipper pickles (detached).

    **Cost on the CPU.** Reading a value costs no synchronisation there, so an
    eager step on the CPU keeps the history on the host, as Python floats: in
    the order recorded (a ``deque``, bounded by ``window``) and sorted (a list
    kept sorted with ``bisect``), so a step reads its two order statistics by
    index and interpolates on floats (a float32 history: three float32 tensor
    operations, as the traced step computes them), with no kernel beyond the norm and the
    multiply. A step costs an :math:`O(n)` move of list entries (:math:`n` the
    history's length: 0.4 us at 1,000 norms, 9 us at 100,000, 0.15 ms at
    1,000,000 without a window, about twice that with one, which also removes
    the oldest, on one core of an Intel Xeon). The reference implementation syncs
    once per parameter and calls ``numpy.percentile`` on a Python list:
    :math:`O(n)` per step too, with a sort of the whole list.

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
        # On the host (eager steps, see "Cost on the CPU"): the norms in the order recorded, and sorted.
        self._recent: deque[float] = deque(maxlen=self.window)
        self._ordered: list[float] = []
        self._reset_traced()

    def _reset_traced(self) -> None:
        # Inside torch.compile and on accelerators (see _traced_step): the history in order (a ring of
        # `window` slots, or up to its capacity), the same norms sorted with +inf after them, and how many
        # were recorded; ahead of the host-side history while _traced_ahead.
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
        return len(self._recent)

    def history(self) -> torch.Tensor:
        """The norms in the history, oldest first (a copy, a 1-D tensor on the CPU in ``dtype``)."""
        self._catch_up()
        return torch.tensor(list(self._recent), dtype=self.dtype)

    # --- the history, on the host ---------------------------------------------------------

    def _record(self, value: float) -> None:
        """Append a norm (a float, already rounded to ``dtype``) to the history, evicting the oldest past ``window``."""
        recent, ordered = self._recent, self._ordered
        if len(recent) == self.window:  # (never, without a window)
            del ordered[bisect.bisect_left(ordered, recent[0])]
        recent.append(value)
        bisect.insort(ordered, value)

    def _threshold(self) -> float:
        """numpy.percentile(history, p) of the history (``inf`` for none), as a float in ``dtype``'s precision."""
        ordered = self._ordered
        if not ordered:
            return math.inf
        lower, upper, gamma = percentile_position(len(ordered), self.percentile)
        low = ordered[lower]
        if gamma == 0.0:
            return low
        high = ordered[upper]
        if self.dtype == torch.float32:  # torch's float32 arithmetic, as the traced step computes it
            value = _numpy_lerp(*torch.tensor((low, high), dtype=torch.float32).unbind(), gamma).item()
        else:
            value = _numpy_lerp(low, high, gamma)
        return math.inf if value != value else value  # inf - inf where it touches inf entries: the answer is inf

    # --- the step --------------------------------------------------------------------------

    def _step(self, groups: _groups.Plan, norm: torch.Tensor, wide: torch.Tensor, count: StepCount) -> ClipResult:
        if count.on_device or self._traced_history is not None:
            # accelerators, torch.compile: whether the norm is finite is not read; and on the CPU a clipper whose
            # traced buffers exist keeps them current, so a compiled step after it finds them as it left them
            return self._traced_step(groups, norm, wide)
        self._catch_up()
        norm_value = wide.item()  # (on the CPU: free)
        finite = math.isfinite(norm_value)  # a non-finite norm is not recorded
        value = norm_value if self.dtype == torch.float64 else wide.to(self.dtype).item()
        if self.include_current and finite:
            self._record(value)
        limit = self._threshold()
        if not self.include_current and finite:
            self._record(value)
        # unchanged unless the norm exceeds the threshold (with the current norm in the history the
        # threshold can equal it), and then scaled to exactly the threshold: torch's c / (g + 1e-6)
        # would shrink norms near 1e-6 far below c. NaN and inf norms give NaN and 0, as torch's.
        # One IEEE division, as the traced step's tensors compute it; a factor of 1 multiplies nothing.
        factor = 1.0 if norm_value <= limit else limit / norm_value
        scale_(groups, factor, self.foreach)
        return ClipResult(norm=norm, threshold=torch.scalar_tensor(limit, dtype=self.dtype, device=norm.device),
                          scale=torch.scalar_tensor(factor, dtype=norm.dtype, device=norm.device))

    # --- inside torch.compile --------------------------------------------------------------

    def _traced_step(self, groups: _groups.Plan, norm: torch.Tensor, wide: torch.Tensor) -> ClipResult:
        """The step inside ``torch.compile``: the same threshold, from buffers of a fixed size.

        The host-side history (Python floats) cannot enter a compiled graph
        without becoming constants of it, and a graph would recompile for each
        of their values. Here the whole live history is kept sorted, padded with +inf: each norm is
        inserted with one clamp (``new[k] = clamp(v, old[k-1], old[k])``), a
        norm leaving the window is taken out by shifting the entries after its
        first copy down by one, and the two order statistics are gathered at
        positions computed on the device with numpy's arithmetic. So the
        threshold is bitwise the one of the eager step, at O(capacity) work
        per step (capacity: ``window``, or without a window
        :data:`TRACED_CAPACITY` norms or twice the history, whichever is more;
        a run that records more raises inside the graph rather than drop
        norms). The host-side history catches up when the history, its length
        or ``state_dict`` is read; the buffers stay, and once they exist eager
        calls on the CPU update them too, so switching between compiled and
        eager calls does not rebuild them (``load_state_dict`` and unpickling
        do: the next compiled call then traces its start again).
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
        self._traced_history[:n] = history  # the ring starts at slot 0 with the oldest norm
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
        """Bring the host-side history up to the norms the traced steps recorded (one read of their count and
        of the norms); the traced buffers stay, so a compiled step after it neither rebuilds nor recompiles."""
        if not self._traced_ahead:
            return
        assert self._traced_history is not None and self._traced_count is not None
        count, history = int(self._traced_count), self._traced_history
        if self.window is None or count <= self.window:
            live = history[:count]
        else:
            start = count % self.window
            live = torch.cat([history[start:], history[:start]])
        self._set_host(live)
        self._traced_ahead = False

    # --- state -----------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {"history": self.history()}

    def _load_state(self, state: Mapping[str, Any]) -> None:
        history = state.get("history")
        if not isinstance(history, torch.Tensor) or history.dim() != 1:
            raise ValueError("state_dict['history'] must be a 1-D tensor of norms")
        if self.window is not None and history.numel() > self.window:
            raise ValueError(f"state_dict['history'] has {history.numel()} norms, more than window={self.window}")
        if bool((torch.isnan(history) | (history < 0)).any()):  # (norms: never NaN, never negative)
            raise ValueError("state_dict['history'] holds NaN or a negative value, which AutoClip never records: "
                             "the state is corrupt. Load a state saved by AutoClip.state_dict(), or start without one.")
        self._load_history(history)

    def _load_history(self, history: torch.Tensor) -> None:
        """Start over from ``history`` (a 1-D tensor, oldest first; read once on the host)."""
        self._reset()
        self._set_host(history)

    def _set_host(self, history: torch.Tensor) -> None:
        """The host-side history from a 1-D tensor of norms, oldest first (read once)."""
        self._recent = deque(history.detach().to(dtype=self.dtype).tolist(), maxlen=self.window)
        self._ordered = sorted(self._recent)

    # --- pickling --------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        self._catch_up()
        state = super().__getstate__()
        for key in _TRACED:  # rebuilt from the history when a compiled step next needs them
            state.pop(key, None)
        # copies: copy.copy must not share the history with the original
        state.update(_recent=deque(self._recent, maxlen=self.window), _ordered=list(self._ordered))
        return state

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        state = dict(state)
        history = state.pop("_pickled_history", None)  # pickled before the history moved to the host
        for key in _OLD_BOOKKEEPING:
            state.pop(key, None)
        super().__setstate__(state)
        if "_recent" in state:
            self._reset_traced()
        else:
            self._reset()
            if history is not None:
                self._load_history(history)


def _numpy_lerp(low: Any, high: Any, gamma: float) -> Any:
    """numpy's ``_lerp`` between two order statistics (floats, or 0-dim tensors), operation for operation: a fused
    multiply-add would not be bitwise."""
    diff = high - low
    return high - diff * (1 - gamma) if gamma >= 0.5 else low + diff * gamma


# The host-side counters of the tensor bookkeeping that pickles made before 2026-12-08 carry (unused since).
_OLD_BOOKKEEPING = ("_count", "_sorted_n", "_n_added", "_n_removed", "_rebuild_every")

# The buffers of the steps on accelerators and inside torch.compile (see AutoClip._traced_step).
_TRACED = ("_traced_history", "_traced_sorted", "_traced_count", "_traced_ahead", "_traced_bound")
