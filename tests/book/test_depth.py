"""Gradient norms through depth (gradclip_book.depth) against explicit products of Jacobians."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradclip_book import deep_gradients, depth_profile, fit_layer_ratio, predicted_layer_factor, predicted_norms
from gradclip_book.depth import init_weights


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
