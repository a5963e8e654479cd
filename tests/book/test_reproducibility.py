"""The book's CPU kernels are pinned before torch runs anything, so stored runs reproduce across x86-64 CPUs."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from gradclip_book import reproducibility

X86 = platform.machine().lower() in ("x86_64", "amd64")


@pytest.mark.skipif(not X86, reason="the pin applies to x86-64 only")
def test_importing_the_book_package_pins_avx2_kernels_in_a_fresh_process():
    env = {k: v for k, v in os.environ.items() if k not in reproducibility.PINNED}
    code = ("import torch, gradclip_book; from gradclip_book.reproducibility import cpu_kernels; "
            "torch.ones(3).exp(); print(cpu_kernels())")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    kernels = eval(done.stdout.strip())
    assert kernels == {"aten": "AVX2", **reproducibility.PINNED}


def test_a_variable_the_environment_sets_is_left_alone(monkeypatch):
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    newly = reproducibility.pin_cpu_kernels()
    assert "MKL_CBWR" not in newly and os.environ["MKL_CBWR"] == "COMPATIBLE"


@pytest.mark.skipif(not X86, reason="the pin applies to x86-64 only")
def test_this_test_process_runs_the_pinned_kernels():
    assert reproducibility.cpu_kernels()["aten"] == "AVX2"
