"""SpikeGuard: decisions against plain-Python statistics, and skipped steps leave no trace."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
import torch

from support.params import scalar_param
from support.references import global_norm, olmo_core_skips, spike_guard_decisions
from support.sync import no_host_sync

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


# --- optimizer state that is not a tensor, and the closure path ------------------------------------


class CountingSGD(torch.optim.Optimizer):
    """SGD that keeps a Python int step counter per parameter, a list, and a param_group entry it changes."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr, "k": 0})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            group["k"] += 1
            for p in group["params"]:
                state = self.state[p]
                state["step"] = state.get("step", 0) + 1
                state.setdefault("history", []).append(state["step"])
                if state["step"] == 3:
                    state["third"] = p.detach().clone()
                p.add_(p.grad, alpha=-group["lr"])
        return loss


def full_snapshot(model, optimizer):
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(dict(optimizer.state), memo={id(p): p for p in model.parameters()})
    groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return params, state, groups


def equal_values(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(equal_values(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal_values(a[k], b[k]) for k in a)
    return a == b


def fully_same(a, b):
    (pa, sa, ga), (pb, sb, gb) = a, b
    return (all(torch.equal(x, y) for x, y in zip(pa, pb)) and sa.keys() == sb.keys()
            and all(equal_values(sa[p], sb[p]) for p in sa) and equal_values(ga, gb))


OPTIMIZERS = {
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "adam-amsgrad-fused": lambda ps: torch.optim.Adam(ps, lr=0.01, amsgrad=True, fused=True),
    "counting": lambda ps: CountingSGD(ps, lr=0.01),
    "lbfgs": lambda ps: torch.optim.LBFGS(ps, lr=0.05, max_iter=3, history_size=4),
}


@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("closure_step", [False, True])
def test_a_skipped_step_restores_every_state_entry_python_values_included(optimizer_name, closure_step):
    if optimizer_name == "lbfgs" and not closure_step:
        pytest.skip("LBFGS.step needs a closure")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    guard = SpikeGuard("median", threshold=3.0, window=16, min_history=3).attach(optimizer)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    spikes = {0: math.inf, 6: 1e3, 9: math.nan}  # step 0: the optimizer's first step, state not yet created
    for step in range(12):
        def closure():
            optimizer.zero_grad()
            loss = model(x).pow(2).mean() * spikes.get(step, 1.0)
            loss.backward()
            return loss

        before = full_snapshot(model, optimizer)
        if closure_step:
            optimizer.step(closure)
        else:
            closure()
            optimizer.step()
        after = full_snapshot(model, optimizer)
        assert fully_same(before, after) == (step in spikes), step
    assert int(guard.skipped_steps) == len(spikes)
    if optimizer_name == "counting":
        counter = optimizer.state[next(model.parameters())]
        assert counter["step"] == 12 - len(spikes) and optimizer.param_groups[0]["k"] == 12 - len(spikes)
        assert counter["history"] == list(range(1, 13 - len(spikes)))


def test_the_reported_int_counter_does_not_advance_on_a_skipped_step():
    w = torch.nn.Parameter(torch.zeros(2))
    optimizer = CountingSGD([w])
    SpikeGuard(threshold=3.0, min_history=3).attach(optimizer)
    for g in (1.0, 1.1, 0.9, 1.0):
        w.grad = torch.tensor([g, g])
        optimizer.step()
    assert optimizer.state[w]["step"] == 4
    w.grad = torch.tensor([500.0, 500.0])
    optimizer.step()
    assert optimizer.state[w]["step"] == 4 and optimizer.param_groups[0]["k"] == 4 and "third" in optimizer.state[w]
    w.grad = torch.tensor([1.0, 1.0])
    optimizer.step()
    assert optimizer.state[w]["step"] == 5


# (non-fused Adam reads its CPU step counter with .item() itself: only fused Adam steps without a host read)
@pytest.mark.parametrize("optimizer_name", ["sgd-momentum", "adam-amsgrad-fused"])
@pytest.mark.parametrize("closure_step", [False, True])
def test_tensor_only_optimizer_state_costs_no_sync(optimizer_name, closure_step):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    guard = SpikeGuard(threshold=3.0, window=16, min_history=3).attach(optimizer)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))

    def step(scale):
        def closure():
            optimizer.zero_grad()
            loss = model(x).pow(2).mean() * scale
            loss.backward()
            return loss

        if closure_step:
            optimizer.step(closure)
        else:
            closure()
            optimizer.step()

    step(1.0)  # the first step creates the optimizer's state: one host read of the decision
    with no_host_sync():
        for i in range(12):
            step(1e3 if i == 8 else 1.0)
    assert int(guard.skipped_steps) == 1


