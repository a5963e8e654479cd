"""The protocol the stateful clippers share: resume, state_dict, attach, misuse, no sync, arguments."""

from __future__ import annotations

import copy
import inspect
import io
import math
import pickle

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
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
    # fed each step's loss by record_loss (feed below), as a loop using it must
    "guard-loss": lambda: SpikeGuard(threshold=2.0, window=16, min_history=5, signals=("loss", "norm")),
}


def feed(clipper, loss):
    """Give a guard that watches the loss this step's loss, before it decides; other clippers need nothing."""
    if "loss" in getattr(clipper, "signals", ()):
        clipper.record_loss(loss)


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
        loss = torch.nn.functional.mse_loss(model(x), y)
        feed(clipper, loss)
        loss.backward()
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
        feed(clipper, 2.0 + step % 2)
        clipper([scalar_param(1.0 + step % 3)])
    state = clipper.state_dict()
    loaded = save(state)
    assert loaded.keys() == state.keys()
    fresh = FACTORIES[name]()
    fresh.load_state_dict(loaded)
    feed(clipper, 9.0), feed(fresh, 9.0)
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
    feed(clipper, 1.0)
    clipper([w])
    with pytest.raises(RuntimeError, match="twice"):
        clipper([w])
    w.grad.add_(1.0)  # what a new backward does
    feed(clipper, 1.0)
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
    loss = model(torch.ones(2, 6)).sum()
    feed(clipper, loss)
    scaler.scale(loss).backward()
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
    loss = model(batch(0)[0]).sum()
    feed(other, loss)
    loss.backward()
    optimizer.step()  # the optimizer's first step creates its state (the guard may sync once then)
    with no_host_sync():
        for step in range(1, 60):
            x, _ = batch(step)
            optimizer.zero_grad()
            loss = model(x).sum()
            feed(clipper, loss), feed(other, loss)  # (record_loss reads nothing on the host either)
            loss.backward()
            clipper(model.parameters())
            for p in model.parameters():
                p.grad.mul_(1.0)
            optimizer.step()
    assert clipper.steps == 59 and other.steps == 60


# --- optimizer.step(closure): the clipper clips the gradients the closure makes -------------------


def closure_for(model, optimizer, x, by_hand=None, fed=None):
    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), torch.zeros(x.shape[0], 1))
        if fed is not None:  # a guard that watches the loss gets each evaluation's, inside the closure
            feed(fed, loss)
        loss.backward()
        if by_hand is not None:
            by_hand(model.parameters())
        return loss

    return closure


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("optimizer_name", ["SGD", "LBFGS"])
@pytest.mark.parametrize("keyword", [False, True])
def test_a_step_with_a_closure_clips_the_closures_gradients(name, optimizer_name, keyword):
    def make_optimizer(model):
        if optimizer_name == "LBFGS":
            return torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=4, history_size=3)
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    model, model_ref = make_model(), make_model()
    optimizer, optimizer_ref = make_optimizer(model), make_optimizer(model_ref)
    clipper, by_hand = FACTORIES[name]().attach(optimizer), FACTORIES[name]()
    guard = isinstance(by_hand, SpikeGuard)
    for step in range(15):
        x = batch(step)[0]
        closure = closure_for(model, optimizer, x, fed=clipper)
        loss = optimizer.step(closure=closure) if keyword else optimizer.step(closure)
        # the reference: the clipper by hand inside the closure (a guard: the step undone by hand)
        saved = [p.detach().clone() for p in model_ref.parameters()]
        saved_state = copy.deepcopy(optimizer_ref.state, memo={id(p): p for p in model_ref.parameters()})
        decisions = []
        loss_ref = optimizer_ref.step(closure_for(model_ref, optimizer_ref, x,
                                                  lambda ps: decisions.append(bool(by_hand(ps).scale == 0)),
                                                  fed=by_hand))
        if guard and any(decisions):
            with torch.no_grad():
                for p, q in zip(model_ref.parameters(), saved):
                    p.copy_(q)
            optimizer_ref.state.clear()
            optimizer_ref.state.update(saved_state)
        assert torch.equal(loss, loss_ref)  # the wrapped closure returns the loss
        for p, q in zip(model.parameters(), model_ref.parameters()):
            assert torch.equal(p, q), step
        if guard:  # the step's decision: skipped if any evaluation says so
            assert float(clipper.last_result.scale) == (0.0 if any(decisions) else 1.0)
        else:
            assert torch.equal(clipper.last_result.scale, by_hand.last_result.scale)
    assert clipper.steps == by_hand.steps >= 15  # LBFGS: one call per evaluation of the closure
    if optimizer_name == "LBFGS":
        assert clipper.steps > 15


