"""One training script, clipped by gradclip, on one process or on many with torchrun.

Each step prints the gradient norm before clipping. Every rank prints the same
norm, and it is the norm a single process gets on the full batch::

    python examples/distributed_clip.py --single                      # one process
    torchrun --nproc_per_node 2 examples/distributed_clip.py          # DDP, CPU, gloo
    torchrun --nproc_per_node 2 examples/distributed_clip.py --strategy fsdp   # FSDP2

With GPUs the same code uses NCCL, one GPU per process, on one node or many::

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d \\
        --rdzv_endpoint HOST:29500 examples/distributed_clip.py --strategy fsdp

The clipping line is the same in every mode: ``gradclip.clip_grad_norm_``
sees DDP's averaged gradients (identical on every rank) or FSDP2's sharded
DTensor gradients (reduced to the full norm) and needs no extra argument.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import gradclip

STEPS = 5
BATCH = 16
MAX_NORM = 0.5


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank and in --single
    return torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32),
                               torch.nn.Tanh(), torch.nn.Linear(32, 1))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, 10, generator=generator)
    return x, x.sum(dim=1, keepdim=True).sin() * 3.0


def train(model: torch.nn.Module, rank: int, world: int, device: torch.device, label: str) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    for step in range(STEPS):
        x, y = batch(step)
        x, y = x.chunk(world)[rank].to(device), y.chunk(world)[rank].to(device)
        loss = torch.nn.functional.mse_loss(model(x), y)  # mean over this rank's share
        loss.backward()
        norm = gradclip.clip_grad_norm_(model.parameters(), MAX_NORM)
        sys.stdout.write(f"step {step} rank {label} norm {norm.item():.9g}\n")  # one write: no interleaving
        sys.stdout.flush()
        optimizer.step()
        optimizer.zero_grad()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--single", action="store_true", help="one process on the full batch")
    parser.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
    args = parser.parse_args()
    if args.single:
        train(make_model(), 0, 1, torch.device("cpu"), "single")
        return

    if "RANK" not in os.environ:
        parser.error("start it with torchrun (see the top of this file), or pass --single")

    import torch.distributed as dist

    if torch.cuda.is_available():  # NCCL, one GPU per process
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    assert BATCH % world == 0, f"use a world size that divides {BATCH}"
    model = make_model().to(device)
    if args.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    try:
        train(model, rank, world, device, str(rank))
    finally:
        # DDP's reducer holds the process group: freed after the group, it can wait forever at exit (gloo)
        del model
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
