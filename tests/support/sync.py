"""The one host-sync detector: reading a tensor's value on the host is what a sync is.

Two mechanisms, enabled together by :func:`no_host_sync`:

* the Python-level reads (``item``, ``bool``, ``float``, ``tolist``, ``numpy`` ...)
  of ``torch.Tensor`` are replaced by a function that fails (:func:`forbid_host_reads`);
* :class:`NoSync`, a dispatch mode, fails on the aten ops that copy a value to the
  host (``item``, ``_local_scalar_dense``), which also catches reads made inside C++.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import gradclip._norms
from torch.utils._python_dispatch import TorchDispatchMode

MESSAGE = "host-device synchronisation: a tensor value was read on the host"
HOST_READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy")


class NoSync(TorchDispatchMode):
    """Fails on any op that reads a tensor's value on the host (a host-device sync on an accelerator)."""

    SYNCING = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCING:
            raise AssertionError(f"{MESSAGE} ({func})")
        return func(*args, **(kwargs or {}))


def forbid_host_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every Python-level read of a tensor's value fail, until ``monkeypatch`` is undone."""

    def refuse(*args, **kwargs):
        raise AssertionError(MESSAGE)

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, refuse)


@contextlib.contextmanager
def no_host_sync():
    """Inside the block, any read of a tensor's value on the host raises ``AssertionError``.

    CPU tensors stand in for accelerator tensors: the library's CPU-only host
    checks (``gradclip._norms.HOST_CHECKS_ON_CPU``) are switched off, so the
    code paths under test are those an accelerator runs.
    """
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(gradclip._norms, "HOST_CHECKS_ON_CPU", False)
        forbid_host_reads(monkeypatch)
        with NoSync():
            yield


@pytest.fixture
def forbid_sync():
    """:func:`no_host_sync` around the whole test, as a fixture."""
    with no_host_sync():
        yield
