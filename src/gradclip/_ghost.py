"""Per-sample clipping from one ordinary forward and backward pass: the hook path of :mod:`gradclip.per_sample`.

Forward hooks record each trainable layer's input :math:`a` and output :math:`z`; one backward pass
of the summed per-example losses gives each layer's output gradient :math:`\\delta` (and no weight
gradients). From ``(a, delta)`` each layer's handler computes its part of every example's gradient
norm and, once the clipping factors :math:`c_i` are known, the clipped sum
:math:`\\sum_i c_i g_i` of each of its parameters:

* ``nn.Linear`` and ``nn.Conv2d``: example i's weight gradient is :math:`\\sum_t \\delta_{it} a_{it}^T`
  (t over sequence positions or output pixels). Per layer, by cost (:func:`_use_gram`), either the
  ghost norm :math:`\\langle A_i A_i^T, \\Delta_i \\Delta_i^T\\rangle` (Li et al. 2022) with the clipped sum
  :math:`(c \\odot \\Delta)^T A` (Bu et al.'s book-keeping), or the per-example gradients themselves (one
  batched product, or one grouped convolution) and their weighted sum; with one position,
  :math:`\\|\\delta_i\\| \\|a_i\\|` (Goodfellow 2015).
* ``nn.Embedding``: example i's gradient has one row per distinct token, the sum of the output
  gradients of that token's positions: sorted per example, summed by segment, without reading
  how many tokens are distinct (no host sync); the clipped sum is torch's embedding backward of
  :math:`c \\odot \\delta`.
* ``nn.LayerNorm``, ``nn.RMSNorm`` and ``nn.GroupNorm``: their per-example gradients are as small as
  their parameters (:math:`\\sum \\delta \\odot \\hat x` and :math:`\\sum \\delta` over the positions,
  :math:`\\hat x` the normalised input, recomputed), so they are formed.

Every other module must keep the examples apart: the known ones (activations, pooling, dropout,
frozen layers...) by their rules, other modules' ``forward`` (a residual block, a custom
attention) checked once per model by running it on a few examples both in one batch and
one at a time under ``vmap`` (:func:`_examples_independent`).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap
from torch.nn.modules.batchnorm import _BatchNorm

from . import _vmappable
from ._example_norms import ExampleNorms, Factors, max_scaled
from ._norms import accumulation_dtype


class NotEligible(Exception):
    """The hook path does not apply to this model or batch; the message says why."""


# --- which modules keep the examples apart ------------------------------------------------------------------------

_ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.Softshrink, nn.Hardshrink, nn.LogSigmoid, nn.Threshold,
)
DROPOUT: tuple[type[nn.Module], ...] = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)
_SOFTMAX: tuple[type[nn.Module], ...] = (nn.Softmax, nn.LogSoftmax, nn.Softmin)
# Frozen spatial layers: examples stay independent when the input has its batch dimension (ndim = k + 2).
_SPATIAL: dict[type[nn.Module], int] = {
    **{cls: 3 for cls in (nn.Conv1d, nn.ConvTranspose1d, nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d,
                          nn.AdaptiveMaxPool1d)},
    **{cls: 4 for cls in (nn.Conv2d, nn.ConvTranspose2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                          nn.AdaptiveMaxPool2d)},
    **{cls: 5 for cls in (nn.Conv3d, nn.ConvTranspose3d, nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d,
                          nn.AdaptiveMaxPool3d)},
}
LAYER_NAMES = "nn.Linear, nn.Conv2d, nn.Embedding, nn.LayerNorm, nn.RMSNorm or nn.GroupNorm"


def same_forward(module: nn.Module, classes: tuple[type[nn.Module], ...]) -> bool:
    """``module`` is one of ``classes`` and does not override its ``forward``."""
    return any(isinstance(module, cls) and type(module).forward is cls.forward for cls in classes)


def batch_norm_problem(name: str, module: nn.Module) -> str | None:
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


def _stock(cls: type, bases: tuple[type[nn.Module], ...]) -> bool:
    """``cls`` is one of ``bases`` (or a subclass) and keeps its ``forward``."""
    return any(issubclass(cls, base) and cls.forward is base.forward for base in bases)


def _rule_of_type(cls: type) -> Callable[[nn.Module, str], tuple[int, int | None] | None] | None:
    """How to read the input rule of a module of class ``cls``, or ``None`` for a module not known to keep
    the examples apart (decided once per class: it depends on the class's ``forward`` only)."""
    if _stock(cls, (nn.Linear,)):
        return lambda module, name: (2, None)
    if _stock(cls, _ELEMENTWISE) or _stock(cls, (nn.Embedding,)):
        return lambda module, name: (1, None)
    if issubclass(cls, _BatchNorm):
        stock = _stock(cls, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))

        def batch_norm(module: nn.Module, name: str) -> tuple[int, int | None] | None:
            problem = batch_norm_problem(name, module)
            if problem is not None:
                raise NotEligible(problem)
            return (2, None) if stock else None
        return batch_norm
    if _stock(cls, DROPOUT):
        # in training mode each example gets its own mask (per entry or per channel): the examples stay
        # independent, and the ghost norms are those of the gradients under the masks this forward drew
        return lambda module, name: (1, None)
    if _stock(cls, _SOFTMAX):
        def softmax(module: nn.Module, name: str) -> tuple[int, int | None]:
            if module.dim is None or not (module.dim >= 1 or module.dim == -1):
                raise NotEligible(f"{name} ({type(module).__name__}, dim={module.dim}) may act along the batch "
                                  "dimension")
            return 2, None
        return softmax
    if _stock(cls, (nn.Flatten,)):
        def flatten(module: nn.Module, name: str) -> tuple[int, int | None]:
            if module.start_dim < 1:
                raise NotEligible(f"{name} (Flatten, start_dim={module.start_dim}) may merge the batch dimension")
            return 2, None
        return flatten
    if _stock(cls, (nn.Unflatten,)):
        def unflatten(module: nn.Module, name: str) -> tuple[int, int | None]:
            if not (module.dim >= 1 or module.dim == -1):
                raise NotEligible(f"{name} (Unflatten, dim={module.dim}) may split the batch dimension")
            return 2, None
        return unflatten
    if _stock(cls, (nn.LayerNorm, nn.RMSNorm)):
        return lambda module, name: (len(module.normalized_shape) + 1, None)
    if _stock(cls, (nn.GroupNorm,)):
        return lambda module, name: (2, None)
    for spatial, ndim in _SPATIAL.items():
        if _stock(cls, (spatial,)):
            return lambda module, name, ndim=ndim: (ndim, ndim)
    return None


