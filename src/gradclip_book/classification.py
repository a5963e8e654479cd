r"""Chapter 4's training harness: deep plain networks on the digits, with every clipping method behind one interface.

One run is one :class:`RunConfig` in and one :class:`RunRecord` out
(:func:`train`). The data are scikit-learn's 1,797 real 8x8 digit scans
(:func:`gradclip_book.data.digits_split`: stratified train / validation / test,
standardised with training statistics). The networks have no normalisation
layers, so depth and learning rate alone decide whether training explodes:

* ``"mlp"``: ``depth`` hidden ``Linear(width)`` layers, each followed by the
  activation, then a ``Linear(width, 10)`` head;
* ``"cnn"``: ``depth`` 3x3 convolutions with padding 1 (``width`` channels)
  on the 1x8x8 image, each followed by the activation, then a linear head on
  the flattened ``width x 8 x 8`` features.

The default is ReLU with He initialisation (:data:`INITS`), which keeps the
forward signal at a constant scale through depth, so that depth and learning
rate (not a vanishing signal) decide: with tanh and PyTorch's default
initialisation, networks of depth 16 do not learn at all and never diverge.

The clipping methods are the rows of :data:`METHODS`; each maps the one
generic knob ``threshold`` to its own parameter (see :class:`Method`). The loop
is the same for all of them::

    loss.backward(); clip(); optimizer.step(); norm, fired = clip.report()

A run whose loss becomes non-finite (or exceeds :data:`DIVERGED_LOSS`) stops
there and is recorded as diverged; :func:`train` never raises for a divergence.

Example:
    >>> from gradclip_book.classification import RunConfig, train
    >>> record = train(RunConfig(depth=2, steps=20))
    >>> record.steps_run, record.diverged_at is None, len(record.loss)
    (20, True, 20)
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import gradclip

from . import data

__all__ = [
    "DEFAULT",
    "DIVERGED_LOSS",
    "METHODS",
    "MODELS",
    "OPTIMIZERS",
    "Method",
    "RunConfig",
    "RunRecord",
    "build_model",
    "code_version",
    "compact",
    "config_key",
    "explore",
    "largest_stable_lr",
    "train",
]

DIVERGED_LOSS = 1e3
"""A training loss above this (cross-entropy over 10 classes starts near ln 10 = 2.3) counts as diverged, like a non-finite one."""

CURVE_POINTS = 150
"""Stored curves have at most this many points (:func:`compact`)."""


# --- configuration ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines one training run (and, with the seed, its numbers exactly).

    Attributes:
        model: ``"mlp"`` or ``"cnn"`` (:data:`MODELS`).
        depth: hidden layers (MLP) or convolutions (CNN), >= 1.
        width: units per hidden layer (MLP) or channels (CNN).
        activation: ``"tanh"`` or ``"relu"``.
        init: ``"default"`` (PyTorch's) or ``"he"`` (:data:`INITS`).
        optimizer: ``"sgd"`` (momentum 0.9) or ``"adam"`` (:data:`OPTIMIZERS`).
        lr: the learning rate.
        method: a key of :data:`METHODS`.
        threshold: the method's knob (its meaning per method in :data:`METHODS`); ``None`` for ``"none"``.
        batch: minibatch size (images per step).
        steps: optimizer steps (minibatches drawn in a seeded random order, reshuffled each epoch).
        seed: seeds the initialisation (``torch.manual_seed``) and the batch order (a ``torch.Generator``).
        split_seed: the ``random_state`` of the train / validation / test split.
        warmup: linear learning-rate warm-up over this many steps: step ``t`` (0-based) uses
            ``lr * min(1, (t + 1) / warmup)``; ``0`` (the default) keeps ``lr`` constant from the first step.

    Example:
        >>> RunConfig(depth=12, lr=0.3, method="norm", threshold=1.0).depth
        12
    """

    model: str = "mlp"
    depth: int = 8
    width: int = 64
    activation: str = "relu"
    init: str = "he"
    optimizer: str = "sgd"
    lr: float = 0.03
    method: str = "none"
    threshold: float | None = None
    batch: int = 64
    steps: int = 300
    seed: int = 0
    split_seed: int = 0
    warmup: int = 0

    def __post_init__(self) -> None:
        for name, table in (("model", MODELS), ("activation", ACTIVATIONS), ("init", INITS), ("optimizer", OPTIMIZERS),
                            ("method", METHODS)):
            if getattr(self, name) not in table:
                raise ValueError(f"{name} must be one of {sorted(table)}, got {getattr(self, name)!r}")
        if (self.method == "none") != (self.threshold is None):
            raise ValueError(f"threshold must be None exactly for method 'none', got method={self.method!r}, "
                             f"threshold={self.threshold!r}")
        if self.depth < 1 or self.width < 1 or self.batch < 1 or self.steps < 1 or not self.lr > 0:
            raise ValueError(f"depth, width, batch, steps and lr must be positive: {self}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be a number of steps >= 0 (0 = no warm-up), got {self.warmup!r}")


