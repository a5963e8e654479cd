"""The chapter experiments against independent references: explicit Jacobian products, finite differences, numpy."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
import torch

from gradclip_book import (
    angle_degrees, apply_method, cliff_descent, cliff_gradient, cliff_loss, clip_vector, deep_gradients,
    depth_profile, fit_layer_ratio, gradient_through_time, largest_stable_lr, local_smoothness,
    predicted_layer_factor, predicted_norms, quartic_descent, quartic_steps, record_gradient_stream,
    smoothness_along_training,
)
from gradclip_book import exercises
from gradclip_book.depth import init_weights
from gradclip_book.rnn import recurrent_matrix

# --- depth ------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["linear", "tanh", "relu"])
@pytest.mark.parametrize("loss", ["probe", "mse"])
def test_deep_gradients_match_an_explicit_product_of_jacobians(activation, loss):
    depth, width, seed = 6, 5, 3
    result = deep_gradients(depth, width, 1.3, activation, "he", loss, seed)
    rng = np.random.default_rng(seed)
    weights = init_weights(depth, width, 1.3, "he", rng).numpy()
    x, probe = rng.standard_normal(width), rng.standard_normal(width)
    probe /= np.linalg.norm(probe)
    phi = {"linear": lambda z: z, "tanh": np.tanh, "relu": lambda z: np.maximum(z, 0)}[activation]
    dphi = {"linear": np.ones_like, "tanh": lambda z: 1 - np.tanh(z) ** 2, "relu": lambda z: (z > 0) * 1.0}[activation]
    hs, zs = [x], []
    for w in weights:
        zs.append(w @ hs[-1])
        hs.append(phi(zs[-1]))
    top = probe if loss == "probe" else hs[-1]
    for layer in range(depth + 1):
        jac = np.eye(width)  # d h_L / d h_layer = prod D_k W_k
        for k in range(layer, depth):
            jac = np.diag(dphi(zs[k])) @ weights[k] @ jac
        assert result.activation_grad_norms[layer] == pytest.approx(np.linalg.norm(jac.T @ top), rel=1e-9)
    for layer in range(depth):
        jac = np.eye(width)
        for k in range(layer + 1, depth):
            jac = np.diag(dphi(zs[k])) @ weights[k] @ jac
        delta = dphi(zs[layer]) * (jac.T @ top)
        assert result.weight_grad_norms[layer] == pytest.approx(np.linalg.norm(np.outer(delta, hs[layer])), rel=1e-9)


def test_orthogonal_linear_network_follows_the_law_exactly():
    result = deep_gradients(10, 16, 1.1, "linear", "orthogonal", "probe", 0)
    assert fit_layer_ratio(result.activation_grad_norms) == pytest.approx(1.1, rel=1e-9)
    law = predicted_norms(10, 16, 1.1, "linear", "orthogonal", "probe")
    assert math.log10(result.activation_grad_norms[0]) == pytest.approx(law.log_activation_grads[0], abs=1e-9)


@pytest.mark.parametrize("gain", [0.9, 1.1])
def test_linear_xavier_ratio_is_within_ten_percent_of_the_gain(gain):
    for ratio in depth_profile(50, 64, gain, "linear", "xavier", seeds=4).layer_ratios:
        assert abs(ratio / gain - 1) < 0.10


def test_predicted_layer_factor_and_inits():
    assert predicted_layer_factor(1.0, "relu", "he", 64) == pytest.approx(1.0)
    assert predicted_layer_factor(1.0, "linear", "naive", 64) == pytest.approx(8.0)
    w = init_weights(200, 50, 1.0, "xavier", np.random.default_rng(0)).numpy()
    assert w.std() == pytest.approx(1 / math.sqrt(50), rel=0.01)
    with pytest.raises(ValueError):
        deep_gradients(3, init="bogus")


# --- recurrent networks -----------------------------------------------------------------------


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


# --- the cliff --------------------------------------------------------------------------------


def test_cliff_gradient_matches_finite_differences():
    for w, b in [(5.0, -2.55), (4.0, -2.0), (5.0, -2.7)]:
        loss, dw, db = cliff_gradient(w, b)
        eps = 1e-6
        assert loss == pytest.approx(float(cliff_loss(w, b)), rel=1e-12)
        assert dw == pytest.approx(float(cliff_loss(w + eps, b) - cliff_loss(w - eps, b)) / (2 * eps), rel=1e-4)
        assert db == pytest.approx(float(cliff_loss(w, b + eps) - cliff_loss(w, b - eps)) / (2 * eps), rel=1e-4)


def test_cliff_has_a_wall_and_clipping_bounds_the_steps():
    assert cliff_loss(5.0, -2.62) > 10 * cliff_loss(5.0, -2.61)
    plain = cliff_descent(5.0, -2.55, lr=0.005, iters=40)
    clipped = cliff_descent(5.0, -2.55, lr=0.005, max_norm=1.0, iters=40)
    steps = np.hypot(np.diff(clipped.w), np.diff(clipped.b))
    assert steps.max() <= 0.005 * 1.0 + 1e-12
    assert plain.farthest() > 5 * clipped.farthest()


# --- smoothness -------------------------------------------------------------------------------


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


# --- clipping families ------------------------------------------------------------------------


def test_clip_vector_and_angles_against_numpy():
    g = np.array([3.0, 4.0])
    assert clip_vector(g, 1.0, "norm") == pytest.approx(g / 5)
    assert clip_vector(g, 1.0, "value") == pytest.approx([1.0, 1.0])
    assert angle_degrees(g, 2 * g) == 0.0
    assert angle_degrees([1, 0], [0, 1]) == pytest.approx(90.0)
    assert angle_degrees([3, 1], [1, 1]) == pytest.approx(math.degrees(math.atan2(1, 1) - math.atan2(1, 3)))


def test_methods_on_a_recorded_stream():
    stream = record_gradient_stream(steps=40, spike_at=30)
    norms = stream.norms
    assert max(range(40), key=lambda t: norms[t]) == 30
    norm = apply_method("norm", stream, max_norm=0.5)
    expected = [min(n, 0.5 * n / (n + 1e-6)) for n in norms]
    assert norm.norm_after == pytest.approx(expected, rel=1e-9)
    assert max(norm.angle) < 1e-5
    value = apply_method("value", stream, clip_value=1e-3)
    reference = [np.clip(torch.cat([g.flatten() for g in step]).numpy(), -1e-3, 1e-3) for step in stream.grads]
    assert value.norm_after == pytest.approx([np.linalg.norm(r) for r in reference], rel=1e-9)
    sign = apply_method("sign", stream)
    d = sum(g.numel() for g in stream.grads[0])
    assert max(sign.norm_after) <= math.sqrt(d) + 1e-9
    assert apply_method("none", stream).norm_after == pytest.approx(norms)


# --- exercises --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["decades", "relu_xavier", "sigmoid_radius", "clipped_steps", "value_angle"])
def test_checkers_accept_the_answer_and_never_print_it(name):
    check = getattr(exercises, f"check_{name}")
    right = exercises.answer(name)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert check(right) is True
        assert check(right * 1.5 + 1) is False
        assert check(None) is False
    for shown in (f"{right:g}", f"{right:.2f}", f"{right:.1f}"):
        assert shown not in out.getvalue()


def test_exercise_answers_agree_with_independent_computations():
    assert exercises.answer("decades") == pytest.approx(20 * math.log10(1.2))
    assert exercises.answer("relu_xavier") == pytest.approx(1 / math.sqrt(2))
    assert exercises.answer("sigmoid_radius") == pytest.approx(4.0)
    assert exercises.answer("value_angle") == pytest.approx(math.degrees(math.atan2(1, 1) - math.atan2(1, 4)))
    run = quartic_descent(50.0, 0.1, max_norm=1.0, steps=700)
    assert exercises.answer("clipped_steps") == run.steps_to(1e-4)
