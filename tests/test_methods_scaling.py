"""Per-tensor, block-RMS, soft and quantized gradients, and monitoring, against direct formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers_methods import NoSync, clone_params, make_params
from hypothesis import given, settings
from hypothesis import strategies as st

from gradclip import clip_grad_norm_
from gradclip.layerwise import clip_grad_block_rms_, clip_grad_norm_per_tensor_
from gradclip.clip import clip_grad_norm_report_
from gradclip.tuning import clipped_fraction, should_lower_lr, suggest_threshold
from gradclip.quantize import qsgd_quantize, qsgd_quantize_grad_, sign_grad_
from gradclip.result import ClipResult
from gradclip.soft import soft_clip_grad_norm_, soft_clip_grad_value_

shapes_strategy = st.lists(st.lists(st.integers(1, 6), min_size=0, max_size=3).map(tuple), min_size=1, max_size=8)
NAN, INF = float("nan"), float("inf")


# --- per-tensor norm clipping (Keras clipnorm) ----------------------------------------------


def keras_clipnorm(values, clipnorm):
    """keras/src/optimizers/base_optimizer.py, per variable, transcribed."""
    l2sum = (values * values).sum()
    l2norm = torch.sqrt(l2sum) if l2sum > 0 else l2sum
    return values * clipnorm / torch.maximum(l2norm, torch.tensor(clipnorm, dtype=values.dtype))


@settings(max_examples=40, deadline=None)
@given(shapes=shapes_strategy, max_norm=st.floats(0.01, 10.0), scale=st.sampled_from([1e-3, 1.0, 100.0]),
       norm_type=st.sampled_from([1.0, 2.0, math.inf]), foreach=st.sampled_from([None, False]), seed=st.integers(0, 2**16))
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
            torch.testing.assert_close(p.grad, keras_clipnorm(b.grad, max_norm), rtol=1e-5, atol=1e-12)
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
    expected = torch.stack([p.grad.double().norm() for p in params])
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


def optax_block_rms(u, threshold):
    """optax/transforms/_clipping.py clip_by_block_rms, transcribed."""
    rms = torch.sqrt(torch.mean(u.abs() ** 2))
    return u / torch.clamp(rms / threshold, min=1.0)


@settings(max_examples=40, deadline=None)
@given(shapes=shapes_strategy, max_rms=st.floats(0.01, 5.0), scale=st.sampled_from([1e-2, 1.0, 100.0]),
       seed=st.integers(0, 2**16))
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


# --- soft clipping --------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(shapes=shapes_strategy, max_norm=st.floats(0.01, 10.0), scale=st.sampled_from([1e-3, 1.0, 100.0]),
       seed=st.integers(0, 2**16))
def test_soft_norm_clipping_formula_and_factor_of_two_bound(shapes, max_norm, scale, seed):
    ours = make_params(shapes, torch.float64, seed, scale)
    before = clone_params(ours)
    norm = soft_clip_grad_norm_(ours, max_norm)
    flat = torch.cat([b.grad.reshape(-1) for b in before])
    total = float(flat.norm())
    assert math.isclose(float(norm), total, rel_tol=1e-12)
    soft = max_norm / (total + max_norm)
    hard = min(1.0, max_norm / total)
    assert 0.5 * hard <= soft * (1 + 1e-12) and soft <= hard * (1 + 1e-12)
    for p, b in zip(ours, before):
        torch.testing.assert_close(p.grad, b.grad * max_norm / (total + max_norm), rtol=1e-12, atol=1e-300)
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
@given(shapes=shapes_strategy, alpha=st.floats(0.0, 10.0), scale=st.sampled_from([1e-2, 1.0, 100.0]),
       foreach=st.sampled_from([None, False]), seed=st.integers(0, 2**16))
def test_soft_value_clipping_formula_and_bounds(shapes, alpha, scale, foreach, seed):
    ours = make_params(shapes, torch.float64, seed, scale)
    before = clone_params(ours)
    assert soft_clip_grad_value_(ours, alpha, foreach=foreach) is None
    for p, b in zip(ours, before):
        expected = torch.tensor([g / (1 + alpha * abs(g)) for g in b.grad.reshape(-1).tolist()], dtype=torch.float64)
        torch.testing.assert_close(p.grad.reshape(-1), expected, rtol=1e-12, atol=1e-300)
        assert torch.equal(torch.sign(p.grad), torch.sign(b.grad))
        assert torch.all(p.grad.abs() <= b.grad.abs())
        if alpha > 0:
            hard = b.grad.clamp(-1 / alpha, 1 / alpha).abs()
            assert torch.all(p.grad.abs() < 1 / alpha)
            assert torch.all(0.5 * hard <= p.grad.abs() * (1 + 1e-12)) and torch.all(p.grad.abs() <= hard * (1 + 1e-12))


def test_soft_value_non_finite():
    p = make_params([(4,)])[0]
    p.grad = torch.tensor([NAN, INF, -INF, 2.0])
    soft_clip_grad_value_([p], 1.0)
    assert torch.isnan(p.grad[:3]).all() and float(p.grad[3]) == pytest.approx(2 / 3)


# --- quantization ---------------------------------------------------------------------------


def test_sign_matches_torch_sign_and_keeps_nan():
    params = make_params([(5, 3), (7,)], seed=2)
    params[1].grad[2] = 0.0
    params[1].grad[3] = NAN
    params[1].grad[4] = -INF
    expected = [torch.sign(p.grad) for p in params]
    sign_grad_(params)
    assert torch.equal(params[0].grad, expected[0])
    assert torch.isnan(params[1].grad[3]) and float(params[1].grad[4]) == -1.0 and float(params[1].grad[2]) == 0.0
    assert torch.isnan(params[1].grad).sum() == 1
    assert float(torch.sign(torch.tensor(NAN))) == 0.0  # why the NaN needs keeping


def qsgd_paper(v, s, uniforms):
    """Alistarh et al. 2017, eq. (1), entry by entry, in float64, given the uniform draws."""
    norm = math.sqrt(sum(x * x for x in v))
    out = []
    for x, u in zip(v, uniforms):
        if norm == 0:
            out.append(0.0)
            continue
        r = abs(x) / norm * s
        level = math.floor(r)
        xi = (level + 1) / s if u < r - level else level / s
        out.append(norm * math.copysign(1.0, x) * xi if x != 0 else 0.0)
    return out


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 30), s=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_qsgd_matches_the_paper_entry_by_entry(n, s, seed):
    v = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    p = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))
    p.grad = v.clone()
    norms = qsgd_quantize_grad_([p], s, generator=torch.Generator().manual_seed(seed + 1))
    uniforms = torch.rand(n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).tolist()
    expected = qsgd_paper(v.tolist(), s, uniforms)
    torch.testing.assert_close(p.grad, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert math.isclose(float(norms[0]), float(v.norm()), rel_tol=1e-12)
    levels = p.grad.abs() / v.norm() * s  # every entry on the lattice ||v|| k / s
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-9)


def assert_unbiased(quantize, v, s, samples=4000, seed=0):
    """The mean of many quantizations is v, within 5 standard errors of the worst-case variance.

    Each entry of Q_s(v) is ||v||/s times a Bernoulli offset, so its variance is at most
    (||v||/s)^2 / 4 (Alistarh et al., Lemma 3.1), and the mean of N draws has standard
    error at most ||v|| / (2 s sqrt(N)).
    """
    generator = torch.Generator().manual_seed(seed)
    draws = torch.stack([quantize(v, s, generator) for _ in range(samples)])
    bound = float(v.norm()) / (2 * s * math.sqrt(samples))
    error = (draws.mean(0) - v).abs().max()
    assert error <= 5 * bound, f"bias {float(error):.4g} > 5 standard errors {5 * bound:.4g}"
    variance = ((draws - v) ** 2).sum(1).mean()
    d = v.numel()
    assert variance <= min(d / s**2, math.sqrt(d) / s) * float(v.norm()) ** 2 * 1.1  # Lemma 3.1, with sampling slack


@pytest.mark.parametrize("s", [1, 3, 8])
def test_qsgd_is_unbiased_and_the_test_catches_a_biased_rounding(s):
    v = torch.randn(40, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
    assert_unbiased(lambda x, levels, gen: qsgd_quantize(x, levels, gen), v, s)

    def round_to_nearest(x, levels, gen):
        norm = x.norm()
        return norm * x.sign() * torch.round(x.abs() / norm * levels) / levels

    with pytest.raises(AssertionError, match="bias"):
        assert_unbiased(round_to_nearest, v, s)


def test_qsgd_seeded_zero_and_non_finite():
    params = make_params([(20,), (3, 4)], seed=7)
    other = clone_params(params)
    qsgd_quantize_grad_(params, 4, torch.Generator().manual_seed(3))
    qsgd_quantize_grad_(other, 4, torch.Generator().manual_seed(3))
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(params, other))
    zero = make_params([(5,)])[0]
    zero.grad.zero_()
    assert float(qsgd_quantize_grad_([zero], 2)[0]) == 0.0 and torch.equal(zero.grad, torch.zeros(5))
    for bad in (NAN, INF):
        p = make_params([(6,)], seed=8)[0]
        p.grad[2] = bad
        qsgd_quantize_grad_([p], 4)
        assert torch.isnan(p.grad).all()


# --- monitoring -----------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(shapes=shapes_strategy, max_norm=st.floats(0.0, 10.0), seed=st.integers(0, 2**16))
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


def test_default_paths_never_read_a_value_on_the_host():
    params = make_params([(4, 3), (3,), (2, 2, 2)], seed=9)
    with NoSync():
        clip_grad_norm_report_(params, 1.0)
        clip_grad_norm_per_tensor_(params, 1.0)
        clip_grad_block_rms_(params, 0.1)
        soft_clip_grad_norm_(params, 1.0)
        soft_clip_grad_value_(params, 2.0)
        qsgd_quantize_grad_(params, 4)
        sign_grad_(params)
        history = torch.rand(50)
        suggest_threshold(history)
        should_lower_lr(clipped_fraction(history, 0.5))
    with pytest.raises(AssertionError, match="sync"), NoSync():
        float(history[0])  # the guard does catch a read


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.floats(0.0, 1e6), min_size=1, max_size=200), q=st.floats(0.0, 1.0))
def test_suggest_threshold_is_numpys_linear_quantile(values, q):
    expected = np.quantile(np.array(values), q)
    assert math.isclose(float(suggest_threshold(values, q)), expected, rel_tol=1e-9, abs_tol=1e-9)
    tensor = suggest_threshold(torch.tensor(values, dtype=torch.float64), q)
    assert math.isclose(float(tensor), expected, rel_tol=1e-9, abs_tol=1e-9)


def test_clipped_fraction_and_lr_advice():
    results = [ClipResult(torch.tensor(n), torch.tensor(1.0), torch.clamp(1.0 / torch.tensor(n + 1e-6), max=1.0))
               for n in (0.5, 2.0, 3.0, 4.0)]
    assert float(clipped_fraction(results)) == 0.75
    assert bool(should_lower_lr(clipped_fraction(results)))
    assert float(clipped_fraction([0.5, 2.0, NAN, 0.1], threshold=1.0)) == 0.5  # NaN counts as clipped
    assert float(clipped_fraction(torch.tensor([True, False]))) == 0.5
    assert not bool(should_lower_lr(0.5)) and bool(should_lower_lr(0.51))
    assert not bool(should_lower_lr(torch.tensor(0.2)))
    assert math.isnan(float(suggest_threshold([1.0, NAN, 3.0])))  # NaN is not skipped
    norms = [r.norm for r in results]
    assert float(suggest_threshold(norms, q=0.5)) == pytest.approx(2.5)


def test_bad_arguments_raise_naming_them():
    p = make_params([(3,)])[0]
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_per_tensor_([p], -1.0)
    with pytest.raises(ValueError, match="max_rms"):
        clip_grad_block_rms_([p], 0.0)
    with pytest.raises(ValueError, match="max_rms"):
        clip_grad_block_rms_([p], -1.0)
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
    for bad in (0, -2):
        with pytest.raises(ValueError, match="levels"):
            qsgd_quantize_grad_([p], bad)
    with pytest.raises(TypeError, match="levels"):
        qsgd_quantize_grad_([p], 2.5)
    with pytest.raises(TypeError, match="generator"):
        qsgd_quantize_grad_([p], 2, generator=0)
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_report_([p], NAN)
    for bad_q in (-0.1, 1.5):
        with pytest.raises(ValueError, match="q must"):
            suggest_threshold([1.0], bad_q)
    with pytest.raises(ValueError, match="empty"):
        suggest_threshold([])
    with pytest.raises(ValueError, match="1-D"):
        suggest_threshold(torch.ones(2, 2))
    with pytest.raises(TypeError, match="norm_history"):
        suggest_threshold("1,2")
    with pytest.raises(ValueError, match="threshold is required"):
        clipped_fraction([1.0, 2.0])
    with pytest.raises(ValueError, match="limit"):
        should_lower_lr(0.3, limit=1.0)
    with pytest.raises(ValueError, match="fraction"):
        should_lower_lr(1.5)
