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
    assert any(p.numel() <= gradclip._groups.CPU_CONCAT_MAX_NUMEL for p in ours)
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


# --- the CPU's row-by-row path for large float32/float64 tensors ------------------------------------------


def _exact(tensor: torch.Tensor) -> float:
    """The 2-norm in float64 with the largest entry factored out (no over- or underflow)."""
    wide = tensor.double().reshape(-1)
    largest = wide.abs().max()
    return float(largest * torch.linalg.vector_norm(wide / largest)) if largest > 0 else 0.0


def test_huge_float32_norms_are_accurate_where_torchs_cpu_kernel_drifts():
    # 5 M entries: torch's float32 CPU kernel is off by about 1e-4 (normal entries) and 1e-3 (equal ones);
    # the rows combined in float64 by far less (rows of 4 k entries: 3e-9 and 5e-7 on 20 M entries)
    generator = torch.Generator().manual_seed(0)
    cases = [(torch.randn(5_000_000, generator=generator), 1e-5), (torch.full((5_000_000,), 1.1), 5e-4)]
    for grad, bound in cases:
        exact = _exact(grad)
        ours = abs(float(gradclip.get_total_norm([grad])) - exact) / exact
        torchs = abs(float(torch.nn.utils.get_total_norm([grad])) - exact) / exact
        assert ours < bound
        assert ours < torchs / 5


def test_twenty_million_equal_entries_the_readme_row():
    grad = torch.full((20_000_000,), 0.3)
    exact = _exact(grad)
    assert abs(float(torch.nn.utils.get_total_norm([grad])) - exact) / exact > 5e-3  # torch: 1.4e-2
    assert abs(float(gradclip.get_total_norm([grad])) - exact) / exact < 5e-6  # gradclip: 7e-7 on one thread


def test_the_rows_stay_accurate_on_one_thread():
    # a row is accumulated in float32: on one thread of an AMD EPYC 20 M entries of 0.3 drifted to 7e-7 with
    # rows of 4 k entries (BLAS dot on pieces of 256 k, the path before: 1.2e-5; on 4 M pieces: 6.7e-4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        grad = torch.full((20_000_000,), 0.3)
        exact = _exact(grad)
        assert abs(float(gradclip.get_total_norm([grad])) - exact) / exact < 5e-6
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("foreach", [None, True, False])
def test_large_tensors_mixed_with_small_keep_their_order_and_values(dtype, foreach):
    generator = torch.Generator().manual_seed(5)
    sizes = [3, norms._ROWS_MIN_NUMEL, 700, 2 * norms._ROW + 17, 1]
    grads = [torch.randn(n, generator=generator, dtype=dtype) * (i + 1) for i, n in enumerate(sizes)]
    per_tensor = norms.tensor_norms(grads, 2.0, torch.device("cpu"), foreach)
    expected = torch.tensor([_exact(g) for g in grads], dtype=torch.float64)
    torch.testing.assert_close(per_tensor, expected, rtol=2e-5 if dtype == torch.float32 else 1e-12, atol=0)


@pytest.mark.parametrize("entry,expected", [(1e30, "exact"), (1e-30, "exact"), (math.inf, math.inf)])
def test_a_large_tensor_whose_squares_over_or_underflow_is_recomputed_exactly(entry, expected):
    grad = torch.full((norms._ROW + 5,), 0.5)
    grad[:1000] = entry  # 1e30 ** 2 overflows float32, 1e-30 ** 2 underflows (and the rest must not hide it)
    if entry < 1:
        grad[1000:] = entry / 2
    norm = float(gradclip.get_total_norm([grad]))
    want = _exact(grad) if expected == "exact" else expected
    assert norm == want or math.isclose(norm, want, rel_tol=1e-6)


def test_a_large_tensor_with_a_nan_has_a_nan_norm_and_a_non_contiguous_one_is_right():
    grad = torch.randn(norms._ROWS_MIN_NUMEL * 2)
    grad[7] = math.nan
    assert math.isnan(float(gradclip.get_total_norm([grad])))
    matrix = torch.randn(512, 300, generator=torch.Generator().manual_seed(2)).t()  # not contiguous
    assert not matrix.is_contiguous()
    assert math.isclose(float(gradclip.get_total_norm([matrix])), _exact(matrix), rel_tol=1e-6)
