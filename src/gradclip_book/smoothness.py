r"""Why clipping helps beyond capping the step: :math:`(L_0, L_1)`-smoothness.

Zhang, He, Sra and Jadbabaie (2020), "Why gradient clipping accelerates
training: a theoretical justification for adaptivity",
`arXiv:1905.11881 <https://arxiv.org/abs/1905.11881>`_, observe that along
real training runs the local smoothness (the curvature) grows with the
gradient norm, :math:`\|\nabla^2 f(x)\| \le L_0 + L_1 \|\nabla f(x)\|`, and
prove that clipped gradient descent then needs far fewer steps than any
fixed-step descent, whose step must fit the worst curvature on its path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gradclip import clip_grad_norm_
from gradclip.clip import NORM_EPS
from .data import digits
from .quartic import DIVERGED


def quartic_steps(x0: float, lr: float, max_norm: float | None = None, target: float = 1e-4,
                  max_steps: int = 10_000_000) -> int | None:
    r"""How many steps gradient descent on :math:`f(x) = x^4` needs to reach :math:`f < \text{target}`.

    The same iteration as :func:`gradclip_book.quartic_descent`,
    :math:`x \leftarrow x - \eta\, \min(1, c/(|4x^3| + 10^{-6}))\, 4x^3`, in plain
    Python floats, so that runs of hundreds of thousands of steps take a
    fraction of a second. With :math:`\eta = 0.9/(2x_0^2)` fixed-step descent
    needs a number of steps growing like :math:`x_0^2`; clipped descent moves
    :math:`\eta c` per step while :math:`|4x^3| > c`, so it needs about
    :math:`x_0/(\eta c)` steps (Zhang et al. 2020, `arXiv:1905.11881
    <https://arxiv.org/abs/1905.11881>`_).

    Args:
        x0: the start.
        lr: :math:`\eta`, > 0.
        max_norm: c, or None for no clipping.
        target: the loss to reach.
        max_steps: give up after this many steps.

    Returns:
        The first step whose loss is below ``target``; None if the run diverges
        (its loss passes :data:`~gradclip_book.DIVERGED`) or gives up.

    Example:
        >>> from gradclip_book import quartic_steps
        >>> quartic_steps(10.0, 0.1, max_norm=1.0)
        213
        >>> quartic_steps(10.0, 0.01) is None  # 0.01 > 1/(2 * 10**2): diverges
        True
    """
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    x = float(x0)
    for step in range(max_steps + 1):
        loss = x ** 4
        if not math.isfinite(loss) or loss > DIVERGED:
            return None
        if loss < target:
            return step
        grad = 4.0 * x ** 3
        if max_norm is not None:
            grad *= min(1.0, max_norm / (abs(grad) + NORM_EPS))
        x -= lr * grad
    return None


def largest_stable_lr(x0: float, steps: int = 100, rel_tol: float = 1e-3) -> float:
    r"""The largest fixed learning rate with which descent on :math:`x^4` from :math:`x_0` does not diverge.

    Found by bisection on :math:`\eta` (in log scale) with :func:`quartic_steps`
    run for ``steps`` steps. The first step maps :math:`x_0` to
    :math:`x_0(1 - 4\eta x_0^2)`, which grows in size when :math:`\eta > 1/(2x_0^2)`;
    so the answer is close to :math:`1/(2x_0^2)`: the step size has to shrink like
    :math:`1/x_0^2`.

    Args:
        x0: the start, > 0.
        steps: how long a run must stay finite.
        rel_tol: the relative precision of the bisection.

    Returns:
        :math:`\eta_\max`.

    Example:
        >>> from gradclip_book.smoothness import largest_stable_lr
        >>> round(largest_stable_lr(10.0) * 2 * 10.0**2, 2)
        1.0
    """
    def stable(lr: float) -> bool:
        x = float(x0)
        for _ in range(steps):
            x -= lr * 4.0 * x ** 3
            if not math.isfinite(x) or x ** 4 > DIVERGED:
                return False
        return True

    low, high = 1e-12, 10.0
    while high / low > 1.0 + rel_tol:
        mid = math.sqrt(low * high)
        low, high = (mid, high) if stable(mid) else (low, mid)
    return low


def local_smoothness(grad_before: torch.Tensor, grad_after: torch.Tensor,
                     x_before: torch.Tensor, x_after: torch.Tensor) -> float:
    r"""Zhang et al.'s estimate of the local smoothness between two points.

    .. math::

        \hat L = \frac{\|\nabla f(x_{t+1}) - \nabla f(x_t)\|}{\|x_{t+1} - x_t\|}

    (Zhang et al. 2020, `arXiv:1905.11881 <https://arxiv.org/abs/1905.11881>`_,
    section 3): the change of the gradient per unit of distance, a lower bound
    on the largest curvature on the segment.

    Args:
        grad_before: :math:`\nabla f(x_t)`, flattened.
        grad_after: :math:`\nabla f(x_{t+1})`.
        x_before: :math:`x_t`.
        x_after: :math:`x_{t+1}`.

    Returns:
        :math:`\hat L`.

    Example:
        >>> import torch
        >>> from gradclip_book.smoothness import local_smoothness
        >>> x0, x1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
        >>> local_smoothness(3 * x0, 3 * x1, x0, x1)  # f = 1.5 |x|^2 has curvature 3
        3.0
    """
    return float((grad_after - grad_before).norm() / (x_after - x_before).norm())


@dataclass(frozen=True)
class SmoothnessTrace:
    """Gradient norm and local smoothness at each step of a training run.

    Attributes:
        losses: the training loss at each step.
        grad_norms: :math:`\\|\\nabla f(x_t)\\|` at each step (before clipping).
        smoothness: :math:`\\hat L_t` between :math:`x_t` and :math:`x_{t+1}`.
    """

    losses: list[float]
    grad_norms: list[float]
    smoothness: list[float]


def smoothness_along_training(steps: int = 300, lr: float = 0.5, max_norm: float | None = None,
                              hidden: int = 32, samples: int = 512, seed: int = 0) -> SmoothnessTrace:
    r"""Train a small tanh MLP on scikit-learn's digits by full-batch gradient descent; log :math:`(\|\nabla f\|, \hat L)`.

    The network is 64-``hidden``-``hidden``-10 with tanh units and cross-entropy
    loss, on the first ``samples`` images of ``sklearn.datasets.load_digits``
    (scaled to [0, 1]; no download). Each step records the gradient norm and
    :func:`local_smoothness` between consecutive iterates, which costs nothing
    extra: the next step's gradient is needed anyway. Updates are
    :math:`x \leftarrow x - \eta\,g` or, with ``max_norm``, clipped by
    :func:`gradclip.clip_grad_norm_`.

    Args:
        steps: the number of updates.
        lr: :math:`\eta`, > 0.
        max_norm: c, or None.
        hidden: the width of the two hidden layers.
        samples: how many images to train on (at most 1797).
        seed: seeds the initialisation.

    Returns:
        Per-step losses, gradient norms and smoothness estimates (``steps`` each).

    Example:
        >>> from gradclip_book import smoothness_along_training
        >>> trace = smoothness_along_training(steps=5, samples=64)
        >>> len(trace.smoothness), all(s > 0 for s in trace.smoothness)
        (5, True)
    """
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    inputs, labels = digits(samples)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, hidden), torch.nn.Tanh(),
        torch.nn.Linear(hidden, hidden), torch.nn.Tanh(),
        torch.nn.Linear(hidden, 10),
    ).double()
    params = list(model.parameters())

    def evaluate() -> tuple[float, torch.Tensor]:
        for p in params:
            p.grad = None
        loss = torch.nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()
        return float(loss.detach()), torch.cat([p.grad.flatten() for p in params])

    def flat() -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in params])

    losses, norms, smooth = [], [], []
    loss, grad = evaluate()
    for _ in range(steps):
        x_before = flat()
        losses.append(loss)
        norms.append(float(grad.norm()))
        if max_norm is not None:
            clip_grad_norm_(params, max_norm)
        with torch.no_grad():
            for p in params:
                p -= lr * p.grad
        loss, grad_after = evaluate()
        smooth.append(local_smoothness(grad, grad_after, x_before, flat()))
        grad = grad_after
    return SmoothnessTrace(losses, norms, smooth)


def smoothness_envelope(grad_norms: list[float], smoothness: list[float]) -> tuple[float, float]:
    r"""An :math:`(L_0, L_1)` bound that lies above every measured point: :math:`\hat L_t \le L_0 + L_1 \|\nabla f(x_t)\|`.

    :math:`(L_0, L_1)`-smoothness (Zhang et al. 2020, `arXiv:1905.11881
    <https://arxiv.org/abs/1905.11881>`_) is an upper bound, so it is drawn as
    an envelope, not fitted through the points. :math:`L_0` is the smallest
    measured :math:`\hat L_t` (the curvature left where the gradient is
    smallest), and :math:`L_1` the smallest slope that puts every point on or
    under the line.

    Args:
        grad_norms: :math:`\|\nabla f(x_t)\|` per step (finite values are used).
        smoothness: :math:`\hat L_t` per step.

    Returns:
        ``(L0, L1)``.

    Example:
        >>> from gradclip_book.smoothness import smoothness_envelope
        >>> smoothness_envelope([1.0, 2.0, 4.0], [1.0, 2.0, 3.0])
        (1.0, 0.5)
    """
    pairs = [(g, s) for g, s in zip(grad_norms, smoothness) if math.isfinite(g) and math.isfinite(s) and g > 0]
    if not pairs:
        raise ValueError("need at least one finite (gradient norm, smoothness) pair")
    l0 = min(s for _, s in pairs)
    l1 = max((s - l0) / g for g, s in pairs)
    return l0, l1
