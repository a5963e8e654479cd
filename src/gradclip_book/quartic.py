"""Gradient descent on f(x) = x^4: where fixed steps explode and clipped steps do not."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gradclip import clip_grad_norm_

# A loss or iterate beyond this counts as diverged: the run stops there.
DIVERGED = 1e12


@dataclass(frozen=True)
class Run:
    """A trajectory of losses; ``diverged_at`` is the step at which it blew up, or None."""

    losses: list[float]
    diverged_at: int | None

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.diverged_at is None else math.inf

    def steps_to(self, target: float) -> int | None:
        """The first step whose loss is below ``target``, or None."""
        return next((step for step, loss in enumerate(self.losses) if loss < target), None)


def quartic_descent(x0: float, lr: float, max_norm: float | None = None, steps: int = 100) -> Run:
    r"""Gradient descent on :math:`f(x) = x^4`, optionally with norm clipping.

    :math:`f` is not L-smooth (its curvature :math:`12x^2` is unbounded) but is
    :math:`(L_0, L_1)`-smooth, the setting in which Zhang, He, Sra and
    Jadbabaie (2020, `arXiv:1905.11881 <https://arxiv.org/abs/1905.11881>`_)
    show that clipped descent can be arbitrarily faster than fixed-step descent.

    Args:
        x0: the starting point.
        lr: the learning rate, > 0.
        max_norm: the clipping threshold, or None for no clipping.
        steps: the number of updates.

    Returns:
        The losses :math:`f(x_0), \dots, f(x_T)`, cut at divergence.

    Example:
        >>> from gradclip_book import quartic_descent
        >>> quartic_descent(x0=4.0, lr=0.1, steps=3).diverged_at
        2
        >>> quartic_descent(x0=4.0, lr=0.1, max_norm=1.0, steps=3).diverged_at is None
        True
    """
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    x = torch.tensor([float(x0)], dtype=torch.float64, requires_grad=True)
    losses = []
    for step in range(steps + 1):
        loss = (x**4).sum()
        value = float(loss.detach())  # the experiment reads its loss every step; clipping itself does not sync
        if not math.isfinite(value) or value > DIVERGED:
            return Run(losses, step)
        losses.append(value)
        if step == steps:
            break
        x.grad = None
        loss.backward()
        if max_norm is not None:
            clip_grad_norm_([x], max_norm)
        with torch.no_grad():
            x -= lr * x.grad
    return Run(losses, None)


def quartic_frame(x0: float, lr: float, max_norm: float | None) -> dict:
    """One frame of the book's quartic explorer: 100 steps without clipping and with ``max_norm``.

    Args:
        x0: the starting point.
        lr: the learning rate.
        max_norm: the clipping threshold, or ``None`` for no clipping.

    Returns:
        ``{"traces": [plain loss curve, clipped loss curve, divergence markers], "note": [two sentences]}``,
        the frame format of :class:`gradclip_book.figures.Explorer`; a run that diverged is marked at
        the top edge of the plot (:data:`DIVERGED`) at the step where it stopped.

    Example:
        >>> from gradclip_book.quartic import quartic_frame
        >>> frame = quartic_frame(4.0, 0.1, 1.0)
        >>> frame["note"][0].startswith("Without clipping, the run diverged")
        True
    """
    clipped = quartic_descent(x0, lr, max_norm=max_norm, steps=100)
    plain = quartic_descent(x0, lr, max_norm=None, steps=100)

    def curve(run: Run) -> dict:
        return {"x": list(range(len(run.losses))), "y": run.losses}

    def status(run: Run, name: str) -> str:
        if run.diverged_at is not None:
            return f"{name} diverged at step {run.diverged_at}."
        return f"{name} ends at loss {run.final_loss:.3g}."

    stops = [run.diverged_at for run in (plain, clipped) if run.diverged_at is not None]
    return {"traces": [curve(plain), curve(clipped), {"x": stops, "y": [DIVERGED] * len(stops)}],
            "note": [status(plain, "Without clipping, the run"),
                     status(clipped, "With this threshold, it" if max_norm is not None else "With clipping off, it")]}
