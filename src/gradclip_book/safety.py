r"""Chapter 5.3's experiments: faults injected into chapter 4's digits run, and the guards that survive them.

A run is chapter 4's network, data split, batch order and optimizer
(:mod:`gradclip_book.classification`: :func:`~gradclip_book.classification.build_model`,
the seeded split and minibatch stream, :data:`~gradclip_book.classification.OPTIMIZERS`)
trained by :func:`train`, which breaks one batch on purpose and protects itself, in the book's one
training loop (:func:`gradclip_book.harness.train`: the fault in the batches and the loss function, the
guard's decision in a hook). Without a fault and without a guard it is
:func:`gradclip_book.classification.train` step for step (tested).

**Faults** (:data:`FAULTS`) hit the batches of steps ``step .. step + span - 1``:

* ``"outliers"``: a quarter of the batch's images replaced by noise 1000 times the pixels' scale (corrupt records);
* ``"nan-grad"``: every gradient of the batch NaN (an overflow inside backward), the loss itself finite;
* ``"scaled"``: the batch's gradients 1000 times too large (a loss scale that was never undone), loss finite;
* ``"labels"``: the labels of 10 consecutive batches replaced by random ones (a corrupt shard; one such
  batch costs this run less than a point, see chapter 5.3).

The two backward faults act through a tensor hook on the logits' gradient, so
they enter backward upstream of every parameter, as a real fault would, and
hooks on the parameters see them.

**Guards** (:data:`GUARDS`), forward ones before ``backward()``, backward ones during and after it:

* ``"softcap"``: logit soft-capping, ``z <- cap tanh(z / cap)`` on the network's output;
* ``"activation"``: the batch is skipped when the RMS of the last hidden activation is non-finite or above
  ``k`` times the median of the last ``window`` batches';
* ``"loss"``: the batch is skipped (no backward) when its loss is non-finite or above ``k`` times the median
  of the last ``window`` losses;
* ``"layerwise"``: every parameter's gradient capped at norm ``c`` by a tensor hook *during* backward;
* ``"spike"``: :class:`gradclip.SpikeGuard` attached to the optimizer (the step is undone on a device-side
  ``where`` when the gradient norm is non-finite or an outlier);
* ``"rollback"``: model and optimizer state kept in memory every ``every`` steps (only from a state whose loss
  passed the check); on a non-finite loss or one above ``k`` times the recent median, training goes back to that
  state and carries on with the *next* batches (the ones in between are skipped, as in PaLM's restarts);
* ``"clip"``: :func:`gradclip.clip_grad_norm_` before every step, at :data:`CLIP_MAX_NORM`, the threshold of
  chapter 4's recipe on the clean run (:func:`recipe_threshold`);
* ``"skip"``: the step skipped when the global gradient norm is NaN or inf (``torch.amp.GradScaler``'s skip on
  inf, without the loss scaling);
* ``"clip+skip"``: both in one call, ``clip_grad_norm_(..., error_if_nonfinite=True)``, the step skipped on its
  error.

A skipped step after backward drops the gradients (``p.grad = None``): torch's optimizers leave such a parameter
and its state alone.

Where each decision is made: the loop reads every loss on the host anyway (to record it, like chapter 4's
harness), so the loss guard and rollback decide on the host at no extra synchronisation; the activation check
reads its one number in the same transfer as the loss (``torch.stack``); soft-capping and the per-layer hooks
never decide anything (they only transform), SpikeGuard decides on the device, and the two non-finite skips read
the gradient norm on the host once per step (as ``GradScaler.step`` reads its inf flag).

Example:
    >>> from gradclip_book import safety
    >>> run = safety.train(safety.SafetyConfig(fault="nan-grad", guard="spike", steps=60, fault_step=40))
    >>> run.outcome, run.spike_skips
    ('finished', 1)
"""

from __future__ import annotations

import argparse
import copy
import functools
import gzip
import json
import math
import os
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gradclip

from . import classification as cls
from . import harness
from . import grids
from .figures import and_list

__all__ = [
    "FAULTS",
    "FAULT_STEPS",
    "GUARDS",
    "BASE",
    "Fault",
    "Guard",
    "SafetyConfig",
    "SafetyRun",
    "append",
    "grid",
    "by_fault_step",
    "leave_one_seed_out",
    "load",
    "recovers",
    "step_phrase",
    "summary",
    "verdict",
    "main",
    "recipe_threshold",
    "train",
]

