r"""Chapter 4's text runs: one :class:`TextConfig` in, one stored record out, trained by the book's harness.

Every run trains one of the language models of :mod:`gradclip_book.text` on the training part of the
corpus with :func:`gradclip_book.harness.train` (the book's one loop, its clipping methods and its
divergence rule) and is evaluated on the validation and test parts at the end:

* ``"rnn"`` / ``"lstm"``: :class:`~gradclip_book.text.CharRNN` trained with plain SGD (no momentum,
  d2l's setting for its recurrent language models) by truncated backpropagation through time:
  consecutive windows of ``seq_len`` characters of parallel streams
  (:func:`~gradclip_book.text.stream_batches`), the hidden state carried from one window to the next and
  detached (:class:`CarriedState`).
* ``"transformer"``: :class:`~gradclip_book.text.CharTransformer` trained with AdamW in the usual
  language-model setting (betas 0.9 and 0.95, decoupled weight decay 0.1 on every parameter, as nanoGPT's
  and GPT-3's recipes use) on windows at seeded random positions (:func:`~gradclip_book.text.window_batches`).

Every run sees ``chars`` characters per step (``chars // seq_len`` sequences), so runs of different sequence
lengths cost and learn alike per step. The validation metric is the mean cross-entropy per character in nats
(``val_loss``; lower is better; ln 2 nats = 1 bit), ``test_loss`` is reported once for chosen settings.

Besides the harness's record (:meth:`gradclip_book.harness.Run.to_json`: losses, pre-clip norms, how often
the method fired), a run stores:

* recurrent models: ``through_time``, the gradient of the last character's loss with respect to the hidden
  state :math:`h_{T-k}`, k steps back, at a few checkpoints of training (:class:`ThroughTime`); and
  ``cliff``, the training loss along the gradient's direction at the step whose gradient norm was the
  largest outlier (:class:`CliffProbe`);
* transformers: ``attention``, the largest attention logit and the output's mean log-partition function at the
  same checkpoints (:class:`AttentionProbe`).

Example:
    >>> from gradclip_book.text_runs import TextConfig, run
    >>> record = run(TextConfig(model="rnn", width=16, steps=5, lr=0.5))
    >>> record["steps_run"], sorted(record["metrics"])
    (5, ['test_loss', 'val_loss'])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from . import harness, text
from .harness.curves import round_float

__all__ = [
    "CHECKPOINTS",
    "LAGS",
    "RNN",
    "TRANSFORMER",
    "AttentionProbe",
    "CarriedState",
    "CliffProbe",
    "TextConfig",
    "ThroughTime",
    "build",
    "largest_outlier",
    "largest_rise",
    "run",
    "train",
]


OPTIMIZERS: dict[str, Callable[[list[nn.Parameter], float], torch.optim.Optimizer]] = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1),
}
"""Optimizer name -> ``builder(parameters, lr)``."""


@dataclass(frozen=True)
class TextConfig:
    """Everything that determines one text run (with the corpus, its numbers exactly).

    Attributes:
        model: ``"rnn"`` (vanilla tanh), ``"lstm"`` or ``"transformer"``.
        seq_len: characters per sequence: the truncation length of backpropagation through time for the
            recurrent models, the context for the transformer.
        chars: characters per step; the batch is ``chars // seq_len`` sequences.
        width: the recurrent state size, or the transformer's width.
        layers, heads: the transformer's blocks and attention heads (ignored by the recurrent models).
        optimizer: ``"sgd"`` (plain SGD, no momentum) or ``"adamw"`` (betas 0.9, 0.95, weight decay 0.1).
        lr: the learning rate.
        method, threshold: a method of :data:`gradclip_book.harness.METHODS` and its knob (``None`` for ``"none"``).
        warmup: linear learning-rate warm-up over this many steps (0: none).
        qk_norm: qk-layernorm in the transformer's attention.
        z_loss: the weight of the auxiliary z-loss (:func:`gradclip_book.text.z_loss`) added to the training
            loss (0: none); the recorded training loss is the cross-entropy alone.
        steps: optimizer steps.
        seed: seeds the initialisation (``torch.manual_seed``) and the batches (the streams' starting offset,
            or the windows' positions).
    """

    model: str = "rnn"
    seq_len: int = 32
    chars: int = 1024
    width: int = 128
    layers: int = 2
    heads: int = 4
    optimizer: str = "sgd"
    lr: float = 1.0
    method: str = "none"
    threshold: float | None = None
    warmup: int = 0
    qk_norm: bool = False
    z_loss: float = 0.0
    steps: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        if self.model not in ("rnn", "lstm", "transformer"):
            raise ValueError(f"model must be 'rnn', 'lstm' or 'transformer', got {self.model!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.method not in harness.METHODS:
            raise ValueError(f"method must be one of {sorted(harness.METHODS)}, got {self.method!r}")
        if (self.method == "none") != (self.threshold is None):
            raise ValueError(f"threshold must be None exactly for method 'none', got method={self.method!r}, "
                             f"threshold={self.threshold!r}")
        if self.seq_len < 1 or self.chars < self.seq_len or self.steps < 1 or not self.lr > 0:
            raise ValueError(f"need seq_len >= 1, chars >= seq_len, steps >= 1 and lr > 0: {self}")
        if self.model != "transformer" and (self.qk_norm or self.z_loss):
            raise ValueError("qk_norm and z_loss apply to the transformer only")

    @property
    def batch(self) -> int:
        """Sequences per step."""
        return self.chars // self.seq_len

    @property
    def recurrent(self) -> bool:
        return self.model != "transformer"


RNN = TextConfig(model="rnn", seq_len=32, width=128, optimizer="sgd", lr=1.0)
"""The recurrent runs' base: a vanilla tanh RNN with 128 units, plain SGD, windows of 32 characters."""

TRANSFORMER = TextConfig(model="transformer", seq_len=64, width=64, layers=2, heads=4, optimizer="adamw", lr=0.01)
"""The transformer runs' base: 2 pre-LN blocks of width 64 with 4 heads, context 64, AdamW."""

CHECKPOINTS = (0, 10, 30, 100, 300)
"""Steps (updates done) at which the probes measure, plus the last step of the run."""

LAGS = (0, 1, 2, 4, 8, 16, 32, 64, 127)
"""How many steps back :class:`ThroughTime` measures the gradient (the probe windows are 128 characters)."""

PROBE = (16, 128)
"""The probes' batch: the first 16 windows of 128 characters of the validation part."""


def build(config: TextConfig) -> nn.Module:
    """The config's model, initialised from ``torch.manual_seed(config.seed)``.

    Example:
        >>> type(build(TextConfig(model="lstm", width=8))).__name__
        'CharRNN'
    """
    vocab, _ = text.encoded()
    torch.manual_seed(config.seed)
    if config.recurrent:
        return text.CharRNN(len(vocab), config.width, config.model)
    return text.CharTransformer(len(vocab), config.width, config.layers, config.heads, config.seq_len,
                                qk_norm=config.qk_norm)


# --- the loss functions ------------------------------------------------------------------------------


class CarriedState:
    """The recurrent models' ``loss_fn``: carries the hidden state from one window to the next, detached.

    ``batch`` is ``(inputs, targets, fresh)`` from :func:`~gradclip_book.text.stream_batches`; a fresh batch
    (the first, and each restart of the streams) starts from a zero state. ``previous`` holds the state
    the current window started from (for :class:`CliffProbe`).
    """

    def __init__(self) -> None:
        self.state = None
        self.previous = None

    def __call__(self, model: text.CharRNN, batch) -> torch.Tensor:
        inputs, targets, fresh = batch
        self.previous = None if fresh else self.state
        logits, state = model(inputs, self.previous)
        self.state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
        return text._lm_loss(logits, targets)


class WindowLoss:
    """The transformer's ``loss_fn``: cross-entropy, plus ``z_weight`` times the z-loss when it is positive
    (the harness records this total as the training loss; validation and test losses are cross-entropy alone).
    """

    def __init__(self, z_weight: float = 0.0) -> None:
        self.z_weight = z_weight

    def __call__(self, model: text.CharTransformer, batch) -> torch.Tensor:
        inputs, targets = batch
        logits = model(inputs)
        loss = text._lm_loss(logits, targets)
        if self.z_weight:
            loss = loss + self.z_weight * text.z_loss(logits)
        return loss


# --- probes (harness hooks) ----------------------------------------------------------------------------


def _probe_batch() -> torch.Tensor:
    count, length = PROBE
    data = text.split()["validation"]
    return data[:count * (length + 1)].view(count, length + 1)


def _checkpoint(index: int, steps: int) -> bool:
    return index in CHECKPOINTS or index == steps - 1


class ThroughTime(harness.Hook):
    r"""The gradient through time: :math:`\lVert\partial \ell_T/\partial h_{T-k}\rVert` for k in :data:`LAGS`.

    :math:`\ell_T` is the cross-entropy of the last character of each probe window (128 characters of
    validation text, from a zero state); the states :math:`h_t` are those of the recurrent layer, unrolled
    step by step with the model's own weights (:meth:`~gradclip_book.text.CharRNN.unrolled_states`), so the
    derivative follows every path through later steps. Each value is the mean over the 16 probe windows of
    the per-window norm. Measured before the update of each step in :data:`CHECKPOINTS` and of the last step
    (so "step 0" is the initialisation); the run's parameter gradients are not touched.

    ``profiles``: ``[[step, [norm for each lag]], ...]``.
    """

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.profiles: list[list] = []

    def after_forward(self, step: harness.Step) -> None:
        if _checkpoint(step.index, self.steps):
            self.profiles.append([step.index, gradient_through_time(step.model, _probe_batch())])


def gradient_through_time(model: text.CharRNN, windows: torch.Tensor, lags: tuple[int, ...] = LAGS) -> list[float]:
    r"""Mean over ``windows`` of :math:`\lVert\partial \ell_T/\partial h_{T-k}\rVert` for each k in ``lags``.

    ``windows`` is ``(n, T + 1)`` ids: inputs are the first T, the last character is the target of
    :math:`\ell_T` (the loss at the last position, per window).
    """
    with torch.enable_grad():
        states = model.unrolled_states(windows[:, :-1])
        logits = model.head(states[-1])
        loss = nn.functional.cross_entropy(logits, windows[:, -1], reduction="sum")  # per-window losses, summed
        grads = torch.autograd.grad(loss, states)
    last = len(states) - 1
    return [float(grads[last - k].norm(dim=1).mean()) for k in lags if k <= last]


class CliffProbe(harness.Hook):
    r"""The loss along the gradient at the most outlying step: where a clipped and an unclipped step land.

    At each step after the first ``warm`` whose raw gradient norm exceeds ``factor`` times the median of the
    norms before it, and exceeds every earlier such ratio, the probe evaluates the training loss of that
    step's batch (from the state the window started in) at :math:`\theta - s\,g/\lVert g\rVert` for
    ``points`` distances s from 0 to the unclipped step's length :math:`\eta\lVert g\rVert` (spaced evenly
    on a logarithmic scale from 1e-3 of it). The model is restored bitwise afterwards.

    ``record``: ``None`` if no step qualified, else ``{"step", "norm", "median", "lr", "distance": [...],
    "loss": [...]}``.
    """

    def __init__(self, loss: CarriedState, factor: float = 10.0, warm: int = 20, points: int = 25) -> None:
        self.loss, self.factor, self.warm, self.points = loss, factor, warm, points
        self.norms: list[float] = []
        self.ratio = factor
        self.record: dict[str, Any] | None = None

    def after_backward(self, step: harness.Step) -> None:
        params = [p for p in step.model.parameters() if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in params])))
        history = self.norms
        self.norms = history + [norm]
        if step.index < self.warm or not math.isfinite(norm):
            return
        median = float(torch.tensor(history).median())
        if not norm > self.ratio * median:
            return
        self.ratio = norm / median
        lr = float(step.optimizer.param_groups[0]["lr"])
        length = lr * norm
        distances = [length * 10 ** (-3 + 3 * i / (self.points - 1)) for i in range(self.points)]
        inputs, targets, _ = step.batch
        saved = [p.detach().clone() for p in params]
        direction = [p.grad.detach() / norm for p in params]
        losses = []
        with torch.no_grad():
            for s in [0.0] + distances:
                for p, w, d in zip(params, saved, direction):
                    p.copy_(w - s * d)
                logits, _ = step.model(inputs, self.loss.previous)
                losses.append(float(text._lm_loss(logits, targets)))
            for p, w in zip(params, saved):
                p.copy_(w)
        self.record = {"step": step.index, "norm": norm, "median": median, "lr": lr,
                       "distance": [0.0] + distances, "loss": losses}


