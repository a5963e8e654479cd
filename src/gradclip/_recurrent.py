"""``nn.RNN``, ``nn.LSTM`` and ``nn.GRU`` written out step by step, so that ``torch.func.vmap`` can take them.

torch's recurrent layers run one fused kernel (``_VF.rnn_tanh``, ``_VF.lstm``, ``_VF.gru``, or
cuDNN/oneDNN's) that has no batching rule: under ``vmap`` the RNN and GRU kernels fail on an
in-place write into their unbatched hidden state, and the CPU LSTM falls back to a loop over the
examples. Per-sample clipping replaces their ``forward`` while it computes per-example gradients
with the same recurrence in ordinary ops: one matrix product for every time step's input
projection, then per step one for the hidden state and the gate nonlinearities (the equations of
torch's documentation for each layer). Opacus reaches the same per-example gradients by
replacing the layers with its own ``DPLSTM``/``DPGRU`` modules built from per-step linear layers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

_STOCK_FORWARDS = {cls: cls.forward for cls in (nn.RNN, nn.LSTM, nn.GRU)}


def is_stock(module: nn.Module) -> bool:
    """An ``nn.RNN``, ``nn.LSTM`` or ``nn.GRU`` (or a subclass) whose ``forward`` is torch's own."""
    return any(isinstance(module, cls) and type(module).forward is forward for cls, forward in _STOCK_FORWARDS.items())


class PackedSequenceError(TypeError):
    """A recurrent layer got a ``PackedSequence`` where per-example gradients are computed one example at a time."""


PACKED_HINT = (
    "per-sample clipping runs the model on one example at a time under torch.func.vmap, where a "
    "PackedSequence cannot be built (its lengths are data that vmap cannot read): run the recurrent layer on the "
    "padded batch instead and read each example's output at its last valid step, e.g. "
    "out[torch.arange(len(out)), lengths - 1] with batch_first=True (exact for a unidirectional layer, whose "
    "outputs do not depend on the padding after them)"
)


@contextlib.contextmanager
def unrolled(model: nn.Module) -> Iterator[None]:
    """While inside, every stock recurrent module of ``model`` runs :func:`forward` (restored on exit)."""
    patched = [module for module in model.modules() if is_stock(module) and "forward" not in module.__dict__]
    try:
        for module in patched:
            module.forward = _bound_forward(module)
        yield
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)


def _bound_forward(module: nn.RNNBase) -> Any:
    def run(input: Any, hx: Any = None) -> Any:
        return forward(module, input, hx)
    return run


def forward(module: nn.RNNBase, input: Any, hx: Any = None) -> Any:
    """``module(input, hx)`` for an ``nn.RNN``, ``nn.LSTM`` or ``nn.GRU``, unrolled over time.

    Same arguments, shapes and results as the module's own ``forward`` (batched or unbatched input,
    ``batch_first``, ``num_layers``, ``bidirectional``, ``bias``, ``dropout`` between layers in
    training mode, ``proj_size``), except that a ``PackedSequence`` raises :class:`PackedSequenceError`.
    """
    if isinstance(input, PackedSequence):
        raise PackedSequenceError(f"a {type(module).__name__} got a PackedSequence: {PACKED_HINT}")
    lstm = module.mode == "LSTM"
    batched = input.dim() == 3
    x = input if batched else input.unsqueeze(1)
    if batched and module.batch_first:
        x = x.transpose(0, 1)
    steps, batch = x.shape[0], x.shape[1]
    directions = 2 if module.bidirectional else 1
    out_size = module.proj_size if getattr(module, "proj_size", 0) else module.hidden_size
    if hx is None:
        h0 = x.new_zeros(module.num_layers * directions, batch, out_size)
        c0 = x.new_zeros(module.num_layers * directions, batch, module.hidden_size) if lstm else None
    else:
        h0, c0 = hx if lstm else (hx, None)
        if not batched:
            h0 = h0.unsqueeze(1)
            c0 = c0.unsqueeze(1) if c0 is not None else None
    finals_h, finals_c = [], []
    layer_input = x
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(directions):
            index = layer * directions + direction
            out, h, c = _layer(module, layer_input, h0[index], c0[index] if lstm else None,
                               f"_l{layer}{'_reverse' if direction else ''}", reverse=direction == 1, steps=steps)
            outputs.append(out)
            finals_h.append(h)
            finals_c.append(c)
        layer_input = outputs[0] if directions == 1 else torch.cat(outputs, dim=2)
        if module.dropout and module.training and layer < module.num_layers - 1:
            layer_input = F.dropout(layer_input, module.dropout, training=True)
    output, h_n = layer_input, torch.stack(finals_h)
    c_n = torch.stack(finals_c) if lstm else None
    if not batched:
        output, h_n = output.squeeze(1), h_n.squeeze(1)
        c_n = c_n.squeeze(1) if c_n is not None else None
    elif module.batch_first:
        output = output.transpose(0, 1)
    return output, ((h_n, c_n) if lstm else h_n)


