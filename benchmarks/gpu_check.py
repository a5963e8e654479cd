"""The GPU check: no host sync on any default path, and gradclip's speed against torch and the peers on CUDA.

Run on a CUDA machine (about 2-4 minutes on one H100-class card; needs ~24 GB of GPU memory at full size):

    python benchmarks/gpu_check.py [--repeats N] [--scale S]

It prints one table headed by the device's name:

1. **Sync**: every default path of gradclip (the functions, the stateful clippers called and attached, the
   gradient buffer, per-sample clipping) runs under ``torch.cuda.set_sync_debug_mode("error")``, in float32
   and bfloat16, after one untimed warm-up call; a path that reads a value on the host fails its row.
2. **Speed** (CUDA events, calls interleaved, medians): ``clip_grad_norm_`` against torch's foreach and
   per-tensor loops (torch 2.13 has no fused clipping kernel) on ResNet-50's gradients and on a
   1.3 B-parameter transformer gradient set, in float32 and bfloat16; the cost of accumulating norms in
   float64 (``get_total_norm`` against torch's, which accumulates in the gradients' dtype) beside the floor,
   one ``torch._foreach_norm`` pass; ZClip and AutoClip steps against the ``zclip`` and ``autoclip``
   packages when they are importable (pure Python: carry their wheels).

Without CUDA it says so and exits 0, unless ``--device cpu`` asks for the same code on the CPU at a small
``--scale`` (the test suite runs that: every path and row executes, the sync column reads "n/a").
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gradclip  # noqa: E402
from shapes import numel, resnet50_shapes  # noqa: E402

# Public names that are not a clipping path run on the device: host-side helpers on plain numbers or
# lists, constructors of plans, and the submodule. Every other name of gradclip.__all__ must be in PATHS.
NOT_DEVICE_PATHS = {
    "distributed": "a submodule (its global_norm runs inside the functions checked here)",
    "ClipResult": "the result type the paths return",
    "PerSampleClipResult": "the result type of per-sample clipping",
    "Clipper": "the base class of the clippers checked here",
    "UnitSpec": "a description of AGC's units, no computation",
    "agc_parameters": "selects parameters from a module, no computation on gradients",
    "agc_unit_dims": "returns axes for a shape, no computation on gradients",
    "clipped_fraction": "summarises ClipResults already read on the host (logging)",
    "suggest_threshold": "a percentile of norms already read on the host (tuning)",
    "should_lower_lr": "a decision from norms already read on the host (tuning)",
    "qsgd_quantize": "the tensor-level form of qsgd_quantize_grad_, which is checked",
    "per_sample_grads": "materialises per-sample gradients (per_sample_clip_grad_ is the default path)",
    "per_sample_clipped_grad": "the out-of-place form of per_sample_clip_grad_, which is checked",
}
NOT_DEVICE_PATHS["AdaGCResult"] = "the result type of AdaGC"
NOT_DEVICE_PATHS["UpdateClipResult"] = "the result type of UpdateClip"


# --- gradients ----------------------------------------------------------------------------------------------------

def transformer_1b_shapes(layers: int = 24, d: int = 2048, vocab: int = 50_304) -> list[tuple[int, ...]]:
    """A GPT-style decoder of about 1.3 B parameters: the token embedding and ``layers`` pre-norm blocks."""
    block = [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return [(vocab, d)] + block * layers + [(d,), (d,)]


def scale_shapes(shapes: list[tuple[int, ...]], factor: float) -> list[tuple[int, ...]]:
    """The same tensors with dim 0 scaled by ``factor``."""
    return [(max(1, round(s[0] * factor)),) + tuple(s[1:]) for s in shapes]


def make_params(shapes, device: str, dtype: torch.dtype, seed: int = 0, grad_scale: float = 1e-3) -> list[nn.Parameter]:
    """Parameters with random weights and gradients (AGC reads the weights) on ``device``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        p = nn.Parameter(torch.randn(shape, generator=generator, device=device, dtype=dtype))
        p.grad = torch.randn(shape, generator=generator, device=device, dtype=dtype) * grad_scale
        params.append(p)
    return params


# --- the default paths --------------------------------------------------------------------------------------------

def _attached(clipper_factory: Callable[[list[nn.Parameter]], Any]) -> Callable[[list[nn.Parameter]], Any]:
    """A clipper attached to SGD: the path is ``optimizer.step()`` with the clipper inside it."""
    def run(params):
        optimizer = torch.optim.SGD(params, lr=1e-3)
        clipper_factory(params).attach(optimizer)
        optimizer.step()
    return run


