r"""Chapter 4's image experiments: small CNNs on the digits, trained by the book's harness, and what they show.

One run is one :class:`ImageConfig` in and one :class:`~gradclip_book.harness.Run` out (:func:`run`):
the digits split of :func:`gradclip_book.harness.image_split` (1,077 training, 360 validation, 360 test
images), a network of :func:`gradclip_book.harness.build` (a plain or residual CNN of width 8, with or
without BatchNorm, He-initialised), SGD with momentum 0.9 or AdamW, minibatches of 64 in the seeded order
of :func:`gradclip_book.harness.minibatches`, 200 steps, a clipping method of
:data:`gradclip_book.harness.METHODS` at its threshold, an optional linear warm-up, and validation and test
accuracy at the end. A training set can be corrupted on purpose (:attr:`ImageConfig.outliers`: images
replaced by noise, the same images for every run of one split) to make large gradients rare but real.

This module holds exactly the code that decides a run's numbers (its :func:`code_version` hashes it, with the
harness parts it uses); the precomputed runs are listed in :mod:`gradclip_book.images_grid` and computed by
``python -m gradclip_book.images_grid`` into ``chapters/data/images_grid.jsonl.gz``; :func:`load` reads them
and :func:`stored` finds one.

Example:
    >>> from gradclip_book import images
    >>> result = images.run(images.ImageConfig(depth=2, steps=20, method="norm", threshold=1.0))
    >>> result.steps_run, sorted(result.metrics)
    (20, ['test_accuracy', 'val_accuracy'])
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from . import harness

__all__ = [
    "BASE", "COMMAND", "GRID_FILE", "ImageConfig", "MODELS", "build_model", "code_version", "config_of",
    "corrupted_split", "load", "record", "run", "stored",
]

ROOT = Path(__file__).resolve().parents[2]
GRID_FILE = ROOT / "chapters" / "data" / "images_grid.jsonl.gz"
COMMAND = "python -m gradclip_book.images_grid"

MODELS: dict[str, tuple[str, str | None]] = {
    "plain": ("plain_cnn", None),
    "plain+bn": ("plain_cnn", "batch"),
    "residual": ("residual_cnn", None),
    "residual+bn": ("residual_cnn", "batch"),
}
"""The chapter's four networks: name -> (harness model, normalisation)."""

@dataclass(frozen=True)
class ImageConfig:
    """Everything that determines one run of chapter 4 (with the seed, its numbers exactly).

    Attributes:
        model: a key of :data:`MODELS` (plain or residual CNN, with or without BatchNorm).
        depth: 3x3 convolutions after the stem (two per residual block).
        width: channels of every convolution.
        optimizer: ``"sgd"`` (momentum 0.9) or ``"adamw"`` (:data:`gradclip_book.harness.OPTIMIZERS`).
        lr: the learning rate (peak, with a warm-up).
        method, threshold: a key of :data:`gradclip_book.harness.METHODS` and its knob (``None`` for ``"none"``).
        warmup: linear warm-up steps (0: none).
        batch: images per step.
        steps: optimizer steps.
        seed: the initialisation and the batch order.
        split_seed: the train / validation / test split (and which images are outliers).
        outliers: training images replaced by Gaussian noise of standard deviation ``outlier_std`` (their labels
            kept): a few rare, unlearnable examples.
        outlier_std: the outliers' noise, in standardised pixel units (a clean pixel has standard deviation 1).
        label_noise: the share of training images whose label is replaced by another class, drawn at random.
    """

    model: str = "residual"
    depth: int = 8
    width: int = 8
    optimizer: str = "sgd"
    lr: float = 0.03
    method: str = "none"
    threshold: float | None = None
    warmup: int = 0
    batch: int = 64
    steps: int = 200
    seed: int = 0
    split_seed: int = 0
    outliers: int = 0
    outlier_std: float = 30.0
    label_noise: float = 0.0

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {sorted(MODELS)}, got {self.model!r}")
        if self.optimizer not in harness.OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(harness.OPTIMIZERS)}, got {self.optimizer!r}")
        if self.method not in harness.METHODS:
            raise ValueError(f"method must be one of {sorted(harness.METHODS)}, got {self.method!r}")
        if (self.method == "none") != (self.threshold is None):
            raise ValueError(f"threshold must be None exactly for method 'none', got method={self.method!r}, "
                             f"threshold={self.threshold!r}")
        if min(self.depth, self.width, self.batch, self.steps) < 1 or not self.lr > 0 or self.warmup < 0 \
                or self.outliers < 0 or not 0 <= self.label_noise <= 1:
            raise ValueError(f"depth, width, batch, steps and lr must be positive, warmup and outliers >= 0, "
                             f"label_noise in [0, 1]: {self}")


BASE = ImageConfig()
"""The default run: residual CNN without normalisation, depth 8, width 8, SGD with momentum at lr 0.03, 200 steps."""


