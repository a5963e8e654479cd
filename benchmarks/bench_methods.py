"""AGC and per-sample (DP-SGD) clipping against their straightforward references.

Run as ``.venv/bin/python benchmarks/bench_methods.py``. Candidate and reference run in
the same process, interleaved, and the medians of many runs are compared.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' shared references
from shapes import RESNET50_NUMEL, numel, resnet50_shapes, transformer_small_shapes  # noqa: E402
from support.references import per_sample_clipped_mean, timm_adaptive_clip_grad  # noqa: E402

from gradclip.agc import adaptive_clip_grad_  # noqa: E402
from gradclip.per_sample import per_sample_clipped_grad  # noqa: E402


def interleaved(candidates: dict, runs: int, setup=None) -> dict[str, float]:
    """Median milliseconds of each callable, runs interleaved (one warm-up each)."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for i in range(runs + 1):
        for name, fn in candidates.items():
            if setup is not None:
                setup()
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if i > 0:
                times[name].append(elapsed * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def make_params(shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=generator))
        p.grad = torch.randn(shape, generator=generator) * 0.05
        params.append(p)
    return params


def bench_agc(name: str, shapes, runs: int) -> tuple[str, float, float]:
    params = make_params(shapes)
    saved = [p.grad.clone() for p in params]

    def restore():
        for p, g in zip(params, saved):
            p.grad.copy_(g)

    # same answer first
    restore()
    adaptive_clip_grad_(params, 0.01)
    ours = [p.grad.clone() for p in params]
    restore()
    timm_adaptive_clip_grad(params, 0.01)
    assert all(torch.allclose(a, p.grad, rtol=1e-5, atol=1e-7) for a, p in zip(ours, params))
    medians = interleaved(
        {"gradclip": lambda: adaptive_clip_grad_(params, 0.01), "reference": lambda: timm_adaptive_clip_grad(params, 0.01)},
        runs, setup=restore)
    return name, medians["gradclip"], medians["reference"]


def largest_temporary(params) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func._schema.name
            if not name.endswith("_") and name not in ("aten::view", "aten::detach", "aten::split_with_sizes",
                                                        "aten::split", "aten::unbind", "aten::alias"):
                for t in out if isinstance(out, (list, tuple)) else [out]:
                    if isinstance(t, torch.Tensor):
                        Recorder.largest = max(Recorder.largest, t.numel())
            return out

    with Recorder():
        adaptive_clip_grad_(params, 0.01)
    return Recorder.largest


def reference_dp(model, inputs, targets, max_norm):
    """The per-example loop: one forward/backward per example, clip, sum, average (in the model's float32)."""
    return per_sample_clipped_mean(model, F.cross_entropy, inputs, targets, max_norm, dtype=torch.float32)[0]


def bench_dp(name: str, model, input_shape, batch: int, runs: int, method: str = "auto") -> tuple[str, float, float]:
    """``per_sample_clipped_grad`` with ``method`` (``"auto"``: ghost norms where they apply) against the loop."""
    torch.manual_seed(0)
    inputs = torch.randn(batch, *input_shape)
    targets = torch.randint(0, 10, (batch,))
    fast = per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, 1.0, method=method).grads
    slow = reference_dp(model, inputs, targets, 1.0)
    assert all(torch.allclose(fast[n], s, rtol=1e-4, atol=1e-6) for (n, _), s in zip(model.named_parameters(), slow))
    medians = interleaved(
        {"gradclip": lambda: per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, 1.0, method=method),
         "reference": lambda: reference_dp(model, inputs, targets, 1.0)}, runs)
    return name, medians["gradclip"], medians["reference"]


def main() -> None:
    torch.manual_seed(0)
    shapes = resnet50_shapes()
    assert len(shapes) == 161 and numel(shapes) == RESNET50_NUMEL, "ResNet-50 shapes are off"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = [
        bench_agc("AGC, ResNet-50 (161 tensors, 25.6M values)", shapes, runs=15),
        bench_agc("AGC, 2000 small tensors", transformer_small_shapes(), runs=15),
    ]
    params = make_params(shapes)
    print(f"AGC largest temporary on ResNet-50: {largest_temporary(params):,} values "
          f"(largest parameter {max(p.numel() for p in params):,})")
    del params
    mlp = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    cnn = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 5, stride=2), torch.nn.GroupNorm(4, 16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(32 * 5 * 5, 10))
    rows += [
        bench_dp("DP-SGD per-sample, MLP 784-256-10, batch 64", mlp, (784,), 64, runs=15),  # auto: ghost norms
        bench_dp("DP-SGD per-sample, MLP 784-256-10, batch 64, vmap", mlp, (784,), 64, runs=15, method="vmap"),
        bench_dp("DP-SGD per-sample, small CNN 28x28, batch 64", cnn, (1, 28, 28), 64, runs=15),
    ]
    width = max(46, *(len(name) for name, _, _ in rows))
    print()
    print(f"| {'benchmark':<{width}} | {'gradclip ms':>11} | {'reference ms':>12} | {'speed-up':>8} |")
    print(f"|{'-' * (width + 2)}|{'-' * 13}|{'-' * 14}|{'-' * 10}|")
    for name, ours, reference in rows:
        print(f"| {name:<{width}} | {ours:>11.2f} | {reference:>12.2f} | {reference / ours:>7.2f}x |")


if __name__ == "__main__":
    main()
