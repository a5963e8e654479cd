"""Per-sample gradient clipping for differentially private SGD, with ``torch.func`` or ghost norms."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.func import functional_call, grad, vmap

from . import _validate
from ._norms import accumulation_dtype
from ._scaling import clip_coefficient

__all__ = ["PerSampleClipResult", "per_sample_clip_grad_", "per_sample_clipped_grad", "per_sample_grads"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Method = Literal["auto", "ghost", "vmap"]
_METHODS = ("auto", "ghost", "vmap")


class PerSampleClipResult(NamedTuple):
    """What :func:`per_sample_clipped_grad` computed.

    Attributes:
        grads: parameter name to the averaged, clipped (and noised) gradient.
        norms: each example's gradient norm before clipping, a 1-D tensor of length B.
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
    if inputs.shape[0] == 0:
        raise ValueError("inputs must hold at least one example, got a batch of 0")
    return inputs.shape[0]


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
    per-example gradient: use GroupNorm or LayerNorm, as DP-SGD requires anyway.
    Random modules (dropout) raise under ``vmap``'s default ``randomness="error"``.

    Args:
        model: the network; its parameters with ``requires_grad`` are differentiated.
        loss_fn: ``loss_fn(output, target) -> scalar``, e.g. ``torch.nn.functional.cross_entropy``.
        inputs: the batch, examples along dim 0.
        targets: the targets, examples along dim 0.
        chunk_size: examples per vectorised chunk (less memory), or ``None`` for all at once.

    Returns:
        Parameter name to a tensor of shape ``(B, *param.shape)``.

    Raises:
        TypeError: ``model`` is not a module, ``loss_fn`` is not callable, or ``inputs``/``targets`` are not tensors.
        ValueError: ``inputs`` and ``targets`` differ in batch size or hold no example, ``chunk_size`` is not None or an int >= 1, or the model has no trainable or initialised parameters.

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
    _check_batch(inputs, targets)
    params = _trainable(model)
    frozen = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def loss_of_one(trainable: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        output = functional_call(model, {**frozen, **buffers, **trainable}, (x.unsqueeze(0),))
        return loss_fn(output, y.unsqueeze(0))

    return vmap(grad(loss_of_one), in_dims=(None, 0, 0), chunk_size=chunk_size)(params, inputs, targets)


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
    statistics), draws random numbers (dropout in training mode), or may act along the batch dimension.
    """
    if _same_forward(module, (nn.Linear,)) or _same_forward(module, _ELEMENTWISE):
        return 2 if isinstance(module, nn.Linear) else 1, None
    if isinstance(module, _BatchNorm):
        if module.training or module.running_mean is None or module.running_var is None:
            raise _NotEligible(f"{name} ({type(module).__name__}) normalises with batch statistics, "
                               "which mix the examples")
        return (2, None) if _same_forward(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) else None
    if _same_forward(module, _DROPOUT):
        if module.training and module.p > 0:
            raise _NotEligible(f"{name} ({type(module).__name__}) is in training mode: put the model in eval mode")
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


def _ghost_plan(model: nn.Module, vouched: bool) -> tuple[list[tuple[str, nn.Linear]], dict[nn.Module, tuple]]:
    """The trainable ``nn.Linear`` layers (by module name) and the input rules of the other leaf modules.

    Raises :class:`_NotEligible` when the ghost-norm identity does not hold for the model:
    a trainable parameter outside an ``nn.Linear`` (or not its ``weight`` or ``bias``), a
    parameter or module used at two places, or a module that mixes examples. Modules this
    function does not know (custom ``forward``) are refused unless ``vouched``.
    """
    layers: list[tuple[str, nn.Linear]] = []
    rules: dict[nn.Module, tuple] = {}
    seen: set[int] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        label = name or type(module).__name__
        if id(module) in seen:
            raise _NotEligible(f"module {label!r} appears at two places in the model")
        seen.add(id(module))
        trainable = [n for n, p in module._parameters.items() if p is not None and p.requires_grad]
        if _same_forward(module, (nn.Linear,)):
            extra = [n for n in trainable if n not in ("weight", "bias")]
            if extra:
                raise _NotEligible(f"trainable parameter {extra[0]!r} of {label!r} is not an nn.Linear weight or bias")
            if trainable:
                layers.append((name, module))
        elif trainable:
            prefix = f"{name}." if name else ""
            raise _NotEligible(f"trainable parameter {prefix}{trainable[0]} belongs to a {type(module).__name__}, "
                               "not an nn.Linear")
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
        if len(seen[module]) != 1:
            raise _NotEligible(f"nn.Linear {name!r} ran {len(seen[module])} times in one forward pass, not once")
    if not isinstance(losses, torch.Tensor) or losses.shape != (batch,):
        raise _NotEligible("loss_fn does not return a scalar for one example")
    deltas = torch.autograd.grad(total, [seen[module][0][2] for _, module in layers],
                                 allow_unused=True, materialize_grads=True)
    if any(a._version != version for a, version, _ in (seen[module][0] for _, module in layers)):
        raise _NotEligible("a Linear layer's input was modified in place after the layer used it")

    # Per layer: A is (B, T, d) and Delta (B, T, p), T = 1 for 2-D inputs.
    first = next(iter(params.values()))
    acc = accumulation_dtype(first.dtype)
    factors: dict[nn.Module, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    partial: list[torch.Tensor] = []
    for (_, module), delta in zip(layers, deltas):
        a = seen[module][0][0].detach()
        dtype = accumulation_dtype(module.weight.dtype)
        a = a.reshape(batch, -1, a.shape[-1]).to(dtype)
        delta = delta.reshape(batch, -1, delta.shape[-1]).to(dtype)
        steps, d, p = a.shape[1], a.shape[2], delta.shape[2]
        summed_delta = delta[:, 0] if steps == 1 else delta.sum(dim=1)  # the bias gradients, (B, p)
        factors[module] = (a, delta, summed_delta)
        if module.weight.requires_grad:
            if steps == 1:  # ||delta_i a_i^T|| = ||delta_i|| ||a_i||
                weight_norm = torch.linalg.vector_norm(delta[:, 0], dim=1) * torch.linalg.vector_norm(a[:, 0], dim=1)
            elif steps * steps <= d * p:  # ||sum_t delta_t a_t^T||^2 = <A A^T, Delta Delta^T>
                gram = torch.bmm(a, a.transpose(1, 2)).mul_(torch.bmm(delta, delta.transpose(1, 2)))
                weight_norm = gram.sum(dim=(1, 2)).clamp_(min=0).sqrt_()
            else:
                weight_norm = torch.linalg.vector_norm(torch.bmm(delta.transpose(1, 2), a), dim=(1, 2))
            partial.append(weight_norm.to(first.device))
        if module.bias is not None and module.bias.requires_grad:
            partial.append(torch.linalg.vector_norm(summed_delta, dim=1).to(first.device))
    norms = torch.linalg.vector_norm(torch.stack(partial, dim=1), dim=1).to(acc)
    scales = clip_coefficient(max_norm, norms)
    grads: dict[str, torch.Tensor] = {}
    for name, param in params.items():
        module, kind = owner[name]
        a, delta, summed_delta = factors[module]
        c = scales.to(device=delta.device, dtype=delta.dtype)
        if kind == "weight":  # sum_i c_i delta_i a_i^T = (c * Delta)^T A, scaling the smaller factor
            if delta.shape[2] <= a.shape[2]:
                delta, a = delta * c[:, None, None], a
            else:
                delta, a = delta, a * c[:, None, None]
            summed = torch.mm(delta.reshape(-1, delta.shape[2]).T, a.reshape(-1, a.shape[2]))
        else:
            summed = torch.mv(summed_delta.T, c)
        grads[name] = _noisy_mean(summed, noise_multiplier, max_norm, batch, generator).to(param.dtype)
    return PerSampleClipResult(grads, norms, scales)


def _noisy_mean(summed: torch.Tensor, noise_multiplier: float, max_norm: float, batch: int,
                generator: torch.Generator | None) -> torch.Tensor:
    """(sum of clipped gradients + N(0, sigma^2 C^2 I)) / B, in place; noise drawn only when sigma > 0."""
    if noise_multiplier > 0:
        noise = torch.randn(summed.shape, generator=generator, dtype=summed.dtype, device=summed.device)
        summed.add_(noise, alpha=noise_multiplier * max_norm)
    return summed.div_(batch)


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
) -> PerSampleClipResult:
    r"""The DP-SGD gradient: clip each example's gradient to C, sum, add noise, average.

    .. math::

        \bar g = \frac{1}{B}\Big(\sum_{i=1}^{B} g_i \min\Big(1, \frac{C}{\|g_i\|_2 + 10^{-6}}\Big)
        + \mathcal N(0, \sigma^2 C^2 I)\Big)

    Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar and Zhang (2016), "Deep
    Learning with Differential Privacy",
    `arXiv:1607.00133 <https://arxiv.org/abs/1607.00133>`__. :math:`\|g_i\|_2`
    is the norm of example i's gradient over all trainable parameters
    together (flat clipping); the 1e-6 guard is Opacus's (and torch's)
    convention. B is the actual batch size. The noise is drawn from
    ``generator``, one ``randn`` of each parameter's shape, in
    ``model.named_parameters()`` order, only when ``noise_multiplier > 0``.

    Two ways to the same result, chosen by ``method``:

    * ``"vmap"``: per-example gradients from :func:`per_sample_grads`
      (``vmap`` over ``grad``), one vectorised pass instead of B backward
      passes, for any model; it holds all B per-example gradients at once.
    * ``"ghost"``: ghost norms, for models whose trainable parameters all
      belong to ``torch.nn.Linear`` layers. Example i's gradient of a linear
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
      :math:`T^2 \le d p`. The inputs :math:`a_i` are recorded by forward hooks
      and the :math:`\delta_i` come from one backward pass of
      :math:`\sum_i \ell_i` to the layers' outputs, with the per-example losses
      :math:`\ell_i` from ``vmap(loss_fn)``. One forward and one backward
      pass for the whole batch; ``chunk_size`` is not used.
    * ``"auto"`` (the default): ``"ghost"`` where it is known to be exact, else
      ``"vmap"``. That is: every trainable parameter is the ``weight`` or
      ``bias`` of an ``nn.Linear`` used once per forward pass, on an input with
      the batch along dim 0; and every other module is an ``nn.Sequential`` or a
      module known to treat the examples independently (activations, dropout
      in eval mode, ``Flatten``, ``LayerNorm``, ``GroupNorm``, BatchNorm in eval
      mode, frozen convolutions and pooling). With ``method="ghost"`` modules
      with their own ``forward`` are taken on trust to treat the examples
      independently; the other conditions still hold, and a ``ValueError``
      says which one fails.

    Norms are accumulated in float32 at least. No host-device synchronisation
    on either path.

    Non-finite values: an example whose gradient holds a NaN or inf has a
    non-finite norm and factor, and makes the averaged gradient NaN; it is not
    dropped silently.

    Args:
        model: the network (no BatchNorm in training mode; see :func:`per_sample_grads`).
        loss_fn: ``loss_fn(output, target) -> scalar`` for a batch of one example.
        inputs: the batch, examples along dim 0.
        targets: the targets, examples along dim 0.
        max_norm: C, a number in [0, inf] (finite when there is noise).
        noise_multiplier: :math:`\sigma`, a finite number >= 0.
        generator: the random generator for the noise; the global one if ``None``.
        chunk_size: as in :func:`per_sample_grads` (the ``"vmap"`` path only).
        method: ``"auto"``, ``"ghost"`` or ``"vmap"``, as above.

    Returns:
        A :class:`PerSampleClipResult`: the averaged gradients by parameter name,
        the per-example norms before clipping, and the per-example factors.

    Raises:
        ValueError: ``method="ghost"`` for a model the ghost-norm identity does not fit.

    References:
        * Abadi et al. (2016), "Deep Learning with Differential Privacy", `arXiv:1607.00133 <https://arxiv.org/abs/1607.00133>`__.
        * Li, Tramer, Liang and Hashimoto (2022), "Large Language Models Can Be Strong Differentially Private Learners" (ghost norms), `arXiv:2110.05679 <https://arxiv.org/abs/2110.05679>`__.

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
    """
    max_norm = _check_dp_args(max_norm, noise_multiplier, generator)
    _validate.check_choice("method", method, _METHODS)
    _validate.check_optional_int("chunk_size", chunk_size, 1)
    batch = _check_batch(inputs, targets)
    if method != "vmap":
        _validate.check_callable("loss_fn", loss_fn, "loss_fn(output, target) -> scalar loss")
        try:
            return _ghost_clipped_grad(model, loss_fn, inputs, targets, max_norm, noise_multiplier, generator,
                                       vouched=method == "ghost")
        except _NotEligible as reason:
            if method == "ghost":
                raise ValueError(f"method='ghost' does not apply: {reason}") from None
    samples = per_sample_grads(model, loss_fn, inputs, targets, chunk_size)
    first = next(iter(samples.values()))
    acc = accumulation_dtype(first.dtype)
    partial = [
        torch.linalg.vector_norm(g.reshape(batch, -1), dim=1, dtype=accumulation_dtype(g.dtype)).to(first.device)
        for g in samples.values()
    ]
    norms = torch.linalg.vector_norm(torch.stack(partial, dim=1), dim=1).to(acc)
    scales = clip_coefficient(max_norm, norms)
    grads: dict[str, torch.Tensor] = {}
    for name, g in samples.items():
        summed = torch.tensordot(scales.to(device=g.device, dtype=accumulation_dtype(g.dtype)),
                                 g.to(accumulation_dtype(g.dtype)), dims=1)
        grads[name] = _noisy_mean(summed, noise_multiplier, max_norm, batch, generator).to(g.dtype)
    return PerSampleClipResult(grads, norms, scales)


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
) -> torch.Tensor:
    r"""Compute the DP-SGD gradient and accumulate it into each parameter's ``.grad``; return the per-example norms.

    .. math::

        \theta.\mathrm{grad} \mathrel{+}= \frac{1}{B}\Big(\sum_{i} g_i
        \min\Big(1, \frac{C}{\|g_i\| + 10^{-6}}\Big) + \mathcal N(0, \sigma^2 C^2 I)\Big)

    :func:`per_sample_clipped_grad` (Abadi et al. 2016,
    `arXiv:1607.00133 <https://arxiv.org/abs/1607.00133>`__), then written into
    ``.grad`` as a backward pass would: added to an existing gradient, set
    where there is none. Call it instead of ``loss.backward()``, then step the
    optimizer.

    Args:
        model: the network.
        loss_fn: ``loss_fn(output, target) -> scalar`` for a batch of one example.
        inputs: the batch, examples along dim 0.
        targets: the targets, examples along dim 0.
        max_norm: C, a number in [0, inf] (finite when there is noise).
        noise_multiplier: :math:`\sigma`, a finite number >= 0.
        generator: the random generator for the noise.
        chunk_size: examples per vectorised chunk, or ``None`` (the ``"vmap"`` path only).
        method: ``"auto"``, ``"ghost"`` (ghost norms, for models trained only in
            ``nn.Linear`` layers) or ``"vmap"``, as in :func:`per_sample_clipped_grad`.

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
                                     method)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in result.grads:
                continue
            if p.grad is None:
                p.grad = result.grads[name]
            else:
                p.grad.add_(result.grads[name])
    return result.norms
