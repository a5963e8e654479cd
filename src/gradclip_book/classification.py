r"""Deep plain networks on the digits, one config in and one record out, trained by the book's harness.

One run is one :class:`RunConfig` in and one :class:`RunRecord` out
(:func:`train`, which builds the network and trains it with :func:`gradclip_book.harness.train`).
Chapter 4 uses these runs as its first illustration (explosion through depth alone); chapters 3 and 5
train their deep-MLP experiments through them. The data are scikit-learn's 1,797 real 8x8 digit scans
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

The clipping methods are the harness's (:data:`gradclip_book.harness.METHODS`, re-exported here as
:data:`METHODS`); each maps the one generic knob ``threshold`` to its own parameter. A run whose loss
becomes non-finite (or exceeds :data:`DIVERGED_LOSS`, the harness's one divergence rule) stops there and
is recorded as diverged; :func:`train` never raises for a divergence.

Example:
    >>> from gradclip_book.classification import RunConfig, train
    >>> record = train(RunConfig(depth=2, steps=20))
    >>> record.steps_run, record.diverged_at is None, len(record.loss)
    (20, True, 20)
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from . import data, harness
from .harness.methods import METHODS, Method

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
    "train",
]

DIVERGED_LOSS = harness.DIVERGED_LOSS
"""A training loss above this (cross-entropy over 10 classes starts near ln 10 = 2.3) counts as diverged, like a
non-finite one: the harness's one rule (:data:`gradclip_book.harness.DIVERGED_LOSS`)."""

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
    """A 16-hex-digit hash of the code that decides a run's numbers: this module, the harness's loop, methods and
    data, and the data functions (docstrings and comments excluded, :func:`gradclip_book.harness.code_version`).

    A stored grid whose ``code_version`` differs was computed by other code and must be recomputed
    (``python -m gradclip_book.grids classification``).
    """
    import sys

    from .harness import data as harness_data, loop, methods
    return harness.code_version(sys.modules[__name__], loop, methods, harness_data, data.digits, data.digits_split)


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


INITS: dict[str, Callable[[nn.Module], None]] = {"default": lambda model: None, "he": harness.he_init_}
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


def train(config: RunConfig = DEFAULT) -> RunRecord:
    """Train one network on the digits and record it; the same config gives the same record, bit for bit.

    Builds the config's network (:func:`build_model`) and optimizer, and trains it with
    :func:`gradclip_book.harness.train` on the training part of :func:`gradclip_book.harness.image_split`
    in the batch order of :func:`gradclip_book.harness.minibatches` (one CPU thread, deterministic
    algorithms). Accuracies are measured once at the end.

    Args:
        config: the run.

    Returns:
        A :class:`RunRecord` (per-step curves at full length; :meth:`RunRecord.to_json` for storage).

    Example:
        >>> r = train(RunConfig(depth=2, steps=50, method="norm", threshold=0.5))
        >>> r.steps_run, r.diverged_at, 0 < r.clip_fraction <= 1
        (50, None, True)
    """
    with harness.deterministic():
        parts = harness.image_split(config.split_seed)
        model = build_model(config)
        optimizer = OPTIMIZERS[config.optimizer](list(model.parameters()), config.lr)
        run = harness.train(model, optimizer, harness.minibatches(*parts["train"], config.batch, config.seed),
                            config.steps, method=config.method, threshold=config.threshold, warmup=config.warmup,
                            evaluate=harness.accuracy_evaluator(parts), threads=None)
    return RunRecord(config=asdict(config), loss=run.loss, grad_norm=run.grad_norm, clipped=run.clipped,
                     steps_run=run.steps_run, diverged_at=run.diverged_at,
                     val_accuracy=run.metric("val_accuracy"), test_accuracy=run.metric("test_accuracy"),
                     seconds=run.seconds)
