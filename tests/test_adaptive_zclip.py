"""ZClip against a direct transcription of the authors' published algorithm (bluorion-com/ZClip)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradclip.zclip import ZClip
from helpers_adaptive import scalar_param


class ReferenceZClip:
    """zclip/zclip.py of bluorion-com/ZClip, with Python floats; returns what each step did."""

    def __init__(self, alpha=0.97, z_thresh=2.5, max_grad_norm=1.0, eps=1e-6, warmup_steps=25,
                 mode="zscore", clip_option="adaptive_scaling", clip_factor=1.0, skip_update_on_spike=False):
        self.alpha, self.z_thresh, self.max_grad_norm, self.eps = alpha, z_thresh, max_grad_norm, eps
        self.warmup_steps, self.mode, self.clip_option = warmup_steps, mode, clip_option
        self.clip_factor, self.skip_update_on_spike = clip_factor, skip_update_on_spike
        self.buffer, self.initialized, self.mean, self.var = [], False, None, None

    def _compute_clip_val(self, g):
        std = self.var ** 0.5
        if self.mode == "percentile":
            threshold = self.mean + self.z_thresh * std
            if g > threshold:
                return threshold
        else:
            z = (g - self.mean) / (std + self.eps)
            if z > self.z_thresh:
                if self.clip_option == "adaptive_scaling":
                    eta = z / self.z_thresh
                    return (self.mean + (self.z_thresh * std) / eta) * self.clip_factor
                return self.mean
        return None

    def step(self, g):
        """(coefficient applied, adaptive clip value or None) for norm g."""
        if not self.initialized:
            self.buffer.append(g)
            if len(self.buffer) >= self.warmup_steps:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
                self.initialized, self.buffer = True, []
            if self.max_grad_norm is None:
                return 1.0, None
            return min(1.0, self.max_grad_norm / (g + 1e-6)), None  # torch.nn.utils.clip_grad_norm_
        clip_val = self._compute_clip_val(g)
        adaptive = clip_val if clip_val is not None else g
        effective = min(adaptive, self.max_grad_norm) if self.max_grad_norm is not None else adaptive
        coef = effective / (g + 1e-6) if g > effective else 1.0
        if not (clip_val is not None and self.skip_update_on_spike):
            x = clip_val if clip_val is not None else g
            self.mean = self.alpha * self.mean + (1 - self.alpha) * x
            self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mean) ** 2
        return coef, clip_val


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
