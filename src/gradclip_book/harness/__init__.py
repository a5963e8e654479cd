r"""The book's one experiment harness: every chapter that trains a network trains it here.

Readers import it to rerun any experiment of the book, or their own::

    from gradclip_book import harness

    parts = harness.image_split()                                   # train / validation / test
    model = harness.build("residual_cnn", depth=8, width=16, norm="batch", seed=0)
    optimizer = harness.make_optimizer("sgd", model.parameters(), lr=0.1)
    run = harness.train(model, optimizer, harness.minibatches(*parts["train"], batch=64, seed=0), steps=300,
                        method="norm", threshold=1.0, evaluate=harness.accuracy_evaluator(parts))
    run.metrics["val_accuracy"], run.clip_fraction, run.diverged

Parts (each a module of this package):

* :mod:`~gradclip_book.harness.data`: the digits with their split (:func:`image_split`), the batch order
  (:func:`minibatches`), the classification loss and an accuracy evaluator.
* :mod:`~gradclip_book.harness.models`: model factories (:func:`build`: MLP, plain CNN, residual CNN, each with
  or without normalisation, He-initialised) and optimizers (:func:`make_optimizer`: SGD with momentum, AdamW, Adam).
* :mod:`~gradclip_book.harness.methods`: the clipping methods behind one interface (:data:`METHODS`: none,
  value, norm, agc, autoclip, zclip, soft, spike-guard), each reporting the pre-clip norm and whether it fired.
* :mod:`~gradclip_book.harness.loop`: :func:`train` (any module, optimizer, batches and loss; warm-up, schedule,
  hooks, evaluation) and the book's divergence rule (:data:`DIVERGED_LOSS`); standard hooks :class:`LayerStats`
  (per-layer gradient, weight and relative-step norms) and :class:`UpdateStats` (update lengths).
* :mod:`~gradclip_book.harness.select`: choosing the best setting on a validation metric (:func:`select_best`)
  and comparing settings across seeds (:func:`beats`).
* :mod:`~gradclip_book.harness.recipe`: the book's threshold recipe (:func:`recommend_threshold` from a short
  unclipped probe, :func:`recipe_verdict`: lower the learning rate when clipping fires on most steps).
* :mod:`~gradclip_book.harness.curves`: storing curves with every early step kept (:func:`~curves.log_bins`).
* :mod:`~gradclip_book.harness.grid`: precomputed grids (:func:`run_grid`, :func:`spot_check`,
  :func:`code_version`).
* :data:`LR_GRID`: the book's one learning-rate grid.

Example:
    >>> from gradclip_book import harness
    >>> model = harness.build("mlp", depth=2, width=8, seed=0)
    >>> run = harness.train(model, harness.make_optimizer("sgd", model.parameters(), 0.1),
    ...                     harness.minibatches(*harness.image_split()["train"], 64, 0), steps=10)
    >>> run.steps_run, len(run.loss), run.diverged
    (10, 10, False)
"""

from __future__ import annotations

from .curves import CURVE_POINTS, log_bins, rebin
from .data import accuracy, accuracy_evaluator, batch_indices, classification_loss, image_split, minibatches
from .grid import code_version, config_key, load_lines, run_grid, spot_check, write_lines
from .loop import (DIVERGED_LOSS, Hook, LayerStats, Run, Step, UpdateStats, deterministic, is_diverged, train,
                   warmup_factor)
from .methods import METHODS, Clip, Method, bind
from .models import MODELS, NORMS, OPTIMIZERS, build, count_layers, he_init_, make_optimizer
from .recipe import recipe_verdict, recommend_threshold
from .select import (RULE, UNSEEN_SEED_GROUPS, Score, Selection, beats, exact_mean, score, select_best,
                     standing_verdict, values_of)

LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
"""The book's one learning-rate grid: 1 and 3 per decade (about a factor 3.16 = sqrt(10) apart, rounded). Every
learning-rate scan of the book is a contiguous stretch of it (SGD with momentum from 0.003 up, Adam/AdamW from
1e-4 up)."""


def lr_range(low: float, high: float) -> tuple[float, ...]:
    """The stretch of :data:`LR_GRID` from ``low`` to ``high`` (both on the grid).

    Raises:
        ValueError: ``low`` or ``high`` is not on the grid, or ``low > high``.

    Example:
        >>> lr_range(0.01, 0.3)
        (0.01, 0.03, 0.1, 0.3)
    """
    if low not in LR_GRID or high not in LR_GRID or low > high:
        raise ValueError(f"low and high must be values of LR_GRID {LR_GRID} with low <= high, got {low}, {high}")
    return tuple(lr for lr in LR_GRID if low <= lr <= high)


__all__ = [
    "CURVE_POINTS", "DIVERGED_LOSS", "LR_GRID", "METHODS", "MODELS", "NORMS", "OPTIMIZERS", "RULE",
    "UNSEEN_SEED_GROUPS",
    "Clip", "Hook", "LayerStats", "Method", "Run", "Score", "Selection", "Step", "UpdateStats",
    "accuracy", "accuracy_evaluator", "batch_indices", "beats", "bind", "build", "classification_loss",
    "code_version", "config_key", "count_layers", "deterministic", "exact_mean", "he_init_", "image_split",
    "is_diverged", "load_lines", "log_bins", "lr_range", "make_optimizer", "minibatches", "rebin", "recipe_verdict",
    "recommend_threshold", "run_grid", "score",
    "select_best", "spot_check", "standing_verdict", "train", "values_of", "warmup_factor", "write_lines",
]
