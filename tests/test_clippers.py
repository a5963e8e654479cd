"""The protocol the stateful clippers share: resume, state_dict, attach, misuse, no sync, arguments."""

from __future__ import annotations

import io
import math

import pytest
import torch
from support.params import scalar_param
from support.sync import no_host_sync

from gradclip.autoclip import AutoClip
from gradclip.guard import SpikeGuard
from gradclip.zclip import ZClip

FACTORIES = {
    "autoclip": lambda: AutoClip(30.0),
    "autoclip-window": lambda: AutoClip(60.0, window=32, include_current=False),
    "zclip": lambda: ZClip(warmup_steps=10, z_thresh=1.5),
    "zclip-percentile": lambda: ZClip(warmup_steps=10, mode="percentile", z_thresh=1.0, max_grad_norm=None),
    "guard-zscore": lambda: SpikeGuard(threshold=2.0, window=16, min_history=5),
    "guard-median": lambda: SpikeGuard("median", threshold=1.5, window=16, min_history=5),
}


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def batch(step):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 6, generator=g) * (20.0 if step % 17 == 5 else 1.0)  # occasional spikes
    return x, torch.randn(16, 1, generator=g)


def train(model, optimizer, clipper, steps, log):
    for step in steps:
        x, y = batch(step)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if clipper.attached:
            optimizer.step()
            result = clipper.last_result
        else:
            result = clipper(model.parameters())
            optimizer.step()
        log.append((result.threshold.clone(), result.scale.clone(),
                    [p.grad.clone() for p in model.parameters()], [p.detach().clone() for p in model.parameters()]))


def save(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("attached", [False, True])
def test_resume_at_step_100_is_bitwise_equal_to_the_uninterrupted_run(name, attached):
    def setup():
        model = make_model()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
        clipper = FACTORIES[name]()
        if attached:
            clipper.attach(optimizer)
        return model, optimizer, clipper

    model, optimizer, clipper = setup()
    full: list = []
    train(model, optimizer, clipper, range(200), full)

    model, optimizer, clipper = setup()
    resumed: list = []
    train(model, optimizer, clipper, range(100), resumed)
    checkpoint = save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                       "clipper": clipper.state_dict()})
    model, optimizer, clipper = setup()  # fresh objects
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    clipper.load_state_dict(checkpoint["clipper"])
    train(model, optimizer, clipper, range(100, 200), resumed)

    clipped = 0
    for step, (a, b) in enumerate(zip(full, resumed)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), step
        assert all(torch.equal(x, y) for x, y in zip(a[2], b[2])), step
        assert all(torch.equal(x, y) for x, y in zip(a[3], b[3])), step
        clipped += bool(a[1] < 1)
    assert clipped > 0  # the run exercised clipping (or skipping)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_state_dict_holds_only_tensors_and_plain_values(name):
    clipper = FACTORIES[name]()
    for step in range(12):
        clipper([scalar_param(1.0 + step % 3)])
    state = clipper.state_dict()
    loaded = save(state)
    assert loaded.keys() == state.keys()
    fresh = FACTORIES[name]()
    fresh.load_state_dict(loaded)
    a, b = clipper([scalar_param(7.0)]), fresh([scalar_param(7.0)])
    assert torch.equal(a.threshold, b.threshold) and torch.equal(a.scale, b.scale)


@pytest.mark.parametrize("make, other, field", [
    (lambda: AutoClip(10.0), lambda: AutoClip(20.0), "percentile"),
    (lambda: AutoClip(10.0), lambda: AutoClip(10.0, window=5), "window"),
    (lambda: AutoClip(10.0), lambda: AutoClip(10.0, dtype=torch.float32), "dtype"),
    (lambda: ZClip(), lambda: ZClip(alpha=0.9), "alpha"),
    (lambda: ZClip(), lambda: ZClip(mode="percentile"), "mode"),
    (lambda: SpikeGuard(), lambda: SpikeGuard(window=64), "window"),
    (lambda: SpikeGuard(), lambda: ZClip(), "class"),
])
def test_state_dict_of_another_configuration_raises_naming_the_field(make, other, field):
    source = other()
    source([scalar_param(1.0)])
    with pytest.raises(ValueError, match=field):
        make().load_state_dict(source.state_dict())


