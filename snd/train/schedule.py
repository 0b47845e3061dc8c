"""Optimiser and learning-rate schedule of the distillation (official: Adam 2e-5, one-cycle cosine, 1 % warm-up).

Why fused Adam: one kernel for all parameters instead of several per tensor (the step is launch-bound on
GPU, see perf-notes), and it takes a `found_inf` tensor that skips the update on device, so the NaN/inf
guard needs no host sync. It is used on CPU too (same code path, deterministic).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["make_optimizer", "make_scheduler", "schedule_total_steps"]


def make_optimizer(params: list[nn.Parameter], *, lr: float) -> torch.optim.Adam:
    """Adam (betas 0.9/0.999, eps 1e-8, no weight decay), fused; `opt.found_inf` is a device tensor
    the training step sets to 1.0 to skip an update (NaN/inf loss or gradients)."""
    assert params, "no trainable parameters"
    opt = torch.optim.Adam(params, lr=lr, fused=True)
    opt.found_inf = torch.zeros((), dtype=torch.float32, device=params[0].device)  # read by fused Adam
    return opt


def schedule_total_steps(iters: int) -> int:
    """OneCycleLR length: the official code uses max_steps + 10 so the scheduler never steps past its end."""
    return iters + 10


def make_scheduler(opt: torch.optim.Optimizer, *, lr: float, iters: int, warmup_pct: float):
    """One-cycle cosine: warm-up over `warmup_pct` of the steps from lr/25 to lr, cosine down to lr/2.5e5
    (OneCycleLR defaults), momentum not cycled (as the official config)."""
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=schedule_total_steps(iters),
                                               pct_start=warmup_pct, anneal_strategy="cos", cycle_momentum=False)
