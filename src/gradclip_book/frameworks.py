r"""Clipping with gradclip inside PyTorch Lightning and Hugging Face Accelerate (chapter 3's frameworks section).

Each piece here is short enough to copy into your own code. All of them train
the digits network of chapter 4 (:func:`gradclip_book.classification.build_model`,
a ReLU MLP with He initialisation, on :func:`gradclip_book.data.digits_split`'s
standardised training images) with SGD (momentum 0.9), so that a run in either
framework can be compared step by step with a plain PyTorch loop.

Tested with lightning 2.6.6 and accelerate 1.15.0 beside torch 2.13.0 (CPU);
both installed from the package registry next to the pinned torch without
replacing it.

**Lightning** (automatic optimization). Lightning does not call
``backward()`` before the step: it hands the optimizer a closure,
``optimizer.step(closure)``, and the optimizer runs it inside its step (under
fp16 AMP the precision plugin runs the closure itself, then calls
``scaler.step(optimizer)``). In lightning 2.6.6
(``plugins/precision/precision.py`` and ``amp.py``) one step is:

1. the closure: ``training_step``, ``zero_grad``, ``backward``;
2. with fp16 AMP only: ``scaler.unscale_(optimizer)``;
3. every callback's ``on_before_optimizer_step``, then the module's;
4. the module's ``configure_gradient_clipping(optimizer, gradient_clip_val,
   gradient_clip_algorithm)``, called on every step with the Trainer's values
   (``None`` when the Trainer does not clip); the default calls
   ``torch.nn.utils.clip_grad_norm_`` and discards the norm it returns;
5. the update (``scaler.step`` under fp16 AMP).

So gradclip goes into step 4 (:class:`GradclipModule`) or, for a stateful
clipper, into step 3 (:class:`ClipperCallback`): both see the gradients of
this step's backward, unscaled, before the update. :class:`NormRecorder`
reads the norm there too, and again after the update, which is how the
pre- and post-clip norms of any run are recorded here.

**Accelerate.** The loop is yours (:func:`run_accelerate`)::

    accelerator.backward(loss)
    if accelerator.sync_gradients:         # skip micro-batches that only accumulate
        accelerator.unscale_gradients()    # fp16: divide the gradients by the loss scale, once per step
        gradclip.clip_grad_norm_(model.parameters(), max_norm)   # or clipper(model.parameters())
    optimizer.step()

``unscale_gradients`` comes first because under fp16 mixed precision the
gradients are still multiplied by the loss scale (e.g. 65536): clipping them
then compares ``max_norm`` with ``scale x norm`` and clips far too hard, and a
stateful clipper would record scaled norms. Call it once per step (torch's
``GradScaler.unscale_`` raises on a second call), so do not combine it with
``accelerator.clip_grad_norm_``, which unscales itself. Without fp16 (CPU,
bf16, fp32) it does nothing. Under DeepSpeed the engine clips inside its own
step, on gradients it partitions itself (``gradient_clipping`` in its config,
or ``DeepSpeedPlugin(gradient_clipping=...)``; accelerate 1.15 fills an
``"auto"`` value with 1.0), and ``accelerator.clip_grad_norm_`` only returns
the engine's norm; under FSDP1
the norm must be reduced over the shards by ``model.clip_grad_norm_``. For
those two, use the framework's clipping (:func:`check_plain_gradients` raises).

Example:
    >>> from gradclip_book.frameworks import run_lightning
    >>> record = run_lightning("gradclip", steps=3, max_norm=1.0)
    >>> len(record.loss), all(post <= 1.0 + 1e-6 for post in record.post_norm)
    (3, True)
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import lightning.pytorch as pl
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradclip

from . import data
from .classification import RunConfig, build_model

__all__ = [
    "ACCELERATE_METHODS",
    "LIGHTNING_METHODS",
    "AttachedClipperModule",
    "ClipperCallback",
    "DigitsModule",
    "FrameworkRecord",
    "GradclipModule",
    "NormRecorder",
    "check_plain_gradients",
    "digits_loader",
    "fit_recorded",
    "make_model",
    "make_optimizer",
    "quiet_trainer",
    "run_accelerate",
    "run_lightning",
]

LIGHTNING_METHODS = ("none", "lightning", "gradclip", "callback", "attach")
""":func:`run_lightning`'s ways to clip (see there)."""