# --- faults ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """One row of :data:`FAULTS`: what is broken in a faulty batch.

    Attributes:
        description: what it models.
        inputs: ``inputs(x, y, generator) -> (x, y)`` for the faulty batch (``None``: the batch is intact).
        grad_factor: the logits' gradient is multiplied by this in backward (``None``: backward is intact).
        span: how many consecutive batches are faulty.
    """

    description: str
    inputs: Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]] | None = None
    grad_factor: float | None = None
    span: int = 1


def _outliers(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone()
    n = len(x) // 4  # the batch is already in random order: the first quarter is a random quarter
    # garbage records: noise 1000 times the scale of the standardised pixels (a scaled digit would not do: a ReLU
    # network classifies it as confidently as the digit, and its loss and gradient are then near zero)
    x[:n] = 1000.0 * torch.randn(x[:n].shape, generator=generator)
    return x, y


def _random_labels(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return x, torch.randint(0, 10, y.shape, generator=generator)


FAULTS: dict[str, Fault] = {
    "none": Fault("no fault"),
    "outliers": Fault("a quarter of the batch's images replaced by noise of 1000 x the pixels' scale", inputs=_outliers),
    "nan-grad": Fault("every gradient of the batch NaN (the loss finite)", grad_factor=math.nan),
    "scaled": Fault("the batch's gradients x1000 (the loss finite)", grad_factor=1000.0),
    "labels": Fault("the labels of 10 consecutive batches replaced by random ones (a corrupt shard)",
                    inputs=_random_labels, span=10),
}
"""Fault name -> :class:`Fault`."""

# --- guards ----------------------------------------------------------------------------------------


class _Running:
    """An outlier test on host floats: non-finite, or above both ``k`` x the median of the last ``window`` values
    and ``floor`` (no test before ``min_history`` values). The floor matters for losses: late in training the
    median loss nears 0, and a ratio alone would refuse ordinary batches."""

    def __init__(self, window: int, min_history: int, floor: float = 0.0) -> None:
        self.values: deque[float] = deque(maxlen=window)
        self.min_history, self.floor = min_history, floor

    def level(self) -> float | None:
        return statistics.median(self.values) if len(self.values) >= self.min_history else None

    def outlier(self, value: float, k: float) -> bool:
        """Whether ``value`` is non-finite or above the level; every finite value joins the history.

        Outliers join too (the median ignores a few of them), so that a lasting change of scale is absorbed within
        ``window`` steps instead of refusing every batch from then on (SpikeGuard's rule for the same reason).
        """
        if not math.isfinite(value):
            return True
        level = self.level()
        self.values.append(value)
        return level is not None and value > max(k * level, self.floor)


class _Protection:
    """The no-op guard; subclasses override the moments they act at.

    The loop calls ``setup(model, optimizer)`` once, ``logits(z)`` on every forward, ``probe()`` (a 0-dim tensor
    or ``None``, read with the loss), ``decide(step, loss, probe) -> "step" | "skip" | "rollback"`` before
    backward, and ``restore(model, optimizer)`` after a ``"rollback"``.
    """

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        pass

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def probe(self) -> torch.Tensor | None:
        return None

    def decide(self, step: int, loss: float, probe: float | None, model: nn.Module,
               optimizer: torch.optim.Optimizer) -> str:
        return "step"

    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """After ``backward()``, before ``optimizer.step()``: the raw gradients are in ``p.grad``."""

    def skipped(self) -> int:
        """Steps the guard skipped after backward without the loop knowing (SpikeGuard's device-side skips, the
        non-finite skip's dropped gradients)."""
        return 0


class _SoftCap(_Protection):
    def __init__(self, cap: float) -> None:
        self.cap = cap

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.cap * torch.tanh(z / self.cap)  # smooth, odd, slope 1 at 0, |output| < cap


class _Activation(_Protection):
    def __init__(self, k: float, window: int, min_history: int) -> None:
        self.k, self.history, self.rms = k, _Running(window, min_history), None

    def setup(self, model, optimizer):
        last_hidden = [m for m in model if isinstance(m, (nn.ReLU, nn.Tanh))][-1]
        last_hidden.register_forward_hook(self._record)

    def _record(self, module, inputs, output):
        self.rms = output.detach().pow(2).mean().sqrt()

    def probe(self):
        return self.rms

    def decide(self, step, loss, probe, model, optimizer):
        return "skip" if self.history.outlier(probe, self.k) else "step"


class _LossGuard(_Protection):
    def __init__(self, k: float, window: int, min_history: int) -> None:
        self.k, self.history = k, _Running(window, min_history, LOSS_FLOOR)

    def decide(self, step, loss, probe, model, optimizer):
        return "skip" if self.history.outlier(loss, self.k) else "step"


class _Layerwise(_Protection):
    def __init__(self, max_norm: float) -> None:
        self.max_norm = max_norm

    def setup(self, model, optimizer):
        for p in model.parameters():
            p.register_hook(self._clip)

    def _clip(self, grad: torch.Tensor) -> torch.Tensor:
        # the factor of clip_grad_norm_ applied to this tensor alone, on the device: no host read
        return grad * (self.max_norm / (grad.norm() + 1e-6)).clamp(max=1.0)


class _Spike(_Protection):
    def __init__(self, threshold: float) -> None:
        self.guard = gradclip.SpikeGuard(threshold=threshold)

    def setup(self, model, optimizer):
        self.guard.attach(optimizer)

    def skipped(self):
        return int(self.guard.skipped_steps)


class _Clip(_Protection):
    """Global-norm clipping at ``max_norm`` (``gradclip.clip_grad_norm_``); with ``skip_nonfinite``, a step whose
    norm is NaN or inf is skipped instead (``error_if_nonfinite=True`` raises before any gradient is scaled)."""

    def __init__(self, max_norm: float, skip_nonfinite: bool = False) -> None:
        self.max_norm, self.skip_nonfinite, self.skips = max_norm, skip_nonfinite, 0

    def before_step(self, model, optimizer):
        params = list(model.parameters())
        try:
            gradclip.clip_grad_norm_(params, self.max_norm, error_if_nonfinite=self.skip_nonfinite)
        except RuntimeError:  # only raised for a non-finite norm
            _drop_gradients(params)
            self.skips += 1

    def skipped(self):
        return self.skips


class _SkipNonFinite(_Protection):
    """GradScaler's skip on inf without the loss scaling: the step is skipped when the global gradient norm is NaN
    or inf (one host read of the norm per step, as ``GradScaler.step`` reads its ``found_inf``)."""

    def __init__(self) -> None:
        self.skips = 0

    def before_step(self, model, optimizer):
        params = list(model.parameters())
        if not math.isfinite(float(gradclip.get_total_norm([p.grad for p in params if p.grad is not None]))):
            _drop_gradients(params)
            self.skips += 1

    def skipped(self):
        return self.skips


def _drop_gradients(params: list[nn.Parameter]) -> None:
    """Skip the coming ``optimizer.step()``: torch's optimizers leave a parameter without ``.grad`` untouched
    (no update, no momentum or weight-decay change, no step count), as if the step had not been called."""
    for p in params:
        p.grad = None


class _Rollback(_Protection):
    def __init__(self, k: float, window: int, min_history: int, every: int) -> None:
        self.k, self.history, self.every = k, _Running(window, min_history, LOSS_FLOOR), every
        self.saved: tuple[dict, dict] | None = None

    def decide(self, step, loss, probe, model, optimizer):
        if self.history.outlier(loss, self.k):
            if self.saved is None:
                return "skip"
            model.load_state_dict(self.saved[0])
            optimizer.load_state_dict(self.saved[1])
            return "rollback"
        if step % self.every == 0:  # this state's loss passed the check: keep it
            self.saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()))
        return "step"


