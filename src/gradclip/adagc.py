"""AdaGC: each gradient tensor clipped against an EMA of its own clipped norms (and OLMo's preset of the rule)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from . import _groups, _norms, _validate
from ._scaling import scale_each_
from .clippers import Clipper, StepCount
from .layerwise import _norms_by_group

__all__ = ["AdaGC", "AdaGCResult"]


@dataclass(frozen=True)
class AdaGCResult:
    r"""What one :class:`AdaGC` call did, as device tensors (reading one is a sync; keeping them is not).

    Attributes:
        norm: the global p-norm of the gradients before clipping, 0-dim (float32, float64 for
            float64 gradients), as :func:`gradclip.get_total_norm` returns it.
        norms: each gradient's norm before clipping, 1-D, in the order of the parameters that
            have a gradient (same dtype as ``norm``).
        scales: the factor each of those gradients was multiplied by, 1-D, in [0, 1].

    References:
        * Wang et al. (2025), "AdaGC: Enhancing LLM Pretraining Stability via Adaptive Gradient Clipping", `arXiv:2502.11034 <https://arxiv.org/abs/2502.11034>`__.

    Example:
        >>> import torch
        >>> from gradclip.adagc import AdaGCResult
        >>> r = AdaGCResult(norm=torch.tensor(5.0), norms=torch.tensor([3.0, 4.0]), scales=torch.tensor([1.0, 0.5]))
        >>> r.clipped.tolist(), r.post_norms.tolist()
        ([False, True], [3.0, 2.0])
    """

    norm: torch.Tensor
    norms: torch.Tensor
    scales: torch.Tensor

    @property
    def clipped(self) -> torch.Tensor:
        """A bool tensor, one entry per gradient: whether it was scaled down."""
        return self.scales < 1

    @property
    def post_norms(self) -> torch.Tensor:
        """Each gradient's norm after clipping."""
        return self.norms * self.scales