_RULES: dict[type, Any] = {}


def _leaf_rule(module: nn.Module, name: str) -> tuple[int, int | None] | None:
    """``(min_ndim, exact_ndim)`` its input must have for a module known to keep examples apart, else ``None``.

    Raises :class:`NotEligible` for a known module that mixes examples (BatchNorm on batch
    statistics) or may act along the batch dimension.
    """
    cls = type(module)
    if cls not in _RULES:
        _RULES[cls] = _rule_of_type(cls)
    rule = _RULES[cls]
    return None if rule is None else rule(module, name)


# --- the per-layer cost model ---------------------------------------------------------------------------------------

# Above this many bytes of per-example gradients for one layer, Gram matrices that take less memory are used
# even where they cost more time.
PER_EXAMPLE_BYTES = 1 << 28


# Per-example gradients of one layer beyond this many bytes leave the CPU's cache: each pass over them
# cost about 5 times as much on the machine measured (see _use_gram).
_CACHE_BYTES = 1 << 25


def _use_gram(steps: int, d: int, p: int, on_cpu: bool = True, batch: int = 1, itemsize: int = 4) -> bool:
    r"""Per layer, the cheaper way to each example's ``||sum_t delta_t a_t^T||_F`` (Bu et al. 2023's mixed choice).

    Per example, with T positions, d inputs and p outputs: the Gram path costs the two T x T Gram
    matrices, :math:`T^2 (d + p)` multiply-adds, plus passes over the T (d + p) entries of A and
    Delta (unfolding, scaling each example by its largest entry), plus one product of T d p
    multiply-adds for the clipped sum at the speed of one large matrix product; the per-example
    path costs the same T d p multiply-adds as B small products, plus passes over the d p entries of
    each example's gradient (written, read for its norm, read for the weighted sum). On the CPU,
    with the constants fitted to both paths timed alone on 72 layer shapes at batch 64 (2-vCPU AMD
    EPYC, one thread; ``bench_peers.py --only dplayers`` times them on the zoo's layers and on wider
    ones), Gram matrices when

    .. math:: T^2 (d + p) + 200\, T (d + p) + 5 \cdot 10^4 \le 0.75\, T d p + m\, d p

    with m = 24 multiply-adds per entry of the per-example gradients, and m = 120 when the layer's
    B d p entries take more than 32 MiB (out of the cache); this picked the faster path on all 72
    shapes. Elsewhere (not measured: no accelerator was available) the rule of the reference code,
    fastDP's ``clipping_mode='MixOpt'``: Gram matrices when :math:`2 T^2 \le d p`, the one that takes
    less memory.
    """
    if not on_cpu:
        return 2 * steps * steps <= d * p
    memory = 120 if batch * d * p * itemsize > _CACHE_BYTES else 24
    return steps * steps * (d + p) + 200 * steps * (d + p) + 50_000 <= 0.75 * steps * d * p + memory * d * p


