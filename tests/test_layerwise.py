"""Per-tensor norm clipping (Keras clipnorm) and block-RMS clipping (optax) in gradclip.layerwise."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.params import clone_params, make_params
from support.references import global_norm, keras_clipnorm, optax_block_rms
from support.strategies import seeds, shape_lists
from support.sync import no_host_sync

from gradclip.layerwise import clip_grad_block_rms_, clip_grad_norm_per_tensor_

NAN, INF = float("nan"), float("inf")


# --- per-tensor norm clipping (Keras clipnorm) ----------------------------------------------


@settings(max_examples=40, deadline=None)
@given(shapes=shape_lists(), max_norm=st.floats(0.01, 10.0), scale=st.sampled_from([1e-3, 1.0, 100.0]),
       norm_type=st.sampled_from([1.0, 2.0, math.inf]), foreach=st.sampled_from([None, False]), seed=seeds())
def test_per_tensor_is_torch_clip_on_each_tensor_and_keras(shapes, max_norm, scale, norm_type, foreach, seed):
    ours = make_params(shapes, torch.float64, seed, scale)
    each = clone_params(ours)
    before = clone_params(ours)
    norms = clip_grad_norm_per_tensor_(ours, max_norm, norm_type, foreach=foreach)
    expected_norms = torch.stack([torch.nn.utils.clip_grad_norm_([q], max_norm, norm_type) for q in each])
    torch.testing.assert_close(norms, expected_norms, rtol=1e-12, atol=0)
    for p, q, b in zip(ours, each, before):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-300)
        if norm_type == 2.0:
            # Keras divides by max(||g||, c), torch by ||g|| + 1e-6: they differ by up to 1e-6 / c relative
            torch.testing.assert_close(p.grad, keras_clipnorm(b.grad, max_norm), rtol=max(1e-5, 2e-6 / max_norm),
                                       atol=1e-12)
        new, old = p.grad.norm(norm_type), b.grad.norm(norm_type)
        assert new <= old * (1 + 1e-12) and new <= max_norm * (1 + 1e-9)  # never grows, capped
        if old + 1e-6 <= max_norm:
            assert torch.equal(p.grad, b.grad)  # exact no-op below the threshold
        else:
            torch.testing.assert_close(p.grad * old, b.grad * new, rtol=1e-9, atol=1e-12)  # direction kept
    clip_grad_norm_per_tensor_(ours, max_norm, norm_type)
    for p, q in zip(ours, each):
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-6 / max_norm, atol=1e-12)  # idempotent up to the 1e-6 guard


def test_per_tensor_norms_come_back_in_order_across_dtypes_and_nan_stays_local():
    params = make_params([(3,)], torch.float32, seed=1) + make_params([(4,)], torch.float64, seed=2) + \
        make_params([(5,)], torch.float32, seed=3)
    expected = torch.stack([global_norm([p.grad]) for p in params])
    norms = clip_grad_norm_per_tensor_(params, 0.1)
    assert norms.dtype == torch.float64
    torch.testing.assert_close(norms, expected, rtol=1e-6, atol=0)
    bad = make_params([(3,), (3,)], seed=4)
    bad[0].grad[1] = NAN
    clean = bad[1].grad.clone()
    clip_grad_norm_per_tensor_(bad, 10.0)
    assert torch.isnan(bad[0].grad).all() and torch.equal(bad[1].grad, clean)
    inf = make_params([(3,)], seed=5)
    inf[0].grad[0] = INF
    clip_grad_norm_per_tensor_(inf, 1.0)
    assert torch.isnan(inf[0].grad[0])


# --- block RMS (optax clip_by_block_rms) -----------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(shapes=shape_lists(), max_rms=st.floats(0.01, 5.0), scale=st.sampled_from([1e-2, 1.0, 100.0]),
       seed=seeds())
def test_block_rms_matches_optax(shapes, max_rms, scale, seed):
    ours = make_params(shapes, torch.float64, seed, scale)
    before = clone_params(ours)
    rms = clip_grad_block_rms_(ours, max_rms)
    torch.testing.assert_close(rms, torch.stack([b.grad.pow(2).mean().sqrt() for b in before]), rtol=1e-12, atol=0)
    for p, b in zip(ours, before):
        torch.testing.assert_close(p.grad, optax_block_rms(b.grad, max_rms), rtol=1e-12, atol=1e-300)
        new_rms = p.grad.pow(2).mean().sqrt()
        assert new_rms <= max_rms * (1 + 1e-12) or torch.equal(p.grad, b.grad)
        if b.grad.pow(2).mean().sqrt() <= max_rms:
            assert torch.equal(p.grad, b.grad)
    once = [p.grad.clone() for p in ours]
    clip_grad_block_rms_(ours, max_rms)
    for p, g in zip(ours, once):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-300)


# --- no host-device synchronisation ------------------------------------------------------------


def test_default_paths_never_read_a_value_on_the_host():
    params = make_params([(4, 3), (3,), (2, 2, 2)], seed=9)
    with no_host_sync():
        clip_grad_norm_per_tensor_(params, 1.0)
        clip_grad_block_rms_(params, 0.1)


# --- bad input ------------------------------------------------------------------------------


def test_bad_arguments_raise_naming_them():
    p = make_params([(3,)])[0]
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_per_tensor_([p], -1.0)
    with pytest.raises(ValueError, match="max_rms"):
        clip_grad_block_rms_([p], 0.0)
    with pytest.raises(ValueError, match="max_rms"):
        clip_grad_block_rms_([p], -1.0)
