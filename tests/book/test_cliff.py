"""The cliff (gradclip_book.cliff): its gradient against finite differences, and clipping bounding the steps."""

from __future__ import annotations

import numpy as np
import pytest

from gradclip_book import cliff_descent, cliff_gradient, cliff_loss


def test_cliff_gradient_matches_finite_differences():
    for w, b in [(5.0, -2.55), (4.0, -2.0), (5.0, -2.7)]:
        loss, dw, db = cliff_gradient(w, b)
        eps = 1e-6
        assert loss == pytest.approx(float(cliff_loss(w, b)), rel=1e-12)
        assert dw == pytest.approx(float(cliff_loss(w + eps, b) - cliff_loss(w - eps, b)) / (2 * eps), rel=1e-4)
        assert db == pytest.approx(float(cliff_loss(w, b + eps) - cliff_loss(w, b - eps)) / (2 * eps), rel=1e-4)


def test_the_descents_forward_mode_gradient_is_backpropagation_through_time():
    # cliff_descent carries dx/dw, dx/db forward (fast); cliff_gradient backpropagates with autograd
    from gradclip_book.cliff import _cliff_value_and_gradient

    rng = np.random.default_rng(0)
    points = [(5.0, -2.61), (5.0, -2.62), (7.0, -4.5), (3.0, -0.5)] + list(zip(rng.uniform(3, 7, 40), rng.uniform(-4.5, -0.5, 40)))
    for w, b in points:
        fast, bptt = _cliff_value_and_gradient(float(w), float(b), 0.5, 50, 0.7), cliff_gradient(float(w), float(b))
        assert fast == pytest.approx(bptt, rel=1e-12, abs=1e-300), (w, b)
    with np.errstate(over="ignore"):  # the far-off point saturates the sigmoid: exp(-x) overflows in numpy
        assert _cliff_value_and_gradient(1e6, -1e6, 0.5, 50, 0.7)[0] == pytest.approx(float(cliff_loss(1e6, -1e6)))


def test_cliff_has_a_wall_and_clipping_bounds_the_steps():
    assert cliff_loss(5.0, -2.62) > 10 * cliff_loss(5.0, -2.61)
    plain = cliff_descent(5.0, -2.55, lr=0.005, iters=40)
    clipped = cliff_descent(5.0, -2.55, lr=0.005, max_norm=1.0, iters=40)
    steps = np.hypot(np.diff(clipped.w), np.diff(clipped.b))
    assert steps.max() <= 0.005 * 1.0 + 1e-12
    assert plain.farthest() > 5 * clipped.farthest()


def test_bistable_window_has_two_stable_fixed_points_inside_and_one_outside():
    from gradclip_book.cliff import bistable_window

    def stable_points(w, b):
        xs = np.linspace(-20, 20, 400001)
        f = w / (1 + np.exp(-xs)) + b - xs
        roots = xs[:-1][np.sign(f[:-1]) != np.sign(f[1:])]
        s = 1 / (1 + np.exp(-roots))
        return int(np.sum(np.abs(w * s * (1 - s)) < 1))

    lo, hi = bistable_window(5.0)
    assert (lo, hi) == pytest.approx((-2.656, -2.344), abs=1e-3)
    assert stable_points(5.0, (lo + hi) / 2) == 2
    assert stable_points(5.0, lo - 0.05) == 1 and stable_points(5.0, hi + 0.05) == 1
