"""Update clipping against torch.optim.Adafactor's own clipping and float64 transcriptions, on every optimizer.

* Adafactor's rule on ``Adafactor(d=inf)`` gives the run of ``Adafactor(d=d)``;
* on AdamW it gives a float64 transcription of AdamW with Adafactor's update clipping;
* StableAdamW's rule on AdamW gives a float64 transcription of the first author's
  StableAdamWUnfused (and, with ``scale_weight_decay=True``, of optimi's variant);
* on every torch optimizer (plain, foreach, fused), stepped plainly, with a closure and
  under GradScaler, the attached clip equals the rule applied by hand, in float64, to
  the step an unclipped twin took.
"""

from __future__ import annotations

import copy
import inspect
import io
import math
import pickle

import pytest
import torch

import gradclip
from support.references import (ReferenceAdamWUpdateClipped, ReferenceStableAdamW, rms,
                                update_clipped_by_hand)
from support.sync import no_host_sync

F64 = torch.float64
INF = math.inf


def make_model(dtype=F64, bias=True, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7, bias=bias), torch.nn.Tanh(),
                               torch.nn.Linear(7, 3, bias=bias)).to(dtype)


def data(dtype=F64):
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(1), dtype=F64).to(dtype)
    y = torch.randn(16, 3, generator=torch.Generator().manual_seed(2), dtype=F64).to(dtype)
    return x, y


def loss_of(model, x, y, step, spike=30.0, spike_step=4):
    return torch.nn.functional.mse_loss(model(x), y) * (spike if step == spike_step else 1.0)


def train(model, optimizer, steps, x, y):
    for step in range(steps):
        optimizer.zero_grad()
        loss_of(model, x, y, step).backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def two_groups(model, **second):
    params = list(model.parameters())
    return [{"params": params[:2]}, {"params": params[2:], **second}]


# --- against torch.optim.Adafactor -------------------------------------------------------------------


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("d", [1.0, 1.5])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_adafactor_rule_on_adafactor_is_adafactors_own_clipping(dtype, d, weight_decay, foreach):
    x, y = data(dtype)
    runs = {}
    for name, own_d, clip in (("own", d, False), ("gradclip", INF, True), ("unclipped", INF, False)):
        model = make_model(dtype)
        optimizer = torch.optim.Adafactor(two_groups(model, lr=0.03), lr=0.05, d=own_d,
                                          weight_decay=weight_decay, foreach=foreach)
        clipper = gradclip.UpdateClip("adafactor", d=d).attach(optimizer) if clip else None
        clipped = 0
        for step in range(12):
            optimizer.zero_grad()
            loss_of(model, x, y, step).backward()
            optimizer.step()
            if clipper is not None:
                clipped += int(clipper.last_result.clipped.sum())
        runs[name] = [p.detach().clone() for p in model.parameters()]
        if clip:
            assert clipped >= 2, "the run must exercise the clip"
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == F64 else dict(rtol=2e-5, atol=2e-6)
    for ours, theirs, unclipped in zip(runs["gradclip"], runs["own"], runs["unclipped"]):
        torch.testing.assert_close(ours, theirs, **tol)
    assert max(float((a - b).abs().max()) for a, b in zip(runs["own"], runs["unclipped"])) > 1e-3


def test_adafactor_rule_on_adamw_matches_a_float64_transcription():
    model = make_model()
    x, y = data()
    reference = ReferenceAdamWUpdateClipped(model.parameters(), lr=0.01, betas=(0.9, 0.95), eps=1e-8,
                                            weight_decay=0.1, d=0.7)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    clipper = gradclip.UpdateClip("adafactor", d=0.7).attach(optimizer)
    clipped = 0
    for step in range(10):
        optimizer.zero_grad()
        loss_of(model, x, y, step).backward()
        sizes = reference.step([p.grad for p in model.parameters()])
        optimizer.step()
        torch.testing.assert_close(clipper.last_result.rms, torch.tensor(sizes, dtype=F64), rtol=1e-10, atol=0)
        for ours, theirs in zip(model.parameters(), reference.params):
            torch.testing.assert_close(ours.detach(), theirs, rtol=1e-12, atol=1e-14, msg=lambda m: f"step {step}: {m}")
        clipped += int(clipper.last_result.clipped.sum())
    assert clipped >= 5


