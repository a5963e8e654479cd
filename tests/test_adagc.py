"""AdaGC and OLMo's preset against float64 transcriptions of their reference code, step by step.

The references (tests/support/references.py) transcribe the authors' Megatron patch
(lishuai-97/AdaGC) and OLMo's ``_do_adaptive_clipping`` (allenai/OLMo); each test runs
a multi-step loop through the warm-up, the EMA's first value, spikes, parameters that
get their first gradient late, and compares every clipped gradient and every gamma.
"""

from __future__ import annotations

import io
import copy
import math
import pickle

import pytest
import torch

import gradclip
from support.references import ReferenceAdaGC, ReferenceOLMoAdaptiveClipping
from support.sync import no_host_sync

F64 = torch.float64
SHAPES = [(4, 3), (5,), (2, 2, 2), (7,)]
STEPS = 14


def gradient_sequence(seed=0, steps=STEPS):
    """Per step, one float64 gradient per position, or None: a trend, noise, spikes, late arrivals."""
    generator = torch.Generator().manual_seed(seed)
    sequence = []
    for step in range(1, steps + 1):
        grads = []
        for i, shape in enumerate(SHAPES):
            g = torch.randn(shape, generator=generator, dtype=F64) * (1.5 / math.sqrt(step)) * (1 + 0.5 * i)
            if (i, step) in ((0, 8), (1, 10), (3, 12)):
                g = g * 30  # a spike in one tensor
            absent = (i == 2 and step <= 2) or (i == 3 and step <= 5) or (i == 1 and step == 9)
            grads.append(None if absent else g)
        sequence.append(grads)
    return sequence


def params_for(grads):
    params = [torch.nn.Parameter(torch.zeros(shape, dtype=F64)) for shape in SHAPES]
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()
    return params


def gamma_of(reference_state, count):
    return torch.tensor([reference_state.get(i, math.nan) for i in range(count)], dtype=F64)


ADAGC_CONFIGS = {
    "defaults-rel1.05-b0.98-T4": dict(lambda_rel=1.05, beta=0.98, warmup_steps=4, lambda_abs=2.0),
    "authors-code-rel1.04-b0.99-T3": dict(lambda_rel=1.04, beta=0.99, warmup_steps=3, lambda_abs=1.0),
    "no-warmup-rel0.9": dict(lambda_rel=0.9, beta=0.9, warmup_steps=0, lambda_abs=1.0),
    "p1-T5-noabs": dict(lambda_rel=1.2, beta=0.95, warmup_steps=5, lambda_abs=math.inf, norm_type=1.0),
}


@pytest.mark.parametrize("config", list(ADAGC_CONFIGS))
def test_adagc_matches_the_authors_code_step_by_step(config):
    kwargs = dict(ADAGC_CONFIGS[config])
    norm_type = kwargs.pop("norm_type", 2.0)
    ours = gradclip.AdaGC(**kwargs, norm_type=norm_type)
    theirs = ReferenceAdaGC(clip_ratio=kwargs["lambda_rel"], beta=kwargs["beta"], eps=1e-6,
                            start_clip_steps=kwargs["warmup_steps"], max_norm=kwargs["lambda_abs"],
                            norm_type=norm_type)
    clipped_some = 0
    for step, grads in enumerate(gradient_sequence(), start=1):
        params = params_for(grads)
        result = ours(params)
        expected = theirs(grads)
        for p, want in zip(params, expected):
            if want is None:
                assert p.grad is None
            else:
                torch.testing.assert_close(p.grad, want, rtol=1e-12, atol=0, msg=lambda m: f"step {step}: {m}")
        torch.testing.assert_close(ours.gamma, gamma_of(theirs.norm_value, len(SHAPES)), rtol=1e-12, atol=0,
                                   equal_nan=True, msg=lambda m: f"gamma after step {step}: {m}")
        clipped_some += int(result.clipped.sum())
    assert ours.steps == STEPS
    assert clipped_some >= 3, "the sequence must make the rule clip (warm-up and spikes)"


