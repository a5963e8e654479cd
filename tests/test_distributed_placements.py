"""Every DTensor placement torch has, reduced right: 2 gloo ranks on a 1-D mesh, 4 on a 2-D ("dp", "tp") one.

``_StridedShard`` is what ``fully_shard`` gives a parameter that tensor
parallelism already sharded on the same dimension; its ``is_shard()`` is
False in torch 2.13, so it must be recognised by type. Each world size is
spawned once (the harness of ``test_distributed.py``); the ranks assert
against torch where torch is right, and return what they computed for the
parent to compare with single-process norms of the full tensors.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_distributed import close, reference_clip, run_ranks, same_on_every_rank

import gradclip

INF = math.inf
F32, F64 = torch.float32, torch.float64
NORM_TYPES = [1.0, 2.0, 3.0, INF]
MAX_NORM = 0.1

# The reported case: _StridedShard(0, split_factor=2) over 2 ranks holds rows (0, 2) and (1, 3).
REPORTED = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]

# 1-D mesh of 2 ranks: (shape, placement), built with distribute_tensor; uneven shapes on purpose.
SPECS_1D = [((4, 2), "strided0"), ((5, 3), "strided0"), ((3, 6), "strided1"), ((7,), "shard0"),
            ((2, 3), "replicate")]
PARTIAL_OPS = ["sum", "avg", "max", "min", "product"]
EMBEDDING_ROWS, EMBEDDING_DIM = 6, 3
LOOKUPS = [[0, 5, 2], [3, 3, 1]]

# 2-D mesh ("dp", "tp") of 2 x 2 ranks, by hand: (shape, placements).
SPECS_2D = [((6, 3), ("strided0", "shard0")), ((5, 4), ("strided0", "shard0")), ((4, 6), ("shard0", "shard1")),
            ((7,), ("shard0", "replicate")), ((3, 5), ("replicate", "shard1")), ((4, 4), ("sum", "shard0")),
            ((5,), ("max", "replicate")), ((2, 3), ("shard0", "avg"))]
MLP_DIM = 8
BATCH = 4
# The collective count's case: one gradient reduces over ("dp", "tp"), the other over "dp" only.
COLLECTIVE_SHAPES = [(6, 3), (7, 2)]
COLLECTIVE_PLACEMENTS = [("strided0", "shard0"), ("shard0", "replicate")]


def full_tensors(shapes, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=F64).to(F32) for shape in shapes]


def placement(name, mesh_size=2):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    if name.startswith("strided"):  # as fully_shard does on "dp" over Shard(d) on a "tp" of mesh_size
        return _StridedShard(int(name[-1]), split_factor=mesh_size)
    if name.startswith("shard"):
        return Shard(int(name[-1]))
    assert name == "replicate", name
    return Replicate()


def distribute_tensor(tensor, mesh, placements):
    """Each rank cuts its own piece (src_data_rank=None): torch's scatter wants even _StridedShard pieces."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(tensor, mesh, placements, src_data_rank=None)


def partial_local(full, op, index, size, seed):
    """This rank's operand of ``Partial(op)`` whose reduction over ``size`` ranks is ``full``."""
    generator = torch.Generator().manual_seed(seed)
    noise = [torch.randn(full.shape, generator=generator, dtype=F32).abs() + 0.1 for _ in range(size)]
    if op == "sum":
        weights = torch.arange(1, size + 1, dtype=F32) / (size * (size + 1) / 2)
        return full * weights[index]
    if op == "avg":
        return full + (noise[index] - torch.stack(noise).mean(0))
    if op == "max":
        return full if index == 0 else full - noise[index]
    if op == "min":
        return full if index == 0 else full + noise[index]
    assert op == "product" and size == 2
    return full * 0.5 if index == 0 else torch.full_like(full, 2.0)


def embedding_weight():
    return full_tensors([(EMBEDDING_ROWS, EMBEDDING_DIM)], seed=7)[0]


def errors_of(calls):
    out = {}
    for name, call in calls.items():
        try:
            call()
            out[name] = ""
        except ValueError as error:
            out[name] = str(error)
    return out


# --- what each rank runs ---------------------------------------------------------------------


