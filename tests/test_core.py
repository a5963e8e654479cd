"""gradclip's core against torch.nn.utils itself, and where it deliberately differs."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradclip
from gradclip import _norms as norms
from helpers_methods import clone_params, make_params

NORM_TYPES = [0.5, 1.0, 1.5, 2.0, 3.0, math.inf]


shapes_strategy = st.lists(
    st.lists(st.integers(1, 7), min_size=0, max_size=3).map(tuple), min_size=1, max_size=12
)


@settings(max_examples=60, deadline=None)
@given(
    shapes=shapes_strategy,
    dtype=st.sampled_from([torch.float32, torch.float64]),
    norm_type=st.sampled_from(NORM_TYPES),
    max_norm=st.floats(0.0, 20.0),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    foreach=st.sampled_from([None, True, False]),
    seed=st.integers(0, 2**16),
)
def test_clip_grad_norm_matches_torch(shapes, dtype, norm_type, max_norm, scale, foreach, seed):
    ours = make_params(shapes, dtype, seed, grad_scale=scale)
    theirs = clone_params(ours)
    norm = gradclip.clip_grad_norm_(ours, max_norm, norm_type, foreach=foreach)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type, foreach=foreach)
    assert norm.dtype == expected.dtype and norm.device == expected.device
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(shapes=shapes_strategy, norm_type=st.sampled_from(NORM_TYPES), seed=st.integers(0, 2**16))
def test_get_total_norm_matches_torch_and_numpy(shapes, norm_type, seed):
    grads = [p.grad for p in make_params(shapes, torch.float64, seed)]
    ours = gradclip.get_total_norm(grads, norm_type)
    torch.testing.assert_close(ours, torch.nn.utils.get_total_norm(grads, norm_type), rtol=1e-12, atol=0)
    flat = torch.cat([g.reshape(-1) for g in grads]).numpy()
    import numpy as np

    expected = np.max(np.abs(flat)) if math.isinf(norm_type) else np.sum(np.abs(flat) ** norm_type) ** (1 / norm_type)
    assert math.isclose(float(ours), float(expected), rel_tol=1e-10)


def test_many_small_tensors_take_the_concatenated_path_and_match_torch():
    shapes = [(3,)] * 300 + [(50, 50)] * 5
    ours = make_params(shapes)
    theirs = clone_params(ours)
    assert any(p.numel() <= norms.CPU_CONCAT_MAX_NUMEL for p in ours)
    torch.testing.assert_close(gradclip.clip_grad_norm_(ours, 1.0), torch.nn.utils.clip_grad_norm_(theirs, 1.0))
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad)


def test_clip_grads_with_norm_matches_torch():
    ours = make_params([(4, 3), (5,)], seed=3)
    theirs = clone_params(ours)
    total = gradclip.get_total_norm([p.grad for p in ours])
    gradclip.clip_grads_with_norm_(ours, 0.5, total)
    torch.nn.utils.clip_grads_with_norm_(theirs, 0.5, torch.nn.utils.get_total_norm([q.grad for q in theirs]))
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad)
    with pytest.raises(TypeError, match="total_norm"):
        gradclip.clip_grads_with_norm_(ours, 0.5, 3.0)


@pytest.mark.parametrize("foreach", [None, True, False])
def test_clip_grad_value_matches_torch_and_keeps_nan(foreach):
    ours = make_params([(6, 2), (9,)], seed=5, grad_scale=3.0)
    ours[1].grad[0] = float("nan")
    theirs = clone_params(ours)
    assert gradclip.clip_grad_value_(ours, 1.5, foreach=foreach) is None
    torch.nn.utils.clip_grad_value_(theirs, 1.5, foreach=foreach)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad, equal_nan=True)
    assert torch.isnan(ours[1].grad[0])
    assert float(ours[0].grad.abs().max()) <= 1.5


def test_mixed_dtypes_promote_like_torch():
    ours = make_params([(3,)], torch.float32) + make_params([(4,)], torch.float64, seed=1)
    theirs = clone_params(ours)
    norm = gradclip.clip_grad_norm_(ours, 0.1)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 0.1)
    assert norm.dtype == expected.dtype == torch.float64
    torch.testing.assert_close(norm, expected)


def test_parameters_without_grad_are_skipped_and_empty_input_gives_zero():
    params = make_params([(3,), (2,)])
    params.append(torch.nn.Parameter(torch.ones(4)))  # no .grad
    theirs = clone_params(params)
    torch.testing.assert_close(gradclip.clip_grad_norm_(params, 1.0), torch.nn.utils.clip_grad_norm_(theirs, 1.0))
    assert params[2].grad is None
    empty = gradclip.clip_grad_norm_([], 1.0)
    assert empty.device.type == "cpu" and empty.dtype == torch.float32 and float(empty) == 0.0
    no_grads = gradclip.clip_grad_norm_([torch.nn.Parameter(torch.ones(2))], 1.0)
    assert float(no_grads) == 0.0


def test_empty_generator_warns_like_torch():
    with pytest.warns(UserWarning, match="empty generator"):
        gradclip.clip_grad_norm_((p for p in []), 1.0)


def test_single_tensor_is_accepted():
    p = make_params([(5,)])[0]
    q = clone_params([p])[0]
    torch.testing.assert_close(gradclip.clip_grad_norm_(p, 0.3), torch.nn.utils.clip_grad_norm_(q, 0.3))
    torch.testing.assert_close(p.grad, q.grad)


# --- where torch is silently wrong ---------------------------------------------------------


def test_fp16_norm_above_65504_is_right_where_torch_zeroes_everything():
    values = torch.tensor([60000.0, 60000.0], dtype=torch.float16)
    ours = torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))
    ours.grad = values.clone()
    theirs = clone_params([ours])[0]

    torch_norm = torch.nn.utils.clip_grad_norm_([theirs], 1.0)
    assert torch.isinf(torch_norm) and torch_norm.dtype == torch.float16
    assert torch.equal(theirs.grad, torch.zeros(2, dtype=torch.float16))  # torch silently zeroed them

    norm = gradclip.clip_grad_norm_([ours], 1.0)
    assert norm.dtype == torch.float32
    assert math.isclose(float(norm), 60000 * math.sqrt(2), rel_tol=1e-6)
    expected = (values.double() / (60000 * math.sqrt(2))).to(torch.float16)
    torch.testing.assert_close(ours.grad, expected, rtol=1e-3, atol=0)
    assert math.isclose(float(ours.grad.float().norm()), 1.0, rel_tol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("foreach", [None, True, False])
def test_low_precision_norms_are_accumulated_in_float32(dtype, foreach):
    grads = [p.grad for p in make_params([(4000,), (300, 7), (5,)], dtype, seed=11, grad_scale=50.0)]
    reference = torch.cat([g.double().reshape(-1) for g in grads]).norm()
    norm = gradclip.get_total_norm(grads, foreach=foreach)
    assert norm.dtype == torch.float32
    assert math.isclose(float(norm), float(reference), rel_tol=1e-5)


def test_negative_max_norm_raises_where_torch_flips_the_gradient():
    p = make_params([(3,)], seed=2)[0]
    q = clone_params([p])[0]
    before = q.grad.clone()
    torch.nn.utils.clip_grad_norm_([q], -1.0)
    assert torch.all(torch.sign(q.grad) == -torch.sign(before))  # torch flipped the direction
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="max_norm"):
            gradclip.clip_grad_norm_([p], bad)
    with pytest.raises(ValueError, match="clip_value"):
        gradclip.clip_grad_value_([p], -0.5)
    with pytest.raises(TypeError, match="max_norm"):
        gradclip.clip_grad_norm_([p], "1.0")
    assert torch.equal(p.grad, before)


@pytest.mark.parametrize("norm_type", [0, 0.0, -1.0, -math.inf, math.nan, "-inf", "two"])
def test_bad_norm_types_raise(norm_type):
    p = make_params([(3,)])[0]
    with pytest.raises(ValueError, match="norm_type"):
        gradclip.clip_grad_norm_([p], 1.0, norm_type=norm_type)
    with pytest.raises(ValueError, match="norm_type"):
        gradclip.get_total_norm([p.grad], norm_type=norm_type)


def test_inf_string_norm_type_is_accepted():
    grads = [torch.tensor([1.0, -7.0]), torch.tensor([3.0])]
    assert float(gradclip.get_total_norm(grads, "inf")) == 7.0


def test_sparse_gradients_get_a_clear_error():
    p = torch.nn.Parameter(torch.zeros(4, 2))
    p.grad = torch.zeros(4, 2).to_sparse()
    with pytest.raises(TypeError, match="sparse|dense"):
        gradclip.clip_grad_norm_([p], 1.0)


def test_nonfinite_gradients_stay_nonfinite_as_in_torch():
    for bad in (float("inf"), float("nan")):
        ours = make_params([(3,), (2,)], seed=4)
        ours[0].grad[1] = bad
        theirs = clone_params(ours)
        norm = gradclip.clip_grad_norm_(ours, 1.0)
        expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        torch.testing.assert_close(norm, expected, equal_nan=True)
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p.grad, q.grad, equal_nan=True)
        assert not torch.isfinite(ours[0].grad[1])
        with pytest.raises(RuntimeError, match="non-finite"):
            gradclip.clip_grad_norm_(clone_params(theirs), 1.0, error_if_nonfinite=True)


def test_foreach_argument_is_checked():
    p = make_params([(3,)])[0]
    with pytest.raises(TypeError, match="foreach"):
        gradclip.clip_grad_norm_([p], 1.0, foreach="yes")


def test_non_tensor_parameter_is_named():
    with pytest.raises(TypeError, match=r"parameters\[1\]"):
        gradclip.clip_grad_norm_([torch.nn.Parameter(torch.ones(1)), 3.0], 1.0)


# --- no host-device synchronisation ------------------------------------------------------------


@pytest.fixture
def forbid_sync(monkeypatch):
    """Reading a tensor's value on the host is what a sync is; make every such read fail."""

    def refuse(*args, **kwargs):
        raise AssertionError("host-device synchronisation: a tensor value was read on the host")

    for name in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