@functools.lru_cache(maxsize=8)
def corrupted_split(split_seed: int = 0, outliers: int = 0, outlier_std: float = 30.0,
                    label_noise: float = 0.0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The digits split with a corrupted training set (validation and test stay clean).

    ``outliers`` training images are replaced by Gaussian noise of standard deviation ``outlier_std`` (labels kept);
    a share ``label_noise`` of the training labels is replaced by another class. Which images, their noise and the
    new labels are drawn from generators seeded with ``split_seed``: every run on one split sees the same
    corrupted training set.

    Example:
        >>> parts = corrupted_split(0, outliers=5, label_noise=0.1)
        >>> clean = harness.image_split(0)
        >>> changed = (parts["train"][0] != clean["train"][0]).any(dim=1)
        >>> int(changed.sum()), int((parts["train"][1] != clean["train"][1]).sum()), bool(parts["test"][0].equal(clean["test"][0]))
        (5, 108, True)
    """
    parts = harness.image_split(split_seed)
    if outliers == 0 and label_noise == 0:
        return parts
    x, y = parts["train"]
    x, y = x.clone(), y.clone()
    if outliers:
        generator = torch.Generator().manual_seed(10_000 + split_seed)
        chosen = torch.randperm(len(y), generator=generator)[:outliers]
        x[chosen] = outlier_std * torch.randn((outliers, x.shape[1]), generator=generator)
    if label_noise:
        generator = torch.Generator().manual_seed(20_000 + split_seed)
        chosen = torch.randperm(len(y), generator=generator)[:round(label_noise * len(y))]
        y[chosen] = (y[chosen] + torch.randint(1, 10, (len(chosen),), generator=generator)) % 10
    return {**parts, "train": (x, y)}


def build_model(config: ImageConfig) -> torch.nn.Module:
    """The config's network, He-initialised from ``config.seed``.

    Example:
        >>> harness.count_layers(build_model(ImageConfig(model="plain+bn", depth=4)))
        {'conv': 5, 'linear': 1, 'norm': 5}
    """
    name, norm = MODELS[config.model]
    return harness.build(name, seed=config.seed, depth=config.depth, width=config.width, norm=norm)


def run(config: ImageConfig = BASE, hooks: Sequence[harness.Hook] = ()) -> harness.Run:
    """Train one run of chapter 4 with the harness (one CPU thread, deterministic); ``hooks`` are passed on.

    Example:
        >>> r = run(ImageConfig(model="plain", depth=2, steps=5, warmup=5))
        >>> r.steps_run, [round(lr, 3) for lr in r.lr]
        (5, [0.006, 0.012, 0.018, 0.024, 0.03])
    """
    with harness.deterministic():
        parts = corrupted_split(config.split_seed, config.outliers, config.outlier_std, config.label_noise)
        model = build_model(config)
        optimizer = harness.make_optimizer(config.optimizer, model.parameters(), config.lr)
        return harness.train(model, optimizer, harness.minibatches(*parts["train"], config.batch, config.seed),
                             config.steps, method=config.method, threshold=config.threshold, warmup=config.warmup,
                             hooks=hooks, evaluate=harness.accuracy_evaluator(parts), threads=None)


def record(config: ImageConfig) -> dict[str, Any]:
    """One grid line's result: :meth:`gradclip_book.harness.Run.to_json` of :func:`run` (a top-level function, so
    worker processes can call it)."""
    return run(config).to_json()


def code_version() -> str:
    """The hash of the code that decides a stored run's numbers: this module and the harness's parts it uses.

    Example:
        >>> len(code_version())
        16
    """
    from .harness import curves, data, loop, methods, models
    from . import data as datasets
    return harness.code_version(sys.modules[__name__], curves, data, loop, methods, models, datasets.digits,
                                datasets.digits_split)


@functools.lru_cache(maxsize=2)
def _lines(path: str) -> tuple[dict[str, Any], ...]:
    return tuple(harness.load_lines(path))


def load(path: str | Path = GRID_FILE) -> list[dict[str, Any]]:
    """Every stored run (cached)."""
    return list(_lines(str(path)))


@functools.lru_cache(maxsize=2)
def _by_key(path: str) -> dict[str, dict[str, Any]]:
    return {line["key"]: line for line in _lines(path)}


def stored(config: ImageConfig, path: str | Path = GRID_FILE) -> dict[str, Any]:
    """The stored run of ``config``; ``KeyError`` naming the command when the grid lacks it."""
    try:
        return _by_key(str(path))[harness.config_key(config)]
    except KeyError:
        raise KeyError(f"the grid has no run {config}; compute it with `{COMMAND}`") from None


def config_of(fields: dict[str, Any]) -> ImageConfig:
    """The :class:`ImageConfig` of a stored line's ``config``."""
    return ImageConfig(**fields)
