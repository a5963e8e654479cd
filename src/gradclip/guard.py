"""SpikeGuard: skip the optimizer step on a non-finite or outlying gradient norm, without a sync."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from . import _groups, _validate
from .clippers import Clipper, optimizer_parameters
from .result import ClipResult

__all__ = ["SpikeGuard"]


class SpikeGuard(Clipper):
    r"""Skip the optimizer step when the gradient norm is non-finite or an outlier.

    With :math:`h` the finite norms among the last ``window`` steps (the
    current one excluded), the step is skipped when

    .. math::

        \neg\,\mathrm{isfinite}(g) \;\lor\; \big(|h| \ge n_{\min} \land g > \ell\big), \qquad
        \ell = \begin{cases}
            \bar h + k\, s_h & \text{mode="zscore"} \\
            k \cdot \operatorname{median}(h) & \text{mode="median"}
        \end{cases}

    with k = ``threshold``, :math:`s_h` the sample standard deviation and the
    median the lower median (``torch.nanmedian``). Only large norms count as
    spikes (one-sided). This is the 0/1 *step factor* rule of OLMo-core's
    ``SkipStepOptimizer`` (z-score over a rolling window of 128, factor 6; see
    also the RNMT+ rule of Chen et al. 2018, `arXiv:1804.09849
    <https://arxiv.org/abs/1804.09849>`__). Every finite norm, spikes included,
    enters the history, so a lasting change of scale is absorbed after about
    ``window`` steps instead of skipping forever.

    The guard never changes the gradients. Called by hand it only decides:
    ``result.scale`` is the step factor (1.0 to step, 0.0 to skip),
    ``result.threshold`` is :math:`\ell` (``inf`` before ``min_history`` norms).
    **Attached** to an optimizer it enforces the decision without a host sync:
    the pre-hook copies the parameters and the optimizer's state tensors, the
    step runs unconditionally, and the post-hook puts back the copies with
    ``torch.where(skip, copy, new)``. A skipped step therefore leaves
    parameters and optimizer state bitwise unchanged (momentum, Adam moments
    and step counts, weight decay included). The cost: one extra copy of the
    parameters and of the optimizer state in memory, and a copy plus a select
    over them each step. Two cases read the flag on the host (one sync):
    state tensors on another device than the gradients (Adam's ``step`` stays
    on the CPU unless ``capturable=True`` or ``fused=True``), and the very
    first step of an optimizer, when the state the step creates must be deleted
    if it is skipped.

    With :class:`torch.amp.GradScaler`: call ``scaler.step(optimizer)`` as
    usual. The scaler unscales first and itself skips steps with inf/NaN
    gradients (the guard's hooks do not run then, and such steps are not in
    ``skipped_steps``); the guard sees unscaled gradients on the steps the
    scaler takes.

    Args:
        mode: ``"zscore"`` or ``"median"``.
        threshold: k, > 0 (for ``"median"``, a multiple of the median, usually > 1).
        window: how many recent norms form the history, >= 2.
        min_history: finite norms needed before outliers are detected, in [2, window].
        norm_type: p of the global norm, in (0, inf].
        foreach: as in :func:`gradclip.clip_grad_norm_`.
        scaler: the ``GradScaler`` of the loss, to check that gradients were unscaled.
        process_group, replicated: for sharded gradients under ``torch.distributed``,
            as in :class:`~gradclip.Clipper`.

    Attributes:
        skipped_steps: the number of steps skipped so far, an int64 0-dim tensor.

    Raises:
        RuntimeError: no parameter has a gradient (call ``loss.backward()`` first), the clipper is called twice on the same gradients, or, with ``scaler=``, the gradients are still scaled.
        ValueError: an argument is outside the range given above (the message names it).
        TypeError: an argument has the wrong type (the message names it).

    References:
        * Chowdhery et al. (2022), "PaLM" (skipping batches around loss spikes), `arXiv:2204.02311 <https://arxiv.org/abs/2204.02311>`__.
        * Kumar, Owen, Chowdhury and Güra (2025), "ZClip: Adaptive Spike Mitigation for LLM Pre-Training", `arXiv:2504.02507 <https://arxiv.org/abs/2504.02507>`__.

    Example:
        >>> import torch, gradclip
        >>> w = torch.nn.Parameter(torch.zeros(1))
        >>> opt = torch.optim.SGD([w], lr=1.0)
        >>> guard = gradclip.SpikeGuard(threshold=3.0, min_history=4).attach(opt)
        >>> for g in (1.0, 1.1, 0.9, 1.0, 50.0):
        ...     w.grad = torch.tensor([g])
        ...     opt.step()
        >>> int(guard.skipped_steps), round(float(w.detach()), 4)
        (1, -4.0)
    """

    def __init__(self, mode: str = "zscore", threshold: float = 6.0, window: int = 128,
                 min_history: int = 20, *, norm_type: float | str = 2.0, foreach: bool | None = None,
                 scaler: torch.amp.GradScaler | None = None, process_group: Any = None,
                 replicated: Iterable[torch.Tensor] | None = None) -> None:
        super().__init__(norm_type=norm_type, foreach=foreach, scaler=scaler, process_group=process_group,
                         replicated=replicated)
        self.mode = _validate.check_choice("mode", mode, ("zscore", "median"))
        self.threshold = _validate.check_real("threshold", threshold, 0.0, None, low_open=True)
        self.window = _validate.check_int("window", window, 2)
        self.min_history = _validate.check_int("min_history", min_history, 2)
        if self.min_history > self.window:
            raise ValueError(f"min_history must be in [2, window={self.window}], got {min_history}")
        self._history: torch.Tensor | None = None
        self.skipped_steps = torch.zeros((), dtype=torch.int64)
        self.skip: torch.Tensor | None = None
        """The last decision, a bool 0-dim tensor (``True``: skip)."""
        self._hooks: list[Any] = []
        self._copies: list[torch.Tensor] | None = None
        self._tracked: list[tuple[torch.Tensor, str | None]] = []
        self._fresh: list[torch.Tensor] = []

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "mode": self.mode, "threshold": self.threshold,
                "window": self.window, "min_history": self.min_history}

    def _step(self, groups: list[_groups.Group], norm: torch.Tensor, wide: torch.Tensor) -> ClipResult:
        device = norm.device
        if self._history is None or self._history.device != device:
            history = torch.full((self.window,), math.nan, dtype=torch.float64, device=device)
            if self._history is not None:
                history.copy_(self._history)
            self._history = history
        self.skipped_steps = self.skipped_steps.to(device)
        x = wide.to(torch.float64)
        h = self._history
        valid = torch.isfinite(h)
        count = valid.sum()
        if self.mode == "zscore":
            mean = torch.where(valid, h, 0.0).sum() / count
            var = torch.where(valid, (h - mean) ** 2, 0.0).sum() / (count - 1)
            level = mean + self.threshold * var.sqrt()
        else:
            level = self.threshold * torch.nanmedian(h)
        inf = torch.full((), math.inf, dtype=torch.float64, device=device)
        level = torch.where(count >= self.min_history, level, inf)
        finite = torch.isfinite(x)
        skip = ~finite | (x > level)
        slot = self.steps % self.window
        h[slot : slot + 1].copy_(torch.where(finite, x, math.nan).reshape(1))
        self.skipped_steps = self.skipped_steps + skip
        self.skip = skip
        factor = (~skip).to(norm.dtype)
        return ClipResult(norm=norm, threshold=level, scale=factor)

    # --- enforcing the decision on an optimizer ----------------------------------------------

    def attach(self, optimizer: torch.optim.Optimizer) -> "SpikeGuard":
        """Decide before each ``optimizer.step()`` and undo the step when it must be skipped.

        Returns ``self``.
        """
        super().attach(optimizer)
        self._hooks = [optimizer.register_step_post_hook(lambda opt, args, kwargs: self._restore(opt))]
        return self

    def detach(self) -> None:
        super().detach()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._copies = None

    @torch.no_grad()
    def __call__(self, parameters: Any, optimizer: torch.optim.Optimizer | None = None) -> ClipResult:
        result = super().__call__(parameters, optimizer)
        if optimizer is not None and self._hooks:
            self._snapshot(optimizer)
        return result

    def _snapshot(self, optimizer: torch.optim.Optimizer) -> None:
        tracked: list[tuple[torch.Tensor, str | None]] = []
        fresh = []
        for p in optimizer_parameters(optimizer):
            tracked.append((p, None))
            state = optimizer.state.get(p)
            if not state:
                fresh.append(p)
                continue
            tracked.extend((p, key) for key, value in state.items() if isinstance(value, torch.Tensor))
        tensors = [self._lookup(optimizer, p, key) for p, key in tracked]
        copies = self._copies
        if copies is None or len(copies) != len(tensors) or any(
            c.shape != t.shape or c.dtype != t.dtype or c.device != t.device for c, t in zip(copies, tensors)
        ):
            copies = [torch.empty_like(t) for t in tensors]
        for c, t in zip(copies, tensors):
            c.copy_(t)
        self._copies, self._tracked, self._fresh = copies, tracked, fresh

    @staticmethod
    def _lookup(optimizer: torch.optim.Optimizer, p: torch.Tensor, key: str | None) -> torch.Tensor:
        return p.data if key is None else optimizer.state[p][key]

    @torch.no_grad()
    def _restore(self, optimizer: torch.optim.Optimizer) -> None:
        skip, copies = self.skip, self._copies
        if skip is None or copies is None:
            return
        for (p, key), copy in zip(self._tracked, copies):
            tensor = self._lookup(optimizer, p, key)
            flag = skip if tensor.device == skip.device else skip.to(tensor.device)  # a sync: see docstring
            torch.where(flag, copy, tensor, out=tensor)
        if self._fresh and bool(skip):  # the optimizer's first step: one sync, once
            for p in self._fresh:
                optimizer.state.pop(p, None)
        self._fresh = []

    # --- state -----------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        history = self._history
        return {
            "history": None if history is None else history.cpu(),
            "skipped_steps": self.skipped_steps.cpu(),
        }

    def _load_state(self, state: Mapping[str, Any]) -> None:
        history, skipped = state.get("history"), state.get("skipped_steps")
        if history is not None and (not isinstance(history, torch.Tensor) or history.shape != (self.window,)):
            raise ValueError(f"state_dict['history'] must be a tensor of shape ({self.window},)")
        if not isinstance(skipped, torch.Tensor):
            raise ValueError("state_dict['skipped_steps'] must be a tensor")
        self._history = None if history is None else history.to(torch.float64).clone()
        self.skipped_steps = skipped.to(torch.int64).clone()
        self.skip = None
