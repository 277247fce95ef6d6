"""Multi-GPU and multi-node training with torchrun and DistributedDataParallel.

``torchrun --nproc_per_node=N main.py ...`` starts N processes with RANK, LOCAL_RANK and WORLD_SIZE set;
the same command without torchrun is a single process (rank 0 of 1) and none of this does anything.
Rank 0 alone downloads, logs, samples, saves and scores FID; the other ranks train and wait at barriers.
NCCL carries the gradients between GPUs, gloo between CPU processes.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from runtime.errors import UserError


@dataclass(frozen=True)
class Context:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def from_environment() -> Context:
    """The process's place in a torchrun job (rank 0 of 1 without torchrun)."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UserError("WORLD_SIZE, RANK and LOCAL_RANK must be integers; start multi-process runs with "
                        "torchrun --nproc_per_node=N main.py ...") from None
    return Context(rank=rank, local_rank=local_rank, world_size=world_size)


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA, else Apple MPS, else the CPU; a named device that is not there is a UserError."""
    mps = getattr(torch.backends, "mps", None)
    mps_ok = mps is not None and mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_ok else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; pass --device auto or cpu")
    if name == "mps" and not mps_ok:
        raise UserError("--device mps was asked for but Apple's MPS backend is not available; pass --device auto or cpu")
    return torch.device(name)


def setup(ctx: Context, device_name: str) -> torch.device:
    """Join the process group (when there is more than one process) and return this rank's device."""
    device = pick_device(device_name)
    if not ctx.enabled:
        return device
    if device.type == "cuda":
        if ctx.local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {ctx.local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                            f"lower --nproc_per_node to the number of GPUs")
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    elif device.type == "mps":
        raise UserError("multi-process training is not supported on Apple MPS; run without torchrun")
    if not dist.is_initialized():
        # Rank 0 samples and scores FID alone while the others wait at a barrier; that can outlast the
        # default 10-minute collective timeout on a slow GPU, so allow an hour.
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=1))
    return device


def barrier(ctx: Context) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.barrier()


def any_rank(flags: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Element-wise OR of a small bool/int tensor over all ranks (the tensor itself without torchrun)."""
    if not (ctx.enabled and dist.is_initialized()):
        return flags
    as_int = flags.to(torch.int32)
    dist.all_reduce(as_int, op=dist.ReduceOp.MAX)
    return as_int.to(flags.dtype)


def parameters_agree(module: torch.nn.Module, ctx: Context) -> bool:
    """Whether every rank holds the same parameters (one float64 checksum per rank, gathered everywhere)."""
    if not (ctx.enabled and dist.is_initialized()):
        return True
    with torch.no_grad():
        checksum = torch.stack([p.detach().double().sum() for p in module.parameters()]).sum().reshape(1)
    gathered = [torch.zeros_like(checksum) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, checksum)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def cleanup(ctx: Context) -> None:
    """Leave the process group. The trainer's DistributedDataParallel sits in reference cycles (the training step's
    closures), so it is collected here first: its gloo work then ends while the group and the interpreter are
    alive, not during interpreter shutdown, where a gloo thread that outlives them aborts the process."""
    if ctx.enabled and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