class AttentionProbe(harness.Hook):
    r"""A transformer's logits on the probe batch, at :data:`CHECKPOINTS` and the last step (before that step's update).

    ``values``: ``[[step, largest attention logit, mean log Z], ...]``: the largest attention logit
    :math:`q\cdot k/\sqrt{d_h}` of any block, head and position (what qk-layernorm bounds), and the mean over
    positions of the output's :math:`\log Z = \log\sum_j e^{z_j}` (what the z-loss pulls towards 0).
    """

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.values: list[list] = []

    def after_forward(self, step: harness.Step) -> None:
        if _checkpoint(step.index, self.steps):
            model = step.model
            inputs = _probe_batch()[:, :model.context]
            with torch.no_grad():
                log_z = float(torch.logsumexp(model(inputs), dim=-1).mean())
            self.values.append([step.index, model.max_attention_logit(inputs), log_z])


# --- one run -----------------------------------------------------------------------------------------


def _evaluator(config: TextConfig) -> Callable[[nn.Module], dict[str, float]]:
    parts = text.split()
    if config.recurrent:
        return lambda model: {"val_loss": text.stream_loss(model, parts["validation"]),
                              "test_loss": text.stream_loss(model, parts["test"])}
    return lambda model: {"val_loss": text.window_loss(model, parts["validation"]),
                          "test_loss": text.window_loss(model, parts["test"])}


