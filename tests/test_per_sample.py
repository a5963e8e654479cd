"""DP-SGD per-sample clipping against a loop that clips one example's autograd gradient at a time."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from support.references import (fastdp_automatic_step, opacus_dp_step, opacus_per_layer_step, per_example_grads,
                                per_sample_clipped_mean)
from support.sync import no_host_sync

import gradclip._ghost as ghost_module
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


class Recurrent(torch.nn.Module):
    """An nn.RNN/LSTM/GRU and a linear head on its mean output and its last layer's final state.

    Inputs are (B, T, 3), examples along dim 0; a time-major layer (batch_first=False) gets them
    transposed. ``features_as_steps``: inputs (B, 3) are read as sequences of 3 steps of 1 feature.
    ``learned_state``: the initial hidden state is a trainable parameter.
    """

    def __init__(self, kind, features_as_steps=False, learned_state=False, seed=0, **kwargs):
        super().__init__()
        torch.manual_seed(seed)
        self.features_as_steps = features_as_steps
        self.rnn = getattr(torch.nn, kind)(1 if features_as_steps else 3, 4, **kwargs)
        directions = 2 if self.rnn.bidirectional else 1
        out_size = kwargs.get("proj_size") or 4
        self.state = torch.nn.Parameter(
            torch.randn(self.rnn.num_layers * directions, 1, out_size) * 0.5) if learned_state else None
        self.head = torch.nn.Linear(directions * out_size + out_size, 3)

    def forward(self, x):
        if self.features_as_steps:
            x = x.unsqueeze(-1)
        if not self.rnn.batch_first:
            x = x.transpose(0, 1)
        hx = None
        if self.state is not None:
            batch = x.shape[0 if self.rnn.batch_first else 1]
            hx = self.state.expand(-1, batch, -1).contiguous()
            if isinstance(self.rnn, torch.nn.LSTM):
                hx = (hx, torch.zeros(hx.shape[0], batch, self.rnn.hidden_size))
        out, state = self.rnn(x, hx)
        last = (state[0] if isinstance(state, tuple) else state)[-1]
        return self.head(torch.cat([out.mean(dim=1 if self.rnn.batch_first else 0), last], dim=1))


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


def test_writes_into_a_grad_buffer_as_backward_does():
    # with a GradBuffer the DP-SGD gradients land in its views (one kernel to clip them again), and a frozen
    # parameter keeps .grad None, as after loss.backward()
    import gradclip

    model = mlp(4)
    buffer = gradclip.GradBuffer(model.parameters())
    model[0].weight.requires_grad_(False)
    buffer.zero_grad()
    inputs, targets = torch.randn(8, 6), torch.randint(0, 3, (8,))
    result = per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, 0.2)
    per_sample_clip_grad_(model, F.cross_entropy, inputs, targets, 0.2)
    assert model[0].weight.grad is None and buffer.views_intact()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert gradclip._groups.single_buffer(grads) is not None
    for name, p in model.named_parameters():
        if name in result.grads:
            torch.testing.assert_close(p.grad, result.grads[name])


@pytest.mark.parametrize("method", ["ghost", "vmap"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("clipping,clipping_fn", [("flat", "abadi"), ("flat", "automatic"), ("per_layer", "abadi")])
def test_a_non_finite_example_poisons_the_average_instead_of_vanishing(method, bad, clipping, clipping_fn):
    model = mlp(5)
    inputs = torch.randn(4, 6)
    inputs[2, 0] = bad
    max_norm = [1.0] * 4 if clipping == "per_layer" else 1.0
    result = per_sample_clipped_grad(model, F.cross_entropy, inputs, torch.randint(0, 3, (4,)), max_norm, method=method,
                                     clipping=clipping, clipping_fn=clipping_fn)
    if clipping == "flat":
        assert not torch.isfinite(result.norms[2]) and torch.isfinite(result.norms[[0, 1, 3]]).all()
        assert all(torch.isnan(g).any() for g in result.grads.values())
        return
    # per layer: each parameter on its own; every parameter whose norm is not finite for example 2 is poisoned
    assert torch.isfinite(result.norms[[0, 1, 3]]).all() and not torch.isfinite(result.norms[2]).all()
    for k, (name, g) in enumerate(result.grads.items()):
        assert bool(torch.isnan(g).any()) == (not bool(torch.isfinite(result.norms[2, k])))


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


@pytest.mark.parametrize("steps,method,gram", [(3, "auto", True), (12, "ghost", False), (5, "auto", None)])
def test_ghost_norms_of_linear_layers_on_sequences_match_the_loop(monkeypatch, steps, method, gram):
    # Gram matrices, one bmm of per-example gradients, or as the cost model picks (here per-example gradients)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.LayerNorm(8, elementwise_affine=False),
                                torch.nn.Linear(8, 4), torch.nn.Flatten(), torch.nn.Linear(4 * steps, 3))
    inputs = torch.randn(9, steps, 6, generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 3, (9,), generator=torch.Generator().manual_seed(2))
    no_vmap(monkeypatch)
    choices = spy_gram(monkeypatch, gram)
    assert_matches_loop(model, F.cross_entropy, inputs, targets, 1.0, method=method)
    assert [c[3] for c in choices[:2]] == [bool(gram)] * 2


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


class MixesExamples(TwoLayers):
    def forward(self, x):
        hidden = torch.relu(self.hidden(x))
        return self.out(hidden - hidden.mean(dim=0))  # every example's output depends on the others


def test_auto_checks_a_custom_forward_once_and_ghost_takes_it_on_trust(monkeypatch):
    probes = []
    real_probe = ghost_module._probe
    monkeypatch.setattr(ghost_module, "_probe", lambda *args: probes.append(1) or real_probe(*args))
    model = TwoLayers()
    inputs, targets = torch.randn(7, 6), torch.randint(0, 3, (7,))
    calls = spy_vmap(monkeypatch)
    assert_matches_loop(model, F.cross_entropy, inputs, targets, 1.1)
    per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, 1.0)
    assert not calls and len(probes) == 1  # one check for the model, however many steps
    model.eval()  # another training mode: checked again
    assert_matches_loop(model, F.cross_entropy, inputs, targets, 1.1)
    assert not calls and len(probes) == 2
    assert_matches_loop(model, F.cross_entropy, inputs, targets, 1.1, method="ghost")
    assert not calls and len(probes) == 2
    # a forward that mixes the examples: the check fails, and "auto" computes each example's gradient alone
    mixing = MixesExamples()
    calls = spy_vmap(monkeypatch)
    result = per_sample_clipped_grad(mixing, F.cross_entropy, inputs, targets, 0.5)
    assert calls and len(probes) == 3
    expected, norms = reference_dp_gradient(mixing, F.cross_entropy, inputs, targets, 0.5)  # a loop: batches of one
    torch.testing.assert_close(result.norms.double(), torch.tensor(norms, dtype=torch.float64), rtol=1e-5, atol=1e-7)
    for (name, _), e in zip(mixing.named_parameters(), expected):
        torch.testing.assert_close(result.grads[name].double(), e, rtol=1e-5, atol=1e-6)


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
        "a trainable PReLU": (torch.nn.Sequential(
            torch.nn.Linear(3, 3), torch.nn.PReLU(), torch.nn.Linear(3, 3)), "belongs to a PReLU"),
        "a layer at two places": (torch.nn.Sequential(shared, torch.nn.Tanh(), shared), "two places"),
        "a layer called twice": (SameLayerTwice(), "2 times"),
        "tied weights": (tied, "shared"),
        "a softmax over the batch": (torch.nn.Sequential(
            torch.nn.Linear(3, 3), torch.nn.Dropout(0.0), torch.nn.Softmax(dim=0), torch.nn.Linear(3, 3)), "dim=0"),
        "an unbatched layer": (torch.nn.Sequential(torch.nn.Flatten(0), torch.nn.Linear(15, 3)), "start_dim"),
        "a trainable LSTM": (Recurrent("LSTM", features_as_steps=True), "belongs to a LSTM"),
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
    if case == "batch norm in training mode":  # the vmap path refuses it too, saying why (see per_sample_grads)
        with pytest.raises(ValueError, match="BatchNorm in training mode: .*batch statistics, which mix the examples"):
            per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, 1.0)
        assert calls
        return
    result = per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, 1.0)
    assert calls
    expected = per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, 1.0, method="vmap")
    torch.testing.assert_close(result.norms, expected.norms)


def test_dropout_in_training_mode_takes_the_ghost_path_with_the_masks_it_drew():
    # reference: a per-example loop through the same network with each example's drawn mask fixed
    torch.manual_seed(0)
    first, dropout, second = torch.nn.Linear(6, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3)
    model = torch.nn.Sequential(first, torch.nn.Tanh(), dropout, second).train()
    x, y = torch.randn(5, 6) * 3, torch.randint(0, 3, (5,))
    calls = []
    handle = dropout.register_forward_hook(lambda m, i, o: calls.append((i[0].detach(), o.detach())))
    result = per_sample_clipped_grad(model, F.cross_entropy, x, y, 0.5, method="ghost")
    handle.remove()
    assert len(calls) == 1  # one ordinary forward pass
    inputs, outputs = calls[0]
    masks = torch.where(inputs != 0, outputs / torch.where(inputs != 0, inputs, 1), 0)  # 0 or 1 / (1 - p)
    assert set(masks.unique().tolist()) <= {0.0, 2.0} and 0 < int((masks == 0).sum()) < masks.numel()
    expected = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(second(torch.tanh(first(x[i : i + 1])) * masks[i]), y[i : i + 1]).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        norm = float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads.values()])))
        for name in expected:
            expected[name] += grads[name] * min(1.0, 0.5 / (norm + 1e-6)) / len(x)
    for name in expected:
        torch.testing.assert_close(result.grads[name], expected[name], rtol=1e-5, atol=1e-7)
    auto = per_sample_clipped_grad(model, F.cross_entropy, x, y, 0.5)  # "auto" picks the ghost path too
    assert set(auto.grads) == set(expected)


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



# --- Parameters the loss does not reach: .grad stays None, no noise, on every path -----------------------------------

class WithUnusedLayers(torch.nn.Module):
    """``unused`` never runs; ``aux`` runs but its output does not reach the loss; ``zeroed`` reaches it times 0."""

    def __init__(self, zeroed=False):
        super().__init__()
        torch.manual_seed(0)
        self.hidden, self.unused, self.aux, self.out = (torch.nn.Linear(6, 16), torch.nn.Linear(16, 3),
                                                        torch.nn.Linear(16, 3), torch.nn.Linear(16, 3))
        self.zeroed = torch.nn.Linear(16, 3) if zeroed else None

    def forward(self, x):
        h = torch.relu(self.hidden(x))
        self.aux(h)  # computed, not used
        out = self.out(h)
        return out if self.zeroed is None else out + 0.0 * self.zeroed(h)


UNREACHED = ("unused.weight", "unused.bias", "aux.weight", "aux.bias")


def replayed_noise(model, names, seed, std, dtype=torch.float32):
    """The noise gradclip draws: one randn per parameter in ``names``, in named_parameters order, times std."""
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(p.shape, generator=generator, dtype=dtype) * std
            for name, p in model.named_parameters() if name in names}


def assert_matches_opacus(model, loss_fn, inputs, targets, max_norm, noise_multiplier, method, seed=7, **kwargs):
    """gradclip's step against opacus_dp_step on the per-example loop, noise replayed from the same seed."""
    samples = per_example_grads(model, loss_fn, inputs, targets)
    reached = [name for name, g in samples.items() if g is not None]
    noise = replayed_noise(model, reached, seed, noise_multiplier * max_norm)
    reduction = kwargs.get("loss_reduction", "mean")
    divisor = kwargs.get("expected_batch_size") or len(inputs)
    expected = opacus_dp_step([samples[name] for name in reached], max_norm, [noise[name] for name in reached],
                              divisor, reduction)
    result = per_sample_clipped_grad(model, loss_fn, inputs, targets, max_norm, noise_multiplier,
                                     torch.Generator().manual_seed(seed), method=method, **kwargs)
    assert list(result.grads) == reached
    for name, e in zip(reached, expected):
        torch.testing.assert_close(result.grads[name].double(), e, rtol=1e-5, atol=1e-6 * (1 + float(e.abs().max())))
    return result


