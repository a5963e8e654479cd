"""Adaptive gradient clipping (AGC): unit-wise, relative to the weights' own norms."""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Iterable, Mapping
from typing import NamedTuple, Union

import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize
from torch.nn.utils.spectral_norm import SpectralNorm as _LegacySpectralNorm
from torch.nn.utils.weight_norm import WeightNorm as _LegacyWeightNorm

from . import _groups, _validate
from ._norms import accumulation_dtype, axis_norms, tensor_norms

__all__ = ["UnitSpec", "adaptive_clip_grad_", "agc_parameters", "agc_unit_dims"]

# The guard against dividing by a zero gradient norm, as in timm and the NFNets code.
DIV_EPS = 1e-6

_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# torch.nn.utils.parametrizations.weight_norm's module (original0 = g, original1 = v); private in torch
_WEIGHT_NORM = getattr(parametrizations, "_WeightNorm", None)


class UnitSpec(NamedTuple):
    """Which axis of a weight holds its output units.

    Attributes:
        dim: the output-unit axis; ``None`` treats the whole tensor as one unit.
        groups: for a ``ConvTranspose`` weight of shape ``(in, out/groups, k...)``
            with ``groups > 1``: axis 0 is split into ``groups`` blocks, and a unit
            is one output channel of one group.

    References:
        * Brock, De, Smith and Simonyan (2021), "High-Performance Large-Scale Image Recognition Without Normalization", `arXiv:2102.06171 <https://arxiv.org/abs/2102.06171>`__.
    """

    dim: int | None
    groups: int = 1


UnitDim = Union[int, None, UnitSpec]


def _as_spec(value: object, param: torch.Tensor, where: str) -> UnitSpec:
    if value is None:
        return UnitSpec(None)
    if isinstance(value, UnitSpec):
        spec = value
    elif isinstance(value, int) and not isinstance(value, bool):
        spec = UnitSpec(value)
    else:
        raise TypeError(f"{where} must be an int, None or a gradclip.UnitSpec, got {type(value).__name__}")
    if spec.dim is None or param.ndim <= 1:
        return UnitSpec(None)
    if not isinstance(spec.groups, int) or isinstance(spec.groups, bool) or spec.groups < 1:
        raise ValueError(f"{where}: groups must be an int >= 1, got {spec.groups!r}")
    if not -param.ndim <= spec.dim < param.ndim:
        raise ValueError(
            f"{where}: dim must be in [{-param.ndim}, {param.ndim - 1}] for a tensor of shape "
            f"{tuple(param.shape)}, got {spec.dim}"
        )
    dim = spec.dim % param.ndim
    if spec.groups > 1 and (dim == 0 or param.shape[0] % spec.groups):
        raise ValueError(
            f"{where}: groups={spec.groups} splits axis 0, which must be divisible by it and "
            f"must not be the unit axis (shape {tuple(param.shape)}, dim {spec.dim})"
        )
    return UnitSpec(dim, spec.groups)