def test_a_closure_step_clips_after_backward_not_before():
    # before the fix: the pre-hook ran before the closure's backward and raised "no parameter has a gradient"
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    clipper = ZClip(warmup_steps=1, max_grad_norm=1e-3).attach(optimizer)
    optimizer.step(closure_for(model, optimizer, batch(0)[0]))
    norm = torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    assert math.isclose(float(norm), 1e-3, rel_tol=1e-4) and clipper.steps == 1
    # the previous gradients are not clipped again: the closure made new ones
    optimizer.step(closure_for(model, optimizer, batch(1)[0]))
    assert clipper.steps == 2


def test_lbfgs_runs_the_clipper_once_per_closure_evaluation():
    model = make_model()
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5)
    clipper = AutoClip(20.0).attach(optimizer)
    evaluations = 0
    inner = closure_for(model, optimizer, batch(0)[0])

    def counting():
        nonlocal evaluations
        evaluations += 1
        return inner()

    optimizer.step(counting)
    assert evaluations > 1 and clipper.steps == evaluations == len(clipper)


# --- fused optimizers under GradScaler: the true norm ---------------------------------------------

FUSED = [name for name in ("Adam", "AdamW", "SGD", "Adagrad")
         if "fused" in inspect.signature(getattr(torch.optim, name).__init__).parameters]