class AdaGC(Clipper):
    r"""Clip each gradient tensor to ``lambda_rel`` times an EMA of its own clipped norms (AdaGC).

    For tensor :math:`i` at step :math:`t` (counting calls from 1), with
    :math:`n_{t,i} = \|g_{t,i}\|_p` its norm before clipping, :math:`T` =
    ``warmup_steps``, :math:`\lambda_{\text{rel}}`, :math:`\lambda_{\text{abs}}`,
    :math:`\beta` and :math:`\epsilon` the arguments:

    * *warm-up*, :math:`t \le T`: global norm clipping at :math:`\lambda_{\text{abs}}`,
      :math:`h_t = \min\big(1, \lambda_{\text{abs}}/(\|g_t\|_p + \epsilon)\big)` for every tensor
      (:math:`\|g_t\|_p` the norm of all gradients together), and :math:`\gamma_{t,i} =
      \min(\gamma_{t-1,i},\, h_t n_{t,i})`, the smallest clipped norm seen;
    * *after it*, each tensor on its own:

    .. math::

        c_{t,i} = \lambda_{\text{rel}}\,\gamma_{t-1,i}, \qquad
        h_{t,i} = \begin{cases} c_{t,i}/(n_{t,i} + \epsilon) & n_{t,i} > c_{t,i} \\
                                1 & \text{otherwise} \end{cases},

    .. math::

        \gamma_{t,i} = \beta\,\gamma_{t-1,i} + (1 - \beta)\,\min(n_{t,i},\, c_{t,i})

    and :math:`g_{t,i} \leftarrow h_{t,i}\, g_{t,i}`. The EMA is fed the *clipped*
    norm, taken as :math:`c_{t,i}` when the tensor is clipped; a tensor with no
    :math:`\gamma` yet (its first gradient after the warm-up) starts with
    :math:`\gamma_{t-1,i} = n_{t,i}`. This is the rule of the authors' PyTorch
    implementation (class ``AdaGC`` in ``megatron/optimizer/clip_grads.py`` of the
    Megatron patch in ``lishuai-97/AdaGC``), step for step (tested against a
    float64 transcription of it, ``tests/test_adagc.py``). Norms are in the
    gradients' units; :math:`\gamma` is kept per parameter in ``dtype``.

    Defaults: :math:`\lambda_{\text{rel}} = 1.05`, :math:`\beta = 0.98`,
    :math:`T = 100`, :math:`\lambda_{\text{abs}} = 1`, :math:`\epsilon = 10^{-6}` (the
    values of the ``kozistr/pytorch_optimizer`` port; the authors' patch defaults to
    ``clip_ratio=1.04``, ``clip_beta=0.99``, 100 warm-up steps and Megatron's
    ``--clip-grad``, 1.0 in its script).

    **OLMo's preset**, :meth:`olmo`: OLMo's ``max_grad_norm_ratio``
    (``allenai/OLMo``, ``olmo/optim.py``, ``Optimizer._do_adaptive_clipping``,
    2023-24) is the same rule without the warm-up and with torch's factor:
    :math:`h = \min\big(1, c/(n + 10^{-6})\big)` and :math:`\gamma \leftarrow \beta\gamma +
    (1-\beta)\,h\,n`, the EMA starting at a tensor's first norm. OLMo does not keep
    that first EMA on the trainer's step 1 (it adds optimizer state only from step
    2), so its EMA starts at the second step's norm; the preset does the same.

    **State per parameter, by position.** :math:`\gamma` is one entry per
    parameter of the ``parameters`` given, in their order (an optimizer's order
    when attached): pass the same parameters in the same order on every call,
    those without a gradient included (a changed count raises ``ValueError``).
    A parameter without a gradient keeps its :math:`\gamma` for later.

    **Differences from the references**, none of which changes a result for
    finite, nonzero gradients: a gradient that is all zeros (a parameter unused
    this step, an expert no token was routed to) leaves :math:`\gamma` unchanged; in
    the references it makes :math:`\gamma = 0` during the warm-up, and every later
    gradient of that tensor is then multiplied by 0, forever. A non-finite norm
    never enters :math:`\gamma`, and a call whose global norm is non-finite (a
    step that ``GradScaler`` skips) changes no :math:`\gamma` and does not count
    as a step of the warm-up, as if the call had not been made; its gradient is scaled as usual, so a NaN stays NaN
    and an inf makes its tensor's factor 0 and the inf entries NaN (during the
    warm-up, as in :func:`gradclip.clip_grad_norm_`: a NaN global norm makes every
    gradient NaN, an inf one every factor 0). The references read norms on the
    host every step (``.item()``, a comparison); here every branch is a
    ``torch.where`` on device tensors, the step count included, so a call never
    synchronises and a ``torch.compile(fullgraph=True)`` graph does not change
    from step to step. The factor multiplies the gradients in float32 at least
    (OLMo multiplies in the gradients' dtype).

    **Distributed.** Each tensor's norm is the norm of the whole tensor: DTensor
    gradients (FSDP2, tensor parallelism) have their local :math:`|g|^p` sums
    all-reduced per tensor (:func:`gradclip.distributed.sharded_tensor_norms`), so
    every rank sees the same norms and keeps the same :math:`\gamma`; the global norm
    of the warm-up is computed from those per-tensor norms, with no further
    communication. Under DDP nothing is needed. Hand-sharded plain tensors are
    not supported (their norms would be those of the shards).

    Attached (``attach(optimizer)``), it runs in the step pre-hook, inside the
    closure of ``optimizer.step(closure)`` (each LBFGS evaluation is a step), and
    under ``scaler.step`` with a fused optimizer decides on the unscaled norms; see
    :class:`~gradclip.Clipper`. ``state_dict()`` holds ``gamma`` (a CPU copy, NaN
    for parameters without one yet) and loads with ``weights_only=True``; the
    clipper pickles (detached). Each call returns an :class:`AdaGCResult`, also
    kept as ``last_result``. ``steps`` counts calls on finite gradients as in every
    :class:`~gradclip.Clipper`: the warm-up is decided on the clipper's device
    counter, and after calls on an accelerator or inside ``torch.compile`` the first read of
    ``steps`` reads that counter once (a sync on an accelerator).

    Args:
        lambda_rel: :math:`\lambda_{\text{rel}}` > 0, the threshold relative to :math:`\gamma`.
        beta: :math:`\beta` in [0, 1), the EMA's decay.
        warmup_steps: T >= 0, steps of global clipping before the per-tensor rule.
        lambda_abs: :math:`\lambda_{\text{abs}}` > 0 (``inf`` for none), the global threshold of the warm-up.
        eps: :math:`\epsilon` >= 0, added to the norm in the factor.
        norm_type: p of every norm, in (0, inf].
        dtype: ``torch.float64`` or ``torch.float32``, for :math:`\gamma`.
        foreach: as in :func:`gradclip.clip_grad_norm_`.
        scaler: the ``GradScaler`` of the loss, to check that gradients were unscaled.

    Raises:
        RuntimeError: no parameters were given (an empty list, or an iterator consumed earlier), no parameter has a gradient (call ``loss.backward()`` first, or inside the closure given to ``optimizer.step``), the clipper is called twice on the same gradients, or, with ``scaler=``, it is called by hand on gradients that are still scaled (call ``scaler.unscale_(optimizer)`` first, or attach it).
        ValueError: an argument is outside the range given above (the message names it), or the number of parameters changed between calls.
        TypeError: an argument has the wrong type (the message names it), or a gradient is sparse.

    References:
        * Wang et al. (2025), "AdaGC: Enhancing LLM Pretraining Stability via Adaptive Gradient Clipping", `arXiv:2502.11034 <https://arxiv.org/abs/2502.11034>`__; reference code `github.com/lishuai-97/AdaGC <https://github.com/lishuai-97/AdaGC>`__ (``megatron-gpt2.patch``).
        * Groeneveld et al. (2024), "OLMo: Accelerating the Science of Language Models", `arXiv:2402.00838 <https://arxiv.org/abs/2402.00838>`__; ``max_grad_norm_ratio`` in `github.com/allenai/OLMo <https://github.com/allenai/OLMo>`__, ``olmo/optim.py`` (proposed in allenai/OLMo#266).

    Example:
        >>> import torch, gradclip
        >>> w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
        >>> adagc = gradclip.AdaGC(lambda_rel=1.05, beta=0.98, warmup_steps=2, lambda_abs=10.0)
        >>> for g in ([3.0, 4.0], [3.0, 4.0], [30.0, 40.0]):  # norms 5, 5, then a spike of 50
        ...     w.grad = torch.tensor(g, dtype=torch.float64)
        ...     result = adagc([w])
        >>> round(float(result.norms[0]), 3), round(float(result.post_norms[0]), 3)
        (50.0, 5.25)
    """

    def __init__(self, lambda_rel: float = 1.05, beta: float = 0.98, warmup_steps: int = 100,
                 lambda_abs: float = 1.0, eps: float = 1e-6, *, norm_type: float | str = 2.0,
                 dtype: torch.dtype = torch.float64, foreach: bool | None = None,
                 scaler: torch.amp.GradScaler | None = None) -> None:
        super().__init__(norm_type=norm_type, foreach=foreach, scaler=scaler)
        self.lambda_rel = _validate.check_real("lambda_rel", lambda_rel, 0.0, None, low_open=True)
        self.beta = _validate.check_real("beta", beta, 0.0, 1.0, high_open=True)
        self.warmup_steps = _validate.check_int("warmup_steps", warmup_steps, 0)
        self.lambda_abs = _validate.check_real("lambda_abs", lambda_abs, 0.0, None, low_open=True)
        self.eps = _validate.check_real("eps", eps, 0.0)
        self.dtype = _validate.check_state_dtype(dtype)
        self.rule = "adagc"
        self.gamma: torch.Tensor | None = None
        """:math:`\\gamma`, one entry per parameter (NaN where none yet), or ``None`` before the first call."""

    @classmethod
    def olmo(cls, max_grad_norm_ratio: float, beta: float, *, eps: float = 1e-6, norm_type: float | str = 2.0,
             dtype: torch.dtype = torch.float64, foreach: bool | None = None,
             scaler: torch.amp.GradScaler | None = None) -> "AdaGC":
        r"""OLMo's ``max_grad_norm_ratio`` clipping: the per-tensor rule from the first step, with torch's factor.

        .. math::

            h = \min\Big(1, \frac{r\,\gamma}{n + \epsilon}\Big), \qquad
            \gamma \leftarrow \beta\,\gamma + (1 - \beta)\, h\, n

        with r = ``max_grad_norm_ratio`` and :math:`\gamma` starting at a tensor's first
        norm; the first call's :math:`\gamma` is not kept (OLMo starts its state on the
        trainer's second step). OLMo takes :math:`\beta = \max(\beta_1, \beta_2)` of the
        optimizer's group (0.95 for its AdamW betas (0.9, 0.95)); pass it.

        Args:
            max_grad_norm_ratio: r > 0.
            beta: :math:`\beta` in [0, 1).
            eps: :math:`\epsilon` >= 0 (OLMo: 1e-6).
            norm_type, dtype, foreach, scaler: as in :class:`AdaGC`.

        Returns:
            An :class:`AdaGC` with ``rule == "olmo"``.

        Raises:
            ValueError: an argument is outside the range given above.
            TypeError: an argument has the wrong type.

        References:
            * Groeneveld et al. (2024), "OLMo: Accelerating the Science of Language Models", `arXiv:2402.00838 <https://arxiv.org/abs/2402.00838>`__; reference code ``Optimizer._do_adaptive_clipping`` in `allenai/OLMo olmo/optim.py <https://github.com/allenai/OLMo/blob/main/olmo/optim.py>`__ (proposed in `allenai/OLMo#266 <https://github.com/allenai/OLMo/issues/266>`__); tested step by step against a float64 transcription of it (``tests/test_adagc.py``).

        Example:
            >>> import torch, gradclip
            >>> w = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
            >>> clip = gradclip.AdaGC.olmo(max_grad_norm_ratio=2.0, beta=0.95)
            >>> for g in (1.0, 1.0, 10.0):
            ...     w.grad = torch.tensor([g], dtype=torch.float64)
            ...     result = clip([w])
            >>> round(float(w.grad), 4)
            2.0
        """
        clipper = cls(lambda_rel=max_grad_norm_ratio, beta=beta, warmup_steps=1, lambda_abs=math.inf, eps=eps,
                      norm_type=norm_type, dtype=dtype, foreach=foreach, scaler=scaler)
        clipper.rule = "olmo"
        return clipper

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "rule": self.rule, "lambda_rel": self.lambda_rel, "beta": self.beta,
                "warmup_steps": self.warmup_steps, "lambda_abs": self.lambda_abs, "eps": self.eps,
                "dtype": str(self.dtype)}

    # --- one call --------------------------------------------------------------------------

    def _check_parameters(self, params: list[torch.Tensor]) -> None:
        params = _validate.distinct(params)  # (a parameter listed twice is one parameter, with one EMA)
        if self.gamma is not None and len(self.gamma) != len(params):
            raise ValueError(
                f"{type(self).__name__} keeps one EMA per parameter, by position: it was first called with "
                f"{len(self.gamma)} parameters and now with {len(params)}. Pass the same parameters in the same "
                "order on every call, those without a gradient included (e.g. list(model.parameters()), made once).")

    def _clip(self, checked: _validate.Checked, grad_scale: torch.Tensor | float | None,
              count: StepCount | None) -> tuple[AdaGCResult, torch.device, torch.Tensor]:
        """Each gradient's norm, its factor, the scaling: ``(result, device, whether the call counts)``."""
        params = _validate.distinct(checked.items)
        positions = [i for i, p in enumerate(params) if p.grad is not None]
        grads = _validate.grads_of(params)
        by_group = _norms_by_group(grads, self._p, self.foreach)
        device = grads[0].device
        places = _places(grads, [group for group, _ in by_group], device)
        wide = torch.empty(len(grads), dtype=_norms.wide_dtype(device), device=device)
        for (group, values), where in zip(by_group, places):
            wide.index_copy_(0, where, values.to(device=device, dtype=wide.dtype))
        if grad_scale is not None:  # a fused step under GradScaler: the gradients are still scaled
            if isinstance(grad_scale, torch.Tensor):
                grad_scale = grad_scale.detach().to(device=device, dtype=wide.dtype).reshape(())
            wide = wide / grad_scale
        total = _norms.combine(wide, self._p)
        assert count is not None  # (the shared checks refuse a call without gradients)
        warm = count.value < self.warmup_steps  # on the device when the count is: no sync, one graph
        if not count.on_device:
            warm = torch.tensor(warm, device=device)
        factors = self._update(wide.to(self.dtype), total.to(self.dtype), positions, len(params), device, warm)
        for (group, _), where in zip(by_group, places):
            scale_each_(group, factors.index_select(0, where), self.foreach)
        out = _norms.output_dtype([g.dtype for g in grads])
        result = AdaGCResult(norm=total.to(out), norms=wide.to(out), scales=factors.to(out))
        return result, device, torch.isfinite(total)

    def _update(self, norms: torch.Tensor, total: torch.Tensor, positions: list[int], count: int,
                device: torch.device, warm: torch.Tensor) -> torch.Tensor:
        """The factor of each gradient; updates gamma at ``positions``, on the device (``warm``: a 0-dim bool)."""
        if self.gamma is None or self.gamma.device != device:
            gamma = torch.full((count,), math.nan, dtype=self.dtype, device=device)
            if self.gamma is not None:
                gamma.copy_(self.gamma)
            self.gamma = gamma
        where = _on(positions, device)
        previous = self.gamma.index_select(0, where)
        known = ~torch.isnan(previous)
        start = torch.where(known, previous, norms)  # a tensor's first norm starts its EMA
        cap = self.lambda_rel * start
        if self.rule == "adagc":
            over = norms > cap
            own = torch.where(over, cap / (norms + self.eps), 1.0)
            entered = torch.where(over, cap, norms)
            warm_factor = torch.clamp(self.lambda_abs / (total + self.eps), max=1.0)
            warm_norms = norms * warm_factor
            factors = torch.where(warm, warm_factor, own)
            entered = torch.where(warm, warm_norms, entered)
            smallest = torch.where(known, torch.minimum(previous, warm_norms), warm_norms)
            new = torch.where(warm, smallest, self.beta * start + (1 - self.beta) * entered)
            keep = torch.zeros_like(known)
        else:  # OLMo: torch's factor from the first step; the first call's EMA is not kept
            factors = torch.clamp(cap / (norms + self.eps), max=1.0)
            entered = norms * factors
            new = self.beta * start + (1 - self.beta) * entered
            keep = warm.expand_as(known)
        # no information (no gradient signal, or a non-finite one): gamma stays as it was; and a step
        # whose global norm is inf or NaN (one GradScaler skips) changes no gamma and is not counted
        counted = torch.isfinite(total)
        keep = keep | ~(torch.isfinite(norms) & torch.isfinite(entered) & (entered > 0) & torch.isfinite(new))
        self.gamma.index_copy_(0, where, torch.where(keep | ~counted, previous, new))
        return factors

    # --- state -----------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        # a copy, also on the CPU (where .cpu() returns the tensor itself, which later steps change)
        return {"gamma": None if self.gamma is None else self.gamma.detach().to("cpu", copy=True)}

    def _load_state(self, state: Mapping[str, Any]) -> None:
        gamma = state.get("gamma")
        if gamma is not None and (not isinstance(gamma, torch.Tensor) or gamma.ndim != 1):
            raise ValueError("state_dict['gamma'] must be a 1-D tensor (one entry per parameter) or None")
        self.gamma = None if gamma is None else gamma.to(self.dtype).clone()


