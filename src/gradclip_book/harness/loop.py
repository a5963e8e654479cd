r"""The book's one training loop: any model, any optimizer, any clipping method, hooks, divergence and evaluation.

:func:`train` runs ``steps`` optimizer steps and returns a :class:`Run`. One step::

    batch = next(batches)
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch); value = float(loss)     # recorded; hooks: after_forward
    if value is not finite or value > divergence: stop (diverged)
    loss.backward()                                        # hooks: after_backward (gradients as computed)
    clip()                                                 # the method of METHODS, at its threshold
    set lr = base lr x warm-up factor x schedule           # hooks: before_step (gradients as clipped)
    optimizer.step()
    norm, fired = clip.report()                            # hooks: after_step

**Divergence, one rule for the book.** A run diverges at the first step whose training loss (computed
before that step's update) is not finite or exceeds :data:`DIVERGED_LOSS` (1000 nats; a cross-entropy
starts near ln(classes): 2.3 for 10 digits, 4-5 for a character vocabulary). The run stops there: that
batch gets no update, its loss is the last entry of :attr:`Run.loss`, and the run has no metrics (a
diverged run is never evaluated). Figures mark it with a cross at that step; selection
(:mod:`gradclip_book.harness.select`) ranks it below every run that finished.

**Hooks** (:class:`Hook`) see a :class:`Step` after the forward pass, after backward (before clipping),
before the optimizer step (after clipping) and after it; they record what they need (per-layer norms,
update lengths, attention-logit maxima) and may set ``step.skip`` (after the forward: no backward, no
update for this batch) or ``step.stop`` (end the run after this step).

**Determinism.** By default the run uses one CPU thread and ``torch.use_deterministic_algorithms(True)``
(:func:`deterministic`, both restored afterwards): the same model, optimizer, batches and arguments give
the same :class:`Run`, bit for bit.

Example:
    >>> import torch
    >>> from gradclip_book.harness import data, models, train
    >>> parts = data.image_split()
    >>> model = models.build("mlp", depth=2, width=16, seed=0)
    >>> optimizer = models.make_optimizer("sgd", model.parameters(), lr=0.05)
    >>> run = train(model, optimizer, data.minibatches(*parts["train"], batch=64, seed=0), steps=30,
    ...             method="norm", threshold=1.0, evaluate=data.accuracy_evaluator(parts))
    >>> run.steps_run, run.diverged, sorted(run.metrics), 0 <= run.clip_fraction <= 1
    (30, False, ['test_accuracy', 'val_accuracy'], True)
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import gradclip

from . import curves
from .data import classification_loss
from .methods import Method, bind

__all__ = ["DIVERGED_LOSS", "Hook", "LayerStats", "Run", "Step", "UpdateStats", "deterministic", "is_diverged",
           "train", "warmup_factor"]

DIVERGED_LOSS = 1e3
"""The book's divergence limit (nats): a training loss above it, or not finite, ends a run as diverged."""


def is_diverged(loss: float, limit: float = DIVERGED_LOSS) -> bool:
    """The book's divergence rule for one step's training loss: not finite, or above ``limit``.

    Example:
        >>> is_diverged(2.3), is_diverged(float("nan")), is_diverged(1e4)
        (False, True, True)
    """
    return not loss <= limit  # also true for nan


@contextlib.contextmanager
def deterministic(threads: int = 1) -> Iterator[None]:
    """``threads`` CPU threads (a fixed reduction order) and deterministic algorithms, restored afterwards.

    Example:
        >>> with deterministic():
        ...     torch.get_num_threads()
        1
    """
    old_threads = torch.get_num_threads()
    old_det, old_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.set_num_threads(old_threads)


def warmup_factor(step: int, warmup: int) -> float:
    """The linear warm-up's factor on the learning rate at ``step`` (0-based): ``min(1, (step + 1) / warmup)``;
    1 when ``warmup`` is 0.

    Example:
        >>> [warmup_factor(t, 4) for t in range(5)]
        [0.25, 0.5, 0.75, 1.0, 1.0]
    """
    return 1.0 if warmup <= 0 else min(1.0, (step + 1) / warmup)


@dataclass
class Step:
    """What a hook sees of the current step.

    Attributes:
        index: the step (0-based).
        model, optimizer: the run's.
        batch: this step's batch as the batch iterator gave it.
        loss: the loss tensor ``loss_fn`` returned (with its graph until backward).
        value: the loss read on the host (nats).
        lr_factor: warm-up x schedule factor applied to every group's base learning rate this step.
        norm: the pre-clip global L2 norm of all gradients (set before ``after_step``; ``None`` before).
        clipped: whether the method fired (set before ``after_step``).
        skip: set it in ``after_forward`` to drop this batch (no backward, no update).
        stop: set it to end the run after this step.
    """

    index: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batch: Any
    loss: torch.Tensor
    value: float
    lr_factor: float = 1.0
    norm: float | None = None
    clipped: bool | None = None
    skip: bool = False
    stop: bool = False


