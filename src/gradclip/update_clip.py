"""Update clipping: each parameter's update rescaled after ``optimizer.step()`` (Adafactor's rule, StableAdamW's)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from . import _groups, _norms, _validate, distributed
from .clippers import optimizer_parameters

__all__ = ["UpdateClip", "UpdateClipResult"]

_RULES = ("adafactor", "stable_adamw")


@dataclass(frozen=True)
class UpdateClipResult:
    r"""What one step of :class:`UpdateClip` did, one entry per parameter of the optimizer (in its order).

    Attributes:
        rms: what the rule compares with d: :math:`\operatorname{RMS}(U)` (``"adafactor"``) or
            :math:`R = \sqrt{\operatorname{mean}(g^2/\max(\hat v, \epsilon^2))}` (``"stable_adamw"``);
            NaN for parameters the step left alone (no gradient, frozen). 1-D, float64 (float32 on MPS).
        scales: the factor each update was multiplied by, in [0, 1]; 1 where the step left the parameter alone.

    References:
        * Shazeer and Stern (2018), "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", `arXiv:1804.04235 <https://arxiv.org/abs/1804.04235>`__.

    Example:
        >>> import torch
        >>> from gradclip.update_clip import UpdateClipResult
        >>> r = UpdateClipResult(rms=torch.tensor([0.5, 4.0]), scales=torch.tensor([1.0, 0.25]))
        >>> r.clipped.tolist()
        [False, True]
    """

    rms: torch.Tensor
    scales: torch.Tensor

    @property
    def clipped(self) -> torch.Tensor:
        """A bool tensor: whether each parameter's update was scaled down."""
        return self.scales < 1


