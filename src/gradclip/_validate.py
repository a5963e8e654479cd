"""Every argument check of the library, in one place.

Every check here runs on the host, on Python values, and never reads a tensor's
value: validating must not cost a host-device synchronisation. Each error
names the argument, the values it accepts and, where it helps, what to do.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import types
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple, Union

import torch

from . import _norms

TensorOrTensors = Union[torch.Tensor, Iterable[torch.Tensor]]
Threshold = Union[float, torch.Tensor]


def as_tensor_list(tensors: TensorOrTensors, name: str = "parameters", distinct: bool = True) -> list[torch.Tensor]:
    """Turn a tensor or an iterable of tensors into a list, as torch does (without repeats, unless ``distinct=False``).

    Warns when an *iterator* yields nothing: a generator such as
    ``model.parameters()``, or a ``filter``/``map``/``iter(...)`` object, can be
    iterated once, so an empty one is almost always one consumed earlier (a
    loop over it, an optimizer built from it), and nothing would be clipped.
    torch warns only for generators, and only in ``clip_grad_norm_``; this
    covers every iterator and every public function. A list or tuple the
    caller built is taken as meant, empty or not. Host-only: no tensor is read.
    """
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    if isinstance(tensors, torch.nn.Module) or not isinstance(tensors, Iterable):
        # an nn.Sequential or nn.ModuleList is iterable (over modules): refuse every module alike
        hint = f"; {_MODULE_HINTS.get(name, 'pass model.parameters()')}" if isinstance(tensors, torch.nn.Module) else ""
        raise TypeError(f"{name} must be a tensor or an iterable of tensors (model.parameters()), "
                        f"got {type(tensors).__name__}{hint}")
    is_iterator = isinstance(tensors, Iterator)  # generators, filter/map/zip objects, iter(list): single-use
    items = list(tensors)
    if is_iterator and not items:
        warn_consumed(name, tensors)
    if not all(issubclass(kind, torch.Tensor) for kind in {type(item) for item in items}):
        for index, item in enumerate(items):
            if not isinstance(item, torch.Tensor):
                named = isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor)
                hint = " (a (name, tensor) pair: pass model.parameters(), not named_parameters())" if named else ""
                if isinstance(item, torch.nn.Module):
                    hint = f" (a module: {_MODULE_HINTS.get(name, 'pass model.parameters()')})"
                raise TypeError(f"{name}[{index}] must be a torch.Tensor, got {type(item).__name__}{hint}")
    return _distinct(items) if distinct else items


# What to pass instead of a module, by argument name: the parameters, or for norms of given tensors the gradients.
_MODULE_HINTS = {
    "tensors": "pass the gradients, [p.grad for p in model.parameters() if p.grad is not None]",
    "exclude": "pass its parameters, list(module.parameters())",
}


def warn_consumed(name: str, iterator: Any) -> None:
    """The warning for an iterator that yielded no tensors, pointing at the caller's line."""
    kind = "generator" if isinstance(iterator, types.GeneratorType) else f"iterator ({type(iterator).__name__})"
    effect = "nothing is excluded" if name == "exclude" else "nothing is clipped or measured (a norm comes back as 0)"
    warnings.warn(
        f"`{name}` yielded no tensors: it is an empty {kind}, so {effect}. "
        "A generator such as model.parameters(), or a filter/map object, can "
        "be iterated only once; if a loop or an optimizer consumed it earlier, pass a list instead: "
        f"list(model.parameters()). Pass an empty list if {name} is meant to be empty.",
        UserWarning,
        stacklevel=_outside_stacklevel(),
    )


_INTERNAL = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
             os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)


