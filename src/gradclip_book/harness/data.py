r"""The data every image chapter trains on, its split, and the order of its minibatches.

* :func:`image_split`: scikit-learn's 1,797 real 8x8 digit scans, split stratified into 1,077 training,
  360 validation and 360 test images and standardised with training statistics
  (:func:`gradclip_book.data.digits_split`), cached per ``split_seed``. One test image is 1/360 = 0.28
  points of accuracy: differences smaller than that do not exist on this test set.
* :func:`batch_indices` / :func:`minibatches`: the batch order. Each epoch is a fresh permutation drawn
  from a ``torch.Generator`` seeded with the run's seed; the last partial batch of an epoch is dropped.
  The same seed gives the same batches, whatever else the run does.
* :func:`classification_loss` and :func:`accuracy_evaluator`: the loss ``(model, batch) -> loss`` and the
  ``evaluate(model) -> {"val_accuracy", "test_accuracy", ...}`` that :func:`gradclip_book.harness.train` takes.

Example:
    >>> from gradclip_book.harness import data
    >>> parts = data.image_split()
    >>> {k: len(v[1]) for k, v in parts.items()}
    {'train': 1077, 'validation': 360, 'test': 360}
    >>> first = next(data.minibatches(*parts["train"], batch=64, seed=0))
    >>> tuple(first[0].shape), tuple(first[1].shape)
    ((64, 64), (64,))
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from .. import data as _datasets

__all__ = ["accuracy", "accuracy_evaluator", "batch_indices", "classification_loss", "image_split", "minibatches"]


@functools.lru_cache(maxsize=4)
def _split(split_seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return _datasets.digits_split(seed=split_seed)


def image_split(split_seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The digits, split into ``"train"``, ``"validation"`` and ``"test"`` ``(x, y)`` pairs (cached; do not modify).

    x has shape ``(n, 64)`` (standardised pixels, float32), y ``(n,)`` (int64 labels 0..9).

    Example:
        >>> tuple(image_split()["test"][0].shape)
        (360, 64)
    """
    return _split(split_seed)


def batch_indices(n: int, batch: int, seed: int) -> Iterator[torch.Tensor]:
    """Index minibatches of ``batch`` out of ``n`` examples, forever: a fresh seeded permutation each epoch,
    the last partial batch dropped (``batch`` is capped at ``n``).

    Example:
        >>> batches = batch_indices(5, 2, seed=0)
        >>> [sorted(next(batches).tolist()) != [] for _ in range(3)]
        [True, True, True]
    """
    generator = torch.Generator().manual_seed(seed)
    batch = min(batch, n)
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch + 1, batch):
            yield order[start:start + batch]


def minibatches(x: torch.Tensor, y: torch.Tensor, batch: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x[i], y[i])`` for the index batches of :func:`batch_indices`, forever.

    Example:
        >>> xb, yb = next(minibatches(torch.arange(10.0)[:, None], torch.arange(10), batch=4, seed=1))
        >>> bool((xb[:, 0].long() == yb).all())
        True
    """
    for index in batch_indices(len(y), batch, seed):
        yield x[index], y[index]


def classification_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy (nats) of ``model`` on a batch ``(x, y)``: the default ``loss_fn`` of ``train``.

    Example:
        >>> loss = classification_loss(nn.Linear(64, 10), (torch.zeros(4, 64), torch.zeros(4, dtype=torch.long)))
        >>> round(float(loss), 1) >= 0
        True
    """
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The share of ``x`` that ``model`` classifies as ``y`` (no gradients; the model's current mode).

    Example:
        >>> accuracy(nn.Linear(64, 10), torch.zeros(4, 64), torch.zeros(4, dtype=torch.long)) in (0.0, 1.0)
        True
    """
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def accuracy_evaluator(parts: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                       names: Mapping[str, str] | None = None) -> Callable[[nn.Module], dict[str, float]]:
    """An ``evaluate(model)`` that returns the accuracy on each named part of ``parts``.

    ``names`` maps a part to its metric name; by default ``validation`` -> ``val_accuracy`` and
    ``test`` -> ``test_accuracy``.

    Example:
        >>> evaluate = accuracy_evaluator(image_split())
        >>> sorted(evaluate(nn.Sequential(nn.Linear(64, 10))))
        ['test_accuracy', 'val_accuracy']
    """
    names = dict(names or {"validation": "val_accuracy", "test": "test_accuracy"})

    def evaluate(model: nn.Module) -> dict[str, float]:
        return {metric: accuracy(model, *parts[part]) for part, metric in names.items()}

    return evaluate