ACCELERATE_METHODS = ("none", "accelerate", "gradclip", "clipper")
""":func:`run_accelerate`'s ways to clip (see there)."""


# --- the task both frameworks train ----------------------------------------------------------------


def digits_loader(batch: int = 64, split_seed: int = 0) -> DataLoader:
    """The standardised training digits in a fixed order (no shuffling), ``batch`` images per step, last partial batch dropped.

    A fixed order makes a run in either framework comparable with a plain loop, batch for batch.
    """
    x, y = data.digits_split(seed=split_seed)["train"]
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False, drop_last=True)


def make_model(depth: int = 4, width: int = 32, seed: int = 0) -> nn.Module:
    """Chapter 4's ReLU MLP (He initialisation from ``torch.manual_seed(seed)``): input ``(n, 64)``, logits ``(n, 10)``."""
    return build_model(RunConfig(depth=depth, width=width, seed=seed))


def make_optimizer(parameters, lr: float = 0.1) -> torch.optim.Optimizer:
    """SGD with momentum 0.9, as in chapter 4. It leaves ``.grad`` untouched, so the clipped gradient can be read after the step."""
    return torch.optim.SGD(parameters, lr=lr, momentum=0.9)


def _parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    # What Lightning clips: the optimizer's parameters (all of them, over its param groups).
    return [p for group in optimizer.param_groups for p in group["params"]]


def _total_norm(parameters) -> float:
    """The L2 norm of all gradients, measured by torch (not by gradclip), in float64."""
    grads = [p.grad.detach().double() for p in parameters if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads))


def _flat_weights(module: nn.Module) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(module.parameters()).detach().clone()


# --- Lightning -------------------------------------------------------------------------------------


class DigitsModule(pl.LightningModule):
    """The digits network as a LightningModule, with Lightning's own clipping (``Trainer(gradient_clip_val=...)``).

    Args:
        depth, width, seed: the network (:func:`make_model`).
        lr: SGD's learning rate (:func:`make_optimizer`).
    """

    def __init__(self, depth: int = 4, width: int = 32, lr: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        self.net = make_model(depth, width, seed)
        self.lr = lr

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.parameters(), self.lr)