def test_the_first_gamma_is_the_smallest_clipped_warmup_norm():
    # the EMA's first value: min over the warm-up of each tensor's norm after global clipping
    ours = gradclip.AdaGC(warmup_steps=3, lambda_abs=1.0)
    w = torch.nn.Parameter(torch.zeros(2, dtype=F64))
    v = torch.nn.Parameter(torch.zeros(1, dtype=F64))
    for gw, gv in (([3.0, 4.0], [0.1]), ([0.3, 0.4], [0.2]), ([0.6, 0.8], [0.05])):
        w.grad, v.grad = torch.tensor(gw, dtype=F64), torch.tensor(gv, dtype=F64)
        ours([w, v])
    # step 1: global norm 5.001 -> both scaled by 1/(5.001+1e-6); later steps are not clipped
    first = 1.0 / (math.hypot(5.0, 0.1) + 1e-6)
    torch.testing.assert_close(ours.gamma, torch.tensor([min(5.0 * first, 0.5, 1.0), min(0.1 * first, 0.2, 0.05)], dtype=F64),
                               rtol=1e-14, atol=0)


OLMO_CONFIGS = {"ratio1.5-b0.95": (1.5, 0.95), "ratio1.0-b0.99": (1.0, 0.99), "ratio0.8-b0.9": (0.8, 0.9)}


@pytest.mark.parametrize("config", list(OLMO_CONFIGS))
def test_olmo_preset_matches_olmo_step_by_step(config):
    ratio, beta = OLMO_CONFIGS[config]
    ours = gradclip.AdaGC.olmo(ratio, beta=beta)
    theirs = ReferenceOLMoAdaptiveClipping(ratio, beta)
    for step, grads in enumerate(gradient_sequence(seed=3), start=1):
        params = params_for(grads)
        ours(params)
        expected = theirs(grads)
        for p, want in zip(params, expected):
            if want is not None:
                torch.testing.assert_close(p.grad, want, rtol=1e-12, atol=0, msg=lambda m: f"step {step}: {m}")
        torch.testing.assert_close(ours.gamma, gamma_of(theirs.exp_avg, len(SHAPES)), rtol=1e-12, atol=0,
                                   equal_nan=True, msg=lambda m: f"EMA after step {step}: {m}")
    assert torch.isnan(gamma_of(ReferenceOLMoAdaptiveClipping(ratio, beta).exp_avg, 1)).all()


def test_olmo_keeps_no_ema_on_its_first_step():
    ours = gradclip.AdaGC.olmo(2.0, beta=0.9)
    w = torch.nn.Parameter(torch.zeros(1, dtype=F64))
    w.grad = torch.tensor([4.0], dtype=F64)
    ours([w])
    assert torch.isnan(ours.gamma).all()
    w.grad = torch.tensor([1.0], dtype=F64)
    ours([w])
    assert float(ours.gamma[0]) == pytest.approx(1.0, rel=1e-12)  # started from the second step's norm


def test_adagc_and_olmo_differ_only_where_their_sources_do():
    # after warm-up with the same gamma: AdaGC clips only above the cap and enters the cap itself;
    # OLMo's torch-style factor is below 1 just under the cap, and enters norm * factor
    ada = gradclip.AdaGC(lambda_rel=1.0, beta=0.5, warmup_steps=0)
    olmo = gradclip.AdaGC.olmo(1.0, beta=0.5)
    for clipper in (ada, olmo):
        clipper.load_state_dict({"config": clipper._config(), "steps": 1,
                                 "gamma": torch.tensor([2.0], dtype=F64)})
    w, u = (torch.nn.Parameter(torch.zeros(1, dtype=F64)) for _ in range(2))
    w.grad, u.grad = torch.tensor([2.0], dtype=F64), torch.tensor([2.0], dtype=F64)
    assert float(ada([w]).scales[0]) == 1.0
    assert float(olmo([u]).scales[0]) == pytest.approx(2.0 / (2.0 + 1e-6), rel=1e-15)


# --- differences from the references, on purpose ----------------------------------------------------


def test_a_zero_gradient_does_not_freeze_its_tensor_as_in_the_reference():
    # an unused parameter (zeros) during warm-up: the reference's gamma becomes 0 and the tensor's
    # later gradients are multiplied by 0 for ever; here gamma ignores the zeros
    ours = gradclip.AdaGC(warmup_steps=2)
    theirs = ReferenceAdaGC(clip_ratio=1.05, beta=0.98, eps=1e-6, start_clip_steps=2, max_norm=1.0)
    sequence = [[torch.tensor([0.3], dtype=F64)], [torch.tensor([0.0], dtype=F64)]] + \
               [[torch.tensor([0.3], dtype=F64)]] * 3
    for grads in sequence:
        params = params_for_shapes(grads)
        ours(params)
        expected = theirs(grads)
    assert float(expected[0]) == 0.0  # the reference froze it
    assert float(params[0].grad) == pytest.approx(0.3 * 1.0, rel=1e-12)  # 0.3 <= 1.05 * 0.3: untouched
    assert float(ours.gamma[0]) == pytest.approx(0.3, rel=1e-12)


