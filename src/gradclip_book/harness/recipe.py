r"""The book's threshold recipe: a global-norm threshold from a short unclipped run, and when to lower the lr instead.

1. Train ``probe_steps`` steps **without clipping** at the learning rate you intend to use and log the global
   gradient norm of every step (:attr:`gradclip_book.harness.Run.grad_norm`). If the probe diverges, that
   learning rate is too large: lower it and probe again.
2. Set the threshold at the ``q``-quantile of those norms (:func:`recommend_threshold`; the Deep Learning Tuning
   Playbook's 90th percentile, computed by :func:`gradclip.suggest_threshold`).
3. Train with clipping at that threshold and watch the share of clipped steps
   (:attr:`gradclip_book.harness.Run.clip_fraction`). If clipping fires on more than half of the steps
   (:func:`recipe_verdict`), it has become a smaller, normalised step: lower the learning rate instead.

Chapter 4 validates the recipe on every network of the chapter against the best threshold found on validation
data (the recipe sees only the probe's norms; the grid search sees validation accuracy).

Example:
    >>> from gradclip_book.harness.recipe import recommend_threshold, recipe_verdict
    >>> recommend_threshold([1.0, 2.0, 3.0, 4.0, 100.0], probe_steps=4)
    3.7
    >>> recipe_verdict(0.62), recipe_verdict(0.08)
    ('lower the learning rate', 'keep')
"""

from __future__ import annotations

from collections.abc import Sequence

import gradclip

__all__ = ["PROBE_STEPS", "QUANTILE", "recipe_verdict", "recommend_threshold"]

PROBE_STEPS = 50
"""Unclipped steps the recipe looks at (a quarter of chapter 4's runs)."""
QUANTILE = 0.9
"""The quantile of the probe's norms the recipe takes (the Tuning Playbook's 90th percentile)."""
LOWER_LR_ABOVE = 0.5
"""The share of clipped steps above which the recipe says to lower the learning rate (``gradclip.should_lower_lr``)."""


def recommend_threshold(norms: Sequence[float], probe_steps: int = PROBE_STEPS, q: float = QUANTILE,
                        digits: int = 3) -> float:
    """The recipe's threshold: the ``q``-quantile of the first ``probe_steps`` unclipped norms, to ``digits``
    significant digits.

    Raises:
        ValueError: no norms, or a non-finite one among the first ``probe_steps`` (the probe diverged: lower the
            learning rate).

    Example:
        >>> recommend_threshold([0.5] * 10 + [9.0], probe_steps=11, q=0.5)
        0.5
    """
    probe = [float(n) for n in list(norms)[:probe_steps]]
    if not probe:
        raise ValueError("norms is empty: probe at least one unclipped step")
    if any(not n == n or n in (float("inf"), float("-inf")) for n in probe):
        raise ValueError("the unclipped probe has a non-finite gradient norm: it diverged, lower the learning rate")
    return float(f"{float(gradclip.suggest_threshold(probe, q=q)):.{digits}g}")


def recipe_verdict(clip_fraction: float, limit: float = LOWER_LR_ABOVE) -> str:
    """``"lower the learning rate"`` when clipping fired on more than ``limit`` of the steps, else ``"keep"``.

    Example:
        >>> recipe_verdict(0.5), recipe_verdict(0.51)
        ('keep', 'lower the learning rate')
    """
    return "lower the learning rate" if bool(gradclip.should_lower_lr(clip_fraction, limit)) else "keep"
