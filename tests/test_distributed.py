"""gradclip on torch.distributed: CPU, gloo, 2 and 3 ranks spawned by the tests themselves.

Each world size is spawned once (module fixture) and runs every scenario; the
tests compare what each rank returned with single-process gradclip on the full
gradients, computed here in the parent. Every collective has a timeout and
every spawn a deadline: a failing or stuck rank fails the test, never hangs it.
"""

from __future__ import annotations

import datetime
import functools
import inspect
import math
import multiprocessing as mp
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

import gradclip
import gradclip.distributed

INF = math.inf
F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16

# Manually sharded gradients: (shape, dtype) of every shard, and which rank holds it.
SHARD_SPECS = [((7, 3), F32), ((5,), F64), ((4, 4), BF16), ((2, 3, 2), F32), ((300,), F32),
               ((1,), F16), ((40,), F32), ((3, 3), BF16)]
REPLICATED_SPECS = [((6,), F32), ((2, 2), BF16), ((3,), F64)]
SPLITS = {  # name -> owner of each shard for a world size; the last rank of "empty" holds nothing
    2: {"uneven": [0, 0, 0, 1, 0, 0, 1, 0], "empty": [0] * 8},
    3: {"uneven": [0, 2, 0, 1, 0, 0, 2, 0], "empty": [0, 0, 1, 0, 1, 0, 0, 1]},
}
NORM_TYPES = [1.0, 2.0, 3.0, INF]
MAX_NORM = 0.5

# DTensor gradients: (shape, dtype, placement) on a 1-D CPU mesh. (1, 4) leaves ranks > 0 empty.
DT_SPECS = [((5, 3), F32, "shard0"), ((1, 4), F32, "shard0"), ((6,), F32, "replicate"),
            ((4, 6), F32, "shard1"), ((3,), BF16, "shard0"), ((2, 5), F64, "shard0")]

CLIP_STEPS = 8
SPIKE_STEP = 5
COLLECTIVE_TIMEOUT_S = 30


# --- data shared by the ranks and the single-process reference ----------------------------


def full_tensors(specs, seed, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(spec[0], generator=generator, dtype=F64) * scale).to(spec[1]) for spec in specs]


def params_with(grads):
    params = []
    for grad in grads:
        param = torch.nn.Parameter(torch.zeros_like(grad))
        param.grad = grad.clone()
        params.append(param)
    return params


def step_scale(step):
    return 50.0 if step == SPIKE_STEP else 1.0 + 0.1 * step


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5),
                               torch.nn.Tanh(), torch.nn.Linear(5, 1))


def batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(12, 8, generator=generator), torch.randn(12, 1, generator=generator)


def model_loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def make_clippers():
    from gradclip.autoclip import AutoClip
    from gradclip.guard import SpikeGuard
    from gradclip.zclip import ZClip

    return {
        "autoclip": lambda **kw: AutoClip(percentile=50.0, **kw),
        "zclip": lambda **kw: ZClip(warmup_steps=3, max_grad_norm=None, z_thresh=2.0, **kw),
        "guard": lambda **kw: SpikeGuard(threshold=2.0, window=8, min_history=3, **kw),
        # fed each step's loss averaged over the ranks (feed_mean_loss), as every rank must be for one decision
        "loss-guard": lambda **kw: SpikeGuard(threshold=2.0, window=8, min_history=3, signals=("loss", "norm"), **kw),
    }


LOSS_SPIKE_STEP = 6  # rank 0's loss spikes here, the gradients do not


def local_loss(step, rank):
    """Each rank's loss on its own shard of the batch: they differ, as under data parallelism."""
    return 2.0 + 0.1 * rank - 0.01 * step + (30.0 if step == LOSS_SPIKE_STEP and rank == 0 else 0.0)


def mean_loss(step, world):
    return math.fsum(local_loss(step, rank) for rank in range(world)) / world


