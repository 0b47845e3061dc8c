"""One optimisation step of SnD, without host syncs.

    data -> teacher(ctx views) -> targets (upsample + splat + blend + downsample) -> student fwd/bwd
         -> (all-reduce) -> clip 0.5 -> NaN/inf guard -> fused Adam -> one-cycle lr -> EMA every 10 steps

The NaN/inf guard never leaves the device: `found_inf` = !(finite loss and finite grad norm) goes into
fused Adam, which skips the update (moments and step count untouched); the count of skipped steps is a
device tensor read at logging time. `tick(name)` marks phase boundaries for `snd bench distill` (it syncs
there; training passes None).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from snd.pipeline.config import DistillConfig
from snd.train.data import select_views, to_device
from snd.train.distiller import Distiller, TargetFn
from snd.train.distributed import all_reduce_grads
from snd.train.schedule import make_optimizer, make_scheduler

__all__ = ["StepRunner", "amp_dtype"]


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: bf16 on CUDA for 'auto', none (fp32) on CPU for 'auto'."""
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.bfloat16
    if amp in ("auto", "fp32"):
        return None
    raise ValueError(f"amp must be 'auto', 'bf16' or 'fp32', got {amp!r}")


class StepRunner:
    """Owns the optimiser, schedule and (optionally compiled) step functions of one Distiller."""

    def __init__(self, distiller: Distiller, cfg: DistillConfig, *, device: torch.device, target_fn: TargetFn,
                 world_size: int = 1):
        self.d, self.cfg, self.device, self.target_fn, self.world_size = distiller, cfg, device, target_fn, world_size
        self.named = distiller.trainable()
        self.params = list(self.named.values())
        self.opt = make_optimizer(self.params, lr=cfg.lr)
        self.sched = make_scheduler(self.opt, lr=cfg.lr, iters=cfg.iters, warmup_pct=cfg.warmup_pct)
        self.amp = amp_dtype(cfg.amp, device)
        distiller.ce_dtype = self.amp
        self.skipped = torch.zeros((), dtype=torch.float32, device=device)
        self.ema_updates = 0
        self.teacher_fn: Callable[[Tensor], Tensor] = distiller.teacher_features
        self.student_fn: Callable[[Tensor, Tensor, Tensor], Tensor] = distiller.student_loss
        if cfg.compile:
            self.teacher_fn = torch.compile(self.teacher_fn)
            self.student_fn = torch.compile(self.student_fn)

    def _autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def step(self, batch: dict, step: int, tick: Callable[[str], None] | None = None) -> Tensor:
        """Run optimizer step number `step` (1-based) on `batch` (a collated stream batch); returns the
        detached loss (a device scalar; NaN if the step was skipped)."""
        tick = tick or (lambda name: None)
        cfg = self.cfg
        batch = select_views(to_device(batch, self.device), render_to_context=cfg.render_to_context)
        tick("data")
        ctx = batch["ctx_images"]  # [B, 2, 3, H, W]
        B, V = ctx.shape[:2]
        with self._autocast():
            feats = self.teacher_fn(ctx.flatten(0, 1))  # [B*2, C, h, w]
        feats = feats.unflatten(0, (B, V))
        tick("teacher")
        targets, valid = self.d.build_targets(feats, batch, self.target_fn)  # [B, C, h, w], [B, h, w]
        tick("target")
        with self._autocast():
            loss = self.student_fn(batch["tgt_image"], targets, valid)
        loss.backward()
        tick("student")
        all_reduce_grads(self.params, self.world_size)
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip, foreach=True)
        bad = (~(torch.isfinite(loss) & torch.isfinite(gnorm))).float()
        if self.world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self.opt.found_inf.copy_(bad)
        self.skipped += bad
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if step < self.sched.total_steps:
            self.sched.step()
        if self.d.maybe_update_teacher(step):
            self.ema_updates += 1
        tick("optim")
        return loss.detach()

    @property
    def lr(self) -> float:
        return float(self.opt.param_groups[0]["lr"])