def scenario_1d(rank, world):
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard

    assert world == 2
    mesh = init_device_mesh("cpu", (world,))
    out = {}

    # (a) the reported case
    full = torch.tensor(REPORTED)
    grad = distribute_tensor(full, mesh, [placement("strided0")])
    assert grad.to_local().tolist() == [REPORTED[rank], REPORTED[rank + 2]], grad.to_local()
    for p in NORM_TYPES:
        mine = gradclip.get_total_norm([grad], p)
        theirs = torch.nn.utils.get_total_norm([grad], p).full_tensor()
        torch.testing.assert_close(mine, theirs)  # torch is right here, through full_tensor
        out[f"reported/{p}"] = mine

    # Shard, _StridedShard on dims 0 and 1 (uneven), Replicate: norms and clipping
    fulls = full_tensors([shape for shape, _ in SPECS_1D], seed=1)
    for p in NORM_TYPES:
        grads = [distribute_tensor(f.clone(), mesh, [placement(name)]) for f, (_, name) in zip(fulls, SPECS_1D)]
        out[f"mixed/{p}"] = gradclip.get_total_norm(grads, p)
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for param, g in zip(params, grads):
            param.grad = g
        out[f"clip/{p}"] = gradclip.clip_grad_norm_(params, MAX_NORM, p)
        out[f"clipped/{p}"] = [q.grad.full_tensor() for q in params]
    params = [torch.nn.Parameter(torch.zeros_like(f)) for f in fulls]
    for param, f, (_, name) in zip(params, fulls, SPECS_1D):
        param.grad = distribute_tensor(f.clone(), mesh, [placement(name)])
    gradclip.clip_grad_value_(params, 0.3)  # entries of a strided shard: clamped locally
    out["value_clipped"] = [q.grad.full_tensor() for q in params]

    # per-tensor methods need each full tensor's norm: reduced over the mesh, one tensor at a time
    def sharded_params():
        made = [torch.nn.Parameter(torch.zeros_like(f)) for f in fulls]
        for param, f, (_, name) in zip(made, fulls, SPECS_1D):
            param.grad = distribute_tensor(f.clone(), mesh, [placement(name)])
        return made

    params = sharded_params()
    out["per_tensor_norms"] = gradclip.clip_grad_norm_per_tensor_(params, MAX_NORM)
    out["per_tensor_clipped"] = [q.grad.full_tensor() for q in params]
    params = sharded_params()
    out["block_rms"] = gradclip.clip_grad_block_rms_(params, 0.2)
    out["block_rms_clipped"] = [q.grad.full_tensor() for q in params]
    params = sharded_params()
    out["qsgd_scales"] = gradclip.qsgd_quantize_grad_(params, 3, torch.Generator().manual_seed(5))
    out["qsgd"] = [q.grad.full_tensor() for q in params]
    params = sharded_params()
    gradclip.sign_grad_(params)
    out["signs"] = [q.grad.full_tensor() for q in params]
    product_param = torch.nn.Parameter(DTensor.from_local(torch.zeros(3), mesh, [Partial("product")],
                                                          run_check=False))
    product_param.grad = DTensor.from_local(torch.full((3,), 2.0), mesh, [Partial("product")], run_check=False)

    # Partial with each reduce op it takes
    for op in PARTIAL_OPS:
        partial = DTensor.from_local(partial_local(fulls[1], op, rank, world, seed=3), mesh, [Partial(op)])
        torch.testing.assert_close(partial.full_tensor(), fulls[1], rtol=1e-5, atol=1e-6)
        for p in NORM_TYPES:
            out[f"partial/{op}/{p}"] = gradclip.get_total_norm([partial], p)

    # _MaskPartial: a row-wise sharded embedding's output, its mask left in place
    weight = distribute_tensor(embedding_weight(), mesh, [Shard(0)])
    lookups = distribute_tensor(torch.tensor(LOOKUPS), mesh, [Replicate()])
    embedded = F.embedding(lookups, weight)
    out["embedded_placement"] = type(embedded.placements[0]).__name__
    for p in NORM_TYPES:
        out[f"embedded/{p}"] = gradclip.get_total_norm([embedded], p)
    out["embedded_full"] = embedded.full_tensor()  # the mask survived the norms

    # placements gradclip must refuse, before any collective
    class Opaque(Placement):  # a placement gradclip does not know
        def __eq__(self, other):
            return type(other) is Opaque

        def __hash__(self):
            return hash("Opaque")

        def __repr__(self):
            return "Opaque()"

    def opaque_tensor(value):  # from_local cannot infer the shape of an unknown placement
        return DTensor.from_local(torch.full((2, 2), value), mesh, [Opaque()], run_check=False,
                                  shape=(4, 2), stride=(2, 1))

    opaque = opaque_tensor(1.0)
    norm_partial = torch.linalg.vector_norm(grad)  # a DTensor placed _NormPartial: local norms
    bitwise = DTensor.from_local(torch.ones(3), mesh, [Partial("bxor")], run_check=False)
    out["norm_partial_placement"] = repr(norm_partial.placements[0])
    opaque_param = torch.nn.Parameter(opaque_tensor(0.0))
    opaque_param.grad = opaque
    partial_param = torch.nn.Parameter(DTensor.from_local(torch.zeros(3), mesh, [Partial()], run_check=False))
    partial_param.grad = DTensor.from_local(torch.ones(3), mesh, [Partial()], run_check=False)
    out["errors"] = errors_of({
        "get": lambda: gradclip.get_total_norm([grad, opaque]),
        "clip": lambda: gradclip.clip_grad_norm_([opaque_param], 1.0),
        "value": lambda: gradclip.clip_grad_value_([opaque_param], 1.0),
        "norm_partial": lambda: gradclip.get_total_norm([norm_partial]),
        "bitwise": lambda: gradclip.get_total_norm([bitwise]),
        "value_partial": lambda: gradclip.clip_grad_value_([partial_param], 1.0),
        "sign_partial": lambda: gradclip.sign_grad_([partial_param]),
        "soft_value_partial": lambda: gradclip.soft_clip_grad_value_([partial_param], 1.0),
        "qsgd_partial": lambda: gradclip.qsgd_quantize_grad_([partial_param], 2),
        "scale_product": lambda: gradclip.clip_grad_norm_([product_param], 1e-3),
    })
    torch.testing.assert_close(opaque_param.grad.to_local(), torch.ones(2, 2))  # untouched
    out["after_errors"] = gradclip.get_total_norm([grad])  # the ranks are still in step
    return out


