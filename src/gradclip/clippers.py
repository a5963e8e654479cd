"""The protocol every stateful clipper shares: call, attach to an optimizer, save and resume.

A clipper is called after ``loss.backward()`` (and after ``GradScaler.unscale_``)
with the parameters; it computes the global gradient norm in one batched pass,
updates its state, scales the gradients in place and returns a
:class:`~gradclip.result.ClipResult`. Its state lives in tensors on the
gradients' device, and nothing on its default path reads a tensor's value on
the host, so a step costs no host-device synchronisation.

Attached to an optimizer, a clipper runs in the step pre-hook; the helpers
here find a step's closure (``optimizer.step(closure)``) and the scale a fused
optimizer's gradients still carry under ``GradScaler`` (``grad_scale``), which
:class:`~gradclip.monitor.GradientMonitor` uses too.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch

from . import _groups, _validate, norms
from ._norms import exact_on_host
from ._validate import OrthogonalizedUpdateWarning
from .result import ClipResult

__all__ = ["Clipper", "OrthogonalizedUpdateWarning"]


class StepCount(NamedTuple):
    """How many earlier calls were counted, in the form a rule may read it.

    The base class computes it once per call and hands it to the subclass's
    rule, so that the rule never calls back into the base class (the pipeline
    runs top-down: validate, group, norm, rule, scale, count).
    """

    on_device: bool
    """Decide everything on the device (accelerators, ``torch.compile``): nothing is read on the host."""
    value: int | torch.Tensor
    """The count: a Python int on the host, else a 0-dim int64 tensor on the gradients' device."""


def optimizer_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


# --- what a step pre-hook sees -----------------------------------------------------------------
# A step pre-hook gets (optimizer, args, kwargs) where args[0] is the optimizer itself (torch's
# wrapper passes ``self`` in args) and may return (new_args, new_kwargs) to change the call.