def _key(tensor: torch.Tensor) -> tuple[Any, ...]:
    """What :func:`gradclip._groups.groups_of` groups a tensor by: (device, dtype), and mesh and placements for a DTensor."""
    dtensor = _groups.dtensor_type()
    if dtensor is not None and isinstance(tensor, dtensor):
        shard = tensor.to_local()
        return (shard.device, shard.dtype, tensor.device_mesh, tuple(tensor.placements))
    return (tensor.device, tensor.dtype)


def _places(grads: list[torch.Tensor], groups: list[_groups.Group], device: torch.device) -> list[torch.Tensor]:
    """For each group, the positions of its tensors in ``grads`` (groups keep the order of ``grads``).

    Matched by the grouping key, not by ``id()``: under ``torch.compile`` an ``id()`` of a
    gradient would make the graph depend on that very tensor object.
    """
    keys = [_key(g) for g in grads]
    places = []
    for group in groups:
        sharding = group.sharding
        key = (group.device, group.dtype) if sharding is None else (
            group.device, group.dtype, sharding.mesh, tuple(sharding.placements))
        places.append(_on([k for k, other in enumerate(keys) if other == key], device))
    return places


def _on(values: list[int], device: torch.device) -> torch.Tensor:
    """Host numbers as a device tensor, copied without waiting (a blocking host-to-device copy synchronises)."""
    return torch.tensor(values).to(device, non_blocking=True)
