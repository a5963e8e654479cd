"""An opt-in flat gradient buffer: one allocation per (device, dtype) holds every ``.grad``."""

from __future__ import annotations

import warnings
import weakref

import torch

from . import _groups, _validate

__all__ = ["GradBuffer"]


def _dense_strides(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s strides lay its entries out without gaps or overlaps (any dimension order)."""
    expected = 1
    for size, stride in sorted(zip(tensor.shape, tensor.stride()), key=lambda pair: pair[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _view_like(buffer: torch.Tensor, offset: int, param: torch.Tensor) -> torch.Tensor:
    """A view of ``buffer[offset : offset + numel]`` with ``param``'s strides where they are dense.

    Autograd accumulates into an existing ``.grad`` in place only when its layout matches the
    parameter's (the "gradient layout contract"): a channels_last weight needs a channels_last
    gradient, or every backward pass warns and goes through a copy.
    """
    if _dense_strides(param):
        return buffer.as_strided(param.shape, param.stride(), buffer.storage_offset() + offset)
    return buffer[offset : offset + param.numel()].view(param.shape)


# id(parameter) -> weak reference to the GradBuffer that holds its gradient now. Keyed by id: tensors
# compare elementwise, so they cannot be dictionary keys; a stale entry (a dead parameter's id reused)
# at worst silences one check.
_OWNER: dict[int, weakref.ref] = {}


def _view_check(buffer_ref: weakref.ref, view_ref: weakref.ref):
    """A post-accumulate-grad hook: the buffer warns once when backward wrote a gradient outside its view."""
    def check(param: torch.Tensor) -> None:
        buffer, view = buffer_ref(), view_ref()
        owner = _OWNER.get(id(param))
        if buffer is None or view is None or owner is None or owner() is not buffer:
            return  # the buffer is gone or a newer one holds this parameter
        if param.grad is not view:
            buffer._warn_outside()
    return check


class GradBuffer:
    r"""Make every parameter's ``.grad`` a view into one flat buffer per (device, dtype).

    Autograd accumulates into an existing ``.grad`` in place, so after
    ``GradBuffer(model.parameters())`` every backward pass writes into the
    buffers. The clipping functions notice gradients that tile one buffer and
    then run one kernel for the norm and one for the scale, whatever the
    number of tensors (the same idea as the flat buckets of Megatron-LM,
    DeepSpeed and FSDP). With thousands of small tensors this is many times
    faster than one kernel per tensor; the results are identical. Each view
    has its parameter's layout (a channels_last weight gets a channels_last
    view), which autograd's in-place accumulation requires.

    ``optimizer.zero_grad()`` sets gradients to ``None`` by default, which
    would detach them from the buffer. Use ``buffer.zero_grad()`` (or
    ``optimizer.zero_grad(set_to_none=False)``) instead. If a backward pass
    finds a gradient outside the buffer, the buffer warns once (clipping then
    works tensor by tensor, correct but without the speed-up); ``rebind_()``
    moves the gradients back.

    Args:
        parameters: the parameters whose gradients the buffer holds; those
            with ``requires_grad=False`` are left alone.

    Raises:
        TypeError: ``parameters`` is not a tensor or an iterable of tensors, or holds DTensors (FSDP2).
        ValueError: no parameter has ``requires_grad=True``.

    References:
        * Shoeybi et al. (2019), "Megatron-LM" (flat gradient buffers and the global norm), `arXiv:1909.08053 <https://arxiv.org/abs/1909.08053>`__.

    Example:
        >>> import torch, gradclip
        >>> model = torch.nn.Linear(3, 2)
        >>> buffer = gradclip.GradBuffer(model.parameters())
        >>> model(torch.ones(1, 3)).sum().backward()
        >>> buffer.views_intact()
        True
        >>> float(gradclip.clip_grad_norm_(model.parameters(), 1.0)) > 1.0
        True
    """

    def __init__(self, parameters: _validate.TensorOrTensors) -> None:
        self.parameters = [p for p in _validate.as_tensor_list(parameters) if p.requires_grad]
        _validate.refuse_dtensors(self.parameters, "GradBuffer",
                                  "FSDP2 keeps its own flat buffers; clip its DTensor gradients directly "
                                  "(gradclip.clip_grad_norm_ reduces them over the ranks).")
        if not self.parameters:
            raise ValueError("parameters must contain at least one tensor with requires_grad=True")
        self.buffers: dict[_groups.GroupKey, torch.Tensor] = {}
        self._views: list[torch.Tensor] = []
        self._allocate()
        self._warned = False
        for param, view in zip(self.parameters, self._views):  # the newest buffer of a parameter checks it
            _OWNER[id(param)] = weakref.ref(self)
            param.register_post_accumulate_grad_hook(_view_check(weakref.ref(self), weakref.ref(view)))

    def _warn_outside(self) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(
                "GradBuffer: a backward pass wrote gradients outside the buffer, so clipping runs "
                "tensor by tensor (correct, without the flat-buffer speed-up). optimizer.zero_grad() "
                "sets gradients to None by default: call buffer.zero_grad() or "
                "optimizer.zero_grad(set_to_none=False) instead.",
                UserWarning, stacklevel=_validate._outside_stacklevel())

    def _allocate(self) -> None:
        grouped = _groups.by_device_and_dtype(self.parameters)
        views_by_param: dict[int, torch.Tensor] = {}
        for (device, dtype), group in grouped.items():
            total = sum(p.numel() for p in group)
            buffer = torch.zeros(total, dtype=dtype, device=device)
            self.buffers[(device, dtype)] = buffer
            offset, group_views = 0, []
            for param in group:
                group_views.append(_view_like(buffer, offset, param))
                views_by_param[id(param)] = group_views[-1]
                offset += param.numel()
            _groups.register_views(buffer, group_views)
        self._views = [views_by_param[id(p)] for p in self.parameters]
        self.rebind_()

    @torch.no_grad()
    def rebind_(self) -> None:
        """Point every ``.grad`` back at its view, copying in any gradient found elsewhere."""
        for param, view in zip(self.parameters, self._views):
            if param.grad is view:
                continue
            if param.grad is None:
                view.zero_()
            else:
                view.copy_(param.grad)
            param.grad = view

    def views_intact(self) -> bool:
        """Whether every ``.grad`` is still the buffer's view (host metadata only)."""
        return all(param.grad is view for param, view in zip(self.parameters, self._views))

    @torch.no_grad()
    def zero_grad(self) -> None:
        """Zero all gradients with one kernel per buffer, keeping them in the buffer."""
        for buffer in self.buffers.values():
            buffer.zero_()
        for param, view in zip(self.parameters, self._views):
            param.grad = view
