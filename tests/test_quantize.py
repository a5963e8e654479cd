"""signSGD's sign and QSGD (gradclip.quantize): against torch.sign, the paper entry by entry, and unbiasedness."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.params import clone_params, make_params
from support.references import qsgd_paper
from support.strategies import seeds
from support.sync import no_host_sync

from gradclip.quantize import qsgd_quantize, qsgd_quantize_grad_, sign_grad_

NAN, INF = float("nan"), float("inf")


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


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 30), s=st.integers(1, 16), seed=seeds())
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


# --- no host-device synchronisation ------------------------------------------------------------


def test_default_paths_never_read_a_value_on_the_host():
    params = make_params([(4, 3), (3,), (2, 2, 2)], seed=9)
    with no_host_sync():
        qsgd_quantize_grad_(params, 4)
        sign_grad_(params)


# --- bad input ------------------------------------------------------------------------------


def test_bad_arguments_raise_naming_them():
    p = make_params([(3,)])[0]
    for bad in (0, -2):
        with pytest.raises(ValueError, match="levels"):
            qsgd_quantize_grad_([p], bad)
    with pytest.raises(TypeError, match="levels"):
        qsgd_quantize_grad_([p], 2.5)
    with pytest.raises(TypeError, match="generator"):
        qsgd_quantize_grad_([p], 2, generator=0)