def step_closure(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[Callable[[], Any] | None, int | str | None]:
    """The closure a step was given and where: ``kwargs["closure"]``, or positional ``args[1]``; else (None, None)."""
    closure = kwargs.get("closure")
    if closure is not None:
        return closure, "closure"
    if len(args) > 1 and args[1] is not None:
        return args[1], 1
    return None, None


def wrap_closure(args: tuple[Any, ...], kwargs: Mapping[str, Any],
                 after: Callable[[], None]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """For a step given a closure: (args, kwargs) whose closure runs the original one, then ``after()``.

    The original closure runs under ``torch.enable_grad()`` (as optimizers call
    it), ``after`` once it has returned, and the wrapper returns the closure's
    loss. An optimizer that evaluates the closure several times per step
    (LBFGS) runs ``after`` after each evaluation. ``None`` when the step has no
    closure.
    """
    closure, where = step_closure(args, kwargs)
    if closure is None:
        return None

    def closure_then(*closure_args: Any, **closure_kwargs: Any) -> Any:
        with torch.enable_grad():
            loss = closure(*closure_args, **closure_kwargs)
        after()
        return loss

    if where == "closure":
        return tuple(args), {**kwargs, "closure": closure_then}
    return (*args[:1], closure_then, *args[2:]), dict(kwargs)


def grad_scale_of(optimizer: torch.optim.Optimizer, kwargs: Mapping[str, Any]) -> torch.Tensor | float | None:
    """The scale the gradients are still multiplied by when a fused optimizer steps under a GradScaler, else None.

    ``scaler.step(optimizer)`` does not unscale the gradients of an optimizer
    that unscales them itself (``fused=True``): it sets ``optimizer.grad_scale``
    (torch >= 2.1; a ``grad_scale=`` keyword in other conventions) and the fused
    kernel divides by it. ``None`` when the gradients were unscaled already.
    """
    scale = kwargs.get("grad_scale")
    if scale is None:
        scale = getattr(optimizer, "grad_scale", None)
    return scale


class Clipper:
    r"""Base class of the stateful clippers (:class:`~gradclip.AutoClip`, :class:`~gradclip.ZClip`,
    :class:`~gradclip.SpikeGuard`).

    Use it in one of two ways:

    * call it yourself after ``backward()``: ``result = clipper(model.parameters())``;
    * or ``clipper.attach(optimizer)``: it then runs in the optimizer's step
      pre-hook, on the optimizer's parameters, every time ``optimizer.step()``
      runs (also inside ``scaler.step(optimizer)``), until ``detach()``.

    **Closures.** ``optimizer.step(closure)`` (LBFGS, SAM-style optimizers,
    PyTorch Lightning's automatic optimization) computes the gradients inside
    the step, after the pre-hooks. An attached clipper then clips inside the
    closure: the pre-hook hands the optimizer a closure that runs yours (under
    ``torch.enable_grad()``), clips the gradients it made and returns its loss.
    An optimizer that evaluates the closure several times per step (LBFGS)
    gets each evaluation's gradients clipped, and each evaluation counts as a
    call (``steps``, the warm-up, the history). Gradients that exist before a
    step given a closure (SAM's first, ascent gradients) are not clipped.

    **Fused optimizers under GradScaler.** ``scaler.step(optimizer)`` does not
    unscale the gradients of an optimizer with ``fused=True``: the fused kernel
    divides by the scale itself (``optimizer.grad_scale``). An attached
    clipper sees that scale: it divides the norm by it on the device, decides
    its factor on the true norm (and records that norm in its state and its
    :class:`~gradclip.result.ClipResult`), and multiplies the still-scaled
    gradients by the factor, which the fused step then unscales. A step the
    scaler skips for inf/NaN gradients still runs the hooks of a fused
    optimizer, so the clipper sees a non-finite norm there; with a non-fused
    optimizer ``scaler.step`` skips the step and its hooks altogether.

    **Non-finite norms change no state.** A call whose global norm is inf or
    NaN (a step the scaler skips, seen by a fused optimizer's hooks or by a
    call by hand after ``scaler.unscale_``) still returns its result and scales
    the gradients, but enters no history, EMA or warm-up and is not counted in
    ``steps``: the clipper is left as if it had not been called, so fused and
    non-fused runs, attached or by hand, keep the same state. On the CPU whether
    the norm is finite is read on the host (free); on accelerators and inside
    ``torch.compile`` every clipper decides it on the device (AutoClip then
    keeps its history in buffers of a fixed size, ZClip computes both the
    warm-up and the EMA step, SpikeGuard writes its history slot with a
    ``torch.where``), so no call synchronises, and ``steps`` is counted on the
    device (reading it syncs once).

    ``pickle`` and ``torch.save(clipper)`` save the configuration and the
    state, not the attachment (hooks) nor the record of the last gradients
    seen: an unpickled clipper is detached and resumes from the saved state;
    ``attach`` it again. A ``scaler`` is pickled with it, under the
    GradScaler's own rule (between iterations, after ``scaler.update()``).

    Misuse is caught on the host, without reading a tensor's value:

    * no parameter has a gradient (``RuntimeError``: run ``backward()`` first);
    * a second call on gradients that have not changed since the last call,
      e.g. calling it by hand *and* attaching it, or once per sub-module
      (``RuntimeError``); detected from the gradients' identity and version
      counters, which every in-place change and every new backward bump
      (not inside ``torch.compile``, where neither can be read: run a step
      eagerly to check the wiring);
    * with ``scaler=`` a :class:`torch.amp.GradScaler` that scaled the loss,
      a call while the gradients are still scaled, i.e. before
      ``scaler.unscale_(optimizer)`` (``RuntimeError``).

    **torch.compile.** A call, by hand or from the optimizer's step, can sit
    in a compiled region (``fullgraph=True`` for a call by hand): the state
    lives in tensors that the compiled graph updates in place, and every
    branch a step takes (ZClip's warm-up, a history slot) is decided on the
    device, so new gradient objects every step and the passing steps do not
    recompile; the first call, which makes the state, compiles its own graph.
    ``steps`` then counts on the device (reading it syncs once).

    ``state_dict()`` holds only tensors and plain Python values, so
    ``torch.load(path, weights_only=True)`` reads it back; it records the
    configuration, and ``load_state_dict`` of a state saved by a differently
    configured clipper raises ``ValueError`` naming the field.

    Under ``torch.distributed``, every rank calls the clipper on its own
    gradients; DTensor gradients (FSDP2) are reduced to the global norm
    automatically, and hand-sharded ones with ``process_group``. Every rank
    then sees the same norm, so the state stays identical across ranks with
    no communication beyond the norm's all-reduce.

    **What it did.** Every call returns a :class:`~gradclip.result.ClipResult`
    (pre-clip norm, threshold, factor; device tensors, read them when you log).
    Attached, read the same from ``clipper.last_result`` after
    ``optimizer.step()``, for example::

        clipper = gradclip.ZClip().attach(optimizer)
        ...
        optimizer.step()
        log(step, float(clipper.last_result.norm), float(clipper.last_result.threshold))

    Attributes:
        last_result: the :class:`~gradclip.result.ClipResult` of the latest call, or ``None``.
        steps: how many times the clipper ran on a finite norm (an int; one per closure evaluation).
        attached: whether it runs on an optimizer's step.

    Args:
        norm_type: p of the global norm, in (0, inf].
        foreach: as in :func:`gradclip.clip_grad_norm_`.
        scaler: the ``GradScaler`` used for the loss, to check unscaling.
        process_group: for hand-sharded gradients, the group to reduce the
            norm over (``True`` for the default group); see :func:`gradclip.clip_grad_norm_`.
        replicated: parameters every rank holds a copy of, counted once.

    Raises:
        RuntimeError: no parameters were given (an empty list, or an iterator consumed earlier), no parameter has a gradient (call ``loss.backward()`` first, or inside the closure given to ``optimizer.step``), the clipper is called twice on the same gradients, or, with ``scaler=``, it is called by hand on gradients that are still scaled (call ``scaler.unscale_(optimizer)`` first, or attach it).
        ValueError: an argument is outside the range given above (the message names it).
        TypeError: an argument has the wrong type (the message names it), or a gradient is sparse.

    References:
        * Pascanu, Mikolov and Bengio (2013), "On the difficulty of training recurrent neural networks", `arXiv:1211.5063 <https://arxiv.org/abs/1211.5063>`__.
    """

    _device_used = True  # (the default of clippers pickled before the device count could lag the host's)

    _rescales_gradients = True
    """Whether the clipper changes gradients (a guard that only skips steps does not)."""

    def __init__(self, *, norm_type: float | str = 2.0, foreach: bool | None = None,
                 scaler: torch.amp.GradScaler | None = None, process_group: Any = None,
                 replicated: Iterable[torch.Tensor] | None = None) -> None:
        self._p = _validate.check_norm_type(norm_type)
        self.foreach = _validate.check_foreach(foreach)
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
        self.scaler = scaler
        self.process_group = process_group
        self.replicated = None if replicated is None else list(replicated)
        self._steps = 0  # host count of calls; see the steps property
        # the same count on the gradients' device: what a call inside torch.compile advances and reads
        self._device_steps = torch.zeros((), dtype=torch.int64)
        self._steps_stale = False  # True after calls made under torch.compile, until steps is read
        # whether the device count was asked for: until then calls on the CPU count on the host only, and the first
        # ask makes it from the host count; after, they keep it current too
        self._device_used = False
        self.last_result: ClipResult | None = None
        self._hook: Any = None
        self._last_grads: list[weakref.ReferenceType] | None = None
        self._last_versions: list[int] | None = None
        self._hooked = False  # True while the step pre-hook (or its closure) calls the clipper

    # --- what subclasses provide -----------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        """Plain-Python configuration; a state_dict only loads into an equal one."""
        return {"class": type(self).__name__, "norm_type": self._p}

    def _state(self) -> dict[str, Any]:
        return {}

    def _load_state(self, state: Mapping[str, Any]) -> None:
        pass

    def _step(self, groups: _groups.Plan, norm: torch.Tensor, wide: torch.Tensor, count: StepCount) -> ClipResult:
        """Clip the planned gradients given their norm (``wide``: the same in float64) and update the state.

        ``groups`` is the :class:`~gradclip._groups.Plan` (iterating it gives its groups); scale
        through :func:`gradclip._scaling.scale_`. ``count``: the earlier counted calls (read it
        instead of ``steps``: the rule does not call back into the base class).
        """
        raise NotImplementedError

    def _check_parameters(self, params: list[torch.Tensor]) -> None:
        """Refuse parameters the subclass cannot take (called after the shared checks)."""

    def _begin_call(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Prepare one call, after the checks and before the norm (``optimizer``: validated, or ``None``)."""

    # --- the call count -------------------------------------------------------------------

    @property
    def steps(self) -> int:
        """How many times the clipper ran on a finite norm (an int; one per closure evaluation).

        A call on an inf or NaN norm is not counted (see the class docstring).
        Calls made on an accelerator or inside ``torch.compile`` count on the
        device (whether the norm is finite is not read there, and a compiled
        graph cannot change a Python int without recompiling for its next
        value); the first read after them reads that counter once (a
        host-device sync on an accelerator).
        """
        if self._steps_stale:
            self._steps = int(self._device_steps)
            self._steps_stale = False
        return self._steps

    @steps.setter
    def steps(self, value: int) -> None:
        self._steps = int(value)
        self._device_steps = torch.full((), self._steps, dtype=torch.int64, device=self._device_steps.device)
        self._steps_stale = False

    def _count_for(self, device: torch.device) -> StepCount:
        """The earlier counted calls, for a call whose norm lies on ``device``."""
        if self._on_device(device):
            return StepCount(True, self._device_count(device))
        return StepCount(False, self.steps)

    def _count_call(self, device: torch.device, counted: torch.Tensor | bool, on_device: bool) -> None:
        """Advance the call count by ``counted`` (a 0-dim bool tensor, or a bool read on the CPU: False for a
        non-finite norm).

        On the device always; on the host too where reading ``counted`` is free (``on_device``
        False: the CPU, outside compilation); elsewhere the host count goes stale until ``steps``
        is read.
        """
        if on_device:
            counter = self._device_count(device)
            self._steps_stale = True
            counter.add_(counted.to(counter.dtype))
        elif bool(counted):  # (a bool, or a tensor read for free on the CPU)
            self._steps = self.steps + 1  # (first catching up with calls made under compile)
            if self._device_used:  # kept current: rebuilt inside a compiled call, it would recompile at each switch
                self._device_steps.add_(1)

    @staticmethod
    def _on_device(device: torch.device) -> bool:
        """Whether a call on ``device`` decides everything on the device (no value read on the host).

        True inside ``torch.compile`` and on accelerators; False on the CPU, where reading a
        value (whether a norm is finite) costs nothing.
        """
        return not exact_on_host(device)

    def _device_count(self, device: torch.device) -> torch.Tensor:
        """The number of earlier counted calls, a 0-dim int64 tensor on ``device`` (what a device-side step reads instead of ``steps``)."""
        if not self._device_used:  # the first ask: behind the calls counted on the host until now
            self._device_steps = torch.full((), self._steps, dtype=torch.int64, device=device)
            self._device_used = True
        elif self._device_steps.device != device:
            self._device_steps = self._device_steps.to(device)
        return self._device_steps

    # --- the shared protocol ---------------------------------------------------------------

    def __call__(self, parameters: _validate.TensorOrTensors,
                 optimizer: torch.optim.Optimizer | None = None) -> ClipResult:
        """Clip the gradients of ``parameters`` in place and return what was done.

        Args:
            parameters: a tensor or an iterable of tensors with ``.grad``.
            optimizer: the optimizer the gradients belong to; only used to
                check, when a ``scaler`` was given, that this optimizer's
                gradients were unscaled.

        Returns:
            A :class:`~gradclip.result.ClipResult` of 0-dim tensors.

        Raises:
            RuntimeError: no parameters were given (an empty list, or an iterator consumed earlier), no parameter has a gradient, the gradients did not
                change since the last call, or (with ``scaler=``) they are still scaled.
            TypeError: a gradient is sparse.
        """
        return self._apply(parameters, optimizer, None)

    @torch.no_grad()
    def _apply(self, parameters: _validate.TensorOrTensors, optimizer: torch.optim.Optimizer | None,
               grad_scale: torch.Tensor | float | None) -> Any:
        """The call, for gradients still multiplied by ``grad_scale`` (a fused step under GradScaler) or not.

        One pass, top-down: validate, check, :meth:`_clip` (group, norm, the subclass's rule,
        scale), count. Hooks of subclasses are called from here and never call back.
        """
        checked = _validate.check_call(parameters, norm_type=self._p, foreach=self.foreach)
        params, grads = checked.items, checked.tensors
        optimizer = self._check_call(params, grads, optimizer, grad_scale)
        self._begin_call(optimizer)
        compiling = torch.compiler.is_compiling()
        if not compiling:  # version counters are not traceable: see the class docstring
            self._check_not_twice(grads)
        count = self._count_for(grads[0].device) if grads else None
        result, device, counted = self._clip(checked, grad_scale, count)
        if not compiling:
            self._last_grads = [weakref.ref(g) for g in grads]
            self._last_versions = [g._version for g in grads]
        self._count_call(device, counted, self._on_device(device))
        self.last_result = result
        return result

    def _check_call(self, params: list[torch.Tensor], grads: list[torch.Tensor],
                    optimizer: torch.optim.Optimizer | None, grad_scale: Any) -> torch.optim.Optimizer | None:
        """Refuse a call that cannot be right; return ``optimizer``, validated (or ``None``)."""
        if not params and self.process_group is None:
            raise RuntimeError(
                f"{type(self).__name__} was called with no parameters: an empty list, or an iterator "
                "(model.parameters(), a generator, filter or map) consumed earlier, for instance by the "
                "optimizer's constructor or a loop. Pass list(model.parameters()), made once and reused."
            )
        if not grads and self.process_group is None:  # a rank may hold no shard of a sharded model
            raise RuntimeError(
                f"{type(self).__name__} was called but no parameter has a gradient: call "
                "loss.backward() before the clipper (when attached: before optimizer.step(), or inside "
                "the closure passed to optimizer.step(closure))."
            )
        self._check_parameters(params)
        if grad_scale is None:
            if optimizer is not None:  # (a framework's wrapper: the scaler keeps the state of the optimizer inside)
                optimizer = _validate.check_optimizer(optimizer, f"{type(self).__name__}(..., optimizer=)")
            self._check_unscaled(optimizer)
        return optimizer

    def _clip(self, checked: _validate.Checked, grad_scale: torch.Tensor | float | None,
              count: StepCount | None) -> tuple[Any, torch.device, torch.Tensor | bool]:
        """Group, norm, rule and scale: ``(result, the norm's device, whether the call counts)``.

        ``count``: the earlier calls, for the first gradient's device (``None`` without gradients).
        """
        plan = _groups.plan_for(checked, self.foreach)
        total = norms.total_norm(plan, self._p, self.foreach, process_group=self.process_group,
                                 replicated=self.replicated, wide=True)
        if grad_scale is not None:
            total = total.divided_by(grad_scale)
        device = total.norm.device
        if count is None or (count.on_device and count.value.device != device):
            count = self._count_for(device)
        # whether the call counts: read on the CPU (free there), kept on the device elsewhere
        if self._on_device(device):
            counted = torch.isfinite(total.wide)
        else:
            counted = math.isfinite(total.value if total.value is not None else total.wide.item())
        return self._step(plan, total.norm, total.wide, count), device, counted

    def _check_unscaled(self, optimizer: torch.optim.Optimizer | None) -> None:
        scaler = self.scaler
        if scaler is None or not scaler.is_enabled() or getattr(scaler, "_scale", None) is None:
            return
        from torch.amp.grad_scaler import OptState

        states = scaler._per_optimizer_states
        if optimizer is not None:
            state = states.get(id(optimizer))
            unscaled = state is not None and state["stage"] is OptState.UNSCALED
        else:
            unscaled = any(state["stage"] is OptState.UNSCALED for state in states.values())
        if not unscaled:
            raise RuntimeError(
                f"{type(self).__name__}: the gradients are still multiplied by the GradScaler's "
                "scale. Call scaler.unscale_(optimizer) before calling the clipper by hand, or attach "
                "it (clipper.attach(optimizer)) and let scaler.step(optimizer) run it: for a non-fused "
                "optimizer scaler.step unscales the gradients before the clipper runs; for a fused one "
                "(fused=True) it does not, and the attached clipper divides the norm by the scale itself."
            )

    def _check_not_twice(self, grads: list[torch.Tensor]) -> None:
        previous, versions = self._last_grads, self._last_versions
        if not grads or previous is None or versions is None or len(previous) != len(grads):
            return
        for ref, version, grad in zip(previous, versions, grads):
            if ref() is not grad or grad._version != version:
                return
        raise RuntimeError(
            f"{type(self).__name__} was called twice on the same gradients (no backward() or "
            "other change since the last call). Call it once per optimizer step, on all the "
            "parameters at once; do not both attach it and call it by hand."
        )

    def attach(self, optimizer: torch.optim.Optimizer) -> "Clipper":
        """Run the clipper on ``optimizer``'s parameters on each ``optimizer.step()``.

        Uses ``optimizer.register_step_pre_hook``: without a closure the
        clipper runs before the step; with ``optimizer.step(closure)`` it runs
        inside the closure, after each evaluation's ``backward()``. Under
        ``scaler.step`` with a fused optimizer it accounts for the scale the
        gradients still carry (see the class docstring). Returns ``self``.

        A clipper that rescales gradients warns (``OrthogonalizedUpdateWarning``) when attached to an
        optimizer that orthogonalises its updates, such as ``torch.optim.Muon``: there the step's size
        does not depend on the gradient's norm, and clipping only reweights the gradient in the momentum
        (measured with ``torch.optim.Muon``, lr 0.02, a 256x256 weight: a gradient scaled by 0.05 left
        that step's length unchanged, ratio 1.002, and changed the next two steps by 51-55%).

        **Wrapped optimizers.** ``optimizer`` may be a framework's wrapper that steps a torch
        optimizer without running ``torch.optim.Optimizer.__init__`` (accelerate's
        ``AcceleratedOptimizer`` from ``accelerator.prepare``, so the Hugging Face Trainer's too;
        Lightning's ``LightningOptimizer``): the clipper follows ``.optimizer`` and ``._optimizer``
        to the torch optimizer and hooks that one, whose ``step()`` the wrapper calls.

        Raises:
            TypeError: ``optimizer`` is neither a ``torch.optim.Optimizer`` nor a wrapper holding one in
                ``.optimizer`` or ``._optimizer`` (the message names what was given).
            RuntimeError: the clipper is already attached (``detach()`` first).
        """
        optimizer = _validate.check_optimizer(optimizer, f"{type(self).__name__}.attach")
        if self._hook is not None:
            raise RuntimeError(f"{type(self).__name__} is already attached; call detach() first")
        if self._rescales_gradients:
            _validate.warn_if_orthogonalizing(optimizer, type(self).__name__)
        self._hook = optimizer.register_step_pre_hook(self._pre_hook)
        self._attach_more(optimizer)
        return self

    def _attach_more(self, optimizer: torch.optim.Optimizer) -> None:
        """Register the subclass's other hooks on the torch optimizer ``attach`` found."""

    def _pre_hook(self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        self._begin_step(optimizer)

        def clip() -> None:
            self._hooked = True
            try:
                self._apply(optimizer_parameters(optimizer), optimizer, grad_scale_of(optimizer, kwargs))
            finally:
                self._hooked = False

        wrapped = wrap_closure(args, kwargs, clip)
        if wrapped is None:
            clip()
        return wrapped

    def _begin_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Called by the step pre-hook before anything else (before the closure, if any)."""

    def detach(self) -> None:
        """Stop clipping on ``optimizer.step()``; a no-op when not attached."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    @property
    def attached(self) -> bool:
        """Whether the clipper runs on an optimizer's step."""
        return self._hook is not None

    # --- pickling --------------------------------------------------------------------------

    def _transient(self) -> dict[str, Any]:
        """Attributes that are not pickled, with the values an unpickled clipper starts with."""
        return {"_hook": None, "_last_grads": None, "_last_versions": None, "_hooked": False}

    def __getstate__(self) -> dict[str, Any]:
        """The configuration and state; hooks and weak references are dropped (an unpickled clipper is detached)."""
        state = self.__dict__.copy()
        state.update(self._transient())
        return state

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        state = dict(state)
        if "steps" in state:  # pickled before the count moved to the device too
            steps = state.pop("steps")
            state.update(_steps=steps, _device_steps=torch.tensor(steps, dtype=torch.int64), _steps_stale=False)
        self.__dict__.update(self._transient())
        self.__dict__.update(state)

    def state_dict(self) -> dict[str, Any]:
        """Configuration, step count and state tensors; loadable with ``weights_only=True``."""
        return {"config": self._config(), "steps": self.steps, **self._state()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state saved by an identically configured clipper.

        Raises:
            ValueError: the state_dict was saved with a different configuration
                (the message names the field), or is not a clipper state.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        config = state_dict.get("config")
        if not isinstance(config, Mapping) or "steps" not in state_dict:
            raise ValueError("state_dict is not a clipper state: it has no 'config' and 'steps'")
        mine = self._config()
        for key in list(mine) + [k for k in config if k not in mine]:
            if key not in config or key not in mine or config[key] != mine[key]:
                raise ValueError(
                    f"state_dict was saved with {key}={config.get(key)!r} but this "
                    f"{type(self).__name__} has {key}={mine.get(key)!r}"
                )
        self._load_state(state_dict)
        self.steps = int(state_dict["steps"])  # (also sets the device count)
        self._last_grads = self._last_versions = None
        self.last_result = None