class GradclipModule(DigitsModule):
    """:class:`DigitsModule` whose ``Trainer(gradient_clip_val=c)`` clips with :func:`gradclip.clip_grad_norm_`.

    Lightning calls ``configure_gradient_clipping`` on every step after the
    closure's ``backward()`` (and, under fp16 AMP, after unscaling) and before
    the update, with the Trainer's ``gradient_clip_val`` and
    ``gradient_clip_algorithm``. Lightning's default discards the pre-clip
    norm; here it is logged (``self.log``) and kept in :attr:`clip_norms`.

    Attributes:
        clip_norms: gradclip's pre-clip norms (0-dim tensors), one per step.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.clip_norms: list[torch.Tensor] = []

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        if not gradient_clip_val:  # Trainer(gradient_clip_val=None or 0): no clipping, as in Lightning
            return
        parameters = _parameters(optimizer)
        if gradient_clip_algorithm == "value":  # the Trainer's other algorithm, also from gradclip
            gradclip.clip_grad_value_(parameters, gradient_clip_val)
            return
        norm = gradclip.clip_grad_norm_(parameters, gradient_clip_val)
        self.log("grad_norm_before_clip", norm)  # the number Lightning's default clipping throws away
        self.clip_norms.append(norm)


class ClipperCallback(pl.Callback):
    """Runs a stateful gradclip clipper (``ZClip``, ``AutoClip``, ``SpikeGuard``) once per optimizer step.

    It runs in ``on_before_optimizer_step``: after the closure's ``backward()``
    (and fp16 unscaling), before ``configure_gradient_clipping`` and the
    update, once per optimizer step also under gradient accumulation. The
    clipper's state is saved in Lightning checkpoints (``state_dict``) and
    restored on resume. Under fp16 AMP, build the clipper with
    ``scaler=trainer.precision_plugin.scaler`` if you want it to check that
    the gradients were unscaled.

    Args:
        clipper: the clipper, e.g. ``gradclip.ZClip()``; not attached to an optimizer.
    """

    def __init__(self, clipper: gradclip.Clipper) -> None:
        self.clipper = clipper

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        result = self.clipper(_parameters(optimizer), optimizer)
        pl_module.log("clip_threshold", result.threshold)

    def state_dict(self) -> dict:
        return self.clipper.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.clipper.load_state_dict(state_dict)


class AttachedClipperModule(DigitsModule):
    """The other way to run a stateful clipper in Lightning: ``clipper.attach(optimizer)`` in ``configure_optimizers``.

    The attached clipper's step pre-hook wraps Lightning's closure and clips
    after it has returned: after ``backward()``, after the
    ``on_before_optimizer_step`` hooks and after ``configure_gradient_clipping``
    (so with ``Trainer(gradient_clip_val=c)`` too, it sees the already clipped
    norm; :class:`ClipperCallback` sees it before), and before the update.
    """

    def __init__(self, clipper: gradclip.Clipper, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.clipper = clipper

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = super().configure_optimizers()
        self.clipper.attach(optimizer)
        return optimizer


class NormRecorder(pl.Callback):
    """Records each step's gradient norm before clipping, after clipping, the loss and the weights.

    Put it first in ``callbacks``: callbacks' ``on_before_optimizer_step`` run
    in list order, before the module's clipping. The post-clip norm is read in
    ``on_train_batch_end``, after the update, from the ``.grad`` the optimizer
    used (SGD and Adam leave it untouched). Norms are measured with torch, in
    float64, independently of the clipping code.

    Attributes:
        pre_norm, post_norm, loss, step_seconds: floats, one per step.
        weights: the flattened parameters after each step.
    """

    def __init__(self) -> None:
        self.pre_norm: list[float] = []
        self.post_norm: list[float] = []
        self.loss: list[float] = []
        self.weights: list[torch.Tensor] = []
        self.step_seconds: list[float] = []
        self._started = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._started = time.perf_counter()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.pre_norm.append(_total_norm(_parameters(optimizer)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.step_seconds.append(time.perf_counter() - self._started)
        self.post_norm.append(_total_norm(pl_module.parameters()))
        self.loss.append(float(outputs["loss"]))
        self.weights.append(_flat_weights(pl_module))


# --- what a run did ----------------------------------------------------------------------------------


@dataclass
class FrameworkRecord:
    """One short training run in a framework, step by step.

    Attributes:
        framework: ``"lightning"`` or ``"accelerate"``.
        method: how it clipped (:data:`LIGHTNING_METHODS`, :data:`ACCELERATE_METHODS`).
        loss: the minibatch loss of each step (before its update).
        pre_norm: the global L2 gradient norm before clipping, per step (measured by torch, float64).
        post_norm: the same after clipping, i.e. of the gradient the update used.
        weights: the flattened parameters after each step, shape ``(steps, n_parameters)``.
        step_seconds: wall time of each step, forward to update (recording included).
        seconds: the whole run, setup (framework, data, model) included.
    """

    framework: str
    method: str
    loss: list[float]
    pre_norm: list[float]
    post_norm: list[float]
    weights: torch.Tensor
    step_seconds: list[float] = field(repr=False)
    seconds: float = 0.0

    @property
    def median_step_seconds(self) -> float:
        return statistics.median(self.step_seconds)

    @property
    def clipped(self) -> list[bool]:
        """Whether the gradient was scaled down at each step (post-clip norm below the pre-clip one by more than rounding)."""
        return [post < pre * (1 - 1e-5) for pre, post in zip(self.pre_norm, self.post_norm)]


@contextlib.contextmanager
def _quiet_single_thread() -> Iterator[None]:
    """One CPU thread (a fixed reduction order, so runs are comparable) and no framework chatter; both restored."""
    threads = torch.get_num_threads()
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "accelerate")]
    levels = [logger.level for logger in loggers]
    torch.set_num_threads(1)
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            # "The 'train_dataloader' does not have many workers": in-memory tensors need none
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            # lightning 2.6.6 still calls a torch pytree check that torch 2.13 deprecates
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            yield
    finally:
        torch.set_num_threads(threads)
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _check(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


# --- running Lightning -------------------------------------------------------------------------------


def quiet_trainer(root: str, steps: int, callbacks: list[pl.Callback] | None = None,
                  gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None) -> pl.Trainer:
    """A CPU ``Trainer`` that runs ``steps`` optimizer steps offline and writes nothing under ``root`` but scratch.

    No logger, no checkpoints, no progress bar or model summary, no sanity validation.
    """
    return pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, gradient_clip_val=gradient_clip_val,
        gradient_clip_algorithm=gradient_clip_algorithm, callbacks=callbacks, default_root_dir=root, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )


def fit_recorded(module: pl.LightningModule, steps: int, callbacks: list[pl.Callback] | None = None,
                 gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None,
                 method: str = "custom") -> FrameworkRecord:
    """Fit ``module`` on :func:`digits_loader` for ``steps`` steps (:func:`quiet_trainer`) and record every step.

    A :class:`NormRecorder` is put before ``callbacks``; a temporary directory,
    removed afterwards, is the Trainer's root. Runs on one CPU thread.
    """
    start = time.perf_counter()
    recorder = NormRecorder()
    with _quiet_single_thread(), tempfile.TemporaryDirectory() as root:
        trainer = quiet_trainer(root, steps, [recorder, *(callbacks or [])], gradient_clip_val, gradient_clip_algorithm)
        trainer.fit(module, train_dataloaders=digits_loader())
    return FrameworkRecord("lightning", method, recorder.loss, recorder.pre_norm, recorder.post_norm,
                           torch.stack(recorder.weights), recorder.step_seconds, time.perf_counter() - start)


def run_lightning(method: str = "gradclip", steps: int = 10, max_norm: float = 1.0,
                  clipper: gradclip.Clipper | None = None, depth: int = 4, width: int = 32, lr: float = 0.1,
                  seed: int = 0) -> FrameworkRecord:
    """Train ``steps`` steps with a Lightning ``Trainer`` on the CPU and record them (:func:`fit_recorded`).

    Args:
        method: ``"none"``; ``"lightning"``: :class:`DigitsModule` with
            ``Trainer(gradient_clip_val=max_norm)`` (torch's clipping);
            ``"gradclip"``: :class:`GradclipModule` with the same Trainer;
            ``"callback"``: ``clipper`` in a :class:`ClipperCallback`;
            ``"attach"``: ``clipper`` attached to the optimizer (:class:`AttachedClipperModule`).
        steps: optimizer steps, at most one epoch (16 batches of 64).
        max_norm: the Trainer's ``gradient_clip_val`` (``"lightning"``, ``"gradclip"``).
        clipper: a fresh gradclip clipper (``"callback"``, ``"attach"``).
        depth, width, lr, seed: the network and its optimizer.

    Returns:
        A :class:`FrameworkRecord`.

    Raises:
        ValueError: ``method`` is not one of those above, or ``clipper`` is missing for ``"callback"``/``"attach"``.

    Example:
        >>> record = run_lightning("lightning", steps=2, max_norm=0.5)
        >>> [round(post, 6) for post in record.post_norm]
        [0.5, 0.5]
    """
    _check("method", method, LIGHTNING_METHODS)
    if method in ("callback", "attach") and clipper is None:
        raise ValueError(f"method {method!r} needs a clipper, e.g. clipper=gradclip.ZClip()")
    clip_val = max_norm if method in ("lightning", "gradclip") else None
    callbacks: list[pl.Callback] = [ClipperCallback(clipper)] if method == "callback" else []
    if method == "gradclip":
        module = GradclipModule(depth, width, lr, seed)
    elif method == "attach":
        module = AttachedClipperModule(clipper, depth, width, lr, seed)
    else:
        module = DigitsModule(depth, width, lr, seed)
    return fit_recorded(module, steps, callbacks, clip_val, method=method)


# --- Accelerate ----------------------------------------------------------------------------------------


def check_plain_gradients(accelerator: Accelerator) -> None:
    """Raise where gradclip cannot clip Accelerate's gradients itself: DeepSpeed and FSDP1.

    DeepSpeed's engine clips inside its own step (``gradient_clipping`` in its
    config), on gradients it has partitioned; FSDP1 keeps flattened shards whose
    norm ``model.clip_grad_norm_`` reduces across ranks. Use
    ``accelerator.clip_grad_norm_`` there. DDP, FSDP2 (DTensor gradients, which
    gradclip reduces itself) and single-process runs pass.

    Raises:
        RuntimeError: the accelerator uses DeepSpeed or FSDP1.
    """
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED or (kind == DistributedType.FSDP and not accelerator.is_fsdp2):
        raise RuntimeError(
            f"Accelerate runs {kind.value}: its gradients are sharded in a way gradclip does not see. "
            "Let the framework clip (accelerator.clip_grad_norm_, or DeepSpeed's gradient_clipping setting).")


def run_accelerate(method: str = "gradclip", steps: int = 10, max_norm: float = 1.0,
                   clipper: gradclip.Clipper | None = None, depth: int = 4, width: int = 32, lr: float = 0.1,
                   seed: int = 0) -> FrameworkRecord:
    """Train ``steps`` steps in an Accelerate loop on the CPU and record them.

    Args:
        method: ``"none"``; ``"accelerate"``: ``accelerator.clip_grad_norm_(..., max_norm)``
            (torch's clipping, after unscaling); ``"gradclip"``: ``unscale_gradients()``,
            then :func:`gradclip.clip_grad_norm_`; ``"clipper"``: ``unscale_gradients()``,
            then ``clipper(model.parameters())``.
        steps: optimizer steps, at most one epoch (16 batches of 64).
        max_norm: the threshold of ``"accelerate"`` and ``"gradclip"``.
        clipper: a fresh gradclip clipper (``"clipper"``).
        depth, width, lr, seed: the network and its optimizer.

    Returns:
        A :class:`FrameworkRecord`.

    Raises:
        ValueError: ``method`` is not one of those above, or ``clipper`` is missing for ``"clipper"``.

    Example:
        >>> record = run_accelerate("gradclip", steps=2, max_norm=0.5)
        >>> [round(post, 6) for post in record.post_norm]
        [0.5, 0.5]
    """
    _check("method", method, ACCELERATE_METHODS)
    if method == "clipper" and clipper is None:
        raise ValueError("method 'clipper' needs a clipper, e.g. clipper=gradclip.ZClip()")
    start = time.perf_counter()
    loss_seen, pre_norms, post_norms, weights, step_seconds = [], [], [], [], []
    with _quiet_single_thread():
        accelerator = Accelerator(cpu=True)
        model = make_model(depth, width, seed)
        optimizer = make_optimizer(model.parameters(), lr)
        model, optimizer, loader = accelerator.prepare(model, optimizer, digits_loader())
        if method in ("gradclip", "clipper"):
            check_plain_gradients(accelerator)
        for _, (x, y) in zip(range(steps), loader):
            started = time.perf_counter()
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            accelerator.backward(loss)
            pre_norms.append(_total_norm(model.parameters()))  # the record's own measurement (torch)
            if accelerator.sync_gradients:  # False on micro-batches that only accumulate gradients
                if method == "accelerate":
                    accelerator.clip_grad_norm_(model.parameters(), max_norm)  # unscales, then torch clips
                elif method in ("gradclip", "clipper"):
                    accelerator.unscale_gradients()  # fp16: remove the loss scale first (a no-op otherwise)
                    if method == "gradclip":
                        gradclip.clip_grad_norm_(model.parameters(), max_norm)
                    else:
                        clipper(model.parameters(), optimizer.optimizer)
            optimizer.step()
            step_seconds.append(time.perf_counter() - started)
            loss_seen.append(float(loss.detach()))
            post_norms.append(_total_norm(model.parameters()))
            weights.append(_flat_weights(model))
    return FrameworkRecord("accelerate", method, loss_seen, pre_norms, post_norms, torch.stack(weights),
                           step_seconds, time.perf_counter() - start)