@pytest.mark.parametrize("call, field", [
    (lambda: AutoClip(-1.0), "percentile"),
    (lambda: AutoClip(100.5), "percentile"),
    (lambda: AutoClip(float("nan")), "percentile"),
    (lambda: AutoClip(10.0, window=0), "window"),
    (lambda: AutoClip(10.0, dtype=torch.float16), "dtype"),
    (lambda: AutoClip(10.0, norm_type=0), "norm_type"),
    (lambda: ZClip(alpha=0.0), "alpha"),
    (lambda: ZClip(alpha=1.0), "alpha"),
    (lambda: ZClip(warmup_steps=0), "warmup_steps"),
    (lambda: ZClip(max_grad_norm=-1.0), "max_grad_norm"),
    (lambda: ZClip(z_thresh=-2.0), "z_thresh"),
    (lambda: ZClip(eps=-1e-6), "eps"),
    (lambda: ZClip(clip_factor=0.0), "clip_factor"),
    (lambda: ZClip(mode="median"), "mode"),
    (lambda: ZClip(clip_option="max"), "clip_option"),
    (lambda: SpikeGuard(threshold=-6.0), "threshold"),
    (lambda: SpikeGuard(mode="mad"), "mode"),
    (lambda: SpikeGuard(window=1), "window"),
    (lambda: SpikeGuard(window=10, min_history=20), "min_history"),
])
def test_bad_arguments_raise_value_error_naming_the_argument(call, field):
    with pytest.raises(ValueError, match=field):
        call()


def test_wrong_types_raise_type_error():
    with pytest.raises(TypeError, match="window"):
        AutoClip(10.0, window=2.5)
    with pytest.raises(TypeError, match="include_current"):
        AutoClip(10.0, include_current=1)
    with pytest.raises(TypeError, match="scaler"):
        ZClip(scaler=object())


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_calling_twice_on_the_same_gradients_raises(name):
    clipper = FACTORIES[name]()
    w = scalar_param(2.0)
    clipper([w])
    with pytest.raises(RuntimeError, match="twice"):
        clipper([w])
    w.grad.add_(1.0)  # what a new backward does
    clipper([w])


def test_attached_and_called_by_hand_raises():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    clipper = AutoClip().attach(optimizer)
    model(torch.ones(2, 6)).sum().backward()
    clipper(model.parameters())
    with pytest.raises(RuntimeError, match="twice"):
        optimizer.step()


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_no_gradients_raises_asking_for_backward(name):
    with pytest.raises(RuntimeError, match=r"backward\(\)"):
        FACTORIES[name]()(make_model().parameters())


def test_attach_clips_on_step_and_detach_stops():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    clipper = ZClip(warmup_steps=2, max_grad_norm=0.01)
    assert clipper.attach(optimizer) is clipper and clipper.attached
    with pytest.raises(RuntimeError, match="already attached"):
        clipper.attach(optimizer)
    model(torch.ones(2, 6)).sum().backward()
    optimizer.step()
    assert clipper.steps == 1
    assert math.isclose(float(torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))),
                        0.01, rel_tol=1e-4)
    clipper.detach()
    assert not clipper.attached
    optimizer.step()
    assert clipper.steps == 1


def amp_step(clipper, unscale, attached):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    clipper.scaler = scaler
    if attached:
        clipper.attach(optimizer)
    scaler.scale(model(torch.ones(2, 6)).sum()).backward()
    if unscale:
        scaler.unscale_(optimizer)
    if not attached:
        clipper(model.parameters(), optimizer=optimizer)
    scaler.step(optimizer)
    scaler.update()
    return clipper


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_scaled_gradients_are_refused_when_a_scaler_was_passed(name):
    with pytest.raises(RuntimeError, match="unscale_"):
        amp_step(FACTORIES[name](), unscale=False, attached=False)
    amp_step(FACTORIES[name](), unscale=True, attached=False)
    assert amp_step(FACTORIES[name](), unscale=False, attached=True).steps == 1  # scaler.step unscales first


def test_unscaled_norm_is_what_the_clipper_sees_under_amp():
    clipper = amp_step(AutoClip(), unscale=True, attached=True)
    model = make_model()
    model(torch.ones(2, 6)).sum().backward()
    expected = torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(clipper.last_result.norm, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_steps_never_read_a_tensor_on_the_host(name):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    clipper = FACTORIES[name]()
    other = FACTORIES[name]().attach(optimizer)
    optimizer.zero_grad()
    model(batch(0)[0]).sum().backward()
    optimizer.step()  # the optimizer's first step creates its state (the guard may sync once then)
    with no_host_sync():
        for step in range(1, 60):
            x, _ = batch(step)
            optimizer.zero_grad()
            model(x).sum().backward()
            clipper(model.parameters())
            for p in model.parameters():
                p.grad.mul_(1.0)
            optimizer.step()
    assert clipper.steps == 59 and other.steps == 60
