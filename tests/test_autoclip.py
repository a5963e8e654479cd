"""AutoClip against numpy.percentile over the same history, and against torch's clipping."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from support.params import scalar_param
from support.references import autoclip_threshold

import gradclip._norms
import gradclip.autoclip
from gradclip.autoclip import AutoClip


def run_against_numpy(values, percentile, window, include_current, dtype=torch.float64):
    clipper = AutoClip(percentile, window, include_current, dtype=dtype)
    history = []
    for value in values:
        w = scalar_param(float(value))
        result = clipper([w])
        if include_current:
            history.append(value)
        live = history if window is None else history[-window:]
        expected = np.percentile(np.asarray(live, dtype=np.float64 if dtype == torch.float64 else np.float32),
                                 percentile) if live else math.inf
        yield float(result.threshold), float(expected), float(result.scale), float(result.norm)
        if not include_current:
            history.append(value)


SEQUENCES = {
    "random": lambda rng, n: rng.lognormal(size=n),
    "ties": lambda rng, n: rng.choice([0.5, 1.0, 2.0], size=n),
    "constant": lambda rng, n: np.full(n, 1.25),
    "increasing": lambda rng, n: np.arange(1, n + 1, dtype=np.float64),
    "decreasing": lambda rng, n: np.arange(n, 0, -1, dtype=np.float64),
}


@pytest.mark.parametrize("kind", sorted(SEQUENCES))
@pytest.mark.parametrize("window", [None, 1, 9])
@pytest.mark.parametrize("include_current", [True, False])
def test_threshold_is_numpy_percentile_bitwise_in_float64(kind, window, include_current):
    rng = np.random.default_rng(hash((kind, window, include_current)) % 2**32)
    values = SEQUENCES[kind](rng, 60)
    percentiles = (10.0, 0.0, 100.0, float(rng.uniform(0, 100))) if kind == "ties" else (10.0, float(rng.uniform(0, 100)))
    for percentile in percentiles:
        for got, expected, _, _ in run_against_numpy(values, percentile, window, include_current):
            assert got == expected


def test_long_history_crosses_many_rebuilds_and_stays_exact():
    rng = np.random.default_rng(1)
    values = rng.exponential(size=700)
    for got, expected, _, _ in run_against_numpy(values, 37.5, None, True):
        assert got == expected
    for got, expected, _, _ in run_against_numpy(values[:400], 90.0, 150, False):
        assert got == expected


def test_float32_history_equals_numpy_float32_to_rounding():
    rng = np.random.default_rng(2)
    values = np.float32(rng.lognormal(size=200)).astype(np.float64)
    for got, expected, _, _ in run_against_numpy(values, 10.0, 50, True, dtype=torch.float32):
        assert math.isclose(got, expected, rel_tol=2e-7)


def test_gradients_equal_torch_clipping_with_the_numpy_threshold():
    rng = np.random.default_rng(3)
    clipper = AutoClip(25.0)
    history = []
    for step in range(30):
        grads = [torch.tensor(rng.normal(size=s) * rng.lognormal(), dtype=torch.float32) for s in [(4, 3), (5,)]]
        ours = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        theirs = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        result = clipper(ours)
        history.append(float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads]))))
        threshold = np.percentile(history, 25.0)
        assert float(result.threshold) == threshold
        norm = history[-1]
        factor = threshold / norm if norm > threshold else 1.0  # to exactly the threshold, only above it
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p.grad, (q.grad.double() * factor).float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("on_device", [False, True], ids=["host", "device"])
@pytest.mark.parametrize("include_current", [True, False])
@pytest.mark.parametrize("window", [None, 3])
def test_nonfinite_norms_are_not_recorded_and_change_nothing(on_device, include_current, window, monkeypatch):
    # (a step GradScaler skips must leave the clipper as if it had not been called); "device": the
    # accelerator path, which decides on the device with nothing read on the host
    if on_device:
        monkeypatch.setattr(gradclip._norms, "HOST_CHECKS_ON_CPU", False)
    clipper = AutoClip(50.0, window=window, include_current=include_current)
    for value in (1.0, 2.0, 3.0):
        clipper([scalar_param(value)])
    for bad in (math.nan, math.inf):
        result = clipper([scalar_param(bad)])
        assert float(result.threshold) == np.percentile([1.0, 2.0, 3.0], 50.0) == 2.0
    assert clipper.history().tolist() == [1.0, 2.0, 3.0] and clipper.steps == 3
    result = clipper([scalar_param(4.0)])
    expected = [1.0, 2.0, 3.0, 4.0][-window:] if window else [1.0, 2.0, 3.0, 4.0]
    assert clipper.history().tolist() == expected
    assert float(result.threshold) == np.percentile(expected if include_current else [1.0, 2.0, 3.0], 50.0)
    # with an empty history the threshold is inf
    assert float(AutoClip(100.0)([scalar_param(math.inf)]).threshold) == math.inf


def test_first_step_without_current_norm_is_not_clipped():
    result = AutoClip(10.0, window=1000, include_current=False)([scalar_param(123.0)])
    assert float(result.threshold) == math.inf and float(result.scale) == 1.0


def test_history_is_bounded_by_the_window_and_in_order():
    clipper = AutoClip(50.0, window=4)
    for value in range(1, 11):
        clipper([scalar_param(float(value))])
    assert clipper.history().tolist() == [7.0, 8.0, 9.0, 10.0]
    assert len(clipper) == 4


def test_returned_thresholds_are_not_changed_by_later_steps():
    # gamma == 0 (p = 0, 100; p = 50 at odd lengths) returns an order statistic itself
    rng = np.random.default_rng(4)
    values = rng.lognormal(size=80)
    for percentile in (0.0, 50.0, 100.0, 37.5):
        for window in (None, 7):
            clipper = AutoClip(percentile, window)
            kept = [clipper([scalar_param(float(v))]).threshold for v in values]
            for step, threshold in enumerate(kept):
                live = values[: step + 1] if window is None else values[max(0, step + 1 - window) : step + 1]
                assert float(threshold) == np.percentile(live, percentile)


@pytest.mark.parametrize("on_device", [False, True], ids=["host", "device"])
def test_history_grows_past_its_first_buffer_and_stays_exact_and_in_order(on_device, monkeypatch):
    if on_device:  # the accelerator path, with small buffers so that they grow
        monkeypatch.setattr(gradclip._norms, "HOST_CHECKS_ON_CPU", False)
        monkeypatch.setattr(gradclip.autoclip, "TRACED_CAPACITY", 64)
    rng = np.random.default_rng(5)
    values = rng.lognormal(size=1100)
    values[[100, 500, 1050]] = math.inf
    clipper = AutoClip(62.5)
    for step, value in enumerate(values):
        result = clipper([scalar_param(float(value))])
        assert float(result.threshold) == autoclip_threshold(values[: step + 1], 62.5)
        if step in (0, 15, 16, 17, 1023, 1024, 1099):
            seen = values[: step + 1]
            assert clipper.history().tolist() == seen[np.isfinite(seen)].tolist()
    state = clipper.state_dict()
    resumed = AutoClip(62.5)
    resumed.load_state_dict(state)
    assert resumed.history().tolist() == values[np.isfinite(values)].tolist()


@pytest.mark.parametrize("window", [None, 9])
@pytest.mark.parametrize("cut", [5, 23, 40])  # before and after rebuilds (every 16) and evictions
def test_pickled_autoclip_rebuilds_its_buffers_and_stays_exact(window, cut):
    rng = np.random.default_rng(6)
    values = rng.lognormal(size=70)
    clipper = AutoClip(37.5, window)
    for value in values[:cut]:
        clipper([scalar_param(float(value))])
    clone = pickle.loads(pickle.dumps(clipper))
    assert clone.history().tolist() == clipper.history().tolist()
    for step in range(cut, len(values)):
        a = clipper([scalar_param(float(values[step]))])
        b = clone([scalar_param(float(values[step]))])
        live = values[: step + 1] if window is None else values[max(0, step + 1 - window) : step + 1]
        assert float(a.threshold) == float(b.threshold) == np.percentile(live, 37.5)


@pytest.mark.parametrize("include_current", [True, False])
@pytest.mark.parametrize("scale", [1e-7, 1.0, 1e5])
def test_a_norm_at_or_below_the_threshold_is_left_alone_and_not_counted_as_clipped(scale, include_current):
    # percentile 100 with the current norm included: the threshold equals every new maximum, and
    # torch's factor c / (c + 1e-6) would halve gradients of norm 1e-6 (found by a new user)
    clipper = AutoClip(100.0, include_current=include_current)
    rng = np.random.default_rng(5)
    for step in range(6):
        g = torch.tensor(rng.normal(size=7) * scale * (step + 1), dtype=torch.float64)  # growing norms
        p = torch.nn.Parameter(torch.zeros(7, dtype=torch.float64))
        p.grad = g.clone()
        result = clipper([p])
        if include_current or step == 0:
            assert torch.equal(p.grad, g) and not bool(result.clipped) and float(result.scale) == 1.0
        else:  # a new maximum above the earlier ones is clipped to exactly the largest earlier norm
            assert bool(result.clipped)
            torch.testing.assert_close(torch.linalg.vector_norm(p.grad), result.threshold, rtol=1e-12, atol=0)


def test_the_first_step_never_clips():
    for percentile in (0.0, 10.0, 100.0):
        p = torch.nn.Parameter(torch.zeros(3))
        p.grad = torch.tensor([3e-7, 4e-7, 0.0])
        result = AutoClip(percentile)([p])
        assert torch.equal(p.grad, torch.tensor([3e-7, 4e-7, 0.0])) and not bool(result.clipped)


def test_a_history_holding_nan_is_refused_naming_the_field():
    clipper = AutoClip(percentile=10.0)
    state = {"config": clipper._config(), "steps": 3, "history": torch.tensor([1.0, math.nan, 2.0], dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"state_dict\[.history.\] holds NaN or a negative value"):
        clipper.load_state_dict(state)
    state["history"] = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)  # a norm is never negative
    with pytest.raises(ValueError, match=r"state_dict\['history'\] holds NaN or a negative value"):
        clipper.load_state_dict(state)
    state["history"] = torch.tensor([1.0, math.inf, 2.0], dtype=torch.float64)  # inf sorts last: a valid history
    clipper.load_state_dict(state)
    assert clipper.history().tolist() == [1.0, math.inf, 2.0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_long_windowed_run_matches_numpy_percentile_at_every_step(dtype):
    # the host-side history: a deque in order, a list kept sorted; evictions remove the oldest copy of a tied norm
    generator = torch.Generator().manual_seed(5)
    norms = (torch.rand(400, generator=generator) * 4).round(decimals=1).double() + 0.1  # many ties
    clipper, window = AutoClip(percentile=25.0, window=37, include_current=True, dtype=dtype), 37
    w = torch.zeros(1, requires_grad=True)
    for step, g in enumerate(norms.tolist()):
        w.grad = torch.tensor([g])
        result = clipper([w])
        seen = torch.tensor(norms[: step + 1][-window:].tolist(), dtype=torch.float32).to(dtype).numpy()
        expected = np.percentile(seen, 25.0)
        assert float(result.threshold) == pytest.approx(float(expected), rel=0 if dtype == torch.float64 else 1e-6)
    assert len(clipper) == window


def test_a_shallow_copy_keeps_its_own_history():
    import copy

    original = AutoClip(percentile=50.0, window=3)
    w = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    for g in (1.0, 2.0):
        w.grad = torch.tensor([g], dtype=torch.float64)
        original([w])
    twin = copy.copy(original)
    for g in (5.0, 7.0):
        w.grad = torch.tensor([g], dtype=torch.float64)
        original([w])
    assert twin.history().tolist() == [1.0, 2.0] and len(twin) == 2 and twin.steps == 2
    assert original.history().tolist() == [2.0, 5.0, 7.0]