def _batches(config: TextConfig):
    data = text.split()["train"]
    generator = torch.Generator().manual_seed(config.seed)
    if config.recurrent:
        offset = int(torch.randint(0, config.seq_len, (1,), generator=generator))
        return text.stream_batches(data, config.batch, config.seq_len, offset)
    return text.window_batches(data, config.batch, config.seq_len, generator)


def train(config: TextConfig, hooks: tuple[harness.Hook, ...] = ()) -> tuple[harness.Run, nn.Module, dict[str, Any]]:
    """Train the config's model through :func:`gradclip_book.harness.train`; returns the run, the model and
    the probes' records (``through_time`` and ``cliff``, or ``attention``).

    Example:
        >>> r, model, probes = train(TextConfig(model="transformer", width=16, heads=2, seq_len=16, chars=64,
        ...                                     optimizer="adamw", lr=1e-3, steps=3))
        >>> r.steps_run, sorted(probes)
        (3, ['attention'])
    """
    model = build(config)
    optimizer = OPTIMIZERS[config.optimizer](list(model.parameters()), config.lr)
    if config.recurrent:
        loss_fn = CarriedState()
        probes = {"through_time": ThroughTime(config.steps), "cliff": CliffProbe(loss_fn)}
    else:
        loss_fn = WindowLoss(config.z_loss)
        probes = {"attention": AttentionProbe(config.steps)}
    result = harness.train(model, optimizer, _batches(config), config.steps, loss_fn=loss_fn,
                           method=config.method, threshold=config.threshold, warmup=config.warmup,
                           hooks=(*probes.values(), *hooks), evaluate=_evaluator(config))
    records = {"through_time": probes["through_time"].profiles, "cliff": probes["cliff"].record} \
        if config.recurrent else {"attention": probes["attention"].values}
    return result, model, records


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round_float(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def largest_rise(losses: list[float], window: int = 10, start: int = 50) -> dict[str, Any] | None:
    r"""The largest rise of the training loss: a loss spike, measured on means over ``window`` steps.

    With :math:`m_t` the mean loss of steps t..t+window-1, the rise at t is :math:`m_t - \min_{s \le t - window}
    m_s` (against the best earlier mean that does not overlap it); returns the largest rise over
    ``t >= start`` as ``{"step": t, "rise": nats}``, or ``None`` when the run is too short. In a run that
    keeps learning the rise is at most the noise of a ``window``-step mean; a spike lifts the loss above where
    it already was for several steps.

    Example:
        >>> largest_rise([3.0] * 60 + [2.0] * 10 + [2.9] * 10 + [2.0] * 20, window=10, start=50)
        {'step': 70, 'rise': 0.9}
    """
    values = torch.tensor(losses, dtype=torch.float64)
    if len(values) < start + window:
        return None
    means = values.unfold(0, window, 1).mean(dim=1)
    best_step, best = None, -math.inf
    for t in range(start, len(means)):
        rise = float(means[t] - means[:t - window + 1].min())
        if rise > best:
            best_step, best = t, rise
    return {"step": best_step, "rise": round(best, 6)}


def largest_outlier(norms: list[float], start: int = 20) -> dict[str, Any] | None:
    """The step (from ``start`` on) whose gradient norm is the largest multiple of the median of the norms before it:
    ``{"step", "norm", "median"}``, or ``None`` for a run shorter than ``start + 1`` steps.

    Example:
        >>> largest_outlier([1.0] * 30 + [8.0] + [1.0] * 5)
        {'step': 30, 'norm': 8.0, 'median': 1.0}
    """
    values = torch.tensor(norms, dtype=torch.float64)
    best = None
    for t in range(start, len(values)):
        median = float(values[:t].nanmedian())
        if math.isfinite(float(values[t])) and (best is None or values[t] / median > best[1] / best[2]):
            best = (t, float(values[t]), median)
    return None if best is None else {"step": best[0], "norm": best[1], "median": best[2]}


def run(config: TextConfig) -> dict[str, Any]:
    """One run as a stored record: the harness's record, the probes, the largest loss rise
    (:func:`largest_rise`) and gradient-norm outlier (:func:`largest_outlier`), at 4 significant digits, and the
    corpus's fingerprint (:func:`gradclip_book.text.corpus_fingerprint`)."""
    result, _, probes = train(config)
    extra = {**probes, "rise": largest_rise(result.loss[:result.steps_run]),
             "outlier": largest_outlier(result.grad_norm)}
    return {**result.to_json(), **_rounded(extra), "corpus": text.corpus_fingerprint()}
