"""GradientMonitor: per-layer gradient norms and update-to-weight ratios, recorded without a sync."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Union

import torch

from . import _validate
from ._norms import tensor_norms, wide_dtype
from .clippers import grad_scale_of, wrap_closure

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
      The update is measured after every other post-step hook, whatever the
      order of attachment: a step that an attached
      :class:`~gradclip.SpikeGuard` skips (its weights put back) records
      ``update_ratio`` 0, the weights' true change, and an attached
      :class:`~gradclip.UpdateClip`'s clipped update is what is measured.
      Under ``scaler.step`` a step the GradScaler skips (inf/NaN gradients)
      is not recorded with a non-fused optimizer (the scaler does not call
      its ``step``, so no hook runs) and is recorded with a fused one, with
      the non-finite gradient norm and ``update_ratio`` 0.

    Attached to an optimizer whose ``step`` is compiled (``torch.compile(optimizer.step)``),
    the monitor's hooks run outside the compiled graphs (``torch.compiler.disable``: a graph
    break each, which ``step`` has anyway), so recording does not recompile the step; call
    ``record()`` outside a ``fullgraph=True`` region.

    Attached, it records the gradients the step uses. With
    ``optimizer.step(closure)`` (LBFGS, SAM-style optimizers, Lightning) the
    gradients are made inside the step: the monitor measures them inside the
    closure, after its ``backward()`` (and after the clippers attached before
    it); when the closure is evaluated several times per step (LBFGS) the
    first evaluation is recorded, the gradients at the weights the step
    starts from. With a fused optimizer under ``scaler.step`` (whose
    gradients are still multiplied by the scale) the gradient norms are
    divided by the scale, so they are the true ones. ``state_dict()`` holds
    the records (tensors and plain values, loadable with
    ``torch.load(weights_only=True)``); the monitor pickles (detached).

    Args:
        parameters: a module (its ``named_parameters()``) or (name, parameter) pairs.
        layer_fn: maps a parameter name to its layer name; default drops the
            last dotted component (``"fc.weight"`` -> ``"fc"``).
        norm_type: p, in (0, inf].
        track_updates: measure update-to-weight ratios when attached.

    Raises:
        TypeError: ``parameters`` holds something else than (name, tensor) pairs, ``layer_fn`` is not callable or returns a non-str, or ``track_updates`` is not a bool; when recording, a parameter has a sparse gradient (the message names it; only dense gradients are supported).
        ValueError: ``parameters`` is empty or ``norm_type`` is not in (0, inf]; :meth:`load_state_dict` of another configuration.
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
                hint = (": pass the model itself or model.named_parameters(), not model.parameters()"
                        if isinstance(item, torch.Tensor) else "")
                raise TypeError(f"parameters[{index}] must be a (name, tensor) pair, got {type(item).__name__}{hint}")
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

    def _check_dense(self, grads: list[torch.Tensor | None]) -> None:
        if {g.layout for g in grads if g is not None} <= {torch.strided}:
            return
        for name, grad in zip(self.names, grads):
            if grad is not None and grad.layout is not torch.strided:
                raise TypeError(
                    f"GradientMonitor: the gradient of parameter {name!r} has layout {grad.layout}; only "
                    "dense (strided) gradients are supported. Use a dense gradient (for an embedding, "
                    "nn.Embedding(sparse=False)), convert it with .to_dense() before recording, or leave "
                    "this parameter out of the monitor."
                )

    @torch.no_grad()
    def _measure(self, grad_scale: torch.Tensor | float | None = None) -> torch.Tensor:
        device = self._device()
        grads = [p.grad for p in self.parameters]
        self._check_dense(grads)
        grad_norms = self._layer_norms(self._param_norms(grads, device))
        if grad_scale is not None:  # a fused step under GradScaler: the gradients are still scaled
            if isinstance(grad_scale, torch.Tensor):
                grad_scale = grad_scale.detach().to(device=device, dtype=grad_norms.dtype)
            grad_norms = grad_norms / grad_scale
        weights = self._layer_norms(self._param_norms(list(self.parameters), device))
        return torch.stack([grad_norms, weights, torch.full_like(grad_norms, math.nan)])

    def record(self, step: int | None = None) -> None:
        """Record the current gradient and weight norms (call after ``backward()``).

        Args:
            step: the step number for the table; default: one more than the last.

        Raises:
            TypeError: ``step`` is not an int, a parameter has a sparse gradient, or the parameters are DTensors (FSDP2).
        """
        step = self._next_step(step)
        _validate.refuse_dtensors(self.parameters, "GradientMonitor",
                                  "Record on a model that is not sharded (for example one rank's full copy), or "
                                  "log gradclip.clip_grad_norm_report_, which reduces DTensor norms over the ranks.")
        self._steps.append(step)
        self._records.append(self._measure())

    def _next_step(self, step: int | None) -> int:
        if step is None:
            return self._steps[-1] + 1 if self._steps else 0
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int or None, got {type(step).__name__}")
        return step

    def attach(self, optimizer: torch.optim.Optimizer) -> "GradientMonitor":
        """Record on every ``optimizer.step()`` (and measure the update). Returns ``self``.

        Without a closure the gradients are measured before the step; with
        ``optimizer.step(closure)``, inside the closure after its first
        evaluation (see the class docstring).

        ``optimizer`` may be a framework's wrapper that steps a torch optimizer without running
        ``torch.optim.Optimizer.__init__`` (accelerate's ``AcceleratedOptimizer``, Lightning's
        ``LightningOptimizer``): the monitor follows ``.optimizer`` and ``._optimizer`` to the torch
        optimizer and hooks that one.

        Raises:
            TypeError: ``optimizer`` is neither a ``torch.optim.Optimizer`` nor a wrapper holding one in
                ``.optimizer`` or ``._optimizer`` (the message names what was given).
            RuntimeError: the monitor is already attached (``detach()`` first).
        """
        optimizer = _validate.check_optimizer(optimizer, "GradientMonitor.attach")
        if self._hooks:
            raise RuntimeError("GradientMonitor is already attached; call detach() first")
        self._hooks = [optimizer.register_step_pre_hook(self._pre_hook),
                       optimizer.register_step_post_hook(self._post_hook)]
        return self

    def _measure_last(self, optimizer: torch.optim.Optimizer) -> None:
        """Move the post-step hook after every other one, so the update is measured once the step is final.

        Post-step hooks run in the order they were registered, and some change the weights after
        the optimizer's own update: a SpikeGuard puts back the weights of a step it skips, an
        UpdateClip shrinks the update. Measured before them, a skipped step showed the update that
        was undone (an update ratio of 19.69 where the weights did not move).
        """
        if len(self._hooks) < 2:
            return
        post = self._hooks[1]
        hooks = optimizer.__dict__.get("_optimizer_step_post_hooks")
        if hooks is not None and post.id in hooks and next(reversed(hooks)) != post.id:
            hooks[post.id] = hooks.pop(post.id)  # (a dict or an OrderedDict: re-inserted last)

    # The hooks append a record per step to Python lists: inside a compiled optimizer step they run
    # outside the graph (a graph break), so the step's graphs do not recompile for every new length.
    @torch.compiler.disable
    def _pre_hook(self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        self._measure_last(optimizer)
        self._before_step()

        def measure() -> None:
            if self._pending is None:  # LBFGS evaluates the closure again: the first evaluation counts
                self._pending = self._measure(grad_scale_of(optimizer, kwargs))

        wrapped = wrap_closure(args, kwargs, measure)
        if wrapped is None:
            measure()
        return wrapped

    @torch.compiler.disable
    def _post_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._after_step()

    def detach(self) -> None:
        """Stop recording on ``optimizer.step()``."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._before = None

    @torch.no_grad()
    def _before_step(self) -> None:
        self._pending = None
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

    # --- saving ----------------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {"class": type(self).__name__, "layers": list(self.layers), "norm_type": self._p}

    def state_dict(self) -> dict[str, Any]:
        """The records: ``{"config", "steps", "records"}``, tensors (copies, on the CPU) and plain values.

        ``records`` is a float tensor of shape (steps, 3, layers): gradient
        norm, weight norm and update ratio per step and layer. Loadable with
        ``torch.load(path, weights_only=True)``.
        """
        if self._records:
            records = torch.stack([r.to(torch.float64) for r in self._records]).to("cpu", copy=True)
        else:
            records = torch.zeros(0, 3, len(self.layers), dtype=torch.float64)
        return {"config": self._config(), "steps": list(self._steps), "records": records}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Replace the records by those of a :meth:`state_dict` of a monitor of the same layers and norm.

        Raises:
            TypeError: ``state_dict`` is not a mapping.
            ValueError: it was saved by a monitor of other layers or another ``norm_type`` (the
                message names the field), or it is not a monitor state.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        config, steps, records = state_dict.get("config"), state_dict.get("steps"), state_dict.get("records")
        if not isinstance(config, Mapping) or not isinstance(steps, list) or not isinstance(records, torch.Tensor):
            raise ValueError("state_dict is not a GradientMonitor state: it needs 'config', 'steps' and 'records'")
        mine = self._config()
        for key in mine:
            if config.get(key) != mine[key]:
                raise ValueError(f"state_dict was saved with {key}={config.get(key)!r} but this "
                                 f"GradientMonitor has {key}={mine[key]!r}")
        if records.shape != (len(steps), 3, len(self.layers)):
            raise ValueError(f"state_dict['records'] must have shape ({len(steps)}, 3, {len(self.layers)}), "
                             f"got {tuple(records.shape)}")
        device = self._device()
        self._steps = [int(s) for s in steps]
        self._records = [r.to(device) for r in records.unbind(0)]

    # --- pickling --------------------------------------------------------------------------

    _TRANSIENT = {"_hooks": [], "_before": None, "_pending": None, "_index_cache": {}}

    def __getstate__(self) -> dict[str, Any]:
        """Records, names and parameters; hooks and the weights' copy are dropped (an unpickled monitor is detached).

        The parameters are pickled with the monitor: pickle it in one call
        with the model (``torch.save({"model": model, "monitor": monitor})``) to
        keep them the model's own.
        """
        state = self.__dict__.copy()
        for key, value in self._TRANSIENT.items():
            state[key] = type(value)() if value is not None else None
        return state

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        self.__dict__.update({key: type(value)() if value is not None else None
                              for key, value in self._TRANSIENT.items()})
        self.__dict__.update(state)