@pytest.mark.parametrize("method", ["ghost", "vmap", "auto"])
@pytest.mark.parametrize("batch", [5, 0])
def test_a_parameter_the_loss_does_not_reach_keeps_grad_none_and_gets_no_noise(method, batch):
    model = WithUnusedLayers()
    inputs, targets = torch.randn(batch, 6), torch.randint(0, 3, (batch,))
    # a plain backward leaves exactly these gradients None
    F.cross_entropy(model(torch.randn(4, 6)), torch.randint(0, 3, (4,))).backward()
    assert sorted(n for n, p in model.named_parameters() if p.grad is None) == sorted(UNREACHED)
    model.zero_grad(set_to_none=True)
    result = assert_matches_opacus(model, F.cross_entropy, inputs, targets, 0.5, 1.3, method, expected_batch_size=4)
    assert not set(UNREACHED) & set(result.grads)
    generator = torch.Generator().manual_seed(7)
    per_sample_clip_grad_(model, F.cross_entropy, inputs, targets, 0.5, 1.3, generator, method=method,
                          expected_batch_size=4)
    # the noise of the reached parameters only: the generator moved by exactly their draws
    replay = torch.Generator().manual_seed(7)
    for name, p in model.named_parameters():
        if name not in UNREACHED:
            torch.randn(p.shape, generator=replay)
    assert torch.equal(generator.get_state(), replay.get_state())
    for name, p in model.named_parameters():
        assert (p.grad is None) == (name in UNREACHED), name
    # AdamW's weight decay (and its moments) leave a parameter without a gradient alone
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5).step()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) == (name in UNREACHED), name


@pytest.mark.parametrize("method", ["ghost", "vmap"])
def test_a_parameter_with_a_true_zero_gradient_is_clipped_and_noised(method):
    """Absence is structural: a reached parameter whose gradient is 0 still gets its noise."""
    model = WithUnusedLayers(zeroed=True)
    inputs, targets = torch.randn(6, 6), torch.randint(0, 3, (6,))
    result = assert_matches_opacus(model, F.cross_entropy, inputs, targets, 0.5, 1.1, method)
    assert "zeroed.weight" in result.grads and bool(result.grads["zeroed.weight"].abs().sum() > 0)
    quiet = per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, 0.5, method=method)
    assert torch.equal(quiet.grads["zeroed.weight"], torch.zeros(3, 16))


class UsesAnIdleLayersWeight(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.idle = torch.nn.Linear(6, 6), torch.nn.Linear(6, 3)

    def forward(self, x):
        return F.linear(torch.tanh(self.first(x)), self.idle.weight)  # the layer's weight without its forward


def test_ghost_refuses_a_parameter_that_reaches_the_loss_without_its_layer_running(monkeypatch):
    model = UsesAnIdleLayersWeight()
    inputs, targets = torch.randn(4, 6), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match="method='ghost' does not apply: .*did not run reaches the loss"):
        per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, 1.0, method="ghost")
    calls = spy_vmap(monkeypatch)  # auto does not take a custom forward on trust: vmap, right
    result = assert_matches_opacus(model, F.cross_entropy, inputs, targets, 0.3, 0.0, "auto")
    assert calls and set(result.grads) == {"first.weight", "first.bias", "idle.weight"}


class AlsoUsesALayersWeight(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.head = torch.nn.Linear(6, 6), torch.nn.Linear(6, 6)

    def forward(self, x):
        hidden = torch.tanh(self.first(x))
        return self.head(hidden) + F.linear(hidden, self.first.weight)  # tied: the first weight used twice


def test_a_weight_used_inside_and_outside_its_layer_is_refused_by_ghost_and_left_to_vmap(monkeypatch):
    # the layer's own gradient would miss the second use: ghost norms would be wrong, not just slow
    model = AlsoUsesALayersWeight()
    inputs, targets = torch.randn(5, 6), torch.randint(0, 6, (5,))
    with pytest.raises(ValueError, match="method='ghost' does not apply: first.weight of a Linear reaches the loss "
                                         "other than through the layer's own forward"):
        per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, 1.0, method="ghost")
    calls = spy_vmap(monkeypatch)
    assert_matches_loop(model, F.cross_entropy, inputs, targets, 0.0)
    assert calls


def test_the_vmap_path_with_unreached_parameters_never_syncs():
    model = WithUnusedLayers()
    with no_host_sync():
        for batch in (4, 0):
            per_sample_clipped_grad(model, F.cross_entropy, torch.randn(batch, 6), torch.randint(0, 3, (batch,)), 0.5,
                                    1.0, torch.Generator().manual_seed(0), method="vmap", expected_batch_size=4)


# --- Empty batches, expected_batch_size and loss_reduction against Opacus's formula -------------------------------

@pytest.mark.parametrize("method", ["ghost", "vmap", "auto"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_an_empty_batch_is_a_noise_only_step(method, reduction):
    model = mlp(3)
    inputs, targets = torch.randn(0, 6), torch.randint(0, 3, (0,))
    result = assert_matches_opacus(model, F.cross_entropy, inputs, targets, 0.7, 1.2, method,
                                   expected_batch_size=16, loss_reduction=reduction)
    assert result.norms.shape == (0,) and result.scales.shape == (0,)
    noise = replayed_noise(model, dict(model.named_parameters()), 7, 1.2 * 0.7)
    for name, g in result.grads.items():  # the noise alone, divided by the expected batch size for a mean
        torch.testing.assert_close(g, noise[name] / (16 if reduction == "mean" else 1))
    quiet = per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, 0.7, method=method,
                                    expected_batch_size=16, loss_reduction=reduction)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in quiet.grads.values())  # the sum of nothing
    model.zero_grad(set_to_none=True)
    norms = per_sample_clip_grad_(model, F.cross_entropy, inputs, targets, 0.7, 1.2, torch.Generator().manual_seed(7),
                                  method=method, expected_batch_size=16, loss_reduction=reduction)
    assert norms.shape == (0,)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, result.grads[name])