def _gram_instead(batch: int, steps: int, d: int, p: int, itemsize: int, on_cpu: bool) -> bool:
    """:func:`_use_gram`, or Gram matrices anyway when the per-example gradients would be too large and they are not."""
    if _use_gram(steps, d, p, on_cpu, batch, itemsize):
        return True
    return batch * d * p * itemsize > PER_EXAMPLE_BYTES and 2 * steps * steps < d * p


def gram_norms(a: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``||sum_t delta_it a_it^T||_F`` for each example from (B, T, d) and (B, T, p), in the wide dtype.

    :math:`\\langle A_i A_i^T, \\Delta_i \\Delta_i^T\\rangle`, each example's factors divided by their largest
    entry first, so that the squares in the Gram matrices neither overflow nor underflow.
    """
    a_scaled, a_largest = max_scaled(a, dims=(1, 2))
    delta_scaled, delta_largest = max_scaled(delta, dims=(1, 2))
    gram = torch.bmm(a_scaled, a_scaled.transpose(1, 2))
    gram.mul_(torch.bmm(delta_scaled, delta_scaled.transpose(1, 2)))
    weight_norm = gram.sum(dim=(1, 2)).clamp_(min=0).sqrt_()
    return weight_norm.to(a_largest.dtype) * a_largest * delta_largest


# --- layer handlers -------------------------------------------------------------------------------------------------

NormsFor = Callable[[str], ExampleNorms]


class _Layer:
    """One trainable layer: its parts of the per-example norms, then its parameters' clipped sums.

    ``names`` maps the parameter's attribute (``"weight"``, ``"bias"``) to its name in the model,
    for the trainable ones only.
    """

    def __init__(self, module: nn.Module, names: dict[str, str]) -> None:
        self.module, self.names = module, names
        self.per_example: dict[str, torch.Tensor] = {}  # formed per-example gradients, (B, *shape)
        self._rows: dict[tuple[int, str], int] = {}

    @property
    def dtype(self) -> torch.dtype:
        return accumulation_dtype(self.module.weight.dtype)

    def trains(self, kind: str) -> bool:
        return kind in self.names

    def rows(self, norms: ExampleNorms, key: str, rows: torch.Tensor) -> int:
        """``norms.rows(rows)``, registered once per accumulator (weight and bias may share one)."""
        index = self._rows.get((id(norms), key))
        if index is None:
            index = self._rows[(id(norms), key)] = norms.rows(rows)
        return index

    def formed(self, kind: str, grads: torch.Tensor, norms_for: NormsFor) -> None:
        """Per-example gradients (B, ...) of parameter ``kind``: their norms, kept for the weighted sum."""
        self.per_example[kind] = grads
        norms_for(self.names[kind]).add_rows(grads.reshape(grads.shape[0], math.prod(grads.shape[1:])))

    def norms(self, x: torch.Tensor, delta: torch.Tensor, norms_for: NormsFor) -> None:
        raise NotImplementedError

    def summed(self, kind: str, factors: Factors) -> torch.Tensor:
        """:math:`\\sum_i c_i g_i` for parameter ``kind``, in the accumulation dtype."""
        grads = self.per_example[kind]
        c, in_wide = factors.get(self.dtype, grads.device)
        shape = getattr(self.module, kind).shape
        return torch.tensordot(c, grads.to(c.dtype), dims=1).to(self.dtype).reshape(shape)


class _Product(_Layer):
    """``nn.Linear`` and ``nn.Conv2d``: example i's weight gradient is ``sum_t delta_it a_it^T``."""

    a: torch.Tensor | None = None  # (B, T, d) where the clipped sum is (c * Delta)^T A
    delta: torch.Tensor | None = None  # (B, T, p)
    bias_rows: torch.Tensor | None = None  # (B, p): each example's bias gradient

    def weight_norms(self, a: torch.Tensor, delta: torch.Tensor, norms_for: NormsFor) -> None:
        """The weight's norms from A (B, T, d) and Delta (B, T, p), by the product of row norms (T = 1) or Gram."""
        self.a, self.delta = a, delta
        norms = norms_for(self.names["weight"])
        if a.shape[1] == 1:  # ||delta_i a_i^T|| = ||delta_i|| ||a_i||
            norms.add(self.rows(norms, "delta", delta[:, 0]), self.rows(norms, "a", a[:, 0]))
        else:
            norms.add_exact(gram_norms(a, delta))

    def bias_norms(self, norms_for: NormsFor) -> None:
        if self.trains("bias"):
            norms = norms_for(self.names["bias"])
            norms.add(self.rows(norms, "delta", self.bias_rows))

    def summed(self, kind: str, factors: Factors) -> torch.Tensor:
        if kind in self.per_example:
            return super().summed(kind, factors)
        c, in_wide = factors.get(self.dtype, self.bias_rows.device)
        if kind == "bias":
            if in_wide:
                return torch.mv(self.bias_rows.T.to(c.dtype), c).to(self.dtype)
            return torch.mv(self.bias_rows.T, c)
        delta, a = self.delta, self.a  # sum_i c_i delta_i a_i^T = (c * Delta)^T A, scaling the smaller factor
        if delta.shape[2] <= a.shape[2]:
            delta = _scale_examples(delta, c, in_wide)
        else:
            a = _scale_examples(a, c, in_wide)
        summed = torch.mm(delta.reshape(-1, delta.shape[2]).T, a.reshape(-1, a.shape[2]))
        return summed.reshape(self.module.weight.shape)


def _scale_examples(x: torch.Tensor, c: torch.Tensor, in_wide: bool) -> torch.Tensor:
    """``x`` (B, ...) with example i multiplied by ``c[i]``, in ``x``'s dtype (computed in ``c``'s when ``in_wide``)."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    if in_wide:
        return (x.to(c.dtype) * c.reshape(shape)).to(x.dtype)
    return x * c.reshape(shape)


class _Linear(_Product):
    def norms(self, x: torch.Tensor, delta: torch.Tensor, norms_for: NormsFor) -> None:
        batch, d, p = x.shape[0], x.shape[-1], delta.shape[-1]
        steps = math.prod(x.shape[1:-1])  # (not -1: ambiguous for an empty batch)
        a = x.reshape(batch, steps, d).to(self.dtype)
        delta = delta.reshape(batch, steps, p).to(self.dtype)
        self.bias_rows = delta[:, 0] if steps == 1 else delta.sum(dim=1)
        if self.trains("weight"):
            if steps > 1 and not _gram_instead(batch, steps, d, p, a.element_size(), a.device.type == "cpu"):
                self.formed("weight", torch.bmm(delta.transpose(1, 2), a), norms_for)  # (B, p, d)
            else:
                self.weight_norms(a, delta, norms_for)
        self.bias_norms(norms_for)


class _Conv2d(_Product):
    def norms(self, x: torch.Tensor, delta: torch.Tensor, norms_for: NormsFor) -> None:
        module = self.module
        batch, p = x.shape[0], delta.shape[1]
        steps, d = delta.shape[2] * delta.shape[3], module.weight[0].numel()
        delta = delta.to(self.dtype)
        self.bias_rows = delta.sum(dim=(2, 3))
        if self.trains("weight"):
            if steps > 1 and not _gram_instead(batch, steps, d, p, delta.element_size(), delta.device.type == "cpu"):
                # the per-example gradients by one grouped convolution: no unfolded input
                self.formed("weight", _conv_weight_grads(module, x.to(self.dtype), delta), norms_for)
            else:
                pads = conv_padding(module)
                x = x.to(self.dtype)
                if any(pads):
                    x = F.pad(x, pads)
                u = F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)  # (B, d, T)
                self.weight_norms(u.transpose(1, 2), delta.reshape(batch, p, steps).transpose(1, 2), norms_for)
        self.bias_norms(norms_for)


def conv_padding(module: nn.Conv2d) -> list[int]:
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
        pads = conv_padding(module)
        x, padding = (F.pad(x, pads) if any(pads) else x), (0, 0)
    g = torch.ops.aten.convolution_backward(
        delta.reshape(1, batch * c_out, *delta.shape[2:]), x.reshape(1, batch * c_in, *x.shape[2:]),
        x.new_empty((batch * c_out, c_in, *module.kernel_size)), None, module.stride, padding, module.dilation,
        False, (0, 0), batch, (False, True, False))[1]
    return g.reshape(batch, c_out, -1)


class _Embedding(_Layer):
    """Example i's gradient: for each distinct token v of the example, the row ``sum_{t: id_t = v} delta_t``."""

    def norms(self, x: torch.Tensor, delta: torch.Tensor, norms_for: NormsFor) -> None:
        module = self.module
        batch, p = x.shape[0], delta.shape[-1]
        steps = math.prod(x.shape[1:])
        ids = x.reshape(batch, steps)
        delta = delta.reshape(batch, steps, p).to(self.dtype)
        if module.padding_idx is not None:  # torch's backward leaves the padding row's gradient zero
            delta = delta.masked_fill((ids == module.padding_idx).unsqueeze(-1), 0)
        self.ids, self.delta = ids, delta
        if steps == 1:
            rows = delta[:, 0]
        else:
            # each example's tokens sorted; the positions of one token are a run, each run summed into the row
            # of its rank among the example's distinct tokens (rows past the last distinct token stay zero)
            ordered, order = ids.sort(dim=1)
            fresh = torch.ones_like(ordered, dtype=torch.bool)
            fresh[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
            run = (fresh.cumsum(dim=1) - 1).unsqueeze(-1).expand(batch, steps, p)
            moved = delta.gather(1, order.unsqueeze(-1).expand(batch, steps, p))
            rows = torch.zeros_like(delta).scatter_add_(1, run, moved).reshape(batch, steps * p)
        norms_for(self.names["weight"]).add_rows(rows)

    def summed(self, kind: str, factors: Factors) -> torch.Tensor:
        c, in_wide = factors.get(self.dtype, self.delta.device)
        scaled = _scale_examples(self.delta, c, in_wide)
        module = self.module
        padding = module.padding_idx if module.padding_idx is not None else -1
        return torch.ops.aten.embedding_dense_backward(scaled, self.ids, module.num_embeddings, padding, False)


class _Normalization(_Layer):
    """``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``: y = x_hat * weight + bias, per-example gradients formed."""

    def norms(self, x: torch.Tensor, delta: torch.Tensor, norms_for: NormsFor) -> None:
        module = self.module
        x, delta = x.to(self.dtype), delta.to(self.dtype)
        if isinstance(module, nn.GroupNorm):
            normalised = F.group_norm(x, module.num_groups, eps=module.eps)
            dims = tuple(range(2, x.ndim))  # over the positions: (B, C)
        else:
            shape = tuple(module.normalized_shape)
            if isinstance(module, nn.RMSNorm):
                normalised = F.rms_norm(x, shape, eps=module.eps)
            else:
                normalised = F.layer_norm(x, shape, eps=module.eps)
            dims = tuple(range(1, x.ndim - len(shape)))  # over the positions: (B, *normalized_shape)
        if self.trains("weight"):
            grads = delta * normalised
            self.formed("weight", grads.sum(dim=dims) if dims else grads, norms_for)
        if self.trains("bias"):
            self.formed("bias", delta.sum(dim=dims) if dims else delta, norms_for)


_HANDLERS: tuple[tuple[type[nn.Module], type[_Layer]], ...] = (
    (nn.Linear, _Linear), (nn.Conv2d, _Conv2d), (nn.Embedding, _Embedding),
    (nn.LayerNorm, _Normalization), (nn.RMSNorm, _Normalization), (nn.GroupNorm, _Normalization),
)


_HANDLER_OF_TYPE: dict[type, type[_Layer] | None] = {}


def _handler(module: nn.Module) -> type[_Layer] | None:
    cls = type(module)
    if cls not in _HANDLER_OF_TYPE:
        _HANDLER_OF_TYPE[cls] = next((handler for base, handler in _HANDLERS if _stock(cls, (base,))), None)
    return _HANDLER_OF_TYPE[cls]


def _check_layer(module: nn.Module, label: str) -> None:
    """Raise :class:`NotEligible` for a handled layer whose options its handler does not cover."""
    kind = type(module).__name__
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise NotEligible(f"{label!r} (Conv2d) has groups={module.groups}: ghost norms of grouped convolutions "
                              "are not implemented (only groups=1)")
        if module.padding_mode != "zeros":
            raise NotEligible(f"{label!r} (Conv2d) pads with padding_mode={module.padding_mode!r}: ghost norms need "
                              "zero padding")
    if isinstance(module, nn.Embedding):
        if module.sparse:
            raise NotEligible(f"{label!r} (Embedding) has sparse=True")
        if module.scale_grad_by_freq:
            raise NotEligible(f"{label!r} ({kind}) has scale_grad_by_freq=True: its gradient divides by how often "
                              "each token occurs in the whole batch, which mixes the examples")


# --- the plan: the layers, the rules, the modules to check -------------------------------------------------------

class Plan:
    """The trainable layers (name, module, handler class), the input rules of the leaf modules, and the
    modules with their own ``forward`` whose independence of the examples is not known (their labels)."""

    def __init__(self) -> None:
        self.layers: list[tuple[str, nn.Module, type[_Layer]]] = []
        self.rules: dict[nn.Module, tuple[int, int | None]] = {}
        self.unknown: list[str] = []


def plan(model: nn.Module) -> Plan:
    """Raises :class:`NotEligible` when the hook path cannot apply to the model: a trainable parameter
    outside a handled layer (or not its ``weight`` or ``bias``), options a handler does not cover, a
    parameter or module used at two places, or a module that mixes examples. A BatchNorm on batch
    statistics is the reason given first, wherever it is: no method applies to it.
    """
    try:
        return _plan(model)
    except NotEligible:
        for name, module in model.named_modules():
            problem = batch_norm_problem(name or type(module).__name__, module)
            if problem is not None:
                raise NotEligible(problem) from None
        raise


def _plan(model: nn.Module) -> Plan:
    found = Plan()
    seen: set[int] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        label = name or type(module).__name__
        if id(module) in seen:
            raise NotEligible(f"module {label!r} appears at two places in the model")
        seen.add(id(module))
        trainable = [n for n, p in module._parameters.items() if p is not None and p.requires_grad]
        handler = _handler(module)
        if trainable:
            prefix = f"{name}." if name else ""
            if handler is None:
                raise NotEligible(f"trainable parameter {prefix}{trainable[0]} belongs to a {type(module).__name__}, "
                                  f"not an {LAYER_NAMES}")
            extra = [n for n in trainable if n not in ("weight", "bias")]
            if extra:
                raise NotEligible(f"trainable parameter {extra[0]!r} of {label!r} is not a weight or bias of an "
                                  f"{LAYER_NAMES}")
            _check_layer(module, label)
            found.layers.append((name, module, handler))
        if type(module) is nn.Sequential:
            continue
        rule = _leaf_rule(module, label)
        if rule is not None:
            found.rules[module] = rule
        else:
            found.unknown.append(f"{label!r} ({type(module).__name__})")
    ids = [id(p) for _, p in model.named_parameters(remove_duplicate=False) if p.requires_grad]
    if len(ids) != len(set(ids)):
        raise NotEligible("a trainable parameter is shared between modules")
    return found


# --- custom modules: checked once per model -----------------------------------------------------------------------

# model -> (what it was checked with, whether its examples stay apart)
_CHECKED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, bool]] = weakref.WeakKeyDictionary()
PROBE_EXAMPLES = 4


