r"""Choosing settings on validation data, and comparing them across seeds: the book's two rules, written once.

**Selection** (:func:`select_best`). Each candidate setting (a learning rate, a threshold, a warm-up...)
has one value of a validation metric per seed, ``None`` for a seed that diverged. The best setting is
chosen by, in order:

1. the fewest diverged seeds (a setting that diverges for some seed is not one you would ship);
2. the mean over the seeds that finished, highest for ``mode="max"`` (accuracy), lowest for ``"min"`` (loss);
3. an exact tie goes to the candidate listed first; list candidates from the most conservative (the smallest
   learning rate, no clipping, the loosest threshold), so that a tie goes to the simpler setting.

Means are compared exactly (:func:`exact_mean`): each value is taken as the decimal it is written as (the grid
files store metrics to 5 significant digits, e.g. 0.97778) and summed in rational arithmetic. In floating point,
two settings whose seeds add up to the same total (8.56389 = 0.97778 + ... and 0.93889 + ...) can get means that
differ in the last bit, because 0.97778 is not a binary number; the tie rule would then never apply, and which
setting "wins" would be an accident of rounding. Exactly, such a tie is a tie, whatever the order of the seeds.

Test metrics never enter the choice: report them afterwards, once, for the chosen setting.

**Comparison** (:func:`beats`). Setting A beats B when A has no diverged seed and B has one, or when neither
has a diverged seed and A's mean is better than B's by more than the larger of the two seed standard
deviations (sample standard deviation over the seeds). Anything else is "no difference shown". With 5 seeds
this rule is deliberately strict: a gap inside the seed spread is not called a difference.

Example:
    >>> from gradclip_book.harness.select import select_best, beats
    >>> choice = select_best({0.01: [0.90, 0.91, 0.92], 0.1: [0.95, 0.96, 0.94], 1.0: [0.99, None, 0.98]})
    >>> choice.best.setting, round(choice.best.mean, 2), [s.setting for s in choice.ranked]
    (0.1, 0.95, [0.1, 0.01, 1.0])
    >>> beats(choice.ranked[0], choice.ranked[1]), beats(choice.ranked[0], choice.ranked[2])
    (True, True)
"""

from __future__ import annotations

import decimal
import functools
import math
import statistics
from fractions import Fraction
from functools import cached_property
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RULE", "UNSEEN_SEED_GROUPS", "Score", "Selection", "beats", "exact_mean", "score", "select_best",
           "standing_verdict", "values_of"]

RULE = ("fewest diverged seeds first, then the best mean over the seeds that finished (validation metric, compared "
        "exactly), an exact tie to the candidate listed first (the most conservative)")
"""The selection rule in words, for captions and notes."""


@dataclass(frozen=True)
class Score:
    """One setting's values over seeds (``None`` = diverged) and their summary.

    Attributes:
        setting: the candidate (any hashable: a learning rate, a tuple of knobs).
        values: one value per seed, ``None`` where the seed diverged.
    """

    setting: Any
    values: tuple[float | None, ...]

    @property
    def seeds(self) -> int:
        return len(self.values)

    @property
    def finished(self) -> list[float]:
        return [v for v in self.values if v is not None]

    @property
    def diverged(self) -> int:
        """Seeds that diverged."""
        return sum(v is None for v in self.values)

    @cached_property
    def exact(self) -> Fraction | None:
        """Exact mean over the seeds that finished (:func:`exact_mean`): what selection compares. ``None`` if none
        did."""
        return exact_mean(self.finished) if self.finished else None

    @property
    def mean(self) -> float | None:
        """Mean over the seeds that finished (:attr:`exact`, rounded once to a float); ``None`` if none did."""
        return None if self.exact is None else float(self.exact)

    @property
    def std(self) -> float | None:
        """Sample standard deviation over the seeds that finished (0 for one seed; ``None`` if none finished)."""
        done = self.finished
        if not done:
            return None
        return statistics.stdev(done) if len(done) > 1 else 0.0

    @property
    def low(self) -> float | None:
        return min(self.finished) if self.finished else None

    @property
    def high(self) -> float | None:
        return max(self.finished) if self.finished else None


def exact_mean(values: Iterable[float]) -> Fraction:
    """The mean of ``values`` in exact rational arithmetic, each value taken as the shortest decimal that reads back
    as it (``repr``: a stored 0.97778 counts as 97778/100000, not as the binary number nearest to it).

    The result does not depend on the order of the values, and two lists whose decimals add up to the same total
    have exactly the same mean: the condition for the selection rule's "exact tie". ``float(exact_mean(v))`` is
    the mean rounded once.

    Raises:
        ValueError: no values, or a value that is not finite.

    Example:
        >>> a, b = [0.88889, 0.90833], [0.89444, 0.90278]   # 320 + 327 and 322 + 325 of 360 images: both 1.79722
        >>> statistics.fmean(a) == statistics.fmean(b), exact_mean(a) == exact_mean(b), float(exact_mean(a))
        (False, True, 0.89861)
    """
    floats = tuple(map(float, values))
    if not floats:
        raise ValueError("exact_mean needs at least one value")
    if not all(map(math.isfinite, floats)):
        raise ValueError(f"exact_mean needs finite values, got {floats}: leave diverged runs out (None)")
    return _exact_mean(floats)


