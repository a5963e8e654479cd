r"""The clipping methods behind one interface: :data:`METHODS`, one row per method, one generic ``threshold``.

Each :class:`Method` binds to a model and its optimizer (:func:`bind`) and gives a :class:`Clip`: called
after ``loss.backward()`` and before ``optimizer.step()``, and asked after the step for its
:meth:`Clip.report`, the pre-clip global L2 norm of all gradients and whether the method fired. The
training loop (:func:`gradclip_book.harness.train`) is the same for every method::

    loss.backward(); clip(); optimizer.step(); norm, fired = clip.report()

Example:
    >>> import torch
    >>> from torch import nn
    >>> from gradclip_book.harness.methods import METHODS, bind
    >>> model = nn.Linear(3, 1)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> model(torch.ones(1, 3)).sum().mul(10).backward()
    >>> clip = bind("norm", model, optimizer, 1.0)
    >>> clip(); optimizer.step()
    >>> norm, fired = clip.report()
    >>> round(float(norm), 2), bool(fired), METHODS["norm"].knob
    (20.0, True, 'max_norm')
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

import gradclip

__all__ = ["METHODS", "Clip", "Method", "bind"]


class Clip:
    """A method bound to one model and optimizer: ``clip()`` after backward, ``report()`` after the step.

    ``report()`` returns ``(pre-clip global L2 norm of all gradients, whether the method fired)`` as 0-dim
    tensors.
    """

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self) -> None:
        raise NotImplementedError

    def report(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.last is None:
            raise RuntimeError("report() before the method was applied: call clip() after backward first")
        return self.last


class _Function(Clip):
    """A stateless gradclip function: ``apply(params, model, threshold) -> (norm, fired)``."""

    def __init__(self, params, model, threshold, apply) -> None:
        super().__init__(params)
        self.model, self.threshold, self.apply = model, threshold, apply

    def __call__(self) -> None:
        self.last = self.apply(self.params, self.model, self.threshold)


class _Stateful(Clip):
    """A :class:`gradclip.Clipper` called by hand; its :class:`~gradclip.ClipResult` is the report."""

    def __init__(self, params, clipper: gradclip.Clipper) -> None:
        super().__init__(params)
        self.clipper = clipper

    def __call__(self) -> None:
        result = self.clipper(self.params)
        self.last = (result.norm, result.clipped)


class _Attached(Clip):
    """A :class:`gradclip.Clipper` attached to the optimizer: it acts inside ``optimizer.step()``."""

    def __init__(self, params, clipper: gradclip.Clipper, optimizer: torch.optim.Optimizer) -> None:
        super().__init__(params)
        self.clipper = clipper.attach(optimizer)

    def __call__(self) -> None:
        pass

    def report(self) -> tuple[torch.Tensor, torch.Tensor]:
        result = self.clipper.last_result
        return result.norm, result.clipped


def _grads(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def _total_norm(params: list[nn.Parameter]) -> torch.Tensor:
    return gradclip.get_total_norm(_grads(params))


def _none(params, model, threshold):
    return _total_norm(params), torch.tensor(False)


def _value(params, model, threshold):
    norm = _total_norm(params)
    fired = max(g.abs().max() for g in _grads(params)) > threshold
    gradclip.clip_grad_value_(params, threshold)
    return norm, fired


def _norm(params, model, threshold):
    result = gradclip.clip_grad_norm_report_(params, threshold)
    return result.norm, result.clipped


def _agc(params, model, threshold):
    norm = _total_norm(params)
    fraction = gradclip.adaptive_clip_grad_(gradclip.agc_parameters(model), clip_factor=threshold)
    return norm, fraction > 0


def _soft(params, model, threshold):
    norm = gradclip.soft_clip_grad_norm_(params, threshold)
    return norm, norm > threshold


@dataclass(frozen=True)
class Method:
    """One row of :data:`METHODS`: what the generic ``threshold`` means for it, and how to bind it.

    Attributes:
        knob: the gradclip parameter ``threshold`` is passed as.
        meaning: the threshold's meaning and unit, and when the method counts as having fired.
        build: ``build(model, optimizer, threshold) -> Clip``.
        reference: the paper the method comes from.
    """

    knob: str
    meaning: str
    build: Callable[[nn.Module, torch.optim.Optimizer, float | None], Clip] = field(repr=False)
    reference: str = ""


def _function(apply):
    return lambda model, optimizer, threshold: _Function(list(model.parameters()), model, threshold, apply)


METHODS: dict[str, Method] = {
    "none": Method("-", "no clipping (threshold None); never fires", _function(_none)),
    "value": Method("clip_value", "clip_grad_value_: every gradient entry clamped to [-t, t] (gradient units); "
                    "fires when some |g_j| > t", _function(_value),
                    "torch.nn.utils.clip_grad_value_; signSGD limit: Bernstein et al. 2018, arXiv:1802.04434"),
    "norm": Method("max_norm", "clip_grad_norm_: global L2 norm capped at t (gradient units); fires when "
                   "||g|| > t (ClipResult.clipped)", _function(_norm),
                   "Pascanu, Mikolov and Bengio 2013, arXiv:1211.5063"),
    "agc": Method("clip_factor", "adaptive_clip_grad_ on agc_parameters(model) (the head excluded): each unit's "
                  "gradient norm capped at t x its weight norm (dimensionless ratio); fires when any unit is clipped",
                  _function(_agc), "Brock, De, Smith and Simonyan 2021, arXiv:2102.06171"),
    "autoclip": Method("percentile", "AutoClip: norm clipped to the t-th percentile (0..100) of all pre-clip norms "
                       "so far (current included); fires when ClipResult.clipped",
                       lambda model, optimizer, t: _Stateful(list(model.parameters()), gradclip.AutoClip(percentile=t)),
                       "Seetharaman, Wichern, Pardo and Le Roux 2020, arXiv:2007.14469"),
    "zclip": Method("z_thresh", "ZClip with max_grad_norm=None: a norm whose z-score against an EMA (alpha 0.97, "
                    "25 warm-up steps) exceeds t (standard deviations) is clipped; fires when ClipResult.clipped",
                    lambda model, optimizer, t: _Stateful(list(model.parameters()),
                                                          gradclip.ZClip(z_thresh=t, max_grad_norm=None)),
                    "Kumar, Owen, Chowdhury and Gura 2025, arXiv:2504.02507"),
    "soft": Method("max_norm", "soft_clip_grad_norm_: g <- g c/(||g|| + c) with c = t (gradient units); always "
                   "scales, counts as fired when ||g|| > t", _function(_soft),
                   "Zhang, He, Sra and Jadbabaie 2020, arXiv:1905.11881"),
    "spike-guard": Method("threshold", "SpikeGuard attached to the optimizer (zscore mode, window 128, 20 norms of "
                          "history): the step is skipped when the norm is non-finite or above mean + t x std of the "
                          "recent norms (t in standard deviations); fires when the step was skipped",
                          lambda model, optimizer, t: _Attached(list(model.parameters()),
                                                                gradclip.SpikeGuard(threshold=t), optimizer),
                          "Chowdhery et al. 2022 (PaLM), arXiv:2204.02311"),
}
"""Method name -> :class:`Method`. Every method reports the pre-clip global L2 norm of *all* gradients."""


def bind(method: str | Method, model: nn.Module, optimizer: torch.optim.Optimizer,
         threshold: float | None) -> Clip:
    """The :class:`Clip` of ``method`` (a name in :data:`METHODS` or a :class:`Method`) for this model and optimizer.

    Raises:
        ValueError: an unknown method name, or a threshold given for ``"none"`` / missing for another method.

    Example:
        >>> model = nn.Linear(2, 2)
        >>> type(bind("none", model, torch.optim.SGD(model.parameters(), lr=0.1), None)).__name__
        '_Function'
    """
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
        if (method == "none") != (threshold is None):
            raise ValueError(f"threshold must be None exactly for method 'none', got method={method!r}, "
                             f"threshold={threshold!r}")
        method = METHODS[method]
    return method.build(model, optimizer, threshold)