@dataclass(frozen=True)
class Guard:
    """One row of :data:`GUARDS`.

    Attributes:
        side: ``"forward"`` (acts before backward) or ``"backward"`` (during or after it).
        description: the rule, with its setting.
        build: ``build() -> protection`` (a fresh, unattached guard for one run).
        reference: where the practice comes from.
    """

    side: str
    description: str
    build: Callable[[], _Protection] = field(repr=False)
    reference: str = ""


SOFTCAP = 15.0
"""The soft cap on the logits (Gemma 2 uses 30 on its final layer, over a vocabulary of 256k)."""
K, WINDOW, MIN_HISTORY = 5.0, 50, 10
"""The outlier rule of the loss, activation and rollback guards: above 5 x the median of the last 50 values, after 10."""
LOSS_FLOOR = math.log(10)
"""A loss counts as an outlier only above this too: ln 10 nats, the loss of guessing uniformly among the 10 classes."""
LAYER_MAX_NORM = 1.0
"""Per-tensor gradient norm cap of the ``"layerwise"`` guard."""
SPIKE_Z = 6.0
"""SpikeGuard's threshold in standard deviations (OLMo-core's factor)."""
EVERY = 10
"""Rollback keeps a state every this many steps."""
CLIP_MAX_NORM = 5.39
"""Global-norm threshold of the ``"clip"`` guards: chapter 4's threshold recipe (:mod:`gradclip_book.harness.recipe`:
the 90th percentile of the first 50 unclipped gradient norms) on the clean run of seed 0, :func:`recipe_threshold`
(a test recomputes it). It never sees a faulty run."""

