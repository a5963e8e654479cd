"""Parameter shapes of common networks, written out by hand (no torchvision needed).

Used by ``benchmarks/`` (through ``benchmarks/shapes.py``) and by chapter 5.1's cost table
(:mod:`gradclip_book.step_costs`, whose ResNet-50 module is checked against :func:`resnet50_shapes`).
"""

from __future__ import annotations

import torch

__all__ = ["RESNET50_NUMEL", "model_shapes", "numel", "resnet50_shapes", "transformer_small_shapes"]

RESNET50_NUMEL = 25_557_032


def resnet50_shapes() -> list[tuple[int, ...]]:
    """The 161 parameter shapes of torchvision's ResNet-50, in ``model.parameters()`` order.

    conv weights (out, in, k, k) without bias, BatchNorm weight and bias (C,), and the
    classifier (1000, 2048) and (1000,): 25,557,032 values in all.
    """
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    in_channels = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            out_channels = width * 4
            shapes += [(width, in_channels, 1, 1), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            shapes += [(out_channels, width, 1, 1), (out_channels,), (out_channels,)]
            if block == 0:
                shapes += [(out_channels, in_channels, 1, 1), (out_channels,), (out_channels,)]
            in_channels = out_channels
    shapes += [(1000, 2048), (1000,)]
    return shapes


def transformer_small_shapes(count: int = 2000) -> list[tuple[int, ...]]:
    """``count`` small tensors, cycling through one tiny transformer block's parameters (d=32)."""
    block = [(32,), (32,), (96, 32), (96,), (32, 32), (32,), (32,), (32,), (128, 32), (128,), (32, 128), (32,)]
    return [block[i % len(block)] for i in range(count)]


def model_shapes() -> list[tuple[int, ...]]:
    """67 tensors shaped like a mid-size model (13.6 M values): the set measured in the performance issue.

    One 64x3x7x7 stem, sixteen 256x256x3x3 convolutions, eight 1024x256 projections,
    forty 256-vectors, a 1000x2048 classifier and its 1000-vector bias.
    """
    return ([(64, 3, 7, 7)] + [(256, 256, 3, 3)] * 16 + [(1024, 256)] * 8 + [(256,)] * 40
            + [(1000, 2048), (1000,)])


def numel(shapes: list[tuple[int, ...]]) -> int:
    """Total number of values."""
    return sum(torch.Size(shape).numel() for shape in shapes)