class UpdateClip:
    r"""Clip each parameter's update after the optimizer's step, by Adafactor's RMS rule or StableAdamW's.

    Attached to any ``torch.optim`` optimizer (``clip.attach(optimizer)``), it
    copies the parameters in a step pre-hook and, in the step post-hook,
    rescales what the step did to each parameter tensor. Write the step of one
    tensor :math:`\theta` (shape unchanged, n entries) as

    .. math::

        \theta_t = (1 - c)\,\theta_{t-1} - \alpha\,U_t,

    with :math:`c` the decoupled weight decay (:math:`\eta\lambda` for AdamW,
    ``Adam(decoupled_weight_decay=True)``, NAdam/RAdam with that flag, Adafactor and
    Muon; 0 otherwise, where weight decay is part of the gradient and so of
    :math:`U`), :math:`\alpha` the step size (the group's learning rate
    :math:`\eta`; for ``torch.optim.Adafactor`` its relative step
    :math:`\max(\epsilon_2, \operatorname{RMS}(\theta_{t-1}))\min(\eta, t^{-1/2})`), and
    :math:`U_t` the update per unit step. Each tensor's update is replaced by
    :math:`s\,\alpha U_t`, :math:`s \in [0, 1]`:

    .. math::

        \text{rule="adafactor"}: &\quad s = \frac{1}{\max\big(1, \operatorname{RMS}(U_t)/d\big)},
            \qquad \operatorname{RMS}(x) = \sqrt{\tfrac1n \textstyle\sum_j x_j^2} \\
        \text{rule="stable\_adamw"}: &\quad s = \frac{1}{\max\big(1, R_t/d\big)}, \qquad
            R_t = \sqrt{\operatorname{mean}\big(g_t^2 / \max(\hat v_t, \epsilon^2)\big)}

    ``"adafactor"`` is Adafactor's update clipping (Shazeer and Stern 2018, section
    "Update Clipping"; ``torch.optim.Adafactor``'s ``d``), for any optimizer. On
    ``torch.optim.Adafactor(d=float("inf"))`` it gives the run of
    ``Adafactor(d=d)`` (tested). ``"stable_adamw"`` is StableAdamW (Wortsman et al.
    2023): the per-tensor learning rate :math:`\eta/\max(1, R_t)` of AdamW, with
    :math:`g_t` the gradient the step used (for Adam's coupled weight decay, with its
    :math:`\lambda\theta_{t-1}` term, as the moments have it) and :math:`\hat v_t =
    v_t/(1-\beta_2^t)` Adam's bias-corrected second moment read from the optimizer's
    state (``exp_avg_sq``, ``step``, ``betas``, ``eps``: ``Adam``, ``AdamW``, ``NAdam``,
    ``RAdam``); on AdamW it gives the run of the first author's StableAdamW
    (``StableAdamWUnfused``; tested). Units: :math:`U` is in parameter units per
    unit step size (about :math:`\pm1` per entry for Adam-type optimizers), so d is
    a bound on its RMS; :math:`R_t` is dimensionless. The decoupled weight decay is
    left alone, as in Adafactor and the first author's StableAdamW; with
    ``scale_weight_decay=True`` it is scaled by :math:`s` too (optimi's StableAdamW).

    Defaults: d = 1 (Adafactor's and StableAdamW's ``clip_thresh``).

    **Every way an optimizer steps.** ``optimizer.step()``; ``optimizer.step(closure)``
    (the copy is taken before the closure runs; LBFGS, which moves the parameters
    several times in one step, has its whole step clipped, ``"adafactor"`` rule
    only); foreach and fused optimizers; ``scaler.step(optimizer)`` (a step the
    scaler skips runs no hook, or, for a fused optimizer, leaves every scale at 1;
    ``"stable_adamw"`` reads the gradients after the step, which are unscaled then:
    ``scaler.step`` unscales them before a non-fused step, and torch's fused kernels,
    which get them scaled, write them back unscaled (the CUDA kernel's "conditional
    gradient store", ``aten/src/ATen/native/cuda/fused_adam_utils.cuh``; tested on the
    CPU kernel); several param groups, each with its own learning
    rate and weight decay; parameters whose ``.grad`` is ``None`` (frozen, unused),
    which the step and the clip leave alone. Parameters with ``requires_grad=False``
    are not copied. Non-finite updates are not made finite: an inf in
    :math:`U` makes the RMS inf, :math:`s = 0`, and that entry NaN (as
    ``torch.optim.Adafactor`` does).

    **Costs.** One copy of the trainable parameters in memory; per step a copy,
    one pass to form the update, one norm and one multiply-add (``"stable_adamw"``:
    one more pass over the gradient and :math:`v`; Adafactor's step size: a norm of
    the copy). No value is read on the host: every decision is a ``torch.where``
    on device tensors, so a step costs no sync. The hooks' code compiles with
    ``torch.compile(fullgraph=True)`` into one graph each that later steps reuse;
    ``torch.compile(optimizer.step)``, which torch itself splits at graph breaks
    inside ``Optimizer.step``, compiles no new graph after the first steps (a
    learning rate that a scheduler changes must then be a tensor, as for torch's
    compiled optimizers).

    **Distributed.** Under FSDP2 (``fully_shard``) or tensor parallelism the
    parameters are DTensors: the copy holds the local shards, and each RMS is that
    of the full tensor, the ranks' local sums of squares combined by one
    all-reduce per group of parameters with the same mesh and placements (as
    :func:`gradclip.distributed.sharded_tensor_norms`), so every rank scales a tensor
    by the same factor (tested on 2 gloo ranks against one process). Under DDP
    nothing is needed. Placements other than ``Shard`` and ``Replicate`` raise
    ``TypeError``.

    Attach it before a :class:`~gradclip.SpikeGuard` on the same optimizer: post-hooks
    run in the order they were registered, and the guard must undo a skipped step
    after the clip (``attach`` raises ``RuntimeError`` otherwise).

    ``state_dict()`` holds the configuration and the step count (plain values;
    ``torch.load(weights_only=True)`` reads it) and the object pickles (detached,
    without its copy of the parameters). After each step ``last_result`` is an
    :class:`UpdateClipResult`.

    Args:
        rule: ``"adafactor"`` or ``"stable_adamw"``.
        d: the threshold, > 0 (``inf`` turns the clip off).
        scale_weight_decay: scale the decoupled weight decay by :math:`s` as well.
        foreach: as in :func:`gradclip.clip_grad_norm_`.

    Raises:
        ValueError: an argument is outside the range given above (the message names it).
        TypeError: an argument has the wrong type; ``attach`` to something that is not a
            ``torch.optim.Optimizer``; ``"stable_adamw"`` on an optimizer without Adam's
            ``betas``, ``eps`` and ``exp_avg_sq``; a sparse gradient under ``"stable_adamw"``;
            a DTensor parameter placed other than ``Shard`` or ``Replicate``.
        RuntimeError: ``attach`` while attached, or after a SpikeGuard on the same optimizer.

    References:
        * Shazeer and Stern (2018), "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", `arXiv:1804.04235 <https://arxiv.org/abs/1804.04235>`__; ``torch.optim.Adafactor`` (``d``).
        * Wortsman et al. (2023), "Stable and low-precision training for large-scale vision-language models", `arXiv:2304.13013 <https://arxiv.org/abs/2304.13013>`__; reference code: the first author's ``StableAdamWUnfused`` (gist ``mitchellnw/d42e22a0b9ec02ceaf4f7b4457f51423``) and optimi's ``StableAdamW`` (`github.com/warner-benjamin/optimi <https://github.com/warner-benjamin/optimi>`__).

    Example:
        >>> import torch, gradclip
        >>> w = torch.nn.Parameter(torch.zeros(4))
        >>> opt = torch.optim.SGD([w], lr=0.1)
        >>> clip = gradclip.UpdateClip("adafactor", d=1.0).attach(opt)
        >>> w.grad = torch.tensor([4.0, -4.0, 4.0, -4.0])  # an update of RMS 4 per unit lr
        >>> opt.step()
        >>> w.detach()
        tensor([-0.1000,  0.1000, -0.1000,  0.1000])
        >>> clip.last_result.scales
        tensor([0.2500], dtype=torch.float64)
    """

    def __init__(self, rule: str = "adafactor", d: float = 1.0, *, scale_weight_decay: bool = False,
                 foreach: bool | None = None) -> None:
        self.rule = _validate.check_choice("rule", rule, _RULES)
        self.d = _validate.check_real("d", d, 0.0, None, low_open=True)
        self.scale_weight_decay = _validate.check_bool("scale_weight_decay", scale_weight_decay)
        self.foreach = _validate.check_foreach(foreach)
        self._steps = torch.zeros((), dtype=torch.int64)
        self.last_result: UpdateClipResult | None = None
        self._handles: list[Any] = []
        self._copies: list[torch.Tensor | None] | None = None

    # --- attaching -------------------------------------------------------------------------

    def attach(self, optimizer: torch.optim.Optimizer) -> "UpdateClip":
        """Clip the updates of ``optimizer``'s steps from now on; returns ``self``.

        ``optimizer`` may be a framework's wrapper (accelerate's ``AcceleratedOptimizer``,
        Lightning's ``LightningOptimizer``): the torch optimizer reached through ``.optimizer`` or
        ``._optimizer`` is hooked.

        Raises:
            TypeError: ``optimizer`` is neither a ``torch.optim.Optimizer`` nor a wrapper holding one in
                ``.optimizer`` or ``._optimizer``, or (``"stable_adamw"``) a param group has no Adam
                ``betas`` and ``eps``.
            RuntimeError: already attached, or a SpikeGuard is attached to ``optimizer`` already.
        """
        optimizer = _validate.check_optimizer(optimizer, "UpdateClip.attach")
        if self._handles:
            raise RuntimeError("UpdateClip is already attached; call detach() first")
        _validate.warn_if_orthogonalizing(optimizer, "UpdateClip")
        if self.rule == "stable_adamw":
            for index, group in enumerate(optimizer.param_groups):
                if not _adam_like(group):
                    raise TypeError(
                        f"UpdateClip('stable_adamw') reads Adam's second moment, but param_groups[{index}] of "
                        f"{type(optimizer).__name__} has no 'betas' (beta1, beta2) and 'eps': use it with Adam, "
                        "AdamW, NAdam or RAdam, or use UpdateClip('adafactor') for other optimizers.")
        if _has_spike_guard(optimizer):
            raise RuntimeError(
                "a SpikeGuard is attached to this optimizer already: attach UpdateClip first, so that its "
                "post-step hook runs before the guard's (which undoes skipped steps).")
        self._handles = [optimizer.register_step_pre_hook(self._pre_hook),
                         optimizer.register_step_post_hook(self._post_hook)]
        return self

    def detach(self) -> None:
        """Stop clipping; a no-op when not attached."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._copies = None

    @property
    def attached(self) -> bool:
        """Whether it clips an optimizer's steps."""
        return bool(self._handles)

    @property
    def steps(self) -> int:
        """How many steps were clipped, not counting those a GradScaler skipped (reads the device counter: a sync on an accelerator)."""
        return int(self._steps)

    # --- the hooks -------------------------------------------------------------------------

    @torch.no_grad()
    def _pre_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        params = optimizer_parameters(optimizer)
        copies = self._copies
        if copies is None or len(copies) != len(params) or any(
            (c is None) != (not p.requires_grad) or (c is not None and not _same_layout(c, p))
            for c, p in zip(copies, params)
        ):
            copies = [torch.empty_like(p) if p.requires_grad else None for p in params]
        for copy, param in zip(copies, params):
            if copy is not None:
                copy.copy_(param)
        self._copies = copies

    @torch.no_grad()
    def _post_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        copies, self._copies = self._copies, None
        if copies is None:
            return
        params = optimizer_parameters(optimizer)
        device = _local(params[0]).device
        wide = _norms.wide_dtype(device)
        rms = torch.full((len(params),), math.nan, dtype=wide, device=device)
        scales = torch.ones(len(params), dtype=wide, device=device)
        skipped = getattr(optimizer, "found_inf", None)  # a fused step under GradScaler that found inf/NaN
        for bucket in _buckets(optimizer, params, copies):
            ratio = self._ratios(optimizer, bucket)
            # (a tensor d: torch computes number / tensor as number * (1 / tensor), which overflows for ratios below 1/max)
            threshold = torch.full_like(ratio, self.d)
            scale = torch.where(ratio > threshold, threshold / ratio, torch.ones_like(ratio))
            if skipped is not None:
                scale = torch.where(skipped.to(scale.device) > 0, torch.ones_like(scale), scale)
            self._rescale(bucket, scale)
            where = torch.tensor(bucket.positions).to(device, non_blocking=True)
            rms.index_copy_(0, where, ratio.to(device))
            scales.index_copy_(0, where, scale.to(device))
        if self._steps.device != device:
            self._steps = self._steps.to(device, non_blocking=True)
        if skipped is None:
            self._steps += 1
        else:  # a step the GradScaler skipped is not counted (a non-fused optimizer's never reaches the hooks)
            self._steps += (skipped.to(device) == 0).to(self._steps.dtype)
        self.last_result = UpdateClipResult(rms=rms, scales=scales)

    def _ratios(self, optimizer: torch.optim.Optimizer, bucket: "_Bucket") -> torch.Tensor:
        """The quantity each tensor's rule compares with d; also turns the copies into the updates."""
        if self.rule == "stable_adamw":
            local_sums = torch.stack([_second_moment_sum(optimizer, bucket, k) for k in range(len(bucket.params))])
            ratio = (_full_norms(bucket, local_sums.sqrt().unsqueeze(1).unbind(), None) ** 2 * bucket.inverse_counts()).sqrt()
            self._form_updates(optimizer, bucket)
            return ratio
        step_sizes = _step_sizes(optimizer, bucket)
        self._form_updates(optimizer, bucket)
        return _full_norms(bucket, bucket.updates, self.foreach) * bucket.inverse_counts().sqrt() / step_sizes

    def _form_updates(self, optimizer: torch.optim.Optimizer, bucket: "_Bucket") -> None:
        """Turn each copy of a parameter before the step into the step's update, a U (in place).

        The optimizer first multiplies the parameter by (1 - c) (decoupled weight decay),
        then adds -a U: (1 - c) * before - after = a U, the same (1 - c) multiply as the
        optimizer's, so the decay cancels exactly.
        """
        for update, group in zip(bucket.updates, bucket.groups):
            decay = 0.0 if self.scale_weight_decay else _decoupled_decay(optimizer, group)
            if not (isinstance(decay, float) and decay == 0.0):
                update.mul_(1 - decay)
        batched = _groups.use_foreach(bucket.updates, bucket.device, self.foreach)
        _groups.apply_(bucket.updates, batched, "sub", bucket.local)

    def _rescale(self, bucket: "_Bucket", scale: torch.Tensor) -> None:
        """theta <- theta + (1 - s) a U, which replaces the step's update a U by s a U (on the local values)."""
        batched = _groups.use_foreach(bucket.local, bucket.device, self.foreach)
        factors = (1 - scale).to(bucket.device, _norms.accumulation_dtype(bucket.local[0].dtype))
        _groups.apply_(bucket.updates, batched, "mul", list(factors.unbind()))
        _groups.apply_(bucket.local, batched, "add", bucket.updates)

    # --- state -----------------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {"class": type(self).__name__, "rule": self.rule, "d": self.d,
                "scale_weight_decay": self.scale_weight_decay}

    def state_dict(self) -> dict[str, Any]:
        """The configuration and the number of steps clipped (plain values; ``weights_only=True`` loads it)."""
        return {"config": self._config(), "steps": self.steps}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state saved by an identically configured ``UpdateClip``.

        Raises:
            ValueError: the state was saved with another configuration (the message names the field),
                or is not an ``UpdateClip`` state.
            TypeError: ``state_dict`` is not a mapping.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        config = state_dict.get("config")
        if not isinstance(config, Mapping) or "steps" not in state_dict:
            raise ValueError("state_dict is not an UpdateClip state: it has no 'config' and 'steps'")
        mine = self._config()
        for key in list(mine) + [k for k in config if k not in mine]:
            if config.get(key) != mine.get(key):
                raise ValueError(f"state_dict was saved with {key}={config.get(key)!r} but this UpdateClip "
                                 f"has {key}={mine.get(key)!r}")
        self._steps = torch.tensor(int(state_dict["steps"]), dtype=torch.int64)
        self.last_result = None

    def __getstate__(self) -> dict[str, Any]:
        """Configuration and step count; the hooks and the copy of the parameters are dropped (unpickled: detached)."""
        state = self.__dict__.copy()
        state.update(_handles=[], _copies=None)
        return state


