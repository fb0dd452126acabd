"""torch.distributed set-up for ``torchrun ... mednext train``: one process per GPU (or per CPU
worker with gloo), any number of nodes.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; the process group is created here before the
engine's trainer is built, so the trainer takes the engine's DDP path (per-rank batch share,
gathered validation metrics, rank 0 writes files). The GPU is chosen by LOCAL_RANK.
"""

from __future__ import annotations

import os

import torch
from torch import distributed as dist


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank_from_env() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed(device_type: str) -> bool:
    """Join the process group torchrun describes (nccl on CUDA, gloo otherwise). Returns whether this
    is a distributed run; a no-op when WORLD_SIZE is 1 or unset."""
    if world_size_from_env() <= 1:
        return False
    if dist.is_initialized():
        return True
    if device_type == "cuda":
        local = local_rank_from_env()
        if local >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) are visible on this node; "
                f"set torchrun --nproc_per_node to at most the number of GPUs"
            )
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def replica_max_abs_diff(module: torch.nn.Module) -> float:
    """Largest element-wise difference between this module's parameters on all ranks (0.0 means the
    replicas are identical); 0.0 without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0.0
    with torch.no_grad():
        flat = torch.cat([p.detach().float().reshape(-1) for p in module.parameters()])
        hi, lo = flat.clone(), flat.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        return float((hi - lo).abs().max())
