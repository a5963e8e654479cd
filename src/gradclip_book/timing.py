"""The one timer of the book's measurements and of ``benchmarks/``: calls interleaved in one process, medians.

Alternating the candidates call by call puts drifts of clock speed, cache state or a busy shared
machine on every candidate alike; the median ignores the odd slow call. ``benchmarks/timing.py``
re-exports :func:`interleaved`, so the benchmark scripts and the chapters that time at build time
measure the same way.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

__all__ = ["interleaved", "interleaved_times", "paired_ratio"]


def interleaved(functions: dict[str, Callable[[], Any]], repeats: int,
                before: Callable[[], Any] | None = None,
                clock: Callable[[], float] | None = None) -> dict[str, float]:
    """Median time in ms of each function, calls alternating between them (one untimed warm-up call each).

    Args:
        functions: name -> a call without arguments.
        repeats: timed calls of each function.
        before: if given, runs untimed before every timed call (to restore the state a call changed).
        clock: what is read before and after each call, in seconds: the wall clock (``None``:
            ``time.perf_counter``, looked up at each call), or
            ``time.thread_time`` (this thread's CPU time: on a shared machine it leaves out the
            time the thread waits for a core; with one torch thread the kernels run on it).

    Returns:
        ``{name: median milliseconds}``.

    Example:
        >>> sorted(interleaved({"a": lambda: None, "b": lambda: sum(range(100))}, 3))
        ['a', 'b']
    """
    times = interleaved_times(functions, repeats, before, clock)
    return {name: statistics.median(ts) for name, ts in times.items()}


def interleaved_times(functions: dict[str, Callable[[], Any]], repeats: int,
                      before: Callable[[], Any] | None = None,
                      clock: Callable[[], float] | None = None) -> dict[str, list[float]]:
    """Every timed call of :func:`interleaved`, in ms: ``{name: [round 0, round 1, ...]}``.

    Round ``r`` calls the functions in the given order when ``r`` is even and in reverse when it is
    odd, so that no candidate always runs right after the same neighbour (whose cache footprint or
    clock boost it would inherit). Arguments as :func:`interleaved`; one untimed warm-up call each.

    Example:
        >>> times = interleaved_times({"a": lambda: None, "b": lambda: None}, 4)
        >>> [len(ts) for ts in times.values()]
        [4, 4]
    """
    clock = clock or time.perf_counter
    times: dict[str, list[float]] = {name: [] for name in functions}
    order = list(functions.items())
    for _, fn in order:
        fn()
    for round_index in range(repeats):
        for name, fn in (order if round_index % 2 == 0 else order[::-1]):
            if before is not None:
                before()
            start = clock()
            fn()
            times[name].append((clock() - start) * 1000)
    return times


def paired_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """The median over rounds of ``times[numerator][r] / times[denominator][r]``.

    The two calls of one round ran back to back, so a slow phase of a shared machine slows both:
    their ratio is steadier than the ratio of the two medians.

    Example:
        >>> paired_ratio({"a": [2.0, 4.0, 9.0], "b": [1.0, 2.0, 3.0]}, "a", "b")
        2.0
    """
    pairs = zip(times[numerator], times[denominator], strict=True)
    return statistics.median(a / b for a, b in pairs)
