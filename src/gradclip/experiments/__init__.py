"""Small deterministic experiments the book runs, built on the real clipping functions.

They live in the library so that chapters share them, readers can call them
from their own notebooks, and tests can re-run any grid point a chapter saved.
"""

from .quartic import DIVERGED, Run, quartic_descent

__all__ = ["DIVERGED", "Run", "quartic_descent"]