def _outside_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside gradclip and torch.

    Public functions reach the argument checks through different depths (and
    through torch's ``no_grad`` wrapper, or an optimizer's step hook), so a
    fixed stacklevel would blame a line inside the library. Level 1 is the
    function that calls ``warnings.warn`` (this function's caller).
    """
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


def distinct(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors without repeats (by identity), in order of first appearance.

    A parameter listed twice (tied weights passed by hand) is one parameter:
    its gradient is measured once and clipped once. torch counts it twice in
    the norm and scales it twice. While ``torch.compile`` traces, a dict keyed
    by the tensors does it: dynamo follows which of them are the same object
    and guards on that, not on each object's ``id`` (which would recompile
    whenever ``zero_grad()`` made new gradients).
    """
    if torch.compiler.is_compiling():
        return list(dict.fromkeys(tensors))
    if len(set(map(id, tensors))) == len(tensors):
        return tensors
    seen: set[int] = set()
    return [t for t in tensors if not (id(t) in seen or seen.add(id(t)))]


_distinct = distinct


class Checked(NamedTuple):
    """A call's arguments after :func:`check_call`: the first stage of the pipeline.

    Attributes:
        items: ``parameters`` (or, for norms of given tensors, the tensors) as a list, as given.
        tensors: the distinct gradients of ``items`` that exist (or the distinct tensors).
        threshold: the checked threshold (``None`` when the call takes none).
        p: the checked norm order.
        nonfinite: ``error_if_nonfinite``.
        of_grads: whether ``tensors`` are the gradients of ``items``.
        name: what the caller calls ``items`` (for messages).
    """

    items: list[torch.Tensor]
    tensors: list[torch.Tensor]
    threshold: Threshold | None
    p: float
    nonfinite: bool
    of_grads: bool
    name: str


def check_call(
    parameters: TensorOrTensors,
    *,
    threshold: tuple[str, Any] | None = None,
    norm_type: Any = 2.0,
    foreach: bool | None = None,
    error_if_nonfinite: bool = False,
    of_grads: bool = True,
    name: str = "parameters",
) -> Checked:
    """Every check of a norm or clipping call, in one place: the list, the threshold, ``norm_type``, the flags.

    ``threshold`` is ``(argument name, value)``. Host-only: reads types and
    Python values (a tensor threshold on the CPU, where it is free), and takes
    the ``.grad`` of each parameter, without repeats (see :func:`distinct`).
    Dense and real gradients are checked where the plan is made
    (:func:`gradclip._groups.plan_for`), once per layout.

    Raises:
        TypeError, ValueError: as the check of each argument says.
    """
    checked_threshold = None if threshold is None else check_threshold(*threshold)
    p = check_norm_type(norm_type)
    check_foreach(foreach)
    nonfinite = check_bool("error_if_nonfinite", error_if_nonfinite)
    items = as_tensor_list(parameters, name, distinct=not of_grads)
    if of_grads:
        tensors = distinct([g for g in [item.grad for item in items] if g is not None])
    else:
        tensors = items
    return Checked(items, tensors, checked_threshold, p, nonfinite, of_grads, name)


def grads_of(parameters: TensorOrTensors, entrywise: str | None = None) -> list[torch.Tensor]:
    """The ``.grad`` of every parameter that has one, checked to be dense.

    ``entrywise``: the name of a function that acts on each entry's value (clamp, sign,
    quantise); complex gradients are then refused with a ``TypeError`` naming the parameter.
    """
    params = as_tensor_list(parameters)
    grads = [p.grad for p in params]
    if any(g is not None and g.layout is not torch.strided for g in grads):  # name the parameter's own index
        for index, grad in enumerate(grads):
            if grad is not None:
                check_dense_one(grad, f"parameters[{index}].grad")
    if entrywise is not None:
        for index, grad in enumerate(grads):
            if grad is not None and grad.is_complex():
                check_real_one(grad, f"parameters[{index}].grad", entrywise)
    return distinct([g for g in grads if g is not None])


def check_real_one(tensor: torch.Tensor, name: str, function: str) -> None:
    """Raise ``TypeError`` if ``tensor`` is complex: ``function`` acts on entries' values, which need an order."""
    if tensor.is_complex():
        raise TypeError(
            f"{function} acts on each entry's value, and {name} is complex ({tensor.dtype}), which has no "
            "order or sign. Clip complex gradients by a norm (clip_grad_norm_, clip_grad_norm_per_tensor_, "
            "soft_clip_grad_norm_), or act on real and imaginary parts through torch.view_as_real(grad)."
        )


def check_dense(tensors: list[torch.Tensor], what: str) -> None:
    """Raise ``TypeError`` naming the first tensor that is not dense (strided), e.g. ``gradient 3``."""
    if {tensor.layout for tensor in tensors} <= {torch.strided}:
        return
    for index, tensor in enumerate(tensors):
        check_dense_one(tensor, f"{what} {index}")


def check_dense_one(tensor: torch.Tensor, name: str) -> None:
    """Raise ``TypeError`` if ``tensor`` (called ``name`` in the message) is not dense (strided)."""
    if tensor.layout is not torch.strided:
        raise TypeError(
            f"{name} has layout {tensor.layout}; gradclip clips dense (strided) "
            "gradients only. Convert it with .to_dense(), or use a dense embedding "
            "(nn.Embedding(sparse=False))."
        )


def check_norm_type(norm_type: Any) -> float:
    """Return ``norm_type`` as a float after checking it is in (0, inf].

    Accepts what torch accepts (anything ``float()`` takes: numbers, ``'inf'``,
    numpy scalars, one-element tensors; a tensor is read on the host, as torch
    does, since it picks the kernel). A norm of per-tensor norms equals the
    norm of all entries only for p > 0; for p = 0 or p < 0 (including -inf) it
    is not, so those are refused.
    """
    try:
        p = float(norm_type)
    except (TypeError, ValueError, RuntimeError) as error:  # the kind float() raises, as in torch
        kind = ValueError if isinstance(error, ValueError) else TypeError
        raise kind(
            f"norm_type must be a positive number or 'inf' (anything float() accepts), got {norm_type!r}"
        ) from None
    if math.isnan(p) or p <= 0:
        raise ValueError(
            f"norm_type must be in (0, inf] (a positive number or inf), got {norm_type!r}; "
            "p <= 0 and -inf are not norms of norms"
        )
    return p


def check_threshold(name: str, value: Any, *, tensor_ok: bool = True, zero_ok: bool = True) -> Threshold:
    """Check a clipping threshold is a number in [0, inf] ((0, inf] unless ``zero_ok``).

    Accepts what torch accepts (anything ``float()`` takes) and returns a
    float. A one-element tensor (when ``tensor_ok``; any shape, any real dtype)
    comes back as a 0-dim floating-point tensor on its device: checked on the
    CPU, where reading it is free; on an accelerator it is not read (that
    would be a sync), and :func:`gradclip._scaling.clip_coefficient` turns a
    negative or NaN one into a NaN factor rather than flipped gradients.
    """
    if isinstance(value, torch.Tensor):
        if not tensor_ok:
            raise TypeError(f"{name} must be a number, not a tensor; pass float({name}) if it is a 0-dim tensor")
        if value.numel() != 1 or value.is_complex():
            raise TypeError(f"{name} as a tensor must hold one real value, got shape {tuple(value.shape)} "
                            f"and dtype {value.dtype}")
        value = value.detach().reshape(())
        value = value if value.is_floating_point() else value.to(torch.get_default_dtype())
        if _norms.exact_on_host(value.device):
            _check_number(name, float(value), zero_ok, value)  # reading a CPU value costs no sync
        return value  # on an accelerator: unchecked here; a negative or NaN one makes the factor NaN
    try:
        number = float(value)
    except (TypeError, ValueError) as error:  # the kind float() raises, as in torch
        kind = ValueError if isinstance(error, ValueError) else TypeError
        raise kind(f"{name} must be a number >= 0 (anything float() accepts), got {value!r}") from None
    _check_number(name, number, zero_ok, value)
    return number


def _check_number(name: str, number: float, zero_ok: bool, given: Any) -> None:
    if math.isnan(number) or number < 0 or (number == 0 and not zero_ok):
        interval = "[0, inf]" if zero_ok else "(0, inf]"
        raise ValueError(f"{name} must be a number in {interval}, got {given!r}")


def check_foreach(foreach: bool | None) -> bool | None:
    if foreach is not None and not isinstance(foreach, bool):
        raise TypeError(f"foreach must be None, True or False, got {foreach!r}")
    return foreach


def check_real(name: str, value: Any, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float after checking it is a real number in the given interval."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    interval = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
    bad = math.isnan(value)
    if low is not None:
        bad = bad or (value <= low if low_open else value < low)
    if high is not None:
        bad = bad or (value >= high if high_open else value > high)
    if bad:
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return value


def check_int(name: str, value: Any, low: int) -> int:
    """``value`` after checking it is an int >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {low}, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def check_optional_int(name: str, value: Any, low: int) -> int | None:
    """``value`` after checking it is ``None`` or an int >= ``low``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be None or an int >= {low}, got {value!r}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_state_dtype(dtype: Any) -> torch.dtype:
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    return dtype


def check_generator(generator: Any) -> torch.Generator | None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def check_module(name: str, value: Any) -> torch.nn.Module:
    if not isinstance(value, torch.nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(value).__name__}")
    return value


# Where framework wrappers keep the optimizer they step: accelerate's AcceleratedOptimizer (and the
# Hugging Face Trainer's, which is one) and DeepSpeed's wrappers hold it in ``.optimizer``, Lightning's
# LightningOptimizer in ``._optimizer``.
WRAPPED_OPTIMIZER_ATTRIBUTES = ("optimizer", "_optimizer")


def _has_step_hooks(optimizer: Any) -> bool:
    """Whether ``optimizer`` ran ``torch.optim.Optimizer.__init__`` (its own step-hook dicts exist)."""
    own = getattr(optimizer, "__dict__", {})
    return (isinstance(optimizer, torch.optim.Optimizer) and "_optimizer_step_pre_hooks" in own
            and "_optimizer_step_post_hooks" in own)


def check_optimizer(optimizer: Any, who: str = "attach") -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` whose step hooks run when ``optimizer`` steps.

    ``optimizer`` itself when it is one; for a framework wrapper that does not run
    ``Optimizer.__init__`` (accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``, even when they subclass ``Optimizer``), the optimizer reached by
    following ``.optimizer`` or ``._optimizer``: the wrapper's ``step()`` calls that one's
    ``step()``, so hooks registered on it run on every step of the wrapper.

    Raises:
        TypeError: no ``torch.optim.Optimizer`` is reached (the message names what was given).
    """
    current, seen = optimizer, set()
    while id(current) not in seen:
        if _has_step_hooks(current):
            return current
        seen.add(id(current))
        inner = None
        for attribute in WRAPPED_OPTIMIZER_ATTRIBUTES:
            try:
                inner = getattr(current, attribute, None)
            except Exception:  # a property of a wrapper that fails: not a way in
                inner = None
            if inner is not None and inner is not current:
                break
            inner = None
        if inner is None:
            break
        current = inner
    chain = "" if current is optimizer else f" (which wraps {type(current).__name__})"
    raise TypeError(
        f"{who}: optimizer must be a torch.optim.Optimizer (one that ran torch.optim.Optimizer.__init__) or a "
        f"wrapper that holds one in .optimizer or ._optimizer, got {type(optimizer).__name__}{chain}. Pass the "
        "torch optimizer itself, for example the one given to accelerator.prepare() or returned by "
        "configure_optimizers().")


def check_callable(name: str, value: Any, signature: str) -> Any:
    if not callable(value):
        raise TypeError(f"{name} must be callable ({signature}), got {type(value).__name__}")
    return value


_DTENSOR: Any = None


def dtensor_type() -> Any:
    """``torch.distributed.tensor.DTensor`` if that module was imported, else None.

    No DTensor can exist before ``torch.distributed.tensor`` is imported, so the
    single-process path costs one dictionary look-up and imports nothing.
    """
    global _DTENSOR
    if _DTENSOR is None:
        module = sys.modules.get("torch.distributed.tensor")
        _DTENSOR = getattr(module, "DTensor", None) if module is not None else None
    return _DTENSOR


# Types that are never DTensors: checking them first keeps dtensor_type()'s cache, which changes when
# torch.distributed.tensor is first imported, out of what torch.compile guards on.
_PLAIN_TYPES = frozenset({torch.Tensor, torch.nn.Parameter})


def dtensor_types(tensors: Iterable[torch.Tensor]) -> Any:
    """``DTensor`` if some of ``tensors`` are DTensors, else None (host-only: reads their types)."""
    kinds = {type(t) for t in tensors}
    if kinds <= _PLAIN_TYPES:
        return None
    dtensor = dtensor_type()
    return dtensor if dtensor is not None and any(issubclass(kind, dtensor) for kind in kinds) else None


def refuse_dtensors(tensors: list[torch.Tensor], what: str, instead: str) -> None:
    """Raise ``TypeError`` if any tensor is a ``DTensor`` (FSDP2, tensor parallel): ``what`` does not support them.

    ``instead`` says what to use. Host-only: checks types.
    """
    dtensor = dtensor_types(tensors)
    if dtensor is None:
        return
    for index, tensor in enumerate(tensors):
        if isinstance(tensor, dtensor):
            raise TypeError(
                f"{what} does not support DTensor parameters or gradients (FSDP2's fully_shard, tensor "
                f"parallelism): tensor {index} is a DTensor with placements {tuple(tensor.placements)}. {instead}"
            )


class OrthogonalizedUpdateWarning(UserWarning):
    r"""A clipper that rescales gradients was attached to an optimizer that orthogonalises its updates (Muon).

    Muon replaces each matrix's momentum :math:`M` by an approximately orthogonal matrix
    :math:`O \approx U V^\top` (:math:`M = U \Sigma V^\top`, a few Newton-Schulz iterations) and steps
    :math:`W \leftarrow W - \eta\, s(m, n)\, O`, with :math:`s` a factor of the matrix's shape. The step's
    length is then set by :math:`\eta` and the shape, not by the gradient's norm: clipping the gradient
    by a factor :math:`h` only lowers that gradient's weight in :math:`M`, and clipping the orthogonalised
    update (a global clip of Muon's output) divides every step by a constant that grows with the model
    (DeepSpeed measured 4.2x at width 128 and 85.6x at width 8192). The reference Muon and the speed-run
    trainers do not clip.

    Raised by ``attach`` of every clipper that rescales gradients (not :class:`gradclip.SpikeGuard`,
    which skips a step instead, and is right under Muon too) when the optimizer is ``torch.optim.Muon``,
    a class whose name contains "Muon", or an optimizer (or class) with ``gradclip_orthogonalized = True``;
    set that attribute to ``False`` on an optimizer so named that does not orthogonalise. What to do
    instead: guard against spikes with :class:`gradclip.SpikeGuard`; clip the parameters an auxiliary
    AdamW updates (embeddings, norms, the head) by calling the clipper by hand on those parameters only.

    References:
        * Jordan et al. (2024), "Muon: An optimizer for hidden layers in neural networks", `kellerjordan.github.io/posts/muon <https://kellerjordan.github.io/posts/muon/>`__; reference code `github.com/KellerJordan/Muon <https://github.com/KellerJordan/Muon>`__.
        * `deepspeedai/DeepSpeed#8439 <https://github.com/deepspeedai/DeepSpeed/issues/8439>`__ (a global clip shrinks Muon's step up to 85.6x); `NVIDIA/Megatron-LM#5394 <https://github.com/NVIDIA/Megatron-LM/issues/5394>`__.

    Example:
        >>> import warnings, torch, gradclip
        >>> from gradclip.clippers import OrthogonalizedUpdateWarning
        >>> w = torch.nn.Parameter(torch.zeros(4, 4))
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = gradclip.ZClip().attach(torch.optim.Muon([w], lr=0.02))
        >>> [issubclass(c.category, OrthogonalizedUpdateWarning) for c in caught]
        [True]
    """


def orthogonalizes(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` orthogonalises its updates: ``torch.optim.Muon``, a class whose name contains
    "Muon" (the reference implementation and its variants), or any optimizer that sets the attribute
    ``gradclip_orthogonalized = True`` (on itself or its class) to say so."""
    flagged = getattr(optimizer, "gradclip_orthogonalized", None)
    if flagged is not None:
        return bool(flagged)
    muon = getattr(torch.optim, "Muon", None)
    return (muon is not None and isinstance(optimizer, muon)) or any(
        "muon" in cls.__name__.lower() for cls in type(optimizer).__mro__)


def warn_if_orthogonalizing(optimizer: torch.optim.Optimizer, who: str) -> None:
    """Warn that clipping before (or of) an orthogonalised update does not bound the step."""
    if orthogonalizes(optimizer):
        warnings.warn(
            f"{who} is attached to {type(optimizer).__name__}, which orthogonalises its updates (Muon): its step "
            "size is set by the learning rate and the matrix shape, not by the gradient's norm, so clipping "
            "the gradient does not shorten the step; it only lowers that gradient's weight in the momentum "
            "(and clipping the orthogonalised update itself divides every step by a shape-dependent constant, "
            "DeepSpeed issue 8439). The reference Muon does not clip. To guard against spikes, skip the step "
            "with gradclip.SpikeGuard; to clip the parameters an auxiliary AdamW handles, call the clipper by "
            "hand on those parameters before optimizer.step(). Set optimizer.gradclip_orthogonalized = False "
            "if this optimizer does not orthogonalise.",
            OrthogonalizedUpdateWarning, stacklevel=3)
