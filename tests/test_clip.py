"""Global norm and value clipping (gradclip.clip) against torch.nn.utils itself, and where it deliberately differs."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.params import clone_params, make_params
from support.references import clip_by_norm, global_norm
from support.strategies import NORM_TYPES, seeds, shape_lists
from support.sync import forbid_sync, no_host_sync  # noqa: F401 (forbid_sync is a fixture)

import gradclip
from gradclip import clip_grad_norm_
from gradclip.clip import clip_grad_norm_report_
from gradclip.result import ClipResult

NAN = float("nan")


@settings(max_examples=60, deadline=None)
@given(
    shapes=shape_lists(max_side=7, max_tensors=12),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    norm_type=st.sampled_from(NORM_TYPES),
    max_norm=st.floats(0.0, 20.0),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    foreach=st.sampled_from([None, True, False]),
    seed=seeds(),
)
def test_clip_grad_norm_matches_torch(shapes, dtype, norm_type, max_norm, scale, foreach, seed):
    ours = make_params(shapes, dtype, seed, grad_scale=scale)
    theirs = clone_params(ours)
    exact = global_norm([p.grad for p in ours], norm_type)  # float64 transcription
    norm = gradclip.clip_grad_norm_(ours, max_norm, norm_type, foreach=foreach)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type, foreach=foreach)
    assert norm.dtype == expected.dtype and norm.device == expected.device
    # gradclip combines the per-tensor norms in float64, torch in the gradients' dtype: both are a few
    # roundings of that dtype from the exact norm (p < 1 amplifies rounding), so they agree to that
    ulp = torch.finfo(dtype).eps
    rtol = (32 if norm_type < 1 else 8) * ulp
    torch.testing.assert_close(norm, expected, rtol=rtol, atol=0)
    torch.testing.assert_close(norm.double(), exact, rtol=rtol, atol=0)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=1e-12)


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
    expected = clip_by_norm([values], 1.0)[1][0].to(torch.float16)
    torch.testing.assert_close(ours.grad, expected, rtol=1e-3, atol=0)
    assert math.isclose(float(ours.grad.float().norm()), 1.0, rel_tol=2e-3)


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
    with pytest.raises(ValueError, match="max_norm"):
        gradclip.clip_grad_norm_([p], "one")  # float("one") fails in torch too
    with pytest.raises(TypeError, match="max_norm"):
        gradclip.clip_grad_norm_([p], [1.0])
    assert torch.equal(p.grad, before)


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


def test_bad_arguments_raise_naming_them():
    p = make_params([(3,)])[0]
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_report_([p], NAN)


# --- clip_grad_norm_report_ -------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(shapes=shape_lists(), max_norm=st.floats(0.0, 10.0), seed=seeds())
def test_report_equals_clip_grad_norm_and_describes_it(shapes, max_norm, seed):
    ours = make_params(shapes, seed=seed)
    theirs = clone_params(ours)
    result = clip_grad_norm_report_(ours, max_norm)
    norm = clip_grad_norm_(theirs, max_norm)
    assert isinstance(result, ClipResult)
    assert torch.equal(result.norm, norm)
    for p, q in zip(ours, theirs):
        assert torch.equal(p.grad, q.grad)
    new_norm = torch.cat([p.grad.reshape(-1) for p in ours]).norm()
    torch.testing.assert_close(result.post_norm, new_norm, rtol=1e-5, atol=1e-7)
    assert bool(result.clipped) == (float(norm) + 1e-6 > max_norm)
    assert float(result.threshold) == pytest.approx(max_norm)
    assert result.norm.shape == result.scale.shape == result.threshold.shape == ()


# --- no host-device synchronisation ------------------------------------------------------------


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


def test_default_paths_never_read_a_value_on_the_host():
    params = make_params([(4, 3), (3,), (2, 2, 2)], seed=9)
    with no_host_sync():
        clip_grad_norm_report_(params, 1.0)


def test_no_warning_on_ordinary_use():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gradclip.clip_grad_norm_(make_params([(3,)]), 1.0)
