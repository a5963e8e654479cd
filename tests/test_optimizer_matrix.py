"""Every torch.optim optimizer x every way it steps x every attachable tool: what the optimizer used was clipped.

For each optimizer class (in its plain, foreach and fused variants, as far as
its constructor offers them), each way of stepping (``opt.step()``,
``opt.step(closure)``, ``scaler.step(opt)`` with a CPU GradScaler, and
``wrapper.step()`` of framework-style wrappers the tool was attached through,
which run no ``Optimizer.__init__``, as accelerate's and Lightning's do) and each
attachable tool (AutoClip, ZClip, SpikeGuard on the norm and fed the loss, GradientMonitor), a few real
steps on a tiny model with a gradient spike are compared with a reference run
that does by hand, after ``backward()`` (and ``scaler.unscale_``), what the
tool's own ClipResult says it did: multiply the gradients by ``scale``, or
undo the step when the guard's factor is 0. So the parameters show that the
gradients the optimizer stepped with were the clipped ones. Along the way:
no "twice"/"no gradient" error, a twin tool called by hand on the unscaled
gradients agrees with the attached one (the true norm under a fused
optimizer), and ``state_dict()`` survives ``torch.save``/``torch.load(weights_only=True)``.

Also for every optimizer, variant and way of stepping: a ``GradBuffer`` run with a layer frozen
mid-training and a layer that some forward passes skip steps exactly what an eager
``optimizer.zero_grad()`` loop steps (same parameters and optimizer state), clipping on the flat path.

And a matrix of real loops (issue 26): loops of several steps, each tool (AutoClip, ZClip, AdaGC, SpikeGuard on the
norm and fed the loss,
clip_grad_norm_) called by hand, attached, or attached through framework-style wrappers, with a fused or non-fused
AdamW, a GradScaler with forced overflows or none, gradient accumulation 1 or 3, a layer frozen mid-training or not,
a GradBuffer on or off, against an eager reference loop written without gradclip. Its rows are a covering design of
strength 3 of those factors (every combination of levels of any three factors appears, so every pair does), not the
full product.
"""

from __future__ import annotations

import copy
import inspect
import io
import itertools
import math

import pytest
import torch

import gradclip
from gradclip.autoclip import AutoClip
from gradclip.guard import SpikeGuard
from gradclip.monitor import GradientMonitor
from gradclip.zclip import ZClip

STEPS = 5
SPIKE_STEP, SPIKE = 3, 40.0
INIT_SCALE = 2.0**8

# SparseAdam is left out: it steps only with sparse gradients, and gradclip clips dense ones only.
OPTIMIZERS = {
    "SGD": dict(lr=0.05, momentum=0.9),
    "Adam": dict(lr=0.01),
    "AdamW": dict(lr=0.01),
    "Adamax": dict(lr=0.01),
    "NAdam": dict(lr=0.01),
    "RAdam": dict(lr=0.01),
    "Adagrad": dict(lr=0.05),
    "Adadelta": dict(lr=1.0),
    "RMSprop": dict(lr=0.01),
    "Rprop": dict(lr=0.01),
    "ASGD": dict(lr=0.05),
    "LBFGS": dict(lr=0.1, max_iter=3, history_size=4),
    "Muon": dict(lr=0.02, ns_steps=1),  # torch >= 2.9; 2-D parameters only; bfloat16 Newton-Schulz is slow on the CPU
    "Adafactor": dict(lr=0.01),  # torch >= 2.5
}
OPTIMIZERS = {name: kwargs for name, kwargs in OPTIMIZERS.items() if hasattr(torch.optim, name)}


def variants(name):
    """plain (one tensor at a time), foreach and fused: those the constructor offers (all of them run on the CPU)."""
    accepted = inspect.signature(getattr(torch.optim, name).__init__).parameters
    out = {"plain": {"foreach": False} if "foreach" in accepted else {}}
    if "foreach" in accepted:
        out["foreach"] = {"foreach": True}
    if "fused" in accepted:
        out["fused"] = {"fused": True}
    return out


TOOLS = {
    "autoclip": lambda model: AutoClip(50.0),
    "zclip": lambda model: ZClip(warmup_steps=2, z_thresh=2.0, max_grad_norm=None),
    "guard": lambda model: SpikeGuard("median", threshold=3.0, window=8, min_history=2),
    # fed each evaluation's loss by record_loss (inside the closure, or before the step)
    "loss-guard": lambda model: SpikeGuard("median", threshold=3.0, window=8, min_history=2, signals=("loss", "norm")),
    "monitor": lambda model: GradientMonitor(model),
}