class Hook:
    """A per-step observer of :func:`train`; override the moments you need (each does nothing by default).

    Example:
        >>> class Losses(Hook):
        ...     def __init__(self):
        ...         self.values = []
        ...     def after_step(self, step):
        ...         self.values.append(step.value)
        >>> Losses().values
        []
    """

    def after_forward(self, step: Step) -> None:
        """After the loss is computed and read, before the divergence check and backward."""

    def after_backward(self, step: Step) -> None:
        """After ``loss.backward()``, before clipping: ``p.grad`` holds the raw gradients."""

    def before_step(self, step: Step) -> None:
        """After clipping and the learning-rate update, before ``optimizer.step()``: ``p.grad`` is what the
        optimizer receives."""

    def after_step(self, step: Step) -> None:
        """After ``optimizer.step()``; ``step.norm`` and ``step.clipped`` are set."""


@dataclass
class Run:
    """What :func:`train` produced. Per-step lists have one entry per step run.

    Attributes:
        loss: each step's training loss (nats) before its update; a diverged run has one more entry, the loss
            that stopped it.
        grad_norm: each step's pre-clip global L2 norm of all gradients (``nan`` for a skipped batch).
        clipped: whether the method fired at each step (``False`` for a skipped batch).
        skipped: whether a hook dropped the batch.
        lr: the learning rate of the first parameter group at each step.
        steps: the steps asked for.
        steps_run: steps taken (``steps`` unless the run diverged or a hook stopped it).
        diverged_at: the step whose loss broke the divergence rule (see the module), or ``None``.
        stopped_at: the step after which a hook stopped the run, or ``None``.
        metrics: ``evaluate(model)`` at the end; empty for a diverged run or without ``evaluate``.
        evals: ``(steps done, metrics)`` every ``eval_every`` steps.
        seconds: wall time (varies from run to run; not part of the result's identity).
    """

    loss: list[float]
    grad_norm: list[float]
    clipped: list[bool]
    skipped: list[bool]
    lr: list[float]
    steps: int
    steps_run: int
    diverged_at: int | None
    stopped_at: int | None
    metrics: dict[str, float]
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def diverged(self) -> bool:
        return self.diverged_at is not None

    @property
    def clip_fraction(self) -> float:
        """The share of the steps run at which the method fired."""
        return sum(self.clipped) / len(self.clipped) if self.clipped else 0.0

    def metric(self, name: str) -> float | None:
        """``metrics[name]``, or ``None`` for a diverged run (the convention of :mod:`~gradclip_book.harness.select`)."""
        return None if self.diverged else self.metrics.get(name)

    def to_json(self, points: int = curves.CURVE_POINTS) -> dict[str, Any]:
        """The run for storage (:func:`gradclip_book.harness.curves.compact`): scalars and log-binned curves."""
        return curves.compact(self, points)


_RAN_OUT = ("the batch iterator ran out before `steps` steps: pass a re-iterable (a list, a DataLoader), a factory "
            "(a function returning a new iterable per epoch) or an endless generator")


def _batch_source(batches: Iterable[Any] | Callable[[], Iterable[Any]]) -> Iterator[Any]:
    """Batches forever: a re-iterable (a list, a DataLoader) or a factory starts a new epoch when one ends;
    a one-shot iterator (a generator) that ends raises."""
    factory = batches if callable(batches) and not hasattr(batches, "__iter__") else None
    while True:
        source = factory() if factory is not None else batches
        iterator = iter(source)
        one_shot = factory is None and iterator is source
        empty = True
        for batch in iterator:
            empty = False
            yield batch
        if empty:
            raise ValueError("the batches are empty" if not one_shot else _RAN_OUT)
        if one_shot:
            raise ValueError(_RAN_OUT)


