"""ZClip against a direct transcription of the authors' published algorithm (bluorion-com/ZClip)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from support.params import scalar_param
from support.references import ReferenceZClip

from gradclip.zclip import ZClip


def norms_with_spikes(seed, n=90):
    rng = np.random.default_rng(seed)
    values = 0.5 + 0.1 * rng.standard_normal(n)
    values[[26, 27, 40, 41, 42, 70]] = [3.0, 1.5, 20.0, 0.9, 8.0, 100.0]  # spikes just after warm-up too
    values[10] = 2.0  # a spike inside warm-up
    return np.abs(values)


CONFIGS = [
    {},
    {"max_grad_norm": None},
    {"max_grad_norm": 0.55},
    {"clip_option": "mean", "max_grad_norm": None},
    {"mode": "percentile", "max_grad_norm": None},
    {"mode": "percentile", "z_thresh": 1.0, "max_grad_norm": 0.6},
    {"clip_factor": 0.7, "max_grad_norm": None, "alpha": 0.9},
    {"skip_update_on_spike": True, "max_grad_norm": None},
    {"warmup_steps": 1, "max_grad_norm": None},
    {"warmup_steps": 5, "z_thresh": 1.5, "eps": 1e-3, "max_grad_norm": 2.0},
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "defaults")
@pytest.mark.parametrize("seed", [0, 1])
def test_thresholds_and_coefficients_equal_the_reference(config, seed):
    ours, reference = ZClip(**config), ReferenceZClip(**config)
    spikes = 0
    for step, g in enumerate(norms_with_spikes(seed)):
        result = ours([scalar_param(float(g))])
        coef, clip_val = reference.step(float(g))
        assert math.isclose(float(result.scale), coef, rel_tol=1e-9, abs_tol=0), (step, config)
        if clip_val is not None:
            spikes += 1
            cap = config.get("max_grad_norm", 1.0)
            expected = clip_val if cap is None else min(clip_val, cap)
            assert math.isclose(float(result.threshold), expected, rel_tol=1e-12), step
        if reference.initialized:
            assert math.isclose(float(ours.mean), reference.mean, rel_tol=1e-12)
            assert math.isclose(float(ours.var), reference.var, rel_tol=1e-9, abs_tol=1e-300)
        else:
            assert ours.mean is None
    assert spikes >= 3  # the sequence really exercises the spike branch


def test_warmup_boundary_starts_the_ema_on_the_last_warmup_step():
    zclip = ZClip(warmup_steps=3, max_grad_norm=None)
    for g in (1.0, 2.0, 3.0):
        assert zclip.mean is None
        zclip([scalar_param(g)])
    assert float(zclip.mean) == 2.0 and float(zclip.var) == pytest.approx(2 / 3, rel=1e-15)
    result = zclip([scalar_param(50.0)])  # the first adaptive step
    assert bool(result.clipped)


def test_default_max_grad_norm_caps_warmup_like_torch():
    w = scalar_param(4.0, torch.float32)
    expected = w.grad.clone()
    result = ZClip()([w])
    torch.testing.assert_close(w.grad, expected * (1.0 / (4.0 + 1e-6)), rtol=1e-7, atol=0)
    assert float(result.threshold) == 1.0


def test_nonfinite_norm_does_not_poison_the_ema():
    zclip = ZClip(warmup_steps=2, max_grad_norm=None)
    for g in (1.0, 1.0, 1.1):
        zclip([scalar_param(g)])
    mean, var = float(zclip.mean), float(zclip.var)
    zclip([scalar_param(math.nan)])
    zclip([scalar_param(math.inf)])
    assert (float(zclip.mean), float(zclip.var)) == (mean, var)


def test_float32_state_stays_close_to_the_reference():
    ours, reference = ZClip(dtype=torch.float32, max_grad_norm=None), ReferenceZClip(max_grad_norm=None)
    for g in norms_with_spikes(3):
        result = ours([scalar_param(float(g))])
        coef, _ = reference.step(float(g))
        assert math.isclose(float(result.scale), coef, rel_tol=1e-5)


def test_a_nonfinite_norm_takes_no_slot_of_the_warmup():
    # the reported case: warmup_steps=1, the first norm inf -> mean and var were NaN for good; then it
    # started the EMA late; now the call changes nothing, as a step GradScaler skips never reaches it
    zclip = ZClip(warmup_steps=1, max_grad_norm=None)
    zclip([scalar_param(math.inf)])
    assert zclip.warming_up and zclip.mean is None and zclip.steps == 0
    first = zclip([scalar_param(1.0)])  # the warm-up's one norm
    assert float(first.scale) == 1.0 and float(first.threshold) == math.inf
    assert (float(zclip.mean), float(zclip.var)) == (1.0, 0.0) and zclip.steps == 1
    for _ in range(10):
        assert float(zclip([scalar_param(1.0)]).scale) == 1.0
    spike = zclip([scalar_param(1000.0)])
    assert bool(spike.clipped) and float(spike.norm * spike.scale) < 2.0


def test_nonfinite_norms_in_the_warmup_are_still_capped_by_max_grad_norm_and_not_counted():
    zclip = ZClip(warmup_steps=2, max_grad_norm=0.5)
    zclip([scalar_param(math.nan)])
    zclip([scalar_param(math.inf)])
    result = zclip([scalar_param(4.0)])
    assert float(result.threshold) == 0.5 and math.isclose(float(result.scale), 0.5 / (4.0 + 1e-6))
    assert zclip.warming_up  # one finite norm of two
    zclip([scalar_param(2.0)])
    assert float(zclip.mean) == 3.0 and float(zclip.var) == 1.0


@settings(max_examples=60, deadline=None)
@given(warmup=st.integers(1, 4),
       norms=st.lists(st.sampled_from([math.nan, math.inf, -math.inf, 0.0, 0.3, 1.0, 2.5, 40.0]), max_size=25),
       mode=st.sampled_from(["zscore", "percentile"]), skip=st.booleans())
@example(warmup=1, norms=[math.inf, 1.0, 1.0], mode="zscore", skip=False)  # the reported case
@example(warmup=3, norms=[math.nan, math.inf, math.nan, math.inf, 0.3], mode="percentile", skip=True)
def test_mean_and_var_are_never_nan_once_a_finite_norm_was_seen(warmup, norms, mode, skip):
    zclip = ZClip(warmup_steps=warmup, max_grad_norm=None, mode=mode, skip_update_on_spike=skip)
    seen_finite = False
    for step, g in enumerate(norms):
        result = zclip([scalar_param(g)])
        seen_finite |= math.isfinite(g)
        assert not result.scale.isnan()
        if not zclip.warming_up and seen_finite:
            assert math.isfinite(float(zclip.mean)) and math.isfinite(float(zclip.var)), (step, norms)
    for _ in range(30):  # a steady run, then a spike: clipped
        zclip([scalar_param(1.0)])
    assert bool(zclip([scalar_param(1000.0)]).clipped)


def test_the_results_dtypes_do_not_change_when_the_warm_up_ends():
    clipper = ZClip(warmup_steps=3)
    dtypes = set()
    for step in range(6):
        p = torch.nn.Parameter(torch.zeros(3))
        p.grad = torch.full((3,), 0.1 * (step + 1))
        r = clipper([p])
        dtypes.add((r.norm.dtype, r.threshold.dtype, r.scale.dtype))
    assert dtypes == {(torch.float32, torch.float64, torch.float32)}


# --- the CPU's host step equals the tensor step (what accelerators and torch.compile run) to the last bit ----------

_EDGE_FLOATS = [0.0, -0.0, 1e-300, 0.4, 0.5, 1.0, 2.5, 7.0, 1e300, math.inf, math.nan]
_STEP_CONFIGS = CONFIGS + [{"eps": 0.0, "max_grad_norm": None}, {"eps": 0.0, "mode": "percentile"},
                           {"eps": 0.0, "clip_option": "mean", "skip_update_on_spike": True}]


def _bits(x: float) -> tuple[bool, float]:
    return (True, 0.0) if math.isnan(x) else (False, math.copysign(1.0, x) * abs(x) if x else math.copysign(0.0, x))


@pytest.mark.parametrize("config", _STEP_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "defaults")
@settings(max_examples=60, deadline=None)
@given(g=st.one_of(st.sampled_from(_EDGE_FLOATS), st.floats(0, 50)),
       mean=st.one_of(st.sampled_from(_EDGE_FLOATS), st.floats(-1, 50)),
       var=st.one_of(st.sampled_from(_EDGE_FLOATS + [-1.0]), st.floats(0, 50)))
@example(g=0.5, mean=0.5, var=0.0).via("z = 0: a division by zero in the adaptive threshold")
def test_host_ema_step_equals_the_tensor_step_bit_for_bit(config, g, mean, var):
    clipper = ZClip(**config)
    wide = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    on_tensors = [float(t) for t in clipper._ema_step(wide(g), wide(mean), wide(var))]
    on_floats = clipper._ema_step_host(g, mean, var)
    for a, b in zip(on_tensors, on_floats):
        assert _bits(a) == _bits(b) and math.copysign(1.0, a) == math.copysign(1.0, b), (on_tensors, on_floats)