GUARDS: dict[str, Guard] = {
    "none": Guard("-", "no guard", _Protection),
    "softcap": Guard("forward", f"logits soft-capped: z <- {SOFTCAP:g} tanh(z / {SOFTCAP:g})",
                     lambda: _SoftCap(SOFTCAP), "Gemma Team 2024 (Gemma 2), arXiv:2408.00118"),
    "activation": Guard("forward", f"batch skipped when the last hidden layer's RMS activation is non-finite or above "
                        f"{K:g} x its median over the last {WINDOW} batches",
                        lambda: _Activation(K, WINDOW, MIN_HISTORY)),
    "loss": Guard("forward", f"batch skipped before backward when its loss is non-finite or above {K:g} x the median "
                  f"of the last {WINDOW} losses", lambda: _LossGuard(K, WINDOW, MIN_HISTORY)),
    "layerwise": Guard("backward", f"each parameter's gradient capped at norm {LAYER_MAX_NORM:g} by a tensor hook "
                       "during backward", lambda: _Layerwise(LAYER_MAX_NORM)),
    "spike": Guard("backward", f"gradclip.SpikeGuard(threshold={SPIKE_Z:g}) attached: the step is undone on the "
                   "device when the gradient norm is non-finite or a z-score outlier",
                   lambda: _Spike(SPIKE_Z), "Chowdhery et al. 2022 (PaLM), arXiv:2204.02311"),
    "rollback": Guard("backward", f"state kept every {EVERY} steps; on a non-finite loss or one above {K:g} x the "
                      "recent median, back to it, and on with the next batches",
                      lambda: _Rollback(K, WINDOW, MIN_HISTORY, EVERY),
                      "Chowdhery et al. 2022 (PaLM), arXiv:2204.02311; Zhang et al. 2022 (OPT), arXiv:2205.01068"),
    "clip": Guard("backward", f"gradclip.clip_grad_norm_(params, {CLIP_MAX_NORM:g}) before every step: the global "
                  "gradient norm capped at the threshold recipe's value", lambda: _Clip(CLIP_MAX_NORM),
                  "Pascanu, Mikolov and Bengio 2013, arXiv:1211.5063"),
    "skip": Guard("backward", "the step skipped when the global gradient norm is NaN or inf (GradScaler's skip on "
                  "inf, without loss scaling)", _SkipNonFinite,
                  "torch.amp.GradScaler.step (Micikevicius et al. 2018, arXiv:1710.03740)"),
    "clip+skip": Guard("backward", f"gradclip.clip_grad_norm_(params, {CLIP_MAX_NORM:g}, error_if_nonfinite=True); "
                       "on the error (a NaN or inf norm) the step is skipped",
                       lambda: _Clip(CLIP_MAX_NORM, skip_nonfinite=True)),
}
"""Guard name -> :class:`Guard`."""

# --- one run ---------------------------------------------------------------------------------------

BASE = replace(cls.DEFAULT, lr=0.02)
"""The run every fault hits: chapter 4's depth-8 ReLU MLP, SGD with momentum 0.9 at lr 0.02, 300 steps of 64
images. Why 0.02 and not chapter 4's 0.03: a guard is judged to a point of test accuracy, so the clean run must not
be chaotic. Skipping one clean batch at step 100 moved the final accuracy by up to 0.9 points at lr 0.02, by up to
5 points at 0.03, and at 0.05 made one seed diverge."""

FAULT_STEPS = (50, 100, 150, 200, 250)
"""The fault steps of the stored grid (the explorer's slider)."""
DEFAULT_FAULT_STEP = 200


@dataclass(frozen=True)
class SafetyConfig:
    """One run: chapter 4's config (the run's network, data and optimizer), a fault and a guard.

    Attributes:
        fault: a key of :data:`FAULTS`.
        guard: a key of :data:`GUARDS`.
        fault_step: the first faulty step (0-based).
        span: how many consecutive steps are faulty (``None``: the fault's own ``span``).
        steps: optimizer steps (overrides ``base.steps``).
        base: the chapter 4 :class:`~gradclip_book.classification.RunConfig` (method ``"none"``).
    """

    fault: str = "none"
    guard: str = "none"
    fault_step: int = DEFAULT_FAULT_STEP
    span: int | None = None
    steps: int = BASE.steps
    base: cls.RunConfig = BASE

    def __post_init__(self) -> None:
        for name, table in (("fault", FAULTS), ("guard", GUARDS)):
            if getattr(self, name) not in table:
                raise ValueError(f"{name} must be one of {sorted(table)}, got {getattr(self, name)!r}")
        if self.base.method != "none" or self.base.warmup:
            raise ValueError("base must be a RunConfig with method 'none' and no warm-up (the guards are the "
                             f"protection here), got method={self.base.method!r}, warmup={self.base.warmup}")
        if (self.span is not None and self.span < 1) or self.fault_step < 0:
            raise ValueError(f"span must be >= 1 and fault_step >= 0, got span={self.span}, "
                             f"fault_step={self.fault_step}")


@dataclass
class SafetyRun:
    """What one run produced.

    Attributes:
        config: the :class:`SafetyConfig` as a dict.
        loss: each step's minibatch loss (nats) as the network saw it, faulty batches included.
        actions: per step, ``"step"``, ``"skip"`` (the guard refused the batch before backward) or
            ``"rollback"``; SpikeGuard's device-side skips show as ``"step"`` and are counted in ``spike_skips``.
        spike_skips: steps SpikeGuard undid.
        finite: whether every weight is finite at the end.
        test_accuracy: final test accuracy in [0, 1] (``None`` when the weights are not finite).
        outcome: ``"nan"`` (non-finite weights), ``"diverged"`` (finite, but test accuracy below
            :data:`LOST_ACCURACY`) or ``"finished"``.
        seconds: wall time.
    """

    config: dict[str, Any]
    loss: list[float]
    actions: list[str]
    spike_skips: int
    finite: bool
    test_accuracy: float | None
    outcome: str
    seconds: float = 0.0

    @property
    def lost(self) -> bool:
        return self.outcome != "finished"


LOST_ACCURACY = 0.5
"""A run with finite weights whose test accuracy ends below this (chance is 0.1) counts as diverged."""


def _all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


