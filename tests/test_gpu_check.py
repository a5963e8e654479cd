"""benchmarks/gpu_check.py, the check to run on a CUDA machine, exercised on the CPU (CI has no GPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import gradclip

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
        yield gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))


def test_every_public_name_is_a_checked_path_or_says_why_not(gpu_check):
    checked = {name.split()[0] for name in gpu_check.PATHS}
    exempt = set(gpu_check.NOT_DEVICE_PATHS)
    assert not checked & exempt
    missing = set(gradclip.__all__) - checked - exempt
    assert not missing, f"add these to gpu_check.PATHS (or NOT_DEVICE_PATHS with the reason): {sorted(missing)}"
    assert not (checked | exempt) - set(gradclip.__all__), "names that are not public any more"


def test_without_cuda_it_says_so_and_exits_0():
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "needs a CUDA device" in done.stdout and "nothing was checked" in done.stdout


def test_the_whole_check_runs_on_the_cpu(gpu_check):
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--scale", "0.001", "--repeats", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "FAILED" not in out and "0 sync row(s) failed" in out
    assert out.count("ran (n/a on CPU)") == 2 * len(gpu_check.PATHS)
    for row in ("clip_grad_norm_, clipping", "norm only (float64 accumulation"):
        assert out.count(row) == 4, row   # two gradient sets x float32, bfloat16
