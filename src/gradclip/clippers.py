"""The protocol every stateful clipper shares: call, attach to an optimizer, save and resume.

A clipper is called after ``loss.backward()`` (and after ``GradScaler.unscale_``)
with the parameters; it computes the global gradient norm in one batched pass,
updates its state, scales the gradients in place and returns a
:class:`~gradclip.result.ClipResult`. Its state lives in tensors on the
gradients' device, and nothing on its default path reads a tensor's value on
the host, so a step costs no host-device synchronisation.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from . import _groups, _validate
from .norms import grouped_norm
from .result import ClipResult

__all__ = ["Clipper"]


def optimizer_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


class Clipper:
    r"""Base class of the stateful clippers (:class:`~gradclip.AutoClip`, :class:`~gradclip.ZClip`,
    :class:`~gradclip.SpikeGuard`).

    Use it in one of two ways:

    * call it yourself after ``backward()``: ``result = clipper(model.parameters())``;
    * or ``clipper.attach(optimizer)``: it then runs in the optimizer's step
      pre-hook, on the optimizer's parameters, every time ``optimizer.step()``
      runs (also inside ``scaler.step(optimizer)``), until ``detach()``.

    Misuse is caught on the host, without reading a tensor's value:

    * no parameter has a gradient (``RuntimeError``: run ``backward()`` first);
    * a second call on gradients that have not changed since the last call,
      e.g. calling it by hand *and* attaching it, or once per sub-module
      (``RuntimeError``); detected from the gradients' identity and version
      counters, which every in-place change and every new backward bump;
    * with ``scaler=`` a :class:`torch.amp.GradScaler` that scaled the loss,
      a call while the gradients are still scaled, i.e. before
      ``scaler.unscale_(optimizer)`` (``RuntimeError``).

    ``state_dict()`` holds only tensors and plain Python values, so
    ``torch.load(path, weights_only=True)`` reads it back; it records the
    configuration, and ``load_state_dict`` of a state saved by a differently
    configured clipper raises ``ValueError`` naming the field.

    Under ``torch.distributed``, every rank calls the clipper on its own
    gradients; DTensor gradients (FSDP2) are reduced to the global norm
    automatically, and hand-sharded ones with ``process_group``. Every rank
    then sees the same norm, so the state stays identical across ranks with
    no communication beyond the norm's all-reduce.

    Args:
        norm_type: p of the global norm, in (0, inf].
        foreach: as in :func:`gradclip.clip_grad_norm_`.
        scaler: the ``GradScaler`` used for the loss, to check unscaling.
        process_group: for hand-sharded gradients, the group to reduce the
            norm over (``True`` for the default group); see :func:`gradclip.clip_grad_norm_`.
        replicated: parameters every rank holds a copy of, counted once.

    Raises:
        RuntimeError: no parameter has a gradient (call ``loss.backward()`` first), the clipper is called twice on the same gradients, or, with ``scaler=``, the gradients are still scaled.
        ValueError: an argument is outside the range given above (the message names it).
        TypeError: an argument has the wrong type (the message names it).

    References:
        * Pascanu, Mikolov and Bengio (2013), "On the difficulty of training recurrent neural networks", `arXiv:1211.5063 <https://arxiv.org/abs/1211.5063>`__.
    """

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
        self.steps = 0
        self.last_result: ClipResult | None = None
        self._hook: Any = None
        self._last_grads: list[weakref.ReferenceType] | None = None
        self._last_versions: list[int] | None = None

    # --- what subclasses provide -----------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        """Plain-Python configuration; a state_dict only loads into an equal one."""
        return {"class": type(self).__name__, "norm_type": self._p}

    def _state(self) -> dict[str, Any]:
        return {}

    def _load_state(self, state: Mapping[str, Any]) -> None:
        pass

    def _step(self, groups: list[_groups.Group], norm: torch.Tensor, wide: torch.Tensor) -> ClipResult:
        """Clip the grouped gradients given their norm (``wide``: the same in float64) and update the state."""
        raise NotImplementedError

    # --- the shared protocol ---------------------------------------------------------------

    @torch.no_grad()
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
        """
        grads = _validate.grads_of(parameters)
        if not grads and self.process_group is None:  # a rank may hold no shard of a sharded model
            raise RuntimeError(
                f"{type(self).__name__} was called but no parameter has a gradient: call "
                "loss.backward() before the clipper (and before optimizer.step() when attached)."
            )
        self._check_unscaled(optimizer)
        self._check_not_twice(grads)
        groups, norm, wide = grouped_norm(grads, self._p, self.foreach, process_group=self.process_group,
                                       replicated=self.replicated)
        result = self._step(groups, norm, wide)
        self._last_grads = [weakref.ref(g) for g in grads]
        self._last_versions = [g._version for g in grads]
        self.steps += 1
        self.last_result = result
        return result

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
                "scale. Call scaler.unscale_(optimizer) before clipping (scaler.step(optimizer) "
                "does it for you when the clipper is attached to the optimizer)."
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
        """Run the clipper on ``optimizer``'s parameters before each ``optimizer.step()``.

        Uses ``optimizer.register_step_pre_hook``. Returns ``self``.
        """
        _validate.check_optimizer(optimizer)
        if self._hook is not None:
            raise RuntimeError(f"{type(self).__name__} is already attached; call detach() first")

        def pre_hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self(optimizer_parameters(opt), optimizer=opt)

        self._hook = optimizer.register_step_pre_hook(pre_hook)
        return self

    def detach(self) -> None:
        """Stop clipping on ``optimizer.step()``; a no-op when not attached."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    @property
    def attached(self) -> bool:
        """Whether the clipper runs on an optimizer's step."""
        return self._hook is not None

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
        self.steps = int(state_dict["steps"])
        self._last_grads = self._last_versions = None
        self.last_result = None