# --- what the post-hook reads from the optimizer ---------------------------------------------------


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and a.stride() == b.stride()


def _adam_like(group: Mapping[str, Any]) -> bool:
    betas = group.get("betas")
    return isinstance(betas, (tuple, list)) and len(betas) == 2 and "eps" in group


def _has_spike_guard(optimizer: torch.optim.Optimizer) -> bool:
    from .guard import SpikeGuard

    hooks = getattr(optimizer, "_optimizer_step_post_hooks", {}) or {}
    return any(isinstance(getattr(hook, "__self__", None), SpikeGuard) for hook in hooks.values())


class _Bucket(NamedTuple):
    """Parameters the step updated that share device, dtype and (for DTensors) mesh and placements."""

    positions: list[int]  # in optimizer_parameters(optimizer)
    groups: list[dict[str, Any]]  # each one's param group
    params: list[torch.Tensor]  # as the optimizer holds them (DTensors under FSDP2 or tensor parallelism)
    local: list[torch.Tensor]  # their local values (the tensors themselves for plain tensors)
    updates: list[torch.Tensor]  # the local values of the copies taken before the step
    sharding: tuple[Any, tuple[Any, ...]] | None  # (mesh, placements) of DTensors
    device: torch.device

    def inverse_counts(self) -> torch.Tensor:
        """1 / n of each (full) tensor, in the wide dtype: RMS = norm * sqrt(1/n)."""
        return _on_device([1.0 / max(p.numel(), 1) for p in self.params], _norms.wide_dtype(self.device), self.device)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    dtensor = _groups.dtensor_type()
    return tensor.to_local() if dtensor is not None and isinstance(tensor, dtensor) else tensor


