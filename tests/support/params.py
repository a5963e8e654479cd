"""Parameter factories for the tests, and a recorder of the largest temporary an op makes."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def make_params(shapes, dtype=torch.float32, seed=0, grad_scale=1.0, weight_scale=1.0):
    """Parameters of ``shapes`` with seeded normal weights and ``.grad``, drawn in float64 then cast."""
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter((torch.randn(shape, generator=generator, dtype=torch.float64) * weight_scale).to(dtype))
        p.grad = (torch.randn(shape, generator=generator, dtype=torch.float64) * grad_scale).to(dtype)
        params.append(p)
    return params


def clone_params(params):
    """Independent copies of ``params``, gradients included."""
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


def scalar_param(value: float, dtype=torch.float64) -> torch.nn.Parameter:
    """A one-entry parameter whose gradient norm is exactly |value|."""
    w = torch.nn.Parameter(torch.zeros(1, dtype=dtype))
    w.grad = torch.tensor([value], dtype=dtype)
    return w


class LargestTemporary(TorchDispatchMode):
    """Records the largest tensor an out-of-place op returns (in elements)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inplace = func._schema.name.endswith("_") or any(a.is_out for a in func._schema.arguments)
        views = func._schema.name in ("aten::view", "aten::split", "aten::unbind", "aten::detach", "aten::unflatten",
                                      "aten::split_with_sizes", "aten::_unsafe_view", "aten::alias")
        if not inplace and not views:
            for t in out if isinstance(out, (list, tuple)) else [out]:
                if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                    self.largest, self.op = t.numel(), func
        return out