def amp_run(name, optimizer_name, fused, steps=18):
    """Attached clipper, scaler.step: (the gradients each step used, unscaled; results; clipper)."""
    model = make_model()
    optimizer = getattr(torch.optim, optimizer_name)(model.parameters(), lr=0.01, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    clipper = FACTORIES[name]()
    clipper.scaler = scaler
    clipper.attach(optimizer)
    used, results = [], []

    def capture(opt, args, kwargs):  # registered after the clipper: sees what the step uses
        scale = getattr(opt, "grad_scale", None)
        used.append([p.grad.double() / (1.0 if scale is None else scale.double()) for p in model.parameters()])

    optimizer.register_step_pre_hook(capture)
    for step in range(steps):
        x, y = batch(step)
        optimizer.zero_grad()
        spike = 30.0 if step == 14 else 1.0  # after every warm-up
        loss = torch.nn.functional.mse_loss(model(x), y) * spike
        feed(clipper, loss)
        scaler.scale(loss).backward()
        if not fused:
            scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
        results.append(clipper.last_result)
    return used, results, clipper, model


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("optimizer_name", FUSED)
def test_a_fused_optimizer_under_grad_scaler_is_clipped_on_the_true_norm(name, optimizer_name):
    used, results, clipper, model = amp_run(name, optimizer_name, fused=True)
    used_ref, results_ref, clipper_ref, model_ref = amp_run(name, optimizer_name, fused=False)
    for step, (a, b) in enumerate(zip(results, results_ref)):
        torch.testing.assert_close(a.norm, b.norm, rtol=1e-5, atol=0, msg=f"norm at step {step}")
        torch.testing.assert_close(a.scale, b.scale, rtol=1e-5, atol=0, msg=f"scale at step {step}")
        torch.testing.assert_close(a.threshold, b.threshold, rtol=1e-5, atol=0, equal_nan=True)
    for step, (a, b) in enumerate(zip(used, used_ref)):
        for g, h in zip(a, b):
            # fused and single-tensor Adam round differently: the weights drift apart by float32 rounding
            torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-7, msg=f"clipped gradients at step {step}")
    state, state_ref = clipper.state_dict(), clipper_ref.state_dict()
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, state_ref[key], rtol=1e-5, atol=0, equal_nan=True, msg=key)
        else:
            assert value == state_ref[key], key
    for p, q in zip(model.parameters(), model_ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert any(bool(r.scale < 1) for r in results)  # clipping (or skipping) was exercised


def test_the_reported_zclip_fused_adam_case_decides_on_the_true_norm():
    w = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.Adam([w], lr=0.1, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    zclip = ZClip(warmup_steps=1, max_grad_norm=1.0, scaler=scaler).attach(optimizer)
    captured = []
    optimizer.register_step_pre_hook(lambda opt, a, k: captured.append(w.grad / opt.grad_scale))
    scaler.scale((w * torch.tensor([48.0, 42.75])).sum()).backward()  # norm 64.25...
    scaler.step(optimizer)
    scaler.update()
    true = math.hypot(48.0, 42.75)
    assert math.isclose(float(zclip.last_result.norm), true, rel_tol=1e-6)
    assert math.isclose(float(zclip.last_result.scale), 1.0 / (true + 1e-6), rel_tol=1e-6)
    assert math.isclose(float(torch.linalg.vector_norm(captured[0])), 1.0, rel_tol=1e-5)


def test_the_unscale_message_is_true_for_fused_optimizers():
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), fused=True)
    scaler = torch.amp.GradScaler("cpu")
    clipper = AutoClip(scaler=scaler)
    scaler.scale(model(torch.ones(2, 6)).sum()).backward()
    with pytest.raises(RuntimeError, match=r"unscale_\(optimizer\).*fused=True.*does not") as error:
        clipper(model.parameters(), optimizer=optimizer)
    assert "attach" in str(error.value)
    clipper.attach(optimizer)  # attached, scaler.step of a fused optimizer is accepted
    scaler.step(optimizer)
    scaler.update()
    assert clipper.steps == 1


# --- state_dict() is a copy, pickling ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("calls", [3, 12])  # zclip: during and after warm-up
def test_state_dict_is_a_copy_that_later_steps_do_not_change(name, calls):
    clipper = FACTORIES[name]()
    for step in range(calls):
        feed(clipper, 2.0 + step % 2)
        clipper([scalar_param(1.0 + step % 3)])
    state = clipper.state_dict()
    kept = {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in state.items()}
    for step in range(20):
        feed(clipper, 5.0 + step)
        clipper([scalar_param(5.0 + step)])
    for key, value in kept.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(state[key], value, rtol=0, atol=0, equal_nan=True, msg=key)
        else:
            assert state[key] == value, key


def same_results(a, b):
    return all(torch.equal(x, y) or (x.isnan().all() and y.isnan().all())
               for x, y in zip((a.norm, a.threshold, a.scale), (b.norm, b.threshold, b.scale)))


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("attached", [False, True])
@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_pickled_clipper_is_detached_and_continues_bitwise(name, attached, how):
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    clipper = FACTORIES[name]()
    if attached:
        clipper.attach(optimizer)
    train(model, optimizer, clipper, range(40), [])
    if how == "pickle":
        copy_ = pickle.loads(pickle.dumps(clipper))
    else:
        buffer = io.BytesIO()
        torch.save(clipper, buffer)
        buffer.seek(0)
        copy_ = torch.load(buffer, weights_only=False)
    assert not copy_.attached and copy_.steps == clipper.steps
    assert clipper.attached == attached
    for step in range(40, 80):
        x, y = batch(step)
        model.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        feed(clipper, loss), feed(copy_, loss)
        loss.backward()
        twins = []
        for p in model.parameters():
            q = torch.nn.Parameter(p.detach().clone())
            q.grad = p.grad.clone()
            twins.append(q)
        a, b = clipper(model.parameters()), copy_(twins)
        assert same_results(a, b), step
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), twins)), step
    # and it attaches again
    model.zero_grad()
    model(batch(0)[0]).sum().backward()
    copy_.attach(torch.optim.SGD(model.parameters(), lr=0.1)).detach()
    if isinstance(copy_, SpikeGuard) and "loss" in copy_.signals:  # pickled between steps: no loss left pending
        with pytest.raises(RuntimeError, match="record_loss"):
            copy_(model.parameters())