@pytest.mark.parametrize("method", ["ghost", "vmap", "auto"])
def test_an_empty_batch_with_a_mean_over_the_batch_size_would_divide_by_zero_and_raises(method):
    model = mlp()
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    with pytest.raises(ValueError, match="expected_batch_size.*at least one example|at least one example.*"
                                         "expected_batch_size"):
        per_sample_clip_grad_(model, F.cross_entropy, torch.randn(0, 6), torch.randint(0, 3, (0,)), 1.0, 1.0,
                              generator, method=method)
    assert torch.equal(generator.get_state(), state) and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_per_sample_grads_of_an_empty_batch_are_empty(chunk_size):
    model = cnn()
    grads = per_sample_grads(model, F.cross_entropy, torch.randn(0, 1, 6, 6), torch.randint(0, 3, (0,)), chunk_size)
    assert {name: g.shape for name, g in grads.items()} == {name: (0, *p.shape) for name, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["ghost", "vmap"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("expected_batch_size", [None, 20])
@pytest.mark.parametrize("noise_multiplier", [0.0, 1.3])
def test_expected_batch_size_and_loss_reduction_follow_opacus(method, reduction, expected_batch_size,
                                                              noise_multiplier):
    model = deep_mlp(2, seed=5)
    inputs = torch.randn(9, 6, generator=torch.Generator().manual_seed(1)) * 2
    targets = torch.randint(0, 3, (9,), generator=torch.Generator().manual_seed(2))
    _, unclipped = reference_dp_gradient(model, F.cross_entropy, inputs, targets, math.inf)
    max_norm = thresholds(unclipped)[0]  # some examples clipped, some not
    kwargs = dict(expected_batch_size=expected_batch_size, loss_reduction=reduction)
    result = assert_matches_opacus(model, F.cross_entropy, inputs, targets, max_norm, noise_multiplier, method,
                                   **kwargs)
    assert 0 < float((result.scales < 1).float().mean()) < 1
    # the same draws: the mean is exactly the sum divided by N
    other = per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, max_norm, noise_multiplier,
                                    torch.Generator().manual_seed(7), method=method,
                                    expected_batch_size=expected_batch_size,
                                    loss_reduction="sum" if reduction == "mean" else "mean")
    summed, mean = (result, other) if reduction == "sum" else (other, result)
    divisor = expected_batch_size or len(inputs)
    for name in result.grads:
        assert torch.equal(summed.grads[name] / divisor, mean.grads[name])
    if noise_multiplier == 0:  # no noise drawn: the generator is untouched and the result is the same without it
        generator = torch.Generator().manual_seed(3)
        state = generator.get_state()
        again = per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, max_norm, 0.0, generator,
                                        method=method, **kwargs)
        assert torch.equal(generator.get_state(), state)
        assert all(torch.equal(again.grads[name], result.grads[name]) for name in result.grads)


def test_loss_reduction_sum_ignores_expected_batch_size_as_opacus_does():
    model = mlp(2)
    inputs, targets = torch.randn(6, 6), torch.randint(0, 3, (6,))
    plain = per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, 0.5, loss_reduction="sum")
    ignored = per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, 0.5, loss_reduction="sum",
                                      expected_batch_size=100)
    assert all(torch.equal(plain.grads[n], ignored.grads[n]) for n in plain.grads)


@pytest.mark.parametrize("method", ["auto", "ghost", "vmap"])
def test_expected_batch_size_and_loss_reduction_are_checked_on_every_path(method):
    model = mlp()
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(ValueError, match="expected_batch_size"):
            per_sample_clipped_grad(model, F.cross_entropy, x, y, 1.0, method=method, expected_batch_size=bad)
    for bad in ("avg", None, "MEAN"):
        with pytest.raises(ValueError, match="loss_reduction"):
            per_sample_clip_grad_(model, F.cross_entropy, x, y, 1.0, method=method, loss_reduction=bad)
    assert all(p.grad is None for p in model.parameters())


# --- Clear errors: BatchNorm in training mode, chunk_size, on every path -----------------------------------------

def batch_norm_models():
    torch.manual_seed(0)
    untracked = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4, track_running_stats=False),
                                    torch.nn.Linear(4, 3)).eval()
    return {
        "training": torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3)),
        "frozen, training": torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4).requires_grad_(False),
                                                torch.nn.Linear(4, 3)),
        "deep inside a custom module, training": TwoLayersWithBatchNorm(),
        "eval, without running statistics": untracked,
    }


class TwoLayersWithBatchNorm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        self.out = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.relu(self.block(x)))


@pytest.mark.parametrize("case", list(batch_norm_models()))
@pytest.mark.parametrize("method", ["auto", "ghost", "vmap", "per_sample_grads", "per_sample_clip_grad_"])
def test_batch_norm_on_batch_statistics_raises_saying_batchnorm_and_why(case, method):
    model = batch_norm_models()[case]
    inputs, targets = torch.randn(5, 3), torch.randint(0, 3, (5,))
    running = [b.clone() for b in model.buffers()]
    with pytest.raises(ValueError) as error:
        if method == "per_sample_grads":
            per_sample_grads(model, F.cross_entropy, inputs, targets)
        elif method == "per_sample_clip_grad_":
            per_sample_clip_grad_(model, F.cross_entropy, inputs, targets, 1.0)
        else:
            per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, 1.0, method=method)
    message = str(error.value)
    for words in ("BatchNorm1d", "batch statistics", "mix the examples", "per-example gradients do not exist",
                  "GroupNorm or LayerNorm", "eval mode"):
        assert words in message, (words, message)
    assert all(torch.equal(b, r) for b, r in zip(model.buffers(), running))  # refused before any forward pass
    assert all(p.grad is None for p in model.parameters())


def test_batch_norm_in_eval_mode_is_per_example_on_both_paths(monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4, affine=False), torch.nn.Linear(4, 3))
    model(torch.randn(32, 3))  # running statistics
    model.eval()
    inputs, targets = torch.randn(6, 3), torch.randint(0, 3, (6,))
    for method in ("ghost", "vmap"):
        assert_matches_opacus(model, F.cross_entropy, inputs, targets, 0.4, 1.0, method)


@pytest.mark.parametrize("method", ["auto", "ghost", "vmap"])
@pytest.mark.parametrize("chunk_size", [-1, 0, -64, 2.0, True, "4"])
def test_a_bad_chunk_size_is_refused_on_every_path(method, chunk_size):
    model = mlp()  # eligible for ghost norms, which do not use chunk_size
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    with pytest.raises(ValueError, match=r"chunk_size must be None or an int >= 1"):
        per_sample_clipped_grad(model, F.cross_entropy, x, y, 1.0, 1.0, generator, chunk_size=chunk_size,
                                method=method)
    with pytest.raises(ValueError, match=r"chunk_size must be None or an int >= 1"):
        per_sample_clip_grad_(model, F.cross_entropy, x, y, 1.0, 1.0, generator, chunk_size=chunk_size, method=method)
    with pytest.raises(ValueError, match=r"chunk_size must be None or an int >= 1"):
        per_sample_grads(model, F.cross_entropy, x, y, chunk_size=chunk_size)
    assert torch.equal(generator.get_state(), state) and all(p.grad is None for p in model.parameters())
    assert per_sample_clipped_grad(model, F.cross_entropy, x, y, 1.0, chunk_size=3, method=method).norms.shape == (4,)


# --- Norms that neither overflow nor underflow, in every dtype, on both paths --------------------------------------

def ranged_case(dtype, magnitude, steps):
    """A ReLU network (no biases) whose per-example gradients have entries near ``magnitude`` (MSE towards 0)."""
    torch.manual_seed(0)
    if steps:
        model = torch.nn.Sequential(torch.nn.Linear(6, 8, bias=False), torch.nn.ReLU(), torch.nn.Flatten(),
                                    torch.nn.Linear(8 * steps, 3, bias=False))
        shape = (7, steps, 6)
    else:
        model = torch.nn.Sequential(torch.nn.Linear(6, 128, bias=False), torch.nn.ReLU(),
                                    torch.nn.Linear(128, 3, bias=False))
        shape = (7, 6)
    model = model.to(dtype)
    spread = torch.logspace(-0.5, 0.5, shape[0], dtype=torch.float64).reshape(-1, *[1] * (len(shape) - 1))
    inputs = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * spread
    return model, (inputs * math.sqrt(magnitude)).to(dtype), torch.zeros(shape[0], 3, dtype=dtype)


def exact_norms(samples):
    """Each example's norm over all its per-example gradients (float64), its largest entry factored out."""
    flat = torch.cat([g.reshape(len(g), -1) for g in samples], dim=1)
    largest = flat.abs().amax(dim=1, keepdim=True)
    largest = torch.where(largest > 0, largest, torch.ones_like(largest))
    return (flat / largest).norm(dim=1) * largest.squeeze(1)


RANGES = {  # dtype: (huge, tiny) gradient entries, each representable, whose squares are not (in the dtype)
    torch.float32: (1e20, 1e-25),
    torch.bfloat16: (1e20, 1e-25),
    torch.float16: (1e4, 1e-2),  # squares above float16's 65504, norms near it: float32 accumulation
    torch.float64: (1e160, 1e-170),
}


