"""Shared pieces of the adaptive-clipper tests."""

from __future__ import annotations

import pytest
import torch

def forbid_host_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading a tensor's value on the host is what a sync is; make every such read fail."""

    def refuse(*args, **kwargs):
        raise AssertionError("host-device synchronisation: a tensor value was read on the host")

    for name in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


def scalar_param(value: float, dtype=torch.float64) -> torch.nn.Parameter:
    """A one-entry parameter whose gradient norm is exactly |value|."""
    w = torch.nn.Parameter(torch.zeros(1, dtype=dtype))
    w.grad = torch.tensor([value], dtype=dtype)
    return w