def agc_unit_dims(model: nn.Module) -> dict[torch.Tensor, UnitSpec]:
    r"""The output-unit axis of every parameter of ``model``, read from its modules.

    AGC (Brock et al. 2021, `arXiv:2102.06171 <https://arxiv.org/abs/2102.06171>`__)
    clips each output unit. PyTorch stores ``Linear`` and ``ConvNd`` weights as ``(out, in, k...)``, so
    their units lie along axis 0, but ``ConvTransposeNd`` weights are
    ``(in, out/groups, k...)``: their output units lie along axis 1 (and, with
    ``groups > 1``, within each block of axis 0). Reducing every axis but 0, as
    timm's ``unitwise_norm`` does, silently clips a transposed convolution per
    *input* channel. This walks the modules and says which axis is which:
    ``UnitSpec(1, groups)`` for ``ConvTranspose`` weights, ``UnitSpec(0)`` for
    other tensors with two or more dimensions, ``UnitSpec(None)`` (the whole
    tensor) for biases and gains.

    Reparametrised weights follow their layer. With weight normalisation
    (``torch.nn.utils.parametrizations.weight_norm`` or the legacy
    ``torch.nn.utils.weight_norm``), the direction ``v`` has the weight's
    shape and gets the layer's axis; the magnitude ``g`` (size 1 on every axis
    but ``dim``) is clipped per entry along ``dim``, each entry the gain of one
    slice (the whole tensor for ``dim=None``). Other parametrizations
    (``orthogonal``, ``spectral_norm``, the legacy ``spectral_norm``'s
    ``weight_orig``, your own) whose original tensor has the weight's shape get
    the layer's axis; an original of another shape (on a ``Linear``, a
    convolution or a transposed convolution, whose weight shape is known)
    gets axis 0 with a warning, since only you know its layout: pass
    ``unit_dims`` for it.

    The axes found are also remembered for these parameters (weakly), so that
    :func:`adaptive_clip_grad_` applies them however the parameters arrive
    later: from :func:`agc_parameters`, an optimizer's parameter groups, or
    ``model.parameters()`` of a model walked before.

    Args:
        model: the module whose parameters are described.

    Returns:
        A dict from each parameter to its :class:`UnitSpec`, for the
        ``unit_dims`` argument of :func:`adaptive_clip_grad_`.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``.

    References:
        * Brock, De, Smith and Simonyan (2021), "High-Performance Large-Scale Image Recognition Without Normalization", `arXiv:2102.06171 <https://arxiv.org/abs/2102.06171>`__.
        * Salimans and Kingma (2016), "Weight Normalization", `arXiv:1602.07868 <https://arxiv.org/abs/1602.07868>`__.

    Example:
        >>> import torch, gradclip
        >>> up = torch.nn.ConvTranspose2d(8, 4, 3)
        >>> tuple(up.weight.shape), gradclip.agc_unit_dims(up)[up.weight]
        ((8, 4, 3, 3), UnitSpec(dim=1, groups=1))
        >>> up = torch.nn.utils.parametrizations.weight_norm(torch.nn.ConvTranspose2d(8, 4, 3))
        >>> g, v = up.parametrizations.weight.original0, up.parametrizations.weight.original1
        >>> specs = gradclip.agc_unit_dims(up)
        >>> specs[v], specs[g]  # v as the layer's weight; g (8, 1, 1, 1) one gain per input channel
        (UnitSpec(dim=1, groups=1), UnitSpec(dim=0, groups=1))
    """
    _validate.check_module("model", model)
    specs: dict[torch.Tensor, UnitSpec] = {}
    for module_name, module in model.named_modules():
        # the originals of reparametrised tensors first: they belong to child modules (parametrizations)
        for param, spec in _reparametrized_specs(module, module_name).items():
            if param not in specs:
                specs[param] = spec
        for name, param in module.named_parameters(recurse=False):
            if param in specs or isinstance(param, nn.parameter.UninitializedParameter):
                continue
            specs[param] = _layer_spec(module, name, param.ndim)
    for param, spec in specs.items():
        _remember(param, spec)
    return specs


def _layer_spec(module: nn.Module, name: str, ndim: int) -> UnitSpec:
    """The unit axis of ``module``'s tensor ``name`` (of ``ndim`` dims) as the layer uses it."""
    if isinstance(module, _CONV_TRANSPOSE) and name == "weight":
        return UnitSpec(1, module.groups)
    return UnitSpec(0 if ndim >= 2 else None)


