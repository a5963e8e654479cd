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


def digits_split(
    seed: int = 0, validation: float = 0.2, test: float = 0.2, std_floor: float = 1.0 / 16.0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    r"""The digits, split stratified into train / validation / test and standardised with training statistics.

    Two calls of ``sklearn.model_selection.train_test_split(..., stratify=labels,
    random_state=seed)`` cut off the test set, then the validation set, so every
    class keeps its share in every part. Each pixel is then standardised as
    :math:`(x - \mu_j)/\max(\sigma_j, s)` with :math:`\mu_j, \sigma_j` the mean and
    (population) standard deviation of pixel j over the *training* images only,
    and s = ``std_floor`` (one grey level, 1/16, by default): pixels that are
    blank in every training image would otherwise divide by 0.

    Args:
        seed: the ``random_state`` of both splits.
        validation, test: the fractions of all 1,797 images in the validation and test sets.
        std_floor: the floor s on the per-pixel standard deviation (in units of the [0, 1] pixels).
        dtype: the dtype of the inputs.

    Returns:
        ``{"train": (x, y), "validation": (x, y), "test": (x, y)}``, with x of
        shape ``(n, 64)`` in ``dtype`` (standardised pixels, dimensionless) and
        y of shape ``(n,)`` int64 labels 0..9.

    Example:
        >>> from gradclip_book.data import digits_split
        >>> parts = digits_split(seed=0)
        >>> [tuple(parts[k][0].shape) for k in ("train", "validation", "test")]
        [(1077, 64), (360, 64), (360, 64)]
    """
    from sklearn.model_selection import train_test_split

    inputs, labels = digits(dtype=torch.float64)
    x, y = inputs.numpy(), labels.numpy()
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=test, stratify=y, random_state=seed)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=validation / (1.0 - test), stratify=y_rest, random_state=seed)
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0).clip(min=std_floor)

    def part(xs, ys):
        return torch.tensor((xs - mean) / std, dtype=dtype), torch.tensor(ys, dtype=torch.int64)

    return {"train": part(x_train, y_train), "validation": part(x_val, y_val), "test": part(x_test, y_test)}


__all__ += ["digits_split"]
