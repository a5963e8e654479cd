"""The one timer of the benchmarks: :func:`gradclip_book.timing.interleaved` (calls interleaved in one process,
medians), shared with the chapters that time at build time."""

from __future__ import annotations

from gradclip_book.timing import interleaved, interleaved_times, paired_ratio

__all__ = ["interleaved", "interleaved_times", "paired_ratio"]