class _Decide(harness.Hook):
    """Asks the guard after every forward pass (a batch it refuses gets no backward and no update) and lets it act
    on the gradients before every optimizer step."""

    def __init__(self, guard: _Protection) -> None:
        self.guard, self.actions = guard, []

    def after_forward(self, step: harness.Step) -> None:
        probe = self.guard.probe()
        seen = None if probe is None else float(probe.to(step.loss.dtype))
        action = self.guard.decide(step.index, step.value, seen, step.model, step.optimizer)
        self.actions.append(action)
        if action != "step":
            step.skip = True
            # non-finite weights and nothing to go back to: the run cannot recover
            step.stop = not math.isfinite(step.value) and not _all_finite(step.model)

    def before_step(self, step: harness.Step) -> None:
        self.guard.before_step(step.model, step.optimizer)


def _faulty_batches(x: torch.Tensor, y: torch.Tensor, config: SafetyConfig, base: cls.RunConfig, fault: Fault,
                    span: int):
    """The run's minibatches as ``(x, y, faulty)``, the fault's inputs applied at the faulty steps."""
    generator = torch.Generator().manual_seed(1000 + base.seed)
    for step, (xb, yb) in enumerate(harness.minibatches(x, y, base.batch, base.seed)):
        faulty = config.fault_step <= step < config.fault_step + span
        if faulty and fault.inputs is not None:
            xb, yb = fault.inputs(xb, yb, generator)
        yield xb, yb, faulty


def train(config: SafetyConfig = SafetyConfig(), clip_max_norm: float | None = None) -> SafetyRun:
    """Train chapter 4's network with ``config.fault`` injected and ``config.guard`` on; deterministic.

    ``clip_max_norm`` replaces :data:`CLIP_MAX_NORM` for the ``"clip"`` and ``"clip+skip"`` guards (the stored grid
    uses the default; pass another seed's :func:`recipe_threshold` to see how much a verdict depends on the clean
    run that chose the threshold).

    The loop is the book's harness (:func:`gradclip_book.harness.train`, no clipping method): the batch
    (faulty at the fault steps), forward through the guard's ``logits`` (with the fault's gradient hook at the
    faulty steps), the loss read on the host, the guard's decision after the forward pass (step / skip / rollback:
    a hook), ``backward()``, ``optimizer.step()``. The run always takes ``steps`` steps: a lost run is not stopped
    at its first huge loss (that would itself be a loss guard; the harness's divergence rule is off), except that
    a run whose loss and weights are non-finite stops there (nothing can bring it back).
    """
    base = replace(config.base, steps=config.steps)
    fault = FAULTS[config.fault]
    span = fault.span if config.span is None else config.span

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, bool]) -> torch.Tensor:
        xb, yb, faulty = batch
        z = model(xb)
        if faulty and fault.grad_factor is not None:
            z.register_hook(lambda g: g * fault.grad_factor)
        return nn.functional.cross_entropy(guard.logits(z), yb)

    with harness.deterministic():
        parts = harness.image_split(base.split_seed)
        model = cls.build_model(base)
        optimizer = cls.OPTIMIZERS[base.optimizer](list(model.parameters()), base.lr)
        if clip_max_norm is not None and config.guard in ("clip", "clip+skip"):
            guard = _Clip(clip_max_norm, skip_nonfinite=config.guard == "clip+skip")
        else:
            guard = GUARDS[config.guard].build()
        guard.setup(model, optimizer)
        decide = _Decide(guard)
        run = harness.train(model, optimizer, _faulty_batches(*parts["train"], config, base, fault, span), base.steps,
                            loss_fn=loss_fn, hooks=[decide], divergence=None, threads=None)
        finite = _all_finite(model)
        accuracy = harness.accuracy(model, *parts["test"]) if finite else None
    outcome = "nan" if not finite else ("diverged" if accuracy < LOST_ACCURACY else "finished")
    return SafetyRun(config=_config_dict(config), loss=run.loss, actions=decide.actions,
                     spike_skips=guard.skipped(), finite=finite, test_accuracy=accuracy, outcome=outcome,
                     seconds=run.seconds)


def recipe_threshold(seed: int = 0) -> float:
    """Chapter 4's threshold recipe on this page's clean run: the 90th percentile of the gradient norms of its first
    :data:`~gradclip_book.harness.recipe.PROBE_STEPS` steps, unclipped and without a fault
    (:func:`gradclip_book.harness.recipe.recommend_threshold`). :data:`CLIP_MAX_NORM` is its value at seed 0."""
    from .harness import recipe

    base = replace(BASE, seed=seed, steps=recipe.PROBE_STEPS)
    with harness.deterministic():
        parts = harness.image_split(base.split_seed)
        model = cls.build_model(base)
        optimizer = cls.OPTIMIZERS[base.optimizer](list(model.parameters()), base.lr)
        run = harness.train(model, optimizer, harness.minibatches(*parts["train"], base.batch, base.seed),
                            base.steps, divergence=None, threads=None)
    return recipe.recommend_threshold(run.grad_norm)


def _config_dict(config: SafetyConfig) -> dict[str, Any]:
    out = asdict(config)
    out["base"] = asdict(config.base)
    return out


# --- the stored grid ---------------------------------------------------------------------------------

