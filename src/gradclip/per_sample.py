"""Per-sample gradient clipping for differentially private SGD, with ``torch.func`` or ghost norms."""

from __future__ import annotations

import contextvars
import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.func import functional_call, grad, vmap

from . import _validate, _vmappable
from .flat import accumulate_
from ._norms import accumulation_dtype, exact_on_host, scaled_norm, suspicious, wide_dtype
from ._scaling import clip_coefficient

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
        norms: each example's gradient norm before clipping, a 1-D tensor of length B (0 for an empty batch).
        scales: each example's clipping factor :math:`\\min(1, C/(\\|g_i\\| + 10^{-6}))`.

    References:
        * Abadi et al. (2016), "Deep Learning with Differential Privacy", `arXiv:1607.00133 <https://arxiv.org/abs/1607.00133>`__.
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


def _batch_norm_problem(name: str, module: nn.Module) -> str | None:
    """Why ``module`` has no per-example gradient if it is a BatchNorm on batch statistics, else ``None``."""
    if not isinstance(module, _BatchNorm):
        return None
    if module.training:
        state = "in training mode"
    elif module.running_mean is None or module.running_var is None:
        state = "without running statistics (track_running_stats=False)"
    else:
        return None
    return (f"{name} ({type(module).__name__}) is a BatchNorm {state}: it normalises with batch statistics, "
            "which mix the examples, so per-example gradients do not exist. Use GroupNorm or LayerNorm instead "
            "(as DP-SGD requires), or put the BatchNorm in eval mode (model.eval()) so that it normalises "
            "with its running statistics")


def _refuse_batch_norm(model: nn.Module) -> None:
    for name, module in model.named_modules():
        problem = _batch_norm_problem(name or type(module).__name__, module)
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
            "models of nn.Linear/nn.Conv2d layers (with dropout, activations, pooling, LayerNorm/GroupNorm "
            f"without affine weights) take method='ghost', which runs one ordinary forward pass. ({error})"
        ) from error


def _leaves_reached(loss: torch.Tensor, leaves: dict[str, torch.Tensor]) -> set[str]:
    """The names of ``leaves`` that ``loss``'s autograd graph reaches (a walk of the graph, no backward pass)."""
    names = {id(t): name for name, t in leaves.items()}
    found: set[str] = set()
    seen: set[object] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf
        if variable is not None and id(variable) in names:
            found.add(names[id(variable)])
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


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


# --- Per-example norms that neither overflow nor underflow (see gradclip._norms) -------------------------------

