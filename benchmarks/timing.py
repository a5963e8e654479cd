"""The one timer of the benchmarks: calls interleaved in one process, medians."""

from __future__ import annotations

import statistics
import time


def interleaved(functions: dict, repeats: int, before=None) -> dict[str, float]:
    """Median wall time in ms of each function, calls alternating between them (one warm-up call each).

    Alternating puts drifts of clock speed or cache state on every candidate alike. ``before``, if
    given, runs untimed before every call (to restore the state a call changed).
    """
    times = {name: [] for name in functions}
    for fn in functions.values():
        fn()
    for _ in range(repeats):
        for name, fn in functions.items():
            if before is not None:
                before()
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(ts) for name, ts in times.items()}