SEEDS = tuple(range(10))
"""Seeds of the summary (at :data:`DEFAULT_FAULT_STEP`) and of the clean runs; the explorer's other fault steps use
seed 0. Seeds 5-9 were appended to the stored grid later (``python -m gradclip_book.safety grid --append 5 6 7 8 9``),
seeds 0-4's lines unchanged."""
GRID_PATH = Path(__file__).resolve().parents[2] / "chapters" / "data" / "safety_grid.jsonl.gz"


def grid_configs(seeds: Iterable[int] | None = None) -> list[SafetyConfig]:
    """Every stored run: each fault x guard at every fault step (seed 0) and at the default step (all seeds), and
    each guard without a fault (all seeds). ``seeds``: default :data:`SEEDS`; runs at the other fault steps are
    seed 0's, so they are listed only when 0 is among ``seeds``."""
    seeds = tuple(SEEDS if seeds is None else seeds)
    configs = []
    for guard in GUARDS:
        for seed in seeds:
            configs.append(SafetyConfig(guard=guard, base=replace(BASE, seed=seed)))
        for fault in FAULTS:
            if fault == "none":
                continue
            for step in FAULT_STEPS:
                for seed in (seeds if step == DEFAULT_FAULT_STEP else [s for s in seeds if s == 0]):
                    configs.append(SafetyConfig(fault=fault, guard=guard, fault_step=step,
                                                base=replace(BASE, seed=seed)))
    return configs


def key(config: SafetyConfig | dict[str, Any]) -> tuple[str, str, int, int]:
    """``(fault, guard, fault_step, seed)``: a stored run's identity (a fault-free run has fault_step -1)."""
    c = _config_dict(config) if isinstance(config, SafetyConfig) else config
    return c["fault"], c["guard"], (-1 if c["fault"] == "none" else c["fault_step"]), c["base"]["seed"]


def to_json(run: SafetyRun) -> dict[str, Any]:
    """A stored line: the run's scalars and its loss curve (4 significant digits; non-finite as strings)."""
    return {"config": run.config, "outcome": run.outcome, "finite": run.finite,
            "test_accuracy": None if run.test_accuracy is None else round(run.test_accuracy, 6),
            "skips": run.actions.count("skip"), "rollbacks": run.actions.count("rollback"),
            "spike_skips": run.spike_skips, "seconds": round(run.seconds, 3),
            "loss": [float(f"{v:.4g}") if math.isfinite(v) else str(v) for v in run.loss]}


def grid(path: str | Path = GRID_PATH, progress: bool = True) -> None:
    """Compute every run of :func:`grid_configs` and write them, one JSON line each, gzipped (it rewrites the file;
    about 2 s a run on one thread)."""
    configs = grid_configs()
    if progress:
        from tqdm import tqdm
        configs = tqdm(configs, desc="safety grid", unit="run")
    grids.write_lines(Path(path), [to_json(train(c)) for c in configs])


def append(seeds: Iterable[int], path: str | Path = GRID_PATH, progress: bool = True) -> list[tuple]:
    """Compute the runs of :func:`grid_configs` for ``seeds`` that ``path`` lacks and append them; every stored line
    stays as it is, byte for byte (returns the keys computed).

    The runs are computed one seed after another, and each line is appended to the file as soon as its run ends
    (a gzip member of its own), so an interrupted command loses at most the run in progress and, run again, goes
    on where it stopped. At the end the file is written again as one gzip member with the same text: the stored
    lines first and unchanged (checked), then the new ones in the order they were computed.
    """
    path = Path(path)
    before, clean = _text(path)
    if not clean:
        _write_text(path, before)  # a member cut off by an interruption would hide the lines appended after it
    done = {key(line["config"]) for line in grids.load(path)}
    todo = [c for seed in seeds for c in grid_configs([seed]) if key(c) not in done]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), desc="safety grid (append)", unit="run")
    for config in todo:
        line = json.dumps(to_json(train(config)), separators=(",", ":")) + "\n"
        with gzip.open(path, "ab") as out:
            out.write(line.encode())
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    after, clean = _text(path)
    if not clean or not after.startswith(before):
        raise RuntimeError(f"{path}: the stored lines changed while appending; restore the file from git")
    _write_text(path, after)
    _load.cache_clear()
    return [key(c) for c in todo]


def _text(path: Path) -> tuple[str, bool]:
    """The file's complete lines as one text, and whether the file read cleanly (a line or gzip member cut off by
    an interruption is left out of the text and makes the read unclean)."""
    if not path.exists():
        return "", True
    lines, clean = [], True
    with gzip.open(path, "rt", encoding="utf-8") as f:
        try:
            for line in f:
                lines.append(line)
        except (EOFError, gzip.BadGzipFile):
            clean = False
    text = "".join(lines)
    return text[: text.rfind("\n") + 1], clean and (not text or text.endswith("\n"))


def _write_text(path: Path, text: str) -> None:
    """Rewrite ``path`` as one gzip member holding ``text`` (no timestamp, as :func:`gradclip_book.grids.write_lines`)."""
    tmp = path.with_suffix(".tmp")
    with gzip.GzipFile(tmp, "wb", mtime=0) as f:
        f.write(text.encode())
    os.replace(tmp, path)


