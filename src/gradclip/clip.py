"""Global norm clipping and value clipping: drop-in replacements for ``torch.nn.utils``.

Also :func:`clip_grad_norm_report_`, the same clipping returning what it did.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from . import _groups, _validate, distributed
from ._scaling import NORM_EPS, clamp_, clip_coefficient, scale_
from .norms import grouped_norm, raise_if_nonfinite
from .result import ClipResult

__all__ = ["NORM_EPS", "clip_grad_norm_", "clip_grad_norm_report_", "clip_grad_value_", "clip_grads_with_norm_"]


@torch.no_grad()
def clip_grads_with_norm_(
    parameters: _validate.TensorOrTensors,
    max_norm: Any,
    total_norm: torch.Tensor,
    foreach: bool | None = None,
) -> None:
    r"""Scale gradients in place, given their total norm computed earlier.

    .. math::

        g \leftarrow g \cdot \min\Big(1, \frac{c}{\|g\| + 10^{-6}}\Big)

    The second half of :func:`clip_grad_norm_`, as ``torch.nn.utils.clip_grads_with_norm_``:
    compute the norm with :func:`get_total_norm` (for instance reduced over
    pipeline stages), then scale. On an accelerator the multiply always runs,
    even when the factor is 1, so that there is no host-device sync; on the
    CPU, where reading the factor is free, a factor of exactly 1 skips it.

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` is scaled.
        max_norm: the threshold c, a number in [0, inf], or a one-element tensor (checked on the CPU; on an accelerator used without a read, and a negative or NaN one gives NaN gradients).
        total_norm: the norm of all gradients, a tensor.
        foreach: as in :func:`get_total_norm`.

    A DTensor ``total_norm`` (what ``torch.nn.utils.get_total_norm`` returns
    for DTensor gradients) is made whole with ``full_tensor()`` first, and
    DTensor gradients are scaled through their local shards.

    Raises:
        TypeError: ``parameters`` is not a tensor or an iterable of tensors, or a gradient is sparse, or ``total_norm`` is not a tensor.
        ValueError: ``max_norm`` is negative or NaN (it must be in [0, inf]).
        RuntimeError: ``foreach=True`` on a device without foreach kernels.

    References:
        * Pascanu, Mikolov and Bengio (2013), "On the difficulty of training recurrent neural networks", `arXiv:1211.5063 <https://arxiv.org/abs/1211.5063>`__.
        * PyTorch, ``torch.nn.utils.clip_grad_norm_`` and ``get_total_norm``: `pytorch.org/docs <https://pytorch.org/docs/stable/generated/torch.nn.utils.clip_grad_norm_.html>`__.

    Example:
        >>> import torch, gradclip
        >>> w = torch.zeros(2, requires_grad=True); w.grad = torch.tensor([3.0, 4.0])
        >>> gradclip.clip_grads_with_norm_([w], 1.0, gradclip.get_total_norm([w.grad]))
        >>> w.grad
        tensor([0.6000, 0.8000])
    """
    max_norm = _validate.check_threshold("max_norm", max_norm)
    if not isinstance(total_norm, torch.Tensor):
        raise TypeError(f"total_norm must be a torch.Tensor (from get_total_norm), got {type(total_norm).__name__}")
    _validate.check_foreach(foreach)
    dtensor = _groups.dtensor_type()
    if dtensor is not None and isinstance(total_norm, dtensor):
        total_norm = total_norm.full_tensor()
    grads = _validate.grads_of(parameters)
    if grads:
        scale_(_groups.groups_of(grads, foreach), clip_coefficient(max_norm, total_norm), foreach)


@torch.no_grad()
def clip_grad_norm_(
    parameters: _validate.TensorOrTensors,
    max_norm: Any,
    norm_type: Any = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    process_group: Any = None,
    replicated: Iterable[torch.Tensor] | None = None,
) -> torch.Tensor:
    r"""Clip the global norm of the gradients in place; return the norm before clipping.

    .. math::

        \|g\|_p = \Big(\sum_{\text{params}} \|g_i\|_p^p\Big)^{1/p}, \qquad
        g_i \leftarrow g_i \cdot \min\Big(1, \frac{c}{\|g\|_p + 10^{-6}}\Big)

    Norm clipping rescales the whole gradient, so its direction is kept and
    its length is capped at c (Pascanu, Mikolov and Bengio 2013,
    `arXiv:1211.5063 <https://arxiv.org/abs/1211.5063>`__).

    A drop-in for ``torch.nn.utils.clip_grad_norm_`` with the same contract
    (parameters without ``.grad`` skipped, ``tensor(0.)`` for none, any
    p in (0, inf]), and equal results for float32 and float64 gradients. Where
    torch is silently wrong, this is not:

    * float16/bfloat16 gradients are reduced in float32 and the norm comes back
      in float32 (torch returns ``inf`` above 65504 and then zeroes every gradient);
    * float32 and float64 gradients whose squares overflow or underflow get their
      right norm (float64 ``[2e200, 0.]``: torch's norm is ``inf`` and it zeroes them);
    * a gradient with no entries contributes nothing to the norm, the inf-norm
      included (torch raises there: a max over no entries has no identity);
    * a negative or NaN ``max_norm`` raises ``ValueError`` (torch flips the gradients);
    * ``norm_type`` 0, negative or -inf raises ``ValueError``;
    * sparse gradients raise ``TypeError`` with a message saying what to do.

    Non-finite values, synchronisation and distributed training follow the
    conventions of :mod:`gradclip` (under DDP pass no ``process_group``; see
    :mod:`gradclip.distributed`).

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` is clipped.
        max_norm: the threshold c, a number in [0, inf], or a one-element tensor (checked on the CPU; on an accelerator used without a read, and a negative or NaN one gives NaN gradients).
        norm_type: p, in (0, inf].
        error_if_nonfinite: raise ``RuntimeError`` when the norm is NaN or inf (syncs).
        foreach: ``None`` picks the fastest batched path, ``True`` insists on
            torch's foreach kernels, ``False`` loops over tensors.
        process_group: ``None``, ``True`` or :data:`gradclip.distributed.WORLD`
            (the default group), a ``ProcessGroup`` or a 1-D ``DeviceMesh``:
            the ranks the plain gradients are sharded over; the partial sums of
            :math:`|g|^p` (max for p = inf) are all-reduced across it.
        replicated: parameters whose gradient every rank of ``process_group``
            holds identically; counted once, not once per rank.

    Returns:
        The total norm before clipping, a 0-dim tensor.

    Raises:
        TypeError: ``parameters`` is not a tensor or an iterable of tensors, or a gradient is sparse, or ``max_norm``/``norm_type`` is not a number.
        ValueError: ``max_norm`` is negative or NaN (it must be in [0, inf]).
        ValueError: ``norm_type`` is not in (0, inf] (0, negative, -inf or NaN).
        RuntimeError: ``error_if_nonfinite=True`` and the norm is NaN or inf.
        RuntimeError: ``foreach=True`` on a device without foreach kernels.
        RuntimeError: ``process_group`` is given but ``torch.distributed`` is not initialized.

    References:
        * Pascanu, Mikolov and Bengio (2013), "On the difficulty of training recurrent neural networks", `arXiv:1211.5063 <https://arxiv.org/abs/1211.5063>`__.
        * PyTorch, ``torch.nn.utils.clip_grad_norm_`` and ``get_total_norm``: `pytorch.org/docs <https://pytorch.org/docs/stable/generated/torch.nn.utils.clip_grad_norm_.html>`__.

    Example:
        >>> import torch, gradclip
        >>> w = torch.zeros(2, requires_grad=True); w.grad = torch.tensor([3.0, 4.0])
        >>> gradclip.clip_grad_norm_([w], max_norm=1.0)
        tensor(5.)
        >>> w.grad
        tensor([0.6000, 0.8000])
    """
    norm, _, _ = clip_norm_and_scale_(parameters, max_norm, norm_type, error_if_nonfinite, foreach,
                                      process_group=process_group, replicated=replicated)
    return norm


def clip_norm_and_scale_(
    parameters: _validate.TensorOrTensors,
    max_norm: Any,
    norm_type: Any,
    error_if_nonfinite: bool,
    foreach: bool | None,
    *,
    process_group: Any = None,
    replicated: Iterable[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, _validate.Threshold]:
    """The work of :func:`clip_grad_norm_`: the pre-clip norm, the factor applied and the checked threshold.

    The factor is computed from the norm in float64, so it is right even when
    the norm is too large for the gradients' dtype.
    """
    max_norm = _validate.check_threshold("max_norm", max_norm)
    groups, norm, wide = grad_norm(parameters, norm_type, foreach, process_group=process_group,
                                   replicated=replicated)
    if _validate.check_bool("error_if_nonfinite", error_if_nonfinite):
        raise_if_nonfinite(norm, _validate.check_norm_type(norm_type))
    scale = clip_coefficient(max_norm, wide)
    scale_(groups, scale, foreach)
    return norm, scale.to(norm.dtype), max_norm


def grad_norm(
    parameters: _validate.TensorOrTensors,
    norm_type: Any,
    foreach: bool | None,
    *,
    process_group: Any = None,
    replicated: Iterable[torch.Tensor] | None = None,
) -> tuple[list[_groups.Group], torch.Tensor, torch.Tensor]:
    """Check the arguments; the groups, total norm and float64 total norm of the gradients of ``parameters``."""
    p = _validate.check_norm_type(norm_type)
    _validate.check_foreach(foreach)
    return grouped_norm(_validate.grads_of(parameters), p, foreach, process_group=process_group,
                        replicated=replicated)


@torch.no_grad()
def clip_grad_value_(
    parameters: _validate.TensorOrTensors,
    clip_value: Any,
    foreach: bool | None = None,
) -> None:
    r"""Clamp every gradient entry into ``[-clip_value, clip_value]`` in place.

    .. math::

        g_j \leftarrow \max(-v, \min(v, g_j))

    Value clipping bounds each entry but changes the gradient's direction;
    as v goes to 0, ``clamp(g, -v, v) / v`` becomes ``sign(g)`` (signSGD,
    Bernstein et al. 2018, `arXiv:1802.04434 <https://arxiv.org/abs/1802.04434>`__).

    A drop-in for ``torch.nn.utils.clip_grad_value_`` (returns ``None``; NaN
    entries stay NaN), except that a negative or NaN ``clip_value`` raises
    ``ValueError`` instead of producing an empty interval.

    DTensor gradients are clamped through their local shards, with no
    communication; a ``Partial`` placement raises ``ValueError`` (its local
    values are summands, not entries).

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` is clamped.
        clip_value: v, a number in [0, inf].
        foreach: as in :func:`clip_grad_norm_`.

    Raises:
        TypeError: ``parameters`` is not a tensor or an iterable of tensors, or a gradient is sparse or complex, or ``clip_value`` is not a number or a one-element tensor.
        ValueError: ``clip_value`` is negative or NaN (it must be in [0, inf]), or a DTensor gradient has a ``Partial`` placement.
        RuntimeError: ``foreach=True`` on a device without foreach kernels.

    References:
        * Bernstein, Wang, Azizzadenesheli and Anandkumar (2018), "signSGD", `arXiv:1802.04434 <https://arxiv.org/abs/1802.04434>`__.
        * PyTorch, ``torch.nn.utils.clip_grad_value_``: `pytorch.org/docs <https://pytorch.org/docs/stable/generated/torch.nn.utils.clip_grad_value_.html>`__.

    Example:
        >>> import torch, gradclip
        >>> w = torch.zeros(3, requires_grad=True); w.grad = torch.tensor([-5.0, 0.5, 2.0])
        >>> gradclip.clip_grad_value_([w], 1.0)
        >>> w.grad
        tensor([-1.0000,  0.5000,  1.0000])
    """
    clip_value = _validate.check_threshold("clip_value", clip_value)
    _validate.check_foreach(foreach)
    grads = _validate.grads_of(parameters, entrywise="clip_grad_value_")
    if grads:
        groups = _groups.groups_of(grads, foreach)
        distributed.check_not_partial(groups, "clip_grad_value_")
        clamp_(groups, clip_value, foreach)


@torch.no_grad()
def clip_grad_norm_report_(
    parameters: _validate.TensorOrTensors,
    max_norm: Any,
    norm_type: Any = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    process_group: Any = None,
    replicated: Iterable[torch.Tensor] | None = None,
) -> ClipResult:
    r""":func:`gradclip.clip_grad_norm_`, returning a :class:`~gradclip.result.ClipResult` instead of the norm.

    .. math::

        s = \min\Big(1, \frac{c}{\|g\|_p + 10^{-6}}\Big), \qquad g \leftarrow s\, g

    Same kernels, same result and same cost as :func:`gradclip.clip_grad_norm_`
    (Pascanu et al. 2013, `arXiv:1211.5063 <https://arxiv.org/abs/1211.5063>`__),
    and no host-device synchronisation: the result's fields (pre-clip norm,
    threshold, factor) and properties (``clipped``, ``post_norm``) are
    tensors on the device. Keep them, stack them over many steps, and read
    them once; reading one (``float(result.norm)``) synchronises.

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` is clipped.
        max_norm: the threshold c, a number in [0, inf], or a one-element tensor (checked on the CPU; on an accelerator used without a read, and a negative or NaN one gives NaN gradients).
        norm_type: p, in (0, inf].
        error_if_nonfinite: raise ``RuntimeError`` when the norm is NaN or inf (syncs).
        foreach: as in :func:`gradclip.clip_grad_norm_`.
        process_group, replicated: for sharded gradients, as in :func:`gradclip.clip_grad_norm_`.

    Returns:
        A :class:`~gradclip.result.ClipResult` of 0-dim tensors: ``norm``,
        ``threshold`` and ``scale``, all on the norm's device.

    Raises:
        TypeError, ValueError, RuntimeError: as :func:`clip_grad_norm_`.

    References:
        * Pascanu, Mikolov and Bengio (2013), "On the difficulty of training recurrent neural networks", `arXiv:1211.5063 <https://arxiv.org/abs/1211.5063>`__.

    Example:
        >>> import torch, gradclip
        >>> w = torch.zeros(2, requires_grad=True); w.grad = torch.tensor([3.0, 4.0])
        >>> r = gradclip.clip_grad_norm_report_([w], max_norm=1.0)
        >>> r.norm, r.clipped, r.post_norm
        (tensor(5.), tensor(True), tensor(1.0000))
    """
    norm, scale, max_norm = clip_norm_and_scale_(parameters, max_norm, norm_type, error_if_nonfinite, foreach,
                                                 process_group=process_group, replicated=replicated)
    if isinstance(max_norm, torch.Tensor):
        threshold = max_norm.to(device=norm.device, dtype=norm.dtype)
    else:
        threshold = torch.full((), max_norm, dtype=norm.dtype, device=norm.device)
    return ClipResult(norm=norm, threshold=threshold, scale=scale)
