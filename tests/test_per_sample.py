"""DP-SGD per-sample clipping against a loop that clips one example's autograd gradient at a time."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from support.references import per_sample_clipped_mean
from support.sync import no_host_sync

import gradclip.per_sample as per_sample_module
from gradclip.per_sample import per_sample_clip_grad_, per_sample_clipped_grad, per_sample_grads


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def cnn(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3)
    )


def reference_dp_gradient(*args, **kwargs):
    """The reference's averaged DP-SGD gradient, with the per-example norms as floats."""
    grads, norms = per_sample_clipped_mean(*args, **kwargs)
    return grads, [float(norm) for norm in norms]


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
@given(batch=st.integers(1, 9), max_norm=st.floats(0.01, 5.0), seed=st.integers(0, 2**10),
       method=st.sampled_from(["auto", "ghost", "vmap"]))
def test_matches_the_loop_on_random_batches(batch, max_norm, seed, method):
    model = mlp(seed)
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch, 6, generator=generator) * 3
    targets = torch.randint(0, 3, (batch,), generator=generator)
    expected, _ = reference_dp_gradient(model, F.cross_entropy, inputs, targets, max_norm)
    result = per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, max_norm, method=method)
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


@pytest.mark.parametrize("method", ["ghost", "vmap"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_example_poisons_the_average_instead_of_vanishing(method, bad):
    model = mlp(5)
    inputs = torch.randn(4, 6)
    inputs[2, 0] = bad
    result = per_sample_clipped_grad(model, F.cross_entropy, inputs, torch.randint(0, 3, (4,)), 1.0, method=method)
    assert not torch.isfinite(result.norms[2]) and torch.isfinite(result.norms[[0, 1, 3]]).all()
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
    with pytest.raises(ValueError, match="method"):
        per_sample_clipped_grad(model, F.cross_entropy, x, y, 1.0, method="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        per_sample_grads(model, F.cross_entropy, x, y, chunk_size=0)
    lazy = torch.nn.LazyLinear(3)
    with pytest.raises(ValueError, match="no data"):
        per_sample_grads(lazy, F.cross_entropy, x, y)


# --- The ghost-norm path (Goodfellow 2015; Li et al. 2022) against the same loop ------------------------------------

def deep_mlp(depth, bias=True, seed=0, widths=(6, 16, 8, 5)):
    """``depth`` Linear layers, 6 -> ... -> 3, with Tanh between them."""
    torch.manual_seed(seed)
    sizes = list(widths[:depth]) + [3]
    layers = []
    for i in range(depth):
        layers += [torch.nn.Linear(sizes[i], sizes[i + 1], bias=bias), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1])


def no_vmap(monkeypatch):
    """Make the vmap path fail, to show that ``method="auto"`` took the ghost path."""
    def fail(*args, **kwargs):
        raise AssertionError("the vmap path ran")
    monkeypatch.setattr(per_sample_module, "per_sample_grads", fail)


def spy_vmap(monkeypatch):
    calls = []
    real = per_sample_module.per_sample_grads

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(per_sample_module, "per_sample_grads", spy)
    return calls


def thresholds(norms):
    """max_norm values that clip some examples and not others (both ways for a batch of one)."""
    ordered = sorted(norms)
    if len(ordered) == 1:
        return [ordered[0] / 2, ordered[0] * 2]
    middle = len(ordered) // 2
    return [(ordered[middle - 1] + ordered[middle]) / 2]


def assert_matches_loop(model, loss_fn, inputs, targets, noise_multiplier, method="auto", some_clipped=True):
    _, unclipped = reference_dp_gradient(model, loss_fn, inputs, targets, math.inf)
    for max_norm in thresholds(unclipped):
        expected, norms = reference_dp_gradient(model, loss_fn, inputs, targets, max_norm, noise_multiplier,
                                                torch.Generator().manual_seed(3))
        result = per_sample_clipped_grad(model, loss_fn, inputs, targets, max_norm, noise_multiplier,
                                         torch.Generator().manual_seed(3), method=method)
        norms = torch.tensor(norms, dtype=torch.float64)
        factors = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
        if some_clipped and len(inputs) > 1:
            assert 0 < float((factors < 1).double().mean()) < 1
        torch.testing.assert_close(result.norms.double(), norms, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(result.scales.double(), factors, rtol=1e-5, atol=1e-7)
        names = [name for name, p in model.named_parameters() if p.requires_grad]
        assert list(result.grads) == names
        for name, e in zip(names, expected):
            torch.testing.assert_close(result.grads[name].double(), e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize("depth", [1, 2, 4])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("noise_multiplier", [0.0, 1.1])
def test_ghost_norms_match_the_per_example_loop(monkeypatch, batch, depth, bias, loss, noise_multiplier):
    model = deep_mlp(depth, bias, seed=depth + batch)
    generator = torch.Generator().manual_seed(batch)
    inputs = torch.randn(batch, 6, generator=generator) * 2
    if loss == "mse":
        loss_fn, targets = F.mse_loss, torch.randn(batch, 3, generator=generator)
    else:
        loss_fn, targets = F.cross_entropy, torch.randint(0, 3, (batch,), generator=generator)
    no_vmap(monkeypatch)  # "auto" picks ghost norms for an MLP
    assert_matches_loop(model, loss_fn, inputs, targets, noise_multiplier)


@pytest.mark.parametrize("steps,method", [(3, "auto"), (12, "ghost")])  # T^2 <= d p: Gram matrices; else one bmm
def test_ghost_norms_of_linear_layers_on_sequences_match_the_loop(monkeypatch, steps, method):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.LayerNorm(8, elementwise_affine=False),
                                torch.nn.Linear(8, 4), torch.nn.Flatten(), torch.nn.Linear(4 * steps, 3))
    inputs = torch.randn(9, steps, 6, generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 3, (9,), generator=torch.Generator().manual_seed(2))
    no_vmap(monkeypatch)
    assert_matches_loop(model, F.cross_entropy, inputs, targets, 1.0, method=method)


def test_ghost_norms_with_a_frozen_backbone_in_place_activations_and_frozen_parameters(monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.ReLU(inplace=True), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(16, 8), torch.nn.ReLU(inplace=True),
        torch.nn.Linear(8, 3))
    model[0].requires_grad_(False)
    model[1].requires_grad_(False)
    model[6].bias.requires_grad_(False)
    model[8].weight.requires_grad_(False)
    model.eval()
    inputs = torch.randn(10, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 3, (10,), generator=torch.Generator().manual_seed(2))
    no_vmap(monkeypatch)
    assert_matches_loop(model, F.cross_entropy, inputs, targets, 1.1)


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.hidden, self.out = torch.nn.Linear(6, 16), torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.out(torch.relu(self.hidden(x)))


def test_auto_leaves_a_custom_forward_to_vmap_and_ghost_takes_it_on_trust(monkeypatch):
    model = TwoLayers()
    inputs, targets = torch.randn(7, 6), torch.randint(0, 3, (7,))
    calls = spy_vmap(monkeypatch)
    assert_matches_loop(model, F.cross_entropy, inputs, targets, 1.1)
    assert calls
    calls.clear()
    assert_matches_loop(model, F.cross_entropy, inputs, targets, 1.1, method="ghost")
    assert not calls


class SameLayerTwice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.layer(torch.tanh(self.layer(x)))


def ineligible_models():
    torch.manual_seed(0)
    shared = torch.nn.Linear(3, 3)
    tied = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(), torch.nn.Linear(3, 3))
    tied[2].weight = tied[0].weight
    return {
        "batch norm in training mode": (torch.nn.Sequential(
            torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4, affine=False), torch.nn.Linear(4, 3)), "batch statistics"),
        "a trainable convolution": (torch.nn.Sequential(
            torch.nn.Conv1d(1, 1, 1), torch.nn.Flatten(), torch.nn.Linear(3, 3)), "Conv1d"),
        "a trainable layer norm": (torch.nn.Sequential(
            torch.nn.Linear(3, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 3)), "LayerNorm"),
        "a layer at two places": (torch.nn.Sequential(shared, torch.nn.Tanh(), shared), "two places"),
        "a layer called twice": (SameLayerTwice(), "2 times"),
        "tied weights": (tied, "shared"),
        "a softmax over the batch": (torch.nn.Sequential(
            torch.nn.Linear(3, 3), torch.nn.Dropout(0.0), torch.nn.Softmax(dim=0), torch.nn.Linear(3, 3)), "dim=0"),
        "an unbatched layer": (torch.nn.Sequential(torch.nn.Flatten(0), torch.nn.Linear(15, 3)), "start_dim"),
    }


@pytest.mark.parametrize("case", list(ineligible_models()))
def test_ghost_refuses_what_its_identity_does_not_fit_and_auto_falls_back(monkeypatch, case):
    model, reason = ineligible_models()[case]
    inputs = torch.randn(5, 1, 3) if case == "a trainable convolution" else torch.randn(5, 3)
    targets = torch.randint(0, 3, (5,))
    with pytest.raises(ValueError, match=f"method='ghost' does not apply: .*{reason}"):
        per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, 1.0, method="ghost")
    if case == "an unbatched layer":
        return  # no per-example gradient on either path
    calls = spy_vmap(monkeypatch)
    if case == "batch norm in training mode":  # the vmap path refuses it too (see per_sample_grads)
        with pytest.raises(RuntimeError, match="mutate a captured Tensor"):
            per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, 1.0)
        assert calls
        return
    result = per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, 1.0)
    assert calls
    expected = per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, 1.0, method="vmap")
    torch.testing.assert_close(result.norms, expected.norms)