def config_key(config: RunConfig) -> str:
    """A 16-hex-digit hash of the config (its JSON with sorted keys): the grid file's identity of a run."""
    text = json.dumps(asdict(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def code_version() -> str:
    """A 16-hex-digit hash of the harness source: this module and the data functions it trains on.

    A stored grid whose ``code_version`` differs was computed by other code and must be recomputed
    (``python -m gradclip_book.grids classification``).
    """
    sources = [Path(__file__).read_text(encoding="utf-8"), inspect.getsource(data.digits),
               inspect.getsource(data.digits_split)]
    return hashlib.sha256("\n".join(sources).encode()).hexdigest()[:16]


# --- models and optimizers -------------------------------------------------------------------------

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}


def mlp(depth: int, width: int, activation: str) -> nn.Sequential:
    """``depth`` x (``Linear`` + activation), then a ``Linear(width, 10)`` head; input ``(n, 64)``, output ``(n, 10)`` logits."""
    layers: list[nn.Module] = []
    fan_in = 64
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), ACTIVATIONS[activation]()]
        fan_in = width
    layers.append(nn.Linear(fan_in, 10))
    return nn.Sequential(*layers)


def cnn(depth: int, width: int, activation: str) -> nn.Sequential:
    """``depth`` x (3x3 ``Conv2d``, padding 1, + activation) on the 1x8x8 image, then a linear head.

    Input ``(n, 64)`` (reshaped to ``(n, 1, 8, 8)``), output ``(n, 10)`` logits.
    """
    layers: list[nn.Module] = [nn.Unflatten(1, (1, 8, 8))]
    channels = 1
    for _ in range(depth):
        layers += [nn.Conv2d(channels, width, 3, padding=1), ACTIVATIONS[activation]()]
        channels = width
    layers += [nn.Flatten(), nn.Linear(width * 64, 10)]
    return nn.Sequential(*layers)


MODELS: dict[str, Callable[[int, int, str], nn.Module]] = {"mlp": mlp, "cnn": cnn}
"""Model kind -> ``builder(depth, width, activation)``."""

OPTIMIZERS: dict[str, Callable[[list[nn.Parameter], float], torch.optim.Optimizer]] = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
}
"""Optimizer name -> ``builder(parameters, lr)``: SGD with momentum 0.9, or Adam with torch's defaults."""


def _he_(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)


INITS: dict[str, Callable[[nn.Module], None]] = {"default": lambda model: None, "he": _he_}
r"""Init name -> ``init_(model)``: ``"default"`` keeps PyTorch's (weights and biases uniform in
:math:`\pm 1/\sqrt{\text{fan-in}}`); ``"he"`` draws weights from :math:`N(0, 2/\text{fan-in})` and zeroes biases
(He et al. 2015, arXiv:1502.01852), the fan-in scaling that keeps ReLU activations at a constant scale through depth."""


def build_model(config: RunConfig) -> nn.Module:
    """The config's network, initialised from ``torch.manual_seed(config.seed)``.

    Example:
        >>> model = build_model(RunConfig(model="cnn", depth=3, width=8))
        >>> tuple(model(torch.zeros(5, 64)).shape)
        (5, 10)
    """
    torch.manual_seed(config.seed)
    model = MODELS[config.model](config.depth, config.width, config.activation)
    INITS[config.init](model)
    return model