_EXACT = decimal.Context(prec=decimal.MAX_PREC, traps=[decimal.Inexact, decimal.Rounded])
"""Decimal arithmetic that never rounds (it raises instead): additions of short decimals stay exact."""


@functools.lru_cache(maxsize=1 << 16)
def _exact_mean(values: tuple[float, ...]) -> Fraction:
    # decimal (C) sums are ~5x faster than Fraction sums; leave-one-seed-out asks for the same lists again and again
    total = decimal.Decimal(0)
    for v in values:
        total = _EXACT.add(total, decimal.Decimal(repr(v)))
    return Fraction(total) / len(values)


def score(setting: Any, values: Iterable[float | None]) -> Score:
    """A :class:`Score`; non-finite values count as diverged (``None``).

    Example:
        >>> s = score("lr 0.1", [0.9, float("nan"), 0.8])
        >>> s.diverged, round(s.mean, 2), round(s.std, 3)
        (1, 0.85, 0.071)
    """
    cleaned = tuple(None if v is None or not math.isfinite(float(v)) else float(v) for v in values)
    return Score(setting, cleaned)


@dataclass(frozen=True)
class Selection:
    """The result of :func:`select_best`: the best :class:`Score`, every candidate ranked, and the rule used."""

    best: Score
    ranked: list[Score] = field(default_factory=list)
    mode: str = "max"
    rule: str = RULE


def _key(s: Score, order: int, mode: str) -> tuple:
    mean = s.exact   # exact: equal totals tie, so the order breaks the tie (module docstring)
    if mean is None:
        return (s.diverged, math.inf, order)
    return (s.diverged, -mean if mode == "max" else mean, order)


def select_best(candidates: Mapping[Hashable, Sequence[float | None]] | Iterable[tuple[Any, Sequence[float | None]]],
                mode: str = "max") -> Selection:
    """Rank the candidates by the book's selection rule (module docstring) and return the best.

    Args:
        candidates: ``{setting: [value per seed]}`` (or ``(setting, values)`` pairs), in the order that breaks ties
            (most conservative first); ``None`` or a non-finite value is a diverged seed.
        mode: ``"max"`` (accuracy) or ``"min"`` (loss).

    Raises:
        ValueError: no candidates, or ``mode`` is neither ``"max"`` nor ``"min"``.

    Example:
        >>> select_best({"a": [2.0, 2.2], "b": [1.9, 2.1]}, mode="min").best.setting
        'b'
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' (accuracy) or 'min' (loss), got {mode!r}")
    pairs = list(candidates.items()) if isinstance(candidates, Mapping) else list(candidates)
    if not pairs:
        raise ValueError("no candidates to select from")
    scores = [score(setting, values) for setting, values in pairs]
    ranked = [s for _, s in sorted(((_key(s, i, mode), s) for i, s in enumerate(scores)), key=lambda t: t[0])]
    return Selection(best=ranked[0], ranked=ranked, mode=mode)


def beats(a: Score, b: Score, mode: str = "max") -> bool:
    """Whether ``a`` beats ``b`` by the book's comparison rule (module docstring).

    Example:
        >>> beats(score("a", [0.95, 0.96]), score("b", [0.90, 0.91])), beats(score("a", [0.95, 0.90]), score("b", [0.93, 0.92]))
        (True, False)
    """
    if a.diverged == 0 and b.diverged > 0:
        return True
    if a.diverged or b.diverged or a.mean is None or b.mean is None:
        return False
    gap = a.mean - b.mean if mode == "max" else b.mean - a.mean
    return gap > max(a.std, b.std)


UNSEEN_SEED_GROUPS: tuple[tuple[int, ...], ...] = ((5, 6, 7, 8, 9), (10, 11, 12, 13, 14))
"""The groups of seeds no choice of chapter 4 saw (its choices use seeds 0-4): chapter 4.4's image table and chapter
4.11's recurrent rows are judged again at each (:func:`standing_verdict`)."""


def standing_verdict(verdicts: Sequence[str]) -> str:
    """The verdict that stands over seed groups judged each on its own: the one every group gives, else
    ``"no difference"``.

    Example:
        >>> standing_verdict(["clipping", "clipping"]), standing_verdict(["clipping", "no difference", "clipping"])
        ('clipping', 'no difference')
    """
    return verdicts[0] if len(set(verdicts)) == 1 else "no difference"


def values_of(runs: Iterable[Any], metric: str) -> list[float | None]:
    """One metric per run, ``None`` for a diverged run: runs are :class:`~gradclip_book.harness.Run` objects or stored
    lines (dicts with ``"diverged_at"`` and ``"metrics"``).

    Example:
        >>> values_of([{"diverged_at": None, "metrics": {"val_accuracy": 0.9}}, {"diverged_at": 3, "metrics": {}}],
        ...           "val_accuracy")
        [0.9, None]
    """
    out: list[float | None] = []
    for run in runs:
        if isinstance(run, Mapping):
            value = None if run["diverged_at"] is not None else run["metrics"].get(metric)
        else:
            value = run.metric(metric)
        out.append(None if value is None else float(value))
    return out