class _WeightTap(torch.autograd.Function):
    """Zeros ``(T, B, out)`` added to a weight's product at every step; their gradient is the weight's.

    A weight used at every time step gets T gradient contributions, one outer product per step,
    which autograd adds up one by one: under ``vmap`` each is a per-example copy of the weight.
    Here the step's product uses the weight detached, plus these zeros, whose gradient at step t
    is the gradient of the product's output; the backward pass returns the weight's gradient
    ``sum_t grad_t^T x_t`` (and the bias's ``sum_t grad_t``) as one matrix product over all steps.
    ``inputs`` holds what the weight multiplies at each step, computed beforehand.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(weight: torch.Tensor, bias: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        return inputs.new_zeros(inputs.shape[0], inputs.shape[1], weight.shape[0])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[2])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        (inputs,) = ctx.saved_tensors
        grad_rows = grad.reshape(-1, grad.shape[-1])
        return grad_rows.T @ inputs.reshape(-1, inputs.shape[-1]), grad_rows.sum(0), None


def _tap(weight: torch.Tensor | None, bias: torch.Tensor | None, inputs: torch.Tensor) -> torch.Tensor:
    if bias is None:  # (a tensor in its place keeps the Function's signature simple; its gradient is dropped)
        bias = weight.new_zeros(weight.shape[0]).detach()
    return _WeightTap.apply(weight, bias, inputs)


def _layer(module: nn.RNNBase, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None, suffix: str,
           reverse: bool, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One direction of one layer over the (T, B, in) sequence ``x``: (outputs (T, B, H_out), h_T, c_T).

    The recurrence runs twice: once without gradients, for the values each step's recurrent
    weights multiply, then with the weights' products tapped (:class:`_WeightTap`).
    """
    def weight(name: str) -> torch.Tensor | None:
        return getattr(module, f"{name}{suffix}", None)

    w_hh, b_hh, w_hr = weight("weight_hh"), weight("bias_hh"), weight("weight_hr")
    projected = F.linear(x, weight("weight_ih"), weight("bias_ih"))  # every step's input part at once
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    with torch.no_grad():
        _, before, unprojected = _recur(module.mode, projected, h, c, order, steps, w_hh, b_hh, w_hr)
    taps = _tap(w_hh, b_hh, before)
    projection_taps = _tap(w_hr, None, unprojected) if w_hr is not None else None
    detach = (lambda t: None if t is None else t.detach())
    outputs, _, _, h, c = _recur(module.mode, projected, h, c, order, steps, detach(w_hh), detach(b_hh),
                                 detach(w_hr), taps, projection_taps, final=True)
    return outputs, h, c


def _recur(mode: str, projected: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None, order: range, steps: int,
           w_hh: torch.Tensor, b_hh: torch.Tensor | None, w_hr: torch.Tensor | None,
           taps: torch.Tensor | None = None, projection_taps: torch.Tensor | None = None,
           final: bool = False) -> Any:
    """The recurrence over ``order``: the outputs (T, B, H_out), and per step what ``w_hh`` multiplied (the
    previous hidden state) and what ``w_hr`` multiplied (the unprojected hidden state); with ``final``, also
    the last h and c. ``taps``: zeros added to each step's products (see :class:`_WeightTap`)."""
    # unbind once: indexing step by step would give each step's gradient a full-size zero tensor to fill
    projected_steps = projected.unbind(0)
    tap_steps = taps.unbind(0) if taps is not None else None
    projection_tap_steps = projection_taps.unbind(0) if projection_taps is not None else None
    outputs: list[torch.Tensor] = list(projected_steps)
    before: list[torch.Tensor] = list(projected_steps)
    unprojected: list[torch.Tensor] = list(projected_steps)
    for t in order:
        before[t] = h
        recurrent = F.linear(h, w_hh, b_hh)
        if tap_steps is not None:
            recurrent = recurrent + tap_steps[t]
        if mode == "LSTM":
            i, f, g, o = (projected_steps[t] + recurrent).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            if w_hr is not None:
                unprojected[t] = h
                h = F.linear(h, w_hr)
                if projection_tap_steps is not None:
                    h = h + projection_tap_steps[t]
        elif mode == "GRU":
            x_r, x_z, x_n = projected_steps[t].chunk(3, dim=-1)
            h_r, h_z, h_n = recurrent.chunk(3, dim=-1)
            r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
            h = (1 - z) * torch.tanh(x_n + r * h_n) + z * h
        elif mode == "RNN_RELU":
            h = torch.relu(projected_steps[t] + recurrent)
        else:
            h = torch.tanh(projected_steps[t] + recurrent)
        outputs[t] = h
    if final:
        return torch.stack(outputs), None, None, h, c
    return torch.stack(outputs), torch.stack(before), torch.stack(unprojected)