def feed_mean_loss(clipper, step, rank=None, world=None, group_of_the_guard=False):
    """Give a guard that watches the loss this step's: on a rank, its local loss, which ``record_loss`` averages
    over the ranks (what OLMo-core's train module does before its SkipStepOptimizer) through the guard's own
    ``process_group`` (``group_of_the_guard``) or one passed to it; in one process, the mean itself."""
    if "loss" not in getattr(clipper, "signals", ()):
        return
    if rank is None:
        clipper.record_loss(mean_loss(step, world))
        return
    loss = torch.tensor(local_loss(step, rank), dtype=F64)
    if group_of_the_guard:
        clipper.record_loss(loss)
    else:
        clipper.record_loss(loss, process_group=True)


def plain_state(clipper):
    """A clipper's state_dict with tensors only, for comparison."""
    return {k: v for k, v in clipper.state_dict().items() if isinstance(v, torch.Tensor) or k == "steps"}


# --- what each rank runs ---------------------------------------------------------------------


def scenario_sharded(rank, world):
    out = {}
    full = full_tensors(SHARD_SPECS, seed=10, scale=0.3)
    rep = full_tensors(REPLICATED_SPECS, seed=11, scale=0.3)
    for split, owners in SPLITS[world].items():
        mine = [g for g, owner in zip(full, owners) if owner == rank]
        for p in NORM_TYPES:
            for foreach in (None, False):
                key = f"{split}/{p}/{foreach}"
                grads = [g.clone() for g in mine] + [g.clone() for g in rep]
                out[f"get/{key}"] = gradclip.get_total_norm(
                    grads, p, foreach=foreach, process_group=True, replicated=grads[len(mine):])
                local, shared = params_with(mine), params_with(rep)
                out[f"clip/{key}"] = gradclip.clip_grad_norm_(
                    local + shared, MAX_NORM, p, foreach=foreach, process_group=True, replicated=shared)
                out[f"grads/{key}"] = [q.grad for q in local + shared]
        # the ways to name a group, a flat GradBuffer, and non-finite gradients
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        for name, group in (("world", gradclip.distributed.WORLD), ("pg", dist.group.WORLD), ("mesh", mesh)):
            grads = [g.clone() for g in mine] + [g.clone() for g in rep]
            out[f"group/{split}/{name}"] = gradclip.get_total_norm(
                grads, 2.0, process_group=group, replicated=grads[len(mine):])
        local, shared = params_with(mine), params_with(rep)
        buffer = gradclip.GradBuffer(local + shared)
        for q, g in zip(local + shared, [*mine, *rep]):
            q.grad.copy_(g)
        assert buffer.views_intact()
        out[f"buffer/{split}"] = gradclip.clip_grad_norm_(
            local + shared, MAX_NORM, process_group=True, replicated=shared)
        out[f"buffer_grads/{split}"] = [q.grad.clone() for q in local + shared]
        for p in (2.0, INF):
            grads = [g.clone() for g in mine] + [g.clone() for g in rep]
            if rank == 0:
                grads[0].view(-1)[1] = math.nan
            out[f"nan/{split}/{p}"] = gradclip.get_total_norm(
                grads, p, process_group=True, replicated=grads[len(mine):])
    return out


def dtensor_params(mesh, specs, fulls, grads):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    placements = {"shard0": [Shard(0)], "shard1": [Shard(1)], "replicate": [Replicate()]}
    params = []
    for (_, _, placement), value, grad in zip(specs, fulls, grads):
        param = torch.nn.Parameter(distribute_tensor(value, mesh, placements[placement]))
        param.grad = distribute_tensor(grad.clone(), mesh, placements[placement])  # Replicate aliases it
        params.append(param)
    return params