def _weight_shape(module: nn.Module, name: str) -> tuple[int, ...] | None:
    """The shape of the tensor ``name`` of a layer whose weight layout is known, else ``None``."""
    if name != "weight":
        return None
    if isinstance(module, _CONV_TRANSPOSE):
        return (module.in_channels, module.out_channels // module.groups, *module.kernel_size)
    if isinstance(module, _CONV):
        return (module.out_channels, module.in_channels // module.groups, *module.kernel_size)
    if isinstance(module, nn.Linear):
        return (module.out_features, module.in_features)
    return None


def _magnitude_spec(dim: int | None) -> UnitSpec:
    """Weight normalisation's g: one unit per entry along ``dim`` (size 1 elsewhere); the whole tensor for dim -1."""
    return UnitSpec(None if dim is None or dim == -1 else dim)


def _reparametrized_specs(module: nn.Module, module_name: str) -> dict[torch.Tensor, UnitSpec]:
    """The unit axes of the tensors that ``module``'s parametrizations and weight-norm hooks hold."""
    specs: dict[torch.Tensor, UnitSpec] = {}
    if parametrize.is_parametrized(module):
        for name, plist in module.parametrizations.items():
            originals = [plist.original] if plist.is_tensor else [
                getattr(plist, f"original{i}") for i in range(plist.ntensors)]
            if _WEIGHT_NORM is not None and isinstance(plist[0], _WEIGHT_NORM) and len(originals) == 2:
                magnitude, direction = originals
                specs[magnitude] = _magnitude_spec(plist[0].dim)
                specs[direction] = _layer_spec(module, name, direction.ndim)
                continue
            for index, original in enumerate(originals):
                label = f"{module_name + '.' if module_name else ''}parametrizations.{name}.original" + (
                    "" if plist.is_tensor else str(index))
                specs[original] = _original_spec(module, name, original, label)
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, _LegacyWeightNorm):
            magnitude = module._parameters.get(hook.name + "_g")
            direction = module._parameters.get(hook.name + "_v")
            if magnitude is not None:
                specs[magnitude] = _magnitude_spec(hook.dim)
            if direction is not None:
                specs[direction] = _layer_spec(module, hook.name, direction.ndim)
        elif isinstance(hook, _LegacySpectralNorm):
            original = module._parameters.get(hook.name + "_orig")
            if original is not None:
                specs[original] = _layer_spec(module, hook.name, original.ndim)
    return specs


def _original_spec(module: nn.Module, name: str, original: torch.Tensor, label: str) -> UnitSpec:
    """The layer's axis for a parametrization's original of the weight's shape; axis 0, with a warning, otherwise."""
    expected = _weight_shape(module, name)
    if expected is None or tuple(original.shape) == expected:
        return _layer_spec(module, name, original.ndim)
    guess = UnitSpec(0 if original.ndim >= 2 else None)
    if guess.dim is not None:
        warnings.warn(
            f"AGC: {label} (shape {tuple(original.shape)}) parametrizes the {type(module).__name__}'s {name} "
            f"(shape {expected}) but has another shape, so its output units cannot be read from the layer: "
            f"axis 0 is assumed. Pass unit_dims={{that tensor: its axis}} to adaptive_clip_grad_ if that is wrong.",
            UserWarning, stacklevel=_validate._outside_stacklevel())
    return guess


# id(parameter) -> (weak reference to it, its UnitSpec), filled by agc_unit_dims: the unit axis of a parameter
# whose module was walked, for calls that get the bare tensor. Keyed by id (tensors compare elementwise);
# an entry leaves with its parameter.
_KNOWN_UNITS: dict[int, tuple[weakref.ref, UnitSpec]] = {}


def _remember(param: torch.Tensor, spec: UnitSpec) -> None:
    key = id(param)
    entry = _KNOWN_UNITS.get(key)
    if entry is not None and entry[0]() is param:
        if entry[1] != spec:
            _KNOWN_UNITS[key] = (entry[0], spec)
        return

    def forget(ref: weakref.ref, key: int = key) -> None:
        current = _KNOWN_UNITS.get(key)
        if current is not None and current[0] is ref:
            del _KNOWN_UNITS[key]

    _KNOWN_UNITS[key] = (weakref.ref(param, forget), spec)


def _known_unit(param: torch.Tensor) -> UnitSpec | None:
    entry = _KNOWN_UNITS.get(id(param))
    return entry[1] if entry is not None and entry[0]() is param else None


def _as_modules(value: object) -> list[nn.Module] | None:
    """A module, or a non-empty tuple or list of modules (timm's distilled models return two heads), as a list."""
    if isinstance(value, nn.Module):
        return [value]
    if isinstance(value, (tuple, list)) and value and all(isinstance(m, nn.Module) for m in value):
        return list(value)
    return None


def _find_heads(model: nn.Module, head: nn.Module | str | None) -> list[nn.Module]:
    if isinstance(head, nn.Module):
        return [head]
    if isinstance(head, str):
        try:
            return [model.get_submodule(head)]
        except AttributeError as error:
            raise ValueError(f"head {head!r} is not a submodule of the model: {error}") from None
    if head is not None:
        raise TypeError(f"head must be None, a module or a submodule name, got {type(head).__name__}")
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        classifier = get_classifier()
        heads = _as_modules(classifier)
        if heads is not None:
            # every head it names (a distilled DeiT has two); one without parameters (nn.Identity after
            # timm's reset_classifier(0)) means the model has no classifier: nothing to leave out
            return heads
        reason = f"the model's get_classifier() returned {type(classifier).__name__}, not a module or modules"
    else:
        reason = "the model has no get_classifier()"
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            f"exclude_head=True found no classifier: {reason} and no nn.Linear; pass head= (a module or its "
            "name) or exclude_head=False"
        )
    name, last = linears[-1]
    if len(linears) > 1 and not isinstance(model, nn.Sequential):
        # registration order is call order only in a Sequential: elsewhere this is a guess
        warnings.warn(
            f"agc_parameters: {reason}, so the last nn.Linear registered, {name!r}, "
            "is taken as the head and left unclipped. If the classifier is another layer (a head defined "
            "before the body), pass head='its name'.",
            UserWarning, stacklevel=_validate._outside_stacklevel())
    return [last]