def test_forbid_sync_fixture_can_fail(forbid_sync):
    with pytest.raises(AssertionError, match="synchronisation"):
        bool(torch.tensor(1.0) > 0)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
@pytest.mark.parametrize("foreach", [None, True, False])
def test_default_paths_never_sync(forbid_sync, norm_type, foreach):
    params = make_params([(3,)] * 20 + [(40, 40), (7,)], seed=1)
    params += make_params([(5,)], torch.float16, seed=2)
    gradclip.clip_grad_norm_(params, 0.5, norm_type, foreach=foreach)
    total = gradclip.get_total_norm([p.grad for p in params], norm_type, foreach=foreach)
    gradclip.clip_grads_with_norm_(params, 0.5, total, foreach=foreach)
    gradclip.clip_grad_value_(params, 0.1, foreach=foreach)
    gradclip.clip_grad_norm_(params, torch.tensor(0.5), norm_type)
    buffer = gradclip.GradBuffer(params)
    gradclip.clip_grad_norm_(params, 0.5, norm_type)
    buffer.zero_grad()


# --- the opt-in flat gradient buffer -----------------------------------------------------------


def test_grad_buffer_takes_the_single_kernel_path_and_matches_torch():
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    twin = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    twin.load_state_dict(model.state_dict())
    buffer = gradclip.GradBuffer(model.parameters())
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(0))
    for step in range(3):
        buffer.zero_grad()
        twin.zero_grad()
        (model(x) ** 2).sum().backward()
        (twin(x) ** 2).sum().backward()
        assert buffer.views_intact()
        grads = [p.grad for p in model.parameters()]
        assert gradclip._groups.single_buffer(grads) is not None
        norm = gradclip.clip_grad_norm_(model.parameters(), 0.7)
        expected = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.7)
        torch.testing.assert_close(norm, expected)
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p.grad, q.grad)