def _buffer(params):
    buffer = gradclip.GradBuffer(params)  # the gradients move into one flat buffer: one norm and one scale kernel
    return buffer, gradclip.clip_grad_norm_(params, 1e-3)


def _per_sample(params):
    device, dtype = params[0].device, params[0].dtype
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).to(device=device, dtype=dtype)
    x = torch.randn(16, 32, device=device, dtype=dtype)
    y = torch.randint(0, 10, (16,), device=device)
    return gradclip.per_sample_clip_grad_(model, nn.functional.cross_entropy, x, y, max_norm=1.0)


PATHS: dict[str, Callable[[list[nn.Parameter]], Any]] = {
    "clip_grad_norm_": lambda ps: gradclip.clip_grad_norm_(ps, 1e-3),
    "clip_grad_norm_ (inf)": lambda ps: gradclip.clip_grad_norm_(ps, 1e-3, norm_type=float("inf")),
    "clip_grad_norm_ (p=1)": lambda ps: gradclip.clip_grad_norm_(ps, 1e-3, norm_type=1),
    "get_total_norm": lambda ps: gradclip.get_total_norm([p.grad for p in ps]),
    "clip_grads_with_norm_": lambda ps: gradclip.clip_grads_with_norm_(
        ps, 1e-3, gradclip.get_total_norm([p.grad for p in ps])),
    "clip_grad_norm_report_": lambda ps: gradclip.clip_grad_norm_report_(ps, 1e-3),
    "clip_grad_value_": lambda ps: gradclip.clip_grad_value_(ps, 1e-4),
    "clip_grad_norm_per_tensor_": lambda ps: gradclip.clip_grad_norm_per_tensor_(ps, 1e-3),
    "clip_grad_block_rms_": lambda ps: gradclip.clip_grad_block_rms_(ps, 1e-4),
    "soft_clip_grad_norm_": lambda ps: gradclip.soft_clip_grad_norm_(ps, 1e-3),
    "soft_clip_grad_value_": lambda ps: gradclip.soft_clip_grad_value_(ps, 1e-4),
    "adaptive_clip_grad_": lambda ps: gradclip.adaptive_clip_grad_(ps, 0.01),
    "sign_grad_": lambda ps: gradclip.sign_grad_(ps),
    "qsgd_quantize_grad_": lambda ps: gradclip.qsgd_quantize_grad_(ps, levels=4),
    "AutoClip": lambda ps: gradclip.AutoClip(10)(ps),
    "AutoClip (attached)": _attached(lambda ps: gradclip.AutoClip(10)),
    "ZClip": lambda ps: gradclip.ZClip()(ps),
    "ZClip (attached)": _attached(lambda ps: gradclip.ZClip()),
    "SpikeGuard (attached)": _attached(lambda ps: gradclip.SpikeGuard()),
    "GradientMonitor (attached)": _attached(lambda ps: gradclip.GradientMonitor([(f"p{i}", p) for i, p in enumerate(ps)])),
    "GradBuffer + clip_grad_norm_": _buffer,
    "per_sample_clip_grad_": _per_sample,
}
"""Path name -> a call on a list of parameters with gradients (the name's first word is the public name)."""


def _update_clipped(optimizer_class: type, rule: str) -> Callable[[list[nn.Parameter]], Any]:
    """UpdateClip attached to an optimizer: its pre- and post-step hooks around ``optimizer.step()``."""
    def run(params):
        optimizer = optimizer_class(params, lr=1e-3)
        gradclip.UpdateClip(rule).attach(optimizer)
        optimizer.step()
    return run


def _per_sample_options(params):
    """Automatic clipping (AUTO-S) and Opacus's per-layer thresholds, each on both per-sample paths."""
    device, dtype = params[0].device, params[0].dtype
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).to(device=device, dtype=dtype)
    x = torch.randn(16, 32, device=device, dtype=dtype)
    y = torch.randint(0, 10, (16,), device=device)
    for method in ("auto", "vmap"):
        gradclip.per_sample_clip_grad_(model, nn.functional.cross_entropy, x, y, 1.0, 1.0, method=method,
                                       clipping_fn="automatic")
        gradclip.per_sample_clip_grad_(model, nn.functional.cross_entropy, x, y, [1.0, 0.5, 1.0, 0.5], 1.0,
                                       method=method, clipping="per_layer")