# ghost: 2-D inputs, and sequences by Gram matrices (steps 3, forced) or by a bmm; vmap: 2-D inputs and sequences
@pytest.mark.parametrize("method,steps", [("ghost", 0), ("ghost", 3), ("ghost", 12), ("vmap", 0), ("vmap", 12)])
@pytest.mark.parametrize("dtype", list(RANGES), ids=str)
@pytest.mark.parametrize("size", ["huge", "tiny"])
@pytest.mark.parametrize("host", [True, False], ids=["cpu-checks", "no-host-read"])
def test_norms_and_factors_neither_overflow_nor_underflow(monkeypatch, method, steps, dtype, size, host):
    spy_gram(monkeypatch, force=steps == 3)
    magnitude = RANGES[dtype][0 if size == "huge" else 1]
    model, inputs, targets = ranged_case(dtype, magnitude, steps)
    samples = per_example_grads(model, F.mse_loss, inputs, targets)
    assert all(torch.isfinite(g).all() for g in samples.values())
    largest = max(float(g.abs().max()) for g in samples.values())
    assert magnitude / 100 < largest < magnitude * 100  # the entries are as large (or small) as meant
    norms = exact_norms(list(samples.values()))
    if dtype == torch.float16 and size == "huge":
        assert float(norms.max()) > 3e4
    # the median clips half; for norms far below the 1e-6 guard, every factor is about 1/2
    guarded = float(norms.max()) < 1e-8
    max_norm = 5e-7 if guarded else float(norms.median())
    factors = (max_norm / (norms + 1e-6)).clamp(max=1)
    expected = [torch.einsum("i,i...", factors, g) / len(inputs) for g in samples.values()]
    with contextlib.nullcontext() if host else no_host_sync():
        result = per_sample_clipped_grad(model, F.mse_loss, inputs, targets, max_norm, method=method)
    tolerance = {torch.float16: 2e-2, torch.bfloat16: 5e-2}.get(dtype, 1e-5)
    torch.testing.assert_close(result.norms.double(), norms, rtol=tolerance, atol=0)
    torch.testing.assert_close(result.scales.double(), factors, rtol=tolerance, atol=0)
    assert bool((result.scales > 0).all())
    if not guarded:
        assert 0 < int((result.scales < 1).sum()) < len(inputs)
    for name, e in zip(samples, expected):
        scale = float(e.abs().max())
        assert scale > 0 and bool(result.grads[name].abs().max() > 0)
        torch.testing.assert_close(result.grads[name].double() / scale, e / scale, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("method", ["ghost", "vmap"])
def test_a_factor_too_small_for_float32_does_not_zero_the_gradient_on_the_cpu(method):
    model, inputs, targets = ranged_case(torch.float32, 1e20, 0)
    samples = per_example_grads(model, F.mse_loss, inputs, targets)
    max_norm = 1e-30  # factors near 1e-51: zero in float32
    expected = opacus_dp_step(list(samples.values()), max_norm, [torch.zeros(()) for _ in samples], len(inputs), "sum")
    result = per_sample_clipped_grad(model, F.mse_loss, inputs, targets, max_norm, method=method, loss_reduction="sum")
    assert bool((result.scales == 0).all())  # reported in float32, where they are 0 ...
    for name, e in zip(samples, expected):  # ... but applied in float64: the gradient is not zeroed
        scale = float(e.abs().max())
        assert 0 < scale < 1e-28
        torch.testing.assert_close(result.grads[name].double() / scale, e / scale, rtol=1e-4, atol=1e-4)


def test_the_vmap_path_reads_the_parameters_reached_from_the_graph_without_another_pass(monkeypatch):
    """Only when a parameter is missing from the graph of ``grad`` does autograd get asked again (one example)."""
    calls = []
    real = per_sample_module._reached

    def spy(*args):
        calls.append(1)
        return real(*args)
    monkeypatch.setattr(per_sample_module, "_reached", spy)
    model = cnn()
    inputs, targets = torch.randn(4, 1, 6, 6), torch.randint(0, 3, (4,))
    result = per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, 1.0, chunk_size=3)
    assert not calls and list(result.grads) == [name for name, _ in model.named_parameters()]
    result = per_sample_clipped_grad(WithUnusedLayers(), F.cross_entropy, torch.randn(4, 6),
                                     torch.randint(0, 3, (4,)), 1.0, method="vmap")
    assert calls and not set(UNREACHED) & set(result.grads)


# --- Ghost norms of nn.Conv2d (unfolded inputs; Bu et al. 2023's per-layer "mixed" choice) -------------------------

def conv_net(conv_kwargs, c_in=2, c_out=5, size=9, seed=0, bias=True):
    """Conv2d(**conv_kwargs) -> ReLU -> MaxPool -> Conv2d 1x1 -> AvgPool -> Flatten -> Linear, for inputs (c_in, size, size)."""
    torch.manual_seed(seed)
    features = torch.nn.Sequential(
        torch.nn.Conv2d(c_in, c_out, bias=bias, **conv_kwargs), torch.nn.ReLU(), torch.nn.MaxPool2d(2, ceil_mode=True),
        torch.nn.Conv2d(c_out, 3, 1), torch.nn.AvgPool2d(1), torch.nn.Flatten())
    width = features(torch.zeros(1, c_in, size, size)).shape[1]
    return torch.nn.Sequential(*features, torch.nn.Linear(width, 3))


CONVS = {
    "k3": dict(kernel_size=3),
    "k3 stride 2 padding 1": dict(kernel_size=3, stride=2, padding=1),
    "k(2,3) dilation 2 padding (1,2)": dict(kernel_size=(2, 3), dilation=2, padding=(1, 2)),
    "k4 padding same": dict(kernel_size=4, padding="same"),
    "k3 valid stride (1,2)": dict(kernel_size=3, padding="valid", stride=(1, 2)),
    "k5 stride 3 dilation (1,2)": dict(kernel_size=5, stride=3, dilation=(1, 2), padding=2),
    "k1": dict(kernel_size=1),
}


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("conv", list(CONVS))
@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("noise_multiplier", [0.0, 1.1])
@pytest.mark.parametrize("bias", [True, False])
def test_ghost_norms_of_conv2d_match_the_per_example_loop(monkeypatch, conv, batch, noise_multiplier, bias):
    model = conv_net(CONVS[conv], bias=bias, seed=batch)
    generator = torch.Generator().manual_seed(batch)
    inputs = torch.randn(batch, 2, 9, 9, generator=generator)
    targets = torch.randint(0, 3, (batch,), generator=generator)
    no_vmap(monkeypatch)  # "auto" picks ghost norms for Conv2d + Linear
    assert_matches_loop(model, F.cross_entropy, inputs, targets, noise_multiplier)


def spy_gram(monkeypatch, force=None):
    """Record (T, d, p, gram) for each layer on sequences/convolutions; ``force`` overrides the choice."""
    choices = []
    real = ghost_module._use_gram

    def spy(steps, d, p, *more):
        choice = real(steps, d, p, *more) if force is None else force
        choices.append((steps, d, p, choice))
        return choice
    monkeypatch.setattr(ghost_module, "_use_gram", spy)
    return choices


@pytest.mark.parametrize("force", [None, True, False], ids=["by-cost", "gram", "direct"])
@pytest.mark.parametrize("case", ["few positions, many channels", "many positions, few channels"])
def test_conv2d_ghost_norms_by_gram_matrices_and_by_per_example_gradients(monkeypatch, force, case):
    if case == "few positions, many channels":  # L = 4 positions, d = 32 * 9, p = 64: Gram matrices
        model, shape = conv_net(dict(kernel_size=3, stride=2), c_in=32, c_out=64, size=5), (7, 32, 5, 5)
    else:  # L = 64 positions, d = 1 * 9, p = 2: per-example gradients
        model, shape = conv_net(dict(kernel_size=3), c_in=1, c_out=2, size=10), (7, 1, 10, 10)
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randn(shape, generator=generator) * 2
    targets = torch.randint(0, 3, (7,), generator=generator)
    no_vmap(monkeypatch)
    choices = spy_gram(monkeypatch, force)
    assert_matches_loop(model, F.cross_entropy, inputs, targets, 0.0)
    first = choices[0]  # the first Conv2d
    assert first[3] == (force if force is not None else case.startswith("few"))
    if force is None:
        assert first[:3] == ((4, 288, 64) if case.startswith("few") else (64, 9, 2))


@pytest.mark.parametrize("method", ["ghost", "auto"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_an_empty_batch_through_conv2d_ghost_norms_is_a_noise_only_step(monkeypatch, method, reduction):
    model = conv_net(CONVS["k3 stride 2 padding 1"])
    inputs, targets = torch.randn(0, 2, 9, 9), torch.randint(0, 3, (0,))
    no_vmap(monkeypatch)
    result = per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, 0.7, 1.2, torch.Generator().manual_seed(7),
                                     method=method, expected_batch_size=16, loss_reduction=reduction)
    assert result.norms.shape == (0,) and result.scales.shape == (0,)
    noise = replayed_noise(model, dict(model.named_parameters()), 7, 1.2 * 0.7)
    assert list(result.grads) == [name for name, _ in model.named_parameters()]
    for name, g in result.grads.items():
        torch.testing.assert_close(g, noise[name] / (16 if reduction == "mean" else 1))
    quiet = per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, 0.7, method=method,
                                    expected_batch_size=16, loss_reduction=reduction)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in quiet.grads.values())