class MLP(torch.nn.Module):
    """torch's MLPStack block (common_fsdp.MLP): in_proj, relu, out_proj, relu."""

    def __init__(self, dim, multiplier):
        super().__init__()
        self.in_proj = torch.nn.Linear(dim, multiplier * dim)
        self.out_proj = torch.nn.Linear(multiplier * dim, dim)

    def forward(self, x):
        return torch.relu(self.out_proj(torch.relu(self.in_proj(x))))


def make_mlp_stack():
    """torch's MLPStack(dim, with_seq_parallel=True), smaller: the multiplier 3 makes uneven shards."""
    torch.manual_seed(0)
    return torch.nn.Sequential(MLP(MLP_DIM, 3), MLP(MLP_DIM, 2), MLP(MLP_DIM, 3),
                               torch.nn.LayerNorm(MLP_DIM, bias=False))


def mlp_batch():
    generator = torch.Generator().manual_seed(5)
    return torch.randn(BATCH, MLP_DIM, generator=generator), torch.randn(BATCH, MLP_DIM, generator=generator)


def mlp_loss(model, x, target):
    out = model(x)
    if hasattr(out, "device_mesh"):  # under tensor parallelism: a DTensor sharded on "tp"
        from torch.distributed.tensor import DTensor, Replicate

        target = DTensor.from_local(target, out.device_mesh, [Replicate()])
    return (out * target).sum()


