"""GradientMonitor: per-layer gradient norms and update-to-weight ratios, recorded without a sync."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Union

import torch

from . import _validate
from ._norms import tensor_norms, wide_dtype

__all__ = ["GradientMonitor"]

NamedParameters = Union[torch.nn.Module, Iterable[tuple[str, torch.Tensor]]]


def _default_layer(name: str) -> str:
    """``"encoder.0.weight"`` -> ``"encoder.0"``: the module that owns the parameter."""
    return name.rsplit(".", 1)[0] if "." in name else name


class GradientMonitor:
    r"""Record per-layer gradient norms, weight norms and update-to-weight ratios each step.

    For a layer l with parameters :math:`w_{l,i}` and gradients :math:`g_{l,i}`:

    .. math::

        \|g_l\|_p = \Big(\sum_i \|g_{l,i}\|_p^p\Big)^{1/p}, \qquad
        r_l = \frac{\|w_l^{t+1} - w_l^{t}\|_p}{\|w_l^{t}\|_p}

    The update-to-weight ratio :math:`r_l` is the diagnostic of
    LARS (You, Gitman and Ginsburg 2017, `arXiv:1708.03888 <https://arxiv.org/abs/1708.03888>`__):
    around :math:`10^{-3}` per step is healthy for SGD-like training.

    Each record runs one ``torch._foreach_norm`` per (device, dtype) group
    for the gradients and one for the weights (accumulated in float32 at
    least), then a scatter-add into layers. The results stay on the device in
    stacked tensors: no host sync per parameter or per step. :meth:`table`
    reads everything once, as a tidy list of rows (one per step and layer)
    ready for ``pandas.DataFrame(rows)`` or plotting.

    Two ways to record:

    * ``monitor.record(step)`` after ``backward()``: gradient and weight norms
      (``update_ratio`` is ``nan``);
    * ``monitor.attach(optimizer)``: records before every ``optimizer.step()``
      and, with ``track_updates=True``, keeps a copy of the weights across the
      step to measure the update (one extra copy of the parameters in memory).
      Attach it after a clipper to see the clipped gradients, before to see
      the raw ones (step pre-hooks run in the order they were registered).

    Args:
        parameters: a module (its ``named_parameters()``) or (name, parameter) pairs.
        layer_fn: maps a parameter name to its layer name; default drops the
            last dotted component (``"fc.weight"`` -> ``"fc"``).
        norm_type: p, in (0, inf].
        track_updates: measure update-to-weight ratios when attached.

    Raises:
        TypeError: ``parameters`` holds something else than (name, tensor) pairs, ``layer_fn`` is not callable or returns a non-str, or ``track_updates`` is not a bool.
        ValueError: ``parameters`` is empty or ``norm_type`` is not in (0, inf].
        RuntimeError: :meth:`attach` on a monitor that is already attached.

    References:
        * You, Gitman and Ginsburg (2017), "Large Batch Training of Convolutional Networks" (LARS), `arXiv:1708.03888 <https://arxiv.org/abs/1708.03888>`__.

    Example:
        >>> import torch, gradclip
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> monitor = gradclip.GradientMonitor(model).attach(opt)
        >>> model(torch.ones(2, 3)).sum().backward(); opt.step()
        >>> rows = monitor.table()
        >>> [row["layer"] for row in rows], sorted(rows[0])
        (['0', '1'], ['grad_norm', 'layer', 'step', 'update_ratio', 'weight_norm'])
    """

    def __init__(self, parameters: NamedParameters, layer_fn: Callable[[str], str] | None = None,
                 norm_type: float | str = 2.0, track_updates: bool = True) -> None:
        named = list(parameters.named_parameters() if isinstance(parameters, torch.nn.Module) else parameters)
        if not named:
            raise ValueError("parameters is empty: nothing to monitor")
        for index, item in enumerate(named):
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                    and isinstance(item[1], torch.Tensor)):
                raise TypeError(f"parameters[{index}] must be a (name, tensor) pair, got {type(item).__name__}")
        if layer_fn is not None:
            _validate.check_callable("layer_fn", layer_fn, "parameter name -> layer name, or None")
        _validate.check_bool("track_updates", track_updates)
        self._p = _validate.check_norm_type(norm_type)
        self.track_updates = track_updates
        self.names = [name for name, _ in named]
        self.parameters = [param for _, param in named]
        layer_fn = layer_fn or _default_layer
        self.layers: list[str] = []
        positions: dict[str, int] = {}
        index = []
        for name in self.names:
            layer = layer_fn(name)
            if not isinstance(layer, str):
                raise TypeError(f"layer_fn must return a str, returned {type(layer).__name__} for {name!r}")
            index.append(positions.setdefault(layer, len(positions)))
            if len(positions) > len(self.layers):
                self.layers.append(layer)
        self._layer_index = torch.tensor(index)
        self._steps: list[int] = []
        self._records: list[torch.Tensor] = []
        self._before: list[torch.Tensor] | None = None
        self._pending: torch.Tensor | None = None
        self._pending_step = 0
        self._hooks: list[Any] = []
        self._index_cache: dict[tuple[torch.device, tuple[int, ...]], torch.Tensor] = {}

    # --- norms -----------------------------------------------------------------------------

    def _param_norms(self, tensors: list[torch.Tensor | None], device: torch.device) -> torch.Tensor:
        """Per-tensor p-norms (0 for ``None``), in one foreach kernel per (device, dtype)."""
        present = [(i, t) for i, t in enumerate(tensors) if t is not None]
        dtype = wide_dtype(device)  # per-tensor norms come back wide: never overflowed
        out = torch.zeros(len(tensors), dtype=dtype, device=device)
        by_key: dict[tuple[torch.device, torch.dtype], list[tuple[int, torch.Tensor]]] = {}
        for i, t in present:
            by_key.setdefault((t.device, t.dtype), []).append((i, t))
        for (group_device, group_dtype), items in by_key.items():
            norms = tensor_norms([t.detach() for _, t in items], self._p, group_device, None)
            key = (device, tuple(i for i, _ in items))
            where = self._index_cache.get(key)
            if where is None:
                where = self._index_cache[key] = torch.tensor(key[1], device=device)
            out.index_copy_(0, where, norms.to(device=device, dtype=dtype))
        return out

    def _layer_norms(self, param_norms: torch.Tensor) -> torch.Tensor:
        index = self._layer_index.to(param_norms.device)
        out = torch.zeros(len(self.layers), dtype=param_norms.dtype, device=param_norms.device)
        if math.isinf(self._p):
            return out.scatter_reduce(0, index, param_norms, reduce="amax", include_self=True)
        return out.index_add(0, index, param_norms**self._p) ** (1 / self._p)

    def _device(self) -> torch.device:
        return self.parameters[0].device

    # --- recording -------------------------------------------------------------------------

    @torch.no_grad()
    def _measure(self) -> torch.Tensor:
        device = self._device()
        grads = self._layer_norms(self._param_norms([p.grad for p in self.parameters], device))
        weights = self._layer_norms(self._param_norms(list(self.parameters), device))
        return torch.stack([grads, weights, torch.full_like(grads, math.nan)])

    def record(self, step: int | None = None) -> None:
        """Record the current gradient and weight norms (call after ``backward()``).

        Args:
            step: the step number for the table; default: one more than the last.
        """
        step = self._next_step(step)
        self._steps.append(step)
        self._records.append(self._measure())

    def _next_step(self, step: int | None) -> int:
        if step is None:
            return self._steps[-1] + 1 if self._steps else 0
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int or None, got {type(step).__name__}")
        return step

    def attach(self, optimizer: torch.optim.Optimizer) -> "GradientMonitor":
        """Record on every ``optimizer.step()`` (and measure the update). Returns ``self``."""
        _validate.check_optimizer(optimizer)
        if self._hooks:
            raise RuntimeError("GradientMonitor is already attached; call detach() first")
        self._hooks = [optimizer.register_step_pre_hook(lambda opt, a, k: self._before_step()),
                       optimizer.register_step_post_hook(lambda opt, a, k: self._after_step())]
        return self

    def detach(self) -> None:
        """Stop recording on ``optimizer.step()``."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._before = None

    @torch.no_grad()
    def _before_step(self) -> None:
        self._pending = self._measure()
        self._pending_step = self._next_step(None)
        if self.track_updates:
            if self._before is None or any(b.shape != p.shape or b.dtype != p.dtype
                                           for b, p in zip(self._before, self.parameters)):
                self._before = [torch.empty_like(p.detach()) for p in self.parameters]
            for b, p in zip(self._before, self.parameters):
                b.copy_(p.detach())

    @torch.no_grad()
    def _after_step(self) -> None:
        record = self._pending
        if record is None:
            return
        if self.track_updates and self._before is not None:
            updates = [p.detach() - b for p, b in zip(self.parameters, self._before)]
            update_norms = self._layer_norms(self._param_norms(updates, self._device()))
            record = torch.stack([record[0], record[1], update_norms.to(record.dtype) / record[1]])
        self._steps.append(self._pending_step)
        self._records.append(record)
        self._pending = None

    # --- export ----------------------------------------------------------------------------

    def table(self) -> list[dict[str, Any]]:
        """Every record as tidy rows: step, layer, grad_norm, weight_norm, update_ratio.

        Reads the device once (one sync for the whole history).
        """
        if not self._records:
            return []
        values = torch.stack([r.to(torch.float64) for r in self._records]).cpu().tolist()
        rows = []
        for step, (grads, weights, ratios) in zip(self._steps, values):
            for layer, g, w, r in zip(self.layers, grads, weights, ratios):
                rows.append({"step": step, "layer": layer, "grad_norm": g, "weight_norm": w, "update_ratio": r})
        return rows

    def clear(self) -> None:
        """Forget every record."""
        self._steps, self._records = [], []
