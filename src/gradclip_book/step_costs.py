r"""Chapter 5.1's cost table: what global-norm clipping adds to a training step, from the book's small networks to
ResNet-50.

Clipping reads every gradient once (the norm) and, when it fires, writes every gradient once more: its work grows
with the number of parameters P. A training step of a dense layer uses each weight once per example and per
position (pixel, token), forward and backward: its work grows with P x batch x positions. So the share of a step
that clipping takes should fall as batch x positions grows, and be largest on a tiny network whose step is mostly
fixed per-call costs. This module measures that share instead of asserting it: for each :data:`CASES` entry it
times, interleaved in one process (:func:`gradclip_book.timing.interleaved`, medians), a training step without
clipping, the same step with ``gradclip.clip_grad_norm_`` (at a threshold that always fires: the dearest case),
and the clipping call alone on that model's gradients.

The numbers are stored in :data:`RESULTS_FILE` by :data:`COMMAND` (a minute or two, one thread), with the machine
they were measured on, and chapter 5.1 reads them; nothing is timed when the page builds. ResNet-50 is built here
without torchvision, from bottleneck blocks, and checked against :func:`gradclip_book.shapes.resnet50_shapes`
(the shapes ``benchmarks/`` clip).

Example:
    >>> from gradclip_book import step_costs
    >>> sum(p.numel() for p in step_costs.resnet50().parameters())
    25557032
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gradclip

from . import classification as cls
from . import grids, images, text_runs
from .timing import interleaved

__all__ = ["CASES", "COMMAND", "RESULTS_FILE", "Case", "load", "main", "measure", "measure_case", "optimizer_for",
           "resnet50"]

RESULTS_FILE = Path(__file__).resolve().parents[2] / "chapters" / "data" / "step_costs.json"
COMMAND = "python -m gradclip_book.step_costs"


# --- ResNet-50 without torchvision ----------------------------------------------------------------------


class _Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand, each with BatchNorm; a 1x1 projection on the first block."""

    def __init__(self, in_channels: int, width: int, stride: int, project: bool) -> None:
        super().__init__()
        out = 4 * width
        self.conv1, self.bn1 = nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out)
        self.downsample = (nn.Sequential(nn.Conv2d(in_channels, out, 1, stride, bias=False), nn.BatchNorm2d(out))
                           if project else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


def resnet50(classes: int = 1000) -> nn.Module:
    """ResNet-50 (He et al. 2016, arXiv:1512.03385; torchvision's v1.5 layout: the stride on the 3x3 convolution).

    Its parameters, in ``parameters()`` order, have exactly the shapes of
    :func:`gradclip_book.shapes.resnet50_shapes` (25,557,032 values). Input ``(batch, 3, H, W)``, logits
    ``(batch, classes)``; any H, W >= 32 (the network downsamples 32 times, then pools globally).
    """
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                               nn.MaxPool2d(3, 2, 1)]
    in_channels = 64
    for stage, (width, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3))):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(_Bottleneck(in_channels, width, stride, project=block == 0))
            in_channels = 4 * width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, classes)]
    return nn.Sequential(*layers)


# --- the cases ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One model and batch to time.

    ``positions``: where each weight of a dense layer is applied per example (1 for the MLP, pixels of the input
    for a CNN, tokens for a transformer); ``optimizer``: the step's optimizer, as the model's chapter trains it.
    """

    name: str
    label: str
    batch: int
    positions: int
    optimizer: str
    build: Callable[[torch.Generator], tuple[nn.Module, torch.Tensor, torch.Tensor, Callable[..., torch.Tensor]]]


def _classifier(model: nn.Module, shape: tuple[int, ...], classes: int):
    def build(generator: torch.Generator):
        x = torch.randn(shape, generator=generator)
        y = torch.randint(classes, (shape[0],), generator=generator)
        return model, x, y, nn.functional.cross_entropy
    return build


def _mlp(generator: torch.Generator):
    return _classifier(cls.build_model(grids.HARD), (grids.HARD.batch, 64), 10)(generator)


def _cnn(generator: torch.Generator):
    config = images.ImageConfig(depth=16)
    return _classifier(images.build_model(config), (config.batch, 64), 10)(generator)


def _transformer(generator: torch.Generator):
    config = text_runs.TRANSFORMER
    model = text_runs.build(config)
    vocab = model.head.out_features
    ids = torch.randint(vocab, (config.batch, config.seq_len + 1), generator=generator)

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return model, ids[:, :-1], ids[:, 1:], loss


def _resnet(batch: int, side: int):
    def build(generator: torch.Generator):
        torch.manual_seed(0)
        return _classifier(resnet50(), (batch, 3, side, side), 1000)(generator)
    return build


CASES: tuple[Case, ...] = (
    Case("mlp", "chapter 4's MLP, depth 16", grids.HARD.batch, 1, "sgd", _mlp),
    Case("cnn", "chapter 4's residual CNN, depth 16", images.BASE.batch, 64, "sgd", _cnn),
    Case("transformer", "chapter 4.11's transformer", text_runs.TRANSFORMER.batch, text_runs.TRANSFORMER.seq_len,
         "adamw", _transformer),
    Case("resnet50-b2", "ResNet-50, batch 2, 64x64 images", 2, 64 * 64, "sgd", _resnet(2, 64)),
    Case("resnet50-b8", "ResNet-50, batch 8, 64x64 images", 8, 64 * 64, "sgd", _resnet(8, 64)),
    Case("resnet50-b8-128", "ResNet-50, batch 8, 128x128 images", 8, 128 * 128, "sgd", _resnet(8, 128)),
)
"""The timed cases, smallest step first: the book's networks at their chapters' batch, then ResNet-50 with
more and more examples x positions per step (random inputs: the kernels do not depend on the values)."""


# --- timing ---------------------------------------------------------------------------------------------


def optimizer_for(case: Case, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The case's optimizer (AdamW with torch's defaults, or SGD with momentum 0.9) at a learning rate of 1e-4, so
    that the weights barely move while timing (:mod:`gradclip_book.guard_costs` times with it too)."""
    if case.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=1e-4)
    return torch.optim.SGD(params, lr=1e-4, momentum=0.9)