def benchmark_cnn():
    """The DP-SGD CNN with 3x3 padded convolutions of benchmarks/dp_zoo.py (2 conv + linear on 1x28x28)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32 * 7 * 7, 10))


def test_auto_picks_ghost_norms_for_the_benchmark_cnn(monkeypatch):
    model = benchmark_cnn()
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(6, 1, 28, 28, generator=generator)
    targets = torch.randint(0, 10, (6,), generator=generator)
    no_vmap(monkeypatch)
    choices = spy_gram(monkeypatch)
    assert_matches_loop(model, F.cross_entropy, inputs, targets, 1.1)
    assert [c[3] for c in choices[:2]] == [False, False]  # both convolutions: L^2 > d p, per-example gradients


@pytest.mark.parametrize("case,reason", [
    ("groups", "groups=2: ghost norms of grouped convolutions are not implemented"),
    ("reflect", "padding_mode='reflect': ghost norms need zero padding"),
])
def test_conv2d_ghost_refuses_groups_and_non_zero_padding_and_auto_falls_back(monkeypatch, case, reason):
    torch.manual_seed(0)
    conv = (torch.nn.Conv2d(4, 4, 3, groups=2) if case == "groups"
            else torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    model = torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(3))
    inputs, targets = torch.randn(5, 4, 6, 6), torch.randint(0, 3, (5,))
    model(inputs)
    with pytest.raises(ValueError, match=f"method='ghost' does not apply: .*{reason}"):
        per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, 1.0, method="ghost")
    calls = spy_vmap(monkeypatch)
    result = per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, 1.0)
    assert calls
    expected, norms = reference_dp_gradient(model, F.cross_entropy, inputs, targets, 1.0)
    torch.testing.assert_close(result.norms.double(), torch.tensor(norms, dtype=torch.float64), rtol=1e-5, atol=1e-7)
    for (name, _), e in zip(model.named_parameters(), expected):
        torch.testing.assert_close(result.grads[name].double(), e, rtol=1e-5, atol=1e-6)


def test_a_frozen_grouped_convolution_before_a_trainable_one_keeps_ghost_norms(monkeypatch):
    model = conv_net(CONVS["k3"], c_in=4, size=8)
    model.insert(0, torch.nn.Conv2d(4, 4, 3, padding=1, groups=4).requires_grad_(False))
    inputs, targets = torch.randn(6, 4, 8, 8), torch.randint(0, 3, (6,))
    no_vmap(monkeypatch)
    assert_matches_loop(model, F.cross_entropy, inputs, targets, 0.0)


@pytest.mark.parametrize("force", [True, False], ids=["gram", "direct"])
def test_the_conv2d_ghost_path_never_syncs(monkeypatch, force):
    model = conv_net(CONVS["k3 stride 2 padding 1"])
    inputs, targets = torch.randn(7, 2, 9, 9), torch.randint(0, 3, (7,))
    spy_gram(monkeypatch, force)
    with no_host_sync():
        per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, 0.5, 1.0, torch.Generator().manual_seed(0))
        per_sample_clip_grad_(model, F.cross_entropy, inputs, targets, 0.5, method="ghost")


@pytest.mark.parametrize("force", [True, False], ids=["gram", "direct"])
@pytest.mark.parametrize("size", ["huge", "tiny"])
@pytest.mark.parametrize("host", [True, False], ids=["cpu-checks", "no-host-read"])
def test_conv2d_ghost_norms_neither_overflow_nor_underflow(monkeypatch, force, size, host):
    torch.manual_seed(0)
    magnitude = RANGES[torch.float32][0 if size == "huge" else 1]
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, bias=False), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 3 * 3, 3, bias=False))
    spread = torch.logspace(-0.5, 0.5, 7, dtype=torch.float64).reshape(-1, 1, 1, 1)
    inputs = (torch.randn(7, 2, 5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * spread
              * math.sqrt(magnitude)).float()
    targets = torch.zeros(7, 3)
    samples = per_example_grads(model, F.mse_loss, inputs, targets)
    assert all(torch.isfinite(g).all() for g in samples.values())
    norms = exact_norms(list(samples.values()))
    max_norm = 5e-7 if size == "tiny" else float(norms.median())  # (tiny norms: every factor about 1/2)
    factors = (max_norm / (norms + 1e-6)).clamp(max=1)
    expected = [torch.einsum("i,i...", factors, g) / len(inputs) for g in samples.values()]
    spy_gram(monkeypatch, force)
    with contextlib.nullcontext() if host else no_host_sync():
        result = per_sample_clipped_grad(model, F.mse_loss, inputs, targets, max_norm, method="ghost")
    torch.testing.assert_close(result.norms.double(), norms, rtol=1e-5, atol=0)
    for name, e in zip(samples, expected):
        scale = float(e.abs().max())
        torch.testing.assert_close(result.grads[name].double() / scale, e / scale, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["auto", "vmap"])
def test_a_loss_without_reduction_gets_an_error_that_says_to_reduce(method):
    nn = torch.nn
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar .* got \(1,\).*not reduction='none'"):
        per_sample_clip_grad_(model, nn.CrossEntropyLoss(reduction="none"), x, y, 1.0, 0.0, method=method)


def test_dropout_on_the_vmap_path_gets_an_error_that_says_what_to_do():
    nn = torch.nn
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.PReLU(), nn.Linear(8, 3))  # PReLU: vmap path
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    with pytest.raises(RuntimeError, match=r"dropout in training mode.*model\.eval\(\)"):
        per_sample_clip_grad_(model, F.cross_entropy, x, y, 1.0, 0.0)
    model.eval()  # the advice works
    per_sample_clip_grad_(model, F.cross_entropy, x, y, 1.0, 0.0)


@pytest.mark.parametrize("method", ["auto", "ghost", "vmap"])
def test_an_empty_batch_is_noise_alone_for_a_cnn_on_every_method(method):
    # Poisson sampling draws empty batches; the ghost path used to fail reshaping 0 examples of a conv layer
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(2, 8, affine=False), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    x, y = torch.randn(0, 1, 14, 14), torch.zeros(0, dtype=torch.long)
    noiseless = per_sample_clipped_grad(model, F.cross_entropy, x, y, 1.0, method=method, expected_batch_size=64)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in noiseless.grads.values()) and noiseless.norms.numel() == 0
    noisy = per_sample_clipped_grad(model, F.cross_entropy, x, y, 1.0, noise_multiplier=1.0, method=method,
                                    expected_batch_size=64, generator=torch.Generator().manual_seed(3))
    everything = torch.cat([g.reshape(-1) for g in noisy.grads.values()])
    assert abs(float(everything.std()) - 1.0 / 64) < 0.1 / 64  # N(0, (sigma C / N)^2)
    assert set(noisy.grads) == {name for name, _ in model.named_parameters()}


# --- recurrent layers (nn.RNN, nn.LSTM, nn.GRU) and embeddings on the vmap path -------------------------------

RECURRENT = {
    "one layer, batch_first": dict(batch_first=True),
    "two layers, time-major": dict(num_layers=2),
    "bidirectional": dict(bidirectional=True, batch_first=True),
    "two bidirectional layers, no bias": dict(num_layers=2, bidirectional=True, bias=False),
    "learned initial state": dict(batch_first=True, learned_state=True),
}
EXTRA = {"RNN": dict(nonlinearity="relu"), "LSTM": dict(proj_size=2), "GRU": dict(num_layers=3)}


@pytest.mark.parametrize("config", list(RECURRENT) + ["layer-specific"])
@pytest.mark.parametrize("kind", ["RNN", "LSTM", "GRU"])
def test_recurrent_layers_match_the_per_example_loop(kind, config):
    kwargs = EXTRA[kind] if config == "layer-specific" else RECURRENT[config]
    model = Recurrent(kind, **kwargs)
    generator = torch.Generator().manual_seed(1)
    inputs, targets = torch.randn(6, 5, 3, generator=generator) * 2, torch.randint(0, 3, (6,), generator=generator)
    assert_matches_loop(model, F.cross_entropy, inputs, targets, 1.1)
    assert model.rnn.forward.__func__ is type(model.rnn).forward  # the module's own forward is back


@pytest.mark.parametrize("method", ["auto", "ghost"])
def test_a_frozen_gru_before_a_trainable_head_takes_the_hook_path(monkeypatch, method):
    # auto does not know the GRU, so it checks once that the model keeps the examples apart (the GRU unrolled
    # under vmap); ghost takes it on trust; the batched forward pass runs torch's fused kernel
    model = Recurrent("GRU", num_layers=2, batch_first=True)
    model.rnn.requires_grad_(False)
    inputs, targets = torch.randn(6, 5, 3), torch.randint(0, 3, (6,))
    calls = spy_vmap(monkeypatch)
    assert_matches_loop(model, F.cross_entropy, inputs, targets, 1.1, method=method)
    assert not calls


def test_a_text_model_embedding_lstm_linear_matches_the_loop_and_takes_vmap(monkeypatch):
    class Text(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = torch.nn.Embedding(20, 5)
            self.lstm = torch.nn.LSTM(5, 6, batch_first=True, num_layers=2, dropout=0.3)
            self.head = torch.nn.Linear(6, 2)

        def forward(self, tokens):
            out, _ = self.lstm(self.embed(tokens))
            return self.head(out[:, -1])

    model = Text().eval()  # (dropout between the layers only in training mode, which vmap refuses: see below)
    tokens, labels = torch.randint(0, 20, (7, 9)), torch.randint(0, 2, (7,))
    calls = spy_vmap(monkeypatch)
    assert_matches_loop(model, F.cross_entropy, tokens, labels, 1.1)
    assert calls
    model.train()
    with pytest.raises(RuntimeError, match=r"dropout in training mode.*model\.eval\(\)"):
        per_sample_clipped_grad(model, F.cross_entropy, tokens, labels, 1.0)


def test_recurrent_per_sample_grads_are_each_examples_gradient_and_an_empty_batch_is_noise_alone():
    model = Recurrent("GRU", num_layers=2, bidirectional=True)
    inputs, targets = torch.randn(4, 5, 3), torch.randint(0, 3, (4,))
    samples = per_sample_grads(model, F.cross_entropy, inputs, targets, chunk_size=3)
    expected = per_example_grads(model, F.cross_entropy, inputs, targets)
    for name, g in samples.items():
        torch.testing.assert_close(g.double(), expected[name], rtol=1e-5, atol=1e-6)
    empty = per_sample_clipped_grad(model, F.cross_entropy, inputs[:0], targets[:0], 1.0, noise_multiplier=1.0,
                                    expected_batch_size=4, generator=torch.Generator().manual_seed(0))
    assert set(empty.grads) == {name for name, _ in model.named_parameters()} and empty.norms.numel() == 0


class PackedGRU(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.head = torch.nn.GRU(3, 4, batch_first=True), torch.nn.Linear(4, 2)

    def forward(self, x):
        lengths = (x.abs().sum(-1) > 0).sum(1)  # padding is all zeros
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        return self.head(self.rnn(packed)[1][-1])


def test_a_packed_sequence_gets_an_error_that_says_what_to_do():
    x, y = torch.randn(5, 4, 3), torch.randint(0, 2, (5,))
    x[1, 2:] = 0
    for method in ("auto", "vmap"):
        with pytest.raises(TypeError, match=r"GRU .*PackedSequence.*padded batch.*last valid step"):
            per_sample_clip_grad_(PackedGRU(), F.cross_entropy, x, y, 1.0, method=method)


@pytest.mark.parametrize("kind", ["Embedding", "EmbeddingBag"])
@pytest.mark.parametrize("call", ["auto", "vmap", "per_sample_grads", "per_sample_clip_grad_"])
def test_a_sparse_embedding_gets_the_type_error_that_says_what_to_do(kind, call):
    embed = getattr(torch.nn, kind)(10, 3, sparse=True)
    model = torch.nn.Sequential(embed, torch.nn.Flatten(), torch.nn.LazyLinear(2)) if kind == "Embedding" else \
        torch.nn.Sequential(embed, torch.nn.Linear(3, 2))
    x, y = torch.randint(0, 10, (4, 3)), torch.randint(0, 2, (4,))
    model(x)  # (materialises the lazy layer)
    calls = {
        "auto": lambda: per_sample_clipped_grad(model, F.cross_entropy, x, y, 1.0),
        "vmap": lambda: per_sample_clipped_grad(model, F.cross_entropy, x, y, 1.0, method="vmap"),
        "per_sample_grads": lambda: per_sample_grads(model, F.cross_entropy, x, y),
        "per_sample_clip_grad_": lambda: per_sample_clip_grad_(model, F.cross_entropy, x, y, 1.0),
    }
    with pytest.raises(TypeError, match=rf"'0' \({kind}\) has sparse=True.*sparse=False"):
        calls[call]()
    embed.weight.requires_grad_(False)  # a frozen sparse embedding has no gradient: nothing to refuse
    calls[call]()


@pytest.mark.parametrize("kind", ["Embedding", "EmbeddingBag"])
def test_an_embedding_with_max_norm_matches_the_loop_and_renormalises_as_it(kind):
    import copy

    torch.manual_seed(0)
    embed = getattr(torch.nn, kind)(12, 4, max_norm=1.0)
    with torch.no_grad():
        embed.weight.mul_(3)  # most rows above max_norm
    model = torch.nn.Sequential(embed, torch.nn.Flatten(), torch.nn.Linear(12, 3)) if kind == "Embedding" else \
        torch.nn.Sequential(embed, torch.nn.Linear(4, 3))
    tokens, labels = torch.randint(0, 8, (6, 3)), torch.randint(0, 3, (6,))  # rows 8-11 are never looked up
    looped = copy.deepcopy(model)
    expected, norms = reference_dp_gradient(looped, F.cross_entropy, tokens, labels, 0.5)  # renorms as it goes
    result = per_sample_clipped_grad(model, F.cross_entropy, tokens, labels, 0.5, method="vmap")
    assert embed.max_norm == 1.0  # restored
    torch.testing.assert_close(embed.weight, looped[0].weight)  # the same rows renormalised, once
    assert torch.all(embed.weight[8:].norm(dim=1) > 1.0)
    torch.testing.assert_close(result.norms.double(), torch.tensor(norms, dtype=torch.float64), rtol=1e-5, atol=1e-7)
    for (name, _), e in zip(model.named_parameters(), expected):
        torch.testing.assert_close(result.grads[name].double(), e, rtol=1e-5, atol=1e-6)


def unrolled_cases():
    for kind in ("RNN", "LSTM", "GRU"):
        for layers, bidirectional, batch_first, bias in [(1, False, True, True), (2, True, False, False),
                                                          (2, False, False, True), (1, True, True, False)]:
            extra = {"RNN": {"nonlinearity": "relu"}, "LSTM": {"proj_size": 3}, "GRU": {}}[kind] if layers == 2 else {}
            for batched in (True, False):
                yield kind, dict(num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias,
                                 **extra), batched


@pytest.mark.parametrize("kind,kwargs,batched", list(unrolled_cases()))
def test_the_unrolled_layers_give_torchs_outputs_and_gradients(kind, kwargs, batched):
    # float64, one ordinary backward pass each: the unrolled recurrence (with its tapped weights) against torch's kernel
    from gradclip import _recurrent

    torch.manual_seed(0)
    layer = getattr(torch.nn, kind)(3, 5, **kwargs).double()
    directions = 2 if kwargs["bidirectional"] else 1
    out_size = kwargs.get("proj_size") or 5
    x = torch.randn(*((4, 6, 3) if kwargs["batch_first"] else (6, 4, 3)) if batched else (6, 3), dtype=torch.float64)
    state_shape = (kwargs["num_layers"] * directions, *((4,) if batched else ()))
    h0 = torch.randn(*state_shape, out_size, dtype=torch.float64)
    hx = (h0, torch.randn(*state_shape, 5, dtype=torch.float64)) if kind == "LSTM" else h0
    results = []
    for run in (layer, lambda *args: _recurrent.forward(layer, *args)):
        inputs = [x.clone().requires_grad_()] + [t.clone().requires_grad_() for t in (hx if kind == "LSTM" else [hx])]
        out, state = run(inputs[0], tuple(inputs[1:]) if kind == "LSTM" else inputs[1])
        states = list(state) if kind == "LSTM" else [state]
        loss = (out.sin() * 3).sum() + sum((s.cos() * 2).sum() for s in states)
        grads = torch.autograd.grad(loss, [*layer.parameters(), *inputs])
        results.append([out, *states, *grads])
    for ours, theirs in zip(results[1], results[0]):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_recurrent_layers_and_renormalised_embeddings_never_sync():
    class Text(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = torch.nn.Embedding(20, 5, max_norm=1.0)
            self.gru = torch.nn.GRU(5, 6, batch_first=True, bidirectional=True)
            self.head = torch.nn.Linear(12, 2)

        def forward(self, tokens):
            return self.head(self.gru(self.embed(tokens))[0][:, -1])

    with no_host_sync():
        per_sample_clipped_grad(Text(), F.cross_entropy, torch.randint(0, 20, (4, 7)), torch.randint(0, 2, (4,)), 0.5,
                                1.0, torch.Generator().manual_seed(0), method="vmap")


# --- Ghost norms of nn.Embedding, nn.LayerNorm, nn.RMSNorm and nn.GroupNorm (issue 27 item 4) ---------------------

class Pooled(torch.nn.Module):
    """An embedding, then the mean over every position but the batch's, then a linear head (token ids of any shape)."""

    def __init__(self, embed):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = embed, torch.nn.Linear(embed.embedding_dim, 3)

    def forward(self, ids):
        vectors = self.embed(ids)
        return self.head(vectors.reshape(len(ids), -1, vectors.shape[-1]).mean(dim=1))