@functools.lru_cache(maxsize=2)
def _load(path: str) -> tuple[dict[str, Any], ...]:
    return tuple(grids.load(Path(path)))


def load(path: str | Path = GRID_PATH) -> dict[tuple[str, str, int, int], dict[str, Any]]:
    """The stored runs by :func:`key`."""
    return {key(line["config"]): line for line in _load(str(path))}


# --- what the page states ------------------------------------------------------------------------------

def recovers(accuracies: Iterable[float | None], clean: Iterable[float]) -> bool:
    """The page's rule for "the guard recovers the run": every seed finishes (finite weights, test accuracy at least
    :data:`LOST_ACCURACY`) and the mean test accuracy over the seeds is not below the *lowest* clean seed's (no fault,
    no guard, the same seeds). The clean runs' spread over seeds is the yardstick: a faulty run whose mean lies
    within it, or above it, cannot be told from a clean one by these seeds.

    Example:
        >>> recovers([0.95, 0.96], clean=[0.955, 0.97]), recovers([0.95, 0.94], clean=[0.955, 0.97])
        (True, False)
        >>> recovers([0.99, None], clean=[0.9])
        False
    """
    accuracies, clean = list(accuracies), list(clean)
    if any(a is None or a < LOST_ACCURACY for a in accuracies):
        return False
    # exactly, with the values as written: a mean equal to the lowest clean seed's recovers (harness.exact_mean)
    return harness.exact_mean(accuracies) >= harness.exact_mean([min(clean)])


def leave_one_seed_out(accuracies: Iterable[float | None], clean: Iterable[float]) -> list[bool]:
    """The verdict of :func:`recovers` with each seed left out in turn, from the faulty runs and from the clean
    runs alike (entry ``i``: without the ``i``-th seed). A verdict is robust when every entry equals the verdict on
    all the seeds, and hangs on a seed when leaving that one out flips it.

    Example:
        >>> leave_one_seed_out([0.95, 0.96, 0.90], clean=[0.94, 0.95, 0.96])   # the third seed drags the mean down
        [False, False, True]
    """
    accuracies, clean = list(accuracies), list(clean)
    keep = [[i for i in range(len(clean)) if i != drop] for drop in range(len(clean))]
    return [recovers([accuracies[i] for i in k], [clean[i] for i in k]) for k in keep]


def verdict(accuracies: Iterable[float | None], clean: Iterable[float]) -> str:
    """What the page may call a guard's result: ``"recovers"`` when :func:`recovers` holds on all the seeds *and*
    with any one seed left out (:func:`leave_one_seed_out`), ``"misses"`` when it fails on all of them and with any
    one left out, and ``"fragile"`` when leaving out one seed flips it. A fragile verdict is neither counted nor
    listed as a recovery: the rule's bar, the lowest clean seed, only falls as seeds are added, so a mean that
    clears it by one seed's weight need not clear it at other seeds.

    Example:
        >>> verdict([0.95, 0.96, 0.97], [0.94, 0.95, 0.96]), verdict([0.95, 0.96, 0.90], [0.94, 0.95, 0.96])
        ('recovers', 'fragile')
        >>> verdict([0.5, None, 0.96], [0.94, 0.95, 0.96])
        'misses'
    """
    accuracies, clean = list(accuracies), list(clean)
    on_all = recovers(accuracies, clean)
    if any(v != on_all for v in leave_one_seed_out(accuracies, clean)):
        return "fragile"
    return "recovers" if on_all else "misses"


def _mean(values: Iterable[float | None]) -> float | None:
    values = list(values)
    return None if any(v is None for v in values) else statistics.fmean(values)


def summary(path: str | Path = GRID_PATH) -> dict[str, Any]:
    """The page's key numbers, from the stored grid (at :data:`DEFAULT_FAULT_STEP`, means over :data:`SEEDS`).

    Returns ``{"clean": mean accuracy, "clean_seeds": [per seed], "clean_min", "clean_max", "clean_by_guard":
    {guard: accuracy}, "faults": {fault: {guard: {"outcomes": [per seed], "lost": bool (some seed lost),
    "accuracy": mean or None, "accuracies": [per seed], "recovers": bool (:func:`recovers`), "hinges_on": [the seeds
    whose leaving out flips the verdict (:func:`leave_one_seed_out`); empty: robust], "verdict": "recovers",
    "misses" or "fragile" (:func:`verdict`; only "recovers" counts as a recovery)}}}}``. What the guards cost is
    measured by :mod:`gradclip_book.guard_costs`.
    """
    runs = load(path)
    clean_by_guard = {g: _mean(runs["none", g, -1, s]["test_accuracy"] for s in SEEDS) for g in GUARDS}
    clean = clean_by_guard["none"]
    clean_seeds = [runs["none", "none", -1, s]["test_accuracy"] for s in SEEDS]
    faults: dict[str, dict[str, dict[str, Any]]] = {}
    for fault in FAULTS:
        if fault == "none":
            continue
        faults[fault] = {}
        for guard in GUARDS:
            lines = [runs[fault, guard, DEFAULT_FAULT_STEP, s] for s in SEEDS]
            outcomes = [line["outcome"] for line in lines]
            accuracy = _mean(line["test_accuracy"] for line in lines)
            lost = any(o != "finished" for o in outcomes)
            accuracies = [line["test_accuracy"] for line in lines]
            on_all = recovers(accuracies, clean_seeds)
            loso = leave_one_seed_out(accuracies, clean_seeds)
            faults[fault][guard] = {"outcomes": outcomes, "lost": lost, "accuracy": accuracy,
                                    "accuracies": accuracies, "recovers": on_all,
                                    "hinges_on": [s for s, v in zip(SEEDS, loso) if v != on_all],
                                    "verdict": verdict(accuracies, clean_seeds),
                                    "finite": all(line["finite"] for line in lines)}
    out: dict[str, Any] = {"clean": clean, "clean_seeds": clean_seeds, "clean_min": min(clean_seeds),
                           "clean_max": max(clean_seeds), "clean_by_guard": clean_by_guard, "faults": faults,
                           "fault_step": DEFAULT_FAULT_STEP, "seeds": list(SEEDS)}
    return out


