"""Data-parallel helpers for torchrun (NCCL on GPU, gloo on CPU).

Why all-reduce by hand instead of wrapping in DistributedDataParallel: only the LoRA adapters and the
head train (a few tens of MB of gradients), the student is called outside a single `forward`, and a plain
flat all-reduce after `backward` keeps the compiled student step free of DDP hooks and lets the fast path
capture everything around that one collective in CUDA graphs. The result is the same
update as DDP (gradients averaged over ranks, identical parameters everywhere).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["DistEnv", "broadcast_params", "dist_env", "init_distributed", "all_gather_objects",
           "pack_grads", "resolve_device", "unpack_grads"]


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_env() -> DistEnv:
    """Rank / world size / local rank from torchrun's environment (defaults: single process)."""
    return DistEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def resolve_device(name: str, env: DistEnv) -> torch.device:
    """The rank's device: `snd.pipeline.device.resolve_device` with torchrun's local rank."""
    from snd.pipeline.device import resolve_device as _resolve

    return _resolve(name, local_rank=env.local_rank)


def init_distributed(env: DistEnv, device: torch.device) -> bool:
    """Join the process group if world_size > 1 and none exists; returns True if this call created it."""
    if not env.distributed or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    kw = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size, **kw)
    return True


@torch.no_grad()
def pack_grads(params: list[Tensor], flags: Tensor) -> Tensor:
    """The gradients of `params` (those that have one) followed by `flags`, in one flat fp32 buffer:
    one all-reduce carries both (the flags tell every rank whether any rank's loss was not finite)."""
    grads = [p.grad.reshape(-1) for p in params if p.grad is not None]
    return torch.cat(grads + [flags.reshape(-1).to(grads[0].dtype if grads else torch.float32)])


@torch.no_grad()
def unpack_grads(flat: Tensor, params: list[Tensor], world_size: int) -> Tensor:
    """Write the rank average of an all-reduced `pack_grads` buffer back into the gradients; returns the
    flags' part (summed over ranks, divided by `world_size`)."""
    flat.div_(world_size)
    off = 0
    for p in params:
        if p.grad is None:
            continue
        n = p.grad.numel()
        p.grad.copy_(flat[off:off + n].view_as(p.grad))
        off += n
    return flat[off:]


@torch.no_grad()
def broadcast_params(tensors: list[Tensor], world_size: int) -> None:
    """Rank 0's values to every rank (start from identical parameters)."""
    if world_size <= 1:
        return
    for t in tensors:
        dist.broadcast(t, src=0)


def all_gather_objects(obj, world_size: int) -> list:
    if world_size <= 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out