def embedding_rows(max_norm=None, padding_idx=None):
    torch.manual_seed(1)
    embed = torch.nn.Embedding(7, 4, max_norm=max_norm, padding_idx=padding_idx)
    with torch.no_grad():
        embed.weight.mul_(3)  # (rows above max_norm)
    return embed


def normalisation_models():
    nn = torch.nn
    torch.manual_seed(0)
    frozen_weight = nn.LayerNorm(6)
    frozen_weight.weight.requires_grad_(False)
    return {
        # (model, input shape or "ids" shape with a vocabulary of 7)
        "embedding, tokens repeated in an example": (Pooled(embedding_rows()), ("ids", 9, 6)),
        "embedding, padding_idx and max_norm": (Pooled(embedding_rows(max_norm=1.5, padding_idx=0)), ("ids", 9, 6)),
        "embedding, one token per example": (Pooled(embedding_rows()), ("ids", 9)),
        "embedding, ids of shape (B, 2, 3)": (Pooled(embedding_rows(padding_idx=6)), ("ids", 9, 2, 3)),
        "embedding, then a linear layer on the sequence": (nn.Sequential(
            embedding_rows(), nn.Linear(4, 5), nn.Tanh(), nn.Flatten(), nn.Linear(5 * 6, 3)), ("ids", 9, 6)),
        "layer norm on sequences": (nn.Sequential(
            nn.Linear(4, 6), nn.LayerNorm(6), nn.GELU(), nn.Flatten(), nn.Linear(5 * 6, 3)), (9, 5, 4)),
        "layer norm over two dims, no bias": (nn.Sequential(
            nn.Linear(4, 6), nn.LayerNorm((5, 6), bias=False), nn.Flatten(), nn.Linear(5 * 6, 3)), (9, 5, 4)),
        "layer norm with its weight frozen": (nn.Sequential(nn.Linear(4, 6), frozen_weight, nn.Linear(6, 3)), (9, 4)),
        "rms norm": (nn.Sequential(nn.Linear(4, 6), nn.RMSNorm(6), nn.Flatten(), nn.Linear(5 * 6, 3)), (9, 5, 4)),
        "group norm after a convolution": (nn.Sequential(
            nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 3)), (9, 2, 5, 5)),
        "group norm on (B, C)": (nn.Sequential(nn.Linear(4, 8), nn.GroupNorm(4, 8), nn.Linear(8, 3)), (9, 4)),
    }


def batch_for(shape, seed=1):
    generator = torch.Generator().manual_seed(seed)
    if shape[0] == "ids":
        inputs = torch.randint(0, 7, shape[1:], generator=generator)
    else:
        inputs = torch.randn(shape, generator=generator) * 2
    return inputs, torch.randint(0, 3, (inputs.shape[0],), generator=generator)


@pytest.mark.parametrize("case", list(normalisation_models()))
def test_ghost_norms_of_embeddings_and_normalisation_layers_match_the_loop(monkeypatch, case):
    model, shape = normalisation_models()[case]
    inputs, targets = batch_for(shape)
    no_vmap(monkeypatch)  # "auto" takes the hook path
    assert_matches_loop(model, F.cross_entropy, inputs, targets, 1.1)


