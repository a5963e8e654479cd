"""GradientMonitor against a plain per-parameter loop."""

from __future__ import annotations

import math

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
