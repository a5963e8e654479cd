"""Stored runs and fresh ones: the CPU kernels the book pins, and how a re-run is checked on another CPU.

PyTorch picks its CPU kernels by what the processor offers: on an AVX-512 Xeon, ATen's vectorised
kernels, MKL's matrix products and oneDNN's convolutions take AVX-512 code paths; on an AVX2-only
EPYC, AVX2 ones. The paths add in different orders, and a training run amplifies the last-bit
differences: chapter 4's run at depth 16, lr 0.5, ``max_norm`` 0.1 ended at 95.6% test accuracy on one
machine and 92.5% on the other. Importing :mod:`gradclip_book` therefore pins all three to AVX2, which
every x86-64 CPU of the last decade has:

* ``ATEN_CPU_CAPABILITY=avx2``: ATen's vectorised kernels (read at the first operation);
* ``MKL_CBWR=AVX2``: MKL's conditional numerical reproducibility (read at MKL's first call);
* ``ONEDNN_MAX_CPU_ISA=AVX2``: oneDNN's convolutions (read at the first primitive).

A variable the environment already sets is left as it is. The pin takes effect only when
:mod:`gradclip_book` is imported before PyTorch has run an operation (``import torch`` alone is fine);
:func:`cpu_kernels` reports what is in effect. On other processors (Arm) nothing is set.

The pin was checked on one kind of machine only, the one that computed every stored grid
(:data:`GRID_MACHINE`: an AMD EPYC without AVX-512): there a fresh run equals the stored one bit for bit.
An Intel CPU with AVX-512 does not give the same bits under the pin (a 2-core Xeon VM, 2026-12-08): of the text
grid's 164 tanh-RNN runs re-run there, six parted from the stored loss by more than 2e-4 at step 3 and none earlier;
its LSTM and transformer runs none before step 4; seed 0's ReLU RNN of chapter 6's exercise parted by 5.4e-4 at
step 7. Without the pin the runs differed more: of 48 classification runs stored on an AVX-512 Xeon and re-run on the EPYC,
3 diverged on one machine only; of the other 45, 28 parted by more than 1e-4 in their loss, the
earliest at step 10 (a run exploding at lr 0.8), the median at step 47; validation accuracy moved by up
to 17 points (7 of 33 finished runs by more than 1 point). So :func:`rerun_differences` checks a
re-run exactly on the grid's kind of machine and, on any other, only its first :data:`EARLY_STEPS`
steps, which a change of the code that decides a run still breaks (a learning rate 1% off does).
How this was measured: ``chapters/data/README.md``.

Example:
    >>> cpu_kernels()["aten"] in {"AVX2", "DEFAULT", "AVX512", "SVE256", "NO AVX"}
    True
    >>> rerun_differences({"loss": [2.5, 2.0], "seconds": 3.0}, {"loss": [2.5, 2.1], "seconds": 1.0},
    ...                   same_machine=True)
    ['loss stored [2.5, 2.1], now [2.5, 2.0]']
"""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["EARLY_STEPS", "GRID_MACHINE", "PINNED", "cpu_kernels", "machine", "on_grid_machine", "pin_cpu_kernels",
           "rerun_differences"]

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


GRID_MACHINE = {"vendor": "AuthenticAMD", "avx512f": False, "aten": "AVX2", "torch": "2.13.0+cpu"}
"""The kind of machine every stored grid was computed on (chapters/data/README.md), as :func:`machine` reads it."""

EARLY_STEPS = 3
"""Off the grid's kind of machine, a re-run is compared with the stored run for this many first steps (unpinned
runs of two CPUs parted by 1e-4 from step 10 on; pinned runs on an AVX-512 Xeon by more than 2e-4 from step 3 on:
the module docstring). A learning rate 1% off still shows in them (tests/book/test_reproducibility.py)."""

EARLY_RTOL = 2e-4
"""... to this relative tolerance: stored values have 5 significant digits, so one unit in the last is 1e-4."""

IGNORED = ("seconds",)
"""Fields of a run's record that are not compared: wall time."""


def machine() -> dict[str, Any]:
    """What decides a run's last bits here: the CPU's vendor, whether it has AVX-512, ATen's kernels, torch."""
    import torch

    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.exists() else ""
    fields = dict(line.split(":", 1) for line in text.splitlines()[:40] if ":" in line)
    fields = {name.strip(): value.strip() for name, value in fields.items()}
    return {"vendor": fields.get("vendor_id", platform.processor() or "unknown"),
            "avx512f": "avx512f" in fields.get("flags", "").split(),
            "aten": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def on_grid_machine() -> bool:
    """Whether this machine is of :data:`GRID_MACHINE`'s kind, where stored runs re-run bit for bit."""
    return machine() == GRID_MACHINE


def _early_losses(record: dict[str, Any]) -> dict[int, Any]:
    """The loss at every recorded step below :data:`EARLY_STEPS`, whichever way the record stores its curve."""
    if "curve" in record:  # the harness's records: {"curve": {"step": [...], "loss": [...]}}
        steps, losses = record["curve"]["step"], record["curve"]["loss"]
    elif "curve_step" in record:  # classification records: parallel lists
        steps, losses = record["curve_step"], record["loss"]
    else:  # one loss per step
        losses = record["loss"]
        steps = range(len(losses))
    return {step: loss for step, loss in zip(steps, losses) if step < EARLY_STEPS}


def _close(now: Any, stored: Any) -> bool:
    if not isinstance(now, (int, float)) or not isinstance(stored, (int, float)):
        return now == stored  # None, or "nan"/"inf" as stored
    return math.isclose(now, stored, rel_tol=EARLY_RTOL, abs_tol=1e-12)


def rerun_differences(fresh: dict[str, Any], stored: dict[str, Any], *,
                      same_machine: bool | None = None) -> list[str]:
    """What a fresh run's record does not share with the stored one; an empty list when it reproduces it.

    On the grid's kind of machine (``same_machine``, by default :func:`on_grid_machine`) every field but
    :data:`IGNORED` must be equal. Elsewhere only the config and the loss at each of the first
    :data:`EARLY_STEPS` steps are compared, the loss to a relative :data:`EARLY_RTOL`: later steps, and so the
    final metrics, may part by the last bits a training run amplifies (see the module's docstring).

    Args:
        fresh, stored: records of the same format (a grid line, or a run's JSON form).
        same_machine: compare exactly (True) or the first steps only (False).

    Returns:
        One line per difference: the field, the stored value, the fresh one.
    """
    same_machine = on_grid_machine() if same_machine is None else same_machine
    if same_machine:
        return [f"{name} stored {stored.get(name)}, now {value}" for name, value in fresh.items()
                if name not in IGNORED and stored.get(name) != value]
    problems = [] if fresh.get("config", stored.get("config")) == stored.get("config") else ["config differs"]
    now, then = _early_losses(fresh), _early_losses(stored)
    if now.keys() != then.keys():
        problems.append(f"steps below {EARLY_STEPS}: stored {sorted(then)}, now {sorted(now)}")
    problems += [f"loss at step {step}: stored {then[step]}, now {now[step]}"
                 for step in sorted(now.keys() & then.keys()) if not _close(now[step], then[step])]
    return problems