def by_fault_step(fault: str, guard: str = "none", seed: int = 0,
                  path: str | Path = GRID_PATH) -> list[tuple[int, str]]:
    """How the stored run ends (``"finished"``, ``"diverged"`` or ``"nan"``) at each of :data:`FAULT_STEPS`.

    Example:
        >>> [step for step, _ in by_fault_step("scaled")] == list(FAULT_STEPS)
        True
    """
    runs = load(path)
    return [(step, runs[fault, guard, step, seed]["outcome"]) for step in FAULT_STEPS]


def step_phrase(outcomes: list[tuple[int, str]]) -> str:
    """``[(50, "nan"), (100, "nan"), (200, "finished")]`` -> ``"nan at steps 50 and 100; finished at step 200"``.

    Steps are grouped by outcome, in the order each outcome first appears.
    """
    groups: dict[str, list[int]] = {}
    for step, outcome in outcomes:
        groups.setdefault(outcome, []).append(step)

    def steps_text(steps: list[int]) -> str:
        if len(steps) == 1:
            return f"step {steps[0]}"
        return "steps " + and_list([str(s) for s in steps])

    return "; ".join(f"{outcome} at {steps_text(steps)}" for outcome, steps in groups.items())


def _guarded_step(model: nn.Module, optimizer: torch.optim.Optimizer, guard: Any, step: int, xb: torch.Tensor,
                  yb: torch.Tensor, grad_factor: float | None = None) -> tuple[float, str]:
    """One bare step under ``guard`` for :mod:`gradclip_book.guard_costs` (the timed work of a step; runs of record
    train through the harness, :func:`train`); returns the loss read on the host and the guard's decision.

    Forward through the guard's ``logits``, the loss (and the guard's probe, in the same transfer) read
    once, the guard's decision, and ``backward()`` and the update when it says ``"step"``.
    ``grad_factor`` multiplies the gradient at the logits (the backward faults).
    """
    z = model(xb)
    if grad_factor is not None:
        z.register_hook(lambda g: g * grad_factor)
    loss = nn.functional.cross_entropy(guard.logits(z), yb)
    probe = guard.probe()
    if probe is None:
        value, seen = float(loss.detach()), None
    else:  # one transfer for both numbers
        value, seen = torch.stack([loss.detach(), probe.to(loss.dtype)]).tolist()
    action = guard.decide(step, value, seen, model, optimizer)
    if action == "step":
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        guard.before_step(model, optimizer)
        optimizer.step()
    return value, action


def main(argv: list[str] | None = None) -> None:
    """``python -m gradclip_book.safety grid [--out PATH] [--append SEED ...]``: recompute the stored grid, or
    append the runs of new seeds to it."""
    parser = argparse.ArgumentParser(prog="python -m gradclip_book.safety",
                                     description="Recompute chapter 5.3's stored grid of faults and guards "
                                                 f"({len(grid_configs())} runs, about 2 s each on one thread); it "
                                                 "rewrites the file. With --append, only the runs of the given "
                                                 "seeds that the file lacks are computed and added at its end.")
    parser.add_argument("what", choices=["grid"], help="what to compute: the stored grid")
    parser.add_argument("--out", type=Path, default=Path(GRID_PATH), help=f"the file to write (default {GRID_PATH})")
    parser.add_argument("--append", type=int, nargs="+", metavar="SEED",
                        help=f"append these seeds' runs ({len(grid_configs([1]))} a seed; seed 0 also has the other "
                             "fault steps) and keep every stored line as it is; resumable")
    args = parser.parse_args(argv)
    if args.append:
        added = append(args.append, args.out)
        print(f"{len(added)} runs appended to {args.out} (seeds {' '.join(map(str, args.append))})")
        return
    grid(args.out)
    print(f"{len(grid_configs())} runs in {args.out}")


if __name__ == "__main__":
    main()
