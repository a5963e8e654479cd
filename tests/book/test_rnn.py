"""Gradients through time (gradclip_book.rnn) against finite differences and the spectral radius."""

from __future__ import annotations

import numpy as np
import pytest

from gradclip_book import fit_layer_ratio, gradient_through_time
from gradclip_book.rnn import recurrent_matrix


def test_gradient_through_time_matches_finite_differences():
    radius, steps, width, seed = 1.2, 8, 6, 1
    result = gradient_through_time(radius, steps, "tanh", width, seed=seed)
    w = recurrent_matrix(width, radius, seed)
    rng = np.random.default_rng(seed + 10_000)
    inputs, probe = rng.standard_normal((steps, width)), rng.standard_normal(width)
    probe /= np.linalg.norm(probe)

    def loss_from(h0):  # J as a function of h_0
        h = h0
        for t in range(steps):
            h = np.tanh(w @ h + inputs[t])
        return probe @ h

    eps, h0 = 1e-6, np.zeros(width)
    grad = np.array([(loss_from(h0 + eps * e) - loss_from(h0 - eps * e)) / (2 * eps) for e in np.eye(width)])
    assert result.norms[-1] == pytest.approx(np.linalg.norm(grad), rel=1e-5)
    assert result.largest_singular_value == pytest.approx(np.linalg.svd(w, compute_uv=False)[0])


def test_linear_rnn_factor_per_step_is_the_spectral_radius():
    for radius in (0.9, 1.1):
        fitted = np.mean([fit_layer_ratio(gradient_through_time(radius, 100, "linear", seed=s).norms[::-1])
                          for s in range(3)])
        assert abs(fitted / radius - 1) < 0.10


def test_mean_field_factor_tracks_the_measured_tanh_factor():
    runs = [gradient_through_time(1.5, 100, "tanh", input_scale=0.1, seed=s) for s in range(3)]
    fitted = np.mean([fit_layer_ratio(r.norms[::-1]) for r in runs])
    mean_field = np.mean([r.mean_field_factor for r in runs])
    assert abs(mean_field - fitted) < 0.05 < abs(runs[0].largest_singular_value - fitted)
    assert gradient_through_time(1.5, 10, "linear").mean_field_factor == pytest.approx(1.5)


def test_gated_cell_matches_finite_differences_and_its_limits():
    from gradclip_book.rnn import gated_gradient_through_time

    radius, steps, width, seed, bias = 1.2, 8, 6, 1, -1.0
    result = gated_gradient_through_time(radius, steps, bias, width, seed=seed)
    w = recurrent_matrix(width, radius, seed)
    rng = np.random.default_rng(seed + 10_000)
    inputs, probe = rng.standard_normal((steps, width)), rng.standard_normal(width)
    probe /= np.linalg.norm(probe)
    v = np.random.default_rng(seed + 20_000).standard_normal((width, width)) / np.sqrt(width)

    def loss_from(h0):
        h = h0
        for t in range(steps):
            z = 1 / (1 + np.exp(-(bias + v @ inputs[t])))
            h = (1 - z) * h + z * np.tanh(w @ h + inputs[t])
        return probe @ h

    eps, h0 = 1e-6, np.zeros(width)
    grad = np.array([(loss_from(h0 + eps * e) - loss_from(h0 - eps * e)) / (2 * eps) for e in np.eye(width)])
    assert result.norms[-1] == pytest.approx(np.linalg.norm(grad), rel=1e-5)
    # a gate that is always open is the vanilla tanh cell; one that is always shut is the identity
    open_ = gated_gradient_through_time(0.9, 30, gate_bias=60.0)
    assert open_.norms == pytest.approx(gradient_through_time(0.9, 30, "tanh").norms, rel=1e-9)
    assert gated_gradient_through_time(0.9, 30, gate_bias=-60.0).norms == pytest.approx([1.0] * 31)


def test_gating_keeps_the_gradient_that_the_vanilla_cell_loses():
    from gradclip_book.rnn import gated_gradient_through_time

    for seed in range(3):
        plain = np.log10(gradient_through_time(0.9, 100, "tanh", seed=seed).norms[-1])
        gated = np.log10(gated_gradient_through_time(0.9, 100, -3.0, seed=seed).norms[-1])
        assert plain < -20 and -3 < gated < 0