def scenario_2d(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Partial, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    assert world == 4
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp, tp = mesh.get_local_rank("dp"), mesh.get_local_rank("tp")
    out = {}

    # (b) FSDP2 on "dp" over tensor parallelism on "tp", as torch's own test_clip_grad_norm_2d
    model = make_mlp_stack()
    parallelize_module(model, device_mesh=mesh["tp"], parallelize_plan={
        "0.in_proj": ColwiseParallel(use_local_output=False),
        "0.out_proj": RowwiseParallel(use_local_output=False),
        "1.in_proj": ColwiseParallel(use_local_output=False),
        "1.out_proj": RowwiseParallel(use_local_output=False),
        "2.in_proj": ColwiseParallel(use_local_output=False),
        "2.out_proj": RowwiseParallel(output_layouts=Shard(1)),
        "3": SequenceParallel(sequence_dim=1),
    })
    for module in model:
        if not isinstance(module, torch.nn.LayerNorm):
            fully_shard(module, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    x, target = mlp_batch()
    mlp_loss(model, x.chunk(2)[dp], target.chunk(2)[dp]).backward()
    params = list(model.parameters())
    out["placements"] = [repr(tuple(q.grad.placements)) for q in params]
    saved = [q.grad.clone() for q in params]
    out["full_grads"] = [g.full_tensor() for g in saved]
    for p in NORM_TYPES:
        for q, g in zip(params, saved):
            q.grad = g.clone()
        mine = gradclip.clip_grad_norm_(params, MAX_NORM, p)
        clipped = [q.grad.full_tensor() for q in params]
        for q, g in zip(params, saved):
            q.grad = g.clone()
        theirs = torch.nn.utils.clip_grad_norm_(params, MAX_NORM, p).full_tensor()
        torch.testing.assert_close(mine, theirs)
        for got, want in zip(clipped, (q.grad.full_tensor() for q in params)):
            torch.testing.assert_close(got, want)
        out[f"fsdp_tp/{p}"] = mine
        out[f"fsdp_tp_get/{p}"] = gradclip.get_total_norm(saved, p)
        out[f"fsdp_tp_clipped/{p}"] = clipped

    # the same placements and more, by hand (Partial on one dimension, sharded on the other)
    fulls = full_tensors([shape for shape, _ in SPECS_2D], seed=2)
    coords = (dp, tp)

    def build():
        grads = []
        for index, (f, (_, names)) in enumerate(zip(fulls, SPECS_2D)):
            ops = [name for name in names if name in PARTIAL_OPS]
            if not ops:
                grads.append(distribute_tensor(f.clone(), mesh, [placement(name) for name in names]))
                continue
            partial_dim = names.index(ops[0])
            laid = ["replicate" if dim == partial_dim else name for dim, name in enumerate(names)]
            local = distribute_tensor(f.clone(), mesh, [placement(name) for name in laid]).to_local()
            local = partial_local(local, ops[0], coords[partial_dim], 2, seed=10 + index)
            placements = [Partial(ops[0]) if dim == partial_dim else placement(name) for dim, name in enumerate(names)]
            grads.append(DTensor.from_local(local, mesh, placements, shape=f.shape, stride=f.stride()))
        return grads

    for got, want in zip(build(), fulls):
        torch.testing.assert_close(got.full_tensor(), want, rtol=1e-5, atol=1e-6)
    for p in NORM_TYPES:
        out[f"mesh2d/{p}"] = gradclip.get_total_norm(build(), p)
        params = [torch.nn.Parameter(torch.zeros_like(f)) for f in fulls]
        for param, g in zip(params, build()):
            param.grad = g
        out[f"mesh2d_clip/{p}"] = gradclip.clip_grad_norm_(params, MAX_NORM, p)
        out[f"mesh2d_clipped/{p}"] = [q.grad.full_tensor() for q in params]

    # the collectives of the reported case: the partial sums reduce over "dp" and "tp", one all-reduce each
    pair = [distribute_tensor(f.clone(), mesh, [placement(a), placement(b)])
            for f, (a, b) in zip(full_tensors(COLLECTIVE_SHAPES, seed=4), COLLECTIVE_PLACEMENTS)]
    for p in NORM_TYPES:
        out[f"collectives/{p}"], out[f"collectives_norm/{p}"] = all_reduces_of(lambda: gradclip.get_total_norm(pair, p))
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in pair]
        for param, g in zip(params, pair):
            param.grad = g.clone()
        out[f"collectives_clip/{p}"], _ = all_reduces_of(lambda: gradclip.clip_grad_norm_(params, MAX_NORM, p))
    out["mesh_groups"] = {"dp": tuple(torch.distributed.get_process_group_ranks(mesh.get_group("dp"))),
                          "tp": tuple(torch.distributed.get_process_group_ranks(mesh.get_group("tp")))}
    return out


def all_reduces_of(call):
    """(the ranks of the group of every ``dist.all_reduce`` that ``call`` makes, in order; its result)."""
    import torch.distributed as dist

    seen = []
    original = dist.all_reduce

    def counting(tensor, *args, group=None, **kwargs):
        seen.append(tuple(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)))
        return original(tensor, *args, group=group, **kwargs)

    dist.all_reduce = counting
    try:
        result = call()
    finally:
        dist.all_reduce = original
    return seen, result