MODES = ["step", "closure", "scaler", "wrapped"]
EXCLUDED = {
    ("LBFGS", "step"): "LBFGS.step needs a closure",
    ("LBFGS", "wrapped"): "LBFGS.step needs a closure",
    ("LBFGS", "scaler"): "GradScaler.step does not take a closure, and LBFGS needs one",
}


def cases():
    for name in OPTIMIZERS:
        for variant in variants(name):
            for mode in MODES:
                reason = EXCLUDED.get((name, mode))
                marks = [pytest.mark.skip(reason=reason)] if reason else []
                yield pytest.param(name, variant, mode, marks=marks, id=f"{name}-{variant}-{mode}")


class LightningStyleWrapper(torch.optim.Optimizer):
    """Lightning's LightningOptimizer in miniature: ``._optimizer``, attributes forwarded, no ``Optimizer.__init__``."""

    def __init__(self, optimizer):
        self._optimizer = optimizer

    def __getattr__(self, item):
        return getattr(self._optimizer, item)

    def zero_grad(self, set_to_none=True):
        self._optimizer.zero_grad(set_to_none)

    def step(self, closure=None):
        return self._optimizer.step(closure)


class AccelerateStyleWrapper(torch.optim.Optimizer):
    """accelerate's AcceleratedOptimizer in miniature: ``.optimizer``, no ``Optimizer.__init__``."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none)

    def step(self, closure=None):
        return self.optimizer.step(closure)


def wrapped(optimizer):
    """The optimizer in two framework-style wrappers, neither of which has torch's step-hook dicts."""
    return AccelerateStyleWrapper(LightningStyleWrapper(optimizer))


def make_model(name):
    torch.manual_seed(0)
    bias = name != "Muon"
    return torch.nn.Sequential(torch.nn.Linear(4, 6, bias=bias), torch.nn.Tanh(), torch.nn.Linear(6, 3, bias=bias))


def make_optimizer(name, variant, model):
    return getattr(torch.optim, name)(model.parameters(), **OPTIMIZERS[name], **variants(name)[variant])


X = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
Y = torch.randn(8, 3, generator=torch.Generator().manual_seed(2))


def loss_of(model, step):
    return torch.nn.functional.mse_loss(model(X), Y) * (SPIKE if step == SPIKE_STEP else 1.0)


def after_each_evaluation(optimizer, action):
    """A step pre-hook registered last: runs ``action`` after the tools of every closure evaluation (or before the step)."""

    def hook(opt, args, kwargs):
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            action()
            return None

        def then():
            loss = closure()
            action()
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": then}
        return (args[0], then, *args[2:]), kwargs

    return optimizer.register_step_pre_hook(hook)


def step_once(model, optimizer, mode, step, scaler, by_hand=None, feed=None):
    """One training step; ``by_hand()`` runs after each backward (and unscale_), before the optimizer uses the gradients;
    ``feed(loss)`` gets each evaluation's (unscaled) loss before its backward."""

    def closure():
        optimizer.zero_grad()
        loss = loss_of(model, step)
        if feed is not None:
            feed(loss)
        loss.backward()
        if by_hand is not None:
            by_hand()
        return loss

    if mode == "closure":
        optimizer.step(closure)
    elif mode == "step":
        closure()
        optimizer.step()
    elif mode == "wrapped":  # steps through a framework-style wrapper (the tools were attached through it)
        closure()
        wrapped(optimizer).step()
    else:
        optimizer.zero_grad()
        loss = loss_of(model, step)
        if feed is not None:
            feed(loss)
        scaler.scale(loss).backward()
        if by_hand is not None:
            scaler.unscale_(optimizer)
            by_hand()
        scaler.step(optimizer)
        scaler.update()


def grad_norms(model, scale=1.0):
    """Per-layer gradient norms the monitor should record, by a plain loop (float64)."""
    layers = {}
    for name, p in model.named_parameters():
        layers.setdefault(name.rsplit(".", 1)[0], []).append(p.grad.double().reshape(-1) / scale)
    return [float(torch.linalg.vector_norm(torch.cat(v))) for v in layers.values()]


