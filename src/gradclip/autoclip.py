"""AutoClip: clip to a percentile of the history of gradient norms, exactly and without a sync."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from . import _groups
from .clip import clip_coefficient, scale_
from .clippers import Clipper, check_bool, check_int, check_real, check_state_dtype
from .result import ClipResult

__all__ = ["AutoClip"]

_MIN_REBUILD = 16


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
    `arXiv:2007.14469 <https://arxiv.org/abs/2007.14469>`_):

    .. math::

        c_t = P_p(G_t), \qquad
        g_t \leftarrow g_t \cdot \min\Big(1, \frac{c_t}{\|g_t\| + 10^{-6}}\Big)

    where :math:`P_p` is ``numpy.percentile`` with linear interpolation: with
    the history sorted as :math:`x_{(0)} \le \dots \le x_{(n-1)}`,
    :math:`v = (n-1)\,p/100`, :math:`i = \lfloor v \rfloor`, :math:`\gamma = v - i`,
    :math:`P_p = x_{(i)} + \gamma\,(x_{(i+1)} - x_{(i)})`.
    The paper keeps the whole history and includes the current norm
    (``include_current=True, window=None``, its recommended p = 10); the
    ``autoclip`` package uses only earlier norms over a window of 1000
    (``include_current=False, window=1000``; the first step is then not clipped).

    **Exactness.** In ``dtype=torch.float64`` (the default) the threshold is
    bitwise ``numpy.percentile`` of the same history: the same host-side
    position arithmetic, the same order statistics and the same interpolation
    formula. In float32 it equals numpy's float32 result to rounding.
    A non-finite norm is recorded as ``+inf`` (NaN too), so it sorts to the top
    and never lowers the threshold; if the percentile falls among ``+inf``
    entries the threshold is ``inf`` (numpy gives ``nan`` there).

    **Cost.** The history lives in device tensors (doubling storage, or a ring
    buffer of ``window`` entries). A sorted snapshot S of the history is
    rebuilt (one ``torch.sort``) every :math:`m = \max(16, \lfloor\sqrt n\rfloor)`
    steps; in between, the values added (R) and evicted by the window (D)
    since the snapshot are kept in small buffers. The two order statistics
    needed lie among the slice ``S[i - |R| : i + 1 + |D| + 1]`` (indices known on
    the host) and R; their exact ranks in :math:`S + R - D` come from
    ``torch.searchsorted``. So a step costs :math:`O(\sqrt n \log n)` work in a
    fixed number of kernels, plus an :math:`O(n \log n)` sort every
    :math:`\sqrt n` steps: :math:`O(\sqrt n \log n)` amortised per step,
    with an :math:`O(n\log n)` step once every :math:`\sqrt n` steps. The
    reference implementation syncs once per parameter and calls
    ``numpy.percentile`` on a Python list: :math:`O(n)` per step. No step
    reads a tensor value on the host.

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
        self.percentile = check_real("percentile", percentile, 0.0, 100.0)
        self.window = None if window is None else check_int("window", window, 1)
        self.include_current = check_bool("include_current", include_current)
        self.dtype = check_state_dtype(dtype)
        self._reset()

    def _reset(self) -> None:
        self._count = 0  # norms recorded so far (host int: known without reading a tensor)
        self._history: torch.Tensor | None = None  # chronological, or a ring when window is set
        self._sorted: torch.Tensor | None = None
        self._sorted_n = 0
        self._added: torch.Tensor | None = None
        self._removed: torch.Tensor | None = None
        self._n_added = 0
        self._n_removed = 0
        self._rebuild_every = _MIN_REBUILD

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "percentile": self.percentile, "window": self.window,
                "include_current": self.include_current, "dtype": str(self.dtype)}

    def __len__(self) -> int:
        """The number of norms in the history."""
        return self._count if self.window is None else min(self._count, self.window)

    def history(self) -> torch.Tensor:
        """The norms in the history, oldest first (a copy, on the device)."""
        n = len(self)
        if self._history is None:
            return torch.empty(0, dtype=self.dtype)
        if self.window is None or self._count <= self.window:
            return self._history[:n].clone()
        start = self._count % self.window
        return torch.cat([self._history[start:], self._history[:start]])

    # --- the history ----------------------------------------------------------------------

    def _record(self, value: torch.Tensor) -> None:
        """Append a 0-dim tensor to the history; host bookkeeping only."""
        device = value.device
        value = value.reshape(1)
        if self._history is None or self._history.device != device:
            self._move_to(device)
        assert self._history is not None and self._added is not None and self._removed is not None
        if self.window is None:
            if self._count == self._history.numel():
                grown = torch.empty(2 * self._count, dtype=self.dtype, device=device)
                grown[: self._count].copy_(self._history)
                self._history = grown
            self._history[self._count : self._count + 1].copy_(value)
        else:
            slot = self._count % self.window
            if self._count >= self.window:
                self._removed[self._n_removed : self._n_removed + 1].copy_(self._history[slot : slot + 1])
                self._n_removed += 1
            self._history[slot : slot + 1].copy_(value)
        self._added[self._n_added : self._n_added + 1].copy_(value)
        self._n_added += 1
        self._count += 1
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
        self._rebuild()

    def _rebuild(self) -> None:
        """Sort the live history into the snapshot and empty the pending buffers."""
        assert self._history is not None
        n = len(self)
        device = self._history.device
        self._sorted = torch.sort(self._history[:n]).values
        self._sorted_n = n
        self._rebuild_every = max(_MIN_REBUILD, math.isqrt(n))
        if self._added is None or self._added.numel() < self._rebuild_every or self._added.device != device:
            self._added = torch.empty(self._rebuild_every, dtype=self.dtype, device=device)
            self._removed = torch.empty(self._rebuild_every, dtype=self.dtype, device=device)
        self._n_added = self._n_removed = 0

    def _order_statistics(self, lower: int, upper: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``lower``-th and ``upper``-th smallest live norms (0-based), as 0-dim tensors."""
        assert self._sorted is not None and self._added is not None and self._removed is not None
        r, d, s = self._n_added, self._n_removed, self._sorted_n
        snapshot = self._sorted
        start = max(0, lower - r)
        if d == 0:
            # S[:start] holds only values ranked before `lower`, and S[upper + 1:] only values
            # ranked after `upper`: in sorted(S[start : upper + 1] + R) they sit at index - start.
            window = snapshot[start : min(s, upper + 1)]
            candidates = torch.cat([window, self._added[:r]]) if r else window
            ordered = torch.sort(candidates).values if r else candidates
            return ordered[lower - start], ordered[upper - start]
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
        n = len(self)
        lower, upper, gamma = percentile_position(n, self.percentile)
        low, high = self._order_statistics(lower, upper)
        if gamma == 0.0:
            return low
        diff = high - low
        value = high - diff * (1 - gamma) if gamma >= 0.5 else low + diff * gamma
        # inf - inf gives nan where the interpolation touches +inf entries; the answer there is inf
        return torch.nan_to_num(value, nan=math.inf, posinf=math.inf)

    # --- the step --------------------------------------------------------------------------

    def _step(self, groups: list[_groups.Group], norm: torch.Tensor) -> ClipResult:
        value = norm.detach().to(self.dtype)
        value = torch.nan_to_num(value, nan=math.inf, posinf=math.inf)
        if self.include_current:
            self._record(value)
            threshold = self._threshold()
        else:
            threshold = (self._threshold() if len(self) else
                         torch.tensor(math.inf, dtype=self.dtype, device=norm.device))
            self._record(value)
        scale = clip_coefficient(threshold.to(norm.dtype), norm)
        scale_(groups, scale, self.foreach)
        return ClipResult(norm=norm, threshold=threshold, scale=scale)

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
        self._reset()
        n = history.numel()
        capacity = self.window if self.window is not None else max(1024, 2 * n)
        self._history = torch.empty(capacity, dtype=self.dtype, device=device)
        self._history[:n].copy_(history.to(device=device, dtype=self.dtype))
        self._count = n  # slot = count % window is the next to overwrite: the oldest, as saved
        self._rebuild()