# --- non-finite norms never poison the statistics ---------------------------------------------

NONFINITE_FACTORIES = {
    "autoclip": lambda: AutoClip(10.0),
    "autoclip-window": lambda: AutoClip(10.0, window=16),
    "zclip": lambda: ZClip(warmup_steps=3, max_grad_norm=None),
    "zclip-1": lambda: ZClip(warmup_steps=1, max_grad_norm=None),
    "zclip-percentile": lambda: ZClip(warmup_steps=2, mode="percentile", max_grad_norm=None),
    "guard": lambda: SpikeGuard(threshold=3.0, window=16, min_history=4),
    "guard-median": lambda: SpikeGuard("median", threshold=3.0, window=16, min_history=4),
}


@pytest.mark.parametrize("name", sorted(NONFINITE_FACTORIES))
@settings(max_examples=25, deadline=None)
@given(prefix=st.lists(st.sampled_from([math.nan, math.inf, 0.5, 1.0, 2.0]), max_size=12))
@example(prefix=[math.inf])
@example(prefix=[math.nan, math.inf, math.nan, math.inf, math.nan])
def test_nonfinite_norms_never_poison_the_statistics(name, prefix):
    clipper = NONFINITE_FACTORIES[name]()
    for value in prefix:
        clipper([scalar_param(value)])
    for _ in range(20):  # a steady run ...
        result = clipper([scalar_param(1.0)])
        assert not result.threshold.isnan() and not result.scale.isnan()
    spike = clipper([scalar_param(1000.0)])  # ... then a spike: clipped (or skipped)
    assert float(spike.scale) < 0.1, (name, prefix)


@pytest.mark.parametrize("mode", ["zscore", "median"])
@settings(max_examples=15, deadline=None)
@given(prefix=st.lists(st.tuples(st.sampled_from([math.nan, math.inf, -math.inf, 1.0, 2.0]),
                                 st.sampled_from([math.nan, math.inf, 0.5, 1.0])), max_size=12))
@example(prefix=[(math.nan, 1.0)] * 5)
@example(prefix=[(math.inf, 1.0), (1.0, math.nan), (-math.inf, 0.5)])
def test_nonfinite_losses_never_poison_the_loss_history(mode, prefix):
    # a guard fed the loss: each non-finite loss (or norm) skips its step; whatever came before (the window holds it
    # all: nothing is evicted), a steady run then steps and a loss spike alone (the norm steady) is skipped, which an
    # inf or NaN in the loss history's mean would prevent; the history holds exactly the finite losses of the steps
    # whose norm was finite
    guard = SpikeGuard(mode, threshold=3.0, window=64, min_history=4, signals=("loss", "norm"))
    for loss, norm in prefix:
        guard.record_loss(loss)
        result = guard([scalar_param(norm)])
        if not (math.isfinite(loss) and math.isfinite(norm)):
            assert float(result.scale) == 0.0, (prefix, loss, norm)
    for step in range(20):  # (its first steps may be outliers against a constant prefix: not asserted)
        guard.record_loss(2.0 + 0.01 * (step % 3))
        result = guard([scalar_param(1.0 + 0.01 * (step % 2))])
        assert not result.scale.isnan() and not result.threshold.isnan()
        if step >= 10:
            assert float(result.scale) == 1.0, (prefix, step)
    guard.record_loss(50.0)
    assert float(guard([scalar_param(1.0)]).scale) == 0.0, prefix
    history = guard.state_dict()["loss_history"]
    kept = [loss for loss, norm in prefix if math.isfinite(loss) and math.isfinite(norm)]
    assert guard.steps == len([n for _, n in prefix if math.isfinite(n)]) + 21
    assert not history.isinf().any() and torch.isfinite(history).sum() == len(kept) + 21