def _signature(model: nn.Module) -> tuple:
    return tuple((id(module), type(module), module.training) for module in model.modules())


def examples_independent(model: nn.Module, inputs: torch.Tensor) -> bool:
    """Whether the model's batched forward pass treats the examples independently, checked once per model.

    The first examples of the batch (up to ``PROBE_EXAMPLES``) run through the model together and
    one at a time under ``vmap`` (without gradients, dropout modules switched off for the check);
    the outputs must agree to within the square root of the dtype's epsilon, relative to their
    largest entry. A model that mixes examples (a mean over the batch, BatchNorm-like statistics),
    that ``vmap`` cannot run, or whose output is not a tensor fails. The verdict is kept for the
    model while its modules and their training modes stay the same. Reading it is one host read
    (one device synchronisation) on the first call. A batch of one example cannot mix anything:
    it passes without a check.
    """
    if inputs.shape[0] < 2:
        return True
    signature = _signature(model)
    known = _CHECKED.get(model)
    if known is not None and known[0] == signature:
        return known[1]
    verdict = _probe(model, inputs[:PROBE_EXAMPLES])
    _CHECKED[model] = (signature, verdict)
    return verdict


def _probe(model: nn.Module, x: torch.Tensor) -> bool:
    dropouts = [m for m in model.modules() if isinstance(m, DROPOUT) and m.training]
    try:
        for module in dropouts:
            module.training = False
        with torch.no_grad(), _vmappable.prepared(model, x):
            together = model(x)
            alone = vmap(lambda one: model(one.unsqueeze(0)).squeeze(0))(x)
    except Exception:  # vmap cannot run it, or it needs the batch: not shown independent
        return False
    finally:
        for module in dropouts:
            module.training = True
    if not isinstance(together, torch.Tensor) or not isinstance(alone, torch.Tensor) \
            or together.shape != alone.shape or not together.is_floating_point():
        return False
    tolerance = torch.finfo(together.dtype).eps ** 0.5
    scale = together.abs().amax() if together.numel() else together.new_zeros(())
    return bool(((together - alone).abs().amax() <= tolerance * scale + torch.finfo(together.dtype).tiny).all())