def _buckets(optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
             copies: list[torch.Tensor | None]) -> list[_Bucket]:
    """The parameters the step updated (a gradient, and a copy), in buckets for batched kernels."""
    dtensor = _groups.dtensor_type()
    found: dict[tuple[Any, ...], _Bucket] = {}
    index = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            copy = copies[index]
            if copy is not None and param.grad is not None:
                local = _local(param)
                sharding = None
                if dtensor is not None and isinstance(param, dtensor):
                    sharding = (param.device_mesh, tuple(param.placements))
                    _check_placements(sharding[1])
                key = (local.device, local.dtype) + (() if sharding is None else sharding)
                bucket = found.get(key)
                if bucket is None:
                    bucket = found[key] = _Bucket([], [], [], [], [], sharding, local.device)
                bucket.positions.append(index)
                bucket.groups.append(group)
                bucket.params.append(param)
                bucket.local.append(local)
                bucket.updates.append(_local(copy))
            index += 1
    return list(found.values())


def _check_placements(placements: tuple[Any, ...]) -> None:
    kinds = distributed.placement_kinds(placements, "UpdateClip")
    if any(kind not in (distributed.SHARD, distributed.REPLICATE) for kind in kinds):
        raise TypeError(f"UpdateClip clips parameters placed as Shard or Replicate, not {placements}")