def agc_parameters(
    model: nn.Module, exclude_head: bool = True, head: nn.Module | str | None = None
) -> list[nn.Parameter]:
    r"""The parameters to clip with AGC: all of ``model``'s except its classifier.

    Brock et al. (2021, `arXiv:2102.06171 <https://arxiv.org/abs/2102.06171>`__)
    do not clip the final linear layer: "we found it was always better not to
    clip the final linear layer". Forgetting this is a
    common bug in ports. timm drops the last two parameters by order, which is
    wrong for any model that registers its head elsewhere; this looks for the
    head as a module instead:

    * ``head`` if given (a module or its qualified name, e.g. ``"fc"``),
    * else ``model.get_classifier()`` if the model has one (timm models): a
      module, or a tuple of modules, all left out (timm's distilled DeiT
      returns its two heads); a head without parameters (``nn.Identity`` after
      timm's ``reset_classifier(0)``) leaves nothing out,
    * else the last ``nn.Linear`` in ``model.modules()`` order: the last one
      called in an ``nn.Sequential``, a guess elsewhere (a head defined before
      the body is missed), so for other models with several ``nn.Linear`` it
      warns, naming the layer it took; pass ``head=`` to be sure.

    Parameters tied to the head (an embedding shared with an LM head) are
    left out with it, since they are the same tensors. The unit axis of every
    parameter is read from its layer as :func:`agc_unit_dims` does, and
    remembered, so ``adaptive_clip_grad_(agc_parameters(model))`` clips a
    ``ConvTranspose`` or weight-normalised weight per output unit, as
    ``adaptive_clip_grad_(model)`` does.

    Args:
        model: the network.
        exclude_head: drop the head's parameters (the NFNets recipe).
        head: the classifier module or its name, to skip the search.

    Returns:
        The list of parameters, in ``model.parameters()`` order.

    Raises:
        ValueError: ``exclude_head`` is set and no head can be found.

    References:
        * Brock, De, Smith and Simonyan (2021), "High-Performance Large-Scale Image Recognition Without Normalization", `arXiv:2102.06171 <https://arxiv.org/abs/2102.06171>`__.

    Example:
        >>> import torch, gradclip
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> [tuple(p.shape) for p in gradclip.agc_parameters(model)]
        [(8, 4), (8,)]
    """
    _validate.check_module("model", model)
    _validate.check_bool("exclude_head", exclude_head)
    agc_unit_dims(model)  # remembered for these parameters: the list carries no layer
    params = list(model.parameters())
    if not exclude_head:
        return params
    skipped = {id(p) for found in _find_heads(model, head) for p in found.parameters()}
    return [p for p in params if id(p) not in skipped]