# --- the clipping methods, behind one interface ----------------------------------------------------


class _Clip:
    """A method bound to one model and optimizer: ``clip()`` after backward, ``report()`` after the step.

    ``report()`` returns ``(pre-clip global L2 norm of all gradients, whether the method fired)`` as 0-dim tensors.
    """

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self) -> None:
        raise NotImplementedError

    def report(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.last is not None, "report() before the method was applied"
        return self.last


class _Function(_Clip):
    """A stateless gradclip function: ``apply(params, model, threshold) -> (norm, fired)``."""

    def __init__(self, params, model, threshold, apply) -> None:
        super().__init__(params)
        self.model, self.threshold, self.apply = model, threshold, apply

    def __call__(self) -> None:
        self.last = self.apply(self.params, self.model, self.threshold)


class _Stateful(_Clip):
    """A :class:`gradclip.Clipper` called by hand; its :class:`~gradclip.ClipResult` is the report."""

    def __init__(self, params, clipper: gradclip.Clipper) -> None:
        super().__init__(params)
        self.clipper = clipper

    def __call__(self) -> None:
        result = self.clipper(self.params)
        self.last = (result.norm, result.clipped)


class _Attached(_Clip):
    """A :class:`gradclip.Clipper` attached to the optimizer: it acts inside ``optimizer.step()``."""

    def __init__(self, params, clipper: gradclip.Clipper, optimizer: torch.optim.Optimizer) -> None:
        super().__init__(params)
        self.clipper = clipper.attach(optimizer)

    def __call__(self) -> None:
        pass

    def report(self) -> tuple[torch.Tensor, torch.Tensor]:
        result = self.clipper.last_result
        return result.norm, result.clipped


def _total_norm(params: list[nn.Parameter]) -> torch.Tensor:
    return gradclip.get_total_norm([p.grad for p in params if p.grad is not None])


def _none(params, model, threshold):
    return _total_norm(params), torch.tensor(False)


def _value(params, model, threshold):
    norm = _total_norm(params)
    fired = max(p.grad.abs().max() for p in params) > threshold
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
        build: ``build(model, optimizer, threshold) -> clip``, an object called after
            ``loss.backward()`` and before ``optimizer.step()``, whose ``report()`` after the step
            gives (pre-clip gradient norm, fired).
        reference: the paper the method comes from.
    """

    knob: str
    meaning: str
    build: Callable[[nn.Module, torch.optim.Optimizer, float | None], _Clip] = field(repr=False)
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

DEFAULT = RunConfig()
"""The default run: ReLU MLP with He init, depth 8, width 64, SGD with momentum at lr 0.03, 300 steps of batch 64, no clipping."""


# --- one run ---------------------------------------------------------------------------------------


@dataclass
class RunRecord:
    """What one run produced. Per-step lists have one entry per step run (``steps_run``).

    Attributes:
        config: the run's :class:`RunConfig` as a dict.
        loss: training cross-entropy (nats) of each step's minibatch, before the step.
        grad_norm: pre-clip global L2 norm of all gradients at each step.
        clipped: whether the method fired at each step (see :data:`METHODS`).
        steps_run: steps actually taken (``config.steps`` unless diverged).
        diverged_at: the step (0-based) whose loss was non-finite or above :data:`DIVERGED_LOSS`; ``None`` if never.
            That step's loss is the last entry of ``loss`` and no optimizer step was taken on it.
        val_accuracy, test_accuracy: final accuracies in [0, 1]; ``None`` for a diverged run.
        seconds: wall time of the run (not part of the run's identity; it varies).
    """

    config: dict[str, Any]
    loss: list[float]
    grad_norm: list[float]
    clipped: list[bool]
    steps_run: int
    diverged_at: int | None
    val_accuracy: float | None
    test_accuracy: float | None
    seconds: float = 0.0

    @property
    def diverged(self) -> bool:
        return self.diverged_at is not None

    @property
    def clip_fraction(self) -> float:
        """The fraction of steps at which the method fired."""
        return float(np.mean(self.clipped)) if self.clipped else 0.0

    def to_json(self, points: int = CURVE_POINTS) -> dict[str, Any]:
        """The record for storage: scalars, and curves downsampled by :func:`compact`."""
        return compact(self, points)


def _round(x: float | None, digits: int = 5) -> float | str | None:
    """``x`` to ``digits`` significant digits; non-finite values as the strings ``"nan"``, ``"inf"``, ``"-inf"``."""
    if x is None:
        return None
    if not math.isfinite(x):
        return str(x)
    return float(f"{x:.{digits}g}")


def compact(record: RunRecord, points: int = CURVE_POINTS) -> dict[str, Any]:
    """A JSON-ready dict of ``record`` with curves of at most ``points`` points, floats to 5 significant digits.

    The per-step lists are cut into ``min(points, steps_run)`` consecutive bins of (nearly) equal length
    (``numpy.array_split``); each curve stores one value per bin: ``loss`` the bin's mean, ``grad_norm``
    the bin's maximum (so spikes survive), ``clipped`` the fraction of its steps that fired.
    ``curve_step`` is each bin's first step. The curves cover the ``steps_run`` steps taken; a diverged run's
    last loss (the one that stopped it) is ``diverged_loss``. Non-finite floats are stored as the strings
    ``"nan"``/``"inf"``.

    Example:
        >>> r = RunRecord({}, [2.0, 1.0, 0.5, 0.25], [4.0, 3.0, 2.0, 1.0], [True, False, False, False], 4, None, 0.9, 0.9)
        >>> c = compact(r, points=2)
        >>> c["curve_step"], c["loss"], c["grad_norm"], c["clipped"]
        ([0, 2], [1.5, 0.375], [4.0, 2.0], [0.5, 0.0])
    """
    n = record.steps_run
    bins = [b for b in np.array_split(np.arange(n), min(points, max(n, 1))) if len(b)]
    loss = np.array(record.loss[:n], dtype=float)
    norm, fired = np.array(record.grad_norm, dtype=float), np.array(record.clipped, dtype=float)
    return {
        "config": record.config,
        "steps_run": n,
        "diverged_at": record.diverged_at,
        "diverged_loss": _round(record.loss[n]) if record.diverged_at is not None else None,
        "val_accuracy": _round(record.val_accuracy),
        "test_accuracy": _round(record.test_accuracy),
        "clip_fraction": _round(record.clip_fraction),
        "final_loss": _round(float(loss[-max(1, n // 10):].mean())) if n else None,
        "seconds": round(record.seconds, 3),
        "curve_step": [int(b[0]) for b in bins],
        "loss": [_round(float(loss[b].mean())) for b in bins],
        "grad_norm": [_round(float(norm[b].max())) for b in bins],
        "clipped": [_round(float(fired[b].mean())) for b in bins],
    }


@functools.lru_cache(maxsize=4)
def _split(split_seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return data.digits_split(seed=split_seed)


@contextlib.contextmanager
def _deterministic(threads: int = 1) -> Iterator[None]:
    """One thread (a fixed reduction order) and deterministic algorithms, restored afterwards."""
    old_threads = torch.get_num_threads()
    old_det, old_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.set_num_threads(old_threads)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def _batches(n: int, batch: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index minibatches forever: a fresh seeded permutation each epoch, the last partial batch dropped."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch + 1, batch):
            yield order[start:start + batch]


def _warm_up_(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def train(config: RunConfig = DEFAULT) -> RunRecord:
    """Train one network on the digits and record it; the same config gives the same record, bit for bit.

    Runs on one CPU thread with ``torch.use_deterministic_algorithms(True)`` (both restored afterwards).
    The loop per step: minibatch loss (recorded; if non-finite or above :data:`DIVERGED_LOSS` the run
    stops as diverged), ``backward()``, the method's ``clip()``, the warm-up's learning rate (when
    ``config.warmup``), ``optimizer.step()``, the method's report
    (pre-clip norm, fired). Accuracies are measured once at the end.

    Args:
        config: the run.

    Returns:
        A :class:`RunRecord` (per-step curves at full length; :meth:`RunRecord.to_json` for storage).

    Example:
        >>> r = train(RunConfig(depth=2, steps=50, method="norm", threshold=0.5))
        >>> r.steps_run, r.diverged_at, 0 < r.clip_fraction <= 1
        (50, None, True)
    """
    start = time.perf_counter()
    with _deterministic():
        parts = _split(config.split_seed)
        x, y = parts["train"]
        model = build_model(config)
        params = list(model.parameters())
        optimizer = OPTIMIZERS[config.optimizer](params, config.lr)
        clip = METHODS[config.method].build(model, optimizer, config.threshold)
        generator = torch.Generator().manual_seed(config.seed)
        losses, norms, fired = [], [], []
        diverged_at = None
        batches = _batches(len(y), min(config.batch, len(y)), generator)
        for step in range(config.steps):
            index = next(batches)
            loss = nn.functional.cross_entropy(model(x[index]), y[index])
            value = float(loss.detach())
            losses.append(value)
            if not value <= DIVERGED_LOSS:  # also catches nan
                diverged_at = step
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip()
            if config.warmup:  # without warm-up the optimizer's lr is never touched
                _warm_up_(optimizer, config.lr * min(1.0, (step + 1) / config.warmup))
            optimizer.step()
            norm, did = clip.report()
            norms.append(float(norm))
            fired.append(bool(did))
        if diverged_at is None:
            val = _accuracy(model, *parts["validation"])
            test = _accuracy(model, *parts["test"])
        else:
            val = test = None
    return RunRecord(config=asdict(config), loss=losses, grad_norm=norms, clipped=fired,
                     steps_run=len(norms), diverged_at=diverged_at, val_accuracy=val, test_accuracy=test,
                     seconds=time.perf_counter() - start)


# --- measuring the chapter's settings --------------------------------------------------------------


def _trains(record: RunRecord, accuracy: float) -> bool:
    return record.diverged_at is None and record.test_accuracy is not None and record.test_accuracy >= accuracy


def largest_stable_lr(base: RunConfig, lrs: list[float], seeds: tuple[int, ...] = (0, 1, 2),
                      accuracy: float = 0.9) -> float | None:
    """The largest lr in ``lrs`` (scanned upwards) at which every seed trains (no divergence, test accuracy >= ``accuracy``).

    Scans until the first lr that fails after one that passed, so a later recovery is not counted.
    ``None`` if no lr trains.
    """
    best = None
    for lr in sorted(lrs):
        if all(_trains(train(replace(base, lr=lr, seed=s)), accuracy) for s in seeds):
            best = lr
        elif best is not None:
            break
    return best


def explore(depths: tuple[int, ...] = (2, 4, 8, 12, 16), lrs: tuple[float, ...] | None = None,
            seeds: tuple[int, ...] = (0, 1, 2), threshold: float = 1.0, base: RunConfig = DEFAULT,
            printer: Callable[[str], None] = print) -> dict[int, dict[str, float | None]]:
    """Measure, per depth, the largest stable lr without clipping and with norm clipping at ``threshold``.

    Returns ``{depth: {"none": lr, "norm": lr, "factor": norm / none}}`` and prints a line per depth.
    """
    lrs = list(lrs or [0.01 * 2 ** (k / 2) for k in range(0, 17)])
    table: dict[int, dict[str, float | None]] = {}
    for depth in depths:
        at = replace(base, depth=depth)
        plain = largest_stable_lr(replace(at, method="none", threshold=None), lrs, seeds)
        clipped = largest_stable_lr(replace(at, method="norm", threshold=threshold), lrs, seeds)
        factor = clipped / plain if plain and clipped else None
        table[depth] = {"none": plain, "norm": clipped, "factor": factor}
        printer(f"depth {depth}: largest stable lr none={plain} norm(c={threshold})={clipped} factor={factor}")
    return table
