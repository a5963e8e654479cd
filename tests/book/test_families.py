"""The clipping families (gradclip_book.families) against numpy, on a recorded gradient stream."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradclip_book import angle_degrees, apply_method, clip_vector, record_gradient_stream


def test_clip_vector_and_angles_against_numpy():
    g = np.array([3.0, 4.0])
    assert clip_vector(g, 1.0, "norm") == pytest.approx(g / 5)
    assert clip_vector(g, 1.0, "value") == pytest.approx([1.0, 1.0])
    assert angle_degrees(g, 2 * g) == 0.0
    assert angle_degrees([1, 0], [0, 1]) == pytest.approx(90.0)
    assert angle_degrees([3, 1], [1, 1]) == pytest.approx(math.degrees(math.atan2(1, 1) - math.atan2(1, 3)))


def test_methods_on_a_recorded_stream():
    stream = record_gradient_stream(steps=40, spike_at=30)
    norms = stream.norms
    assert max(range(40), key=lambda t: norms[t]) == 30
    norm = apply_method("norm", stream, max_norm=0.5)
    expected = [min(n, 0.5 * n / (n + 1e-6)) for n in norms]
    assert norm.norm_after == pytest.approx(expected, rel=1e-9)
    assert max(norm.angle) < 1e-5
    value = apply_method("value", stream, clip_value=1e-3)
    reference = [np.clip(torch.cat([g.flatten() for g in step]).numpy(), -1e-3, 1e-3) for step in stream.grads]
    assert value.norm_after == pytest.approx([np.linalg.norm(r) for r in reference], rel=1e-9)
    sign = apply_method("sign", stream)
    d = sum(g.numel() for g in stream.grads[0])
    assert max(sign.norm_after) <= math.sqrt(d) + 1e-9
    assert apply_method("none", stream).norm_after == pytest.approx(norms)


def test_default_settings_threshold_uses_only_the_warmup_prefix():
    import gradclip
    from gradclip_book.families import default_settings, record_gradient_stream

    s = record_gradient_stream(steps=12, spike_at=10)
    c = default_settings(s, warmup=8)["norm"]["max_norm"]
    assert c == pytest.approx(float(gradclip.suggest_threshold(s.norms[:8], 0.9)))
    assert c < s.norms[10]
