"""ZClip: z-score spike detection on an EMA of gradient norms, kept on the device."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from . import _groups, _validate
from ._scaling import NORM_EPS, clip_coefficient, scale_
from .clippers import Clipper, StepCount
from .result import ClipResult

__all__ = ["ZClip"]


class ZClip(Clipper):
    r"""Adaptive clipping of gradient-norm spikes by z-score against an EMA (ZClip).

    Kumar, Owen, Chowdhury and Güra 2025, `arXiv:2504.02507 <https://arxiv.org/abs/2504.02507>`__;
    the same defaults and the same thresholds as the authors' reference
    (``bluorion-com/ZClip``, ``zclip/zclip.py``). For the first ``warmup_steps``
    steps the norms :math:`g_t` are collected and the gradients are clipped to
    ``max_grad_norm`` only; then :math:`\mu` and :math:`\sigma^2` start as the
    mean and *population* variance of those norms. After warm-up, with
    :math:`\sigma = \sqrt{\sigma^2}`, :math:`z_t` = ``z_thresh`` and
    :math:`f` = ``clip_factor``:

    .. math::

        z = \frac{g - \mu}{\sigma + \epsilon}, \qquad
        c = \begin{cases}
            f\,\big(\mu + z_t^2\,\sigma / z\big) & z > z_t \text{ (zscore, adaptive\_scaling)} \\
            \mu & z > z_t \text{ (zscore, mean)} \\
            \mu + z_t\,\sigma & g > \mu + z_t\,\sigma \text{ (percentile)}
        \end{cases}

    The gradients are scaled by :math:`\min(c, M)/(g + 10^{-6})` when
    :math:`g > \min(c, M)` (:math:`c = g` without a spike, M = ``max_grad_norm``,
    which by default also caps every step at 1.0). Then the EMA is updated with
    :math:`x = c` on a spike (not capped by M) and :math:`x = g` otherwise, the
    variance using the *updated* mean:

    .. math::

        \mu \leftarrow \alpha\mu + (1-\alpha)x, \qquad
        \sigma^2 \leftarrow \alpha\sigma^2 + (1-\alpha)(x - \mu)^2

    (not at all on a spike when ``skip_update_on_spike=True``). As in the
    reference code, ``clip_factor`` multiplies the whole adaptive threshold.

    Differences from the reference, none of which changes a threshold for
    finite norms: the state is a pair of 0-dim tensors on the gradients'
    device (``dtype``, float64 by default, the precision of the reference's
    Python floats) and every branch is a ``torch.where``, so a step never
    synchronises (the reference calls ``.item()`` each step); the warm-up
    buffer is a device tensor; a call on a non-finite norm (a step that
    ``GradScaler`` skips, or any inf/NaN gradient) changes no state: it does not
    update the EMA, takes no slot of the warm-up and is not counted in ``steps``,
    so a run whose overflow steps reach the clipper (a fused optimizer under
    ``scaler.step``, a call by hand after ``scaler.unscale_``) keeps the state of
    one whose overflow steps never do (in the reference one ``nan`` poisons the
    EMA for the rest of training); a norm whose update would make
    :math:`\mu` or :math:`\sigma^2` overflow does not update the EMA either. The warm-up ends after
    ``warmup_steps`` finite norms; if its statistics are not finite anyway
    (norms whose squares overflow, or a state saved by an earlier version that
    let a non-finite norm take a warm-up slot), :math:`\mu` and :math:`\sigma^2` stay undefined (NaN) until
    the first finite norm after it, which starts them (:math:`\mu = g`,
    :math:`\sigma^2 = 0`) with no spike decision on that step (only
    ``max_grad_norm`` applies); once a finite norm has been seen they are never
    NaN again. With ``max_grad_norm=None`` the reported ``threshold`` is
    ``inf`` on steps without a spike.

    **Attached** (``attach(optimizer)``), it clips inside the closure of
    ``optimizer.step(closure)`` (each LBFGS evaluation is a step of the EMA
    and of the warm-up) and, with a fused optimizer under ``scaler.step``,
    decides on the unscaled norm; see :class:`~gradclip.Clipper`.
    ``state_dict()`` returns copies, and the clipper pickles (detached).

    Args:
        alpha: EMA smoothing factor, in (0, 1).
        z_thresh: :math:`z_t`, > 0.
        max_grad_norm: a fixed cap M >= 0 applied on every step, or ``None``.
        eps: added to :math:`\sigma` in the z-score, >= 0.
        warmup_steps: steps collected before the EMA starts, >= 1.
        mode: ``"zscore"`` or ``"percentile"`` (threshold :math:`\mu + z_t\sigma`).
        clip_option: ``"adaptive_scaling"`` or ``"mean"`` (zscore mode only).
        clip_factor: f, > 0.
        skip_update_on_spike: leave the EMA unchanged on a spike.
        norm_type: p of the global norm, in (0, inf].
        dtype: ``torch.float64`` or ``torch.float32`` for the state.
        foreach: as in :func:`gradclip.clip_grad_norm_`.
        scaler: the ``GradScaler`` of the loss, to check that gradients were unscaled.
        process_group, replicated: for sharded gradients under ``torch.distributed``,
            as in :class:`~gradclip.Clipper`.

    Raises:
        RuntimeError: no parameters were given (an empty list, or an iterator consumed earlier), no parameter has a gradient (call ``loss.backward()`` first, or inside the closure given to ``optimizer.step``), the clipper is called twice on the same gradients, or, with ``scaler=``, it is called by hand on gradients that are still scaled (call ``scaler.unscale_(optimizer)`` first, or attach it).
        ValueError: an argument is outside the range given above (the message names it).
        TypeError: an argument has the wrong type (the message names it), or a gradient is sparse.

    References:
        * Kumar, Owen, Chowdhury and Güra (2025), "ZClip: Adaptive Spike Mitigation for LLM Pre-Training", `arXiv:2504.02507 <https://arxiv.org/abs/2504.02507>`__.

    Example:
        >>> import torch, gradclip
        >>> w = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        >>> zclip = gradclip.ZClip(warmup_steps=3, max_grad_norm=None)
        >>> for g in (1.0, 1.2, 0.8, 1.1, 9.0):
        ...     w.grad = torch.tensor([g], dtype=torch.float64)
        ...     result = zclip([w])
        >>> bool(result.clipped), round(float(result.threshold), 4)
        (True, 1.0234)
    """

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, max_grad_norm: float | None = 1.0,
                 eps: float = 1e-6, warmup_steps: int = 25, mode: str = "zscore",
                 clip_option: str = "adaptive_scaling", clip_factor: float = 1.0,
                 skip_update_on_spike: bool = False, *, norm_type: float | str = 2.0,
                 dtype: torch.dtype = torch.float64, foreach: bool | None = None,
                 scaler: torch.amp.GradScaler | None = None, process_group: Any = None,
                 replicated: Iterable[torch.Tensor] | None = None) -> None:
        super().__init__(norm_type=norm_type, foreach=foreach, scaler=scaler, process_group=process_group,
                         replicated=replicated)
        self.alpha = _validate.check_real("alpha", alpha, 0.0, 1.0, low_open=True, high_open=True)
        self.z_thresh = _validate.check_real("z_thresh", z_thresh, 0.0, None, low_open=True)
        self.max_grad_norm = None if max_grad_norm is None else _validate.check_real("max_grad_norm", max_grad_norm, 0.0)
        self.eps = _validate.check_real("eps", eps, 0.0)
        self.warmup_steps = _validate.check_int("warmup_steps", warmup_steps, 1)
        self.mode = _validate.check_choice("mode", mode, ("zscore", "percentile"))
        self.clip_option = _validate.check_choice("clip_option", clip_option, ("adaptive_scaling", "mean"))
        self.clip_factor = _validate.check_real("clip_factor", clip_factor, 0.0, None, low_open=True)
        self.skip_update_on_spike = _validate.check_bool("skip_update_on_spike", skip_update_on_spike)
        self.dtype = _validate.check_state_dtype(dtype)
        self._buffer: torch.Tensor | None = None  # the warm-up's norms
        self._mean: torch.Tensor | None = None
        self._var: torch.Tensor | None = None

    @property
    def mean(self) -> torch.Tensor | None:
        """The EMA of the norms, a 0-dim tensor (``None`` during warm-up)."""
        return None if self.warming_up else self._mean

    @mean.setter
    def mean(self, value: torch.Tensor | None) -> None:
        self._mean = value

    @property
    def var(self) -> torch.Tensor | None:
        """The EMA of the squared deviations, a 0-dim tensor (``None`` during warm-up)."""
        return None if self.warming_up else self._var

    @var.setter
    def var(self, value: torch.Tensor | None) -> None:
        self._var = value

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "alpha": self.alpha, "z_thresh": self.z_thresh,
                "max_grad_norm": self.max_grad_norm, "eps": self.eps, "warmup_steps": self.warmup_steps,
                "mode": self.mode, "clip_option": self.clip_option if self.mode == "zscore" else None,
                "clip_factor": self.clip_factor, "skip_update_on_spike": self.skip_update_on_spike,
                "dtype": str(self.dtype)}

    @property
    def warming_up(self) -> bool:
        """Whether the EMA has not started yet."""
        return self.steps < self.warmup_steps

    def _step(self, groups: _groups.Plan, norm: torch.Tensor, wide: torch.Tensor, count: StepCount) -> ClipResult:
        if count.on_device:  # (accelerators, torch.compile: the warm-up's end is not read on the host)
            return self._traced_step(groups, norm, wide.to(self.dtype), count.value)
        if count.value < self.warmup_steps:
            return self._warmup_step(groups, norm, wide.to(self.dtype), count.value)
        assert self._mean is not None and self._var is not None
        if self.dtype == torch.float64:  # on the CPU, outside compile: a dozen scalar operations cost less as floats
            return self._host_step(groups, norm, wide.item())
        g = wide.to(self.dtype)
        threshold, scale, self._mean, self._var = self._ema_step(g, self._mean.to(g.device), self._var.to(g.device))
        scale_(groups, scale, self.foreach)
        return ClipResult(norm=norm, threshold=threshold, scale=scale.to(norm.dtype))

    def _host_step(self, groups: _groups.Plan, norm: torch.Tensor, g: float) -> ClipResult:
        """:meth:`_ema_step` on Python floats (float64, the same operations in the same order: equal to the last
        bit), for a float64 state on the CPU, where reading the norm (``g``, its float64 value) is free. A factor
        of exactly 1 multiplies nothing."""
        assert self._mean is not None and self._var is not None
        mean, var = self._mean.item(), self._var.item()
        threshold, scale, new_mean, new_var = self._ema_step_host(g, mean, var, self._var.sqrt().item())
        device = norm.device
        if new_mean is not mean or new_var is not var:  # (a kept state keeps its tensors)
            self._mean = torch.scalar_tensor(new_mean, dtype=torch.float64, device=device)
            self._var = torch.scalar_tensor(new_var, dtype=torch.float64, device=device)
        scale_(groups, scale, self.foreach)
        return ClipResult(norm=norm, threshold=torch.scalar_tensor(threshold, dtype=torch.float64, device=device),
                          scale=torch.scalar_tensor(scale, dtype=norm.dtype, device=device))

    def _ema_step_host(self, g: float, mean: float, var: float,
                       std: float | None = None) -> tuple[float, float, float, float]:
        """:meth:`_ema_step` on floats: (threshold, scale, new mean, new var). IEEE float64 as torch computes it
        (a division by zero gives inf or NaN, not an error; the square root is torch's: ``std``, the float64
        ``var`` tensor's ``sqrt()``, or computed here when not given)."""
        started = math.isfinite(mean) and math.isfinite(var)
        # torch's square root, not math.sqrt: on an AVX2 CPU torch's is not always correctly rounded (1 ulp apart
        # at some values), and this step must equal the tensor step accelerators and torch.compile run
        if std is None:
            std = float(torch.scalar_tensor(var, dtype=torch.float64).sqrt_())
        if self.mode == "percentile":
            clip_val = mean + self.z_thresh * std
            spike = g > clip_val
        else:
            z = _divide(g - mean, std + self.eps)
            spike = z > self.z_thresh
            if self.clip_option == "adaptive_scaling":
                clip_val = (mean + _divide(self.z_thresh * std, z / self.z_thresh)) * self.clip_factor
            else:
                clip_val = mean
        spike = spike and started
        threshold = clip_val if spike else math.inf
        if self.max_grad_norm is not None:
            threshold = min(threshold, self.max_grad_norm)  # (NaN stays NaN, as torch.clamp)
        scale = threshold / (g + NORM_EPS) if g > threshold else 1.0
        x = clip_val if spike else g
        new_mean = self.alpha * mean + (1 - self.alpha) * x
        deviation = x - new_mean
        new_var = self.alpha * var + (1 - self.alpha) * (deviation * deviation)
        if not started:
            new_mean, new_var = g, 0.0
        keep = not (math.isfinite(g) and math.isfinite(new_mean) and math.isfinite(new_var))
        if self.skip_update_on_spike:
            keep = keep or spike
        return threshold, scale, (mean if keep else new_mean), (var if keep else new_var)

    def _ema_step(self, g: torch.Tensor, mean: torch.Tensor, var: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A step after warm-up: (threshold, scale, new mean, new var), all 0-dim tensors, nothing read."""
        # False only while no finite norm was seen (warm-up without one): the EMA is undefined (NaN)
        started = torch.isfinite(mean) & torch.isfinite(var)
        std = var.sqrt()
        if self.mode == "percentile":
            clip_val = mean + self.z_thresh * std
            spike = g > clip_val
        else:
            z = (g - mean) / (std + self.eps)
            spike = z > self.z_thresh
            if self.clip_option == "adaptive_scaling":
                clip_val = (mean + (self.z_thresh * std) / (z / self.z_thresh)) * self.clip_factor
            else:
                clip_val = mean
        spike = spike & started  # (NaN comparisons are False anyway: said once, explicitly)
        inf = torch.full((), math.inf, dtype=self.dtype, device=g.device)
        threshold = torch.where(spike, clip_val, inf)
        if self.max_grad_norm is not None:
            threshold = torch.clamp(threshold, max=self.max_grad_norm)
        scale = torch.where(g > threshold, threshold / (g + NORM_EPS), torch.ones_like(g))
        x = torch.where(spike, clip_val, g)
        new_mean = self.alpha * mean + (1 - self.alpha) * x
        new_var = self.alpha * var + (1 - self.alpha) * (x - new_mean) ** 2
        # the first finite norm after a warm-up without one starts the EMA
        new_mean = torch.where(started, new_mean, g)
        new_var = torch.where(started, new_var, torch.zeros_like(g))
        keep = ~torch.isfinite(g) | ~torch.isfinite(new_mean) | ~torch.isfinite(new_var)
        if self.skip_update_on_spike:
            keep = keep | spike
        return threshold, scale, torch.where(keep, mean, new_mean), torch.where(keep, var, new_var)

    @staticmethod
    def _warmup_statistics(buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and population variance of the finite norms of the warm-up (NaN if none is finite)."""
        finite = torch.isfinite(buffer)
        count = finite.sum().to(buffer.dtype)
        mean = torch.where(finite, buffer, 0.0).sum() / count
        return mean, torch.where(finite, (buffer - mean) ** 2, 0.0).sum() / count

    def _warmup_result(self, norm: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A warm-up step's threshold (in the state dtype, as after the warm-up) and scale (``None``: leave the gradients)."""
        if self.max_grad_norm is None:
            return torch.full((), math.inf, dtype=self.dtype, device=norm.device), None
        threshold = torch.full((), self.max_grad_norm, dtype=self.dtype, device=norm.device)
        return threshold, clip_coefficient(self.max_grad_norm, g).to(norm.dtype)

    def _warmup_step(self, groups: _groups.Plan, norm: torch.Tensor, g: torch.Tensor, steps: int) -> ClipResult:
        if self._buffer is None or self._buffer.device != g.device:
            buffer = torch.full((self.warmup_steps,), math.nan, dtype=self.dtype, device=g.device)
            if self._buffer is not None:
                buffer.copy_(self._buffer)
            self._buffer = buffer
        if bool(torch.isfinite(g)):  # (on the CPU: free) a non-finite norm takes no slot of the warm-up
            self._buffer[steps : steps + 1].copy_(g.reshape(1))
            if steps + 1 == self.warmup_steps:
                self._mean, self._var = self._warmup_statistics(self._buffer)
                self._buffer = None
        threshold, scale = self._warmup_result(norm, g)
        if scale is None:
            scale = torch.ones((), dtype=norm.dtype, device=norm.device)
        else:
            scale_(groups, scale, self.foreach)
        return ClipResult(norm=norm, threshold=threshold, scale=scale)

    def _traced_step(self, groups: _groups.Plan, norm: torch.Tensor, g: torch.Tensor,
                     step: torch.Tensor) -> ClipResult:
        """The step on an accelerator or inside ``torch.compile``: warm-up and EMA both computed, the device count picks one.

        Equal to the eager steps (same operations); nothing branches on a
        Python value that changes from step to step, so the graph holds for
        the whole run. The state is kept as tensors throughout: the warm-up
        buffer stays after the warm-up, the EMA is NaN during it.
        """
        device, width = g.device, self.warmup_steps
        if self._buffer is None or self._buffer.device != device:  # the first call (or after the warm-up)
            buffer = torch.full((width,), math.nan, dtype=self.dtype, device=device)
            self._buffer = buffer if self._buffer is None else buffer.copy_(self._buffer)
        nan = torch.full((), math.nan, dtype=self.dtype, device=device)
        mean = nan if self._mean is None else self._mean.to(device)
        var = nan if self._var is None else self._var.to(device)
        warm = step < width
        finite = torch.isfinite(g)
        slots = torch.arange(width, device=device)
        buffer = torch.where((slots == step) & warm & finite, g, self._buffer)
        self._buffer.copy_(buffer)
        warm_mean, warm_var = self._warmup_statistics(buffer)
        last = (step == width - 1) & finite
        threshold, scale, ema_mean, ema_var = self._ema_step(g, mean, var)
        warm_threshold, warm_scale = self._warmup_result(norm, g)
        threshold = torch.where(warm, warm_threshold, threshold)
        scale = torch.where(warm, 1.0 if warm_scale is None else warm_scale, scale.to(norm.dtype)).to(norm.dtype)
        self._mean = torch.where(warm, torch.where(last, warm_mean, mean), ema_mean)
        self._var = torch.where(warm, torch.where(last, warm_var, var), ema_var)
        scale_(groups, scale, self.foreach)
        return ClipResult(norm=norm, threshold=threshold, scale=scale)

    def _state(self) -> dict[str, Any]:
        def cpu(t: torch.Tensor | None) -> torch.Tensor | None:
            # a copy, also on the CPU (where .cpu() returns the tensor itself, which later steps change)
            return None if t is None else t.detach().to("cpu", copy=True)

        warm = self.warming_up  # (a traced run keeps every tensor; the saved state is the same either way)
        return {"mean": None if warm else cpu(self._mean), "var": None if warm else cpu(self._var),
                "buffer": cpu(self._buffer) if warm else None}

    def _load_state(self, state: Mapping[str, Any]) -> None:
        steps = state["steps"]
        for key in ("mean", "var", "buffer"):
            value = state.get(key)
            if value is not None and not isinstance(value, torch.Tensor):
                raise ValueError(f"state_dict[{key!r}] must be a tensor or None")
        warm = isinstance(steps, int) and steps < self.warmup_steps
        if warm and (state.get("buffer") is None and steps > 0):
            raise ValueError("state_dict['buffer'] is missing for a state saved during warm-up")
        if not warm and (state.get("mean") is None or state.get("var") is None):
            raise ValueError("state_dict['mean'] and ['var'] are missing for a state saved after warm-up")

        def load(value: torch.Tensor | None) -> torch.Tensor | None:
            return None if value is None else value.to(self.dtype).clone()

        self._mean, self._var, self._buffer = load(state.get("mean")), load(state.get("var")), load(state.get("buffer"))


def _divide(a: float, b: float) -> float:
    """``a / b`` as IEEE float division (torch's): a zero divisor gives a signed inf, or NaN for 0 / 0 and NaN."""
    if b != 0:
        return a / b
    if a == 0 or a != a:
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)