def _per_sample_layers(params):
    """The hook path's Embedding, LayerNorm, GroupNorm, Conv2d (per-example gradients and Gram matrices) handlers."""
    device, dtype = params[0].device, params[0].dtype
    text = nn.Sequential(nn.Embedding(50, 16), nn.LayerNorm(16), nn.Flatten(), nn.Linear(16 * 6, 32),
                         nn.GroupNorm(4, 32), nn.ReLU(), nn.Linear(32, 10)).to(device=device, dtype=dtype)
    ids, y = torch.randint(0, 50, (16, 6), device=device), torch.randint(0, 10, (16,), device=device)
    gradclip.per_sample_clip_grad_(text, nn.functional.cross_entropy, ids, y, 1.0, 1.0, method="ghost")
    image = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 32, 3, stride=2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(32 * 2 * 2, 10)).to(device=device, dtype=dtype)  # 36 then 4 output positions
    x = torch.randn(16, 3, 8, 8, device=device, dtype=dtype)
    return gradclip.per_sample_clip_grad_(image, nn.functional.cross_entropy, x, y, 1.0, 1.0, method="ghost")


PATHS["per_sample_clip_grad_ (automatic, per_layer)"] = _per_sample_options
PATHS["per_sample_clip_grad_ (embedding, norms, conv)"] = _per_sample_layers
PATHS["AdaGC (warm-up)"] = lambda ps: gradclip.AdaGC()(ps)
PATHS["AdaGC (per-tensor)"] = lambda ps: gradclip.AdaGC(warmup_steps=0)(ps)
PATHS["AdaGC (olmo, attached)"] = _attached(lambda ps: gradclip.AdaGC.olmo(1.05, beta=0.95))
PATHS["UpdateClip (adafactor, SGD)"] = _update_clipped(torch.optim.SGD, "adafactor")
PATHS["UpdateClip (stable_adamw, AdamW)"] = _update_clipped(torch.optim.AdamW, "stable_adamw")


