r"""Chapter 5.2's distributed demo: clipping under DDP and FSDP2 equals one process on the full batch.

Run on two CPU processes (gloo) with torchrun, and it writes what every rank
measured to one JSON file::

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m gradclip_book.dist_demo --out dist.json

(or ``torchrun ... src/gradclip_book/dist_demo.py --out dist.json``). From Python,
:func:`launch` starts that command as a subprocess with a timeout and returns the
parsed results; the book's page and ``tests/book/test_scalability.py`` both call it.

What each rank does, on scikit-learn's digits (every rank takes its half of each
minibatch of :data:`BATCH` images):

* ``"single"``: one plain process on the full batches, the reference (each rank
  computes it on its own, without any collective);
* ``"ddp"``: ``DistributedDataParallel``, then ``gradclip.clip_grad_norm_`` after
  ``backward()`` (DDP has already averaged the gradients);
* ``"fsdp"``: ``fully_shard`` on every ``Linear`` and on the model (FSDP2:
  each rank holds half of every parameter and of its gradient, as DTensors),
  the same ``gradclip.clip_grad_norm_`` call;
* ``"naive"``: on a fresh FSDP2 model, the first gradient clipped with the norm
  of the rank's *local shards* only (what a loop over ``p.grad.to_local()``
  computes), compared with the correct global clipping: local norms, the norm
  and direction of the resulting update.

Every step's pre-clip norm and the final parameters are gathered on rank 0 and
written with ``json``. With GPUs the same script runs on NCCL, one GPU per process
(``torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 ...``);
only the gloo path is exercised here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gradclip

__all__ = ["BATCH", "LR", "MAX_NORM", "STEPS", "launch", "main"]

STEPS = 6
"""Optimizer steps of each run."""
BATCH = 64
"""Images per step, all ranks together (each of 2 ranks takes 32)."""
LR = 0.5
"""SGD learning rate (no momentum, so one step is exactly ``-LR`` times the clipped gradient)."""
MAX_NORM = 0.1
"""The clipping threshold: below every step's gradient norm, so every step clips."""


def make_model() -> nn.Sequential:
    """A ReLU MLP 64-32-32-10 with the same weights on every rank (seed 0); every size splits evenly in 2."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The :data:`STEPS` minibatches of :data:`BATCH` training digits, in a seeded order (the same on every rank)."""
    from gradclip_book.data import digits_split

    x, y = digits_split(seed=0)["train"]
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return [(x[order[s * BATCH:(s + 1) * BATCH]], y[order[s * BATCH:(s + 1) * BATCH]]) for s in range(STEPS)]


def full_params(model: nn.Module) -> list[list[float]]:
    """Every parameter as a flat list of floats; a sharded (DTensor) one is gathered first (a collective)."""
    out = []
    for p in model.parameters():
        value = p.detach()
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        out.append(value.reshape(-1).tolist())
    return out


