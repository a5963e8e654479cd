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

__all__ = ["interleaved"]


def interleaved(functions: dict[str, Callable[[], Any]], repeats: int,
                before: Callable[[], Any] | None = None,
                clock: Callable[[], float] | None = None) -> dict[str, float]:
    """Median wall time in ms of each function, calls alternating between them (one untimed warm-up call each).

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
    clock = clock or time.perf_counter
    times: dict[str, list[float]] = {name: [] for name in functions}
    for fn in functions.values():
        fn()
    for _ in range(repeats):
        for name, fn in functions.items():
            if before is not None:
                before()
            start = clock()
            fn()
            times[name].append((clock() - start) * 1000)
    return {name: statistics.median(ts) for name, ts in times.items()}
