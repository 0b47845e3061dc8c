"""The one place a `--device` string becomes a torch.device.

Why one helper: precompute, MVSplat, distillation and evaluation all take `--device auto|cpu|cuda[:i]`;
they must agree on what 'auto' means and fail the same clear way when CUDA is asked for but absent.
"""
from __future__ import annotations

import os

import torch

from snd.errors import SndError

__all__ = ["resolve_device", "to_host_async", "fixed_workers", "cpu_cores"]


def resolve_device(device: "str | torch.device", *, local_rank: int | None = None) -> torch.device:
    """'auto' -> cuda if available else cpu; 'cuda' without an index -> cuda:`local_rank`, by default
    torchrun's LOCAL_RANK (so every worker of `torchrun -m snd.cli precompute|distill|eval` takes its own GPU
    instead of all landing on cuda:0); a CUDA device is made current. Bad strings / missing CUDA -> SndError."""
    if local_rank is None and "LOCAL_RANK" in os.environ:
        local_rank = int(os.environ["LOCAL_RANK"])
    name = str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise SndError(f"bad --device {name!r}: {e}", hint="use 'auto', 'cpu' or 'cuda[:i]'") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SndError(f"--device {name} asked for CUDA but none is available", hint="use --device cpu")
        if dev.index is None and local_rank is not None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())  # more workers than GPUs: share
        if dev.index is not None:
            torch.cuda.set_device(dev)
    return dev


def to_host_async(t: torch.Tensor) -> torch.Tensor:
    """A host copy of `t` that does not make the caller wait: on CUDA a pinned buffer filled by a
    non-blocking copy (valid once an event recorded after this call has fired); on the CPU `t` itself.
    Stage one and feature extraction use it to queue the next batch while results stream out."""
    if t.device.type != "cuda":
        return t
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)


def fixed_workers(value: "int | str") -> int | None:
    """`--num-workers`: an integer >= 0 as given, None for "auto" (each command resolves it its own way:
    `snd.train.data.resolve_num_workers`, `snd.stages.eval_plan.resolve_eval_workers`); else SndError."""
    v = str(value).strip()
    if v.lstrip("-").isdigit():
        n = int(v)
        if n < 0:
            raise SndError(f"--num-workers must be >= 0 or 'auto', got {value}")
        return n
    if v != "auto":
        raise SndError(f"--num-workers must be an integer or 'auto', got {value!r}")
    return None


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