def test_dropout_in_training_mode_is_refused_before_it_draws():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5), torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="training mode"):
        per_sample_clipped_grad(model, F.cross_entropy, torch.randn(4, 3), torch.randint(0, 3, (4,)), 1.0,
                                method="ghost")


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("shape", [(8, 6), (8, 4, 6)])
def test_the_ghost_path_never_syncs(loss, shape):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(16 * (shape[1] if len(shape) == 3 else 1), 3))
    inputs = torch.randn(shape)
    targets = torch.randint(0, 3, (8,)) if loss == "cross_entropy" else torch.randn(8, 3)
    loss_fn = F.cross_entropy if loss == "cross_entropy" else F.mse_loss
    with no_host_sync():
        per_sample_clipped_grad(model, loss_fn, inputs, targets, 0.5, 1.0, torch.Generator().manual_seed(0))
        per_sample_clip_grad_(model, loss_fn, inputs, targets, 0.5, method="ghost")


def test_ghost_norms_run_under_no_grad_and_write_into_grad(monkeypatch):
    model = deep_mlp(2)
    inputs, targets = torch.randn(6, 6), torch.randint(0, 3, (6,))
    expected = per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, 0.3, method="vmap")
    no_vmap(monkeypatch)
    with torch.no_grad():
        norms = per_sample_clip_grad_(model, F.cross_entropy, inputs, targets, 0.3)
    torch.testing.assert_close(norms, expected.norms)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected.grads[name])