# --- Muon: clipping does not bound an orthogonalised step ----------------------------------------------


def _muon_and_friends():
    import gradclip

    return [gradclip.ZClip(), gradclip.AutoClip(), gradclip.AdaGC(), gradclip.UpdateClip("adafactor")]


def test_attaching_a_rescaling_clipper_to_muon_warns_and_says_what_to_do_instead():
    import warnings

    import gradclip
    from gradclip.clippers import OrthogonalizedUpdateWarning

    weight = torch.nn.Parameter(torch.zeros(8, 8))
    for clipper in _muon_and_friends():
        with pytest.warns(OrthogonalizedUpdateWarning, match="SpikeGuard"):
            clipper.attach(torch.optim.Muon([weight], lr=0.02))

    class MuonWithAuxAdam(torch.optim.SGD):  # other implementations are recognised by name ...
        pass

    with pytest.warns(OrthogonalizedUpdateWarning):
        gradclip.ZClip().attach(MuonWithAuxAdam([weight], lr=0.1))
    quiet = torch.optim.Muon([weight], lr=0.02)
    quiet.gradclip_orthogonalized = False  # ... and any optimizer can say what it does
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gradclip.ZClip().attach(quiet)
        gradclip.SpikeGuard().attach(torch.optim.Muon([weight], lr=0.02))  # skipping is fine under Muon
        for clipper in _muon_and_friends():
            clipper.attach(torch.optim.AdamW([weight]))
    flagged = torch.optim.SGD([weight], lr=0.1)
    flagged.gradclip_orthogonalized = True
    with pytest.warns(OrthogonalizedUpdateWarning):
        gradclip.AutoClip().attach(flagged)


def test_muon_step_length_does_not_depend_on_the_gradient_scale():
    # the measurement the warning rests on (torch.optim.Muon): a clipped gradient gives a step of the same
    # length, only its direction (its weight in the momentum) changes
    torch.manual_seed(0)
    grads = [torch.randn(64, 64) for _ in range(4)]

    def steps(scale_of_step_2):
        weight = torch.nn.Parameter(torch.zeros(64, 64))
        optimizer = torch.optim.Muon([weight], lr=0.02)
        out = []
        for index, grad in enumerate(grads):
            before = weight.detach().clone()
            weight.grad = grad * (scale_of_step_2 if index == 2 else 1.0)
            optimizer.step()
            out.append(weight.detach() - before)
        return out

    plain, clipped = steps(1.0), steps(0.05)
    assert torch.equal(plain[1], clipped[1])
    assert float(clipped[2].norm() / plain[2].norm()) == pytest.approx(1.0, abs=0.02)
    assert float((clipped[3] - plain[3]).norm() / plain[3].norm()) > 0.2


# --- attached through a framework's optimizer wrapper ----------------------------------------------
# accelerate's AcceleratedOptimizer and Lightning's LightningOptimizer step a torch optimizer without
# running torch.optim.Optimizer.__init__ (no step-hook dicts of their own): attach hooks the optimizer
# they wrap. Each tool attached through the real wrapper is compared with an independent run of the
# same tool on the bare optimizer: called by hand for the clippers, attached directly for the rest.


def attachable():
    import gradclip

    return {
        "autoclip": lambda model: AutoClip(30.0),
        "zclip": lambda model: ZClip(warmup_steps=2, z_thresh=1.5, max_grad_norm=None),
        "adagc": lambda model: gradclip.AdaGC(warmup_steps=2),
        "guard": lambda model: SpikeGuard("median", threshold=1.5, window=8, min_history=2),
        "loss-guard": lambda model: SpikeGuard("median", threshold=1.5, window=8, min_history=2,
                                               signals=("loss", "norm")),
        "monitor": lambda model: gradclip.GradientMonitor(model),
        "update_clip": lambda model: gradclip.UpdateClip("adafactor", d=0.5),
    }