def test_embedding_ghost_norms_count_a_repeated_token_once_per_example(monkeypatch):
    # example 0 repeats one token: its gradient is one row, the sum of the two positions' gradients, not two rows
    model = Pooled(embedding_rows())
    ids, targets = torch.tensor([[2, 2], [2, 3], [5, 5]]), torch.tensor([0, 1, 2])
    samples = per_example_grads(model, F.cross_entropy, ids, targets)
    no_vmap(monkeypatch)
    result = per_sample_clipped_grad(model, F.cross_entropy, ids, targets, 1e9)
    torch.testing.assert_close(result.norms.double(), exact_norms(list(samples.values())), rtol=1e-6, atol=0)
    assert int((samples["embed.weight"][0].abs().sum(1) > 0).sum()) == 1


@pytest.mark.parametrize("case", ["embedding, padding_idx and max_norm", "group norm after a convolution",
                                  "layer norm on sequences"])
def test_the_hook_path_of_the_new_layers_never_syncs(case):
    model, shape = normalisation_models()[case]
    inputs, targets = batch_for(shape)
    model(inputs)  # (max_norm renormalises the rows in the first forward, as in training)
    with no_host_sync():
        per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, 0.5, 1.0, torch.Generator().manual_seed(0),
                                method="ghost")


@pytest.mark.parametrize("method", ["auto", "ghost"])
def test_an_embedding_scaled_by_frequency_mixes_the_batch_and_is_left_to_vmap(monkeypatch, method):
    model = Pooled(torch.nn.Embedding(7, 4, scale_grad_by_freq=True))
    inputs, targets = batch_for(("ids", 6, 5))
    if method == "ghost":
        with pytest.raises(ValueError, match="scale_grad_by_freq=True: .*mixes the examples"):
            per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, 1.0, method=method)
        return
    calls = spy_vmap(monkeypatch)
    assert_matches_loop(model, F.cross_entropy, inputs, targets, 0.0)  # the loop counts each example's own tokens
    assert calls


# --- Automatic clipping (AUTO-S) and per-layer thresholds -----------------------------------------------------------

def replayed(model, names, seed, std):
    return [replayed_noise(model, names, seed, std)[name] for name in names]


# (for these Sequential models "ghost" runs the same code as "auto": the hook path)
@pytest.mark.parametrize("method,case,gamma", [
    (method, case, 0.01) for method in ("auto", "vmap")
    for case in ("mlp", "embedding, then a linear layer on the sequence", "group norm after a convolution")
] + [("auto", "mlp", 0.5)])
def test_automatic_clipping_matches_fastdps_rule(method, case, gamma):
    model, shape = (mlp(), (10, 6)) if case == "mlp" else normalisation_models()[case]
    inputs, targets = batch_for(shape)
    samples = per_example_grads(model, F.cross_entropy, inputs, targets)
    names = list(samples)
    max_norm, sigma = 0.7, 1.3
    expected, norms, factors = fastdp_automatic_step([samples[n] for n in names], max_norm,
                                                     replayed(model, names, 4, sigma * max_norm), len(inputs), gamma)
    result = per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, max_norm, sigma,
                                     torch.Generator().manual_seed(4), method=method, clipping_fn="automatic",
                                     gamma=gamma)
    torch.testing.assert_close(result.norms.double(), norms, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(result.scales.double(), factors, rtol=1e-5, atol=1e-7)
    assert bool((result.scales * result.norms < max_norm).all())  # every example's contribution below C, none clipped
    for name, e in zip(names, expected):
        torch.testing.assert_close(result.grads[name].double(), e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["auto", "vmap"])
@pytest.mark.parametrize("clipping_fn", ["abadi", "automatic"])
@pytest.mark.parametrize("case", ["mlp", "layer norm on sequences", "embedding, padding_idx and max_norm"])
def test_per_layer_thresholds_match_opacus_per_layer_optimizer(method, clipping_fn, case):
    model, shape = (mlp(), (10, 6)) if case == "mlp" else normalisation_models()[case]
    inputs, targets = batch_for(shape)
    model(inputs)  # (renormalises max_norm rows first, so that every path sees the same weights)
    samples = per_example_grads(model, F.cross_entropy, inputs, targets)
    names = list(samples)
    own = [float(samples[n].reshape(len(inputs), -1).norm(dim=1).median()) for n in names]  # some clipped, some not
    sigma = 0.8
    std = sigma * math.sqrt(sum(c * c for c in own))
    noise = replayed(model, names, 5, std)
    if clipping_fn == "abadi":
        expected, norms, factors = opacus_per_layer_step([samples[n] for n in names], own, noise, 16, "mean")
    else:
        expected, norms, factors = fastdp_automatic_step([samples[n] for n in names], None, noise, len(inputs),
                                                         per_layer_norms=own)
        expected = [e * len(inputs) / 16 for e in expected]  # (divided by expected_batch_size, as Opacus)
    result = per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, own, sigma,
                                     torch.Generator().manual_seed(5), method=method, expected_batch_size=16,
                                     clipping="per_layer", clipping_fn=clipping_fn)
    assert result.norms.shape == result.scales.shape == (len(inputs), len(names))
    torch.testing.assert_close(result.norms.double(), norms, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(result.scales.double(), factors, rtol=1e-5, atol=1e-7)
    if clipping_fn == "abadi":
        assert 0 < float((result.scales < 1).double().mean()) < 1
    for name, e in zip(names, expected):
        torch.testing.assert_close(result.grads[name].double(), e, rtol=1e-5, atol=1e-6)
    by_name = per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, dict(zip(names, own)), sigma,
                                      torch.Generator().manual_seed(5), method=method, expected_batch_size=16,
                                      clipping="per_layer", clipping_fn=clipping_fn)
    assert all(torch.equal(by_name.grads[name], result.grads[name]) for name in names)


def test_per_layer_and_automatic_clipping_never_sync():
    model, shape = normalisation_models()["group norm after a convolution"]
    inputs, targets = batch_for(shape)
    thresholds = [0.5] * len(list(model.parameters()))
    with no_host_sync():
        for method in ("ghost", "vmap"):
            per_sample_clip_grad_(model, F.cross_entropy, inputs, targets, thresholds, 1.0,
                                  torch.Generator().manual_seed(0), method=method, clipping="per_layer")
            per_sample_clip_grad_(model, F.cross_entropy, inputs, targets, 0.5, 1.0, torch.Generator().manual_seed(0),
                                  method=method, clipping_fn="automatic")


def test_clipping_arguments_are_checked_naming_them():
    model = mlp()
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    cases = [
        (dict(max_norm=[1.0] * 4), TypeError, "max_norm is a list: one threshold per parameter is clipping='per_layer'"),
        (dict(max_norm=1.0, clipping="per_layer"), TypeError, r"one threshold per trainable parameter.*4 numbers"),
        (dict(max_norm=[1.0] * 3, clipping="per_layer"), ValueError, "got 3 thresholds"),
        (dict(max_norm={"0.weight": 1.0}, clipping="per_layer"), ValueError, r"without \['0.bias', '2.bias'"),
        (dict(max_norm=[1.0, -1.0, 1.0, 1.0], clipping="per_layer"), ValueError, r"max_norm\['0.bias'\] must be"),
        (dict(max_norm=[1.0, float("inf"), 1.0, 1.0], clipping="per_layer", noise_multiplier=1.0), ValueError,
         r"max_norm\['0.bias'\] must be finite when noise_multiplier > 0"),
        (dict(max_norm=1.0, clipping="layer"), ValueError, "clipping must be one of 'flat', 'per_layer'"),
        (dict(max_norm=1.0, clipping_fn="auto-s"), ValueError, "clipping_fn must be one of 'abadi', 'automatic'"),
        (dict(max_norm=1.0, clipping_fn="automatic", gamma=0.0), ValueError, r"gamma must be in \(0.0, inf\)"),
        (dict(max_norm=float("inf"), clipping_fn="automatic"), ValueError, "max_norm must be finite with "
                                                                           "clipping_fn='automatic'"),
    ]
    for kwargs, error, message in cases:
        max_norm = kwargs.pop("max_norm")
        with pytest.raises(error, match=message):
            per_sample_clipped_grad(model, F.cross_entropy, x, y, max_norm, **kwargs)


# --- Against Opacus 1.6 itself, where it is installed (CI does not install it; references above always run) -------

def opacus_step(model, optimizer_class, inputs, targets, sigma, max_grad_norm, seed):
    """One step of Opacus's GradSampleModule and ``optimizer_class`` (no update): the noised, averaged gradients."""
    import copy

    opacus = pytest.importorskip("opacus", minversion="1.6")
    twin = copy.deepcopy(model)
    gsm = opacus.GradSampleModule(twin, loss_reduction="mean")
    optimizer = optimizer_class(torch.optim.SGD(gsm.parameters(), lr=0.1), noise_multiplier=sigma,
                                max_grad_norm=max_grad_norm, expected_batch_size=len(inputs),
                                generator=torch.Generator().manual_seed(seed))
    F.cross_entropy(gsm(inputs), targets).backward()
    optimizer.pre_step()
    return {name: p.grad for name, p in twin.named_parameters()}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", ["embedding, then a linear layer on the sequence", "layer norm on sequences",
                                  "group norm after a convolution"])
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_the_same_step_as_opacus(case, clipping):
    pytest.importorskip("opacus", minversion="1.6")
    from opacus.optimizers import DPOptimizer, DPPerLayerOptimizer

    model, shape = normalisation_models()[case]
    inputs, targets = batch_for(shape)
    count = len(list(model.parameters()))
    max_norm = [0.05 * (k + 1) for k in range(count)] if clipping == "per_layer" else 0.1
    optimizer_class = DPPerLayerOptimizer if clipping == "per_layer" else DPOptimizer
    theirs = opacus_step(model, optimizer_class, inputs, targets, 0.9, max_norm, seed=11)
    ours = per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, max_norm, 0.9,
                                   torch.Generator().manual_seed(11), clipping=clipping)
    assert list(ours.grads) == list(theirs)
    for name, g in ours.grads.items():  # the same noise draws: equal to float32 rounding
        torch.testing.assert_close(g, theirs[name], rtol=1e-4, atol=1e-6)


