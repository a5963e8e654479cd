"""Choosing and checking a threshold: the Deep Learning Tuning Playbook's advice as functions.

Log the unclipped gradient norms, set the threshold near their 90th percentile
(:func:`suggest_threshold`), and if most steps end up clipped
(:func:`clipped_fraction`), lower the learning rate instead
(:func:`should_lower_lr`).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Union

import torch

from . import _validate
from .result import ClipResult

__all__ = ["clipped_fraction", "should_lower_lr", "suggest_threshold"]

History = Union[torch.Tensor, Sequence[Union[float, torch.Tensor]]]


def _as_history(values: History, name: str) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        history = values.detach()
    elif isinstance(values, Sequence) and not isinstance(values, (str, bytes)):
        items = list(values)
        if items and all(isinstance(v, torch.Tensor) for v in items):
            if any(v.numel() != 1 for v in items):
                raise ValueError(f"{name} must hold scalars; got a tensor with {max(v.numel() for v in items)} elements")
            history = torch.stack([v.detach().reshape(()) for v in items])
        elif all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in items):
            history = torch.tensor(items, dtype=torch.float64)
        else:
            raise TypeError(f"{name} must be a tensor or a sequence of numbers or 0-dim tensors")
    else:
        raise TypeError(f"{name} must be a tensor or a sequence of numbers, got {type(values).__name__}")
    if history.ndim > 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(history.shape)}")
    history = history.reshape(-1)
    if history.numel() == 0:
        raise ValueError(f"{name} is empty: at least one observed norm is needed")
    return history


def suggest_threshold(norm_history: History, q: float = 0.9) -> torch.Tensor:
    r"""A clipping threshold: the q-quantile of the gradient norms seen so far.

    .. math::

        c = Q_q\big(\|g_1\|, \dots, \|g_T\|\big)

    The Deep Learning Tuning Playbook (Godbole, Dahl, Gilmer, Shallue and
    Nado 2023, `github.com/google-research/tuning_playbook
    <https://github.com/google-research/tuning_playbook>`__) advises running
    without clipping, watching the unclipped gradient norms, and setting the
    threshold near their 90th percentile. The quantile is numpy's default
    ("linear" interpolation between order statistics), computed in float64 for
    Python numbers and in the history's dtype (float32 at least) for tensors.

    Non-finite values: a NaN in the history gives NaN (it is not skipped: a
    NaN norm is a problem to see, not a value to ignore); inf values count
    as the largest norms.

    Args:
        norm_history: the pre-clip norms, a 1-D tensor or a sequence of numbers
            or 0-dim tensors (for example ``[r.norm for r in results]``), or a
            sequence of :class:`~gradclip.result.ClipResult` (their ``norm``).
        q: the quantile, in [0, 1].

    Returns:
        A 0-dim tensor, on the history's device (no sync for a tensor history).

    Raises:
        TypeError: ``norm_history`` is not a tensor or a sequence of numbers, or ``q`` is not a number.
        ValueError: ``q`` is outside [0, 1], or the history is empty or not 1-D.

    References:
        * Godbole, Dahl, Gilmer, Shallue and Nado (2023), Deep Learning Tuning Playbook, `github.com/google-research/tuning_playbook <https://github.com/google-research/tuning_playbook>`__.

    Example:
        >>> import gradclip
        >>> gradclip.suggest_threshold([1.0, 2.0, 3.0, 4.0, 100.0], q=0.9)
        tensor(61.6000, dtype=torch.float64)
    """
    if isinstance(q, bool) or not isinstance(q, numbers.Real):
        raise TypeError(f"q must be a number in [0, 1], got {type(q).__name__}")
    if not 0 <= q <= 1:
        raise ValueError(f"q must be a number in [0, 1], got {q!r}")
    if isinstance(norm_history, Sequence) and norm_history and all(isinstance(r, ClipResult) for r in norm_history):
        norm_history = [r.norm for r in norm_history]
    history = _as_history(norm_history, "norm_history")
    if not history.is_floating_point():
        history = history.to(torch.float64)
    elif history.dtype in (torch.float16, torch.bfloat16):
        history = history.float()
    return torch.quantile(history, float(q), interpolation="linear")


def clipped_fraction(history: History | Sequence[ClipResult], threshold: _validate.Threshold | None = None) -> torch.Tensor:
    r"""The fraction of steps whose gradient was clipped.

    .. math::

        f = \frac{1}{T} \sum_{t=1}^{T} [\![\, \text{step } t \text{ was clipped} \,]\!]

    Give either a sequence of :class:`~gradclip.result.ClipResult` (their
    ``clipped`` flags are counted), a sequence or tensor of booleans, or a
    history of norms together with ``threshold`` (a step counts as clipped when
    its norm exceeds the threshold, or is NaN). The Tuning Playbook's rule of
    thumb (see :func:`should_lower_lr`): clipping more than half of the steps
    means the learning rate, not the clipping, should change.

    Args:
        history: ClipResults, booleans, or norms (then ``threshold`` is needed).
        threshold: c, a number in [0, inf] or a 0-dim tensor, for a history of norms.

    Returns:
        A 0-dim float32 tensor in [0, 1] (no sync for tensor inputs).

    Raises:
        TypeError: ``history`` holds neither ClipResults, booleans nor numbers.
        ValueError: ``threshold`` is missing for norms, given for ClipResults or booleans, or negative; or the history is empty.

    References:
        * Godbole, Dahl, Gilmer, Shallue and Nado (2023), Deep Learning Tuning Playbook, `github.com/google-research/tuning_playbook <https://github.com/google-research/tuning_playbook>`__.

    Example:
        >>> import gradclip
        >>> gradclip.clipped_fraction([0.5, 2.0, 3.0, 0.1], threshold=1.0)
        tensor(0.5000)
    """
    if isinstance(history, Sequence) and history and all(isinstance(r, ClipResult) for r in history):
        if threshold is not None:
            raise ValueError("threshold must be None for a history of ClipResult (each holds its own)")
        flags = torch.stack([r.clipped.reshape(()) for r in history])
    else:
        if isinstance(history, Sequence) and history and all(isinstance(v, bool) for v in history):
            values = torch.tensor(list(history))
        else:
            values = _as_history(history, "history")
        if values.dtype == torch.bool:
            if threshold is not None:
                raise ValueError("threshold must be None for a history of booleans")
            flags = values
        else:
            if threshold is None:
                raise ValueError("threshold is required for a history of norms (or pass ClipResults or booleans)")
            threshold = _validate.check_threshold("threshold", threshold)
            flags = torch.logical_not(values <= threshold)  # NaN counts as clipped
    if flags.numel() == 0:
        raise ValueError("history is empty: at least one step is needed")
    return flags.to(torch.float32).mean()


def should_lower_lr(fraction: float | torch.Tensor, limit: float = 0.5) -> torch.Tensor:
    r"""Whether clipping fires so often that the learning rate should be lowered instead.

    .. math::

        f > \text{limit} \quad (\text{default } \tfrac12)

    The Deep Learning Tuning Playbook: "if more than 50% of the updates are
    getting clipped, the learning rate is probably too large" (clipping is
    then doing the job of a smaller learning rate, badly). ``fraction``
    usually comes from :func:`clipped_fraction`.

    Args:
        fraction: the clipped fraction f, a number or a 0-dim tensor in [0, 1].
        limit: the fraction above which to lower the learning rate, in [0, 1).

    Returns:
        A 0-dim bool tensor (on the fraction's device; no sync).

    Raises:
        TypeError: ``fraction`` is not a number or a tensor.
        ValueError: ``fraction`` is outside [0, 1] or not a scalar, or ``limit`` is outside [0, 1).

    References:
        * Godbole, Dahl, Gilmer, Shallue and Nado (2023), Deep Learning Tuning Playbook, `github.com/google-research/tuning_playbook <https://github.com/google-research/tuning_playbook>`__.

    Example:
        >>> import gradclip
        >>> gradclip.should_lower_lr(gradclip.clipped_fraction([True, True, False]))
        tensor(True)
    """
    if isinstance(limit, bool) or not isinstance(limit, numbers.Real) or not 0 <= limit < 1:
        raise ValueError(f"limit must be a number in [0, 1), got {limit!r}")
    if isinstance(fraction, torch.Tensor):
        if fraction.numel() != 1:
            raise ValueError(f"fraction must be a scalar, got shape {tuple(fraction.shape)}")
        return fraction.reshape(()) > limit
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real):
        raise TypeError(f"fraction must be a number in [0, 1] or a 0-dim tensor, got {type(fraction).__name__}")
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")
    return torch.tensor(fraction > limit)
