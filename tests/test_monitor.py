"""GradientMonitor against a plain per-parameter loop."""

from __future__ import annotations

import io
import math
import pickle

import pytest
import torch

from support.references import global_norm, layer_norms
from support.sync import no_host_sync

from gradclip.monitor import GradientMonitor


def make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3, bias=False),
                                torch.nn.LayerNorm(3))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.parametrize("p", [2.0, 1.0, math.inf])
def test_attached_rows_equal_a_plain_loop(p):
    model, optimizer = make()
    monitor = GradientMonitor(model, norm_type=p).attach(optimizer)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    expected = []
    for step in range(3):
        optimizer.zero_grad()
        model(x).pow(2).sum().backward()
        grads = layer_norms([(n, q.grad) for n, q in model.named_parameters()], p)
        weights = layer_norms(list(model.named_parameters()), p)
        before = {n: q.detach().clone() for n, q in model.named_parameters()}
        optimizer.step()
        updates = layer_norms([(n, q.detach() - before[n]) for n, q in model.named_parameters()], p)
        expected += [(step, layer, grads[layer], weights[layer], updates[layer] / weights[layer]) for layer in grads]
    rows = monitor.table()
    assert [(r["step"], r["layer"]) for r in rows] == [(s, layer) for s, layer, *_ in expected]
    for row, (_, _, g, w, r) in zip(rows, expected):
        assert math.isclose(row["grad_norm"], g, rel_tol=1e-6)
        assert math.isclose(row["weight_norm"], w, rel_tol=1e-6)
        assert math.isclose(row["update_ratio"], r, rel_tol=1e-4)


def test_record_by_hand_custom_layers_and_missing_grads():
    model, _ = make()
    monitor = GradientMonitor(model.named_parameters(), layer_fn=lambda name: "all")
    model[0](torch.ones(1, 4)).sum().backward()  # only the first layer gets gradients
    monitor.record(step=7)
    (row,) = monitor.table()
    assert row["step"] == 7 and row["layer"] == "all" and math.isnan(row["update_ratio"])
    expected = float(global_norm([q.grad for q in model[0].parameters()]))
    assert math.isclose(row["grad_norm"], expected, rel_tol=1e-6)


def test_recording_never_reads_the_device():
    model, optimizer = make()
    monitor = GradientMonitor(model).attach(optimizer)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    with no_host_sync():
        for _ in range(5):
            optimizer.step()
            monitor.record()
    assert len(monitor.table()) == 11 * len(monitor.layers)


def test_bad_arguments():
    with pytest.raises(ValueError, match="empty"):
        GradientMonitor([])
    with pytest.raises(TypeError, match="pair"):
        GradientMonitor([torch.zeros(1)])
    with pytest.raises(ValueError, match="norm_type"):
        GradientMonitor(torch.nn.Linear(2, 2), norm_type=-1)


def test_a_closure_step_records_the_gradients_the_step_uses():
    model, optimizer = make()
    monitor = GradientMonitor(model).attach(optimizer)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    expected = []
    for step in range(3):
        def closure():
            optimizer.zero_grad()
            loss = model(x).pow(2).sum() * (step + 1)
            loss.backward()
            expected.append(layer_norms([(n, q.grad) for n, q in model.named_parameters()]))
            return loss

        before = {n: q.detach().clone() for n, q in model.named_parameters()}
        weights = layer_norms(list(model.named_parameters()))
        optimizer.step(closure)
        updates = layer_norms([(n, q.detach() - before[n]) for n, q in model.named_parameters()])
        rows = [r for r in monitor.table() if r["step"] == step]
        for row in rows:
            assert math.isclose(row["grad_norm"], expected[step][row["layer"]], rel_tol=1e-6)
            assert math.isclose(row["weight_norm"], weights[row["layer"]], rel_tol=1e-6)
            assert math.isclose(row["update_ratio"], updates[row["layer"]] / weights[row["layer"]], rel_tol=1e-4)


def test_lbfgs_records_one_row_per_step_with_the_first_evaluation():
    model, _ = make()
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=4)
    monitor = GradientMonitor(model).attach(optimizer)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    firsts = []
    for step in range(2):
        evaluations = []

        def closure():
            optimizer.zero_grad()
            loss = model(x).pow(2).sum()
            loss.backward()
            evaluations.append(layer_norms([(n, q.grad) for n, q in model.named_parameters()]))
            return loss

        optimizer.step(closure)
        assert len(evaluations) > 1
        firsts.append(evaluations[0])
    rows = monitor.table()
    assert len(rows) == 2 * len(monitor.layers)
    for row in rows:
        assert math.isclose(row["grad_norm"], firsts[row["step"]][row["layer"]], rel_tol=1e-6)