WRAPPER_STEPS = 8


def wrapper_batches():
    return [batch(step) for step in range(WRAPPER_STEPS)]  # step 5 carries a spike


def by_hand_run(tool_name):
    """The reference: the bare optimizer; a clipper called after backward, the guard's skip done by hand."""
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tool = attachable()[tool_name](model)
    by_hand = tool_name in ("autoclip", "zclip", "adagc", "guard", "loss-guard")
    if not by_hand:
        tool.attach(optimizer)
    for x, y in wrapper_batches():
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        feed(tool, loss)
        loss.backward()
        if by_hand:
            result = tool(list(model.parameters()))
            if tool_name in ("guard", "loss-guard") and bool(result.scale == 0):
                continue
        optimizer.step()
    return model, tool


def check_same_run(tool_name, model, tool, model_ref, tool_ref):
    for p, q in zip(model.parameters(), model_ref.parameters()):
        assert torch.equal(p, q), tool_name
    if tool_name == "monitor":
        assert tool.table() == tool_ref.table() and len(tool.table()) == WRAPPER_STEPS * len(tool.layers)
    elif tool_name == "update_clip":
        assert tool.steps == tool_ref.steps == WRAPPER_STEPS
    else:
        assert tool.steps == tool_ref.steps == WRAPPER_STEPS
        for key, value in tool_ref.state_dict().items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(tool.state_dict()[key], value, rtol=0, atol=0, equal_nan=True, msg=key)


@pytest.mark.parametrize("tool_name", sorted(attachable()))
def test_attach_through_accelerates_optimizer_wrapper_equals_the_tool_by_hand(tool_name):
    from accelerate import Accelerator

    model = make_model()
    accelerator = Accelerator(cpu=True)
    wrapped = accelerator.prepare_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    assert "_optimizer_step_pre_hooks" not in vars(wrapped)  # (the wrapper runs no Optimizer.__init__)
    tool = attachable()[tool_name](model).attach(wrapped)
    for x, y in wrapper_batches():
        wrapped.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        feed(tool, loss)
        accelerator.backward(loss)
        wrapped.step()
    model_ref, tool_ref = by_hand_run(tool_name)
    check_same_run(tool_name, model, tool, model_ref, tool_ref)
    if tool_name in ("guard", "loss-guard"):
        assert int(tool.skipped_steps) >= 1  # the spike was skipped through the wrapper


@pytest.mark.parametrize("tool_name", ["zclip", "guard", "loss-guard", "monitor"])
def test_attach_through_lightnings_optimizer_wrapper_equals_the_tool_by_hand(tool_name, tmp_path):
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_model()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

        def on_train_start(self):
            wrapped = self.optimizers()  # a LightningOptimizer
            assert "_optimizer_step_pre_hooks" not in vars(wrapped)
            self.tool = attachable()[tool_name](self.net).attach(wrapped)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            feed(self.tool, loss)  # (a guard fed the loss gets it here, before Lightning's backward and step)
            return loss

    module = Module()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=WRAPPER_STEPS, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(wrapper_batches(), batch_size=None))
    model_ref, tool_ref = by_hand_run(tool_name)
    check_same_run(tool_name, module.net, module.tool, model_ref, tool_ref)


def test_attach_to_something_that_wraps_no_optimizer_says_what_to_pass():
    import gradclip

    class Wrapper:  # holds no torch optimizer in .optimizer or ._optimizer
        optimizer = "sgd"

    model = make_model()
    for tool in attachable().values():
        made = tool(model)
        with pytest.raises(TypeError, match=r"attach: optimizer must be a torch.optim.Optimizer .*got Wrapper.*"
                                            r"Pass the torch optimizer itself"):
            made.attach(Wrapper())
    with pytest.raises(TypeError, match=r"got int"):
        gradclip.ZClip().attach(3)