def params_for_shapes(grads):
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    return params


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("rule", ["adagc", "olmo"])
def test_a_non_finite_gradient_stays_non_finite_and_leaves_gamma_alone(bad, rule):
    # A call whose global norm is non-finite (a step GradScaler skips) changes no gamma at all and is
    # not counted: the clean run never sees step 5; the other tensors' gradients are clipped as a twin
    # call without the faulty tensor clips them.
    def make():
        return gradclip.AdaGC(warmup_steps=2) if rule == "adagc" else gradclip.AdaGC.olmo(1.5, beta=0.9)

    clean, faulty = make(), make()
    sequence = gradient_sequence(seed=5, steps=6)
    for step, grads in enumerate(sequence, start=1):
        params = params_for(grads)
        if step == 5:
            params[0].grad[0, 0] = bad
            twins = params_for([None] + grads[1:])  # the same step without the faulty tensor
            copy.deepcopy(clean)(twins)
            faulty(params)
            assert faulty.steps == clean.steps == 4
            assert not torch.isfinite(params[0].grad[0, 0])
            if bad != bad:  # AdaGC leaves the tensor alone (NaN > cap is false); OLMo's factor is NaN
                assert torch.isnan(params[0].grad).sum() == (1 if rule == "adagc" else params[0].numel())
            for p, q in zip(params[1:], twins[1:]):
                if q.grad is not None:
                    torch.testing.assert_close(p.grad, q.grad, rtol=1e-14, atol=0)
        else:
            clean(params_for(grads))
            faulty(params)
        torch.testing.assert_close(faulty.gamma, clean.gamma, rtol=1e-14, atol=0, equal_nan=True)


def test_a_non_finite_warmup_norm_is_not_made_finite():
    clipper = gradclip.AdaGC(warmup_steps=5)
    params = params_for(gradient_sequence()[3])
    params[1].grad[0] = math.nan
    clipper(params)
    assert all(torch.isnan(p.grad).all() for p in params if p.grad is not None)  # as clip_grad_norm_
    assert torch.isnan(clipper.gamma).all()


# --- sync, state, protocol ----------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["adagc", "olmo"])
def test_no_host_sync_in_warmup_or_after(rule):
    clipper = gradclip.AdaGC(warmup_steps=2) if rule == "adagc" else gradclip.AdaGC.olmo(1.5, beta=0.9)
    sequence = gradient_sequence(steps=5)
    with no_host_sync():
        for grads in sequence:
            result = clipper(params_for(grads))
    assert result.norms.shape == (3,)


def run(clipper, sequence):
    outputs = []
    for grads in sequence:
        params = params_for(grads)
        clipper(params)
        outputs.append([None if p.grad is None else p.grad.clone() for p in params])
    return outputs


@pytest.mark.parametrize("rule", ["adagc", "olmo"])
def test_resume_from_a_weights_only_state_dict_equals_an_uninterrupted_run(rule):
    def make():
        return gradclip.AdaGC(warmup_steps=3) if rule == "adagc" else gradclip.AdaGC.olmo(1.2, beta=0.95)

    sequence = gradient_sequence(seed=7)
    straight = run(make(), sequence)
    first = make()
    run(first, sequence[:5])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = make()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.steps == 5
    unpickled = pickle.loads(pickle.dumps(first))
    for later in (run(resumed, sequence[5:]), run(unpickled, sequence[5:])):
        for got, want in zip(later, straight[5:]):
            for g, w in zip(got, want):
                if w is not None:
                    torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_state_of_another_configuration_is_refused_by_name():
    saved = gradclip.AdaGC(beta=0.98).state_dict()
    with pytest.raises(ValueError, match="beta"):
        gradclip.AdaGC(beta=0.9).load_state_dict(saved)
    with pytest.raises(ValueError, match="rule"):
        gradclip.AdaGC.olmo(1.05, beta=0.98).load_state_dict(saved)


@pytest.mark.parametrize("kwargs,name", [(dict(lambda_rel=0.0), "lambda_rel"), (dict(beta=1.0), "beta"),
                                         (dict(warmup_steps=-1), "warmup_steps"), (dict(lambda_abs=0), "lambda_abs"),
                                         (dict(eps=-1.0), "eps"), (dict(beta="0.9"), "beta"),
                                         (dict(dtype=torch.float16), "dtype")])