def _evaluate(model: nn.Module, evaluate: Callable[[nn.Module], Mapping[str, float]]) -> dict[str, float]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return {str(k): float(v) for k, v in evaluate(model).items()}
    finally:
        model.train(was_training)


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Any] | Callable[[], Iterable[Any]],
    steps: int,
    *,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] = classification_loss,
    method: str | Method = "none",
    threshold: float | None = None,
    warmup: int = 0,
    schedule: Callable[[int], float] | None = None,
    hooks: Sequence[Hook] = (),
    evaluate: Callable[[nn.Module], Mapping[str, float]] | None = None,
    eval_every: int | None = None,
    divergence: float | None = DIVERGED_LOSS,
    threads: int | None = 1,
) -> Run:
    """Train ``model`` with ``optimizer`` for ``steps`` steps, clipping by ``method``; never raises for a divergence.

    Args:
        model: any ``nn.Module`` (put in training mode; evaluation runs in eval mode without gradients).
        optimizer: any optimizer over the model's parameters (its groups' ``lr`` are the base learning rates).
        batches: an endless iterator of batches, a re-iterable (a list, a ``DataLoader``: a new epoch starts
            when one ends) or a factory (a function returning a new iterable per epoch).
        steps: optimizer steps to run.
        loss_fn: ``loss_fn(model, batch) -> scalar loss``. A stateful model keeps its state here (a recurrent
            language model carries its hidden state across batches and detaches it). A loss with no graph
            (``requires_grad`` False) is not back-propagated: the function has filled ``p.grad`` itself (DP-SGD).
        method, threshold: a key of :data:`~gradclip_book.harness.methods.METHODS` (or a
            :class:`~gradclip_book.harness.methods.Method`) and its knob; ``threshold`` is ``None`` for ``"none"``.
        warmup: linear warm-up over this many steps (:func:`warmup_factor`); 0: none.
        schedule: ``schedule(step) -> factor`` on the learning rate, multiplied with the warm-up's.
        hooks: :class:`Hook` objects, called in order at each moment of each step.
        evaluate: ``evaluate(model) -> {name: value}`` (in eval mode, no gradients) at the end, unless diverged.
        eval_every: also evaluate every this many steps (``Run.evals``).
        divergence: the loss above which (or non-finite) the run stops as diverged; ``None``: never stop on the
            loss (a run that must take every step, as chapter 5.3's guards do).
        threads: run under :func:`deterministic` with this many threads; ``None`` leaves torch's settings alone.

    Returns:
        A :class:`Run` (full-length curves; :meth:`Run.to_json` for storage).

    Raises:
        ValueError: ``steps`` < 1, a negative ``warmup``, a bad method/threshold pair, or batches that run out.

    Example:
        >>> from gradclip_book.harness import data, models
        >>> model = models.build("plain_cnn", depth=2, width=4, seed=0)
        >>> run = train(model, models.make_optimizer("adamw", model.parameters(), 1e-3),
        ...             data.minibatches(*data.image_split()["train"], batch=32, seed=0), steps=5, warmup=5)
        >>> [round(lr / 1e-3, 2) for lr in run.lr]
        [0.2, 0.4, 0.6, 0.8, 1.0]
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")
    if warmup < 0:
        raise ValueError(f"warmup must be a number of steps >= 0 (0 = no warm-up), got {warmup!r}")
    start = time.perf_counter()
    context = deterministic(threads) if threads else contextlib.nullcontext()
    losses: list[float] = []
    norms: list[float] = []
    fired: list[bool] = []
    skipped: list[bool] = []
    lrs: list[float] = []
    evals: list[tuple[int, dict[str, float]]] = []
    diverged_at = stopped_at = None
    with context:
        clip = bind(method, model, optimizer, threshold)
        base_lrs = [group["lr"] for group in optimizer.param_groups]
        source = _batch_source(batches)
        model.train()
        for index in range(steps):
            batch = next(source)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            value = float(loss.detach())
            losses.append(value)
            factor = warmup_factor(index, warmup) * (schedule(index) if schedule is not None else 1.0)
            step = Step(index, model, optimizer, batch, loss, value, factor)
            for hook in hooks:
                hook.after_forward(step)
            if divergence is not None and is_diverged(value, divergence):
                diverged_at = index
                break
            if step.skip:
                norms.append(math.nan)
                fired.append(False)
                skipped.append(True)
                lrs.append(float(optimizer.param_groups[0]["lr"]))
            else:
                if loss.requires_grad:
                    loss.backward()
                for hook in hooks:
                    hook.after_backward(step)
                clip()
                if warmup or schedule is not None:  # otherwise the optimizer's lr is never touched
                    for group, base in zip(optimizer.param_groups, base_lrs):
                        group["lr"] = base * factor
                lrs.append(float(optimizer.param_groups[0]["lr"]))
                for hook in hooks:
                    hook.before_step(step)
                optimizer.step()
                norm, did = clip.report()
                step.norm, step.clipped = float(norm), bool(did)
                norms.append(step.norm)
                fired.append(step.clipped)
                skipped.append(False)
                for hook in hooks:
                    hook.after_step(step)
            if eval_every and evaluate is not None and (index + 1) % eval_every == 0:
                evals.append((index + 1, _evaluate(model, evaluate)))
            if step.stop:
                stopped_at = index
                break
        metrics: dict[str, float] = {}
        if diverged_at is None and evaluate is not None:
            done = len(norms)
            metrics = dict(evals[-1][1]) if evals and evals[-1][0] == done else _evaluate(model, evaluate)
    return Run(loss=losses, grad_norm=norms, clipped=fired, skipped=skipped, lr=lrs, steps=steps,
               steps_run=len(norms), diverged_at=diverged_at, stopped_at=stopped_at, metrics=metrics, evals=evals,
               seconds=time.perf_counter() - start)


# --- standard hooks ------------------------------------------------------------------------------------


def _layers(model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """The modules that own parameters directly, in registration order, with their parameters."""
    out = []
    for name, module in model.named_modules():
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if params:
            out.append((name or type(module).__name__, params))
    return out


def _norm(tensors: Iterable[torch.Tensor]) -> float:
    return float(gradclip.get_total_norm(list(tensors)))


class LayerStats(Hook):
    r"""Per-layer records every ``every`` steps: gradient norm before clipping, weight norm before the update,
    update length :math:`\lVert \Delta w \rVert` and the relative step :math:`\lVert \Delta w\rVert/\lVert w\rVert`.

    A layer is a module that owns parameters (a convolution with its bias, a normalisation layer, the head);
    :attr:`names` lists them input first. After the run, ``grad[name]``, ``weight[name]``, ``update[name]`` and
    ``relative[name]`` are lists over :attr:`steps`.

    Example:
        >>> from gradclip_book.harness import data, models
        >>> model = models.build("mlp", depth=2, width=8)
        >>> stats = LayerStats(model)
        >>> _ = train(model, torch.optim.SGD(model.parameters(), lr=0.1),
        ...           data.minibatches(*data.image_split()["train"], 32, 0), steps=3, hooks=[stats])
        >>> stats.names, len(stats.relative["0"])
        (['0', '2', '4'], 3)
    """

    def __init__(self, model: nn.Module, every: int = 1) -> None:
        self.every = every
        self.layers = _layers(model)
        self.names = [name for name, _ in self.layers]
        self.steps: list[int] = []
        self.grad: dict[str, list[float]] = {n: [] for n in self.names}
        self.weight: dict[str, list[float]] = {n: [] for n in self.names}
        self.update: dict[str, list[float]] = {n: [] for n in self.names}
        self.relative: dict[str, list[float]] = {n: [] for n in self.names}
        self._before: list[list[torch.Tensor]] | None = None

    def after_backward(self, step: Step) -> None:
        if step.index % self.every:
            return
        self.steps.append(step.index)
        for name, params in self.layers:
            self.grad[name].append(_norm(p.grad for p in params if p.grad is not None))

    def before_step(self, step: Step) -> None:
        if step.index % self.every:
            return
        self._before = [[p.detach().clone() for p in params] for _, params in self.layers]

    def after_step(self, step: Step) -> None:
        if step.index % self.every or self._before is None:
            return
        for (name, params), before in zip(self.layers, self._before):
            weight = _norm(before)
            moved = _norm(p.detach() - b for p, b in zip(params, before))
            self.weight[name].append(weight)
            self.update[name].append(moved)
            self.relative[name].append(moved / weight if weight > 0 else math.inf)
        self._before = None


class UpdateStats(Hook):
    r"""Per step: the gradient norm the optimizer received (after clipping), the update length
    :math:`\lVert \theta_{t+1} - \theta_t\rVert` over all parameters, and the learning rate used.

    With global-norm clipping at ``c`` and learning rate :math:`\eta`, one SGD step without momentum moves
    the weights by at most :math:`\eta c`; with momentum :math:`\beta` the bound is :math:`\eta c/(1-\beta)`.

    Example:
        >>> from gradclip_book.harness import data, models
        >>> model = models.build("mlp", depth=2, width=8)
        >>> stats = UpdateStats()
        >>> _ = train(model, torch.optim.SGD(model.parameters(), lr=0.1), data.minibatches(
        ...     *data.image_split()["train"], 32, 0), steps=3, method="norm", threshold=0.5, hooks=[stats])
        >>> all(u <= 0.1 * 0.5 * 1.0001 for u in stats.update)   # plain SGD: at most lr x c
        True
    """

    def __init__(self) -> None:
        self.clipped_norm: list[float] = []
        self.update: list[float] = []
        self.lr: list[float] = []
        self._before: list[torch.Tensor] | None = None

    def before_step(self, step: Step) -> None:
        params = [p for group in step.optimizer.param_groups for p in group["params"]]
        self.clipped_norm.append(_norm(p.grad for p in params if p.grad is not None))
        self.lr.append(float(step.optimizer.param_groups[0]["lr"]))
        self._before = [p.detach().clone() for p in params]

    def after_step(self, step: Step) -> None:
        params = [p for group in step.optimizer.param_groups for p in group["params"]]
        self.update.append(_norm(p.detach() - b for p, b in zip(params, self._before)))
        self._before = None
