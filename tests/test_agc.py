"""Adaptive gradient clipping against timm's formula and a per-unit loop, its invariants, units and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.params import LargestTemporary, clone_params, make_params
from support.references import agc_unitwise, agc_unitwise_along, timm_adaptive_clip_grad
from support.strategies import seeds, shape_lists
from support.sync import no_host_sync

from gradclip.agc import UnitSpec, adaptive_clip_grad_, agc_parameters, agc_unit_dims


@settings(max_examples=40, deadline=None)
@given(
    shapes=shape_lists(max_ndim=4),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    clip_factor=st.sampled_from([0.0, 0.01, 0.1, 0.5, 2.0]),
    eps=st.sampled_from([1e-3, 1e-1, 1.0]),
    norm_type=st.sampled_from([1.0, 2.0, 3.0, math.inf]),
    grad_scale=st.sampled_from([1e-3, 0.1, 1.0, 10.0]),
    foreach=st.sampled_from([None, True, False]),
    seed=seeds(),
)
def test_agc_matches_timm_and_the_paper(shapes, dtype, clip_factor, eps, norm_type, grad_scale, foreach, seed):
    ours = make_params(shapes, dtype, seed, grad_scale)
    timm = clone_params(ours)
    before = clone_params(ours)
    adaptive_clip_grad_(ours, clip_factor, eps, norm_type, foreach=foreach)
    timm_adaptive_clip_grad(timm, clip_factor, eps, norm_type)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-14)
    for p, q, b in zip(ours, timm, before):
        torch.testing.assert_close(p.grad, q.grad, **tol)
        expected = agc_unitwise(b, b.grad, clip_factor, eps, norm_type).to(dtype)
        torch.testing.assert_close(p.grad, expected, **tol)


@settings(max_examples=30, deadline=None)
@given(shapes=shape_lists(max_ndim=4), clip_factor=st.sampled_from([0.01, 0.1, 1.0]),
       grad_scale=st.sampled_from([1e-2, 1.0, 100.0]), seed=seeds())
def test_agc_invariants_norm_never_grows_direction_kept_idempotent(shapes, clip_factor, grad_scale, seed):
    params = make_params(shapes, torch.float64, seed, grad_scale)
    before = [p.grad.clone() for p in params]
    adaptive_clip_grad_(params, clip_factor)
    once = [p.grad.clone() for p in params]
    for p, g0, g1 in zip(params, before, once):
        rows0 = g0.reshape(g0.shape[0], -1) if g0.ndim > 1 else g0.reshape(1, -1)
        rows1 = g1.reshape(rows0.shape)
        limit = clip_factor * torch.clamp(
            (p.detach().reshape(rows0.shape)).norm(dim=1), min=1e-3)
        assert torch.all(rows1.norm(dim=1) <= rows0.norm(dim=1) * (1 + 1e-12))  # never grows
        assert torch.all(rows1.norm(dim=1) <= torch.maximum(limit * (1 + 1e-9), rows0.norm(dim=1) * (rows0.norm(dim=1) < limit)))
        # direction: every unit is a non-negative multiple of what it was
        factor = (rows1 * rows0).sum(dim=1) / (rows0 * rows0).sum(dim=1).clamp(min=1e-300)
        torch.testing.assert_close(rows1, factor[:, None] * rows0, rtol=1e-9, atol=1e-15)
        assert torch.all((factor >= 0) & (factor <= 1 + 1e-12))
    adaptive_clip_grad_(params, clip_factor)
    for p, g1 in zip(params, once):
        torch.testing.assert_close(p.grad, g1, rtol=1e-9, atol=1e-15)  # idempotent


def test_agc_is_an_exact_no_op_below_the_threshold():
    params = make_params([(8, 5), (8,), (4, 3, 3, 3)], seed=1, grad_scale=1e-4)
    before = [p.grad.clone() for p in params]
    fraction = adaptive_clip_grad_(params, clip_factor=0.5)
    assert float(fraction) == 0.0
    for p, g in zip(params, before):
        assert torch.equal(p.grad, g)


def test_agc_orientation_on_a_known_matrix():
    # Linear(2 -> 3): weight (out=3, in=2). Units are rows (output features), not columns.
    weight = torch.tensor([[3.0, 4.0], [0.0, 2.0], [6.0, 8.0]])
    grad = torch.tensor([[0.3, 0.4], [0.3, 0.4], [0.06, 0.08]])
    w = torch.nn.Parameter(weight.clone())
    w.grad = grad.clone()
    fraction = adaptive_clip_grad_([w], clip_factor=0.05, eps=1e-3)
    # row norms of W: 5, 2, 10 -> limits 0.25, 0.1, 0.5; grad row norms 0.5, 0.5, 0.1
    expected = torch.tensor([[0.15, 0.20], [0.06, 0.08], [0.06, 0.08]])
    torch.testing.assert_close(w.grad, expected)
    torch.testing.assert_close(fraction, torch.tensor(2 / 3))
    # Per input column (the ConvTranspose / optax-layout mistake) gives another answer.
    col_limits = 0.05 * weight.norm(dim=0)
    columnwise = grad * torch.clamp(col_limits / grad.norm(dim=0), max=1.0)
    assert not torch.allclose(w.grad, columnwise, atol=1e-3)


def test_agc_return_value_counts_clipped_units():
    params = make_params([(6, 4), (6,), (3, 2, 2)], torch.float64, seed=4, grad_scale=0.05)
    before = clone_params(params)
    fraction = adaptive_clip_grad_(params, clip_factor=0.1)
    clipped = units = 0
    for b in before:
        rows_w = b.detach().reshape(b.shape[0], -1) if b.ndim > 1 else b.detach().reshape(1, -1)
        rows_g = b.grad.reshape(rows_w.shape)
        clipped += int((rows_g.norm(dim=1) >= 0.1 * rows_w.norm(dim=1).clamp(min=1e-3)).sum())
        units += rows_w.shape[0]
    assert 0 < clipped < units
    assert fraction.dtype == torch.float32
    assert math.isclose(float(fraction), clipped / units, rel_tol=1e-6)
    assert float(adaptive_clip_grad_([torch.nn.Parameter(torch.ones(3))])) == 0.0  # no grads


# --- units: ConvTranspose, groups, unit_dims, modules -------------------------------------


def test_conv_transpose_is_clipped_per_output_channel_when_the_model_is_given():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ConvTranspose2d(4, 6, 3))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    naive = clone_params(list(model.parameters()))
    deconv = model[1]
    reference_weight = torch.nn.Parameter(deconv.weight.detach().transpose(0, 1).clone())  # (out, in, k, k)
    reference_weight.grad = deconv.weight.grad.transpose(0, 1).clone()
    reference_conv = clone_params([model[0].weight])[0]
    adaptive_clip_grad_(model, clip_factor=0.05)
    timm_adaptive_clip_grad([reference_weight, reference_conv], clip_factor=0.05)
    torch.testing.assert_close(deconv.weight.grad, reference_weight.grad.transpose(0, 1))
    torch.testing.assert_close(model[0].weight.grad, reference_conv.grad)
    # a bare list cannot know the layout: it clips per input channel, a different answer
    adaptive_clip_grad_(naive, clip_factor=0.05)
    assert not torch.allclose(naive[2].grad, deconv.weight.grad)


def test_grouped_conv_transpose_units_are_per_group_and_output_channel():
    torch.manual_seed(1)
    deconv = torch.nn.ConvTranspose2d(4, 6, 3, groups=2)  # weight (4, 3, 3, 3)
    deconv.weight.grad = torch.randn_like(deconv.weight)
    deconv.bias.grad = torch.randn_like(deconv.bias)
    w, g = deconv.weight.detach().clone(), deconv.weight.grad.clone()
    assert agc_unit_dims(deconv)[deconv.weight] == UnitSpec(1, 2)
    adaptive_clip_grad_(deconv, clip_factor=0.05)
    expected = g.clone()
    for group in range(2):
        rows = slice(2 * group, 2 * group + 2)  # in channels of the group; output channel j is [rows, j]
        expected[rows] = agc_unitwise(w[rows].transpose(0, 1), g[rows].transpose(0, 1), 0.05, 1e-3).transpose(0, 1)
    torch.testing.assert_close(deconv.weight.grad, expected)


def test_unit_dims_override_and_list_path_agree_with_the_module_path():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.ConvTranspose1d(3, 5, 2), torch.nn.Linear(4, 2))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    other = clone_params(list(model.parameters()))
    adaptive_clip_grad_(model, clip_factor=0.02)
    unit_dims = {other[0]: 1}
    adaptive_clip_grad_(other, clip_factor=0.02, unit_dims=unit_dims)
    for p, q in zip(model.parameters(), other):
        torch.testing.assert_close(p.grad, q.grad)
    # unit_dims=None for a matrix: the whole tensor is one unit
    m = make_params([(4, 4)], torch.float64, seed=3)
    ref = clone_params(m)
    adaptive_clip_grad_(m, 0.05, unit_dims={m[0]: None})
    flat = torch.nn.Parameter(ref[0].detach().reshape(-1))
    flat.grad = ref[0].grad.reshape(-1)
    timm_adaptive_clip_grad([flat], 0.05)
    torch.testing.assert_close(m[0].grad, flat.grad.reshape(4, 4))


def test_exclude_and_agc_parameters_skip_the_classifier():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 10
    head = [p.grad.clone() for p in model[2].parameters()]
    adaptive_clip_grad_(agc_parameters(model), clip_factor=0.01)
    assert all(torch.equal(p.grad, h) for p, h in zip(model[2].parameters(), head))
    assert model[0].weight.grad.norm() < 10  # the body was clipped
    adaptive_clip_grad_(model, clip_factor=0.01, exclude=model[2].parameters())
    assert all(torch.equal(p.grad, h) for p, h in zip(model[2].parameters(), head))

    class WithHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = torch.nn.Linear(3, 2)  # registered first: timm's [:-2] would miss it
            self.body = torch.nn.Linear(5, 3)

        def get_classifier(self):
            return self.classifier

    net = WithHead()
    assert {id(p) for p in agc_parameters(net)} == {id(p) for p in net.body.parameters()}
    assert {id(p) for p in agc_parameters(net, head="body")} == {id(p) for p in net.classifier.parameters()}
    assert len(agc_parameters(net, exclude_head=False)) == 4
    with pytest.raises(ValueError, match="no classifier"):
        agc_parameters(torch.nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="head"):
        agc_parameters(net, head="nope")


# --- precision, non-finite values, cost -----------------------------------------------------


def test_fp16_norms_are_accumulated_in_float32():
    def make():
        w = torch.nn.Parameter(torch.full((2, 4), 10000.0, dtype=torch.float16))  # row norm 20000
        w.grad = torch.full((2, 4), 40000.0, dtype=torch.float16)  # row norm 80000 > fp16 max 65504
        return w

    w = make()
    adaptive_clip_grad_([w], clip_factor=0.1)  # limit 2000: scale 1/40
    torch.testing.assert_close(w.grad.float(), torch.full((2, 4), 1000.0), rtol=1e-3, atol=0)
    timm = make()
    timm_adaptive_clip_grad([timm], clip_factor=0.1)
    assert torch.equal(timm.grad, torch.zeros(2, 4, dtype=torch.float16))  # timm's fp16 norm is inf: zeroed


def test_non_finite_gradients_stay_non_finite_per_unit():
    w = torch.nn.Parameter(torch.ones(3, 4))
    w.grad = torch.ones(3, 4)
    w.grad[0, 1] = float("nan")
    w.grad[1, 2] = float("inf")
    adaptive_clip_grad_([w], clip_factor=0.1)
    assert torch.isnan(w.grad[0]).all()  # NaN unit: all NaN
    assert torch.isnan(w.grad[1, 2]) and not torch.isfinite(w.grad[1]).all()  # inf entry -> NaN, never finite
    torch.testing.assert_close(w.grad[2], torch.full((4,), 0.1))  # clean unit: clipped normally
    b = torch.nn.Parameter(torch.ones(3))
    b.grad = torch.tensor([1.0, float("nan"), 0.0])
    adaptive_clip_grad_([b], clip_factor=10.0)
    assert torch.isnan(b.grad).all()
    v = torch.nn.Parameter(torch.tensor([[float("nan"), 1.0]]))  # NaN weight
    v.grad = torch.tensor([[0.5, 0.5]])
    adaptive_clip_grad_([v])
    assert torch.isnan(v.grad).all()


@pytest.mark.parametrize("channels_last", [False, True])
def test_agc_does_not_sync_and_makes_no_full_size_temporary(channels_last):
    params = make_params([(512, 128, 3, 3), (512,), (1024, 512), (10, 512)], seed=5)
    if channels_last:  # the general (strided reduction) path
        params[0].grad = params[0].grad.contiguous(memory_format=torch.channels_last)
    with no_host_sync():
        adaptive_clip_grad_(params, 0.01)
    recorder = LargestTemporary()
    with recorder:
        adaptive_clip_grad_(params, 0.01)
    unit_count = 512 + 1 + 1024 + 10  # every per-unit norm together
    assert recorder.largest <= unit_count, (recorder.largest, recorder.op)
    assert recorder.largest * 4 <= 512 * 128 * 9
    # the recorder does see full-size temporaries: timm's reference makes them
    timm_recorder = LargestTemporary()
    with timm_recorder:
        timm_adaptive_clip_grad(params, 0.01)
    assert timm_recorder.largest == 512 * 128 * 9


def test_long_rows_and_many_short_rows_match_the_per_unit_loop():
    params = make_params([(3, (1 << 14) + 7), (3283, 5, 2)], torch.float64, seed=12, grad_scale=0.2)
    expected = [agc_unitwise(p, p.grad, 0.2, 1e-3) for p in params]
    fraction = adaptive_clip_grad_(params, 0.2)  # about half the units clipped
    assert 0.2 < float(fraction) < 0.8
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-12, atol=0)


def test_channels_last_gradients_are_clipped_in_place():
    params = make_params([(8, 4, 3, 3)], seed=6, grad_scale=10.0)
    params[0].grad = params[0].grad.contiguous(memory_format=torch.channels_last)
    grad_object = params[0].grad
    reference = clone_params(params)
    adaptive_clip_grad_(params, 0.01)
    timm_adaptive_clip_grad(reference, 0.01)
    assert params[0].grad is grad_object
    torch.testing.assert_close(params[0].grad, reference[0].grad)


# --- bad input ------------------------------------------------------------------------------


def test_bad_arguments_raise_naming_them():
    p = make_params([(3, 2)])[0]
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="clip_factor"):
            adaptive_clip_grad_([p], clip_factor=bad)
    with pytest.raises(TypeError, match="clip_factor"):
        adaptive_clip_grad_([p], clip_factor="0.1")
    for bad in (0.0, -1e-3, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="eps"):
            adaptive_clip_grad_([p], eps=bad)
    with pytest.raises(ValueError, match="norm_type"):
        adaptive_clip_grad_([p], norm_type=0)
    with pytest.raises(ValueError, match="dim must be in"):
        adaptive_clip_grad_([p], unit_dims={p: 2})
    with pytest.raises(TypeError, match="unit_dims"):
        adaptive_clip_grad_([p], unit_dims={p: "rows"})
    with pytest.raises(TypeError, match="unit_dims"):
        adaptive_clip_grad_([p], unit_dims=[p])
    with pytest.raises(ValueError, match="groups"):
        adaptive_clip_grad_([p], unit_dims={p: UnitSpec(1, 2)})
    q = make_params([(3, 2)])[0]
    q.grad.set_(torch.ones(2, 3))  # torch refuses the assignment, but not set_
    with pytest.raises(ValueError, match=r"shape \(3, 2\).*gradient has shape \(2, 3\)"):
        adaptive_clip_grad_([q])
    meta = torch.nn.Parameter(torch.empty(3, 2, device="meta"))
    meta.grad = torch.empty(3, 2, device="meta")
    with pytest.raises(ValueError, match="no data"):
        adaptive_clip_grad_([meta])
    with pytest.raises(TypeError, match=r"parameters\[0\]"):
        adaptive_clip_grad_([3.0])
    before = p.grad.clone()
    assert torch.equal(p.grad, before)


def test_agc_parameters_warns_when_the_head_is_a_guess():
    import warnings

    class HeadFirst(torch.nn.Module):  # the classifier registered before the body
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(8, 2)
            self.body = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))

        def forward(self, x):
            return self.head(self.body(x))

    model = HeadFirst()
    with pytest.warns(UserWarning, match=r"'body\.2', is taken as the head.*head='its name'") as record:
        agc_parameters(model)
    assert record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = agc_parameters(model, head="head")  # named: no guess, no warning
        assert {id(p) for p in kept} == {id(p) for p in model.body.parameters()}
        agc_parameters(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)))  # call order


# --- the unit axis follows the layer, whichever way the parameters arrive ---------------------------------------

P = torch.nn.utils.parametrizations


def legacy(fn, layer, **kwargs):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates the legacy hooks, users still have them
        return fn(layer, **kwargs)


# kind -> (the layer, {parameter name: (unit axis, groups)} written from the layer's layout, not from gradclip)
LAYERS = {
    "Linear": (lambda: torch.nn.Linear(5, 4), {"weight": (0, 1), "bias": (None, 1)}),
    "Conv2d": (lambda: torch.nn.Conv2d(3, 4, 3), {"weight": (0, 1), "bias": (None, 1)}),
    "ConvTranspose1d": (lambda: torch.nn.ConvTranspose1d(4, 6, 3), {"weight": (1, 1), "bias": (None, 1)}),
    "ConvTranspose2d": (lambda: torch.nn.ConvTranspose2d(4, 6, 3), {"weight": (1, 1), "bias": (None, 1)}),
    "ConvTranspose2d(groups=2)": (lambda: torch.nn.ConvTranspose2d(4, 6, 3, groups=2),
                                  {"weight": (1, 2), "bias": (None, 1)}),
    # g (4, 1, 1, 1): one gain per input channel; v (4, 6, 3, 3): the transposed convolution's weight
    "weight_norm(ConvTranspose2d)": (lambda: P.weight_norm(torch.nn.ConvTranspose2d(4, 6, 3)),
                                     {"parametrizations.weight.original0": (0, 1),
                                      "parametrizations.weight.original1": (1, 1), "bias": (None, 1)}),
    "weight_norm(ConvTranspose2d, dim=1)": (lambda: P.weight_norm(torch.nn.ConvTranspose2d(4, 6, 3), dim=1),
                                            {"parametrizations.weight.original0": (1, 1),
                                             "parametrizations.weight.original1": (1, 1), "bias": (None, 1)}),
    "weight_norm(Linear, dim=None)": (lambda: P.weight_norm(torch.nn.Linear(5, 4), dim=None),
                                      {"parametrizations.weight.original0": (None, 1),
                                       "parametrizations.weight.original1": (0, 1), "bias": (None, 1)}),
    "legacy weight_norm(ConvTranspose2d)": (
        lambda: legacy(torch.nn.utils.weight_norm, torch.nn.ConvTranspose2d(4, 6, 3, groups=2)),
        {"weight_g": (0, 1), "weight_v": (1, 2), "bias": (None, 1)}),
    "spectral_norm(ConvTranspose2d)": (lambda: P.spectral_norm(torch.nn.ConvTranspose2d(4, 6, 3)),
                                       {"parametrizations.weight.original": (1, 1), "bias": (None, 1)}),
    "legacy spectral_norm(ConvTranspose2d)": (
        lambda: legacy(torch.nn.utils.spectral_norm, torch.nn.ConvTranspose2d(4, 6, 3)),
        {"weight_orig": (1, 1), "bias": (None, 1)}),
    "orthogonal(Linear)": (lambda: P.orthogonal(torch.nn.Linear(4, 4)),
                           {"parametrizations.weight.original": (0, 1), "bias": (None, 1)}),
}

ROUTES = {
    "the model": lambda model: adaptive_clip_grad_(model, 0.02, exclude=model[1].parameters()),
    "agc_parameters(model)": lambda model: adaptive_clip_grad_(agc_parameters(model), 0.02),
    "unit_dims=agc_unit_dims(model)": lambda model: adaptive_clip_grad_(
        list(model[0].parameters()), 0.02, unit_dims=agc_unit_dims(model)),
    "an optimizer's parameter group": lambda model: adaptive_clip_grad_(
        torch.optim.SGD(agc_parameters(model), lr=0.1).param_groups[0]["params"], 0.02),
    "model.parameters() of a walked model": lambda model: (
        agc_unit_dims(model), adaptive_clip_grad_(list(model[0].parameters()), 0.02)),
}


def layer_model(kind, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(LAYERS[kind][0](), torch.nn.Linear(3, 2))  # (the head: never clipped)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 0.5
    return model


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("kind", list(LAYERS))
def test_every_route_clips_each_layer_per_output_unit(kind, route):
    model = layer_model(kind)
    named = dict(model[0].named_parameters())
    assert set(named) == set(LAYERS[kind][1]), "the table names every parameter of the layer"
    before = {name: (p.detach().clone(), p.grad.clone()) for name, p in named.items()}
    head = [p.grad.clone() for p in model[1].parameters()]
    ROUTES[route](model)
    clipped = 0
    for name, (dim, groups) in LAYERS[kind][1].items():
        weight, grad = before[name]
        expected = agc_unitwise_along(weight, grad, 0.02, 1e-3, dim, groups)
        torch.testing.assert_close(named[name].grad.double(), expected, rtol=1e-5, atol=1e-7, msg=f"{kind} {name}")
        clipped += int(not torch.equal(expected, grad.double()))
    assert clipped, "nothing was clipped: the case shows nothing"
    assert all(torch.equal(p.grad, h) for p, h in zip(model[1].parameters(), head))


def test_an_original_of_another_shape_warns_that_its_axis_is_a_guess():
    class FromMatrix(torch.nn.Module):  # a transposed convolution's weight stored as an (in, out * k * k) matrix
        def __init__(self, shape):
            super().__init__()
            self.shape = shape

        def forward(self, matrix):
            return matrix.reshape(self.shape)

        def right_inverse(self, weight):
            return weight.reshape(weight.shape[0], -1)

    deconv = torch.nn.ConvTranspose2d(4, 6, 3)
    torch.nn.utils.parametrize.register_parametrization(deconv, "weight", FromMatrix(deconv.weight.shape), unsafe=True)
    original = deconv.parametrizations.weight.original
    with pytest.warns(UserWarning, match=r"parametrizations\.weight\.original \(shape \(4, 54\)\).*axis 0 is assumed.*unit_dims") as record:
        specs = agc_unit_dims(deconv)
    assert record[0].filename == __file__
    assert specs[original] == UnitSpec(0)


def test_a_bare_tensor_never_walked_gets_axis_0_as_documented():
    deconv = torch.nn.ConvTranspose2d(4, 6, 3)
    bare = clone_params([deconv.weight])[0]  # a tensor of no walked module: its layer cannot be known
    bare.grad = torch.randn_like(bare)
    weight, grad = bare.detach().clone(), bare.grad.clone()
    adaptive_clip_grad_([bare], 0.02)
    torch.testing.assert_close(bare.grad.double(), agc_unitwise_along(weight, grad, 0.02, 1e-3, 0))


# --- several heads ----------------------------------------------------------------------------------------------


class Distilled(torch.nn.Module):
    """timm's distilled DeiT: get_classifier() returns the class head and the distillation head."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 8))
        self.head = torch.nn.Linear(8, 3)
        self.head_dist = torch.nn.Linear(8, 3)

    def get_classifier(self):
        return self.head, self.head_dist


def test_agc_parameters_leaves_out_every_head_get_classifier_returns_without_warning():
    import warnings

    model = Distilled()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = agc_parameters(model)
    assert {id(p) for p in kept} == {id(p) for p in model.blocks.parameters()}
    model.get_classifier = lambda: torch.nn.Identity()  # timm's reset_classifier(0): no classifier, nothing left out
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(agc_parameters(model)) == len(list(model.parameters()))
    model.get_classifier = lambda: "head"  # not a module: the search, and a warning that says why
    with pytest.warns(UserWarning, match=r"get_classifier\(\) returned str, not a module.*'head_dist'"):
        kept = agc_parameters(model)
    assert {id(p) for p in model.head_dist.parameters()}.isdisjoint({id(p) for p in kept})