def _full_norms(bucket: _Bucket, tensors: Any, foreach: bool | None) -> torch.Tensor:
    """The 2-norm of each full tensor whose local values are ``tensors`` (one per parameter of the bucket).

    For DTensors, each rank's local norms are combined over the mesh dimensions that shard
    the parameters (one all-reduce for the bucket), as :func:`gradclip.distributed.sharded_tensor_norms` does.
    """
    tensors = list(tensors)
    if bucket.sharding is None:
        return _norms.tensor_norms(tensors, 2.0, bucket.device, foreach)
    mesh, placements = bucket.sharding
    pieces = [norm.reshape(1) for norm in _norms.tensor_norms(tensors, 2.0, bucket.device, foreach).unbind()]
    group = _groups.Group(bucket.device, pieces[0].dtype, bucket.params, None,
                          _groups.Sharding(mesh, placements, pieces, None))
    return distributed.sharded_tensor_norms(group, 2.0, foreach)


_DECOUPLED = tuple(getattr(torch.optim, name) for name in ("AdamW", "Adafactor", "Muon") if hasattr(torch.optim, name))


def _decoupled_decay(optimizer: torch.optim.Optimizer, group: Mapping[str, Any]) -> float | torch.Tensor:
    """c in theta <- (1 - c) theta - a U: lr * weight_decay where the optimizer decays the parameter itself."""
    weight_decay = group.get("weight_decay", 0.0) or 0.0
    if weight_decay == 0.0 or not _is_decoupled(optimizer, group):
        return 0.0
    return group["lr"] * weight_decay


