"""The hypothesis strategies the tests share."""

from __future__ import annotations

import math

from hypothesis import strategies as st

NORM_TYPES = [0.5, 1.0, 1.5, 2.0, 3.0, math.inf]


def shape_lists(max_side: int = 6, max_ndim: int = 3, max_tensors: int = 8) -> st.SearchStrategy:
    """Lists of 1 to ``max_tensors`` tensor shapes, each of 0 to ``max_ndim`` sides in [1, ``max_side``]."""
    return st.lists(st.lists(st.integers(1, max_side), min_size=0, max_size=max_ndim).map(tuple),
                    min_size=1, max_size=max_tensors)


def seeds() -> st.SearchStrategy:
    """Generator seeds."""
    return st.integers(0, 2**16)