@pytest.mark.parametrize("variant", ["plain", "foreach", "fused"])
@pytest.mark.parametrize("scale_weight_decay", [False, True])
def test_stable_adamw_matches_the_first_authors_code(scale_weight_decay, variant):
    model = make_model()
    x, y = data()
    betas, eps, weight_decay, lr = (0.9, 0.99), 1e-6, 0.2, 0.01
    reference = ReferenceStableAdamW(model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                     decay_scaled=scale_weight_decay)
    flags = {"plain": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}[variant]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **flags)
    clipper = gradclip.UpdateClip("stable_adamw", scale_weight_decay=scale_weight_decay).attach(optimizer)
    clipped = 0
    for step in range(10):
        optimizer.zero_grad()
        loss_of(model, x, y, step, spike=1e3, spike_step=6).backward()
        ratios = reference.step([p.grad for p in model.parameters()])
        optimizer.step()
        torch.testing.assert_close(clipper.last_result.rms, torch.tensor(ratios, dtype=F64), rtol=1e-10, atol=0)
        for ours, theirs in zip(model.parameters(), reference.params):
            torch.testing.assert_close(ours.detach(), theirs, rtol=1e-10, atol=1e-13, msg=lambda m: f"step {step}: {m}")
        clipped += int(clipper.last_result.clipped.sum())
    assert clipped >= 2, "the spike must make R exceed 1"


# --- every optimizer, every way of stepping ------------------------------------------------------------