class _Item(NamedTuple):
    weight: torch.Tensor  # viewed so that the units are the kept axes
    grad: torch.Tensor  # the same view of the gradient
    reduce: tuple[int, ...] | None  # axes reduced per unit; None: the whole tensor is one unit


def _item(param: torch.Tensor, spec: UnitSpec) -> _Item:
    weight, grad = param.detach(), param.grad
    if spec.dim is None:
        return _Item(weight, grad, None)
    kept = {spec.dim}
    if spec.groups > 1:
        weight = weight.unflatten(0, (spec.groups, -1))  # always a view, for any strides
        grad = grad.unflatten(0, (spec.groups, -1))
        kept = {0, spec.dim + 1}
    return _Item(weight, grad, tuple(d for d in range(weight.ndim) if d not in kept))


def _unit_norms(tensors: list[torch.Tensor], n_whole: int, items: list[_Item], p: float, device: torch.device,
                foreach: bool | None) -> torch.Tensor:
    """The per-unit p-norms of the tensors in one 1-D tensor: the first ``n_whole`` (one unit
    each) batched, then each other tensor's units in order.

    One reduction kernel per tensor with units: torch's reduction over the inner axes runs at
    memory speed and makes no temporary of the tensor's size.
    """
    parts = [tensor_norms(tensors[:n_whole], p, device, foreach)] if n_whole else []
    for tensor, item in zip(tensors[n_whole:], items[n_whole:]):
        parts.append(axis_norms(tensor, p, item.reduce).reshape(-1))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


