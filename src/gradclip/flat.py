"""An opt-in flat gradient buffer: one allocation per (device, dtype) holds every ``.grad``."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any

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
# at worst silences one buffer's hook.
_OWNER: dict[int, weakref.ref] = {}


def _accumulator(param: torch.Tensor) -> Any:
    """The AccumulateGrad node of a leaf: the step of a backward pass that writes its ``.grad``.

    Autograd reuses one node per leaf for as long as something holds it (as DDP's reducer does),
    so hooks on it run in every backward pass that accumulates into ``.grad``, and only then
    (not in ``torch.autograd.grad``, nor for a parameter the pass does not reach).
    """
    with torch.enable_grad():
        return param.view_as(param).grad_fn.next_functions[0][0]


def _before_accumulate_hook(buffer_ref: weakref.ref, index: int, param: torch.Tensor, view: torch.Tensor,
                            released: bytearray) -> Callable[..., None]:
    """The AccumulateGrad pre-hook of one parameter: point its ``.grad`` at its view (see ``_before_accumulate``).

    The common case (``.grad`` already the view, or ``None`` over a view known to hold zeros) is
    inlined: this runs once per parameter per backward pass.
    """
    param_id = id(param)

    def hook(grad_outputs: Any) -> None:
        grad = param.grad
        if grad is view or _OWNER.get(param_id) is not buffer_ref:
            return  # accumulating in place already, or a newer buffer holds this parameter
        buffer = buffer_ref()
        if buffer is None:
            return
        if grad is None and released[index] and not buffer._gaps_touched and not torch.is_grad_enabled():
            param.grad = view
            released[index] = 0
            return
        buffer._before_accumulate(index)
    return hook


def _covers_hook(buffer_ref: weakref.ref, indices: list[int]) -> Callable[[list[torch.Tensor]], bool]:
    def covers(tensors: list[torch.Tensor]) -> bool:
        buffer = buffer_ref()
        return buffer is not None and buffer._covers(tensors, indices)
    return covers


class GradBuffer:
    r"""Keep every parameter's ``.grad`` in one flat buffer per (device, dtype).

    Each parameter gets a view of a flat buffer, with its own layout (a
    channels_last weight gets a channels_last view, as autograd's in-place
    accumulation requires). Just before a backward pass accumulates a
    parameter's gradient, the buffer points its ``.grad`` at that view, so
    autograd adds the gradient into the buffer in place. The clipping
    functions notice gradients that lie in one buffer and then run one kernel
    for the norm and one for the scale, whatever the number of tensors (the
    same idea as the flat buckets of Megatron-LM, DeepSpeed and FSDP). With
    thousands of small tensors this is many times faster than one kernel per
    tensor; the results are identical.

    **Which parameters have a gradient** is exactly as without the buffer:
    ``buffer.zero_grad()`` (like ``optimizer.zero_grad()``, whose default is
    ``set_to_none=True``) sets every ``.grad`` to ``None``, and a backward pass
    gives a gradient only to the parameters it reaches. A parameter frozen
    with ``requires_grad_(False)``, or used only in a branch the forward pass
    skipped, keeps ``.grad = None``, so the optimizer leaves it alone (no
    weight decay, no momentum, no change to Adam's state); unfrozen again, it
    gets its view back at its next backward pass. The parameters that do get
    gradients still tile one buffer with zeros in between, and the clipping
    functions still take the one-kernel path. ``zero_grad(set_to_none=False)``
    keeps a zeroed view on every parameter, like
    ``optimizer.zero_grad(set_to_none=False)``: the optimizer then steps every
    parameter, with zeros where no gradient came.

    ``optimizer.zero_grad()`` works too (the buffer zeroes the views it left
    at the next backward pass, one kernel per buffer). A gradient set by hand
    (``p.grad = t``) is copied into the view at the next backward pass that
    reaches ``p``, or by :meth:`rebind_`. Only a backward pass with
    ``create_graph=True`` keeps gradients outside the buffer (autograd then
    accumulates out of place); the buffer warns once and clipping works tensor
    by tensor, correct but without the speed-up. A reference to a ``.grad``
    kept across ``zero_grad()`` sees the buffer's later values.

    Args:
        parameters: the leaf tensors whose gradients the buffer holds; those
            with ``requires_grad=False`` when the buffer is made are left out
            (unfrozen later, they get ordinary gradients: make the buffer while
            every parameter that will train is trainable).

    Raises:
        TypeError: ``parameters`` is not a tensor or an iterable of tensors, or holds DTensors (FSDP2).
        ValueError: no parameter has ``requires_grad=True``, or one is not a leaf tensor.

    References:
        * Shoeybi et al. (2019), "Megatron-LM" (flat gradient buffers and the global norm), `arXiv:1909.08053 <https://arxiv.org/abs/1909.08053>`__.

    Example:
        >>> import torch, gradclip
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
        >>> buffer = gradclip.GradBuffer(model.parameters())
        >>> model[0].requires_grad_(False)  # frozen: no gradient, not stepped
        Linear(in_features=3, out_features=2, bias=True)
        >>> buffer.zero_grad()
        >>> model(torch.ones(1, 3)).sum().backward()
        >>> model[0].weight.grad is None, buffer.views_intact()
        (True, True)
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
        for index, param in enumerate(self.parameters):
            if not param.is_leaf:
                raise ValueError(f"parameters[{index}] is not a leaf tensor: autograd writes .grad only into "
                                 "leaves (model.parameters() are leaves)")
        self.buffers: dict[_groups.GroupKey, torch.Tensor] = {}
        self._views: list[torch.Tensor] = []
        # 1 where the buffer itself zeroed a view and left its parameter's .grad None: that view is
        # known to hold zeros, so clipping may run over it as part of the buffer
        self._released = bytearray(len(self.parameters))
        self._position = {id(param): index for index, param in enumerate(self.parameters)}
        self._gaps_touched = False  # a clipping call acted on the whole buffer, zeros between gradients included
        self._warned = False
        self._ref = weakref.ref(self)
        self._allocate()
        self._accumulators = []  # held, so that autograd keeps using these nodes, and their hooks
        for index, param in enumerate(self.parameters):  # the newest buffer of a parameter holds it
            _OWNER[id(param)] = self._ref
            node = _accumulator(param)
            node.register_prehook(_before_accumulate_hook(self._ref, index, param, self._views[index], self._released))
            self._accumulators.append(node)

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
            indices = [self._position[id(param)] for param in group]
            _groups.register_views(buffer, group_views, covers=_covers_hook(self._ref, indices))
        self._views = [views_by_param[id(p)] for p in self.parameters]
        self._view_position = {id(view): index for index, view in enumerate(self._views)}
        self._released[:] = b"\x01" * len(self.parameters)  # all zeros, no .grad points at them yet
        self.rebind_()

    def _holds(self, param: torch.Tensor) -> bool:
        return _OWNER.get(id(param)) is self._ref

    def _before_accumulate(self, index: int) -> None:
        """Point ``.grad`` at the view before autograd accumulates into it (the AccumulateGrad pre-hook).

        Runs inside backward, where grad mode is off unless ``create_graph=True`` (then it returns first).
        """
        param, view = self.parameters[index], self._views[index]
        grad = param.grad
        if grad is view or not self._holds(param):
            return
        if torch.is_grad_enabled():  # backward(create_graph=True): autograd accumulates out of place
            self._warn_outside()
            return
        if grad is None:
            if not self._released[index]:
                self._zero_stale()
            elif self._gaps_touched:  # a non-finite clipping factor may have reached the zeros
                view.zero_()
        elif grad.layout is torch.strided and grad.shape == view.shape and not grad.requires_grad:
            view.copy_(grad)  # a gradient set by hand: autograd would add to it
        else:
            self._warn_outside()
            return
        param.grad = view
        self._released[index] = 0

    def _zero_stale(self) -> None:
        """Zero the views left stale by someone else's ``zero_grad(set_to_none=True)``; mark them known zeros."""
        stale = [i for i, p in enumerate(self.parameters) if p.grad is None and not self._released[i]]
        if len(stale) == len(self.parameters):
            for buffer in self.buffers.values():
                buffer.zero_()
        else:
            for i in stale:
                self._views[i].zero_()
        for i in stale:
            self._released[i] = 1

    def _covers(self, tensors: list[torch.Tensor], indices: list[int]) -> bool:
        """Whether ``tensors`` are views of distinct parameters of one buffer whose other views hold zeros.

        Then one kernel over the whole buffer (the group ``indices``) acts on exactly these gradients.
        """
        seen = set()
        for tensor in tensors:
            index = self._view_position.get(id(tensor))
            if index is None or index in seen or self._views[index] is not tensor:
                return False
            seen.add(index)
        if not all(index in seen or self._released[index] for index in indices):
            return False
        self._gaps_touched = self._gaps_touched or len(seen) < len(indices)
        return True

    def _warn_outside(self) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(
                "GradBuffer: a backward pass with create_graph=True accumulates gradients out of place, outside "
                "the buffer, so clipping runs tensor by tensor (correct, without the flat-buffer speed-up).",
                UserWarning, stacklevel=_validate._outside_stacklevel())

    @torch.no_grad()
    def rebind_(self) -> None:
        """Copy every gradient found outside the buffer into its view, and point ``.grad`` at it.

        A ``.grad`` that is ``None`` stays ``None`` (its view is zeroed).
        """
        for index, (param, view) in enumerate(zip(self.parameters, self._views)):
            grad = param.grad
            if grad is view:
                continue
            if grad is None:
                if not self._released[index]:
                    view.zero_()
                    self._released[index] = 1
                continue
            view.copy_(grad)
            param.grad = view
            self._released[index] = 0

    def views_intact(self) -> bool:
        """Whether every ``.grad`` that is set is the buffer's view (host metadata only)."""
        return all(param.grad is None or param.grad is view for param, view in zip(self.parameters, self._views))

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the buffers (one kernel each); ``.grad`` becomes ``None`` or, with ``set_to_none=False``, a zeroed view.

        Args:
            set_to_none: as in ``torch.optim.Optimizer.zero_grad``: ``True`` (the default) leaves
                ``.grad = None`` until a backward pass reaches the parameter, so that the optimizer
                skips the parameters that get no gradient; ``False`` keeps a zeroed view on each.
        """
        _validate.check_bool("set_to_none", set_to_none)
        for buffer in self.buffers.values():
            buffer.zero_()
        fill = 1 if set_to_none else 0
        for param, view in zip(self.parameters, self._views):
            param.grad = None if set_to_none else view
        self._released[:] = bytes([fill]) * len(self.parameters)
        self._gaps_touched = False


@torch.no_grad()
def accumulate_(param: torch.Tensor, value: torch.Tensor) -> None:
    """Add ``value`` to ``param.grad`` as a backward pass would: into the GradBuffer's view if one holds ``param``."""
    owner = _OWNER.get(id(param))
    buffer = owner() if owner is not None else None
    if buffer is not None and buffer._holds(param):
        buffer._before_accumulate(buffer._position[id(param)])
    if param.grad is None:
        param.grad = value
    else:
        param.grad.add_(value)