def _max_scaled(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (in its accumulation dtype) divided by each example's largest magnitude over ``dims``, and those
    magnitudes (wide dtype, shape (B,)).

    A zero, inf or NaN magnitude divides by 1 instead, so zeros stay zeros and
    non-finite values stay non-finite.
    """
    acc = accumulation_dtype(x.dtype)
    if x.numel() == 0:
        return x.to(acc), torch.ones(x.shape[0], dtype=wide_dtype(x.device), device=x.device)
    largest = torch.linalg.vector_norm(x, math.inf, dim=dims, keepdim=True).to(acc)
    largest = torch.where((largest > 0) & torch.isfinite(largest), largest, torch.ones_like(largest))
    return x / largest, largest.reshape(-1).to(wide_dtype(x.device))


def _scaled_row_norms(rows: torch.Tensor) -> torch.Tensor:
    """The 2-norm of each row of a 2-D tensor, each row divided by its largest magnitude first (wide dtype)."""
    if rows.shape[1] == 0:
        return torch.zeros(rows.shape[0], dtype=wide_dtype(rows.device), device=rows.device)
    scaled, largest = _max_scaled(rows, dims=(1,))
    # an inf entry divides by 1 and keeps the norm inf (NaN with a NaN), as it should
    return torch.linalg.vector_norm(scaled, dim=1).to(largest.dtype) * largest


class _ExampleNorms:
    """Each example's gradient norm, from parts, without over- or underflow.

    The parts are row norms of 2-D tensors (one row per example), products of two of them
    (a ghost norm), or norms already computed safely (wide dtype).

    On the CPU (where a host read costs no sync) the row norms come from one kernel in the
    accumulation dtype and are combined in it, as in torch, and one host read checks the
    result: every row norm and every combined norm within [1e-15, 1e18] (the low end as
    :func:`gradclip._norms.suspicious`), so that no square over- or underflowed on the way,
    and no factor underflows float32. Otherwise, the row norms that may have over- or underflowed are
    recomputed with their largest entry factored out and everything is combined again in the
    wide dtype. Elsewhere (no host read) each row is divided by its largest magnitude before
    its norm is taken (two more passes) and the parts are combined in the wide dtype, with
    the largest factored out when the gradients are as wide as it.
    """

    # float32 squares of norms in this range neither overflow nor underflow (LOW as _norms.suspicious)
    LOW, HIGH = torch.finfo(torch.float32).tiny ** 0.5 * 1e4, 1e18

    def __init__(self, batch: int, device: torch.device) -> None:
        self.batch, self.device = batch, device
        self.on_host = exact_on_host(device)
        self.wide = wide_dtype(device)
        self.sources: list[torch.Tensor] = []
        self.row_norms: list[torch.Tensor] = []
        self.pairs: list[tuple[int, int | None]] = []
        self.exact: list[torch.Tensor] = []
        self.narrow = self.wide == torch.float64  # every part from a dtype narrower than the wide one

    def rows(self, rows: torch.Tensor) -> int:
        """Register the rows of a 2-D tensor (B, n); returns the index of their norms."""
        acc = accumulation_dtype(rows.dtype)
        self.narrow = self.narrow and acc != torch.float64
        self.sources.append(rows)
        if self.on_host:
            self.row_norms.append(torch.linalg.vector_norm(rows, dim=1, dtype=acc))
        else:
            self.row_norms.append(_scaled_row_norms(rows).to(self.device))
        return len(self.sources) - 1

    def add(self, first: int, second: int | None = None) -> None:
        """A part: the norms of rows ``first``, or their product with those of rows ``second``."""
        self.pairs.append((first, second))

    def add_exact(self, norms: torch.Tensor) -> None:
        """A part computed without over- or underflow already (wide dtype)."""
        self.exact.append(norms.to(self.device))

    def _combined(self, row_norms: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        parts = [row_norms[first] if second is None else row_norms[first] * row_norms[second]
                 for first, second in self.pairs] + self.exact
        if not parts:
            return torch.zeros(self.batch, dtype=dtype, device=self.device)
        stacked = torch.stack(parts, dim=1)
        if self.narrow or dtype != self.wide:
            return torch.linalg.vector_norm(stacked, dim=1)
        return scaled_norm(stacked, 2.0, dim=(1,))

    def finish(self, max_norm: float) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """The norms and factors, and whether a factor would underflow float32 (CPU only).

        In float32 from the CPU's fast path, else in the wide dtype.
        """
        # a factor below float32's smallest normal number: norm > max_norm / tiny
        limit = max_norm / torch.finfo(torch.float32).tiny if max_norm > 0 else math.inf
        fast = (self.on_host and self.narrow and not self.exact and self.batch > 0 and self.row_norms
                and {(n.dtype, n.device) for n in self.row_norms} == {(torch.float32, self.device)})
        if fast:
            norms = self._combined(self.row_norms, torch.float32)
            smallest, largest = torch.aminmax(torch.cat([*self.row_norms, norms]))
            # (a NaN fails this test, and takes the careful path to its NaN result)
            if smallest.item() >= self.LOW and largest.item() <= min(self.HIGH, limit):
                return norms, clip_coefficient(max_norm, norms), False
        if self.on_host:
            row_norms = [self._repaired(k) for k in range(len(self.sources))]
        else:
            row_norms = self.row_norms
        norms = self._combined(row_norms, self.wide)
        scales = clip_coefficient(max_norm, norms)
        in_wide = self.on_host and self.batch > 0 and bool(norms.amax() > limit)
        return norms, scales, in_wide

    def _repaired(self, index: int) -> torch.Tensor:
        """Row norms ``index`` in the wide dtype, the ones that may have over- or underflowed recomputed (CPU)."""
        norms = self.row_norms[index].to(self.device, self.wide)
        suspect = suspicious(norms, 2.0, torch.float32)
        if bool(suspect.any()):
            rows = suspect.nonzero().flatten()
            norms[rows] = scaled_norm(self.sources[index][rows.to(self.sources[index].device)], 2.0, dim=(1,)).to(
                self.device)
        return norms


class _Factors:
    """The clipping factors (wide dtype) cast to each gradient's dtype, once per dtype and device.

    ``in_wide``: on the CPU, a factor that the cast would flush below float32's smallest
    normal number (a norm above about 1e38 times ``max_norm``) sends the weighted sums of
    narrower dtypes to the wide dtype instead, so that no finite gradient is zeroed.
    Elsewhere (no host read) such a factor loses precision in the cast.
    """

    def __init__(self, scales: torch.Tensor, in_wide: bool, cast: torch.Tensor) -> None:
        self.scales, self.in_wide = scales, in_wide
        self._cast = {(cast.dtype, cast.device): cast}

    def get(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, bool]:
        """The factors to multiply by, and whether to multiply in the wide dtype (then they are wide)."""
        if self.in_wide and dtype != self.scales.dtype:
            return self.scales.to(device), True
        key = (dtype, device)
        if key not in self._cast:
            self._cast[key] = self.scales.to(device=device, dtype=dtype)
        return self._cast[key], False


def _check_dp_args(max_norm: float, noise_multiplier: float, generator: torch.Generator | None) -> float:
    max_norm = _validate.check_threshold("max_norm", max_norm, tensor_ok=False)
    _validate.check_real("noise_multiplier", noise_multiplier, 0.0, math.inf, high_open=True)
    if noise_multiplier > 0 and math.isinf(max_norm):
        raise ValueError("max_norm must be finite when noise_multiplier > 0 (the noise std is noise_multiplier * max_norm)")
    _validate.check_generator(generator)
    return float(max_norm)


# --- The ghost-norm path (Goodfellow 2015; Li, Tramer, Liang and Hashimoto 2022) -------------------------------

class _NotEligible(Exception):
    """The ghost-norm path does not apply to this model or batch; the message says why."""


_ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.Softshrink, nn.Hardshrink, nn.LogSigmoid, nn.Threshold,
)
_DROPOUT: tuple[type[nn.Module], ...] = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)
_SOFTMAX: tuple[type[nn.Module], ...] = (nn.Softmax, nn.LogSoftmax, nn.Softmin)
# Layers whose trainable weight and bias get ghost norms.
_GHOST_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
_PER_EXAMPLE_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
# Frozen spatial layers: examples stay independent when the input has its batch dimension (ndim = k + 2).
_SPATIAL: dict[type[nn.Module], int] = {
    **{cls: 3 for cls in (nn.Conv1d, nn.ConvTranspose1d, nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d,
                          nn.AdaptiveMaxPool1d)},
    **{cls: 4 for cls in (nn.Conv2d, nn.ConvTranspose2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                          nn.AdaptiveMaxPool2d)},
    **{cls: 5 for cls in (nn.Conv3d, nn.ConvTranspose3d, nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d,
                          nn.AdaptiveMaxPool3d)},
}


def _same_forward(module: nn.Module, classes: tuple[type[nn.Module], ...]) -> bool:
    """``module`` is one of ``classes`` and does not override its ``forward``."""
    return any(isinstance(module, cls) and type(module).forward is cls.forward for cls in classes)


def _leaf_rule(module: nn.Module, name: str) -> tuple[int, int | None] | None:
    """``(min_ndim, exact_ndim)`` its input must have for a module known to keep examples apart, else ``None``.

    Raises :class:`_NotEligible` for a known module that mixes examples (BatchNorm on batch
    statistics) or may act along the batch dimension.
    """
    if _same_forward(module, (nn.Linear,)) or _same_forward(module, _ELEMENTWISE):
        return 2 if isinstance(module, nn.Linear) else 1, None
    if isinstance(module, _BatchNorm):
        problem = _batch_norm_problem(name, module)
        if problem is not None:
            raise _NotEligible(problem)
        return (2, None) if _same_forward(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) else None
    if _same_forward(module, _DROPOUT):
        # in training mode each example gets its own mask (per entry or per channel): the examples stay
        # independent, and the ghost norms are those of the gradients under the masks this forward drew
        return 1, None
    if _same_forward(module, _SOFTMAX):
        if module.dim is None or not (module.dim >= 1 or module.dim == -1):
            raise _NotEligible(f"{name} ({type(module).__name__}, dim={module.dim}) may act along the batch dimension")
        return 2, None
    if _same_forward(module, (nn.Flatten,)):
        if module.start_dim < 1:
            raise _NotEligible(f"{name} (Flatten, start_dim={module.start_dim}) may merge the batch dimension")
        return 2, None
    if _same_forward(module, (nn.Unflatten,)):
        if not (module.dim >= 1 or module.dim == -1):
            raise _NotEligible(f"{name} (Unflatten, dim={module.dim}) may split the batch dimension")
        return 2, None
    if _same_forward(module, (nn.LayerNorm, nn.RMSNorm)):
        return len(module.normalized_shape) + 1, None
    if _same_forward(module, (nn.GroupNorm,)):
        return 2, None
    for cls, ndim in _SPATIAL.items():
        if _same_forward(module, (cls,)):
            return ndim, ndim
    return None


def _check_conv(module: nn.Conv2d, label: str) -> None:
    """Raise :class:`_NotEligible` for a trainable ``nn.Conv2d`` whose gradient is not ``G U^T`` with ``U`` unfolded."""
    if module.groups != 1:
        raise _NotEligible(f"{label!r} (Conv2d) has groups={module.groups}: ghost norms of grouped convolutions are "
                           "not implemented (only groups=1)")
    if module.padding_mode != "zeros":
        raise _NotEligible(f"{label!r} (Conv2d) pads with padding_mode={module.padding_mode!r}: ghost norms need "
                           "zero padding")


def _conv_padding(module: nn.Conv2d) -> list[int]:
    """``F.pad``'s (left, right, top, bottom) zero padding that ``module`` applies to its input."""
    if module.padding == "valid":
        return [0, 0, 0, 0]
    if module.padding == "same":  # as torch: total dilation (k - 1), the odd one on the right/bottom
        pads = []
        for k, d in zip(reversed(module.kernel_size), reversed(module.dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return pads
    ph, pw = module.padding
    return [pw, pw, ph, ph]


def _unfolded(module: nn.Module, x: torch.Tensor, delta: torch.Tensor, batch: int,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's inputs (B, T, d) and output gradients (B, T, p), so that example i's weight gradient is
    ``sum_t delta_it a_it^T`` (reshaped to the weight's shape).

    For an ``nn.Linear``, T is the product of the middle dims (1 for 2-D inputs). For an
    ``nn.Conv2d``, ``a_i`` is ``unfold(x_i)^T``: T = L output positions, d = C_in k_h k_w
    (in the order of ``weight.reshape(C_out, -1)``), p = C_out.
    """
    if isinstance(module, nn.Conv2d):
        x = x.to(dtype)
        pads = _conv_padding(module)
        if any(pads):
            x = torch.nn.functional.pad(x, pads)
        u = torch.nn.functional.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)
        p, steps = delta.shape[1], math.prod(delta.shape[2:])  # (not -1: ambiguous for an empty batch)
        return u.transpose(1, 2), delta.reshape(batch, p, steps).to(dtype).transpose(1, 2)
    d, p = x.shape[-1], delta.shape[-1]
    steps = math.prod(x.shape[1:-1])
    return x.reshape(batch, steps, d).to(dtype), delta.reshape(batch, steps, p).to(dtype)


def _layer_dims(module: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> tuple[int, int, int]:
    """(T, d, p) of :func:`_unfolded`, without unfolding."""
    if isinstance(module, nn.Conv2d):
        return delta.shape[2] * delta.shape[3], module.weight[0].numel(), delta.shape[1]
    return math.prod(x.shape[1:-1]), x.shape[-1], delta.shape[-1]


def _conv_weight_grads(module: nn.Conv2d, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Each example's gradient of a Conv2d's weight, (B, C_out, C_in k_h k_w), from its input ``x`` (B, C_in, H, W)
    and output gradient ``delta`` (B, C_out, H', W'): the examples as the groups of one convolution's weight
    gradient (Rochette, Manoel and Tramel 2019, `arXiv:1912.06015 <https://arxiv.org/abs/1912.06015>`__)."""
    batch, c_in = x.shape[:2]
    c_out = delta.shape[1]
    if batch == 0:
        return x.new_zeros((0, c_out, module.weight[0].numel()))
    padding = module.padding
    if isinstance(padding, str):
        pads = _conv_padding(module)
        x, padding = (torch.nn.functional.pad(x, pads) if any(pads) else x), (0, 0)
    g = torch.ops.aten.convolution_backward(
        delta.reshape(1, batch * c_out, *delta.shape[2:]), x.reshape(1, batch * c_in, *x.shape[2:]),
        x.new_empty((batch * c_out, c_in, *module.kernel_size)), None, module.stride, padding, module.dilation,
        False, (0, 0), batch, (False, True, False))[1]
    return g.reshape(batch, c_out, -1)


def _use_gram(steps: int, d: int, p: int) -> bool:
    """Per layer, the cheaper way to ``||sum_t delta_t a_t^T||_F^2`` (Bu et al. 2023's "mixed" choice):
    the T x T Gram matrices ``<A A^T, Delta Delta^T>`` when ``T^2 <= d p``, else the p x d per-example gradient."""
    return steps * steps <= d * p


def _ghost_plan(model: nn.Module, vouched: bool) -> tuple[list[tuple[str, nn.Module]], dict[nn.Module, tuple]]:
    """The trainable ``nn.Linear`` and ``nn.Conv2d`` layers (by module name) and the input rules of the leaf modules.

    Raises :class:`_NotEligible` when the ghost-norm identity does not hold for the model:
    a trainable parameter outside an ``nn.Linear`` or ``nn.Conv2d`` (or not its ``weight`` or
    ``bias``), a grouped or non-zero-padded ``nn.Conv2d``, a
    parameter or module used at two places, or a module that mixes examples. Modules this
    function does not know (custom ``forward``) are refused unless ``vouched``. A BatchNorm on
    batch statistics is the reason given first, wherever it is: no method applies to it.
    """
    try:
        return _ghost_layers_and_rules(model, vouched)
    except _NotEligible:
        for name, module in model.named_modules():
            problem = _batch_norm_problem(name or type(module).__name__, module)
            if problem is not None:
                raise _NotEligible(problem) from None
        raise


def _ghost_layers_and_rules(model: nn.Module, vouched: bool) -> tuple[list[tuple[str, nn.Module]],
                                                                      dict[nn.Module, tuple]]:
    layers: list[tuple[str, nn.Module]] = []
    rules: dict[nn.Module, tuple] = {}
    seen: set[int] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        label = name or type(module).__name__
        if id(module) in seen:
            raise _NotEligible(f"module {label!r} appears at two places in the model")
        seen.add(id(module))
        trainable = [n for n, p in module._parameters.items() if p is not None and p.requires_grad]
        if _same_forward(module, _GHOST_LAYERS):
            extra = [n for n in trainable if n not in ("weight", "bias")]
            if extra:
                raise _NotEligible(f"trainable parameter {extra[0]!r} of {label!r} is not a weight or bias of an "
                                   "nn.Linear or nn.Conv2d")
            if trainable:
                if isinstance(module, nn.Conv2d):
                    _check_conv(module, label)
                layers.append((name, module))
        elif trainable:
            prefix = f"{name}." if name else ""
            raise _NotEligible(f"trainable parameter {prefix}{trainable[0]} belongs to a {type(module).__name__}, "
                               "not an nn.Linear or nn.Conv2d")
        if type(module) is nn.Sequential:
            continue
        rule = _leaf_rule(module, label)
        if rule is not None:
            rules[module] = rule
        elif not vouched:
            raise _NotEligible(f"{label!r} ({type(module).__name__}) is not a module known to treat the examples "
                               "independently (method='ghost' takes your word for it)")
    ids = [id(p) for _, p in model.named_parameters(remove_duplicate=False) if p.requires_grad]
    if len(ids) != len(set(ids)):
        raise _NotEligible("a trainable parameter is shared between modules")
    return layers, rules


def _ghost_clipped_grad(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    max_norm: float,
    noise_multiplier: float,
    generator: torch.Generator | None,
    divisor: int | None,
    vouched: bool,
) -> PerSampleClipResult:
    """:func:`per_sample_clipped_grad` by ghost norms; raises :class:`_NotEligible` before drawing any noise."""
    batch = inputs.shape[0]
    params = _trainable(model)
    layers, rules = _ghost_plan(model, vouched)
    owner = {f"{name}.{kind}" if name else kind: (module, kind)
             for name, module in layers for kind in ("weight", "bias")}
    seen: dict[nn.Module, list[tuple[torch.Tensor, int, torch.Tensor]]] = {module: [] for _, module in layers}
    problems: list[str] = []

    def check_input(module: nn.Module, args: tuple) -> None:
        min_ndim, exact_ndim = rules[module]
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.ndim < min_ndim or (exact_ndim is not None and x.ndim != exact_ndim) \
                or x.shape[0] != batch:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            problems.append(f"a {type(module).__name__} got an input of shape {shape}, not a batch of {batch} "
                            "along dim 0" + (f" with {exact_ndim} dims" if exact_ndim is not None else ""))

    def record(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        # The layer's input (for its weight) and output (to differentiate by). The module
        # returns a copy, so that an in-place op after it (ReLU(inplace=True)) cannot change
        # the tensor whose gradient is taken.
        x = args[0] if args and isinstance(args[0], torch.Tensor) else torch.empty(0)
        seen[module].append((x, x._version, output))
        return output.clone()

    handles = [module.register_forward_pre_hook(check_input) for module in rules]
    handles += [module.register_forward_hook(record) for _, module in layers]
    try:
        with torch.enable_grad():
            output = model(inputs)
            if not isinstance(output, torch.Tensor) or output.ndim == 0 or output.shape[0] != batch:
                raise _NotEligible("the model's output is not a tensor with the batch along dim 0")
            losses = vmap(loss_fn)(output.unsqueeze(1), targets.unsqueeze(1))
            total = losses.sum() if isinstance(losses, torch.Tensor) else None
    finally:
        for handle in handles:
            handle.remove()
    if problems:
        raise _NotEligible(problems[0])
    for name, module in layers:
        if len(seen[module]) > 1:
            raise _NotEligible(f"{type(module).__name__} {name!r} ran {len(seen[module])} times in one forward "
                               "pass, not once")
    if not isinstance(losses, torch.Tensor) or losses.shape != (batch,):
        raise _NotEligible("loss_fn does not return a scalar for one example")

    # Which layers the loss reaches, from autograd's graph (structure, not values): a layer
    # that ran gets the gradient of its output, or None when the loss does not depend on it;
    # a layer that did not run (a custom forward skipped it) must not reach the loss either.
    ran = [(name, module) for name, module in layers if seen[module]]
    idle = [p for _, module in layers if not seen[module]
            for p in (module.weight, module.bias) if p is not None and p.requires_grad]
    wrt = [seen[module][0][2] for _, module in ran] + idle
    found = torch.autograd.grad(total, wrt, allow_unused=True) if wrt and total.requires_grad else [None] * len(wrt)
    if any(g is not None for g in found[len(ran):]):
        raise _NotEligible("a parameter of an nn.Linear or nn.Conv2d that did not run reaches the loss (used outside the "
                           "layer's forward)")
    if any(a._version != version for a, version, _ in (seen[module][0] for _, module in ran)):
        raise _NotEligible("a Linear or Conv2d layer's input was modified in place after the layer used it")
    reached = [(module, delta) for (_, module), delta in zip(ran, found) if delta is not None]

    # Per layer: A is (B, T, d) and Delta (B, T, p), T = 1 for 2-D inputs.
    first = next(iter(params.values()))
    acc = accumulation_dtype(first.dtype)
    factors: dict[nn.Module, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
    norms = _ExampleNorms(batch, first.device)
    for module, delta in reached:
        dtype = accumulation_dtype(module.weight.dtype)
        x = seen[module][0][0].detach()
        steps, d, p = _layer_dims(module, x, delta)
        if isinstance(module, nn.Conv2d) and steps > 1 and module.weight.requires_grad and not _use_gram(steps, d, p):
            # the per-example gradients by one grouped convolution: no unfolded input
            x, delta_map = x.to(dtype), delta.to(dtype)
            a, delta = None, delta_map.reshape(batch, p, steps).transpose(1, 2)
        else:
            a, delta = _unfolded(module, x, delta, batch, dtype)
        summed_delta = delta[:, 0] if steps == 1 else delta.sum(dim=1)  # the bias gradients, (B, p)
        per_example = None
        bias_rows = None
        if steps == 1:  # ||delta_i a_i^T|| = ||delta_i|| ||a_i||
            bias_rows = norms.rows(summed_delta)
            if module.weight.requires_grad:
                norms.add(bias_rows, norms.rows(a[:, 0]))
        elif module.weight.requires_grad and _use_gram(steps, d, p):
            # ||sum_t delta_t a_t^T||^2 = <A A^T, Delta Delta^T>, each example's factors divided by its
            # largest entry first, so that the squares in the Gram matrices neither overflow nor underflow
            a_scaled, a_largest = _max_scaled(a, dims=(1, 2))
            delta_scaled, delta_largest = _max_scaled(delta, dims=(1, 2))
            gram = torch.bmm(a_scaled, a_scaled.transpose(1, 2))
            gram.mul_(torch.bmm(delta_scaled, delta_scaled.transpose(1, 2)))
            weight_norm = gram.sum(dim=(1, 2)).clamp_(min=0).sqrt_()
            norms.add_exact(weight_norm.to(a_largest.dtype) * a_largest * delta_largest)
        elif module.weight.requires_grad:
            # the per-example gradients themselves, (B, p, d) (cheaper than the Gram matrices here): their
            # norms as the vmap path's, and the clipped sum their weighted sum (no second pass over A)
            per_example = torch.bmm(delta.transpose(1, 2), a) if a is not None else _conv_weight_grads(module, x, delta_map)
            norms.add(norms.rows(per_example.reshape(batch, p * d)))
        factors[module] = (a, delta, summed_delta, per_example)
        if module.bias is not None and module.bias.requires_grad:
            norms.add(bias_rows if bias_rows is not None else norms.rows(summed_delta))
    found_norms, found_scales, in_wide = norms.finish(max_norm)
    scales = found_scales.to(acc)
    cast = _Factors(found_scales, in_wide, scales)
    grads: dict[str, torch.Tensor] = {}
    for name, param in params.items():
        module, kind = owner[name]
        if module not in factors:
            continue  # the loss does not reach this layer: no gradient, as in a backward pass
        a, delta, summed_delta, per_example = factors[module]
        c, in_wide = cast.get(delta.dtype, delta.device)
        if kind == "weight" and per_example is not None:  # sum_i c_i g_i
            summed = torch.tensordot(c, per_example.to(c.dtype), dims=1).to(delta.dtype).reshape(param.shape)
        elif kind == "weight":  # sum_i c_i delta_i a_i^T = (c * Delta)^T A, scaling the smaller factor
            if delta.shape[2] <= a.shape[2]:
                delta, a = _scale_examples(delta, c, in_wide), a
            else:
                delta, a = delta, _scale_examples(a, c, in_wide)
            summed = torch.mm(delta.reshape(-1, delta.shape[2]).T, a.reshape(-1, a.shape[2])).reshape(param.shape)
        elif in_wide:
            summed = torch.mv(summed_delta.T.to(c.dtype), c).to(delta.dtype)
        else:
            summed = torch.mv(summed_delta.T, c)
        grads[name] = _noisy_mean(summed, noise_multiplier, max_norm, divisor, generator).to(param.dtype)
    return PerSampleClipResult(grads, found_norms.to(acc), scales)


def _scale_examples(x: torch.Tensor, c: torch.Tensor, in_wide: bool) -> torch.Tensor:
    """``x`` (B, ...) with example i multiplied by ``c[i]``, in ``x``'s dtype (computed in ``c``'s when ``in_wide``)."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    if in_wide:
        return (x.to(c.dtype) * c.reshape(shape)).to(x.dtype)
    return x * c.reshape(shape)


def _noisy_mean(summed: torch.Tensor, noise_multiplier: float, max_norm: float, divisor: int | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """(sum of clipped gradients + N(0, sigma^2 C^2 I)) / divisor, in place; noise drawn only when sigma > 0.

    ``divisor`` is ``None`` for ``loss_reduction="sum"`` (no division).
    """
    if noise_multiplier > 0:
        noise = torch.randn(summed.shape, generator=generator, dtype=summed.dtype, device=summed.device)
        summed.add_(noise, alpha=noise_multiplier * max_norm)
    return summed if divisor is None else summed.div_(divisor)


def per_sample_clipped_grad(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    max_norm: float,
    noise_multiplier: float = 0.0,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    method: Method = "auto",
    *,
    expected_batch_size: int | None = None,
    loss_reduction: Reduction = "mean",
) -> PerSampleClipResult:
    r"""The DP-SGD gradient: clip each example's gradient to C, sum, add noise, average.

    .. math::

        \bar g = \frac{1}{N}\Big(\sum_{i=1}^{B} g_i \min\Big(1, \frac{C}{\|g_i\|_2 + 10^{-6}}\Big)
        + \mathcal N(0, \sigma^2 C^2 I)\Big)

    Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar and Zhang (2016), "Deep
    Learning with Differential Privacy",
    `arXiv:1607.00133 <https://arxiv.org/abs/1607.00133>`__. :math:`\|g_i\|_2`
    is the norm of example i's gradient over all trainable parameters
    together (flat clipping); the 1e-6 guard is Opacus's (and torch's)
    convention. The divisor N is ``expected_batch_size`` when given (under
    Poisson sampling the batch size B is random, and the privacy analysis
    divides by its expectation), else the actual batch size B; with
    ``loss_reduction="sum"`` nothing is divided (N = 1). The noise is drawn from
    ``generator``, one ``randn`` of each parameter's shape, in
    ``model.named_parameters()`` order, only when ``noise_multiplier > 0`` and
    only for the parameters that get a gradient (below).

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
    control flow) nor for the models ``"auto"`` sends to ghost norms; with
    ``method="ghost"`` and a custom ``forward`` that branches on the data it is
    yours to ensure.

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
    * ``"ghost"``: ghost norms, for models whose trainable parameters all
      belong to ``torch.nn.Linear`` or ``torch.nn.Conv2d`` layers. Example i's gradient of a linear
      layer :math:`z = W a + b` is the outer product of the gradient
      :math:`\delta_i = \partial \ell_i / \partial z_i` with its input
      :math:`a_i`, so its norm needs no per-example gradient, and neither
      does the clipped sum, one matrix product per layer:

      .. math::

          \|\nabla_W \ell_i\|_F = \|\delta_i\|_2\, \|a_i\|_2, \qquad
          \|\nabla_b \ell_i\|_2 = \|\delta_i\|_2, \qquad
          \sum_{i} c_i\, \delta_i a_i^\top = (c \odot \Delta)^\top A

      with :math:`c_i` the clipping factor and :math:`A`, :math:`\Delta` the
      layer's inputs and output gradients, one row per example (Goodfellow
      2015, "Efficient Per-Example Gradient Computations",
      `arXiv:1510.01799 <https://arxiv.org/abs/1510.01799>`__). For inputs with
      more dimensions, :math:`(B, T, d)`, example i's weight gradient is
      :math:`\sum_t \delta_{it} a_{it}^\top`, whose squared norm is
      :math:`\langle A_i A_i^\top, \Delta_i \Delta_i^\top\rangle` (ghost
      clipping, Li, Tramèr, Liang and Hashimoto 2022, "Large Language Models
      Can Be Strong Differentially Private Learners",
      `arXiv:2110.05679 <https://arxiv.org/abs/2110.05679>`__), used when
      :math:`T^2 \le d p`; otherwise the :math:`p \times d` per-example
      gradients are formed (one batched product) and the clipped sum is their
      weighted sum. An ``nn.Conv2d`` (``groups=1``, zero padding; any stride,
      padding, dilation and kernel size) is such a layer with
      :math:`a_{it}` the columns of ``unfold(x_i)`` (:math:`d = C_{in} k_h k_w`,
      :math:`p = C_{out}`, T the L output positions); the choice between the
      L x L Gram matrices and the per-example gradients is made per layer
      (the "mixed" ghost clipping of Bu, Mao and Xu 2023, "Differentially
      Private Optimization on Large Model at Small Cost",
      `arXiv:2210.00038 <https://arxiv.org/abs/2210.00038>`__), and the
      per-example gradients of a convolution come from one grouped
      convolution, without unfolding its input. The inputs :math:`a_i` are recorded by forward hooks
      and the :math:`\delta_i` come from one backward pass of
      :math:`\sum_i \ell_i` to the layers' outputs, with the per-example losses
      :math:`\ell_i` from ``vmap(loss_fn)``. One forward and one backward
      pass for the whole batch; ``chunk_size`` is checked but not used. A layer
      whose output the loss does not reach, or that a custom ``forward`` does
      not call, gets no gradient; a parameter of such a layer that reaches the
      loss some other way is refused.
    * ``"auto"`` (the default): ``"ghost"`` where it is known to be exact, else
      ``"vmap"``. That is: every trainable parameter is the ``weight`` or
      ``bias`` of an ``nn.Linear`` or a zero-padded ``nn.Conv2d`` with ``groups=1``
      (a grouped convolution goes to ``"vmap"``) used once per forward pass, on an input with
      the batch along dim 0; and every other module is an ``nn.Sequential`` or a
      module known to treat the examples independently (activations, dropout
      (in training mode each example gets its own mask, and the clipped
      gradients are those under the masks of this forward pass, as in Opacus),
      ``Flatten``, ``LayerNorm``, ``GroupNorm``, BatchNorm in eval mode, frozen
      convolutions and pooling). With ``method="ghost"`` modules
      with their own ``forward`` are taken on trust to treat the examples
      independently; the other conditions still hold, and a ``ValueError``
      says which one fails.

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
    gradients on the ghost path) and combined in float64 (float32 on MPS);
    there a factor below float32's smallest normal number loses precision in
    the cast. The ghost norms of sequences (Gram matrices) are always
    computed on inputs and output gradients divided by each example's
    largest entry. No host-device synchronisation on either path.

    Non-finite values: an example whose gradient holds a NaN or inf has a
    non-finite norm and factor, and makes the averaged gradient NaN; it is not
    dropped silently.

    Args:
        model: the network (no BatchNorm in training mode; see :func:`per_sample_grads`).
        loss_fn: ``loss_fn(output, target) -> scalar`` for a batch of one example.
        inputs: the batch, examples along dim 0; may hold 0 examples.
        targets: the targets, examples along dim 0.
        max_norm: C, a number in [0, inf] (finite when there is noise).
        noise_multiplier: :math:`\sigma`, a finite number >= 0.
        generator: the random generator for the noise; the global one if ``None``.
        chunk_size: as in :func:`per_sample_grads` (the ``"vmap"`` path only), checked on every path.
        method: ``"auto"``, ``"ghost"`` or ``"vmap"``, as above.
        expected_batch_size: N, the divisor of the ``"mean"``: under Poisson sampling
            with rate q over a dataset of n examples, q n (Opacus's ``expected_batch_size``);
            ``None`` divides by the actual batch size B. Ignored by ``"sum"``, as in Opacus.
        loss_reduction: ``"mean"`` (the default) divides the noisy clipped sum by N;
            ``"sum"`` returns the noisy clipped sum itself (Opacus's ``loss_reduction``).

    Returns:
        A :class:`PerSampleClipResult`: the gradients by parameter name (the
        parameters the loss reaches), the per-example norms before clipping, and
        the per-example factors.

    Raises:
        TypeError: ``model`` is not a module, ``loss_fn`` is not callable, ``inputs``/``targets`` are not tensors, ``generator`` is not a ``torch.Generator``, or ``max_norm``/``noise_multiplier`` are not numbers; a trainable embedding has ``sparse=True``, or a recurrent layer gets a ``PackedSequence`` (as :func:`per_sample_grads`).
        ValueError: an argument is out of range (``max_norm`` < 0 or infinite with noise, ``noise_multiplier`` < 0, ``chunk_size`` or ``expected_batch_size`` not None or an int >= 1, ``method`` or ``loss_reduction`` not one of theirs); ``inputs`` and ``targets`` differ in batch size; the batch is empty with ``loss_reduction="mean"`` and no ``expected_batch_size``; the model holds a BatchNorm in training mode (or without running statistics), whose batch statistics mix the examples; ``method="ghost"`` for a model the ghost-norm identity does not fit; or ``loss_fn`` does not return a 0-dim loss for one example.
        RuntimeError: on the ``vmap`` path, a module draws random numbers (dropout in training mode; the ghost path takes it).

    References:
        * Abadi et al. (2016), "Deep Learning with Differential Privacy", `arXiv:1607.00133 <https://arxiv.org/abs/1607.00133>`__.
        * Li, Tramer, Liang and Hashimoto (2022), "Large Language Models Can Be Strong Differentially Private Learners" (ghost norms), `arXiv:2110.05679 <https://arxiv.org/abs/2110.05679>`__.
        * Opacus, ``DPOptimizer`` (``clip_and_accumulate``, ``add_noise``, ``scale_grad``), `opacus/optimizers/optimizer.py <https://github.com/meta-pytorch/opacus/blob/main/opacus/optimizers/optimizer.py>`__.

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
        >>> empty = gradclip.per_sample_clipped_grad(model, torch.nn.functional.mse_loss, x[:0], y[:0], 1.0,
        ...                                          expected_batch_size=4)
        >>> empty.grads["weight"], empty.norms  # no example, no noise: zero
        (tensor([[0.]]), tensor([]))
    """
    max_norm = _check_dp_args(max_norm, noise_multiplier, generator)
    _validate.check_choice("method", method, _METHODS)
    _validate.check_optional_int("chunk_size", chunk_size, 1)
    batch = _check_batch(inputs, targets)
    divisor = _check_reduction(batch, expected_batch_size, loss_reduction)
    if method != "vmap":
        _validate.check_callable("loss_fn", loss_fn, "loss_fn(output, target) -> scalar loss")
        try:
            return _ghost_clipped_grad(model, loss_fn, inputs, targets, max_norm, noise_multiplier, generator,
                                       divisor, vouched=method == "ghost")
        except _NotEligible as reason:
            if method == "ghost":
                raise ValueError(f"method='ghost' does not apply: {reason}") from None
    reached: set[str] = set()
    token = _REACHED.set(reached)
    try:
        samples = per_sample_grads(model, loss_fn, inputs, targets, chunk_size)
    finally:
        _REACHED.reset(token)
    first = next(iter(samples.values()))
    acc = accumulation_dtype(first.dtype)
    if len(reached) < len(samples):  # an empty batch, or parameters not found in the graph: ask autograd
        reached |= _reached(model, loss_fn, _trainable(model), inputs, targets)
    samples = {name: g for name, g in samples.items() if name in reached}
    norms = _ExampleNorms(batch, first.device)
    for g in samples.values():
        norms.add(norms.rows(g.reshape(batch, math.prod(g.shape[1:]))))
    found_norms, found_scales, in_wide = norms.finish(max_norm)
    scales = found_scales.to(acc)
    cast = _Factors(found_scales, in_wide, scales)
    grads: dict[str, torch.Tensor] = {}
    for name, g in samples.items():
        dtype = accumulation_dtype(g.dtype)
        c, in_wide = cast.get(dtype, g.device)
        summed = torch.tensordot(c, g.to(c.dtype), dims=1)
        grads[name] = _noisy_mean(summed.to(dtype), noise_multiplier, max_norm, divisor, generator).to(g.dtype)
    return PerSampleClipResult(grads, found_norms.to(acc), scales)


def per_sample_clip_grad_(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    max_norm: float,
    noise_multiplier: float = 0.0,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    method: Method = "auto",
    *,
    expected_batch_size: int | None = None,
    loss_reduction: Reduction = "mean",
) -> torch.Tensor:
    r"""Compute the DP-SGD gradient and accumulate it into each parameter's ``.grad``; return the per-example norms.

    .. math::

        \theta.\mathrm{grad} \mathrel{+}= \frac{1}{N}\Big(\sum_{i} g_i
        \min\Big(1, \frac{C}{\|g_i\| + 10^{-6}}\Big) + \mathcal N(0, \sigma^2 C^2 I)\Big)

    :func:`per_sample_clipped_grad` (Abadi et al. 2016,
    `arXiv:1607.00133 <https://arxiv.org/abs/1607.00133>`__), then written into
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
        max_norm: C, a number in [0, inf] (finite when there is noise).
        noise_multiplier: :math:`\sigma`, a finite number >= 0.
        generator: the random generator for the noise.
        chunk_size: examples per vectorised chunk, or ``None`` (the ``"vmap"`` path only).
        method: ``"auto"``, ``"ghost"`` (ghost norms, for models trained only in
            ``nn.Linear`` and ``nn.Conv2d`` layers) or ``"vmap"``, as in :func:`per_sample_clipped_grad`.
        expected_batch_size: N, the divisor of the ``"mean"`` under Poisson sampling
            (Opacus's ``expected_batch_size``); ``None`` divides by the batch size.
        loss_reduction: ``"mean"`` (divide by N) or ``"sum"`` (do not divide), as in Opacus.

    Returns:
        Each example's gradient norm before clipping, a 1-D tensor of length B.

    Raises:
        TypeError, ValueError: as :func:`per_sample_clipped_grad`.

    References:
        * Abadi et al. (2016), "Deep Learning with Differential Privacy", `arXiv:1607.00133 <https://arxiv.org/abs/1607.00133>`__.

    Example:
        >>> import torch, gradclip
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> norms = gradclip.per_sample_clip_grad_(model, torch.nn.functional.cross_entropy, x, y, max_norm=0.1)
        >>> norms.shape, bool(model.weight.grad.norm() <= 0.1 + 1e-6)
        (torch.Size([8]), True)
    """
    result = per_sample_clipped_grad(model, loss_fn, inputs, targets, max_norm, noise_multiplier, generator, chunk_size,
                                     method, expected_batch_size=expected_batch_size, loss_reduction=loss_reduction)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in result.grads:
                accumulate_(p, result.grads[name])  # into a GradBuffer's view if one holds p
    return result.norms
