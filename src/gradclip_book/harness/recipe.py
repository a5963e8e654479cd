r"""The book's threshold recipe: a global-norm threshold from a short unclipped run, and when to lower the lr instead.

1. Train ``probe_steps`` steps **without clipping** at the learning rate you intend to use and log the global
   gradient norm of every step (:attr:`gradclip_book.harness.Run.grad_norm`). If the probe diverges, that
   learning rate is too large *without clipping*, which is not a reason to rule it out *with* clipping: probe at a
   lower learning rate, and clip the intended one at the threshold read off the largest lower learning rate whose
   probe did not diverge (:func:`thresholds_by_lr`). An older rule dropped such a learning rate; chapter 4.7 measures
   both, on the network whose probes diverge, at five seeds.
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
    >>> thresholds_by_lr({0.01: [1.0, 2.0], 0.1: [3.0, 4.0], 1.0: None}, probe_steps=2)
    {0.01: 1.9, 0.1: 3.9, 1.0: 3.9}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import gradclip

__all__ = ["PROBE_STEPS", "QUANTILE", "recipe_verdict", "recommend_threshold", "thresholds_by_lr"]

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


def thresholds_by_lr(probes: Mapping[float, Sequence[float] | None], probe_steps: int = PROBE_STEPS,
                     q: float = QUANTILE) -> dict[float, float]:
    """Steps 1 and 2 over a scan of learning rates: the threshold the recipe clips each learning rate at.

    Args:
        probes: per learning rate, the unclipped probe's global gradient norms, or ``None`` where the probe diverged
            within ``probe_steps`` steps.
        probe_steps, q: as in :func:`recommend_threshold`.

    Returns:
        ``{lr: max_norm}`` in increasing ``lr``: a learning rate whose probe finished gets :func:`recommend_threshold`
        of its own norms; one whose probe diverged gets the threshold of the largest lower learning rate whose probe
        finished (its norms are the nearest the recipe has seen without divergence). A learning rate below every
        finished probe gets none.

    Raises:
        ValueError: as :func:`recommend_threshold`, for a probe given as finished.

    Example:
        >>> thresholds_by_lr({0.3: None, 0.03: [1.0, 1.0, 5.0], 0.1: None}, probe_steps=3, q=0.5)
        {0.03: 1.0, 0.1: 1.0, 0.3: 1.0}
    """
    out: dict[float, float] = {}
    last: float | None = None
    for lr in sorted(probes):
        norms = probes[lr]
        if norms is not None:
            last = recommend_threshold(norms, probe_steps, q)
        if last is not None:
            out[lr] = last
    return out