def test_arguments_are_checked_by_name(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        gradclip.AdaGC(**kwargs)


def test_changing_the_parameters_between_calls_is_an_error():
    clipper = gradclip.AdaGC()
    clipper(params_for(gradient_sequence()[6]))
    with pytest.raises(ValueError, match="same parameters in the same order"):
        clipper(params_for(gradient_sequence()[6])[:2])


def test_misuse_is_caught_like_every_clipper():
    clipper = gradclip.AdaGC()
    with pytest.raises(RuntimeError, match="no parameters"):
        clipper([])
    with pytest.raises(RuntimeError, match="no parameter has a gradient"):
        clipper([torch.nn.Parameter(torch.zeros(2))])
    params = params_for(gradient_sequence()[6])
    clipper(params)
    with pytest.raises(RuntimeError, match="twice"):
        clipper(params)


def model_and_data(dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(dtype)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1), dtype=dtype)
    y = torch.randn(16, 2, generator=torch.Generator().manual_seed(2), dtype=dtype)
    return model, x, y


def loss_at(model, x, y, step):
    return torch.nn.functional.mse_loss(model(x), y) * (50.0 if step == 6 else 1.0)


@pytest.mark.parametrize("mode", ["step", "closure", "scaler-fused", "scaler-foreach"])
def test_attached_equals_calling_it_by_hand(mode):
    """Attached to Adam, stepping in each way, the run equals a by-hand run (AdaGC on the unscaled gradients)."""
    fused = mode == "scaler-fused"
    runs = []
    for attached in (True, False):
        model, x, y = model_and_data()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.05, fused=fused or None,
                                     foreach=False if mode == "scaler-foreach" else None)
        clipper = gradclip.AdaGC(warmup_steps=2, lambda_abs=0.5)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if mode.startswith("scaler") else None
        if attached:
            clipper.attach(optimizer)
        for step in range(10):
            optimizer.zero_grad()

            def closure():
                loss = loss_at(model, x, y, step)
                (scaler.scale(loss) if scaler else loss).backward()
                if not attached:
                    if scaler:
                        scaler.unscale_(optimizer)
                    clipper(list(model.parameters()))
                return loss

            if mode == "closure" and attached:
                optimizer.step(closure)
                continue
            closure()
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        runs.append(([p.detach().clone() for p in model.parameters()], clipper.gamma.clone()))
    (params_a, gamma_a), (params_b, gamma_b) = runs
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gamma_a, gamma_b, rtol=1e-5, atol=0)


def test_frozen_parameters_keep_their_place():
    model, x, y = model_and_data()
    model[0].weight.requires_grad_(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    clipper = gradclip.AdaGC(warmup_steps=1).attach(optimizer)
    for step in range(4):
        optimizer.zero_grad()
        loss_at(model, x, y, step).backward()
        optimizer.step()
    assert torch.isnan(clipper.gamma[0]) and torch.isfinite(clipper.gamma[1:]).all()


def test_torch_compile_fullgraph_does_not_recompile_per_step():
    import torch._dynamo.testing
    import torch.distributed.tensor  # noqa: F401  (gradclip looks DTensor up once; make that happen before tracing)

    gradclip._groups.dtensor_type()
    torch._dynamo.reset()
    sequence = [g for g in gradient_sequence(seed=11, steps=20)]
    dense = [[torch.randn(s, dtype=F64) if g is None else g for s, g in zip(SHAPES, grads)] for grads in sequence]
    for rule in ("adagc", "olmo"):
        eager = gradclip.AdaGC(warmup_steps=5) if rule == "adagc" else gradclip.AdaGC.olmo(1.5, beta=0.9)
        compiled_clipper = gradclip.AdaGC(warmup_steps=5) if rule == "adagc" else gradclip.AdaGC.olmo(1.5, beta=0.9)
        params = params_for(dense[0])
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        step = torch.compile(lambda ps: compiled_clipper(ps).scales, fullgraph=True, backend=counter)
        for index, grads in enumerate(dense):
            for p, g in zip(params, grads):  # gradients kept in place, as zero_grad(set_to_none=False) does
                p.grad.copy_(g)
            scales = step(params)
            if index == 1:
                after_two = counter.frame_count
            twins = params_for(grads)
            torch.testing.assert_close(scales, eager(twins).scales, rtol=1e-12, atol=0)
            for p, q in zip(params, twins):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=0)
        # the first call creates gamma (a second graph, with the state in place); then none per step
        assert counter.frame_count == after_two <= 2, f"{rule}: {counter.frame_count} graphs in 20 steps"
        torch.testing.assert_close(compiled_clipper.gamma, eager.gamma, rtol=1e-12, atol=0)


