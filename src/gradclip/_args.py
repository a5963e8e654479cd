"""Argument handling shared by every clipping function.

Every check here runs on the host, on Python values, and never reads a tensor's
value: validating must not cost a host-device synchronisation.
"""

from __future__ import annotations

import math
import numbers
import types
import warnings
from collections.abc import Iterable
from typing import Union

import torch

TensorOrTensors = Union[torch.Tensor, Iterable[torch.Tensor]]
Threshold = Union[float, int, torch.Tensor]


def as_tensor_list(tensors: TensorOrTensors, name: str = "parameters") -> list[torch.Tensor]:
    """Turn a tensor or an iterable of tensors into a list, as torch does.

    Warns, like ``torch.nn.utils.clip_grad_norm_``, when an empty generator is
    passed: that is almost always a generator consumed by an earlier call.
    """
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    if not isinstance(tensors, Iterable):
        raise TypeError(f"{name} must be a tensor or an iterable of tensors, got {type(tensors).__name__}")
    is_generator = isinstance(tensors, types.GeneratorType)
    items = list(tensors)
    if is_generator and not items:
        warnings.warn(
            f"`{name}` is an empty generator, no gradient clipping will occur.",
            UserWarning,
            stacklevel=3,
        )
    if not all(issubclass(kind, torch.Tensor) for kind in {type(item) for item in items}):
        for index, item in enumerate(items):
            if not isinstance(item, torch.Tensor):
                raise TypeError(f"{name}[{index}] must be a torch.Tensor, got {type(item).__name__}")
    return items


def grads_of(parameters: TensorOrTensors) -> list[torch.Tensor]:
    """The ``.grad`` of every parameter that has one, checked to be dense."""
    grads = [g for g in [p.grad for p in as_tensor_list(parameters)] if g is not None]
    check_dense(grads, "gradient")
    return grads


def check_dense(tensors: list[torch.Tensor], what: str) -> None:
    if {tensor.layout for tensor in tensors} <= {torch.strided}:
        return
    for index, tensor in enumerate(tensors):
        if tensor.layout is not torch.strided:
            raise TypeError(
                f"{what} {index} has layout {tensor.layout}; gradclip clips dense (strided) "
                "gradients only. Convert it with .to_dense(), or use a dense embedding "
                "(nn.Embedding(sparse=False))."
            )


def check_norm_type(norm_type: float | int | str) -> float:
    """Return ``norm_type`` as a float after checking it is in (0, inf].

    A norm of per-tensor norms equals the norm of all entries only for p > 0;
    for p = 0 or p < 0 (including -inf) it is not, so those are refused.
    """
    if isinstance(norm_type, bool) or not isinstance(norm_type, (numbers.Real, str)):
        raise TypeError(f"norm_type must be a positive number or 'inf', got {type(norm_type).__name__}")
    try:
        p = float(norm_type)
    except ValueError:
        raise ValueError(f"norm_type must be a positive number or 'inf', got {norm_type!r}") from None
    if math.isnan(p) or p <= 0:
        raise ValueError(
            f"norm_type must be in (0, inf] (a positive number or inf), got {norm_type!r}; "
            "p <= 0 and -inf are not norms of norms"
        )
    return p


def check_threshold(name: str, value: Threshold) -> Threshold:
    """Check a clipping threshold is a number >= 0 (inf allowed).

    A tensor threshold is accepted as is: checking its value would need a
    host-device synchronisation. It must be a real floating-point scalar.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise TypeError(f"{name} as a tensor must be a floating-point scalar, got shape "
                            f"{tuple(value.shape)} and dtype {value.dtype}")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number >= 0, got {type(value).__name__}")
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be a number in [0, inf], got {value!r}")
    return value


def check_foreach(foreach: bool | None) -> bool | None:
    if foreach is not None and not isinstance(foreach, bool):
        raise TypeError(f"foreach must be None, True or False, got {foreach!r}")
    return foreach
