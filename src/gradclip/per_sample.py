"""Per-sample gradient clipping for differentially private SGD, with ``torch.func`` or ghost norms."""

from __future__ import annotations

import contextvars
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from . import _ghost, _validate, _vmappable
from ._example_norms import ClipRule, ExampleNorms, Factors
from .flat import accumulate_
from ._norms import accumulation_dtype

__all__ = ["PerSampleClipResult", "per_sample_clip_grad_", "per_sample_clipped_grad", "per_sample_grads"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Method = Literal["auto", "ghost", "vmap"]
_METHODS = ("auto", "ghost", "vmap")
Reduction = Literal["mean", "sum"]
_REDUCTIONS = ("mean", "sum")

# While per_sample_clipped_grad calls per_sample_grads: a set to fill with the names of the
# parameters that one example's loss reaches, read from its autograd graph inside ``grad``.
_REACHED: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar("gradclip_per_sample_reached", default=None)


class PerSampleClipResult(NamedTuple):
    """What :func:`per_sample_clipped_grad` computed.

    Attributes:
        grads: parameter name to the clipped (and noised) gradient, averaged or summed as
            ``loss_reduction`` says, for each trainable parameter the loss reaches; a
            parameter it does not reach has no entry (see :func:`per_sample_clipped_grad`).
        norms: each example's gradient norm before clipping, a 1-D tensor of length B (0 for an empty batch);
            with ``clipping="per_layer"``, (B, K): each example's norm of each parameter of ``grads``, in its order.
        scales: each example's factor, of the same shape: :math:`\\min(1, C/(\\|g_i\\| + 10^{-6}))`, or
            :math:`C/(\\|g_i\\| + \\gamma)` with ``clipping_fn="automatic"``.

    References:
        * Abadi et al. (2016), "Deep Learning with Differential Privacy", `arXiv:1607.00133 <https://arxiv.org/abs/1607.00133>`__.
        * Bu, Wang, Zha and Karypis (2023), "Automatic Clipping", `arXiv:2206.07136 <https://arxiv.org/abs/2206.07136>`__.
    """

    grads: dict[str, torch.Tensor]
    norms: torch.Tensor
    scales: torch.Tensor


def _check_batch(inputs: torch.Tensor, targets: torch.Tensor) -> int:
    for name, value in (("inputs", inputs), ("targets", targets)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.ndim == 0:
            raise ValueError(f"{name} must have a batch dimension (dim 0), got a 0-dim tensor")
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"inputs and targets must have the same batch size (dim 0), got {inputs.shape[0]} and {targets.shape[0]}"
        )
    return inputs.shape[0]


def _refuse_batch_norm(model: nn.Module) -> None:
    for name, module in model.named_modules():
        problem = _ghost.batch_norm_problem(name or type(module).__name__, module)
        if problem is not None:
            raise ValueError(problem)


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    _validate.check_module("model", model)
    for name, p in model.named_parameters():
        if isinstance(p, nn.parameter.UninitializedParameter) or p.is_meta:
            raise ValueError(f"parameter {name!r} has no data (meta or uninitialised); run a forward pass first")
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("model has no parameters with requires_grad=True")
    return params


def per_sample_grads(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    r"""Each example's gradient of its own loss, for every trainable parameter, with ``vmap(grad(...))``.

    .. math::

        g_i = \nabla_\theta\, \ell\big(f_\theta(x_i), y_i\big), \qquad i = 1..B

    The per-example gradients that DP-SGD clips (Abadi et al. 2016,
    `arXiv:1607.00133 <https://arxiv.org/abs/1607.00133>`__), vectorised with
    ``torch.func``. The model is called on one example at a time (``x_i.unsqueeze(0)``), so
    ``loss_fn(output, target)`` receives a batch of one and must return a
    scalar. Modules that mix examples (BatchNorm in training mode) have no
    per-example gradient and raise: use GroupNorm or LayerNorm, as DP-SGD
    requires anyway, or BatchNorm in eval mode. Random modules (dropout) raise
    under ``vmap``'s default ``randomness="error"``.

    Recurrent layers: torch's fused ``nn.RNN``, ``nn.LSTM`` and ``nn.GRU``
    kernels have no ``vmap`` rule, so while this runs they are computed
    unrolled over time, with torch's equations (every option: layers,
    ``bidirectional``, ``batch_first``, ``proj_size``, an initial state; each
    recurrent weight's gradient formed as one product over all steps). A
    ``PackedSequence`` cannot be built for one example under ``vmap`` (its
    lengths are data): run the layer on the padded batch instead (the error
    says how). Embeddings: a trainable ``nn.Embedding``/``nn.EmbeddingBag``
    with ``sparse=True`` raises a ``TypeError`` (per-example gradients are
    dense); one with ``max_norm`` first renormalises the rows the batch looks
    up, in place, by one ordinary forward pass without gradients (as the
    training forward pass, or a loop over the examples, would), and the
    per-example pass then leaves the weights alone. A trainable parameter the
    loss does not reach gets zeros (``torch.func.grad`` cannot tell it apart);
    :func:`per_sample_clipped_grad` leaves it out. A batch of 0 examples gives
    tensors of shape ``(0, *param.shape)``.

    Args:
        model: the network; its parameters with ``requires_grad`` are differentiated.
        loss_fn: ``loss_fn(output, target) -> scalar``, e.g. ``torch.nn.functional.cross_entropy``.
        inputs: the batch, examples along dim 0.
        targets: the targets, examples along dim 0.
        chunk_size: examples per vectorised chunk (less memory), or ``None`` for all at once.

    Returns:
        Parameter name to a tensor of shape ``(B, *param.shape)``.

    Raises:
        TypeError: ``model`` is not a module, ``loss_fn`` is not callable, or ``inputs``/``targets`` are not tensors; a trainable embedding has ``sparse=True``; a recurrent layer gets a ``PackedSequence``.
        ValueError: ``inputs`` and ``targets`` differ in batch size or have no batch dimension, ``chunk_size`` is not None or an int >= 1, the model has no trainable or initialised parameters, or it holds a BatchNorm in training mode (or without running statistics), or ``loss_fn`` does not return a 0-dim loss for one example (``reduction='none'``).
        RuntimeError: a module draws random numbers (dropout in training mode); the message says what to do.

    References:
        * Abadi et al. (2016), "Deep Learning with Differential Privacy", `arXiv:1607.00133 <https://arxiv.org/abs/1607.00133>`__.

    Example:
        >>> import torch, gradclip
        >>> model = torch.nn.Linear(3, 1, bias=False)
        >>> x, y = torch.ones(4, 3), torch.zeros(4, 1)
        >>> grads = gradclip.per_sample_grads(model, torch.nn.functional.mse_loss, x, y)
        >>> grads["weight"].shape
        torch.Size([4, 1, 3])
    """
    _validate.check_callable("loss_fn", loss_fn, "loss_fn(output, target) -> scalar loss")
    _validate.check_optional_int("chunk_size", chunk_size, 1)
    batch = _check_batch(inputs, targets)
    params = _trainable(model)
    _refuse_batch_norm(model)
    frozen = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    reached = _REACHED.get()

    def loss_of_one(trainable: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        output = functional_call(model, {**frozen, **buffers, **trainable}, (x.unsqueeze(0),))
        loss = loss_fn(output, y.unsqueeze(0))
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn must return a scalar (0-dim) loss for a batch of one example, got {shape}: use a "
                "mean or sum reduction (F.cross_entropy, nn.CrossEntropyLoss()), not reduction='none'"
            )
        if reached is not None and not reached:
            reached.update(_leaves_reached(loss, trainable))
        return loss

    _vmappable.refuse_sparse_embeddings(model)
    if batch == 0:  # (vmap over 0 examples cannot infer some shapes, e.g. in Flatten)
        return {name: p.new_zeros((0, *p.shape)) for name, p in params.items()}
    try:
        with _vmappable.prepared(model, inputs):  # recurrent layers unrolled, embeddings' max_norm applied first
            return vmap(grad(loss_of_one), in_dims=(None, 0, 0), chunk_size=chunk_size)(params, inputs, targets)
    except RuntimeError as error:
        packed = _vmappable.packed_sequence_error(model, inputs)
        if packed is not None:
            raise packed from error
        if "randomness" not in str(error):
            raise
        raise RuntimeError(
            "a module draws random numbers (dropout in training mode) inside the per-example computation, "
            "which torch.func.vmap refuses: call model.eval() for the per-sample step or remove the dropout; "
            f"models whose trainable layers are all {_ghost.LAYER_NAMES} layers take method='ghost', which runs "
            f"one ordinary forward pass and keeps the masks it draws. ({error})"
        ) from error


def _leaves_reached(loss: torch.Tensor, leaves: dict[str, torch.Tensor]) -> set[str]:
    """The names of ``leaves`` that ``loss``'s autograd graph reaches (a walk of the graph, no backward pass)."""
    reached = _ghost._parameter_uses(loss)  # the same walk, counting each leaf's uses
    return {name for name, t in leaves.items() if id(t) in reached}


def _reached(model: nn.Module, loss_fn: LossFn, params: dict[str, torch.Tensor], inputs: torch.Tensor,
             targets: torch.Tensor) -> set[str]:
    """The names of the trainable parameters whose gradient autograd reaches from one example's loss.

    Structural, not by value: a parameter used with a zero gradient is reached. The vmap path's
    model has no data-dependent control flow (vmap refuses it), so one example (zeros for an
    empty batch) gives the structure of every example's graph.
    """
    if inputs.shape[0]:
        x, y = inputs[:1], targets[:1]
    else:
        x, y = inputs.new_zeros((1, *inputs.shape[1:])), targets.new_zeros((1, *targets.shape[1:]))
    leaves = {name: p.detach().requires_grad_() for name, p in params.items()}
    frozen = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    with torch.enable_grad():
        loss = loss_fn(functional_call(model, {**frozen, **buffers, **leaves}, (x,)), y)
    if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
        return set()
    found = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {name for name, g in zip(leaves, found) if g is not None}


def _check_reduction(batch: int, expected_batch_size: int | None, loss_reduction: str) -> int | None:
    """The divisor of the clipped, noised sum: ``None`` for a sum, else ``expected_batch_size`` or B (never 0)."""
    _validate.check_choice("loss_reduction", loss_reduction, _REDUCTIONS)
    expected_batch_size = _validate.check_optional_int("expected_batch_size", expected_batch_size, 1)
    if loss_reduction == "sum":
        return None
    if expected_batch_size is not None:
        return expected_batch_size
    if batch == 0:
        raise ValueError("loss_reduction='mean' without expected_batch_size divides by the batch size, so the batch "
                         "must hold at least one example, got a batch of 0 (Poisson sampling draws empty batches): "
                         "pass expected_batch_size (the divisor Opacus uses: sample rate x dataset size) or "
                         "loss_reduction='sum'")
    return batch




# --- The clipping: thresholds, rule, and each example's norms by group ------------------------------------------

Clipping = Literal["flat", "per_layer"]
_CLIPPINGS = ("flat", "per_layer")
ClippingFn = Literal["abadi", "automatic"]
_CLIPPING_FNS = ("abadi", "automatic")


def _check_dp_args(noise_multiplier: float, generator: torch.Generator | None) -> None:
    _validate.check_real("noise_multiplier", noise_multiplier, 0.0, math.inf, high_open=True)
    _validate.check_generator(generator)


class _Clipping:
    """The clipping thresholds and rule, and each example's norms: one group of every parameter
    (``clipping="flat"``) or one group per parameter (``"per_layer"``).

    Arguments are checked on construction, before anything runs.
    """

    def __init__(self, model: nn.Module, max_norm: Any, noise_multiplier: float, clipping: str, clipping_fn: str,
                 gamma: float) -> None:
        _validate.check_choice("clipping", clipping, _CLIPPINGS)
        _validate.check_choice("clipping_fn", clipping_fn, _CLIPPING_FNS)
        _validate.check_real("gamma", gamma, 0.0, math.inf, low_open=True, high_open=True)
        self.rule = ClipRule(automatic=clipping_fn == "automatic", gamma=float(gamma))
        self.per_layer = clipping == "per_layer"
        if self.per_layer:
            self.thresholds = self._per_layer_thresholds(model, max_norm)
            for name, value in self.thresholds.items():
                self._check_finite(f"max_norm[{name!r}]", value, noise_multiplier)
            # Opacus's DPPerLayerOptimizer: the noise std is noise_multiplier times the 2-norm of all thresholds
            self.noise_std = noise_multiplier * math.sqrt(sum(c * c for c in self.thresholds.values()))
        else:
            if isinstance(max_norm, (Sequence, Mapping)) and not isinstance(max_norm, str):
                raise TypeError(f"max_norm is a {type(max_norm).__name__}: one threshold per parameter is "
                                "clipping='per_layer'; with clipping='flat' (the default) max_norm is one number")
            self.max_norm = float(_validate.check_threshold("max_norm", max_norm, tensor_ok=False))
            self._check_finite("max_norm", self.max_norm, noise_multiplier)
            self.noise_std = noise_multiplier * self.max_norm if noise_multiplier > 0 else 0.0
        self.noise_multiplier = noise_multiplier
        self._norms: dict[str | None, ExampleNorms] = {}
        self._factors: dict[str | None, Factors] = {}

    def _check_finite(self, name: str, value: float, noise_multiplier: float) -> None:
        if math.isinf(value) and noise_multiplier > 0:
            raise ValueError(f"{name} must be finite when noise_multiplier > 0 (the noise std is noise_multiplier "
                             "times the threshold)")
        if math.isinf(value) and self.rule.automatic:
            raise ValueError(f"{name} must be finite with clipping_fn='automatic', whose factor is "
                             "max_norm / (norm + gamma)")

    @staticmethod
    def _per_layer_thresholds(model: nn.Module, max_norm: Any) -> dict[str, float]:
        names = list(_trainable(model))
        hint = (f"with clipping='per_layer', max_norm holds one threshold per trainable parameter, in the order of "
                f"model.named_parameters() (as Opacus's max_grad_norm list): a list of {len(names)} numbers, or a "
                f"dict from each name ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}) to its threshold")
        if isinstance(max_norm, Mapping):
            if set(max_norm) != set(names):
                missing, extra = sorted(set(names) - set(max_norm)), sorted(set(max_norm) - set(names))
                raise ValueError(f"{hint}; got a dict without {missing} and with unknown keys {extra}")
            values = [max_norm[name] for name in names]
        elif isinstance(max_norm, Sequence) and not isinstance(max_norm, str):
            if len(max_norm) != len(names):
                raise ValueError(f"{hint}; got {len(max_norm)} thresholds")
            values = list(max_norm)
        else:
            raise TypeError(f"{hint}; got {type(max_norm).__name__}")
        return {name: float(_validate.check_threshold(f"max_norm[{name!r}]", value, tensor_ok=False))
                for name, value in zip(names, values)}

    def start(self, batch: int, device: torch.device) -> None:
        self.batch, self.device = batch, device
        self._norms.clear()
        self._factors.clear()

    def norms_for(self, name: str) -> ExampleNorms:
        """The accumulator of parameter ``name``'s group."""
        key = name if self.per_layer else None
        if key not in self._norms:
            self._norms[key] = ExampleNorms(self.batch, self.device)
        return self._norms[key]

    def finish(self, names: list[str], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The norms and factors of the parameters ``names`` (in ``dtype``): (B,) each when flat, else (B, K)."""
        groups = names if self.per_layer else [None]
        found_norms, found_scales = [], []
        for key in groups:
            threshold = self.thresholds[key] if self.per_layer else self.max_norm
            norms, scales, in_wide = self.norms_for(key).finish(threshold, self.rule)
            cast = scales.to(dtype)
            self._factors[key] = Factors(scales, in_wide, cast)
            found_norms.append(norms.to(dtype))
            found_scales.append(cast)
        if not self.per_layer:
            return found_norms[0], found_scales[0]
        if not names:
            empty = torch.zeros(self.batch, 0, dtype=dtype, device=self.device)
            return empty, empty.clone()
        return torch.stack(found_norms, dim=1), torch.stack(found_scales, dim=1)

    def factors_for(self, name: str) -> Factors:
        return self._factors[name if self.per_layer else None]


def _noisy_mean(summed: torch.Tensor, std: float, divisor: int | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """(sum of clipped gradients + N(0, std^2 I)) / divisor, in place; noise drawn only when std > 0.

    ``divisor`` is ``None`` for ``loss_reduction="sum"`` (no division).
    """
    if std > 0:
        noise = torch.randn(summed.shape, generator=generator, dtype=summed.dtype, device=summed.device)
        summed.add_(noise, alpha=std)
    return summed if divisor is None else summed.div_(divisor)


def _hook_path(model: nn.Module, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor, clip: _Clipping,
               generator: torch.Generator | None, divisor: int | None, vouched: bool) -> PerSampleClipResult:
    """:func:`per_sample_clipped_grad` from one forward and backward pass (:mod:`gradclip._ghost`); raises
    :class:`gradclip._ghost.NotEligible` before drawing any noise."""
    params = _trainable(model)
    _vmappable.refuse_sparse_embeddings(model)
    first = next(iter(params.values()))
    clip.start(inputs.shape[0], first.device)
    done = _ghost.run(model, loss_fn, inputs, targets, vouched, clip.norms_for)
    reached = [name for name in params if name in done.owner]
    norms, scales = clip.finish(reached, accumulation_dtype(first.dtype))
    grads: dict[str, torch.Tensor] = {}
    for name in reached:
        summed = done.summed(name, clip.factors_for(name))
        grads[name] = _noisy_mean(summed, clip.noise_std, divisor, generator).to(params[name].dtype)
    return PerSampleClipResult(grads, norms, scales)


def per_sample_clipped_grad(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    max_norm: float | Sequence[float] | Mapping[str, float],
    noise_multiplier: float = 0.0,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    method: Method = "auto",
    *,
    expected_batch_size: int | None = None,
    loss_reduction: Reduction = "mean",
    clipping: Clipping = "flat",
    clipping_fn: ClippingFn = "abadi",
    gamma: float = 0.01,
) -> PerSampleClipResult:
    r"""The DP-SGD gradient: clip each example's gradient to C, sum, add noise, average.

    .. math::

        \bar g = \frac{1}{N}\Big(\sum_{i=1}^{B} c_i\, g_i + \mathcal N(0, \sigma^2 C^2 I)\Big),
        \qquad c_i = \min\Big(1, \frac{C}{\|g_i\|_2 + 10^{-6}}\Big)

    Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar and Zhang (2016), "Deep
    Learning with Differential Privacy",
    `arXiv:1607.00133 <https://arxiv.org/abs/1607.00133>`__. :math:`\|g_i\|_2`
    is the norm of example i's gradient over all trainable parameters
    together (``clipping="flat"``); the 1e-6 guard is Opacus's (and torch's)
    convention. The divisor N is ``expected_batch_size`` when given (under
    Poisson sampling the batch size B is random, and the privacy analysis
    divides by its expectation), else the actual batch size B; with
    ``loss_reduction="sum"`` nothing is divided (N = 1). The noise is drawn from
    ``generator``, one ``randn`` of each parameter's shape, in
    ``model.named_parameters()`` order, only when ``noise_multiplier > 0`` and
    only for the parameters that get a gradient (below).

    *Automatic clipping* (``clipping_fn="automatic"``, AUTO-S of Bu, Wang, Zha
    and Karypis 2023, "Automatic Clipping: Differentially Private Deep Learning
    Made Easier and Stronger", `arXiv:2206.07136 <https://arxiv.org/abs/2206.07136>`__)
    normalises every example instead of clipping the large ones:

    .. math::

        c_i = \frac{C}{\|g_i\|_2 + \gamma}, \qquad \gamma = 0.01 \text{ by default}

    Each example contributes a vector of norm below C, so the sensitivity and
    the noise are those of clipping at C; C only scales the step (the paper
    takes C = 1 and tunes the learning rate instead), and no threshold needs
    tuning. :math:`\gamma > 0` keeps small gradients from being blown up to
    norm C (AUTO-V, :math:`\gamma = 0`, is not offered: a zero gradient would
    divide 0 by 0). This is fastDP's ``clipping_fn='automatic'``
    (awslabs/fast-differential-privacy, ``fastDP/autograd_grad_sample.py``,
    ``numerical_stability_constant`` 1e-2, noise std ``noise_multiplier *
    max_grad_norm``), tested against a float64 transcription of it.

    *Per-layer thresholds* (``clipping="per_layer"``, Opacus's
    ``clipping="per_layer"``, ``DPPerLayerOptimizer``): ``max_norm`` holds a
    threshold :math:`C_l` for each trainable parameter (as Opacus's
    ``max_grad_norm`` list, in ``model.named_parameters()`` order, or a dict by
    name), and each parameter of each example is clipped on its own:
    :math:`c_{i,l} = \min(1, C_l / (\|g_{i,l}\|_2 + 10^{-6}))` (or
    :math:`C_l / (\|g_{i,l}\|_2 + \gamma)` with ``clipping_fn="automatic"``,
    fastDP's ``clipping_style='param-wise'``). An example's clipped gradient then
    has norm at most :math:`\|C\|_2 = (\sum_l C_l^2)^{1/2}`, and the noise has std
    :math:`\sigma \|C\|_2`, as Opacus (which computes that norm in float32);
    ``norms`` and ``scales`` are then (B, K), one column per parameter of
    ``grads``. He, Li, Yu, Zhang, Kulkarni, Lee, Backurs, Yu and Bian (2023),
    "Exploring the Limits of Differentially Private Deep Learning with Group-wise
    Clipping", `arXiv:2212.01539 <https://arxiv.org/abs/2212.01539>`__, found fixed
    per-layer thresholds below flat clipping in accuracy; they let each layer be
    clipped as soon as its gradients exist.

    *An empty batch* (B = 0, which Poisson sampling draws) is a valid step:
    the sum of no clipped gradients is 0, so the gradient is the noise alone,
    divided by ``expected_batch_size``; ``loss_reduction="mean"`` without
    ``expected_batch_size`` would divide by 0 and raises.

    *A trainable parameter the loss does not reach* (never used in ``forward``,
    or only in a branch whose output does not reach the loss) has no
    per-example gradient at all, and gets no entry in ``grads``: no clipped sum
    and no noise, so :func:`per_sample_clip_grad_` leaves its ``.grad``
    ``None``, as ``loss.backward()`` does, and an optimizer (AdamW's weight
    decay, momentum) leaves it alone. This is decided from autograd's graph,
    not from values: a parameter used with a zero gradient (a dead ReLU) is
    clipped and noised as usual. Which parameters are absent must not depend
    on the data, or its absence would itself reveal something: it does not
    for any model the ``"vmap"`` path accepts (``vmap`` refuses data-dependent
    control flow) nor for the models of known modules that ``"auto"`` sends
    to the hook path; with a custom ``forward`` that branches on the data it
    is yours to ensure.

    *Opacus.* This is the step of Opacus's ``DPOptimizer`` (``opacus/optimizers/optimizer.py``):
    ``clip_and_accumulate`` clips each example with the factor above and sums
    into ``p.summed_grad`` (for an empty batch the factors are an empty
    tensor and the sum is 0), ``add_noise`` adds :math:`\mathcal N(0, \sigma^2
    C^2)` to every parameter it manages, and ``scale_grad`` divides by
    ``expected_batch_size`` when ``loss_reduction="mean"`` and does nothing for
    ``"sum"``; ``expected_batch_size`` and ``loss_reduction`` here mean the same.
    Opacus manages the parameters with ``requires_grad``; one whose per-sample
    gradient was never computed (``p.grad_sample is None``, its module unused
    in ``forward``) makes ``_get_flat_grad_sample`` raise "Per sample gradient
    is not initialized. Not updated in backward pass?", so Opacus refuses the
    step until that parameter is frozen; ``_check_skip_next_step`` only pops the
    queue of skipped (virtual) steps of ``BatchMemoryManager`` and never skips
    a parameter. gradclip instead leaves such a parameter out, as freezing it
    would: no gradient and no noise. Opacus's per-sample gradients of a
    ``"mean"`` loss are rescaled by the batch size; here ``loss_fn`` is
    evaluated on one example at a time, so there is nothing to rescale.

    Two ways to the same result, chosen by ``method``:

    * ``"vmap"``: per-example gradients from :func:`per_sample_grads`
      (``vmap`` over ``grad``), one vectorised pass instead of B backward
      passes, for any model (recurrent layers, run unrolled, and embeddings
      included; see there); it holds all B per-example gradients at once.
      The model is also run on one example outside ``vmap``, to find which
      parameters the loss reaches.
    * ``"ghost"``: the hook path, one ordinary forward pass and one backward
      pass to the layers' outputs for the whole batch, for models whose
      trainable parameters all belong to ``nn.Linear``, ``nn.Conv2d``
      (``groups=1``, zero padding), ``nn.Embedding`` (dense, without
      ``scale_grad_by_freq``), ``nn.LayerNorm``, ``nn.RMSNorm`` or
      ``nn.GroupNorm`` layers, each run once per forward pass. Forward hooks
      record each layer's input :math:`a`; the output gradients :math:`\delta`
      come from one backward pass of :math:`\sum_i \ell_i`, the per-example
      losses from ``vmap(loss_fn)``. Example i's gradient of a linear layer
      :math:`z = W a + b` is the outer product of
      :math:`\delta_i = \partial \ell_i / \partial z_i` with :math:`a_i`, so its
      norm needs no per-example gradient, and neither does the clipped sum:

      .. math::

          \|\nabla_W \ell_i\|_F = \|\delta_i\|_2\, \|a_i\|_2, \qquad
          \|\nabla_b \ell_i\|_2 = \|\delta_i\|_2, \qquad
          \sum_{i} c_i\, \delta_i a_i^\top = (c \odot \Delta)^\top A

      (Goodfellow 2015, "Efficient Per-Example Gradient Computations",
      `arXiv:1510.01799 <https://arxiv.org/abs/1510.01799>`__). With more
      positions, :math:`(B, T, d)` inputs or the T output pixels of an
      ``nn.Conv2d`` (:math:`a_{it}` the columns of ``unfold(x_i)``,
      :math:`d = C_{in} k_h k_w`, :math:`p = C_{out}`), example i's weight
      gradient is :math:`\sum_t \delta_{it} a_{it}^\top`, and each layer takes
      the cheaper of two ways (the mixed ghost clipping of Bu, Mao and Xu 2023,
      "Differentially Private Optimization on Large Model at Small Cost",
      `arXiv:2210.00038 <https://arxiv.org/abs/2210.00038>`__): the ghost norm
      :math:`\langle A_i A_i^\top, \Delta_i \Delta_i^\top\rangle` (Li, Tramèr,
      Liang and Hashimoto 2022, "Large Language Models Can Be Strong
      Differentially Private Learners",
      `arXiv:2110.05679 <https://arxiv.org/abs/2110.05679>`__), then the
      clipped sum :math:`(c \odot \Delta)^\top A` (their book-keeping), when
      :math:`T^2 (d + p) \le 4 d p`; else the p x d per-example gradients
      themselves (one batched product, or one grouped convolution without
      unfolding the input) and their weighted sum. Both pay one product of
      T d p multiply-adds per example; beyond it the Gram matrices cost
      :math:`T^2 (d + p)`, the per-example gradients a few passes over their
      d p entries. Per-example gradients above 256 MiB for a layer give way
      to Gram matrices that take less memory. An ``nn.Embedding``'s example
      gradient has one row per distinct token of the example, the sum of that
      token's :math:`\delta_{it}`: each example's tokens are sorted and summed
      by run, with no host read of how many are distinct, and the clipped sum
      is torch's embedding backward of :math:`c \odot \delta` (``padding_idx``
      rows stay zero; ``max_norm`` renormalises in the forward pass, as in
      training). Normalisation layers :math:`y = \hat x \odot w + b` have
      per-example gradients :math:`\sum_t \delta_{it} \odot \hat x_{it}` and
      :math:`\sum_t \delta_{it}` as small as their parameters: they are formed
      (:math:`\hat x` recomputed from the input). ``chunk_size`` is checked but
      not used. A layer whose output the loss does not reach, or that a
      custom ``forward`` does not call, gets no gradient; a parameter that
      reaches the loss other than through its own layer's forward (a tied
      weight, a layer's weight used by hand) is refused, and so is a layer
      run twice. Every other module must keep the examples apart: activations,
      dropout (in training mode each example gets its own mask, and the
      clipped gradients are those under the masks of this forward pass, as in
      Opacus), pooling, ``Flatten``, frozen layers, BatchNorm in eval mode
      are known to; modules with their own ``forward`` (a residual block, a
      custom attention) are taken on trust.
    * ``"auto"`` (the default): the hook path when it applies and is known to
      be exact, else ``"vmap"``. Modules with their own ``forward`` are not
      taken on trust: on the first call for a model, its first examples (up
      to 4) run through it in one batch and one at a time under ``vmap``,
      without gradients, and the outputs must agree (to the square root of
      the dtype's epsilon, relative to the largest); a model that mixes the
      examples, that ``vmap`` cannot run, or whose output is not a tensor
      goes to ``"vmap"``, which computes each example's gradient of the model
      run on that example alone. The verdict is kept for the model while its
      modules and their training modes stay the same; it costs one host read
      on that first call.

    *Range.* Each example's norm neither overflows nor underflows while it is
    representable (float32 entries near 1e20 or 1e-25, whose squares are
    not), as in :mod:`gradclip._norms`: the factors are computed from those
    norms, so a finite gradient is never zeroed by an overflowed norm. On the
    CPU, where reading a value costs no synchronisation, the norms are
    computed in float32 (at least) as torch would, and one host read checks
    that no square can have over- or underflowed (every partial norm and
    every example's norm within [1e-15, 1e18]); if one can,
    the doubtful partial norms are recomputed with their largest entry
    factored out and combined in float64, and a factor too small for float32
    (a norm above about 1e38 times C) is applied in float64. Elsewhere, with
    no host read, each example's rows are divided by their largest magnitude
    before their norm is taken (two more passes over the per-example
    gradients on the ``"vmap"`` path; over the layers' inputs and output
    gradients on the hook path) and combined in float64 (float32 on MPS);
    there a factor below float32's smallest normal number loses precision in
    the cast. The ghost norms of sequences (Gram matrices) are always
    computed on inputs and output gradients divided by each example's
    largest entry. No host-device synchronisation on either path (but for
    ``"auto"``'s one check of a model with custom modules, above).

    Non-finite values: an example whose gradient holds a NaN or inf has a
    non-finite norm and factor, and makes the averaged gradient NaN; it is not
    dropped silently.

    Args:
        model: the network (no BatchNorm in training mode; see :func:`per_sample_grads`).
        loss_fn: ``loss_fn(output, target) -> scalar`` for a batch of one example.
        inputs: the batch, examples along dim 0; may hold 0 examples.
        targets: the targets, examples along dim 0.
        max_norm: C, a number in [0, inf] (finite when there is noise or with ``clipping_fn="automatic"``),
            in the gradients' units; with ``clipping="per_layer"``, one such number per trainable
            parameter: a sequence in ``model.named_parameters()`` order, or a dict from each name.
        noise_multiplier: :math:`\sigma`, a finite number >= 0.
        generator: the random generator for the noise; the global one if ``None``.
        chunk_size: as in :func:`per_sample_grads` (the ``"vmap"`` path only), checked on every path.
        method: ``"auto"``, ``"ghost"`` or ``"vmap"``, as above.
        expected_batch_size: N, the divisor of the ``"mean"``: under Poisson sampling
            with rate q over a dataset of n examples, q n (Opacus's ``expected_batch_size``);
            ``None`` divides by the actual batch size B. Ignored by ``"sum"``, as in Opacus.
        loss_reduction: ``"mean"`` (the default) divides the noisy clipped sum by N;
            ``"sum"`` returns the noisy clipped sum itself (Opacus's ``loss_reduction``).
        clipping: ``"flat"`` (the default: one norm over all parameters) or ``"per_layer"``
            (one norm and threshold per parameter), as Opacus's ``clipping``.
        clipping_fn: ``"abadi"`` (the default: :math:`\min(1, C/(\|g_i\| + 10^{-6}))`) or
            ``"automatic"`` (:math:`C/(\|g_i\| + \gamma)`), as fastDP's ``clipping_fn``.
        gamma: :math:`\gamma` of ``clipping_fn="automatic"``, a finite number > 0 (default 0.01,
            the paper's and fastDP's); checked always, used only there.

    Returns:
        A :class:`PerSampleClipResult`: the gradients by parameter name (the
        parameters the loss reaches), the per-example norms before clipping, and
        the per-example factors ((B,) each; (B, K) with ``clipping="per_layer"``).

    Raises:
        TypeError: ``model`` is not a module, ``loss_fn`` is not callable, ``inputs``/``targets`` are not tensors, ``generator`` is not a ``torch.Generator``, ``noise_multiplier``/``gamma`` are not numbers, or ``max_norm`` is not a number (``"flat"``) or not a sequence or dict of numbers (``"per_layer"``); a trainable embedding has ``sparse=True``, or a recurrent layer gets a ``PackedSequence`` (as :func:`per_sample_grads`).
        ValueError: an argument is out of range (a threshold < 0, or infinite with noise or ``"automatic"``; per-layer thresholds not one per trainable parameter; ``noise_multiplier`` < 0, ``gamma`` <= 0, ``chunk_size`` or ``expected_batch_size`` not None or an int >= 1, ``method``, ``loss_reduction``, ``clipping`` or ``clipping_fn`` not one of theirs); ``inputs`` and ``targets`` differ in batch size; the batch is empty with ``loss_reduction="mean"`` and no ``expected_batch_size``; the model holds a BatchNorm in training mode (or without running statistics), whose batch statistics mix the examples; ``method="ghost"`` for a model the hook path does not fit (the message says why); or ``loss_fn`` does not return a 0-dim loss for one example.
        RuntimeError: on the ``vmap`` path, a module draws random numbers (dropout in training mode; the hook path takes it).

    References:
        * Abadi et al. (2016), "Deep Learning with Differential Privacy", `arXiv:1607.00133 <https://arxiv.org/abs/1607.00133>`__.
        * Li, Tramer, Liang and Hashimoto (2022), "Large Language Models Can Be Strong Differentially Private Learners" (ghost norms), `arXiv:2110.05679 <https://arxiv.org/abs/2110.05679>`__.
        * Bu, Mao and Xu (2023), "Differentially Private Optimization on Large Model at Small Cost" (mixed ghost norms, book-keeping), `arXiv:2210.00038 <https://arxiv.org/abs/2210.00038>`__; reference code fastDP's ``clipping_mode='MixOpt'``, `awslabs/fast-differential-privacy <https://github.com/awslabs/fast-differential-privacy>`__.
        * Bu, Wang, Zha and Karypis (2023), "Automatic Clipping: Differentially Private Deep Learning Made Easier and Stronger", `arXiv:2206.07136 <https://arxiv.org/abs/2206.07136>`__; reference code fastDP's ``clipping_fn='automatic'``, ``fastDP/autograd_grad_sample.py``.
        * Opacus, ``DPOptimizer`` (``clip_and_accumulate``, ``add_noise``, ``scale_grad``), `opacus/optimizers/optimizer.py <https://github.com/meta-pytorch/opacus/blob/main/opacus/optimizers/optimizer.py>`__, and ``DPPerLayerOptimizer``, `opacus/optimizers/perlayeroptimizer.py <https://github.com/meta-pytorch/opacus/blob/main/opacus/optimizers/perlayeroptimizer.py>`__.

    Example:
        >>> import torch, gradclip
        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> torch.nn.init.ones_(model.weight)
        Parameter containing:
        tensor([[1.]], requires_grad=True)
        >>> x, y = torch.tensor([[1.0], [10.0]]), torch.zeros(2, 1)
        >>> result = gradclip.per_sample_clipped_grad(model, torch.nn.functional.mse_loss, x, y, max_norm=1.0)
        >>> result.norms  # d/dw (w x)^2 = 2 w x^2
        tensor([  2., 200.])
        >>> result.grads["weight"]  # (1 + 1) / 2, to within the 1e-6 guard
        tensor([[1.0000]])
        >>> slow = gradclip.per_sample_clipped_grad(model, torch.nn.functional.mse_loss, x, y, 1.0, method="vmap")
        >>> torch.allclose(slow.grads["weight"], result.grads["weight"])
        True
        >>> auto_s = gradclip.per_sample_clipped_grad(model, torch.nn.functional.mse_loss, x, y, 1.0,
        ...                                           clipping_fn="automatic")
        >>> auto_s.scales  # 1 / (norm + 0.01): every example normalised
        tensor([0.4975, 0.0050])
        >>> empty = gradclip.per_sample_clipped_grad(model, torch.nn.functional.mse_loss, x[:0], y[:0], 1.0,
        ...                                          expected_batch_size=4)
        >>> empty.grads["weight"], empty.norms  # no example, no noise: zero
        (tensor([[0.]]), tensor([]))
    """
    _check_dp_args(noise_multiplier, generator)
    clip = _Clipping(model, max_norm, noise_multiplier, clipping, clipping_fn, gamma)
    _validate.check_choice("method", method, _METHODS)
    _validate.check_optional_int("chunk_size", chunk_size, 1)
    batch = _check_batch(inputs, targets)
    divisor = _check_reduction(batch, expected_batch_size, loss_reduction)
    if method != "vmap":
        _validate.check_callable("loss_fn", loss_fn, "loss_fn(output, target) -> scalar loss")
        try:
            return _hook_path(model, loss_fn, inputs, targets, clip, generator, divisor, vouched=method == "ghost")
        except _ghost.NotEligible as reason:
            if method == "ghost":
                raise ValueError(f"method='ghost' does not apply: {reason}") from None
    reached: set[str] = set()
    token = _REACHED.set(reached)
    try:
        samples = per_sample_grads(model, loss_fn, inputs, targets, chunk_size)
    finally:
        _REACHED.reset(token)
    first = next(iter(samples.values()))
    if len(reached) < len(samples):  # an empty batch, or parameters not found in the graph: ask autograd
        reached |= _reached(model, loss_fn, _trainable(model), inputs, targets)
    samples = {name: g for name, g in samples.items() if name in reached}
    clip.start(batch, first.device)
    for name, g in samples.items():
        clip.norms_for(name).add_rows(g.reshape(batch, math.prod(g.shape[1:])))
    norms, scales = clip.finish(list(samples), accumulation_dtype(first.dtype))
    grads: dict[str, torch.Tensor] = {}
    for name, g in samples.items():
        dtype = accumulation_dtype(g.dtype)
        c, in_wide = clip.factors_for(name).get(dtype, g.device)
        summed = torch.tensordot(c, g.to(c.dtype), dims=1)
        grads[name] = _noisy_mean(summed.to(dtype), clip.noise_std, divisor, generator).to(g.dtype)
    return PerSampleClipResult(grads, norms, scales)


def per_sample_clip_grad_(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    max_norm: float | Sequence[float] | Mapping[str, float],
    noise_multiplier: float = 0.0,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    method: Method = "auto",
    *,
    expected_batch_size: int | None = None,
    loss_reduction: Reduction = "mean",
    clipping: Clipping = "flat",
    clipping_fn: ClippingFn = "abadi",
    gamma: float = 0.01,
) -> torch.Tensor:
    r"""Compute the DP-SGD gradient and accumulate it into each parameter's ``.grad``; return the per-example norms.

    .. math::

        \theta.\mathrm{grad} \mathrel{+}= \frac{1}{N}\Big(\sum_{i} c_i\, g_i + \mathcal N(0, \sigma^2 C^2 I)\Big),

    .. math::

        c_i = \min\Big(1, \frac{C}{\|g_i\| + 10^{-6}}\Big) \text{ or } \frac{C}{\|g_i\| + \gamma}

    :func:`per_sample_clipped_grad` (Abadi et al. 2016,
    `arXiv:1607.00133 <https://arxiv.org/abs/1607.00133>`__; automatic clipping,
    ``clipping_fn="automatic"``, Bu et al. 2023,
    `arXiv:2206.07136 <https://arxiv.org/abs/2206.07136>`__; per-layer thresholds,
    ``clipping="per_layer"``, as Opacus), then written into
    ``.grad`` as a backward pass would: added to an existing gradient, set
    where there is none. N is ``expected_batch_size``, or the batch size B, or
    1 with ``loss_reduction="sum"``. Call it instead of ``loss.backward()``,
    then step the optimizer. A trainable parameter the loss does not reach
    (unused in ``forward``) is left alone: its ``.grad`` stays ``None``, with no
    noise, as after ``loss.backward()`` (Opacus refuses such a step instead;
    see :func:`per_sample_clipped_grad`). An empty batch (Poisson sampling)
    writes the noise alone, divided by ``expected_batch_size``.

    Args:
        model: the network.
        loss_fn: ``loss_fn(output, target) -> scalar`` for a batch of one example.
        inputs: the batch, examples along dim 0; may hold 0 examples.
        targets: the targets, examples along dim 0.
        max_norm: C, a number in [0, inf] (finite when there is noise or with ``"automatic"``); with
            ``clipping="per_layer"``, one per trainable parameter (a sequence in ``named_parameters()``
            order, or a dict by name).
        noise_multiplier: :math:`\sigma`, a finite number >= 0.
        generator: the random generator for the noise.
        chunk_size: examples per vectorised chunk, or ``None`` (the ``"vmap"`` path only).
        method: ``"auto"``, ``"ghost"`` (the hook path, for models trained only in ``nn.Linear``,
            ``nn.Conv2d``, ``nn.Embedding``, ``nn.LayerNorm``, ``nn.RMSNorm`` and ``nn.GroupNorm``
            layers) or ``"vmap"``, as in :func:`per_sample_clipped_grad`.
        expected_batch_size: N, the divisor of the ``"mean"`` under Poisson sampling
            (Opacus's ``expected_batch_size``); ``None`` divides by the batch size.
        loss_reduction: ``"mean"`` (divide by N) or ``"sum"`` (do not divide), as in Opacus.
        clipping: ``"flat"`` (one threshold) or ``"per_layer"`` (one per parameter), as in Opacus.
        clipping_fn: ``"abadi"`` (clip) or ``"automatic"`` (normalise: AUTO-S).
        gamma: the stability constant of ``"automatic"``, > 0 (default 0.01).

    Returns:
        Each example's gradient norm before clipping, a 1-D tensor of length B; (B, K), one
        column per parameter that gets a gradient, with ``clipping="per_layer"``.

    Raises:
        TypeError, ValueError: as :func:`per_sample_clipped_grad`.

    References:
        * Abadi et al. (2016), "Deep Learning with Differential Privacy", `arXiv:1607.00133 <https://arxiv.org/abs/1607.00133>`__.
        * Bu, Wang, Zha and Karypis (2023), "Automatic Clipping", `arXiv:2206.07136 <https://arxiv.org/abs/2206.07136>`__; fastDP (awslabs/fast-differential-privacy), ``clipping_fn='automatic'``.
        * Opacus ``DPPerLayerOptimizer``, `opacus/optimizers/perlayeroptimizer.py <https://github.com/meta-pytorch/opacus/blob/main/opacus/optimizers/perlayeroptimizer.py>`__.

    Example:
        >>> import torch, gradclip
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> norms = gradclip.per_sample_clip_grad_(model, torch.nn.functional.cross_entropy, x, y, max_norm=0.1)
        >>> norms.shape, bool(model.weight.grad.norm() <= 0.1 + 1e-6)
        (torch.Size([8]), True)
        >>> model.zero_grad()
        >>> norms = gradclip.per_sample_clip_grad_(model, torch.nn.functional.cross_entropy, x, y, [0.1, 0.01],
        ...                                        clipping="per_layer")
        >>> norms.shape, bool(model.bias.grad.norm() <= 0.01 + 1e-6)
        (torch.Size([8, 2]), True)
    """
    result = per_sample_clipped_grad(model, loss_fn, inputs, targets, max_norm, noise_multiplier, generator, chunk_size,
                                     method, expected_batch_size=expected_batch_size, loss_reduction=loss_reduction,
                                     clipping=clipping, clipping_fn=clipping_fn, gamma=gamma)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in result.grads:
                accumulate_(p, result.grads[name])  # into a GradBuffer's view if one holds p
    return result.norms
