"""The global gradient norm (gradclip.norms, gradclip._norms) against torch.nn.utils, numpy and the reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.params import clone_params, make_params
from support.references import global_norm
from support.strategies import NORM_TYPES, seeds, shape_lists

import gradclip
from gradclip import _norms as norms


@settings(max_examples=40, deadline=None)
@given(shapes=shape_lists(max_side=7, max_tensors=12), norm_type=st.sampled_from(NORM_TYPES), seed=seeds())
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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("foreach", [None, True, False])
def test_low_precision_norms_are_accumulated_in_float32(dtype, foreach):
    grads = [p.grad for p in make_params([(4000,), (300, 7), (5,)], dtype, seed=11, grad_scale=50.0)]
    reference = global_norm(grads)
    norm = gradclip.get_total_norm(grads, foreach=foreach)
    assert norm.dtype == torch.float32
    assert math.isclose(float(norm), float(reference), rel_tol=1e-5)


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
