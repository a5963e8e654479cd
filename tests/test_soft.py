"""Soft norm and soft value clipping (gradclip.soft) against their formulas and the factor-of-two bounds."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.params import clone_params, make_params
from support.references import clip_by_value, global_norm, soft_clip_norm, soft_clip_value
from support.strategies import seeds, shape_lists
from support.sync import no_host_sync

from gradclip.soft import soft_clip_grad_norm_, soft_clip_grad_value_

NAN, INF = float("nan"), float("inf")


@settings(max_examples=40, deadline=None)
@given(shapes=shape_lists(), max_norm=st.floats(0.01, 10.0), scale=st.sampled_from([1e-3, 1.0, 100.0]),
       seed=seeds())
def test_soft_norm_clipping_formula_and_factor_of_two_bound(shapes, max_norm, scale, seed):
    ours = make_params(shapes, torch.float64, seed, scale)
    before = clone_params(ours)
    norm = soft_clip_grad_norm_(ours, max_norm)
    total = float(global_norm([b.grad for b in before]))
    assert math.isclose(float(norm), total, rel_tol=1e-12)
    soft = max_norm / (total + max_norm)
    hard = min(1.0, max_norm / total)
    assert 0.5 * hard <= soft * (1 + 1e-12) and soft <= hard * (1 + 1e-12)
    for p, expected in zip(ours, soft_clip_norm([b.grad for b in before], max_norm)):
        torch.testing.assert_close(p.grad, expected, rtol=1e-12, atol=1e-300)
    new = float(torch.cat([p.grad.reshape(-1) for p in ours]).norm())
    assert new < max_norm and new <= total  # strictly inside the ball, never grows


def test_soft_norm_non_finite_and_inf_threshold():
    params = make_params([(3,), (2,)])
    before = [p.grad.clone() for p in params]
    soft_clip_grad_norm_(params, INF)
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))
    params[0].grad[0] = NAN
    soft_clip_grad_norm_(params, 1.0)
    assert all(torch.isnan(p.grad).all() for p in params)
    params = make_params([(3,)])
    params[0].grad[0] = INF
    soft_clip_grad_norm_(params, 1.0)
    assert torch.isnan(params[0].grad[0])


@settings(max_examples=40, deadline=None)
@given(shapes=shape_lists(), alpha=st.floats(0.0, 10.0), scale=st.sampled_from([1e-2, 1.0, 100.0]),
       foreach=st.sampled_from([None, False]), seed=seeds())
def test_soft_value_clipping_formula_and_bounds(shapes, alpha, scale, foreach, seed):
    ours = make_params(shapes, torch.float64, seed, scale)
    before = clone_params(ours)
    assert soft_clip_grad_value_(ours, alpha, foreach=foreach) is None
    for p, b in zip(ours, before):
        expected = soft_clip_value(b.grad, alpha).reshape(-1)
        torch.testing.assert_close(p.grad.reshape(-1), expected, rtol=1e-12, atol=1e-300)
        assert torch.equal(torch.sign(p.grad), torch.sign(b.grad))
        assert torch.all(p.grad.abs() <= b.grad.abs())
        if alpha > 0:
            hard = clip_by_value([b.grad], 1 / alpha)[0].abs()
            assert torch.all(p.grad.abs() < 1 / alpha)
            assert torch.all(0.5 * hard <= p.grad.abs() * (1 + 1e-12)) and torch.all(p.grad.abs() <= hard * (1 + 1e-12))


def test_soft_value_non_finite():
    p = make_params([(4,)])[0]
    p.grad = torch.tensor([NAN, INF, -INF, 2.0])
    soft_clip_grad_value_([p], 1.0)
    assert torch.isnan(p.grad[:3]).all() and float(p.grad[3]) == pytest.approx(2 / 3)


# --- no host-device synchronisation ------------------------------------------------------------


def test_default_paths_never_read_a_value_on_the_host():
    params = make_params([(4, 3), (3,), (2, 2, 2)], seed=9)
    with no_host_sync():
        soft_clip_grad_norm_(params, 1.0)
        soft_clip_grad_value_(params, 2.0)


# --- bad input ------------------------------------------------------------------------------


def test_bad_arguments_raise_naming_them():
    p = make_params([(3,)])[0]
    with pytest.raises(ValueError, match="max_norm"):
        soft_clip_grad_norm_([p], 0.0)
    with pytest.raises(ValueError, match="norm_type"):
        soft_clip_grad_norm_([p], 1.0, norm_type=-1)
    with pytest.raises(ValueError, match="alpha"):
        soft_clip_grad_value_([p], -0.5)
    with pytest.raises(ValueError, match="alpha"):
        soft_clip_grad_value_([p], INF)
    with pytest.raises(TypeError, match="alpha"):
        soft_clip_grad_value_([p], None)