# --- the CPU's eager steps (decided on the host) equal the steps accelerators and torch.compile run --------------

EAGER_VS_TRACED = {
    "ZClip": lambda: ZClip(warmup_steps=5),
    "ZClip mean, no cap": lambda: ZClip(warmup_steps=5, clip_option="mean", max_grad_norm=None),
    "ZClip percentile, skip on spike": lambda: ZClip(warmup_steps=5, mode="percentile",
                                                              skip_update_on_spike=True),
    "ZClip float32 state": lambda: ZClip(warmup_steps=5, dtype=torch.float32),
    "AutoClip": lambda: AutoClip(percentile=10.0),
    "AutoClip window, earlier norms": lambda: AutoClip(percentile=90.0, window=6, include_current=False),
    "AutoClip float32 state": lambda: AutoClip(percentile=50.0, window=5, dtype=torch.float32),
    # the 90th percentile of 6 interpolates between the two largest, one of them inf once 1e39 is recorded
    "AutoClip float32, interpolating to inf": lambda: AutoClip(percentile=90.0, window=6, dtype=torch.float32),
    "AutoClip float64, interpolating to inf": lambda: AutoClip(percentile=90.0, window=6),
}


@pytest.mark.parametrize("name", EAGER_VS_TRACED)
def test_eager_cpu_steps_equal_the_traced_steps(name, monkeypatch):
    # The CPU's eager path reads the norm on the host (free there) and computes the rule on Python floats; the
    # traced path (every step on tensors, nothing read) is what accelerators and torch.compile run. Forced onto the
    # CPU, both must give the same norms, thresholds, factors, gradients and counts, spikes and non-finite norms
    # included.
    # (1e39: finite in float64, so counted and recorded, but inf in a float32 state)
    norms = [0.5, 0.52, 0.48, 0.51, 0.49, 0.5, 3.0, 0.47, math.nan, 0.5, 40.0, math.inf, 0.53, 0.0, 0.5, 2.0, 0.51,
             1e39, 0.5, 0.52]
    eager, traced = EAGER_VS_TRACED[name](), EAGER_VS_TRACED[name]()
    monkeypatch.setattr(traced, "_on_device", lambda device: True)
    for g in norms:
        results = []
        for clipper in (eager, traced):
            dtype = torch.float64 if g == 1e39 else torch.float32
            w = torch.zeros(3, dtype=dtype, requires_grad=True)
            w.grad = torch.tensor([g, 0.0, 0.0], dtype=dtype)
            results.append((clipper([w]), w.grad.clone()))
        (a, grad_a), (b, grad_b) = results
        assert torch.equal(grad_a, grad_b) or (grad_a.isnan().any() and torch.equal(grad_a.isnan(), grad_b.isnan()))
        for field in ("norm", "threshold", "scale"):
            x, y = getattr(a, field), getattr(b, field)
            assert x.dtype == y.dtype and (torch.equal(x, y) or (x.isnan().all() and y.isnan().all())), (g, field, x, y)
    assert eager.steps == traced.steps


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_a_count_kept_on_the_host_carries_on_where_calls_count_on_the_device(name, monkeypatch):
    # On the CPU a call is counted on the host only (no kernel per call); the device count must catch up the first
    # time a call counts there (an accelerator, torch.compile), and back again when steps is read.
    clipper = FACTORIES[name]()
    model = make_model()

    def call():
        model.zero_grad()
        loss = model(batch(len(calls))[0]).sum()
        feed(clipper, loss)
        loss.backward()
        calls.append(clipper(model.parameters()))

    calls: list = []
    for _ in range(3):
        call()
    assert clipper.steps == 3
    with monkeypatch.context() as patch:
        patch.setattr(clipper, "_on_device", lambda device: True)
        for _ in range(2):
            call()
        assert int(clipper._device_count(torch.device("cpu"))) == 5
    assert clipper.steps == 5
    call()
    assert clipper.steps == 6 and clipper.state_dict()["steps"] == 6