def _is_decoupled(optimizer: torch.optim.Optimizer, group: Mapping[str, Any]) -> bool:
    """Whether weight decay multiplies the parameter (AdamW) rather than adding to the gradient (SGD, Adam).

    torch marks the groups of Adam, AdamW, NAdam and RAdam (``decoupled_weight_decay``);
    Adafactor and Muon always decay the parameter itself. Other optimizers can mark their
    groups the same way.
    """
    return bool(group.get("decoupled_weight_decay", False)) or isinstance(optimizer, _DECOUPLED)


def _step_sizes(optimizer: torch.optim.Optimizer, bucket: _Bucket) -> torch.Tensor:
    """The step size a of each parameter: the group's lr; Adafactor's relative step max(eps2, RMS(before)) min(lr, t^-1/2)."""
    wide = _norms.wide_dtype(bucket.device)
    lrs = _on_device([group["lr"] for group in bucket.groups], wide, bucket.device)
    adafactor = getattr(torch.optim, "Adafactor", None)
    if adafactor is None or not isinstance(optimizer, adafactor):
        return lrs
    param_rms = _full_norms(bucket, bucket.updates, None) * bucket.inverse_counts().sqrt()  # still the copies
    steps = torch.stack([_local(optimizer.state[p]["step"]).to(device=bucket.device, dtype=wide, non_blocking=True)
                         for p in bucket.params])
    eps2 = _on_device([group["eps"][1] for group in bucket.groups], wide, bucket.device)
    return torch.maximum(param_rms, eps2) * torch.minimum(lrs, steps.rsqrt())


