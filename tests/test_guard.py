"""SpikeGuard: decisions against plain-Python statistics, and skipped steps leave no trace."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from support.params import scalar_param
from support.references import spike_guard_decisions

from gradclip.guard import SpikeGuard


@pytest.mark.parametrize("mode, k", [("zscore", 3.0), ("median", 2.0)])
def test_decisions_equal_a_plain_python_reference(mode, k):
    rng = np.random.default_rng(0)
    norms = list(np.abs(1.0 + 0.2 * rng.standard_normal(150)))
    for i, value in [(30, 5.0), (31, math.nan), (60, math.inf), (61, 4.0), (100, 2.5), (5, 9.0)]:
        norms[i] = value
    guard = SpikeGuard(mode, threshold=k, window=24, min_history=10)
    got = [bool(guard([scalar_param(float(g))]).scale == 0) for g in norms]
    expected = spike_guard_decisions(norms, mode, k, 24, 10)
    assert got == expected
    assert sum(expected) >= 4 and int(guard.skipped_steps) == sum(expected)


def make(optimizer_name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.01)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.01)
    return model, optimizer


def snapshot(model, optimizer):
    params = [p.detach().clone() for p in model.parameters()]
    state = [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
             for s in optimizer.state.values()]
    return params, state


def same(a, b):
    (pa, sa), (pb, sb) = a, b
    return all(torch.equal(x, y) for x, y in zip(pa, pb)) and len(sa) == len(sb) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k]
                                     for k in x) for x, y in zip(sa, sb))


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
def test_a_skipped_step_leaves_parameters_and_optimizer_state_bitwise_unchanged(optimizer_name):
    model, optimizer = make(optimizer_name)
    guard = SpikeGuard(threshold=3.0, window=16, min_history=5).attach(optimizer)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    skipped = 0
    for step in range(30):
        optimizer.zero_grad()
        scale = {12: 1e3, 20: math.inf, 21: math.nan}.get(step, 1.0)
        (model(x).pow(2).mean() * scale).backward()
        before = snapshot(model, optimizer)
        optimizer.step()
        after = snapshot(model, optimizer)
        if step in (12, 20, 21):
            assert same(before, after), step
            skipped += 1
        else:
            assert not same(before, after), step
    assert int(guard.skipped_steps) == skipped == 3


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
def test_the_step_after_a_skip_equals_a_run_that_never_saw_the_spike(optimizer_name):
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(2))
    runs = []
    for with_spike in (False, True):
        model, optimizer = make(optimizer_name)
        SpikeGuard(threshold=3.0, window=16, min_history=5).attach(optimizer)
        for step in range(20):
            if step == 10 and not with_spike:
                continue
            optimizer.zero_grad()
            (model(x).pow(2).mean() * (1e4 if step == 10 else 1.0)).backward()
            optimizer.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    # the guarded history differs by one recorded norm only, so decisions agree; weights are bitwise equal
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_first_optimizer_step_skipped_leaves_no_state():
    model, optimizer = make("adam")
    SpikeGuard().attach(optimizer)
    params = [p.detach().clone() for p in model.parameters()]
    (model(torch.ones(1, 4)).sum() * math.inf).backward()
    optimizer.step()
    assert len(optimizer.state) == 0
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))


def test_works_with_grad_scaler():
    model, optimizer = make("adam")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    guard = SpikeGuard(threshold=3.0, window=16, min_history=5, scaler=scaler).attach(optimizer)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(3))
    for step in range(20):
        optimizer.zero_grad()
        loss = model(x).pow(2).mean() * {10: 1e3, 15: math.inf}.get(step, 1.0)
        scaler.scale(loss).backward()
        before = snapshot(model, optimizer)
        scaler.step(optimizer)
        scaler.update()
        if step in (10, 15):
            assert same(before, snapshot(model, optimizer)), step
        else:
            # the guard saw the true (unscaled) norm
            assert float(guard.last_result.norm) < 100.0
    assert int(guard.skipped_steps) == 1  # step 15: the scaler skipped it before the guard ran
    assert guard.steps == 19


def test_guard_never_changes_gradients():
    w = scalar_param(3.0)
    SpikeGuard()([w])
    assert w.grad.tolist() == [3.0]