def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("tool_name", sorted(TOOLS))
@pytest.mark.parametrize("name, variant, mode", list(cases()))
def test_the_optimizer_steps_with_what_the_tool_says_it_did(name, variant, mode, tool_name):
    fused_scaled = mode == "scaler" and variant == "fused"

    # --- the run under test: the tool attached --------------------------------------------
    model = make_model(name)
    optimizer = make_optimizer(name, variant, model)
    tool = TOOLS[tool_name](model).attach(wrapped(optimizer) if mode == "wrapped" else optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE) if mode == "scaler" else None
    results, seen, weights = [], [], []  # per evaluation: the tool's result, the gradients' norms (unscaled)

    def log():
        grad_scale = getattr(optimizer, "grad_scale", None)
        seen.append(grad_norms(model, 1.0 if grad_scale is None else grad_scale.double()))
        if tool_name != "monitor":
            results.append(tool.last_result)

    after_each_evaluation(optimizer, log)
    per_step = []
    for step in range(STEPS):
        step_once(model, optimizer, mode, step, scaler, feed=tool.record_loss if tool_name == "loss-guard" else None)
        per_step.append(len(results) if tool_name != "monitor" else len(seen))
        weights.append([p.detach().clone() for p in model.parameters()])
    if tool_name != "monitor":
        assert len(results) == tool.steps == per_step[-1]  # one call per evaluation, none refused

    # --- the reference run: the same by hand, with the tool's own factors -----------------
    model_ref = make_model(name)
    optimizer_ref = make_optimizer(name, variant, model_ref)
    scaler_ref = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE) if mode == "scaler" else None
    twin = TOOLS[tool_name](model_ref)
    evaluation = iter(range(len(results) if tool_name != "monitor" else len(seen)))
    reference_norms, step_skipped = [], [False]

    def by_hand():
        i = next(evaluation)
        if tool_name == "monitor":
            reference_norms.append(grad_norms(model_ref))
            return
        params = [p for p in model_ref.parameters()]
        copies = []
        for p in params:
            q = torch.nn.Parameter(p.detach().clone())
            q.grad = p.grad.clone()
            copies.append(q)
        mine = twin(copies)  # the twin, on the unscaled gradients, decides as the attached tool did
        tested = results[i]
        if fused_scaled:
            torch.testing.assert_close(mine.norm, tested.norm, rtol=1e-6, atol=0)
            torch.testing.assert_close(mine.scale, tested.scale, rtol=1e-6, atol=0)
        else:
            assert torch.equal(mine.norm, tested.norm) and torch.equal(mine.scale, tested.scale), i
        if tool_name in ("guard", "loss-guard"):
            step_skipped[0] |= bool(tested.scale == 0)
        else:
            for p in params:
                p.grad.mul_(tested.scale.to(p.grad.dtype))

    for step in range(STEPS):
        keep = {id(p): p for p in model_ref.parameters()}
        saved_params = [p.detach().clone() for p in model_ref.parameters()]
        saved_state = copy.deepcopy(optimizer_ref.state, memo=dict(keep))
        step_skipped[0] = False
        step_once(model_ref, optimizer_ref, mode, step, scaler_ref, by_hand,
                  feed=twin.record_loss if tool_name == "loss-guard" else None)
        if step_skipped[0]:  # the guard said skip: undo the step
            with torch.no_grad():
                for p, saved in zip(model_ref.parameters(), saved_params):
                    p.copy_(saved)
            optimizer_ref.state.clear()
            optimizer_ref.state.update(saved_state)
        for p, q in zip(model_ref.parameters(), weights[step]):
            if fused_scaled:
                torch.testing.assert_close(q, p.detach(), rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(q, p.detach()), (step, name)
    assert next(evaluation, None) is None  # as many evaluations in both runs

    # --- what each tool did, beyond the parameters -----------------------------------------
    if tool_name == "monitor":
        rows = tool.table()
        assert [r["step"] for r in rows[:: len(tool.layers)]] == list(range(STEPS))
        firsts = [0] + per_step[:-1]  # the monitor records a step's first evaluation
        for step, first in enumerate(firsts):
            got = [r["grad_norm"] for r in rows if r["step"] == step]
            torch.testing.assert_close(torch.tensor(got), torch.tensor(reference_norms[first]), rtol=1e-5, atol=0)
            torch.testing.assert_close(torch.tensor(got), torch.tensor(seen[first]), rtol=1e-5, atol=0)
    elif mode != "closure" or name != "LBFGS":
        clipped = [bool(r.scale < 1) for r in results]
        assert clipped[SPIKE_STEP], "the spike was neither clipped nor skipped"

    # --- state_dict through torch.save / torch.load(weights_only=True) ---------------------
    state = tool.state_dict()
    fresh = TOOLS[tool_name](model)
    fresh.load_state_dict(roundtrip(state))
    again = fresh.state_dict()
    assert again.keys() == state.keys()
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, again[key], rtol=0, atol=0, equal_nan=True, msg=key)
        else:
            assert value == again[key], key


# --- a GradBuffer with a layer frozen mid-training and a branch some steps skip ---------------------------------
# Every optimizer, every variant, every way of stepping: the buffered run (buffer.zero_grad(), gradclip's clipping
# on the flat path) against an eager reference loop without a buffer (optimizer.zero_grad(), whose set_to_none
# leaves .grad None for what a backward pass does not reach, and torch's clipping): the same parameters and the
# same optimizer state, so a parameter without a gradient gets no weight decay, momentum or state update.