@torch.no_grad()
def adaptive_clip_grad_(
    parameters: _validate.TensorOrTensors | nn.Module,
    clip_factor: float = 0.01,
    eps: float = 1e-3,
    norm_type: float | str = 2.0,
    *,
    exclude: Iterable[torch.Tensor] | None = None,
    unit_dims: Mapping[torch.Tensor, UnitDim] | None = None,
    foreach: bool | None = None,
) -> torch.Tensor:
    r"""Adaptive gradient clipping (AGC), unit-wise, in place; return the fraction of units clipped.

    For each output unit i of each weight W (a row of a ``Linear`` weight, an
    output channel of a convolution; the whole tensor for biases and gains):

    .. math::

        G_i \leftarrow
        \begin{cases}
        G_i & \text{if } \|G_i\| < \lambda \max(\|W_i\|, \varepsilon) \\
        G_i \, \dfrac{\lambda \max(\|W_i\|, \varepsilon)}{\max(\|G_i\|, 10^{-6})} & \text{otherwise}
        \end{cases}

    with :math:`\lambda` = ``clip_factor`` and :math:`\varepsilon` = ``eps``
    (Brock, De, Smith and Simonyan 2021, "High-Performance Large-Scale Image
    Recognition Without Normalization",
    `arXiv:2102.06171 <https://arxiv.org/abs/2102.06171>`__). For float32 and
    float64 this is timm's ``adaptive_clip_grad`` to rounding; float16 and
    bfloat16 norms are accumulated in float32, where timm overflows.

    Cost: two reductions (weight and gradient norms) and one in-place multiply
    per tensor, by one factor per unit; no host-device synchronisation. The
    norms of one-dimensional tensors are batched, and the per-unit norms are
    torch reductions over the non-unit axes, which make no temporary of a
    parameter's size.

    **Units.** Each parameter's unit axis follows its layer, however the
    parameters arrive: passed as the model (``adaptive_clip_grad_(model)``),
    or as tensors of a model that :func:`agc_parameters` or
    :func:`agc_unit_dims` has walked (they remember each parameter's axis), or
    given by ``unit_dims``. ``ConvTransposeNd`` weights
    (``(in, out/groups, k...)``) are clipped per output channel (axis 1, per
    group); weight-normalised and otherwise parametrised weights as their
    layer (see :func:`agc_unit_dims`). A tensor whose layer was never seen
    (a bare tensor, or ``model.parameters()`` of a model no function here has
    walked) cannot be placed: a tensor with two or more dimensions gets its
    units along axis 0, which is right for ``Linear``, ``ConvNd``,
    ``Embedding``, attention and RNN weights and *wrong* for a
    ``ConvTransposeNd`` weight (clipped per input channel, as timm does) and
    for the direction of a weight-normalised one. Call
    ``agc_parameters(model)`` (or pass the model) once and the axes are known.

    **The classifier.** NFNets do not clip the final linear layer: clip
    :func:`agc_parameters` ``(model)`` (which also reads the unit axes), or
    pass ``exclude=model.fc.parameters()``.

    **Non-finite values.** A NaN in a unit's gradient or weight makes that
    unit's gradient all NaN; an inf gradient entry gives the unit a factor of 0,
    so the inf becomes NaN and its finite neighbours 0 (as in timm and
    ``torch.nn.utils.clip_grad_norm_``). Non-finite values are never replaced
    by finite ones in a unit that held them without a NaN remaining.

    Args:
        parameters: a tensor, an iterable of tensors, or an ``nn.Module``
            (whose parameters are all clipped, with unit axes read from its modules).
            Tensors without ``.grad`` are skipped.
        clip_factor: :math:`\lambda`, a number in [0, inf] (NFNets: 0.01 at
            batch 4096; larger for smaller batches).
        eps: :math:`\varepsilon`, the floor on the weight norm, in (0, inf), so
            that zero-initialised weights can still move.
        norm_type: p of the norms, in (0, inf].
        exclude: tensors to leave alone (for instance the classifier's parameters).
        unit_dims: a mapping from a tensor to its output-unit axis: an int, ``None``
            (whole tensor) or a :class:`UnitSpec`; overrides what is read from a module.
        foreach: as in :func:`gradclip.clip_grad_norm_`, for the batched norms.

    Returns:
        The fraction of units that were clipped, a 0-dim float32 tensor
        (NaN units count as clipped); ``tensor(0.)`` when nothing has a gradient.

    Raises:
        ValueError: a bad ``clip_factor``, ``eps``, ``norm_type`` or unit axis,
            a gradient whose shape is not its parameter's, or a parameter with no
            data (meta or uninitialised lazy parameters).
        TypeError: a parameter or gradient is a DTensor (FSDP2, tensor parallelism).

    References:
        * Brock, De, Smith and Simonyan (2021), "High-Performance Large-Scale Image Recognition Without Normalization", `arXiv:2102.06171 <https://arxiv.org/abs/2102.06171>`__.

    Example:
        >>> import torch, gradclip
        >>> w = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.3, 0.4]]))
        >>> w.grad = torch.tensor([[1.0, 0.0], [0.0, 0.001]])
        >>> gradclip.adaptive_clip_grad_([w], clip_factor=0.1)
        tensor(0.5000)
        >>> w.grad  # row 0 capped at 0.1 * ||W_0|| = 0.5; row 1 under 0.1 * 0.5
        tensor([[0.5000, 0.0000],
                [0.0000, 0.0010]])
    """
    module_specs: dict[torch.Tensor, UnitSpec] = {}
    if isinstance(parameters, nn.Module):
        module_specs = agc_unit_dims(parameters)
        parameters = list(parameters.parameters())
    clip_factor = _validate.check_real("clip_factor", clip_factor, 0.0)
    eps = _validate.check_real("eps", eps, 0.0, math.inf, low_open=True, high_open=True)
    p = _validate.check_norm_type(norm_type)
    _validate.check_foreach(foreach)
    params = _validate.as_tensor_list(parameters)
    _validate.refuse_dtensors([p for p in params if p.grad is not None] + [p.grad for p in params if p.grad is not None],
                              "adaptive_clip_grad_", "Gather the parameters first (FSDP2: clip before resharding "
                              "is not supported), or clip by the global norm (clip_grad_norm_), which handles DTensors.")
    skipped = set() if exclude is None else {id(t) for t in _validate.as_tensor_list(exclude, "exclude")}
    overrides: dict[int, object] = {}
    if unit_dims is not None:
        if not isinstance(unit_dims, Mapping):
            raise TypeError(f"unit_dims must be a mapping from tensors to axes, got {type(unit_dims).__name__}")
        for key, value in unit_dims.items():
            if not isinstance(key, torch.Tensor):
                raise TypeError(f"unit_dims keys must be tensors, got {type(key).__name__}")
            overrides[id(key)] = value

    grouped: dict[_groups.GroupKey, list[_Item]] = {}
    for index, param in enumerate(params):
        if id(param) in skipped or param.grad is None or param.grad.numel() == 0:  # no units, nothing to clip
            continue
        if isinstance(param, nn.parameter.UninitializedParameter) or param.is_meta:
            raise ValueError(f"parameters[{index}] has no data (meta or uninitialised); AGC needs the weights")
        grad = param.grad
        _validate.check_dense_one(param, f"parameters[{index}]")
        _validate.check_dense_one(grad, f"parameters[{index}].grad")
        if grad.shape != param.shape:
            raise ValueError(
                f"parameters[{index}] has shape {tuple(param.shape)} but its gradient has shape {tuple(grad.shape)}"
            )
        if id(param) in overrides:
            spec = _as_spec(overrides[id(param)], param, f"unit_dims[parameters[{index}]]")
        elif param in module_specs:
            spec = _as_spec(module_specs[param], param, f"unit axis of parameters[{index}]")
        else:  # what agc_unit_dims found for this tensor's layer before, else axis 0
            known = _known_unit(param)
            spec = UnitSpec(0 if param.ndim >= 2 else None) if known is None else _as_spec(
                known, param, f"unit axis of parameters[{index}]")
        grouped.setdefault((grad.device, grad.dtype), []).append(_item(param, spec))

    clipped_counts, unit_counts = [], 0
    first_device = None
    for (device, dtype), group in grouped.items():
        items = [it for it in group if it.reduce is None]
        n_whole = len(items)
        items += [it for it in group if it.reduce is not None]
        grads = [it.grad for it in items]
        max_norm = _unit_norms([it.weight for it in items], n_whole, items, p, device, foreach)
        g_norm = _unit_norms(grads, n_whole, items, p, device, foreach)
        max_norm = max_norm.clamp_(min=eps).mul_(clip_factor)
        keep = g_norm < max_norm
        scale = torch.where(keep, 1.0, max_norm.div_(g_norm.clamp_(min=DIV_EPS))).to(accumulation_dtype(dtype))
        # one factor per unit, shaped to broadcast over its tensor's reduced axes
        factors = list(scale[:n_whole].unbind()) if n_whole else []
        if n_whole < len(items):
            shapes = [tuple(1 if d in it.reduce else n for d, n in enumerate(it.grad.shape)) for it in items[n_whole:]]
            pieces = scale[n_whole:].split([math.prod(shape) for shape in shapes])
            factors += [piece.view(shape) for piece, shape in zip(pieces, shapes)]
        _groups.apply_(grads, _groups.use_foreach(grads, device, foreach), "mul", factors)
        first_device = device if first_device is None else first_device
        clipped_counts.append(torch.logical_not(keep).sum().to(first_device))
        unit_counts += scale.numel()
    if not clipped_counts:
        return torch.tensor(0.0)
    return torch.stack(clipped_counts).sum().to(torch.float32) / max(unit_counts, 1)
