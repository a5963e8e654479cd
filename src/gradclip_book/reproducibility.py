"""The same run gives the same numbers on every x86-64 CPU: the book's CPU kernels are pinned to AVX2.

PyTorch picks its CPU kernels by what the processor offers: on an AVX-512 Xeon, ATen's vectorised
kernels, MKL's matrix products and oneDNN's convolutions take AVX-512 code paths; on an AVX2-only
EPYC, AVX2 ones. The paths add in different orders, and a training run amplifies the last-bit
differences: chapter 4's run at depth 16, lr 0.5, ``max_norm`` 0.1 ends at 95.6% test accuracy on one
machine and 92.5% on the other. The book stores precomputed runs and checks them by re-running, so
importing :mod:`gradclip_book` pins all three to AVX2, which every x86-64 CPU of the last decade has:

* ``ATEN_CPU_CAPABILITY=avx2``: ATen's vectorised kernels (read at the first operation);
* ``MKL_CBWR=AVX2``: MKL's conditional numerical reproducibility (the same results on any processor with
  AVX2; read at MKL's first call);
* ``ONEDNN_MAX_CPU_ISA=AVX2``: oneDNN's convolutions (read at the first primitive).

A variable the environment already sets is left as it is. The pin takes effect only when
:mod:`gradclip_book` is imported before PyTorch has run an operation (``import torch`` alone is fine);
:func:`cpu_kernels` reports what is in effect. On other processors (Arm) nothing is set, and the book's
stored runs may differ from fresh ones in their last digits, and chaotic runs by more.

Example:
    >>> cpu_kernels()["aten"] in {"AVX2", "DEFAULT", "AVX512", "SVE256", "NO AVX"}
    True
"""

from __future__ import annotations

import os
import platform

__all__ = ["PINNED", "cpu_kernels", "pin_cpu_kernels"]

PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
"""The environment variables the book sets on x86-64 (unless already set), and their values."""


def pin_cpu_kernels() -> dict[str, str]:
    """Set :data:`PINNED` in ``os.environ`` on x86-64 where unset; returns what was set."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    newly = {name: value for name, value in PINNED.items() if name not in os.environ}
    os.environ.update(newly)
    return newly


def cpu_kernels() -> dict[str, str | None]:
    """ATen's CPU capability in effect and the pinning variables as the environment holds them."""
    import torch

    return {"aten": torch.backends.cpu.get_cpu_capability(), **{name: os.environ.get(name) for name in PINNED}}