# --- spawning, once per world size ----------------------------------------------------------


@pytest.fixture(scope="module")
def ranks_1d(tmp_path_factory):
    return run_ranks(scenario_1d, 2, tmp_path_factory.mktemp("placements1d"))


@pytest.fixture(scope="module")
def ranks_2d(tmp_path_factory):
    return run_ranks(scenario_2d, 4, tmp_path_factory.mktemp("placements2d"), timeout_s=150.0)


def vector_norm(tensors, p):
    return torch.linalg.vector_norm(torch.cat([t.to(F64).reshape(-1) for t in tensors]), p)


# --- tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("p", NORM_TYPES)
def test_strided_shard_reported_case_gives_the_full_norm(ranks_1d, p):
    expected = vector_norm([torch.tensor(REPORTED)], p)
    for out in ranks_1d:
        close(out[f"reported/{p}"], expected)
    same_on_every_rank([out[f"reported/{p}"] for out in ranks_1d])
    if p == 2.0:
        assert abs(float(ranks_1d[0]["reported/2.0"]) - 14.282857) < 1e-5


@pytest.mark.parametrize("p", NORM_TYPES)
def test_shard_strided_and_replicate_on_a_1d_mesh(ranks_1d, p):
    fulls = full_tensors([shape for shape, _ in SPECS_1D], seed=1)
    norm, clipped = reference_clip(fulls, p, MAX_NORM)
    assert float(norm) > MAX_NORM  # the clipping is not vacuous
    for out in ranks_1d:
        close(out[f"mixed/{p}"], vector_norm(fulls, p))
        close(out[f"clip/{p}"], norm)
        for got, want in zip(out[f"clipped/{p}"], clipped):
            torch.testing.assert_close(got, want)
        for got, want in zip(out["value_clipped"], fulls):
            torch.testing.assert_close(got, want.clamp(-0.3, 0.3))
    same_on_every_rank([out[f"clip/{p}"] for out in ranks_1d])


def test_partial_reduce_ops_and_mask_partial(ranks_1d):
    full = full_tensors([shape for shape, _ in SPECS_1D], seed=1)[1]
    weight = embedding_weight()
    embedded = torch.nn.functional.embedding(torch.tensor(LOOKUPS), weight)
    for out in ranks_1d:
        assert out["embedded_placement"] == "_MaskPartial"
        torch.testing.assert_close(out["embedded_full"], embedded)
        for p in NORM_TYPES:
            for op in PARTIAL_OPS:
                close(out[f"partial/{op}/{p}"], vector_norm([full], p), rtol=1e-5)
            close(out[f"embedded/{p}"], vector_norm([embedded], p))
    for p in NORM_TYPES:
        for key in [f"partial/{op}/{p}" for op in PARTIAL_OPS] + [f"embedded/{p}"]:
            same_on_every_rank([out[key] for out in ranks_1d])


def test_unknown_placements_raise_a_clear_error(ranks_1d):
    for out in ranks_1d:
        errors = out["errors"]
        for name in ("get", "clip", "value"):
            message = errors[name]
            assert "Opaque()" in message, (name, message)
            assert "cannot tell whether its local values are disjoint pieces" in message, message
            assert "Redistribute" in message and "Shard or Replicate" in message, message
        assert out["norm_partial_placement"].startswith("_NormPartial")
        assert "_NormPartial" in errors["norm_partial"] and "disjoint pieces" in errors["norm_partial"]
        assert "'bxor'" in errors["bitwise"] and "Shard or Replicate" in errors["bitwise"]
        assert "Partial" in errors["value_partial"]
        close(out["after_errors"], vector_norm([torch.tensor(REPORTED)], 2.0))


