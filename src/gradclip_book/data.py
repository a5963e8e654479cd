"""The data sets the book trains on, loaded from installed packages (nothing is downloaded)."""

from __future__ import annotations

import torch

__all__ = ["digits"]


def digits(samples: int | None = None, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's handwritten digits: 1,797 real 8x8 scans in 10 classes.

    The pixels (integers 0..16) are divided by 16, so every input lies in [0, 1].

    Args:
        samples: keep the first ``samples`` images (all 1,797 when ``None``).
        dtype: the dtype of the inputs.

    Returns:
        ``(inputs, labels)``: inputs of shape ``(n, 64)`` in ``dtype``, labels
        of shape ``(n,)`` as int64 class indices 0..9.

    Example:
        >>> from gradclip_book.data import digits
        >>> x, y = digits(samples=5)
        >>> tuple(x.shape), tuple(y.shape), float(x.max()) <= 1.0
        ((5, 64), (5,), True)
    """
    from sklearn.datasets import load_digits  # the book's extra installs scikit-learn

    bunch = load_digits()
    end = None if samples is None else int(samples)
    inputs = torch.tensor(bunch.data[:end] / 16.0, dtype=dtype)
    labels = torch.tensor(bunch.target[:end], dtype=torch.int64)
    return inputs, labels