FROZEN_STEPS = (1, 2)  # the first layer's weight is frozen at step 1 and unfrozen at step 3
SKIPS_LAST = (2, 3)  # steps whose forward pass skips the last layer (its output is not used)


class WithSkippedLayer(torch.nn.Module):
    def __init__(self, bias):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = torch.nn.Linear(4, 6, bias=bias), torch.nn.Linear(6, 3, bias=bias)
        self.last = torch.nn.Linear(3, 3, bias=bias)

    def forward(self, x, skip_last):
        h = self.second(torch.tanh(self.first(x)))
        return h if skip_last else self.last(h)


def buffered_run(name, variant, mode, buffered):
    model = WithSkippedLayer(bias=name != "Muon")
    optimizer = make_optimizer(name, variant, model)
    buffer = gradclip.GradBuffer(model.parameters()) if buffered else None
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE) if mode == "scaler" else None
    frozen_moved = []
    for step in range(STEPS):
        model.first.weight.requires_grad_(step not in FROZEN_STEPS)
        before = model.first.weight.detach().clone()

        def zero():
            if buffered:
                buffer.zero_grad()
            else:
                optimizer.zero_grad()

        def clip():
            if buffered:
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                assert len(grads) < 2 or gradclip._groups.single_buffer(grads) is not None  # one kernel, gaps and all
                gradclip.clip_grad_norm_(model.parameters(), 0.5)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)

        def loss():
            return torch.nn.functional.mse_loss(model(X, step in SKIPS_LAST), Y)

        def closure():
            zero()
            value = loss()
            value.backward()
            clip()
            return value

        if mode == "closure":
            optimizer.step(closure)
        elif mode in ("step", "wrapped"):
            closure()
            (wrapped(optimizer) if mode == "wrapped" else optimizer).step()
        else:
            zero()
            scaler.scale(loss()).backward()
            scaler.unscale_(optimizer)
            clip()
            scaler.step(optimizer)
            scaler.update()
        if step in FROZEN_STEPS:
            frozen_moved.append(not torch.equal(before, model.first.weight))
    return model, optimizer, frozen_moved


@pytest.mark.parametrize("name, variant, mode", list(cases()))
def test_a_grad_buffer_steps_only_what_got_a_gradient(name, variant, mode):
    ours, our_optimizer, moved = buffered_run(name, variant, mode, buffered=True)
    ref, ref_optimizer, ref_moved = buffered_run(name, variant, mode, buffered=False)
    assert moved == ref_moved
    if name != "LBFGS":  # (LBFGS's direction mixes in its history: torch moves a weight without a gradient too)
        assert moved == [False] * len(FROZEN_STEPS)
    for (label, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=label)
        mine, theirs = our_optimizer.state.get(p, {}), ref_optimizer.state.get(q, {})
        assert mine.keys() == theirs.keys(), label
        for key, value in theirs.items():  # (LBFGS keeps lists of tensors)
            pairs = zip(mine[key], value) if isinstance(value, list) else [(mine[key], value)]
            for a, b in pairs:
                torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-4, atol=1e-6,
                                           msg=f"{label} {key}")


# --- steps the GradScaler skips leave every stateful clipper as it was ----------------------------------------
# {fused, plain} optimizer x {attached, called by hand after scaler.unscale_} x every stateful tool, under a CPU
# GradScaler whose loss overflows at OVERFLOWS (inf gradients: the scaler skips the update). Reference: an eager
# loop with no scaler that skips those steps by hand (no backward, no tool call, no optimizer step) and calls the
# tool after backward. A fused optimizer runs its step pre-hooks on skipped steps too, and the call by hand sees
# the inf norm either way: neither may enter a history, an EMA, a warm-up or a step count.

OVERFLOWS = (1, 4, 5)
OVERFLOW_SPIKE = 8
OVERFLOW_STEPS = 10

STATEFUL = {
    "autoclip": lambda: gradclip.AutoClip(25.0),
    "autoclip-window": lambda: gradclip.AutoClip(50.0, window=3, include_current=False),
    "zclip": lambda: gradclip.ZClip(warmup_steps=3, z_thresh=1.5, max_grad_norm=None),
    "adagc": lambda: gradclip.AdaGC(warmup_steps=2, lambda_rel=1.01),
    "guard": lambda: gradclip.SpikeGuard("median", threshold=1.5, window=3, min_history=2),
    # fed every step's loss, the overflowed steps' (inf) included: neither history may see them
    "loss-guard": lambda: gradclip.SpikeGuard("median", threshold=1.5, window=3, min_history=2,
                                              signals=("loss", "norm")),
    "update_clip": lambda: gradclip.UpdateClip("adafactor", d=0.2),  # (attached only: it acts after the step)
}
OVERFLOW_OPTIMIZERS = {"AdamW": dict(lr=0.05, weight_decay=0.1), "SGD": dict(lr=0.05, momentum=0.9)}