def test_lbfgs_skips_the_whole_step_if_any_evaluation_is_an_outlier_and_counts_it_once():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.05, max_iter=4)
    guard = SpikeGuard("median", threshold=3.0, window=64, min_history=3).attach(optimizer)
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(2))
    evaluations = []

    def closure_for(spike_at):
        def closure():
            optimizer.zero_grad()
            loss = model(x).pow(2).mean() * (1e3 if len(evaluations) == spike_at else 1.0)
            evaluations.append(1)
            loss.backward()
            return loss
        return closure

    optimizer.step(closure_for(-1))
    first = len(evaluations)
    assert first > 3 and int(guard.skipped_steps) == 0
    before = full_snapshot(model, optimizer)
    optimizer.step(closure_for(first + 1))  # the second evaluation of this step is a spike
    assert fully_same(before, full_snapshot(model, optimizer))
    assert int(guard.skipped_steps) == 1 and float(guard.last_result.scale) == 0.0
    assert guard.steps == len(evaluations)


def test_a_fused_optimizer_under_grad_scaler_is_guarded_on_the_true_norm():
    model, _ = make("adam")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    guard = SpikeGuard(threshold=3.0, window=16, min_history=5, scaler=scaler).attach(optimizer)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(3))
    for step in range(14):
        optimizer.zero_grad()
        loss = model(x).pow(2).mean() * (1e3 if step == 10 else 1.0)
        scaler.scale(loss).backward()
        before = snapshot(model, optimizer)
        scaler.step(optimizer)
        scaler.update()
        true = float(global_norm([p.grad for p in model.parameters()]))  # the fused kernel unscaled them
        assert math.isclose(float(guard.last_result.norm), true, rel_tol=1e-5), step
        assert same(before, snapshot(model, optimizer)) == (step == 10), step
    assert int(guard.skipped_steps) == 1