def scenario_dtensor(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    full = full_tensors(DT_SPECS, seed=20, scale=0.4)
    zeros = [torch.zeros_like(g) for g in full]
    out["local_numels"] = [p.grad.to_local().numel() for p in dtensor_params(mesh, DT_SPECS, zeros, full)]
    plain = full_tensors([((4,), F32)], seed=21)[0]
    for p in NORM_TYPES:
        params = dtensor_params(mesh, DT_SPECS, zeros, full)
        out[f"get/{p}"] = gradclip.get_total_norm([q.grad for q in params], p)
        out[f"mixed/{p}"] = gradclip.get_total_norm([q.grad for q in params] + [plain], p)
        norm = gradclip.clip_grad_norm_(params, MAX_NORM, p)
        assert type(norm) is torch.Tensor, type(norm)
        out[f"clip/{p}"] = norm
        out[f"grads/{p}"] = [q.grad.full_tensor() for q in params]
    # torch's own norm is a DTensor; clip_grads_with_norm_ takes it
    params = dtensor_params(mesh, DT_SPECS, zeros, full)
    torch_norm = torch.nn.utils.get_total_norm([q.grad for q in params])
    out["torch_norm_is_dtensor"] = isinstance(torch_norm, DTensor)
    gradclip.clip_grads_with_norm_(params, MAX_NORM, torch_norm)
    out["with_norm_grads"] = [q.grad.full_tensor() for q in params]
    # value clipping acts on the local shards
    params = dtensor_params(mesh, DT_SPECS, zeros, full)
    gradclip.clip_grad_value_(params, 0.3)
    out["value_grads"] = [q.grad.full_tensor() for q in params]
    # a 2-D mesh, (world, 1): Replicate on the first dimension must not count the shards twice
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh2 = init_device_mesh("cpu", (world, 1), mesh_dim_names=("outer", "inner"))
    grads2 = [distribute_tensor(full[0].clone(), mesh2, [Replicate(), Shard(0)]),
              distribute_tensor(full[3].clone(), mesh2, [Shard(1), Replicate()]),
              distribute_tensor(full[5].clone(), mesh2, [Replicate(), Replicate()])]
    for p in (2.0, INF):
        out[f"mesh2d/{p}"] = gradclip.get_total_norm(grads2, p)
    # Partial gradients: each rank holds a summand
    weights = torch.arange(1, world + 1, dtype=F64) / (world * (world + 1) / 2)
    partial = [DTensor.from_local(g.to(F64) * weights[rank], mesh, [Partial()]) for g in full]
    out["partial"] = gradclip.get_total_norm(partial, 2.0)
    try:
        gradclip.clip_grad_value_(params_with_grads(partial, mesh), 0.1)
        out["partial_value_error"] = ""
    except ValueError as error:
        out["partial_value_error"] = str(error)
    return out


def params_with_grads(grads, mesh):
    from torch.distributed.tensor import DTensor

    params = []
    for grad in grads:
        param = torch.nn.Parameter(DTensor.from_local(torch.zeros_like(grad.to_local()), mesh, grad.placements))
        param.grad = grad
        params.append(param)
    return params


def scenario_ddp(rank, world):
    from torch.nn.parallel import DistributedDataParallel

    out = {}
    x, y = batch()
    for p in (2.0, INF):
        model = DistributedDataParallel(make_model())
        model_loss(model, x.chunk(world)[rank], y.chunk(world)[rank]).backward()
        out[f"norm/{p}"] = gradclip.clip_grad_norm_(model.parameters(), 0.1, p)
        out[f"grads/{p}"] = [q.grad.clone() for q in model.parameters()]
    return out


def scenario_fsdp(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    x, y = batch()
    for p in (2.0, INF):
        model = make_model()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model_loss(model, x.chunk(world)[rank], y.chunk(world)[rank]).backward()
        out[f"norm/{p}"] = gradclip.clip_grad_norm_(model.parameters(), 0.1, p)
        out[f"grads/{p}"] = [q.grad.full_tensor() for q in model.parameters()]
        out["local_numels"] = [q.grad.to_local().numel() for q in model.parameters()]
    # what does not support DTensors says so up front (GradBuffer used to break FSDP's backward pass)
    refusals = {"GradBuffer": lambda: gradclip.GradBuffer(model.parameters()),
                "adaptive_clip_grad_": lambda: gradclip.adaptive_clip_grad_(list(model.parameters()), 0.01),
                "GradientMonitor": lambda: gradclip.GradientMonitor(model).record(0)}
    for name, call in refusals.items():
        try:
            call()
            out[f"refused/{name}"] = "no error"
        except TypeError as error:
            out[f"refused/{name}"] = str(error)
    return out


def scenario_clippers(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    import gradclip.clippers

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    owners = SPLITS[world]["uneven"]
    for name, make in make_clippers().items():
        # DTensor gradients: nothing to pass
        clipper = make()
        norms = []
        for step in range(CLIP_STEPS):
            full = full_tensors(DT_SPECS, seed=100 + step, scale=step_scale(step))
            params = dtensor_params(mesh, DT_SPECS, [torch.zeros_like(g) for g in full], full)
            feed_mean_loss(clipper, step, rank, world)
            norms.append(clipper(params).norm)
        out[f"dtensor/{name}/state"] = plain_state(clipper)
        out[f"dtensor/{name}/norms"] = torch.stack(norms)
        # plain tensors sharded by hand, with replicated ones
        norms = []
        clipper = make(process_group=True)
        for step in range(CLIP_STEPS):
            full = full_tensors(SHARD_SPECS, seed=200 + step, scale=step_scale(step))
            rep = full_tensors(REPLICATED_SPECS, seed=300 + step, scale=step_scale(step))
            local = params_with([g for g, owner in zip(full, owners) if owner == rank])
            shared = params_with(rep)
            clipper.replicated = shared
            feed_mean_loss(clipper, step, rank, world, group_of_the_guard=True)
            norms.append(clipper(local + shared).norm)
        out[f"sharded/{name}/state"] = plain_state(clipper)
        out[f"sharded/{name}/norms"] = torch.stack([n.to(F64) for n in norms])
    return out


def scenario_all(rank, world):
    scenarios = (("sharded", scenario_sharded), ("dtensor", scenario_dtensor), ("ddp", scenario_ddp),
                 ("fsdp", scenario_fsdp), ("clippers", scenario_clippers))
    return {name: scenario(rank, world) for name, scenario in scenarios}


def scenario_fail(rank, world):
    """Rank 1 passes a bad argument to clipping; rank 0 enters the all-reduce and waits."""
    params = params_with(full_tensors([((3,), F32)], seed=1))
    gradclip.clip_grad_norm_(params, -1.0 if rank == 1 else 1.0, process_group=True)
    return {}


SCENARIOS = {"all": scenario_all, "fail": scenario_fail}


# --- spawning ------------------------------------------------------------------------------


class RankFailed(AssertionError):
    """A rank raised, or the ranks did not finish in time."""


def _entry(rank, world, port, scenario, outdir):
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        result = (SCENARIOS[scenario] if isinstance(scenario, str) else scenario)(rank, world)
        dist.barrier()
        tmp = Path(outdir) / f"rank{rank}.tmp"
        torch.save(result, tmp)
        os.replace(tmp, Path(outdir) / f"rank{rank}.pt")
        dist.destroy_process_group()
    except BaseException:
        (Path(outdir) / f"rank{rank}.err").write_text(traceback.format_exc())
        os._exit(1)  # no interpreter shutdown that could wait on gloo threads


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(scenario, world, outdir, timeout_s=120.0):
    """Run ``SCENARIOS[scenario]`` (or ``scenario``, a module-level function) on ``world`` spawned ranks.

    Returns their results, by rank.

    Fails fast: as soon as one rank exits with an error, the others are
    terminated and ``RankFailed`` carries the error; after ``timeout_s`` all are.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    context = mp.get_context("spawn")
    port = free_port()
    procs = [context.Process(target=_entry, args=(rank, world, port, scenario, str(outdir)), daemon=True)
             for rank in range(world)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout_s
    problem = None
    while problem is None:
        codes = [proc.exitcode for proc in procs]
        if all(code == 0 for code in codes):
            break
        if any(code not in (None, 0) for code in codes):
            problem = "rank(s) {} failed".format([r for r, c in enumerate(codes) if c not in (None, 0)])
        elif time.monotonic() > deadline:
            problem = f"ranks did not finish within {timeout_s:.0f} s"
        else:
            time.sleep(0.05)
    if problem is not None:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        errors = "\n".join(f"--- rank {r} ---\n{(outdir / f'rank{r}.err').read_text()}"
                           for r in range(world) if (outdir / f"rank{r}.err").exists())
        raise RankFailed(f"{problem}\n{errors}")
    return [torch.load(outdir / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def ranks(request, tmp_path_factory):
    world = request.param
    return world, run_ranks("all", world, tmp_path_factory.mktemp(f"dist{world}"))


# --- single-process references --------------------------------------------------------------


def reference_clip(grads, p, max_norm=MAX_NORM):
    params = params_with(grads)
    norm = gradclip.clip_grad_norm_(params, max_norm, p)
    return norm, [q.grad for q in params]


def close(actual, expected, rtol=1e-5):
    torch.testing.assert_close(actual.to(F64), expected.to(F64), rtol=rtol, atol=1e-7, equal_nan=True)


def same_on_every_rank(values):
    for value in values[1:]:
        torch.testing.assert_close(value.to(F64), values[0].to(F64), rtol=0, atol=0, equal_nan=True)


# --- tests ---------------------------------------------------------------------------------


def test_ddp_clipping_equals_one_process_on_the_full_batch(ranks):
    world, results = ranks
    x, y = batch()
    for p in (2.0, INF):
        model = make_model()
        model_loss(model, x, y).backward()
        expected = gradclip.clip_grad_norm_(model.parameters(), 0.1, p)
        for rank, result in enumerate(results):
            close(result["ddp"][f"norm/{p}"], expected)
            for got, param in zip(result["ddp"][f"grads/{p}"], model.parameters()):
                close(got, param.grad)
        same_on_every_rank([r["ddp"][f"norm/{p}"] for r in results])


def test_sharded_norm_and_clipped_grads_equal_one_process(ranks):
    world, results = ranks
    full = full_tensors(SHARD_SPECS, seed=10, scale=0.3)
    rep = full_tensors(REPLICATED_SPECS, seed=11, scale=0.3)
    for split, owners in SPLITS[world].items():
        for p in NORM_TYPES:
            norm, clipped = reference_clip(full + rep, p)
            assert norm.dtype == F64  # float64 shards are present: the single-process dtype
            for foreach in (None, False):
                key = f"{split}/{p}/{foreach}"
                for rank, result in enumerate(results):
                    out = result["sharded"]
                    close(out[f"get/{key}"], norm)
                    close(out[f"clip/{key}"], norm)
                    mine = [c for c, owner in zip(clipped, owners) if owner == rank] + clipped[len(full):]
                    assert len(out[f"grads/{key}"]) == len(mine)
                    for got, want in zip(out[f"grads/{key}"], mine):
                        assert got.dtype == want.dtype
                        torch.testing.assert_close(got, want)
                same_on_every_rank([r["sharded"][f"clip/{key}"] for r in results])


def test_sharded_groups_buffers_and_nonfinite(ranks):
    world, results = ranks
    full = full_tensors(SHARD_SPECS, seed=10, scale=0.3)
    rep = full_tensors(REPLICATED_SPECS, seed=11, scale=0.3)
    norm, clipped = reference_clip(full + rep, 2.0)
    for split, owners in SPLITS[world].items():
        for rank, result in enumerate(results):
            out = result["sharded"]
            for name in ("world", "pg", "mesh"):
                close(out[f"group/{split}/{name}"], norm)
            close(out[f"buffer/{split}"], norm)
            mine = [c for c, owner in zip(clipped, owners) if owner == rank] + clipped[len(full):]
            for got, want in zip(out[f"buffer_grads/{split}"], mine):
                torch.testing.assert_close(got, want)
            for p in (2.0, INF):  # rank 0 holds a NaN: every rank sees it, also through MAX
                assert out[f"nan/{split}/{p}"].isnan(), (split, p, rank)


def test_dtensor_gradients_give_the_full_norm(ranks):
    world, results = ranks
    full = full_tensors(DT_SPECS, seed=20, scale=0.4)
    plain = full_tensors([((4,), F32)], seed=21)[0]
    assert results[-1]["dtensor"]["local_numels"][1] == 0  # (1, 4) sharded: the last rank is empty
    for p in NORM_TYPES:
        norm, clipped = reference_clip(full, p)
        mixed = gradclip.get_total_norm(full + [plain], p)
        for result in results:
            out = result["dtensor"]
            close(out[f"get/{p}"], norm)
            close(out[f"clip/{p}"], norm)
            close(out[f"mixed/{p}"], mixed)
            assert out[f"clip/{p}"].dtype == norm.dtype
            for got, want in zip(out[f"grads/{p}"], clipped):
                torch.testing.assert_close(got, want)
        same_on_every_rank([r["dtensor"][f"clip/{p}"] for r in results])
    _, clipped = reference_clip(full, 2.0)
    for result in results:
        out = result["dtensor"]
        assert out["torch_norm_is_dtensor"]
        for got, want in zip(out["with_norm_grads"], clipped):  # torch's norm is less precise
            close(got, want, rtol=1e-3)
        close(out["partial"], gradclip.get_total_norm([g.to(F64) for g in full], 2.0), rtol=1e-10)
        for got, want in zip(out["value_grads"], full):
            torch.testing.assert_close(got, want.clamp(-0.3, 0.3))
        for p in (2.0, INF):
            close(out[f"mesh2d/{p}"], gradclip.get_total_norm([full[0], full[3], full[5]], p))
        assert "Partial" in out["partial_value_error"]


def test_fsdp2_fully_shard_on_cpu(ranks):
    world, results = ranks
    x, y = batch()
    assert 0 in results[-1]["fsdp"]["local_numels"]  # the last layer's shards leave a rank empty
    for p in (2.0, INF):
        model = make_model()
        model_loss(model, x, y).backward()
        expected = gradclip.clip_grad_norm_(model.parameters(), 0.1, p)
        for result in results:
            close(result["fsdp"][f"norm/{p}"], expected)
            for got, param in zip(result["fsdp"][f"grads/{p}"], model.parameters()):
                close(got, param.grad)
        same_on_every_rank([r["fsdp"][f"norm/{p}"] for r in results])
    for name in ("GradBuffer", "adaptive_clip_grad_", "GradientMonitor"):
        for result in results:
            assert f"{name} does not support DTensor" in result["fsdp"][f"refused/{name}"], result["fsdp"][f"refused/{name}"]


def test_adaptive_clippers_keep_identical_state(ranks):
    world, results = ranks
    owners = SPLITS[world]["uneven"]
    for name, make in make_clippers().items():
        for kind, specs, extra in (("dtensor", DT_SPECS, None), ("sharded", SHARD_SPECS, REPLICATED_SPECS)):
            reference = make()
            norms, scales = [], []
            for step in range(CLIP_STEPS):
                seed = (100 if kind == "dtensor" else 200) + step
                grads = full_tensors(specs, seed=seed, scale=step_scale(step))
                if extra is not None:
                    grads += full_tensors(extra, seed=300 + step, scale=step_scale(step))
                feed_mean_loss(reference, step, world=world)
                result = reference(params_with(grads))
                norms.append(result.norm)
                scales.append(float(result.scale))
            expected = plain_state(reference)
            states = [r["clippers"][f"{kind}/{name}/state"] for r in results]
            for state in states:
                assert state.keys() == expected.keys()
                assert state["steps"] == CLIP_STEPS
                for key, value in expected.items():
                    if isinstance(value, torch.Tensor):
                        close(state[key], value)
                for key in expected:  # bit-identical on every rank
                    if isinstance(expected[key], torch.Tensor):
                        same_on_every_rank([s[key] for s in states])
            for result in results:
                close(result["clippers"][f"{kind}/{name}/norms"], torch.stack(norms))
            if name == "loss-guard":  # the step of rank 0's loss spike (the gradients steady) was skipped, on every rank
                assert scales[LOSS_SPIKE_STEP] == 0.0 and scales[LOSS_SPIKE_STEP + 1] == 1.0, scales
    assert owners  # the sharded run used an uneven split


def test_a_failing_rank_fails_fast_with_its_error(tmp_path):
    start = time.monotonic()
    with pytest.raises(RankFailed, match="max_norm must be a number in") as info:
        run_ranks("fail", 2, tmp_path, timeout_s=60.0)
    assert "rank 1" in str(info.value)
    assert time.monotonic() - start < COLLECTIVE_TIMEOUT_S + 30


def test_process_group_without_init_raises():
    w = torch.nn.Parameter(torch.zeros(2))
    w.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match="not initialized"):
        gradclip.clip_grad_norm_([w], 1.0, process_group=True)
    with pytest.raises(RuntimeError, match="not initialized"):
        gradclip.get_total_norm([w.grad], process_group=gradclip.distributed.WORLD)


def test_single_process_path_ignores_replicated_without_a_group():
    w = torch.nn.Parameter(torch.zeros(2))
    w.grad = torch.tensor([3.0, 4.0])
    assert float(gradclip.clip_grad_norm_([w], 1.0, replicated=[w])) == 5.0
    torch.testing.assert_close(w.grad, torch.tensor([0.6, 0.8]))


# --- the example, under torchrun and alone --------------------------------------------------

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "distributed_clip.py"


def example_norms(*args, timeout_s=120):
    import re
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired as error:
        raise AssertionError(f"{args} did not finish in {timeout_s} s:\n{error.stdout}\n{error.stderr}") from None
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    norms = {}
    for step, rank, norm in re.findall(r"^step (\d+) rank (\w+) norm (\S+)$", done.stdout, re.MULTILINE):
        norms.setdefault(rank, {})[int(step)] = float(norm)
    return norms


@functools.lru_cache(maxsize=None)
def single_process_norms():
    return example_norms(sys.executable, str(EXAMPLE), "--single")["single"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_example_under_torchrun_prints_the_single_process_norms(strategy):
    single = single_process_norms()
    torchrun = Path(sys.executable).with_name("torchrun")
    ranks = example_norms(str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                          "--master_port", str(free_port()), str(EXAMPLE), "--strategy", strategy)
    assert sorted(ranks) == ["0", "1"] and len(single) == 5
    for rank, norms in ranks.items():
        assert norms.keys() == single.keys(), rank
        for step, norm in norms.items():
            assert norm == pytest.approx(single[step], rel=1e-5), (rank, step)
    assert ranks["0"] == ranks["1"]  # bit-identical on the two ranks


def test_distributed_docstring_examples_run():
    import doctest

    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in doctest.DocTestFinder().find(gradclip.distributed) if t.examples]
    assert tests
    for test in tests:
        runner.run(test)
    assert runner.failures == 0


def test_replicated_without_a_group_warns_in_a_multi_rank_run(monkeypatch):
    # a sign of a forgotten process_group: each rank would get the norm of its own tensors only
    import warnings

    import gradclip.norms

    w = torch.nn.Parameter(torch.zeros(2))
    w.grad = torch.tensor([3.0, 4.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one process: nothing to warn about
        gradclip.get_total_norm([w.grad], replicated=[w.grad])
    monkeypatch.setattr(gradclip.norms, "_in_multi_rank_run", lambda: True)
    with pytest.warns(UserWarning, match="without `process_group`") as record:
        gradclip.get_total_norm([w.grad], replicated=[w.grad])
    assert record[0].filename == __file__
    with pytest.warns(UserWarning, match="without `process_group`"):
        gradclip.ZClip(replicated=[w])([w])