# --- the pass -------------------------------------------------------------------------------------------------------

class Pass:
    """One forward and backward pass of the hook path over a batch: the handlers with their norm parts."""

    def __init__(self, handlers: list[_Layer], owner: dict[str, tuple[_Layer, str]]) -> None:
        self.handlers, self.owner = handlers, owner

    def summed(self, name: str, factors: Factors) -> torch.Tensor | None:
        """The clipped sum of parameter ``name``, or ``None`` when the loss does not reach its layer."""
        found = self.owner.get(name)
        if found is None:
            return None
        handler, kind = found
        return handler.summed(kind, factors)


def run(model: nn.Module, loss_fn: Callable, inputs: torch.Tensor, targets: torch.Tensor, vouched: bool,
        norms_for: NormsFor) -> Pass:
    """The forward and backward pass; every reached layer's norm parts registered through ``norms_for``.

    Raises :class:`NotEligible` (before anything is random) when the model does not fit.
    """
    batch = inputs.shape[0]
    found = plan(model)
    if found.unknown and not vouched and not examples_independent(model, inputs):
        raise NotEligible(f"{found.unknown[0]} is not a module known to treat the examples independently, and "
                          "running the model on its first examples in one batch and one at a time under vmap "
                          "did not show that it does (method='ghost' takes your word for it)")
    rules = found.rules
    seen: dict[nn.Module, list[tuple[torch.Tensor, int, torch.Tensor]]] = {m: [] for _, m, _ in found.layers}
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
    handles += [module.register_forward_hook(record) for _, module, _ in found.layers]
    try:
        with torch.enable_grad():
            output = model(inputs)
            if not isinstance(output, torch.Tensor) or output.ndim == 0 or output.shape[0] != batch:
                raise NotEligible("the model's output is not a tensor with the batch along dim 0")
            losses = per_example_losses(loss_fn, output, targets)
            total = losses.sum() if isinstance(losses, torch.Tensor) else None
    finally:
        for handle in handles:
            handle.remove()
    if problems:
        raise NotEligible(problems[0])
    for name, module, _ in found.layers:
        if len(seen[module]) > 1:
            raise NotEligible(f"{type(module).__name__} {name!r} ran {len(seen[module])} times in one forward "
                              "pass, not once")
    if not isinstance(losses, torch.Tensor) or losses.shape != (batch,):
        raise NotEligible("loss_fn does not return a scalar for one example")

    # Which layers the loss reaches, from autograd's graph (structure, not values): a layer that ran
    # gets the gradient of its output, or None when the loss does not depend on it. Each trainable
    # parameter must reach the loss through its own layer's operation only: once if the layer's
    # output reaches the loss, never otherwise (a weight used outside its layer, or a layer that
    # did not run whose weight is used elsewhere, would be missed by the layer's gradient).
    ran = [(name, module, handler) for name, module, handler in found.layers if seen[module]]
    outputs = [seen[module][0][2] for _, module, _ in ran]
    deltas = torch.autograd.grad(total, outputs, allow_unused=True) if outputs and total.requires_grad \
        else [None] * len(outputs)
    uses = _parameter_uses(total)
    reaching = {module for (_, module, _), delta in zip(ran, deltas) if delta is not None}
    for name, module, _ in found.layers:
        for kind, p in module._parameters.items():
            if p is None or not p.requires_grad or uses.get(id(p), 0) == (1 if module in reaching else 0):
                continue
            label = f"{name}.{kind}" if name else kind
            if not seen[module]:
                raise NotEligible(f"{label} of a {type(module).__name__} that did not run reaches the loss (used "
                                  "outside the layer's forward)")
            raise NotEligible(f"{label} of a {type(module).__name__} reaches the loss other than through the layer's "
                              "own forward (also used outside it)")
    if any(a._version != version for a, version, _ in (seen[module][0] for _, module, _ in ran)):
        raise NotEligible("a layer's input was modified in place after the layer used it")

    handlers: list[_Layer] = []
    owner: dict[str, tuple[_Layer, str]] = {}
    for (name, module, handler_class), delta in zip(ran, deltas):
        if delta is None:
            continue  # the loss does not reach this layer: no gradient, as in a backward pass
        prefix = f"{name}." if name else ""
        names = {kind: prefix + kind for kind, p in module._parameters.items() if p is not None and p.requires_grad}
        handler = handler_class(module, names)
        handler.norms(seen[module][0][0].detach(), delta, norms_for)
        handlers.append(handler)
        owner.update({full: (handler, kind) for kind, full in names.items()})
    return Pass(handlers, owner)