OPTIMIZERS = {
    "SGD": ("SGD", dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
    "Adam": ("Adam", dict(lr=0.01, weight_decay=0.01)),
    "Adam-decoupled": ("Adam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    "AdamW": ("AdamW", dict(lr=0.01, weight_decay=0.1)),
    "Adamax": ("Adamax", dict(lr=0.01, weight_decay=0.01)),
    "NAdam": ("NAdam", dict(lr=0.01, weight_decay=0.01)),
    "RAdam-decoupled": ("RAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    "Adagrad": ("Adagrad", dict(lr=0.05, weight_decay=0.01)),
    "Adadelta": ("Adadelta", dict(lr=1.0, weight_decay=0.01)),
    "RMSprop": ("RMSprop", dict(lr=0.01, weight_decay=0.01)),
    "Rprop": ("Rprop", dict(lr=0.01)),
    "ASGD": ("ASGD", dict(lr=0.05, weight_decay=0.01)),
    "LBFGS": ("LBFGS", dict(lr=0.1, max_iter=3, history_size=4)),
    "Muon": ("Muon", dict(lr=0.02, ns_steps=1, weight_decay=0.1)),
    "Adafactor": ("Adafactor", dict(lr=0.05, weight_decay=0.1)),
}
OPTIMIZERS = {name: spec for name, spec in OPTIMIZERS.items() if hasattr(torch.optim, spec[0])}
DECOUPLED = {"Adam-decoupled", "AdamW", "RAdam-decoupled", "Muon", "Adafactor"}
ADAM_LIKE = {"Adam", "Adam-decoupled", "AdamW", "NAdam", "RAdam-decoupled"}
MODES = ["step", "closure", "scaler"]
STEPS = 4
# d where the rule bites (RMS(U) of the first steps: Adadelta ~3e-3, then 5e-3 at the spike; Muon ~0.37)
THRESHOLDS = {"Adadelta": 4e-3, "Muon": 0.37}


def variants(cls_name):
    accepted = inspect.signature(getattr(torch.optim, cls_name).__init__).parameters
    out = {"plain": {"foreach": False} if "foreach" in accepted else {}}
    if "foreach" in accepted:
        out["foreach"] = {"foreach": True}
    if "fused" in accepted:
        out["fused"] = {"fused": True}
    return out


def cases():
    for name, (cls_name, _) in OPTIMIZERS.items():
        for variant in variants(cls_name):
            for mode in MODES:
                for rule in ("adafactor", "stable_adamw") if name in ADAM_LIKE else ("adafactor",):
                    if cls_name == "LBFGS" and mode != "closure":
                        continue  # LBFGS steps only with a closure, which GradScaler.step does not pass
                    yield pytest.param(name, variant, mode, rule, id=f"{name}-{variant}-{mode}-{rule}")


def step_size(optimizer, name, group, param, before):
    """a in theta <- (1 - c) theta - a U: the group's lr; Adafactor's relative step."""
    if name != "Adafactor":
        return float(group["lr"])
    t = float(optimizer.state[param]["step"])
    return max(group["eps"][1], rms(before)) * min(group["lr"], t ** -0.5)


def stable_ratio(optimizer, name, group, param, before, grad):
    """StableAdamW's R in float64, from the true gradient and the twin optimizer's state after its step."""
    state = optimizer.state[param]
    g = grad.double()
    if group["weight_decay"] and name not in DECOUPLED:
        g = g + group["weight_decay"] * before.double()
    v_hat = state["exp_avg_sq"].double() / (1 - group["betas"][1] ** float(state["step"]))
    return math.sqrt(float((g * g / torch.clamp(v_hat, min=group["eps"] ** 2)).mean()))


def by_hand(optimizer, name, befores, grads, rule, d):
    """The rule applied in float64 to the step the unclipped optimizer just took."""
    with torch.no_grad():
        for group in optimizer.param_groups:
            for param in group["params"]:
                before = befores[param]
                if param.grad is None:
                    continue
                decay = group["lr"] * group.get("weight_decay", 0.0) if name in DECOUPLED else 0.0
                if rule == "adafactor":
                    new = update_clipped_by_hand(before, param, decay, step_size(optimizer, name, group, param, before), d)
                else:
                    ratio = stable_ratio(optimizer, name, group, param, before, grads[param])
                    scale = d / ratio if ratio > d else 1.0
                    decayed = before.double() * (1 - decay)
                    new = decayed - scale * (decayed - param.double())
                param.copy_(new.to(param.dtype))


@pytest.mark.parametrize("name,variant,mode,rule", list(cases()))
def test_every_optimizer_and_way_of_stepping_equals_the_rule_by_hand(name, variant, mode, rule):
    cls_name, kwargs = OPTIMIZERS[name]
    d = THRESHOLDS.get(name, 0.5)
    x, y = data(torch.float32)
    finals, clipped = [], 0
    for attached in (True, False):
        model = make_model(torch.float32, bias=name != "Muon")
        optimizer = getattr(torch.optim, cls_name)(model.parameters(), **kwargs, **variants(cls_name)[variant])
        clipper = gradclip.UpdateClip(rule, d=d).attach(optimizer) if attached else None
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if mode == "scaler" else None
        for step in range(STEPS):
            optimizer.zero_grad()
            befores = {p: p.detach().clone() for p in model.parameters()}
            grads = {}

            def closure():
                loss = loss_of(model, x, y, step, spike_step=2)
                (scaler.scale(loss) if scaler else loss).backward()
                scale = float(scaler.get_scale()) if scaler else 1.0  # the true gradients, as they are now
                grads.update({p: p.grad.double() / scale for p in model.parameters() if p.grad is not None})
                return loss

            if mode == "closure":
                optimizer.step(closure)
            else:
                closure()
                if scaler:
                    scaler.step(optimizer)
                else:
                    optimizer.step()
            if scaler:
                scaler.update()
            if attached:
                clipped += int(clipper.last_result.clipped.sum())
            else:
                by_hand(optimizer, name, befores, grads, rule, d)
        finals.append([p.detach().clone() for p in model.parameters()])
    for ours, theirs in zip(*finals):
        torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=2e-6)
    assert clipped > 0, "the case must exercise the clip"


# --- what the rule refuses, leaves alone, or must not hide ------------------------------------------


def test_stable_adamw_needs_adams_second_moment():
    model = make_model()
    with pytest.raises(TypeError, match="betas"):
        gradclip.UpdateClip("stable_adamw").attach(torch.optim.SGD(model.parameters(), lr=0.1))
    optimizer = torch.optim.Adamax(model.parameters(), lr=0.01)  # betas and eps, but no exp_avg_sq
    gradclip.UpdateClip("stable_adamw").attach(optimizer)
    loss_of(model, *data(), 0).backward()
    with pytest.raises(TypeError, match="exp_avg_sq"):
        optimizer.step()


@pytest.mark.parametrize("rule", ["adafactor", "stable_adamw"])
def test_frozen_and_unused_parameters_are_left_alone(rule):
    model = make_model()
    model[0].weight.requires_grad_(False)
    extra = torch.nn.Parameter(torch.ones(3, dtype=F64))  # never used: its .grad stays None
    optimizer = torch.optim.AdamW(list(model.parameters()) + [extra], lr=0.05, weight_decay=0.1)
    clipper = gradclip.UpdateClip(rule, d=0.3).attach(optimizer)
    frozen = model[0].weight.detach().clone()
    train(model, optimizer, 5, *data())
    assert torch.equal(model[0].weight, frozen) and torch.equal(extra.detach(), torch.ones(3, dtype=F64))
    result = clipper.last_result
    assert torch.isnan(result.rms[[0, 4]]).all() and (result.scales[[0, 4]] == 1).all()
    assert torch.isfinite(result.rms[1:4]).all()


def test_a_fused_step_the_scaler_skips_is_left_skipped():
    model = make_model(torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, fused=True, weight_decay=0.1, decoupled_weight_decay=True)
    gradclip.UpdateClip("adafactor", d=0.5).attach(optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x, y = data(torch.float32)
    for step in range(3):
        optimizer.zero_grad()
        scaler.scale(loss_of(model, x, y, step)).backward()
        if step == 2:
            model[0].weight.grad[0, 0] = INF
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(optimizer)
        scaler.update()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # the decay was not undone either


@pytest.mark.parametrize("bad", [INF, math.nan])
def test_a_non_finite_update_is_not_made_finite(bad):
    w = torch.nn.Parameter(torch.zeros(4, dtype=F64))
    optimizer = torch.optim.SGD([w], lr=0.1)
    gradclip.UpdateClip("adafactor").attach(optimizer)
    w.grad = torch.tensor([1.0, bad, 1.0, 1.0], dtype=F64)
    optimizer.step()
    assert torch.isnan(w[1]) and torch.isfinite(w[[0, 2, 3]]).all()  # as torch.optim.Adafactor: inf * 0


def test_attached_before_a_spike_guard_the_guard_still_undoes_skipped_steps():
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    gradclip.UpdateClip("adafactor", d=0.5).attach(optimizer)
    guard = gradclip.SpikeGuard(threshold=3.0, window=8, min_history=3).attach(optimizer)
    x, y = data()
    for step in range(6):
        optimizer.zero_grad()
        loss_of(model, x, y, step, spike=1e3, spike_step=5).backward()
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.step()
    assert int(guard.skipped_steps) == 1
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    late = gradclip.UpdateClip()
    with pytest.raises(RuntimeError, match="attach UpdateClip first"):
        late.attach(optimizer)


# --- sync, state, arguments, compile ----------------------------------------------------------------


@pytest.mark.parametrize("cls_name,rule", [("AdamW", "stable_adamw"), ("AdamW", "adafactor"), ("Adafactor", "adafactor")])
def test_the_hooks_never_read_a_value_on_the_host(cls_name, rule):
    model = make_model()
    optimizer = getattr(torch.optim, cls_name)(model.parameters(), lr=0.01, weight_decay=0.1, foreach=True)
    clipper = gradclip.UpdateClip(rule, d=0.3)
    x, y = data()
    for step in range(3):
        optimizer.zero_grad()
        loss_of(model, x, y, step).backward()
        with no_host_sync():
            clipper._pre_hook(optimizer, (optimizer,), {})
        optimizer.step()  # torch's own step reads its step count on the CPU: outside the check
        with no_host_sync():
            clipper._post_hook(optimizer, (optimizer,), {})
    assert clipper.last_result.scales.shape == (4,)


def test_state_dict_loads_with_weights_only_and_pickles_detached():
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    clipper = gradclip.UpdateClip("stable_adamw", d=2.0).attach(optimizer)
    train(model, optimizer, 3, *data())
    buffer = io.BytesIO()
    torch.save(clipper.state_dict(), buffer)
    buffer.seek(0)
    fresh = gradclip.UpdateClip("stable_adamw", d=2.0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.steps == 3 and not fresh.attached
    twin = pickle.loads(pickle.dumps(clipper))
    assert twin.steps == 3 and not twin.attached and twin._copies is None
    with pytest.raises(ValueError, match="d=2.0"):
        gradclip.UpdateClip("stable_adamw", d=1.0).load_state_dict(clipper.state_dict())
    # the pickled twin resumes like the original
    model_b = copy.deepcopy(model)
    optimizer_b = torch.optim.AdamW(model_b.parameters(), lr=0.01)
    optimizer_b.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # (load_state_dict shares tensors)
    twin.attach(optimizer_b)
    for ours, theirs in zip(train(model, optimizer, 2, *data()), train(model_b, optimizer_b, 2, *data())):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,name", [(dict(rule="clip"), "rule"), (dict(d=0.0), "d"), (dict(d=math.nan), "d"),
                                         (dict(d="1"), "d"), (dict(scale_weight_decay=1), "scale_weight_decay"),
                                         (dict(foreach="yes"), "foreach")])
def test_arguments_are_checked_by_name(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        gradclip.UpdateClip(**kwargs)


def test_attach_twice_and_to_a_non_optimizer_are_errors():
    clipper = gradclip.UpdateClip()
    with pytest.raises(TypeError, match="optimizer"):
        clipper.attach(make_model())
    optimizer = torch.optim.SGD(make_model().parameters(), lr=0.1)
    clipper.attach(optimizer)
    with pytest.raises(RuntimeError, match="already attached"):
        clipper.attach(optimizer)
    clipper.detach()
    assert not clipper.attached


@pytest.mark.parametrize("rule", ["adafactor", "stable_adamw"])
def test_torch_compile_does_not_recompile_per_step(rule):
    import torch._dynamo.testing
    import torch.distributed.tensor  # noqa: F401  (gradclip looks DTensor up once; make that happen before tracing)

    gradclip._groups.dtensor_type()
    x, y = data()

    def setup():
        model = make_model()
        return model, torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1, foreach=True)

    def run(step_fn, model, optimizer, clipper=None, counters=()):
        for step in range(20):
            optimizer.zero_grad(set_to_none=False)
            loss_of(model, x, y, step, spike=1e3, spike_step=7).backward()
            step_fn()
            if step == 1:
                early = [c.frame_count for c in counters]
        return [p.detach().clone() for p in model.parameters()], early

    model, optimizer = setup()
    gradclip.UpdateClip(rule, d=0.5).attach(optimizer)
    eager, _ = run(optimizer.step, model, optimizer)
    # the hooks' own code, compiled with fullgraph=True around an eager step
    model, optimizer = setup()
    clipper = gradclip.UpdateClip(rule, d=0.5)
    pre_count = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    post_count = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    pre = torch.compile(lambda: clipper._pre_hook(optimizer, (optimizer,), {}), fullgraph=True, backend=pre_count)
    post = torch.compile(lambda: clipper._post_hook(optimizer, (optimizer,), {}), fullgraph=True, backend=post_count)

    def hooked_step():
        pre()
        optimizer.step()
        post()

    compiled, _ = run(hooked_step, model, optimizer)
    assert (pre_count.frame_count, post_count.frame_count) == (1, 1)
    for a, b in zip(compiled, eager):  # (the traced ops may round differently: a few ulps)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    # torch.compile(optimizer.step), which torch splits at its own graph breaks (fullgraph=False)
    model, optimizer = setup()
    gradclip.UpdateClip(rule, d=0.5).attach(optimizer)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    whole, early = run(torch.compile(optimizer.step, backend=counter), model, optimizer, counters=[counter])
    assert counter.frame_count == early[0], "a new graph after the second step"
    for a, b in zip(whole, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- FSDP2: each RMS is the full tensor's, on 2 gloo ranks -----------------------------------------------

FSDP_STEPS = 4


def fsdp_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5), torch.nn.Tanh(),
                               torch.nn.Linear(5, 1))


def fsdp_batch(step):
    generator = torch.Generator().manual_seed(600 + step)
    x, y = torch.randn(12, 8, generator=generator), torch.randn(12, 1, generator=generator)
    return x, y * (30.0 if step == 2 else 1.0)


def fsdp_run(rule, world=1, rank=0, mesh=None):
    model = fsdp_model()
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    clipper = gradclip.UpdateClip(rule, d=0.5).attach(optimizer)
    scales = []
    for step in range(FSDP_STEPS):
        optimizer.zero_grad()
        x, y = fsdp_batch(step)
        torch.nn.functional.mse_loss(model(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()
        optimizer.step()
        scales.append(clipper.last_result.scales)
    full = [p.full_tensor() if mesh is not None else p.detach() for p in model.parameters()]
    return full, torch.stack(scales)


def scenario_update_clip(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    return {rule: fsdp_run(rule, world, rank, mesh) for rule in ("adafactor", "stable_adamw")}


def test_fsdp2_clips_by_full_tensor_rms_on_two_ranks(tmp_path):
    from test_distributed import run_ranks

    results = run_ranks(scenario_update_clip, 2, tmp_path)
    for rule in ("adafactor", "stable_adamw"):
        params, scales = fsdp_run(rule)
        assert (scales < 1).any(), f"{rule}: the run must exercise the clip"
        for result in results:
            got_params, got_scales = result[rule]
            torch.testing.assert_close(got_scales, scales, rtol=1e-5, atol=0)
            for got, want in zip(got_params, params):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert torch.equal(results[0][rule][1], results[1][rule][1])  # the same decisions on every rank