@pytest.mark.parametrize("optimizer_name", ["Adam", "SGD"])
def test_a_fused_optimizer_under_grad_scaler_records_the_true_gradient_norms(optimizer_name):
    model, _ = make()
    optimizer = getattr(torch.optim, optimizer_name)(model.parameters(), lr=0.01, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    monitor = GradientMonitor(model).attach(optimizer)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    expected = []
    for _ in range(3):
        optimizer.zero_grad()
        scaler.scale(model(x).pow(2).sum()).backward()
        scaler.step(optimizer)  # the fused kernel unscales the gradients in place
        scaler.update()
        expected.append(layer_norms([(n, q.grad) for n, q in model.named_parameters()]))
    for row in monitor.table():
        assert math.isclose(row["grad_norm"], expected[row["step"]][row["layer"]], rel_tol=1e-5)


def test_a_sparse_gradient_raises_a_type_error_naming_the_parameter():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 3, sparse=True), torch.nn.Linear(3, 1))
    monitor = GradientMonitor(model)
    model(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match=r"'0\.weight'.*dense.*sparse=False.*to_dense"):
        monitor.record()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor.attach(optimizer)
    with pytest.raises(TypeError, match=r"'0\.weight'"):
        optimizer.step()


def same_tables(a, b):
    """Rows equal, NaN equal to NaN (the update ratio of a record made by hand)."""
    def key(rows):
        return [{k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()} for row in rows]
    return key(a) == key(b)


def run_and_record(monitor, model, optimizer, steps):
    for step in steps:
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        model(x).pow(2).sum().backward()
        optimizer.step()


@pytest.mark.parametrize("attached", [False, True])
def test_pickled_monitor_is_detached_and_continues_identically(attached):
    model, optimizer = make()
    monitor = GradientMonitor(model)
    if attached:
        monitor.attach(optimizer)
    run_and_record(monitor, model, optimizer, range(3))
    monitor.record()
    clone = pickle.loads(pickle.dumps(monitor))
    assert not clone._hooks and same_tables(clone.table(), monitor.table())
    # bound to copies of the parameters: give it the same gradients
    for p, q in zip(model.parameters(), clone.parameters):
        q.grad = p.grad.clone()
    monitor.record()
    clone.record()
    assert same_tables(clone.table(), monitor.table())


def test_state_dict_round_trips_through_weights_only_load():
    model, optimizer = make()
    monitor = GradientMonitor(model).attach(optimizer)
    run_and_record(monitor, model, optimizer, range(4))
    state = monitor.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = GradientMonitor(make()[0])
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert same_tables(fresh.table(), monitor.table())
    with pytest.raises(ValueError, match="layers"):
        GradientMonitor(model, layer_fn=lambda name: "all").load_state_dict(state)
    with pytest.raises(ValueError, match="norm_type"):
        GradientMonitor(model, norm_type=1.0).load_state_dict(state)


# --- the update a step really made, whatever else is attached --------------------------------------
# A SpikeGuard puts back the weights of a step it skips, and an UpdateClip shrinks the update, both in
# post-step hooks; the monitor measures the update once they have run, in any order of attachment.
# Reference: the per-layer ||w_after - w_before|| / ||w_before|| of weights copied around each step.

ORDERS = [("monitor", "guard"), ("guard", "monitor"), ("monitor", "update_clip", "guard"),
          ("update_clip", "monitor", "guard"), ("update_clip", "guard", "monitor")]
SPIKE_AT = 5


@pytest.mark.parametrize("mode", ["step", "closure"])
@pytest.mark.parametrize("order", ORDERS, ids="-".join)
def test_the_update_ratio_is_the_weights_true_change_whatever_the_order_of_attachment(order, mode):
    import gradclip

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    made = {"monitor": lambda: GradientMonitor(model),
            "guard": lambda: gradclip.SpikeGuard("median", threshold=3.0, window=8, min_history=2),
            "update_clip": lambda: gradclip.UpdateClip("adafactor", d=0.1)}
    tools = {name: made[name]().attach(optimizer) for name in order}
    generator = torch.Generator().manual_seed(1)
    expected = []
    for step in range(8):
        x, y = torch.randn(8, 4, generator=generator), torch.randn(8, 2, generator=generator)
        before = [p.detach().clone().double() for p in model.parameters()]

        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y) * (100.0 if step == SPIKE_AT else 1.0)
            loss.backward()
            return loss

        if mode == "closure":
            optimizer.step(closure)
        else:
            closure()
            optimizer.step()
        after = [p.detach().double() for p in model.parameters()]
        for layer in (0, 2):  # (weight, bias) of each Linear
            change = torch.cat([(a - b).reshape(-1) for a, b in zip(after[layer:layer + 2], before[layer:layer + 2])])
            weight = torch.cat([b.reshape(-1) for b in before[layer:layer + 2]])
            expected.append(float(torch.linalg.vector_norm(change) / torch.linalg.vector_norm(weight)))
    assert int(tools["guard"].skipped_steps) == 1
    got = [row["update_ratio"] for row in tools["monitor"].table()]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-6, atol=0)
    assert got[2 * SPIKE_AT] == got[2 * SPIKE_AT + 1] == 0.0  # the skipped step: the weights did not move
    assert all(value > 0 for i, value in enumerate(got) if i // 2 != SPIKE_AT)