def _second_moment_sum(optimizer: torch.optim.Optimizer, bucket: _Bucket, k: int) -> torch.Tensor:
    """sum(g^2 / max(v_hat, eps^2)) over one parameter's local values (StableAdamW's R^2 times n), in the wide dtype."""
    param, group = bucket.params[k], bucket.groups[k]
    state = optimizer.state.get(param) or {}
    if "exp_avg_sq" not in state or "step" not in state:
        raise TypeError(
            f"UpdateClip('stable_adamw') reads Adam's second moment, but {type(optimizer).__name__} keeps no "
            "'exp_avg_sq' and 'step' for a parameter it stepped: use it with Adam, AdamW, NAdam or RAdam.")
    grad = _local(param.grad)
    _validate.check_dense_one(grad, "a gradient")
    wide = _norms.wide_dtype(bucket.device)
    beta2, eps = group["betas"][1], group["eps"]
    square, before = _local(state["exp_avg_sq"]), bucket.updates[k]  # (the copy still holds the parameter)
    if grad.is_complex():  # torch's Adam steps complex tensors as their real views
        grad, square, before = (torch.view_as_real(t) for t in (grad, square, before))
    g = grad.to(wide)  # unscaled: by GradScaler before the step, or in place by a fused kernel (see the class)
    weight_decay = group.get("weight_decay", 0.0) or 0.0
    if weight_decay != 0.0 and not _is_decoupled(optimizer, group):  # Adam's L2 term is part of the gradient it averages
        g = g + weight_decay * before.to(wide)
    bias = 1 - beta2 ** _local(state["step"]).to(device=g.device, dtype=wide, non_blocking=True)
    v_hat = torch.clamp(square.to(wide) / bias, min=eps * eps)
    return torch.sum(g * g / v_hat)


def _on_device(values: list[Any], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Numbers (one copy to the device) or tensors (a learning rate kept in a tensor) as one 1-D tensor.

    Host-to-device copies do not wait (``non_blocking``): a blocking one synchronises with the device.
    """
    if any(isinstance(v, torch.Tensor) for v in values):
        return torch.stack([torch.as_tensor(v).to(device=device, dtype=dtype, non_blocking=True).reshape(())
                            for v in values])
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