def check_sync(device: str, dtype: torch.dtype, shapes) -> list[tuple[str, str]]:
    """Each path once untimed, then under ``set_sync_debug_mode("error")``; ``[(path, "ok" | error)]``."""
    results = []
    for name, path in PATHS.items():
        try:
            path(make_params(shapes, device, dtype))  # warm-up: lazy initialisation may sync once
            params = make_params(shapes, device, dtype, seed=1)
            guard = _sync_errors() if device == "cuda" else contextlib.nullcontext()
            with guard:
                path(params)
            results.append((name, "ok" if device == "cuda" else "ran (n/a on CPU)"))
        except Exception as exc:  # a sync or any failure is the row's result, the check goes on
            results.append((name, f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"))
    return results


@contextlib.contextmanager
def _sync_errors():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --- timing -------------------------------------------------------------------------------------------------------

def interleaved_device(functions: dict[str, Callable[[], Any]], repeats: int, device: str) -> dict[str, float]:
    """Median ms of each function, calls alternating; CUDA events on a GPU, ``perf_counter`` on the CPU."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for fn in functions.values():
        fn()
    for _ in range(repeats):
        for name, fn in functions.items():
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times[name].append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - begin) * 1000)
    return {name: statistics.median(ts) for name, ts in times.items()}


def time_clipping(params, repeats: int, device: str) -> dict[str, float]:
    """``clip_grad_norm_`` (a threshold below the norm: every call scales) against torch's two loops."""
    def torch_clip(foreach):
        return lambda: torch.nn.utils.clip_grad_norm_(params, 1e-3, foreach=foreach)
    return interleaved_device({"gradclip": lambda: gradclip.clip_grad_norm_(params, 1e-3),
                               "torch foreach": torch_clip(True), "torch per-tensor": torch_clip(False)},
                              repeats, device)


def time_norm(params, repeats: int, device: str) -> dict[str, float]:
    """The norm alone: gradclip accumulates in float64, torch in the gradients' dtype; the floor is one pass."""
    grads = [p.grad for p in params]
    return interleaved_device({"gradclip": lambda: gradclip.get_total_norm(grads),
                               "torch": lambda: torch.nn.utils.get_total_norm(grads),
                               "floor": lambda: torch._foreach_norm(grads)}, repeats, device)


def time_peers(params, repeats: int, device: str) -> list[tuple[str, dict[str, float] | str]]:
    """ZClip and AutoClip steps against the authors' packages, when importable (not clipping: no spike)."""
    rows: list[tuple[str, dict[str, float] | str]] = []
    try:
        from zclip import ZClip as PeerZClip
        holder = nn.Module()
        holder.params = nn.ParameterList(params)
        ours, theirs = gradclip.ZClip(max_grad_norm=None), PeerZClip(max_grad_norm=None)
        for _ in range(30):  # past both warm-ups, on the same gradients: nothing is clipped
            ours(params)
            ours._last_grads = None
            theirs.step(holder)

        def ours_step():
            ours._last_grads = None  # the same gradients again on purpose
            ours(params)
        rows.append(("ZClip step", interleaved_device({"gradclip": ours_step, "zclip": lambda: theirs.step(holder)},
                                                      repeats, device)))
    except ImportError as exc:
        rows.append(("ZClip step", f"zclip not importable ({exc})"))
    try:
        from autoclip.torch import QuantileClip
        ours = gradclip.AutoClip(10, window=1000)
        theirs = QuantileClip(params, quantile=0.1, history_length=1000, global_threshold=True)

        def ours_step():
            ours._last_grads = None
            ours(params)
        rows.append(("AutoClip step", interleaved_device({"gradclip": ours_step, "autoclip": theirs.step},
                                                         repeats, device)))
    except ImportError as exc:
        rows.append(("AutoClip step", f"autoclip not importable ({exc})"))
    return rows


# --- the report ---------------------------------------------------------------------------------------------------

def device_name(device: str) -> str:
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    return f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} thread(s)"


def ratio_line(label: str, medians: dict[str, float]) -> str:
    ours = medians["gradclip"]
    others = "  ".join(f"{name} {ms:8.3f} ms ({ms / ours:4.2f}x)" for name, ms in medians.items() if name != "gradclip")
    return f"  {label:<44} gradclip {ours:8.3f} ms   {others}"


def run(device: str, scale: float, repeats: int, sync_only: bool = False) -> int:
    """Print the check's table; returns the number of failed sync rows."""
    print(f"gpu_check on {device_name(device)}; torch {torch.__version__}, gradclip {gradclip.__version__}")
    sets = {"ResNet-50": scale_shapes(resnet50_shapes(), scale),
            "transformer 1.3B": scale_shapes(transformer_1b_shapes(), scale)}
    small = scale_shapes(resnet50_shapes(), min(scale, 0.05))
    failed = 0
    print("\n[sync] every default path under torch.cuda.set_sync_debug_mode('error')")
    for dtype in (torch.float32, torch.bfloat16):
        for name, outcome in check_sync(device, dtype, small):
            failed += outcome.startswith("FAILED")
            print(f"  {str(dtype).removeprefix('torch.'):<9} {name:<32} {outcome}")
    if sync_only:
        return failed
    print("\n[speed] median ms, calls interleaved; (x) = other / gradclip, above 1: gradclip is faster")
    for title, shapes in sets.items():
        for dtype in (torch.float32, torch.bfloat16):
            params = make_params(shapes, device, dtype)
            label = f"{title} ({numel(shapes) / 1e6:,.0f} M values) {str(dtype).removeprefix('torch.')}"
            print(f" {label}")
            print(ratio_line("clip_grad_norm_, clipping", time_clipping(params, repeats, device)))
            print(ratio_line("norm only (float64 accumulation vs torch's)", time_norm(params, repeats, device)))
            if dtype == torch.float32:
                for row, medians in time_peers(params, repeats, device):
                    print(ratio_line(row, medians) if isinstance(medians, dict) else f"  {row:<44} {medians}")
            del params
            if device == "cuda":
                torch.cuda.empty_cache()
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (the check); cpu runs the same code at a small --scale, for the tests")
    parser.add_argument("--scale", type=float, default=1.0, help="sizes relative to the full gradient sets")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per candidate (median)")
    parser.add_argument("--sync-only", action="store_true", help="only the sync rows")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check needs a CUDA device and torch {torch.__version__} sees none: nothing was checked. "
              "Run it on a machine with an NVIDIA GPU (or pass --device cpu to exercise the code here).")
        return 0
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    failed = run(args.device, args.scale, args.repeats, args.sync_only)
    print(f"\n{failed} sync row(s) failed; total {time.perf_counter() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