def test_single_buffer_rejects_overlapping_and_gapped_views():
    base = torch.arange(10.0)
    assert gradclip._groups.single_buffer([base[0:5], base[5:10]]) is not None
    assert gradclip._groups.single_buffer([base[0:5], base[4:10]]) is None  # overlap
    assert gradclip._groups.single_buffer([base[0:4], base[5:10]]) is None  # gap
    assert gradclip._groups.single_buffer([base[0:5], base[0:5]]) is None  # same view twice
    assert gradclip._groups.single_buffer([base.view(2, 5)[:, :2], base[5:10]]) is None  # strided
    span = gradclip._groups.single_buffer([base[5:10], base[2:5]])
    assert span is not None and torch.equal(span, base[2:10])


def test_grad_buffer_rebinds_after_zero_grad_set_to_none():
    model = torch.nn.Linear(4, 2)
    buffer = gradclip.GradBuffer(model.parameters())
    model.zero_grad(set_to_none=True)
    model(torch.ones(1, 4)).sum().backward()
    assert not buffer.views_intact()
    expected = [p.grad.clone() for p in model.parameters()]
    buffer.rebind_()
    assert buffer.views_intact()
    for p, e in zip(model.parameters(), expected):
        assert torch.equal(p.grad, e)
    with pytest.raises(ValueError, match="parameters"):
        gradclip.GradBuffer([torch.zeros(2)])


def test_no_warning_on_ordinary_use():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gradclip.clip_grad_norm_(make_params([(3,)]), 1.0)
