"""gradclip.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_, in one process.

Run: .venv/bin/python benchmarks/bench_core.py [--repeats N]

Candidates and torch alternate call by call (interleaved), so drifts in clock
speed or cache state hit both alike; each prints the median of N calls and
the ratio torch / gradclip (above 1 means gradclip is faster). Targets:
ResNet-50 gradients no slower than torch (ratio >= 1/1.05); 2,000 small
tensors at least 2x faster; on the CPU, with the norm below the threshold, at
least 1.5x faster (the scaling pass is skipped when the factor is exactly 1). Section (d) times
a whole step (zero_grad, backward, clip) on the small set, where a GradBuffer's backward hook shows.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gradclip  # noqa: E402
from shapes import model_shapes, numel, resnet50_shapes, transformer_small_shapes  # noqa: E402
from timing import interleaved  # noqa: E402


def make_params(shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.empty(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    return params


def compare(title, params, repeats, flat_params=None, clip=True):
    """torch against gradclip on the same gradients, clipping (factor 1/2 every call) or not."""
    # clipping: max_norm is half the norm, so every call scales every gradient by 1/2; an untimed
    # refresh doubles them back before each call, so every call sees the same sizes (a fixed tiny
    # max_norm would shrink them call after call, into underflow)
    everything = params + (flat_params or [])
    norm = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
    max_norm = norm / 2 if clip else 1e9
    grads = [p.grad for p in everything]

    def refresh():
        if clip:
            torch._foreach_mul_(grads, 2.0)

    functions = {
        "torch": lambda: torch.nn.utils.clip_grad_norm_(params, max_norm),
        "gradclip": lambda: gradclip.clip_grad_norm_(params, max_norm),
    }
    if flat_params is not None:
        functions["gradclip + GradBuffer"] = lambda: gradclip.clip_grad_norm_(flat_params, max_norm)
    medians = interleaved(functions, repeats, before=refresh)
    print(f"\n{title}")
    for name, ms in medians.items():
        ratio = medians["torch"] / ms
        print(f"  {name:<24} {ms:9.3f} ms   torch/this = {ratio:5.2f}x")
    return medians


def whole_step(shapes, repeats):
    """zero_grad + backward + clip on tiny tensors: what a GradBuffer's per-parameter backward hook costs, beside
    what its one-kernel clipping saves (the backward is one multiply per tensor, so the per-tensor costs show)."""
    sets = {name: [torch.nn.Parameter(p.detach()) for p in make_params(shapes)] for name in
            ("torch", "gradclip", "gradclip + GradBuffer")}
    buffer = gradclip.GradBuffer(sets["gradclip + GradBuffer"])
    scale = torch.tensor(1.5)

    def step(name):
        params = sets[name]
        if name == "gradclip + GradBuffer":
            buffer.zero_grad()
        else:
            for p in params:
                p.grad = None
        sum((p * scale).sum() for p in params).backward()
        clip = torch.nn.utils.clip_grad_norm_ if name == "torch" else gradclip.clip_grad_norm_
        clip(params, 1.0)

    medians = interleaved({name: (lambda name=name: step(name)) for name in sets}, repeats)
    print("\n(d) a whole step on the small set: zero_grad, backward, clip_grad_norm_")
    for name, ms in medians.items():
        print(f"  {name:<24} {ms:9.3f} ms   torch/this = {medians['torch'] / ms:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, python {platform.python_version()}")

    resnet = resnet50_shapes()
    print(f"ResNet-50: {len(resnet)} tensors, {sum(torch.Size(s).numel() for s in resnet):,} values")
    compare("(a) ResNet-50 gradients, float32", make_params(resnet), args.repeats)
    compare("(a') the same, norm below the threshold (no clipping)", make_params(resnet), args.repeats, clip=False)

    model = model_shapes()
    print(f"\nmodel-shaped set: {len(model)} tensors, {numel(model):,} values")
    compare("(c) model-shaped set, clipping", make_params(model), args.repeats)
    compare("(c') the same, norm below the threshold (no clipping)", make_params(model), args.repeats, clip=False)

    small = transformer_small_shapes()
    params = make_params(small)
    flat = make_params(small, seed=1)
    gradclip.GradBuffer(flat)
    print(f"\nsmall set: {len(small)} tensors, {sum(torch.Size(s).numel() for s in small):,} values")
    compare("(b) 2,000 small transformer-like tensors, float32", params, args.repeats * 3, flat)
    whole_step(small, args.repeats)


if __name__ == "__main__":
    main()