def measure_case(case: Case, repeats: int) -> dict[str, Any]:
    """Median times (ms, this thread's CPU time) of a step, a step with clipping, and the clipping call alone.

    The step: ``zero_grad``, forward, loss, ``backward``, (``gradclip.clip_grad_norm_`` at a hundredth of the first
    gradient norm, so that it fires every time), the optimizer's step, at a learning rate of 1e-4 (the weights
    barely move while timing). The clipping call alone runs on the gradients the last step left, doubled first
    (untimed) so that it fires.
    """
    generator = torch.Generator().manual_seed(0)
    model, x, y, loss_fn = case.build(generator)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer_for(case, params)

    def step(clip: bool) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        if clip:
            gradclip.clip_grad_norm_(params, max_norm)
        optimizer.step()

    step(False)
    max_norm = float(torch.nn.utils.get_total_norm([p.grad for p in params])) / 100

    def double() -> None:
        torch._foreach_mul_([p.grad for p in params if p.grad is not None], 2.0)

    times = interleaved({"step": lambda: step(False), "step_clip": lambda: step(True),
                         "clip": lambda: gradclip.clip_grad_norm_(params, max_norm)},
                        repeats, before=double, clock=time.thread_time)
    values = sum(p.numel() for p in params)
    return {"name": case.name, "label": case.label, "parameters": values, "tensors": len(params),
            "batch": case.batch, "positions": case.positions, "optimizer": case.optimizer,
            "step_ms": times["step"], "step_clip_ms": times["step_clip"], "clip_ms": times["clip"],
            "overhead": times["step_clip"] / times["step"] - 1, "clip_share": times["clip"] / times["step"],
            "clip_ns_per_value": times["clip"] * 1e6 / values}


def measure(repeats: int = 15, rounds: int = 3, progress: bool = True) -> dict[str, Any]:
    """Every case of :data:`CASES`, ``rounds`` times (each round a separate interleaved timing), on one thread.

    Returns ``{"machine", "date", "repeats", "rounds", "cases": [{case fields, "rounds": [measure_case ...],
    and per timed quantity the median over the rounds}]}``.
    """
    from tqdm.auto import tqdm

    from .performance import machine

    torch.set_num_threads(1)
    cases = []
    bar = tqdm(total=len(CASES) * rounds, desc="timing", disable=not progress)
    for case in CASES:
        per_round = []
        for _ in range(rounds):
            per_round.append(measure_case(case, repeats))
            bar.update()
        summary = {k: v for k, v in per_round[0].items() if not isinstance(v, float)}
        for key in ("step_ms", "step_clip_ms", "clip_ms", "overhead", "clip_share", "clip_ns_per_value"):
            summary[key] = statistics.median(r[key] for r in per_round)
        summary["rounds"] = [{k: v for k, v in r.items() if isinstance(v, float)} for r in per_round]
        cases.append(summary)
    bar.close()
    return {"machine": machine(), "date": datetime.date.today().isoformat(), "repeats": repeats, "rounds": rounds,
            "clock": "thread CPU time (time.thread_time), one torch thread", "cases": cases}


def load(path: str | Path = RESULTS_FILE) -> dict[str, Any]:
    """The stored measurements; ``FileNotFoundError`` naming the command that writes them."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no stored step costs at {path}; measure them with `{COMMAND}`") from None


def main(argv: list[str] | None = None) -> None:
    """``python -m gradclip_book.step_costs [--repeats N] [--rounds R] [--out PATH]``: measure and store."""
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per candidate and round (default 15)")
    parser.add_argument("--rounds", type=int, default=3, help="separate interleaved timings per case (default 3)")
    parser.add_argument("--out", type=Path, default=RESULTS_FILE, help=f"the file to write (default {RESULTS_FILE})")
    args = parser.parse_args(argv)
    result = measure(args.repeats, args.rounds)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    for c in result["cases"]:
        print(f"{c['label']:40s} {c['parameters']:>10,} values  step {c['step_ms']:9.2f} ms  clip {c['clip_ms']:7.2f} ms"
              f"  share {100 * c['clip_share']:6.2f}%  step+clip {100 * c['overhead']:+6.1f}%"
              f"  {c['clip_ns_per_value']:.2f} ns/value")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
