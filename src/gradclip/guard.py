"""SpikeGuard: skip the optimizer step on a non-finite or outlying gradient norm, without a sync."""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch

from . import _groups, _validate, distributed
from .clippers import Clipper, StepCount, optimizer_parameters
from .result import ClipResult

__all__ = ["SpikeGuard"]

_THE_GUARDS: Any = object()
"""``record_loss``'s default ``process_group``: the guard's own."""


class SpikeGuard(Clipper):
    r"""Skip the optimizer step when the gradient norm is non-finite or an outlier.

    With :math:`h` the last ``window`` finite norms (the current one
    excluded), the step is skipped when

    .. math::

        \neg\,\mathrm{isfinite}(g) \;\lor\; \big(|h| \ge n_{\min} \land g > \ell\big), \qquad
        \ell = \begin{cases}
            \bar h + k\, s_h & \text{mode="zscore"} \\
            k \cdot \operatorname{median}(h) & \text{mode="median"}
        \end{cases}

    with k = ``threshold``, :math:`s_h` the sample standard deviation and the
    median the lower median (``torch.nanmedian``). By default only large norms
    count as spikes (one-sided); ``two_sided=True`` also skips a value below
    :math:`\bar h - k\, s_h` (``"median"``: below :math:`\operatorname{median}(h)/k`).
    Every finite value, spikes included, enters the history, so a lasting change
    of scale is absorbed after about ``window`` steps instead of skipping forever.
    A call on a non-finite norm skips the step and changes no state but
    ``skipped_steps``: it enters no history (of the norm nor of the loss), evicts
    nothing and is not counted in ``steps``.

    **The loss as a second signal.** With ``signals=("loss", "norm")`` the same
    test runs on the loss, with its own history, given each step by
    :meth:`record_loss`; the step is skipped if either signal is an outlier (or
    non-finite). :meth:`olmo_core` is the rule of OLMo-core's
    ``SkipStepOptimizer`` (allenai/OLMo-core, ``optim/skip_step_optimizer.py``):
    both signals, :math:`x - \bar h > 6\, s_h` over the previous 128 values,
    once 64 values are known (the current one included). The defaults here
    differ from it on purpose: the norm only (the loss needs :meth:`record_loss`
    on every step, which a guard attached by one line cannot ask for), and
    ``min_history=20``, so that a run is guarded from its 21st step instead of
    its 64th (the book's runs are 200 to 500 steps; the standard deviation of
    20 normal values has a relative standard error of about 16%,
    :math:`1/\sqrt{2(n-1)}`); the book's stored runs use these defaults.
    llm.c's outlier detector and Chen et al. 2018 (RNMT+, `arXiv:1804.09849
    <https://arxiv.org/abs/1804.09849>`__) use z-scores of the loss and norm too.

    The guard never changes the gradients. Called by hand it only decides:
    ``result.scale`` is the step factor (1.0 to step, 0.0 to skip),
    ``result.threshold`` is :math:`\ell` (``inf`` before ``min_history`` norms).
    **Attached** to an optimizer it enforces the decision without a host sync:
    the pre-hook copies the parameters and the optimizer's state, the step
    runs unconditionally, and the post-hook puts back the copies of tensors
    with ``torch.where(skip, copy, new)``. A skipped step therefore leaves
    parameters and optimizer state bitwise unchanged (momentum, Adam moments
    and step counts, weight decay included). The cost: one extra copy of the
    parameters and of the optimizer state tensors in memory, and a copy plus
    a select over them each step.

    Optimizer state that is not a tensor (a Python ``int`` step counter,
    LBFGS's ``n_iter``, ``func_evals`` and lists of directions, a new state
    entry, a ``param_groups`` entry the step changes) cannot be chosen on the
    device. The pre-hook keeps a copy of every such value (plain values as
    they are, containers and the tensors in them copied) and a fingerprint
    (values, and the identity and version counter of tensors); the post-hook
    compares fingerprints on the host, which costs nothing, and only when a
    step changed such state does it read the decision on the host (one sync)
    and, on a skip, put the copies back. A value of another type (not a
    number, string, tensor, list, tuple or dict) is assumed changed. So a
    step costs no sync with optimizers whose state is all tensors, once they
    have created it (SGD, Adam and every ``torch.optim`` optimizer but LBFGS,
    which reads the loss on the host every step anyway). The cases that
    read the decision on the host (one sync each): such a change (including
    the very first step of an optimizer, which creates its state, deleted
    again if the step is skipped), and state tensors on another device than
    the gradients (Adam's ``step`` stays on the CPU unless ``capturable=True``
    or ``fused=True``).

    With ``optimizer.step(closure)`` the snapshot is taken before the closure
    runs and the decision is made inside it, after each evaluation's
    ``backward()``: an optimizer that evaluates the closure several times per
    step (LBFGS) has each evaluation's norm decided on and entered in the
    history, and the whole step is skipped if any evaluation is
    (``skipped_steps`` counts the step once).

    With :class:`torch.amp.GradScaler`: call ``scaler.step(optimizer)`` as
    usual. The scaler unscales first and itself skips steps with inf/NaN
    gradients (the guard's hooks do not run then, and such steps are not in
    ``skipped_steps``); the guard sees unscaled gradients on the steps the
    scaler takes. A fused optimizer (``fused=True``) unscales in its own
    kernel: the guard decides on the norm divided by the scale, and the
    steps the scaler skips run the hooks, so the guard sees a non-finite norm;
    it reads the scaler's ``found_inf`` on the device and leaves those steps out
    of ``skipped_steps`` too, so the guard's state is the same as with a
    non-fused optimizer. Called by hand after ``scaler.unscale_`` with
    ``scaler=`` given, it reads the scaler's ``found_inf`` the same way; without
    ``scaler=`` it counts an overflow step in ``skipped_steps`` (it decided to
    skip it) and changes nothing else.

    ``state_dict()`` returns copies; the guard pickles (detached, with no
    snapshot).

    Args:
        mode: ``"zscore"`` or ``"median"``.
        threshold: k, > 0 (for ``"median"``, a multiple of the median, usually > 1).
        window: how many recent norms form the history, >= 2.
        min_history: finite values of a signal needed before its outliers are detected, in [2, window].
        signals: ``"norm"`` (default), ``"loss"``, or both, ``("loss", "norm")``; with the loss, call
            :meth:`record_loss` every step.
        two_sided: also skip values far below the history, default ``False``.
        norm_type: p of the global norm, in (0, inf].
        foreach: as in :func:`gradclip.clip_grad_norm_`.
        scaler: the ``GradScaler`` of the loss, to check that gradients were unscaled.
        process_group, replicated: for sharded gradients under ``torch.distributed``,
            as in :class:`~gradclip.Clipper`.

    Attributes:
        skipped_steps: the number of steps skipped so far, an int64 0-dim tensor.

    Raises:
        RuntimeError: the guard watches the loss and :meth:`record_loss` was not called for this step, no parameters were given (an empty list, or an iterator consumed earlier), no parameter has a gradient (call ``loss.backward()`` first, or inside the closure given to ``optimizer.step``), the clipper is called twice on the same gradients, or, with ``scaler=``, it is called by hand on gradients that are still scaled (call ``scaler.unscale_(optimizer)`` first, or attach it).
        ValueError: an argument is outside the range given above (the message names it).
        TypeError: an argument has the wrong type (the message names it), a gradient is sparse, or (attached) an optimizer state value cannot be copied.

    References:
        * Chowdhery et al. (2022), "PaLM" (skipping batches around loss spikes), `arXiv:2204.02311 <https://arxiv.org/abs/2204.02311>`__.
        * Kumar, Owen, Chowdhury and Güra (2025), "ZClip: Adaptive Spike Mitigation for LLM Pre-Training", `arXiv:2504.02507 <https://arxiv.org/abs/2504.02507>`__.
        * OLMo-core's ``SkipStepOptimizer`` (reference code: https://github.com/allenai/OLMo-core, ``src/olmo_core/optim/skip_step_optimizer.py``); OLMo 2 (2025), `arXiv:2501.00656 <https://arxiv.org/abs/2501.00656>`__.

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

    _rescales_gradients = False  # skipping a step is right under Muon too: no warning on attach

    def __init__(self, mode: str = "zscore", threshold: float = 6.0, window: int = 128,
                 min_history: int = 20, *, signals: str | Iterable[str] = "norm", two_sided: bool = False,
                 norm_type: float | str = 2.0, foreach: bool | None = None,
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
        self.signals = _check_signals(signals)
        if not isinstance(two_sided, bool):
            raise TypeError(f"two_sided must be a bool, got {type(two_sided).__name__}")
        self.two_sided = two_sided
        self._history: torch.Tensor | None = None
        self._loss_history: torch.Tensor | None = None
        self._pending_loss: torch.Tensor | None = None  # set by record_loss, used by the next decision
        self.skipped_steps = torch.zeros((), dtype=torch.int64)
        self.skip: torch.Tensor | None = None
        """The last decision, a bool 0-dim tensor (``True``: skip)."""
        self._hooks: list[Any] = []
        self._copies: list[torch.Tensor] | None = None  # reused from step to step when the shapes agree
        self._snapshot: _Snapshot | None = None
        self._in_step = False  # between the pre-hook and the post-hook of an attached step
        self._step_skip: torch.Tensor | None = None  # the decision of the step so far (closures: OR)
        self._scaler_skips: torch.Tensor | None = None  # attached, fused, under scaler.step: found_inf != 0

    @classmethod
    def olmo_core(cls, **overrides: Any) -> "SpikeGuard":
        r"""OLMo-core's ``SkipStepOptimizer`` rule: loss and gradient norm, more than 6 standard deviations above the mean.

        ``mode="zscore"``, ``threshold=6``, ``window=128``, ``min_history=63`` (OLMo-core decides once
        64 losses are known, the current one included), ``signals=("loss", "norm")``,
        ``two_sided=False`` (a step is skipped when :math:`x - \bar h > 6\, s_h` for the loss or the
        norm; OLMo-core's ``get_step_factor`` has compared one-sided since its first week, commit
        a14de852, 2024-09-06, which removed an ``abs()``); ``overrides`` replace any of these or set
        the other arguments. Call :meth:`record_loss` with each step's loss before ``optimizer.step()``.

        Difference from the reference (OLMo-core ``main``, which keeps every value): a non-finite loss
        or norm skips the step and is kept out of the history; in OLMo-core's ``main`` one NaN makes
        every later mean NaN, so every step is skipped until it leaves the window (a later OLMo-core
        branch, commit 15714540, masks non-finite values out of the history as this does).

        Raises:
            ValueError, TypeError: an override is outside what :class:`SpikeGuard` accepts.

        References:
            * OLMo-core's ``SkipStepOptimizer.get_step_factor``, `allenai/OLMo-core src/olmo_core/optim/skip_step_optimizer.py <https://github.com/allenai/OLMo-core/blob/main/src/olmo_core/optim/skip_step_optimizer.py>`__; tested step by step against a float64 transcription of it (``tests/test_guard.py``).
            * Team OLMo (2025), "2 OLMo 2 Furious", `arXiv:2501.00656 <https://arxiv.org/abs/2501.00656>`__.

        Example:
            >>> import torch, gradclip
            >>> w = torch.nn.Parameter(torch.zeros(1))
            >>> opt = torch.optim.SGD([w], lr=0.1)
            >>> guard = gradclip.SpikeGuard.olmo_core().attach(opt)
            >>> for step in range(80):
            ...     loss = 2.0 + 0.01 * (step % 3) + (5.0 if step == 70 else 0.0)  # a loss spike at step 70
            ...     w.grad = torch.ones(1)
            ...     guard.record_loss(loss)
            ...     opt.step()
            >>> int(guard.skipped_steps)
            1
        """
        settings = {"mode": "zscore", "threshold": 6.0, "window": 128, "min_history": 63,
                    "signals": ("loss", "norm"), "two_sided": False, **overrides}
        return cls(**settings)

    def record_loss(self, loss: torch.Tensor | float, *, process_group: Any = _THE_GUARDS) -> None:
        """Give the guard this step's loss, for ``signals`` that include ``"loss"``.

        Call it once per step before ``optimizer.step()`` (or before calling the guard by hand); with
        ``optimizer.step(closure)``, inside the closure. The value is read without a sync: a tensor
        is detached and kept on its device (a batch of losses is averaged). A second call before the
        guard decides replaces the first (a step the ``GradScaler`` skips never reaches the guard, and
        the next step's loss replaces its loss), so:

        * with gradient accumulation, record the step's loss once, the sum of the micro-batches'
          losses as they were backpropagated (each divided by the number of micro-batches: the loss
          of the whole batch), as OLMo-core's train module does;
        * under data parallelism (DDP, FSDP), where each rank computes the loss of its own part of
          the batch, the guard must see the loss averaged over the ranks, or ranks fed different
          losses decide differently and the replicas drift apart. ``process_group`` does it (one
          ``all_reduce``, no sync; OLMo-core reduces the loss the same way before its skip-step
          optimizer): by default the guard's own ``process_group`` (FSDP, where the norm needs it
          too); under DDP, whose gradients are already the same on every rank, leave the guard's
          unset and pass ``record_loss(loss, process_group=True)`` (or the data-parallel group).
          ``process_group=None`` records this rank's loss as it is.
        * under ``GradScaler``, record the loss before ``scaler.scale`` (the unscaled loss).

        A non-finite loss skips the step. If the step's norm is finite (the step is counted in
        ``steps`` and its norm recorded), the loss takes its place in the loss history as a gap
        (NaN, which evicts the oldest loss as the norm evicts the oldest norm): it never reaches a
        mean, a deviation or a median.

        Args:
            loss: this step's loss, a number or a floating-point tensor (averaged if it has entries).
            process_group: the ranks to average the loss over (see above; as ``process_group=`` of
                the guard accepts; default: the guard's).

        Raises:
            RuntimeError: ``"loss"`` is not among the guard's ``signals``, or a group is asked for
                but ``torch.distributed`` is not initialized.
            TypeError: ``loss`` is not a real number or a real floating-point tensor, or
                ``process_group`` is not a group.
        """
        if "loss" not in self.signals:
            raise RuntimeError(f"record_loss: this SpikeGuard watches signals={self.signals}; create it "
                               "with signals=('loss', 'norm') (or SpikeGuard.olmo_core()) to test the loss")
        if isinstance(loss, torch.Tensor):
            if not loss.is_floating_point():
                raise TypeError(f"record_loss: loss must be a floating-point tensor, got {loss.dtype}")
            self._pending_loss = loss.detach().to(torch.float64).mean()
        elif isinstance(loss, numbers.Real) and not isinstance(loss, bool):
            self._pending_loss = torch.tensor(float(loss), dtype=torch.float64)
        else:
            raise TypeError(f"record_loss: loss must be a number or a tensor, got {type(loss).__name__}")
        group = self.process_group if process_group is _THE_GUARDS else process_group
        self._pending_loss = distributed.mean_over_ranks(self._pending_loss, group)

    def _config(self) -> dict[str, Any]:
        config = {**super()._config(), "mode": self.mode, "threshold": self.threshold,
                  "window": self.window, "min_history": self.min_history}
        if self.signals != ("norm",) or self.two_sided:  # states saved before these options load as before
            config.update(signals=list(self.signals), two_sided=self.two_sided)
        return config

    def _outlier(self, history: torch.Tensor | None, x: torch.Tensor, counted: torch.Tensor,
                 calls: StepCount) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(skip, upper limit, history)`` for the value ``x``; enters ``x`` in the (new or moved) history.

        Only when ``counted`` (a 0-dim bool tensor: the gradient norm is finite): a call on a
        non-finite norm leaves both histories as they were, evicting nothing. ``calls``: the
        earlier counted calls (which slot of the window ``x`` takes).
        """
        device = x.device
        if history is None or history.device != device:
            fresh = torch.full((self.window,), math.nan, dtype=torch.float64, device=device)
            if history is not None:
                fresh.copy_(history)
            history = fresh
        h = history
        valid = torch.isfinite(h)
        count = valid.sum()
        if self.mode == "zscore":
            mean = torch.where(valid, h, 0.0).sum() / count
            spread = self.threshold * (torch.where(valid, (h - mean) ** 2, 0.0).sum() / (count - 1)).sqrt()
            upper, lower = mean + spread, mean - spread
        else:
            median = torch.nanmedian(h)
            upper, lower = self.threshold * median, median / self.threshold
        enough = count >= self.min_history
        inf = torch.full((), math.inf, dtype=torch.float64, device=device)
        upper = torch.where(enough, upper, inf)
        finite = torch.isfinite(x)
        skip = ~finite | (x > upper)
        if self.two_sided:
            skip = skip | (enough & (x < lower))
        recorded = torch.where(finite, x, math.nan)
        if calls.on_device:  # the slot from the device count: nothing read on the host (or recompiled on)
            slots = torch.arange(self.window, device=device)
            h.copy_(torch.where((slots == calls.value % self.window) & counted, recorded, h))
        elif bool(counted):  # (on the CPU: free)
            slot = calls.value % self.window
            h[slot : slot + 1].copy_(recorded.reshape(1))
        return skip, upper, history

    def _step(self, groups: list[_groups.Group], norm: torch.Tensor, wide: torch.Tensor, count: StepCount) -> ClipResult:
        device = norm.device
        self.skipped_steps = self.skipped_steps.to(device)
        x = wide.to(torch.float64)
        counted = torch.isfinite(x)
        level = torch.full((), math.inf, dtype=torch.float64, device=device)
        skip = torch.zeros((), dtype=torch.bool, device=device)
        if "loss" in self.signals:
            if self._pending_loss is None:
                raise RuntimeError(
                    "SpikeGuard watches the loss: call guard.record_loss(loss) once per step before "
                    "optimizer.step() (with a closure: inside it), or create the guard with signals='norm'")
            loss = self._pending_loss.to(device, non_blocking=True)
            self._pending_loss = None
            skip, _, self._loss_history = self._outlier(self._loss_history, loss, counted, count)
        if "norm" in self.signals:
            norm_skip, level, self._history = self._outlier(self._history, x, counted, count)
            skip = skip | norm_skip
        previous = self._step_skip if (self._hooked and self._in_step) else None
        # a step the GradScaler skips itself (a fused optimizer's, whose hooks run anyway) is the scaler's
        scaler_skips = self._scaler_skips
        if not self._hooked:  # a call by hand: set by _begin_call for this call only
            self._scaler_skips = None
        counts = skip if scaler_skips is None else skip & ~scaler_skips.to(device)
        if previous is None:
            self.skipped_steps = self.skipped_steps + counts
        else:  # another closure evaluation of the same step: the step is skipped if any evaluation is
            self.skipped_steps = self.skipped_steps + (counts & ~previous)
            skip = skip | previous
        if self._hooked and self._in_step:
            self._step_skip = skip
        self.skip = skip
        factor = (~skip).to(norm.dtype)
        return ClipResult(norm=norm, threshold=level, scale=factor)

    def _begin_call(self, optimizer: torch.optim.Optimizer | None) -> None:
        # by hand with scaler=: a step the scaler will skip (its found_inf, on the device) is the scaler's
        # (attached, the step pre-hook set it for the whole step, closure evaluations included)
        if not self._hooked:
            self._scaler_skips = None if self.scaler is None else _scaler_found_inf(self.scaler, optimizer)

    # --- enforcing the decision on an optimizer ----------------------------------------------

    def attach(self, optimizer: torch.optim.Optimizer) -> "SpikeGuard":
        """Decide on each ``optimizer.step()`` and undo the step when it must be skipped.

        The pre-hook snapshots the parameters and the optimizer state and
        decides (inside the closure, when the step is given one); the post-hook
        undoes a skipped step. Returns ``self``.

        ``optimizer`` may be a framework's wrapper (see :meth:`Clipper.attach`).

        Raises:
            TypeError: ``optimizer`` is neither a ``torch.optim.Optimizer`` nor a wrapper holding one in
                ``.optimizer`` or ``._optimizer``.
            RuntimeError: the guard is already attached (``detach()`` first).
        """
        super().attach(optimizer)
        return self

    def _attach_more(self, optimizer: torch.optim.Optimizer) -> None:
        self._hooks = [optimizer.register_step_post_hook(self._post_hook)]

    def detach(self) -> None:
        super().detach()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._copies = self._snapshot = self._step_skip = self._scaler_skips = None
        self._in_step = False

    def _transient(self) -> dict[str, Any]:
        return {**super()._transient(), "_hooks": [], "_copies": None, "_snapshot": None,
                "_in_step": False, "_step_skip": None, "_scaler_skips": None}

    def _begin_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._take_snapshot(optimizer)
        self._in_step = True
        self._step_skip = None
        # scaler.step of a fused optimizer sets found_inf (a device tensor) and runs the step, hooks
        # included, also when it skips the update; a non-fused one it does not call then
        found_inf = getattr(optimizer, "found_inf", None)
        self._scaler_skips = found_inf != 0 if isinstance(found_inf, torch.Tensor) else None

    def _post_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._restore(optimizer)

    def _take_snapshot(self, optimizer: torch.optim.Optimizer) -> None:
        tracked: list[tuple[torch.Tensor, str | None]] = []
        entries: list[tuple[torch.Tensor, dict[Any, Any]]] = []
        for p in optimizer_parameters(optimizer):
            tracked.append((p, None))
            saved: dict[Any, Any] = {}
            for key, value in (optimizer.state.get(p) or {}).items():
                if isinstance(value, torch.Tensor):
                    saved[key] = _Saved(len(tracked), None, None)
                    tracked.append((p, key))
                else:
                    saved[key] = _Saved(None, _fingerprint(value), _copy_value(value, key))
            entries.append((p, saved))
        groups = [{key: _Saved(None, _fingerprint(value), _copy_value(value, key))
                   for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
        tensors = [p.data if key is None else optimizer.state[p][key] for p, key in tracked]
        copies = self._copies
        if copies is None or len(copies) != len(tensors) or any(
            c.shape != t.shape or c.dtype != t.dtype or c.device != t.device for c, t in zip(copies, tensors)
        ):
            copies = [torch.empty_like(t) for t in tensors]
        for c, t in zip(copies, tensors):
            c.copy_(t)
        self._copies = copies
        self._snapshot = _Snapshot(tracked, copies, entries, groups)

    @torch.no_grad()
    def _restore(self, optimizer: torch.optim.Optimizer) -> None:
        snapshot, skip = self._snapshot, self._step_skip
        self._snapshot, self._step_skip, self._in_step, self._scaler_skips = None, None, False, None
        if snapshot is None or skip is None:  # no decision in this step (a closure never evaluated)
            return
        changed = False  # whether state that torch.where cannot restore changed
        for (p, key), saved in zip(snapshot.tracked, snapshot.copies):
            tensor = p.data if key is None else (optimizer.state.get(p) or {}).get(key)
            if not _same_layout(tensor, saved):
                changed = True
                continue
            flag = skip if tensor.device == skip.device else skip.to(tensor.device)  # a sync: see docstring
            torch.where(flag, saved, tensor, out=tensor)
        if (changed or _python_state_changed(optimizer, snapshot)) and bool(skip):  # a sync: see docstring
            _put_back(optimizer, snapshot)

    # --- state -----------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        # copies, also on the CPU (where .cpu() returns the tensor itself, which later steps change)
        state = {
            "history": None if self._history is None else self._history.to("cpu", copy=True),
            "skipped_steps": self.skipped_steps.to("cpu", copy=True),
        }
        if "loss" in self.signals:
            state["loss_history"] = None if self._loss_history is None else self._loss_history.to("cpu", copy=True)
        return state

    def _load_state(self, state: Mapping[str, Any]) -> None:
        history, skipped, losses = state.get("history"), state.get("skipped_steps"), state.get("loss_history")
        for name, value in (("history", history), ("loss_history", losses)):
            if value is not None and (not isinstance(value, torch.Tensor) or value.shape != (self.window,)):
                raise ValueError(f"state_dict[{name!r}] must be a tensor of shape ({self.window},)")
        if not isinstance(skipped, torch.Tensor):
            raise ValueError("state_dict['skipped_steps'] must be a tensor")
        self._history = None if history is None else history.to(torch.float64).clone()
        self._loss_history = None if losses is None else losses.to(torch.float64).clone()
        self.skipped_steps = skipped.to(torch.int64).clone()
        self._pending_loss = None
        self.skip = None


def _scaler_found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer | None) -> torch.Tensor | None:
    """Whether ``scaler.unscale_`` found inf/NaN gradients (a bool device tensor; nothing read), or None if not unscaled.

    For ``optimizer``'s gradients, or without one, for every optimizer the scaler unscaled this iteration.
    """
    if not scaler.is_enabled() or getattr(scaler, "_scale", None) is None:
        return None
    from torch.amp.grad_scaler import OptState

    states = scaler._per_optimizer_states
    chosen = [states[id(optimizer)]] if optimizer is not None and id(optimizer) in states else (
        [] if optimizer is not None else list(states.values()))
    found = [t for state in chosen if state["stage"] is OptState.UNSCALED
             for t in state["found_inf_per_device"].values()]
    if not found:
        return None
    return torch.stack([t.to(found[0].device, non_blocking=True).reshape(()) for t in found]).sum() != 0


def _check_signals(signals: str | Iterable[str]) -> tuple[str, ...]:
    chosen = (signals,) if isinstance(signals, str) else tuple(signals)
    if not chosen or len(set(chosen)) != len(chosen) or any(s not in ("norm", "loss") for s in chosen):
        raise ValueError(f"signals must be 'norm', 'loss' or both, each once (('loss', 'norm')), got {signals!r}")
    return tuple(sorted(chosen))  # ("loss", "norm") in one order, so configurations compare equal


# --- the snapshot of an optimizer's state -----------------------------------------------------------


class _Saved(NamedTuple):
    """One saved entry: a tensor (its index in the copies) or a plain value (its fingerprint and a copy)."""

    index: int | None
    fingerprint: Any
    value: Any


class _Snapshot(NamedTuple):
    tracked: list[tuple[torch.Tensor, str | None]]  # (parameter, state key or None for the parameter)
    copies: list[torch.Tensor]  # one per tracked tensor
    entries: list[tuple[torch.Tensor, dict[Any, _Saved]]]  # each parameter's state entries
    groups: list[dict[Any, _Saved]]  # each param_group's entries but "params"


_PLAIN = (numbers.Number, str, bytes, type(None), torch.dtype, torch.device)


def _fingerprint(value: Any) -> Any:
    """What tells, on the host, whether a value changed: plain values themselves, tensors by identity and version.

    A value of another type gets a fresh object, unequal to any other: it always counts as changed.
    """
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value), value._version)
    if isinstance(value, _PLAIN):
        return value
    if type(value) in (list, tuple):
        return (type(value), tuple(_fingerprint(v) for v in value))
    if type(value) is dict:
        return (dict, tuple((k, _fingerprint(v)) for k, v in value.items()))
    return object()