# --- FSDP2 / tensor parallel: each tensor's norm is its full-tensor norm, on 2 gloo ranks -----------

DT_SPECS = [((6, 3), torch.float32, "shard0"), ((1, 4), torch.float32, "shard0"), ((5,), torch.float32, "replicate"),
            ((4, 6), torch.float32, "shard1"), ((2, 5), F64, "shard0")]
DIST_STEPS, DIST_WARMUP, FSDP_STEPS = 7, 3, 4


def dist_grads(step):
    generator = torch.Generator().manual_seed(400 + step)
    scale = 20.0 if step == 6 else 1.0 / (1 + step)
    return [(torch.randn(shape, generator=generator, dtype=F64) * scale).to(dtype) for shape, dtype, _ in DT_SPECS]


def fsdp_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5), torch.nn.Tanh(),
                               torch.nn.Linear(5, 1))


def fsdp_batch(step):
    generator = torch.Generator().manual_seed(500 + step)
    x, y = torch.randn(12, 8, generator=generator), torch.randn(12, 1, generator=generator)
    return x, y * (30.0 if step == 3 else 1.0)


def scenario_adagc(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    placements = {"shard0": [Shard(0)], "shard1": [Shard(1)], "replicate": [Replicate()]}
    out = {"grads": [], "norms": []}
    clipper = gradclip.AdaGC(warmup_steps=DIST_WARMUP, lambda_abs=1.0)
    for step in range(DIST_STEPS):
        params = []
        for (shape, dtype, placement), grad in zip(DT_SPECS, dist_grads(step)):
            param = torch.nn.Parameter(distribute_tensor(torch.zeros(shape, dtype=dtype), mesh, placements[placement]))
            param.grad = distribute_tensor(grad.clone(), mesh, placements[placement])
            params.append(param)
        out["norms"].append(clipper(params).norms)
        out["grads"].append([p.grad.full_tensor() for p in params])
    out["gamma"] = clipper.gamma.clone()
    out["local_numels"] = [p.grad.to_local().numel() for p in params]
    # FSDP2: fully_shard, AdaGC attached to Adam; the parameters after each step
    model = fsdp_model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    attached = gradclip.AdaGC(warmup_steps=2, lambda_abs=0.5).attach(optimizer)
    for step in range(FSDP_STEPS):
        optimizer.zero_grad()
        x, y = fsdp_batch(step)
        torch.nn.functional.mse_loss(model(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()
        optimizer.step()
    out["fsdp_params"] = [p.full_tensor() for p in model.parameters()]
    out["fsdp_gamma"] = attached.gamma.clone()
    return out


def test_dtensor_and_fsdp2_use_full_tensor_norms_on_two_ranks(tmp_path):
    from test_distributed import run_ranks

    results = run_ranks(scenario_adagc, 2, tmp_path)
    assert results[1]["local_numels"][1] == 0  # (1, 4) sharded on dim 0: rank 1 holds nothing of it
    reference = gradclip.AdaGC(warmup_steps=DIST_WARMUP, lambda_abs=1.0)
    for step in range(DIST_STEPS):
        params = params_for_shapes(dist_grads(step))
        norms = reference(params).norms
        for result in results:
            torch.testing.assert_close(result["norms"][step], norms, rtol=1e-6, atol=0)
            for got, p in zip(result["grads"][step], params):
                torch.testing.assert_close(got, p.grad, rtol=1e-5, atol=1e-7)
    for result in results:
        torch.testing.assert_close(result["gamma"], reference.gamma, rtol=1e-6, atol=0)
    assert torch.equal(results[0]["gamma"], results[1]["gamma"])  # the same state on every rank
    # FSDP2 against one process on the full batch
    model = fsdp_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    single = gradclip.AdaGC(warmup_steps=2, lambda_abs=0.5).attach(optimizer)
    for step in range(FSDP_STEPS):
        optimizer.zero_grad()
        x, y = fsdp_batch(step)
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    for result in results:
        for got, want in zip(result["fsdp_params"], model.parameters()):
            torch.testing.assert_close(got, want.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(result["fsdp_gamma"], single.gamma, rtol=1e-4, atol=0)
    assert torch.equal(results[0]["fsdp_gamma"], results[1]["fsdp_gamma"])
