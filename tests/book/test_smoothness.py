"""Steps to converge and local smoothness (gradclip_book.smoothness) against quartic_descent and a quadratic."""

from __future__ import annotations

import pytest
import torch

from gradclip_book import (
    largest_stable_lr, local_smoothness, quartic_descent, quartic_steps, smoothness_along_training,
)


@pytest.mark.parametrize("x0, lr, max_norm", [(2.0, 0.9 / 8, None), (4.0, 0.1, 1.0), (3.0, 0.05, None), (4.0, 0.1, None)])
def test_quartic_steps_agrees_with_quartic_descent(x0, lr, max_norm):
    run = quartic_descent(x0, lr, max_norm=max_norm, steps=400)
    expected = None if run.diverged_at is not None else run.steps_to(1e-4)
    assert quartic_steps(x0, lr, max_norm, max_steps=400) == expected


def test_quartic_anchor_numbers_and_stable_lr():
    assert [quartic_steps(x, 0.9 / (2 * x * x)) for x in (2.0, 10.0)] == [93, 2758]
    assert [quartic_steps(x, 0.1, 1.0) for x in (2.0, 10.0, 100.0)] == [133, 213, 1113]
    for x0 in (1.0, 5.0, 30.0):
        assert largest_stable_lr(x0) * 2 * x0**2 == pytest.approx(1.0, rel=2e-3)


def test_local_smoothness_of_a_quadratic_is_its_curvature():
    a = torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64))
    x0, x1 = torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([0.0, 0.5], dtype=torch.float64)
    assert local_smoothness(a @ x0, a @ x1, x0, x1) == pytest.approx(4.0)


def test_smoothness_correlates_with_gradient_norm():
    from scipy.stats import spearmanr

    trace = smoothness_along_training(steps=120, lr=1.0, samples=256)
    assert spearmanr(trace.grad_norms, trace.smoothness).statistic > 0.5
    assert trace.losses[-1] < trace.losses[0]


def test_smoothness_envelope_bounds_every_point_and_is_tight():
    from gradclip_book.smoothness import smoothness_envelope

    g, s = [0.5, 1.0, 2.0, 4.0], [1.0, 3.0, 2.0, 5.0]
    l0, l1 = smoothness_envelope(g, s)
    assert all(si <= l0 + l1 * gi + 1e-12 for gi, si in zip(g, s))
    assert any(abs(si - (l0 + l1 * gi)) < 1e-12 for gi, si in zip(g, s)) and l0 == min(s)