def per_example_losses(loss_fn: Callable, output: torch.Tensor, targets: torch.Tensor) -> Any:
    """Each example's ``loss_fn(output[i:i+1], targets[i:i+1])``: ``vmap(loss_fn)`` over the examples, or, for
    torch's losses that average over their entries (below), one call of the unreduced loss averaged per example.

    The known losses are ``F.cross_entropy``, ``F.nll_loss``, ``F.mse_loss``, ``F.l1_loss``,
    ``F.binary_cross_entropy_with_logits`` and their modules with ``reduction="mean"`` and no class
    weights; cross-entropy and NLL average over the targets that are not ``ignore_index`` (an example
    whose targets are all ignored gets 0 / 0 = NaN, as the mean over its batch of one). ``vmap``
    would run them through torch's Python decompositions, about 0.5 ms per call on a CPU.
    """
    known = _known_loss(loss_fn)
    if known is not None and output.ndim >= 1 and output.is_floating_point():
        kind, options = known
        fast = _unreduced(kind, options, output, targets)
        if fast is not None:
            return fast
    return vmap(loss_fn)(output.unsqueeze(1), targets.unsqueeze(1))


_CLASS_LOSSES = {F.cross_entropy: "cross_entropy", F.nll_loss: "nll"}
_ENTRY_LOSSES = {F.mse_loss: F.mse_loss, F.l1_loss: F.l1_loss,
                 F.binary_cross_entropy_with_logits: F.binary_cross_entropy_with_logits}