def loss_cases():
    nn = torch.nn
    generator = torch.Generator().manual_seed(0)
    logits, images = torch.randn(6, 5, generator=generator), torch.randn(6, 5, 3, 2, generator=generator)
    classes = torch.randint(0, 5, (6,), generator=generator)
    pixels = torch.randint(0, 5, (6, 3, 2), generator=generator)
    pixels[0] = -100  # every target of example 0 ignored (its mean over no targets is NaN), one of example 1
    pixels[1, 0, 0] = -100
    ignored = classes.clone()
    ignored[2] = 7
    probabilities = torch.softmax(torch.randn(6, 5, generator=generator), dim=1)
    values = torch.randn(6, 5, generator=generator)
    return {
        "F.cross_entropy": (F.cross_entropy, logits, classes),
        "F.cross_entropy, pixels with ignored ones": (F.cross_entropy, images, pixels),
        "F.cross_entropy, probabilities": (F.cross_entropy, logits, probabilities),
        "CrossEntropyLoss, label smoothing, ignore_index": (nn.CrossEntropyLoss(ignore_index=7, label_smoothing=0.1),
                                                            logits, ignored),
        "CrossEntropyLoss on pixels, label smoothing": (nn.CrossEntropyLoss(label_smoothing=0.2), images, pixels),
        "F.nll_loss": (F.nll_loss, torch.log_softmax(images, 1), pixels),
        "F.mse_loss": (F.mse_loss, logits, values),
        "MSELoss on (B,)": (nn.MSELoss(), values[:, 0], values[:, 1]),
        "L1Loss": (nn.L1Loss(), logits, values),
        "BCEWithLogitsLoss": (nn.BCEWithLogitsLoss(), logits, probabilities),
        "class weights (vmap)": (nn.CrossEntropyLoss(weight=torch.rand(5, generator=generator)), logits, classes),
        "reduction sum (vmap)": (nn.MSELoss(reduction="sum"), logits, values),
        "a subclass (vmap)": (type("Mine", (nn.MSELoss,), {})(), logits, values),
    }


@pytest.mark.parametrize("case", list(loss_cases()))
def test_per_example_losses_of_torchs_losses_equal_vmap_over_batches_of_one(monkeypatch, case):
    loss_fn, output, targets = loss_cases()[case]
    expected = torch.stack([loss_fn(output[i:i + 1], targets[i:i + 1]) for i in range(len(output))])
    vmapped = []
    real_vmap = ghost_module.vmap
    monkeypatch.setattr(ghost_module, "vmap", lambda fn: vmapped.append(1) or real_vmap(fn))
    losses = ghost_module.per_example_losses(loss_fn, output, targets)
    torch.testing.assert_close(losses, expected, equal_nan=True)
    assert bool(vmapped) == case.endswith("(vmap)")
    if case.startswith("F.cross_entropy, pixels"):
        assert torch.isnan(losses[0]) and not torch.isnan(losses[1:]).any()


@pytest.mark.parametrize("method", ["ghost", "vmap"])
@pytest.mark.parametrize("clipping,clipping_fn", [("flat", "automatic"), ("per_layer", "abadi"),
                                                  ("per_layer", "automatic")])
@pytest.mark.parametrize("size", ["huge", "tiny"])
@pytest.mark.parametrize("host", [True, False], ids=["cpu-checks", "no-host-read"])
def test_automatic_and_per_layer_factors_neither_overflow_nor_underflow(method, clipping, clipping_fn, size, host):
    magnitude = RANGES[torch.float32][0 if size == "huge" else 1]
    model, inputs, targets = ranged_case(torch.float32, magnitude, 0)
    samples = per_example_grads(model, F.mse_loss, inputs, targets)
    names = list(samples)
    own = [exact_norms([samples[n]]) for n in names]
    # thresholds near the norms (factors about 1/2), except that automatic clipping of tiny gradients divides by
    # about gamma: there C = 1 keeps the clipped gradients representable (C times the norm would underflow)
    automatic_tiny = clipping_fn == "automatic" and size == "tiny"
    if clipping == "flat":
        norms = exact_norms(list(samples.values()))
        max_norm = 1.0 if automatic_tiny else float(norms.median())
        factors = [max_norm / (norms + 0.01)] * len(names)
    else:
        # (tiny norms under Abadi's rule: C = 5e-7 against the 1e-6 guard makes every factor about 1/2)
        max_norm = [1.0 if automatic_tiny else 5e-7 if size == "tiny" else float(norm.median()) for norm in own]
        norms = torch.stack(own, dim=1)
        factors = [(c / (norm + (0.01 if clipping_fn == "automatic" else 1e-6))) for c, norm in zip(max_norm, own)]
        factors = factors if clipping_fn == "automatic" else [f.clamp(max=1) for f in factors]
    expected = [torch.einsum("i,i...", f, samples[n]) / len(inputs) for f, n in zip(factors, names)]
    with contextlib.nullcontext() if host else no_host_sync():
        result = per_sample_clipped_grad(model, F.mse_loss, inputs, targets, max_norm, method=method, clipping=clipping,
                                         clipping_fn=clipping_fn)
    torch.testing.assert_close(result.norms.double(), norms, rtol=1e-5, atol=0)
    for name, e in zip(names, expected):
        scale = float(e.abs().max())
        torch.testing.assert_close(result.grads[name].double() / scale, e / scale, rtol=1e-5, atol=1e-5)


def test_a_custom_model_is_checked_once_then_never_syncs():
    model = AlsoUsesALayersWeight()
    model.forward = lambda x: model.head(torch.tanh(model.first(x)))  # (a custom forward the check must run)
    inputs, targets = torch.randn(5, 6), torch.randint(0, 6, (5,))
    per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, 1.0)  # the one check reads a value on the host
    with no_host_sync():
        per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, 1.0, 1.0, torch.Generator().manual_seed(0))


def test_per_layer_leaves_out_unreached_parameters_and_noises_with_every_threshold():
    # Opacus's noise std is noise_multiplier * ||max_grad_norm||_2 over the whole list; a parameter the loss does
    # not reach has no gradient and no noise here (Opacus refuses the step), its threshold still in that norm
    model = WithUnusedLayers()
    inputs, targets = torch.randn(5, 6), torch.randint(0, 3, (5,))
    names = [name for name, _ in model.named_parameters()]
    thresholds = {name: 0.1 * (k + 1) for k, name in enumerate(names)}
    reached = [name for name in names if name not in UNREACHED]
    std = 0.7 * math.sqrt(sum(c * c for c in thresholds.values()))
    samples = per_example_grads(model, F.cross_entropy, inputs, targets)
    expected, _, _ = opacus_per_layer_step([samples[n] for n in reached], [thresholds[n] for n in reached],
                                           replayed(model, reached, 9, std), 5, "mean")
    result = per_sample_clipped_grad(model, F.cross_entropy, inputs, targets, thresholds, 0.7,
                                     torch.Generator().manual_seed(9), clipping="per_layer")
    assert list(result.grads) == reached and result.norms.shape == (5, len(reached))
    for name, e in zip(reached, expected):
        torch.testing.assert_close(result.grads[name].double(), e, rtol=1e-5, atol=1e-6)


def test_the_per_layer_choice_follows_the_cost_model_and_the_reference_rule_off_the_cpu():
    # the CPU's fitted costs (see gradclip._ghost._use_gram): Gram matrices for few positions and wide layers
    assert ghost_module._use_gram(4, 256, 256) and ghost_module._use_gram(16, 1024, 1024)
    assert not ghost_module._use_gram(64, 256, 256) and not ghost_module._use_gram(196, 144, 32)
    assert not ghost_module._use_gram(4, 64, 64)  # a small layer: the per-example path's fewer operations win
    # elsewhere fastDP's MixOpt rule, 2 T^2 <= d p
    assert ghost_module._use_gram(64, 256, 256, on_cpu=False) and not ghost_module._use_gram(200, 256, 256, False)
    # per-example gradients out of the cache (above 32 MiB for the layer) cost more per entry
    assert not ghost_module._use_gram(64, 1152, 128, True, 16, 4) and ghost_module._use_gram(64, 1152, 128, True, 64, 4)
    # per-example gradients above 256 MiB give way to Gram matrices that take less memory
    assert ghost_module._gram_instead(64, 128, 1024, 1024, 4, True)
    assert not ghost_module._gram_instead(64, 2048, 1024, 1024, 4, True)


def dp_zoo():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "dp_zoo.py"
    spec = importlib.util.spec_from_file_location("dp_zoo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ZOO


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", [name for name in dp_zoo() if name != "Embedding + LSTM"])
def test_auto_takes_the_hook_path_on_the_benchmarked_zoo_and_matches_the_loop(monkeypatch, name):
    # the ResNet block and the transformer have their own forward: auto checks them once, then trusts them
    make, make_batch, _ = dp_zoo()[name]
    torch.manual_seed(0)
    model = make()
    inputs, targets = make_batch(4, torch.Generator().manual_seed(1))
    no_vmap(monkeypatch)
    assert_matches_loop(model, F.cross_entropy, inputs, targets, 1.0)
