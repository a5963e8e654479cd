"""Per-step overhead of the stateful clippers against plain clipping, on ResNet-50 gradient shapes.

Run: .venv/bin/python benchmarks/bench_adaptive.py [--rounds N] [--threads T] [--clock wall|cpu]

Interleaved rounds in one process (each round times every variant once, in turn),
medians over rounds. ResNet-50: 161 tensors, 25,557,032 float32 values.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import gradclip
from gradclip.autoclip import AutoClip
from gradclip.guard import SpikeGuard
from gradclip.zclip import ZClip

HISTORY = 100_000


def resnet50_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of torchvision's resnet50 (161 tensors, 25,557,032 values)."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            shapes += [(width, in_ch, 1, 1), (width,), (width,), (width, width, 3, 3), (width,), (width,),
                       (4 * width, width, 1, 1), (4 * width,), (4 * width,)]
            if block == 0:
                shapes += [(4 * width, in_ch, 1, 1), (4 * width,), (4 * width,)]
            in_ch = 4 * width
    return shapes + [(1000, 2048), (1000,)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall clock, or this thread's CPU time (with --threads 1; steadier on a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(0)
    shapes = resnet50_shapes()
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape) * 1e-3
    assert len(params) == 161 and sum(p.numel() for p in params) == 25_557_032
    rng = np.random.default_rng(0)
    history = rng.lognormal(size=HISTORY)

    autoclip = AutoClip(10.0)
    autoclip.load_state_dict({"config": autoclip._config(), "steps": HISTORY,
                              "history": torch.tensor(history)})
    autoclip_window = AutoClip(10.0, window=HISTORY)
    autoclip_window.load_state_dict({"config": autoclip_window._config(), "steps": HISTORY,
                                     "history": torch.tensor(history)})
    zclip = ZClip(max_grad_norm=None)
    guard = SpikeGuard()
    for clipper in (zclip, guard):
        for _ in range(30):
            clipper._last_grads = None
            clipper(params)
    reference_history = history.tolist()

    def fresh(clipper):
        clipper._last_grads = None  # the benchmark re-clips the same gradients on purpose
        return clipper

    def reference_autoclip():
        # pseeth/autoclip: a norm read on the host, numpy.percentile over a Python list, then clipping
        norm = float(gradclip.get_total_norm([p.grad for p in params]))
        reference_history.append(norm)
        gradclip.clip_grad_norm_(params, float(np.percentile(reference_history, 10.0)))

    numpy_list = history.tolist()
    value = 1.0
    threshold_only = AutoClip(10.0)
    threshold_only.load_state_dict({"config": threshold_only._config(), "steps": HISTORY,
                                    "history": torch.tensor(history)})

    def autoclip_threshold_only():
        threshold_only._record(value)
        threshold_only._threshold()

    def numpy_threshold_only():
        numpy_list.append(1.0)
        np.percentile(numpy_list, 10.0)

    variants = {
        "plain clip_grad_norm_": lambda: gradclip.clip_grad_norm_(params, 1.0),
        "AutoClip (100k history)": lambda: fresh(autoclip)(params),
        "AutoClip (window=100k)": lambda: fresh(autoclip_window)(params),
        "reference AutoClip (numpy list)": reference_autoclip,
        "ZClip": lambda: fresh(zclip)(params),
        "SpikeGuard (decision)": lambda: fresh(guard)(params),
        "AutoClip history+threshold only": autoclip_threshold_only,
        "numpy append+percentile only": numpy_threshold_only,
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():  # warm-up
        fn()
    for _ in range(args.rounds):
        for name, fn in variants.items():
            start = clock()
            fn()
            times[name].append(clock() - start)

    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    mean = {name: statistics.fmean(t) * 1e3 for name, t in times.items()}
    base = med["plain clip_grad_norm_"]
    print(f"ResNet-50 shapes: {len(params)} tensors, {sum(p.numel() for p in params):,} values, "
          f"float32, {torch.get_num_threads()} threads, {args.clock} time, {args.rounds} interleaved rounds")
    print(f"{'variant':34s} {'median ms':>10s} {'mean ms':>9s} {'vs plain':>9s}")
    for name in variants:
        print(f"{name:34s} {med[name]:10.3f} {mean[name]:9.3f} {med[name] / base:8.3f}x")
    print()
    print(f"AutoClip / plain clipping (100k history):       {med['AutoClip (100k history)'] / base:.3f}x (target <= 1.5x)")
    print(f"reference step / AutoClip step:                 "
          f"{med['reference AutoClip (numpy list)'] / med['AutoClip (100k history)']:.2f}x")
    print(f"numpy percentile / AutoClip threshold update:   "
          f"{med['numpy append+percentile only'] / med['AutoClip history+threshold only']:.1f}x (target >= 50x)")
    print(f"ZClip / plain clipping:                         {med['ZClip'] / base:.3f}x (target <= 1.2x)")
    print(f"SpikeGuard decision / plain clipping:           {med['SpikeGuard (decision)'] / base:.3f}x")


if __name__ == "__main__":
    main()