def train(model: nn.Module, rank: int, world: int) -> dict[str, Any]:
    """SGD with gradclip's global-norm clipping on this rank's share of every batch; the norms and final weights."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    norms = []
    for x, y in batches():
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()  # mean over this rank's share
        norm = gradclip.clip_grad_norm_(model.parameters(), MAX_NORM)  # the same call in every mode
        norms.append(float(norm))
        optimizer.step()
    return {"norms": norms, "params": full_params(model)}


def shard(model: nn.Module, world: int) -> nn.Module:
    """FSDP2: every ``Linear`` and the root sharded over a 1-D CPU mesh of ``world`` ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def naive_local_norm(rank: int, world: int) -> dict[str, Any]:
    """The first FSDP2 gradient, clipped correctly and with this rank's local norm: what each gives.

    Returns the global norm, this rank's local norm, and the norms of the two
    clipped gradients (the full tensors, gathered), the relative difference
    between them and their cosine.
    """
    from torch.distributed.tensor import DTensor

    model = shard(make_model(), world)
    x, y = batches()[0]
    nn.functional.cross_entropy(model(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()
    grads = [p.grad for p in model.parameters()]
    local = [g.to_local() for g in grads]
    local_norm = gradclip.get_total_norm(local)  # plain tensors: this rank's shards only (the mistake)
    naive_coef = min(1.0, MAX_NORM / (float(local_norm) + 1e-6))
    naive = [DTensor.from_local(t * naive_coef, g.device_mesh, g.placements).full_tensor() for t, g in zip(local, grads)]
    global_norm = gradclip.clip_grad_norm_(model.parameters(), MAX_NORM)  # DTensors: reduced over the mesh
    right = [p.grad.full_tensor() for p in model.parameters()]
    flat_naive, flat_right = torch.cat([t.reshape(-1) for t in naive]), torch.cat([t.reshape(-1) for t in right])
    return {
        "global_norm": float(global_norm),
        "local_norm": float(local_norm),
        "naive_clipped_norm": float(flat_naive.norm()),
        "right_clipped_norm": float(flat_right.norm()),
        "relative_difference": float((flat_naive - flat_right).norm() / flat_right.norm()),
        "cosine": float(torch.nn.functional.cosine_similarity(flat_naive, flat_right, dim=0)),
        "update_naive": LR * float(flat_naive.norm()),  # SGD without momentum: the step is LR x the gradient
        "update_right": LR * float(flat_right.norm()),
    }


def run_rank(out: Path | None) -> dict[str, Any] | None:
    """Everything one rank does; rank 0 gathers the ranks' results and writes them to ``out``."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    start = time.perf_counter()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        mine = {
            "single": train(make_model(), 0, 1),  # no collective: the one-process reference
            "ddp": train(DistributedDataParallel(make_model()), rank, world),
            "fsdp": train(shard(make_model(), world), rank, world),
            "naive": naive_local_norm(rank, world),
        }
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, mine)
        # every rank finishes its last collective before any tears gloo down: a rank that destroyed the
        # group while its peer was still in all_gather_object once made the peer abort at exit (1 run in ~25)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank != 0:
        return None
    result = {
        "world": world, "backend": "gloo", "steps": STEPS, "batch": BATCH, "lr": LR, "max_norm": MAX_NORM,
        "torch": torch.__version__,
        "single": gathered[0]["single"],
        "ranks": [{k: v for k, v in g.items() if k != "single"} for g in gathered],
        "seconds": time.perf_counter() - start,
    }
    if out is not None:
        Path(out).write_text(json.dumps(result), encoding="utf-8")
    return result


def launch(out: str | Path, nproc: int = 2, timeout: float = 120.0, reuse: bool = True) -> dict[str, Any]:
    """Run the demo under ``torch.distributed.run`` (``nproc`` CPU processes, gloo) and return its JSON.

    The subprocess is bounded by ``timeout`` seconds (``subprocess.TimeoutExpired``
    past it). ``OMP_NUM_THREADS=1`` keeps the ranks from competing for cores. With
    ``reuse`` (the default), a result of the same code launched earlier in the same
    test session or book build is read back instead (:mod:`gradclip_book.session_cache`;
    readers' notebooks always launch), and ``out`` is not written.

    Raises:
        RuntimeError: the launch failed; the message holds the end of its output.
    """
    from gradclip_book import session_cache

    out = Path(out)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "gradclip_book.dist_demo", "--out", str(out)]

    def run() -> dict[str, Any]:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
        result = json.loads(out.read_text(encoding="utf-8"))
        result["wall_seconds"] = time.perf_counter() - start
        result["command"] = " ".join(["python"] + command[1:])
        return result

    if not reuse:
        return run()
    return session_cache.cached_json("dist_demo", {"nproc": nproc},
                                     session_cache.package_files("gradclip", "gradclip_book"), run)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="where rank 0 writes the JSON results")
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:
        parser.error("start it with torchrun / python -m torch.distributed.run (see the module docstring)")
    result = run_rank(args.out)
    if result is not None:
        norms = [r["fsdp"]["norms"][0] for r in result["ranks"]]
        print(f"step 0 norm: single {result['single']['norms'][0]:.6f}, fsdp ranks {norms}; "
              f"{result['seconds']:.1f} s")


if __name__ == "__main__":
    main()