def overflow_loss(model, step, overflow):
    factor = OVERFLOW_SPIKE_FACTOR if step == OVERFLOW_SPIKE else (math.inf if overflow else 1.0)
    return torch.nn.functional.mse_loss(model(X), Y) * factor


OVERFLOW_SPIKE_FACTOR = 30.0


def overflow_run(tool_name, optimizer_name, fused, use, scaled):
    """(model, tool): ``scaled``: under a GradScaler with the forced overflows; else the eager reference."""
    model = make_model("AdamW")
    optimizer = getattr(torch.optim, optimizer_name)(model.parameters(), **OVERFLOW_OPTIMIZERS[optimizer_name],
                                                     fused=fused)
    tool = STATEFUL[tool_name]()
    if use == "attached":
        tool.attach(optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    if scaled and use == "by_hand":
        tool.scaler = scaler  # (checks the unscaling; tells the guard which steps the scaler skips)
    for step in range(OVERFLOW_STEPS):
        overflow = step in OVERFLOWS
        if not scaled and overflow:
            continue  # the reference skips the step by hand
        optimizer.zero_grad()
        loss = overflow_loss(model, step, overflow and scaled)
        if tool_name == "loss-guard":
            tool.record_loss(loss)
        if scaled:
            scaler.scale(loss).backward()
            if use == "by_hand":
                scaler.unscale_(optimizer)
                result = tool(list(model.parameters()))
                assert bool(torch.isfinite(result.norm)) != overflow
                if tool_name in ("guard", "loss-guard") and bool(result.scale == 0) and not overflow:
                    scaler.update()  # the guard's skip, done by hand
                    continue
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if use == "by_hand":
                result = tool(list(model.parameters()))
                if tool_name in ("guard", "loss-guard") and bool(result.scale == 0):
                    continue
            optimizer.step()
    return model, tool


def overflow_cases():
    for tool_name in STATEFUL:
        for use in ("attached", "by_hand"):
            if tool_name == "update_clip" and use == "by_hand":
                continue
            for optimizer_name in OVERFLOW_OPTIMIZERS:
                for fused in (False, True):
                    yield pytest.param(tool_name, use, optimizer_name, fused,
                                       id=f"{tool_name}-{use}-{optimizer_name}-{'fused' if fused else 'plain'}")


@pytest.mark.parametrize("tool_name, use, optimizer_name, fused", list(overflow_cases()))
def test_steps_the_grad_scaler_skips_leave_every_stateful_tool_unchanged(tool_name, use, optimizer_name, fused):
    model, tool = overflow_run(tool_name, optimizer_name, fused, use, scaled=True)
    reference, tool_ref = overflow_run(tool_name, optimizer_name, False, "by_hand" if tool_name != "update_clip"
                                       else "attached", scaled=False)
    exact = not fused  # (the non-fused scaler's unscaling by a power of 2 is exact; the fused kernels round differently)
    for p, q in zip(model.parameters(), reference.parameters()):
        if exact:
            assert torch.equal(p, q)
        else:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    state, expected = tool.state_dict(), tool_ref.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(state[key], value, rtol=0 if exact else 1e-5, atol=0, equal_nan=True, msg=key)
        else:
            assert state[key] == value, key
    if tool_name != "update_clip":
        assert tool.steps == OVERFLOW_STEPS - len(OVERFLOWS)


# --- a matrix of real loops, each against an independent eager reference loop ----------------------------------
# Factors: the tool (AutoClip, ZClip, AdaGC, SpikeGuard, SpikeGuard fed the step's loss, clip_grad_norm_) x how it
# is used (called by hand after backward and scaler.unscale_, attached, attached through framework-style wrappers
# whose step() runs the scaler as accelerate's does) x {fused, non-fused AdamW} x {GradScaler with forced overflows,
# none} x {gradient accumulation 1, 3} x {first layer frozen mid-training, not} x {GradBuffer on, off}.
# clip_grad_norm_ is a function: by hand only.
# The full product (512 allowed runs) is not run: the rows are a covering design of strength 3 (every combination of
# levels of any three factors, among the allowed ones, appears in at least one row, so every pair does too; the faults
# of issue 26 were interactions of three factors, e.g. fused x GradScaler x attached), chosen greedily: 47 rows.
# test_the_loop_design_covers_every_triple checks the design.
#
# Reference: a plain eager loop written without gradclip: non-fused AdamW, optimizer.zero_grad(), the micro-batches'
# backward passes, the steps the scaler skips (overflows) left out by hand (no backward, no tool, no step), the global
# norm in float64 over the gradients that exist, each tool's rule from tests/support/references.py (numpy's percentile
# for AutoClip, the ZClip reference code, the AdaGC reference code, the guard's skip rule on the norm and on the loss
# and norm, Pascanu's factor), the factor multiplied into the gradients by hand and the step skipped by hand when the
# guard says so. The guard fed the loss gets the step's: the micro-batches' losses summed (each divided by the
# accumulation), unscaled, once per step; its state (both histories, skipped steps) is compared with the reference's.

LOOP_STEPS = 9
LOOP_OVERFLOWS = (1, 5)  # under the GradScaler the loss of one micro-batch is inf: the scaler skips the step
LOOP_FREEZE = 3  # the first layer's weight is frozen (requires_grad_(False)) from this step on
LOOP_SPIKE, LOOP_SPIKE_FACTOR = 6, 30.0
LOOP_LOSS_JUMP_STEP, LOOP_LOSS_JUMP = 4, 5.0  # the loss alone jumps (a constant added): only the loss guard may skip
LOOP_MAX_NORM = 0.5
LOOP_ADAMW = dict(lr=0.05, weight_decay=0.1)

LOOP_TOOLS = {
    "autoclip": lambda scaler: gradclip.AutoClip(25.0, scaler=scaler),
    "zclip": lambda scaler: gradclip.ZClip(warmup_steps=2, z_thresh=1.5, max_grad_norm=None, scaler=scaler),
    "adagc": lambda scaler: gradclip.AdaGC(warmup_steps=2, lambda_rel=1.01, scaler=scaler),
    "guard": lambda scaler: gradclip.SpikeGuard("median", threshold=1.5, window=3, min_history=2, scaler=scaler),
    # fed each step's loss (the micro-batches' sum, unscaled) by record_loss: OLMo-core's rule on a short history
    "loss-guard": lambda scaler: gradclip.SpikeGuard.olmo_core(window=4, min_history=2, scaler=scaler),
    "clip_grad_norm": None,
}
LOSS_GUARD = dict(mode="zscore", k=6.0, window=4, min_history=2)  # the loss guard's rule, for the reference
GUARDS = ("guard", "loss-guard")

LOOP_FACTORS = {
    "tool": list(LOOP_TOOLS),
    "use": ["by_hand", "attached", "wrapped"],
    "fused": [False, True],
    "scaled": [False, True],
    "accumulation": [1, 3],
    "frozen": [False, True],
    "buffered": [False, True],
}


def loop_row_allowed(row):
    return row["tool"] != "clip_grad_norm" or row["use"] == "by_hand"


def loop_combinations(row, strength):
    """The (factor, level) combinations of ``strength`` factors that ``row`` covers."""
    return {tuple((name, row[name]) for name in names) for names in itertools.combinations(LOOP_FACTORS, strength)}


def loop_design(strength=3):
    """A covering design: greedily, the allowed row of the full product that covers most uncovered combinations."""
    names = list(LOOP_FACTORS)
    candidates = [dict(zip(names, values)) for values in itertools.product(*LOOP_FACTORS.values())]
    candidates = [row for row in candidates if loop_row_allowed(row)]
    covers = [loop_combinations(row, strength) for row in candidates]
    uncovered = set().union(*covers)
    rows = []
    while uncovered:
        best = max(range(len(candidates)), key=lambda i: len(covers[i] & uncovered))
        rows.append(candidates[best])
        uncovered -= covers[best]
    return rows, candidates


def loop_id(row):
    return "-".join([row["tool"], row["use"], "fused" if row["fused"] else "plain",
                     "scaler" if row["scaled"] else "noscaler", f"acc{row['accumulation']}",
                     "frozen" if row["frozen"] else "trained", "buffer" if row["buffered"] else "nobuffer"])


def test_the_loop_design_covers_every_triple():
    rows, allowed = loop_design()
    assert all(loop_row_allowed(row) for row in rows)
    for strength in (2, 3):
        wanted = set().union(*(loop_combinations(row, strength) for row in allowed))
        assert set().union(*(loop_combinations(row, strength) for row in rows)) == wanted, strength
    assert len(rows) < len(allowed) // 5


def loop_freeze(model):
    model[0].weight.requires_grad_(False)


def loop_batch(step, k, accumulation):
    """Micro-batch k of the step: the same total batch of 24 examples, in 1 or 3 micro-batches."""
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(24, 4, generator=g), torch.randn(24, 3, generator=g)
    size = 24 // accumulation
    return x[k * size:(k + 1) * size], y[k * size:(k + 1) * size]


def loop_loss(model, step, k, accumulation):
    x, y = loop_batch(step, k, accumulation)
    loss = torch.nn.functional.mse_loss(model(x), y) / accumulation
    if step == LOOP_LOSS_JUMP_STEP:  # a constant: the gradients are those of every other loop, bit for bit
        loss = loss + LOOP_LOSS_JUMP / accumulation
    return loss * LOOP_SPIKE_FACTOR if step == LOOP_SPIKE else loss


class ScalingWrapper(AccelerateStyleWrapper):
    """accelerate's AcceleratedOptimizer in miniature: holds the scaler; its step() is scaler.step + update, on the
    torch optimizer itself (as accelerate's, and Lightning's precision plugin, pass the unwrapped optimizer)."""

    def __init__(self, optimizer, scaler):
        super().__init__(optimizer)
        self.scaler = scaler

    def step(self, closure=None):
        if self.scaler is None:
            return self.optimizer.step(closure)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return None


def loop_under_test(tool, use, fused, scaled, accumulation, frozen, buffered):
    """The loop under test; returns (model, optimizer, tool, per-step results of the tool on the steps not overflowed)."""
    model = make_model("AdamW")
    optimizer = torch.optim.AdamW(model.parameters(), **LOOP_ADAMW, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE) if scaled else None
    buffer = gradclip.GradBuffer(model.parameters()) if buffered else None
    stepper = LightningStyleWrapper(ScalingWrapper(optimizer, scaler)) if use == "wrapped" else optimizer
    clipper = None if LOOP_TOOLS[tool] is None else LOOP_TOOLS[tool](scaler if use == "by_hand" else None)
    if use != "by_hand":
        clipper.attach(stepper)
    results = []
    for step in range(LOOP_STEPS):
        if frozen and step == LOOP_FREEZE:
            loop_freeze(model)
        overflow = scaled and step in LOOP_OVERFLOWS
        (buffer if buffered else stepper).zero_grad()
        step_loss = 0.0
        for k in range(accumulation):
            loss = loop_loss(model, step, k, accumulation)
            if overflow and k == accumulation - 1:
                loss = loss * math.inf
            (scaler.scale(loss) if scaled else loss).backward()
            step_loss = step_loss + loss.detach()  # the step's loss: the micro-batches' (each divided by accumulation)
        if tool == "loss-guard":
            clipper.record_loss(step_loss)  # once per step, before the guard decides (by hand or in step())
        skip = False
        if use == "by_hand":
            if scaled:
                scaler.unscale_(optimizer)
            if clipper is None:
                result = gradclip.clip_grad_norm_(model.parameters(), LOOP_MAX_NORM)
            else:
                result = clipper(list(model.parameters()))
            skip = tool in GUARDS and bool(result.scale == 0)
        if skip:  # the guard's skip, by hand
            if scaled:
                scaler.update()
        elif use == "wrapped" or not scaled:
            stepper.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        if not overflow:
            results.append(result if use == "by_hand" else clipper.last_result)
    return model, optimizer, clipper, results


def reference_loop(tool, scaled, accumulation, frozen):
    """The eager reference: (model, optimizer, per-step norms, per-step factors, state of the rule)."""
    from support import references

    model = make_model("AdamW")
    optimizer = torch.optim.AdamW(model.parameters(), **LOOP_ADAMW, foreach=False)
    zclip = references.ReferenceZClip(warmup_steps=2, z_thresh=1.5, max_grad_norm=None)
    adagc = references.ReferenceAdaGC(clip_ratio=1.01, beta=0.98, eps=1e-6, start_clip_steps=2, max_norm=1.0)
    loss_guard = references.ReferenceLossGuard(**LOSS_GUARD)
    history, norms, factors, skipped = [], [], [], 0
    for step in range(LOOP_STEPS):
        if frozen and step == LOOP_FREEZE:
            loop_freeze(model)
        if scaled and step in LOOP_OVERFLOWS:
            continue  # the scaler skips this step: the reference never takes it
        optimizer.zero_grad()
        step_loss = 0.0
        for k in range(accumulation):
            loss = loop_loss(model, step, k, accumulation)
            loss.backward()
            step_loss += float(loss.detach())
        params = [p for p in model.parameters() if p.grad is not None]
        norm = float(references.global_norm([p.grad for p in params]))
        norms.append(norm)
        if tool == "adagc":  # (its state is per position among all the parameters, None where no gradient)
            clipped = [c for c in adagc([p.grad for p in model.parameters()]) if c is not None]
            factor = [float(references.global_norm([c]) / references.global_norm([p.grad]))
                      for c, p in zip(clipped, params)]
            with torch.no_grad():
                for p, c in zip(params, clipped):
                    p.grad.copy_(c)
        else:
            if tool == "autoclip":
                history.append(norm)
                threshold = references.autoclip_threshold(history, 25.0)
                factor = threshold / norm if norm > threshold else 1.0
            elif tool == "zclip":
                factor, _ = zclip.step(norm)
            elif tool == "guard":
                skip = references.spike_guard_decisions(norms, "median", 1.5, 3, 2)[-1]
                factor = 0.0 if skip else 1.0
            elif tool == "loss-guard":
                skip = loss_guard.step(step_loss, norm)
                factor = 0.0 if skip else 1.0
            else:
                factor = min(1.0, LOOP_MAX_NORM / (norm + 1e-6))
            if tool in GUARDS:
                if skip:
                    skipped += 1
                    factors.append(factor)
                    continue
            else:
                with torch.no_grad():
                    for p in params:
                        p.grad.mul_(factor)
        factors.append(factor)
        optimizer.step()
    return model, optimizer, norms, factors, dict(history=history, zclip=zclip, adagc=adagc, skipped=skipped,
                                                  loss_guard=loss_guard)


@pytest.mark.parametrize("row", loop_design()[0], ids=loop_id)
def test_a_real_loop_matches_an_eager_reference_loop(row):
    model, optimizer, clipper, results = loop_under_test(**row)
    ref, ref_optimizer, norms, factors, state = reference_loop(row["tool"], row["scaled"], row["accumulation"],
                                                               row["frozen"])
    assert len(results) == len(norms) == LOOP_STEPS - (len(LOOP_OVERFLOWS) if row["scaled"] else 0)
    got_norms = [float(r.norm if clipper is not None else r) for r in results]
    torch.testing.assert_close(torch.tensor(got_norms, dtype=torch.float64), torch.tensor(norms, dtype=torch.float64), rtol=1e-5, atol=0)
    if row["tool"] == "adagc":
        for r, expected in zip(results, factors):
            torch.testing.assert_close(r.scales.double(), torch.tensor(expected, dtype=torch.float64),
                                       rtol=1e-5, atol=1e-7)
    elif clipper is not None:
        torch.testing.assert_close(torch.tensor([float(r.scale) for r in results], dtype=torch.float64),
                                   torch.tensor(factors, dtype=torch.float64), rtol=1e-5, atol=0)
    assert min(min(f) if isinstance(f, list) else f for f in factors) < 1  # the loop does clip (or skip)
    # what the tool keeps
    if clipper is not None:
        assert clipper.steps == len(norms)
        saved = clipper.state_dict()
        if row["tool"] == "autoclip":
            torch.testing.assert_close(saved["history"], torch.tensor(state["history"], dtype=torch.float64),
                                       rtol=1e-5, atol=0)
        elif row["tool"] == "zclip":
            torch.testing.assert_close(float(saved["mean"]), state["zclip"].mean, rtol=1e-5, atol=0)
            torch.testing.assert_close(float(saved["var"]), state["zclip"].var, rtol=1e-4, atol=0)
        elif row["tool"] == "adagc":
            expected = [state["adagc"].norm_value.get(i, math.nan) for i in range(len(saved["gamma"]))]
            torch.testing.assert_close(saved["gamma"], torch.tensor(expected, dtype=torch.float64), rtol=1e-5,
                                       atol=0, equal_nan=True)
        elif row["tool"] == "loss-guard":  # both histories, the loss as recorded (the overflowed steps' left out)
            taken = [s for s in range(LOOP_STEPS) if not (row["scaled"] and s in LOOP_OVERFLOWS)]
            assert factors[taken.index(LOOP_LOSS_JUMP_STEP)] == 0.0  # the loss's jump alone was skipped
            ref_guard = state["loss_guard"]
            assert int(saved["skipped_steps"]) == ref_guard.skipped == state["skipped"]
            torch.testing.assert_close(saved["loss_history"], ref_guard.ring(ref_guard.losses), rtol=1e-5, atol=0,
                                       equal_nan=True)
            torch.testing.assert_close(saved["history"], ref_guard.ring(ref_guard.norms), rtol=1e-5, atol=0,
                                       equal_nan=True)
        else:
            assert int(saved["skipped_steps"]) == state["skipped"]
    # the weights and the optimizer's state
    for (label, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=label)
        mine, theirs = optimizer.state.get(p, {}), ref_optimizer.state.get(q, {})
        assert mine.keys() == theirs.keys(), label
        for key, value in theirs.items():
            torch.testing.assert_close(torch.as_tensor(mine[key]).double(), torch.as_tensor(value).double(),
                                       rtol=1e-5, atol=1e-7, msg=f"{label} {key}")