def test_state_dict_is_a_copy():
    guard = SpikeGuard(window=4, min_history=2)
    guard([scalar_param(1.0)])
    state = guard.state_dict()
    kept = state["history"].clone(), state["skipped_steps"].clone()
    for g in (2.0, 3.0, math.inf, 5.0):
        guard([scalar_param(g)])
    torch.testing.assert_close(state["history"], kept[0], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(state["skipped_steps"], kept[1])


def test_pickled_attached_guard_is_detached_and_holds_no_snapshot():
    model, optimizer = make("adam")
    guard = SpikeGuard(threshold=3.0, window=16, min_history=5).attach(optimizer)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    clone = pickle.loads(pickle.dumps(guard))
    assert not clone.attached and clone._snapshot is None and clone._copies is None
    assert torch.equal(clone.skipped_steps, guard.skipped_steps) and clone.steps == 1


# --- the loss as a second signal, and OLMo-core's rule ------------------------------------------------


def spiky(rng, n, base, spikes):
    values = list(base + 0.05 * base * rng.standard_normal(n))
    for i, factor in spikes:
        values[i] = base * factor
    return values


def test_olmo_core_preset_decides_as_the_reference_step_by_step():
    rng = np.random.default_rng(1)
    # loss spikes up and down (two-sided), norm spikes, one of each inside the reference's first 63 steps
    losses = spiky(rng, 400, 3.0, [(10, 9.0), (90, 2.0), (150, 0.3), (151, 2.5), (260, 1.8), (300, 0.99)])
    norms = spiky(rng, 400, 1.0, [(30, 20.0), (120, 1.6), (121, 1.5), (200, 0.2), (330, 3.0)])
    guard = SpikeGuard.olmo_core()
    got = []
    for loss, norm in zip(losses, norms):
        guard.record_loss(torch.tensor(loss, dtype=torch.float32))
        got.append(bool(guard([scalar_param(norm)]).scale == 0))
    expected = olmo_core_skips([float(torch.tensor(v, dtype=torch.float32)) for v in losses], norms)
    assert got == expected
    # a spike stays in the 128-value history and widens it, so later spikes within the window may pass
    assert sum(expected) >= 2 and int(guard.skipped_steps) == sum(expected)
    # one-sided, as OLMo-core has been since 2024-09-06: a loss or norm far below the history is stepped
    assert not expected[150] and not expected[200] and expected[151]


def test_loss_signal_alone_and_one_sided_skips_only_high_losses():
    rng = np.random.default_rng(2)
    losses = spiky(rng, 120, 2.0, [(50, 4.0), (80, 0.1)])
    guard = SpikeGuard(signals="loss", threshold=6.0, window=32, min_history=20)
    decisions = []
    for loss in losses:
        guard.record_loss(loss)
        decisions.append(bool(guard([scalar_param(1e6 if len(decisions) == 60 else 1.0)]).scale == 0))
    # the norm of step 60 is huge but not watched; the loss at 80 is low, and one-sided ignores it
    assert [i for i, d in enumerate(decisions) if d] == [50]


def test_non_finite_loss_skips_and_stays_out_of_the_history():
    guard = SpikeGuard.olmo_core(min_history=4, window=16)
    losses = [2.0, 2.1, 1.9, 2.0, 2.05, math.nan, 2.02, math.inf, 1.98]
    skips = []
    for loss in losses:
        guard.record_loss(loss)
        skips.append(bool(guard([scalar_param(1.0 + 0.01 * len(skips))]).scale == 0))
    assert skips == [False] * 5 + [True, False, True, False]  # the reference skips every step after the NaN
    assert torch.isfinite(guard.state_dict()["loss_history"]).sum() == len([v for v in losses if math.isfinite(v)])


def test_a_guard_watching_the_loss_asks_for_it_and_a_norm_guard_refuses_it():
    guard = SpikeGuard(signals=("loss", "norm"))
    with pytest.raises(RuntimeError, match=r"record_loss\(loss\)"):
        guard([scalar_param(1.0)])
    guard.record_loss(1.0)
    guard([scalar_param(1.0)])
    with pytest.raises(RuntimeError, match="record_loss"):  # once per step: the value was used
        guard([scalar_param(1.0)])
    with pytest.raises(RuntimeError, match="signals="):
        SpikeGuard().record_loss(1.0)
    with pytest.raises(TypeError, match="loss"):
        guard.record_loss("1.0")
    with pytest.raises(TypeError, match="floating-point"):
        guard.record_loss(torch.tensor(1))
    for bad in ("grad", (), ("norm", "norm"), ["loss", "x"]):
        with pytest.raises(ValueError, match="signals"):
            SpikeGuard(signals=bad)
    with pytest.raises(TypeError, match="two_sided"):
        SpikeGuard(two_sided=1)


def test_attached_loss_guard_undoes_the_spike_step_and_round_trips_its_state(tmp_path):
    model, optimizer = make("adam")
    guard = SpikeGuard.olmo_core(min_history=5, window=16).attach(optimizer)
    x = torch.randn(8, 4)
    for step in range(12):
        loss = model(x).pow(2).mean() * (50.0 if step == 9 else 1.0)
        optimizer.zero_grad()
        loss.backward()
        guard.record_loss(loss)
        before = snapshot(model, optimizer)
        optimizer.step()
        assert same(before, snapshot(model, optimizer)) == (step == 9)
    path = tmp_path / "guard.pt"
    torch.save(guard.state_dict(), path)
    fresh = SpikeGuard.olmo_core(min_history=5, window=16)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert torch.allclose(fresh.state_dict()["loss_history"], guard.state_dict()["loss_history"], equal_nan=True)
    again = pickle.loads(pickle.dumps(guard))
    assert int(again.skipped_steps) == 1 and not again.attached
    with pytest.raises(ValueError, match="signals"):
        SpikeGuard(window=16, min_history=5).load_state_dict(guard.state_dict())


def test_state_saved_before_the_loss_signal_still_loads():
    old = SpikeGuard(window=8, min_history=2)
    old([scalar_param(1.0)])
    state = old.state_dict()
    assert "signals" not in state["config"] and "loss_history" not in state
    SpikeGuard(window=8, min_history=2).load_state_dict(state)


def test_record_loss_refuses_a_group_it_cannot_reduce_over():
    # the ranks' mean needs torch.distributed (tested on 2 and 3 ranks in test_distributed.py)
    guard = SpikeGuard(signals=("loss", "norm"))
    with pytest.raises(RuntimeError, match="not initialized"):
        guard.record_loss(torch.tensor(1.0), process_group=True)
    guard.record_loss(torch.tensor([1.0, 3.0]), process_group=None)  # this rank's loss, averaged over the batch
    assert guard._pending_loss.item() == 2.0