def test_fsdp2_over_tensor_parallel_equals_torch_and_the_full_gradients(ranks_2d):
    # the layout under test: _StridedShard on "dp" over Shard(0) on "tp" (ColwiseParallel + fully_shard)
    placements = ranks_2d[0]["placements"]
    assert any(text.startswith("(_StridedShard(dim=0") for text in placements), placements
    assert "(Shard(dim=0), Shard(dim=1))" in placements and "(Shard(dim=0), Replicate())" in placements
    # the full gradients are those of the unsharded model on the whole batch (averaged over "dp")
    model = make_mlp_stack()
    x, target = mlp_batch()
    (mlp_loss(model, x, target) / 2).backward()
    fulls = [q.grad for q in model.parameters()]
    for out in ranks_2d:
        for got, want in zip(out["full_grads"], fulls):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    for p in NORM_TYPES:
        norm, clipped = reference_clip(ranks_2d[0]["full_grads"], p, MAX_NORM)
        assert float(norm) > MAX_NORM
        for out in ranks_2d:
            close(out[f"fsdp_tp/{p}"], norm)
            close(out[f"fsdp_tp_get/{p}"], norm)
            close(out[f"fsdp_tp/{p}"], vector_norm(fulls, p), rtol=1e-4)
            for got, want in zip(out[f"fsdp_tp_clipped/{p}"], clipped):
                torch.testing.assert_close(got, want)
        same_on_every_rank([out[f"fsdp_tp/{p}"] for out in ranks_2d])


@pytest.mark.parametrize("p", NORM_TYPES)
def test_hand_built_placements_on_a_2d_mesh(ranks_2d, p):
    fulls = full_tensors([shape for shape, _ in SPECS_2D], seed=2)
    norm, clipped = reference_clip(fulls, p, MAX_NORM)
    for out in ranks_2d:
        close(out[f"mesh2d/{p}"], vector_norm(fulls, p), rtol=1e-5)
        close(out[f"mesh2d_clip/{p}"], norm, rtol=1e-5)
        for got, want in zip(out[f"mesh2d_clipped/{p}"], clipped):
            torch.testing.assert_close(got, want)
    same_on_every_rank([out[f"mesh2d/{p}"] for out in ranks_2d])


@pytest.mark.parametrize("p", NORM_TYPES)
def test_one_all_reduce_per_process_group(ranks_2d, p):
    # (_StridedShard, Shard) reduces over dp and tp, (Shard, Replicate) over dp: two process groups, two
    # collectives (torch makes two); one per placement would reduce over dp twice, three in all
    fulls = full_tensors(COLLECTIVE_SHAPES, seed=4)
    for out in ranks_2d:
        mine = {out["mesh_groups"]["dp"], out["mesh_groups"]["tp"]}
        for key in ("collectives", "collectives_clip"):
            calls = out[f"{key}/{p}"]
            assert len(calls) == 2 and set(calls) == mine, (key, calls, mine)
        close(out[f"collectives_norm/{p}"], vector_norm(fulls, p), rtol=1e-5)
    same_on_every_rank([out[f"collectives_norm/{p}"] for out in ranks_2d])


def test_per_tensor_methods_use_each_full_tensors_norm(ranks_1d):
    fulls = full_tensors([shape for shape, _ in SPECS_1D], seed=1)
    norms = torch.stack([vector_norm([f], 2.0) for f in fulls])
    rms = torch.stack([vector_norm([f], 2.0) / math.sqrt(f.numel()) for f in fulls])
    for out in ranks_1d:
        close(out["per_tensor_norms"], norms)
        for got, f, n in zip(out["per_tensor_clipped"], fulls, norms):
            torch.testing.assert_close(got, f * torch.clamp(MAX_NORM / (n + 1e-6), max=1.0).to(F32))
        close(out["block_rms"], rms)
        for got, f, r in zip(out["block_rms_clipped"], fulls, rms):
            torch.testing.assert_close(got, f / torch.clamp(r / 0.2, min=1.0).to(F32))
        close(out["qsgd_scales"], norms)  # every piece used the full tensor's norm as its scale
        for got, n in zip(out["qsgd"], norms):
            levels = got.to(F64) / (float(n) / 3)
            torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)  # on the grid k ||v|| / s
        for got, f in zip(out["signs"], fulls):
            torch.testing.assert_close(got, torch.sign(f))
    same_on_every_rank([out["per_tensor_norms"] for out in ranks_1d])


def test_elementwise_methods_refuse_summands(ranks_1d):
    for out in ranks_1d:
        errors = out["errors"]
        for name in ("sign_partial", "soft_value_partial", "qsgd_partial"):
            assert "Partial" in errors[name] and "summands" in errors[name], (name, errors[name])
        assert "product" in errors["scale_product"] and "Shard or Replicate" in errors["scale_product"]