_LOSS_MODULES = {nn.CrossEntropyLoss: "cross_entropy", nn.NLLLoss: "nll", nn.MSELoss: F.mse_loss,
                 nn.L1Loss: F.l1_loss, nn.BCEWithLogitsLoss: F.binary_cross_entropy_with_logits}


def _known_loss(loss_fn: Callable) -> tuple[Any, dict[str, Any]] | None:
    try:
        if loss_fn in _CLASS_LOSSES:
            return _CLASS_LOSSES[loss_fn], {"ignore_index": -100, "label_smoothing": 0.0}
        if loss_fn in _ENTRY_LOSSES:
            return _ENTRY_LOSSES[loss_fn], {}
    except TypeError:  # an unhashable callable
        return None
    kind = _LOSS_MODULES.get(type(loss_fn))  # (the exact class: a subclass may change forward)
    if kind is None:
        return None
    if loss_fn.reduction != "mean" or getattr(loss_fn, "weight", None) is not None \
            or getattr(loss_fn, "pos_weight", None) is not None:
        return None
    if kind in ("cross_entropy", "nll"):
        return kind, {"ignore_index": loss_fn.ignore_index, "label_smoothing": getattr(loss_fn, "label_smoothing", 0.0)}
    return kind, {}


def _unreduced(kind: Any, options: dict[str, Any], output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
    """Per-example means of torch's unreduced loss, or ``None`` when the shapes are not the plain ones."""
    if kind in ("cross_entropy", "nll"):
        if targets.is_floating_point():  # class probabilities (cross-entropy only), the same shape as the output
            if kind != "cross_entropy" or targets.shape != output.shape or output.ndim < 2:
                return None
            entries = F.cross_entropy(output, targets, reduction="none", label_smoothing=options["label_smoothing"])
            return entries if entries.ndim == 1 else entries.flatten(1).mean(dim=1)
        if targets.dtype != torch.long or output.ndim < 2 or targets.shape != (output.shape[0], *output.shape[2:]):
            return None
        if kind == "cross_entropy":
            entries = F.cross_entropy(output, targets, reduction="none", **options)
        else:
            entries = F.nll_loss(output, targets, reduction="none", ignore_index=options["ignore_index"])
        counted = targets != options["ignore_index"]
        if entries.ndim == 1:
            return entries / counted
        return entries.flatten(1).sum(dim=1) / counted.flatten(1).sum(dim=1)
    if targets.shape != output.shape or not targets.is_floating_point():
        return None
    entries = kind(output, targets, reduction="none")
    return entries if entries.ndim == 1 else entries.flatten(1).mean(dim=1)


def _parameter_uses(total: torch.Tensor) -> dict[int, int]:
    """For each leaf tensor (by id) that ``total``'s autograd graph reaches, how many operations use it."""
    uses: dict[int, int] = {}
    seen: set[Any] = set()
    stack = [total.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for next_node, _ in node.next_functions:
            if next_node is None:
                continue
            variable = getattr(next_node, "variable", None)  # an AccumulateGrad node: a leaf
            if variable is not None:
                uses[id(variable)] = uses.get(id(variable), 0) + 1
            else:
                stack.append(next_node)
    return uses