def _copy_value(value: Any, key: Any) -> Any:
    """A copy to put back: plain values as they are (immutable), tensors cloned, containers copied."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, _PLAIN):
        return value
    if type(value) in (list, tuple):
        return type(value)(_copy_value(v, key) for v in value)
    if type(value) is dict:
        return {k: _copy_value(v, key) for k, v in value.items()}
    try:
        return copy.deepcopy(value)
    except Exception as error:
        raise TypeError(
            f"SpikeGuard cannot copy the optimizer state entry {key!r} of type {type(value).__name__} "
            f"({error}); it copies the optimizer state to undo skipped steps. Keep optimizer state in "
            "tensors, numbers, strings, lists, tuples and dicts, or use SpikeGuard by hand (unattached)."
        ) from error


def _same_layout(tensor: Any, saved: torch.Tensor) -> bool:
    return (isinstance(tensor, torch.Tensor) and tensor.shape == saved.shape and tensor.dtype == saved.dtype
            and tensor.device == saved.device)


def _python_state_changed(optimizer: torch.optim.Optimizer, snapshot: _Snapshot) -> bool:
    """Whether the step changed state that is not a tensor updated in place (host only: no sync)."""
    for p, saved in snapshot.entries:
        state = optimizer.state.get(p) or {}
        if state.keys() != saved.keys():
            return True
        for key, entry in saved.items():
            if entry.index is None and _fingerprint(state[key]) != entry.fingerprint:
                return True
    if len(optimizer.param_groups) != len(snapshot.groups):
        return True
    for group, saved in zip(optimizer.param_groups, snapshot.groups):
        if group.keys() - {"params"} != saved.keys():
            return True
        for key, entry in saved.items():
            if _fingerprint(group[key]) != entry.fingerprint:
                return True
    return False


def _put_back(optimizer: torch.optim.Optimizer, snapshot: _Snapshot) -> None:
    """Undo, on a skipped step, what torch.where could not: entries added, removed, replaced or not tensors."""
    for p, saved in snapshot.entries:
        if not saved:
            optimizer.state.pop(p, None)
            continue
        state = optimizer.state[p]
        for key in [k for k in state if k not in saved]:
            del state[key]
        for key, entry in saved.items():
            if entry.index is None:
                state[key] = entry.value
            elif not _same_layout(state.get(key), snapshot.copies[entry.index]):
                state[key] = snapshot.copies[entry.index].clone()
    for group, saved in zip(optimizer.param_groups, snapshot.groups):
        for key in [k for k in group if k != "params" and k not in saved]:
            del group[key]
        for key, entry in saved.items():
            if key not in group or _fingerprint(group[key]) != entry.fingerprint:
                group[key] = entry.value
