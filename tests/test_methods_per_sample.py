"""DP-SGD per-sample clipping against a loop that clips one example's autograd gradient at a time."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gradclip.per_sample import per_sample_clip_grad_, per_sample_clipped_grad, per_sample_grads


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def cnn(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3)
    )


def reference_dp_gradient(model, loss_fn, inputs, targets, max_norm, noise_multiplier=0.0, generator=None):
    """Abadi et al. 2016, Algorithm 1, one example at a time with autograd."""
    params = [p for p in model.parameters() if p.requires_grad]
    summed = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    norms = []
    for x, y in zip(inputs, targets):
        loss = loss_fn(model(x.unsqueeze(0)), y.unsqueeze(0))
        grads = torch.autograd.grad(loss, params)
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
        norms.append(norm)
        factor = min(1.0, max_norm / (norm + 1e-6))
        for s, g in zip(summed, grads):
            s.add_(g.double() * factor)
    if noise_multiplier > 0:
        for s in summed:
            s.add_(torch.randn(s.shape, generator=generator, dtype=torch.float32).double() * noise_multiplier * max_norm)
    return [s / len(inputs) for s in summed], norms


@pytest.mark.parametrize("make_model,input_shape", [(mlp, (6,)), (cnn, (1, 6, 6))])
@pytest.mark.parametrize("noise_multiplier", [0.0, 1.1])
def test_matches_the_per_example_loop(make_model, input_shape, noise_multiplier):
    model = make_model()
    inputs = torch.randn(12, *input_shape, generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(2))
    _, unclipped_norms = reference_dp_gradient(model, F.cross_entropy, inputs, targets, math.inf)
    max_norm = sorted(unclipped_norms)[6]  # the median: half the examples get clipped
    expected, expected_norms = reference_dp_gradient(
        model, F.cross_entropy, inputs, targets, max_norm, noise_multiplier, torch.Generator().manual_seed(3))
    result = per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, max_norm, noise_multiplier,
                                     torch.Generator().manual_seed(3))
    assert 0 < float((result.scales < 1).float().mean()) < 1  # some examples clipped, some not
    torch.testing.assert_close(result.norms.double(), torch.tensor(expected_norms, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    for (name, _), e in zip(model.named_parameters(), expected):
        torch.testing.assert_close(result.grads[name].double(), e, rtol=1e-5, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 9), max_norm=st.floats(0.01, 5.0), seed=st.integers(0, 2**10))
def test_matches_the_loop_on_random_batches(batch, max_norm, seed):
    model = mlp(seed)
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch, 6, generator=generator) * 3
    targets = torch.randint(0, 3, (batch,), generator=generator)
    expected, _ = reference_dp_gradient(model, F.cross_entropy, inputs, targets, max_norm)
    result = per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, max_norm)
    for (name, _), e in zip(model.named_parameters(), expected):
        torch.testing.assert_close(result.grads[name].double(), e, rtol=1e-5, atol=1e-6)
    # each clipped example contributes at most C: the average has norm at most C
    total = math.sqrt(sum(float(g.double().pow(2).sum()) for g in result.grads.values()))
    assert total <= max_norm * (1 + 1e-5)


def test_per_sample_grads_are_each_examples_gradient():
    model = cnn(1)
    inputs = torch.randn(5, 1, 6, 6)
    targets = torch.randint(0, 3, (5,))
    grads = per_sample_grads(model, F.cross_entropy, inputs, targets, chunk_size=2)
    for i in range(5):
        expected = torch.autograd.grad(F.cross_entropy(model(inputs[i:i + 1]), targets[i:i + 1]), list(model.parameters()))
        for (name, _), e in zip(model.named_parameters(), expected):
            torch.testing.assert_close(grads[name][i], e, rtol=1e-5, atol=1e-6)


def test_writes_into_grad_like_backward_and_skips_frozen_parameters():
    model = mlp(4)
    model[0].weight.requires_grad_(False)
    inputs, targets = torch.randn(8, 6), torch.randint(0, 3, (8,))
    result = per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, 0.2)
    assert "0.weight" not in result.grads
    norms = per_sample_clip_grad_(model, F.cross_entropy, inputs, targets, 0.2)
    assert model[0].weight.grad is None
    torch.testing.assert_close(norms, result.norms)
    torch.testing.assert_close(model[2].weight.grad, result.grads["2.weight"])
    per_sample_clip_grad_(model, F.cross_entropy, inputs, targets, 0.2)  # accumulates, as backward does
    torch.testing.assert_close(model[2].weight.grad, 2 * result.grads["2.weight"])


def test_a_non_finite_example_poisons_the_average_instead_of_vanishing():
    model = mlp(5)
    inputs = torch.randn(4, 6)
    inputs[2, 0] = float("nan")
    result = per_sample_clipped_grad(model, F.cross_entropy, inputs, torch.randint(0, 3, (4,)), 1.0)
    assert torch.isnan(result.norms[2]) and torch.isfinite(result.norms[[0, 1, 3]]).all()
    assert all(torch.isnan(g).any() for g in result.grads.values())


def test_bad_arguments_raise_naming_them():
    model = mlp()
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match="same batch size"):
        per_sample_clipped_grad(model, F.cross_entropy, x, y[:3], 1.0)
    with pytest.raises(ValueError, match="at least one example"):
        per_sample_clipped_grad(model, F.cross_entropy, x[:0], y[:0], 1.0)
    with pytest.raises(ValueError, match="max_norm"):
        per_sample_clipped_grad(model, F.cross_entropy, x, y, -1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        per_sample_clipped_grad(model, F.cross_entropy, x, y, 1.0, noise_multiplier=-0.1)
    with pytest.raises(ValueError, match="max_norm must be finite"):
        per_sample_clipped_grad(model, F.cross_entropy, x, y, float("inf"), noise_multiplier=1.0)
    with pytest.raises(TypeError, match="generator"):
        per_sample_clipped_grad(model, F.cross_entropy, x, y, 1.0, 1.0, generator=1)
    with pytest.raises(TypeError, match="model"):
        per_sample_clipped_grad(lambda t: t, F.cross_entropy, x, y, 1.0)
    with pytest.raises(TypeError, match="inputs"):
        per_sample_clipped_grad(model, F.cross_entropy, [1.0], y, 1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        per_sample_grads(model, F.cross_entropy, x, y, chunk_size=0)
    lazy = torch.nn.LazyLinear(3)
    with pytest.raises(ValueError, match="no data"):
        per_sample_grads(lazy, F.cross_entropy, x, y)
