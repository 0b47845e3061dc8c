"""One optimisation step of SnD, without host syncs.

    data -> teacher(ctx views) -> targets (upsample + splat + blend + downsample) -> student fwd/bwd
         -> (pack + all-reduce) -> clip 0.5 -> NaN/inf guard -> fused Adam -> one-cycle lr -> EMA every 10 steps

The NaN/inf guard never leaves the device: `found_inf` = !(finite loss and finite grad norm) goes into
fused Adam, which skips the update (moments and step count untouched); the count of skipped steps is a
device tensor read at logging time. With several processes the step has exactly one collective: the
gradients and each rank's loss flag travel in one flat buffer (`pack`), so the fast path can replay
everything before it and everything after it as two CUDA graphs. `tick(name)` marks phase boundaries for `snd bench distill` (it syncs
there; training passes None).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from snd.pipeline.config import DistillConfig
from snd.train.data import select_views, to_device
from snd.train.distiller import Distiller, TargetFn
from snd.train.distributed import pack_grads, unpack_grads
from snd.train.schedule import make_optimizer, make_scheduler

__all__ = ["StepRunner", "EagerOnCompilerError", "amp_dtype"]

log = logging.getLogger(__name__)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: bf16 on CUDA for 'auto', none (fp32) on CPU for 'auto'."""
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.bfloat16
    if amp in ("auto", "fp32"):
        return None
    raise ValueError(f"amp must be 'auto', 'bf16' or 'fp32', got {amp!r}")


def _compiler_errors() -> tuple[type[BaseException], ...]:
    """The exception types torch.compile raises when its compiler (not the compiled code) fails."""
    errs: list[type[BaseException]] = []
    try:
        from torch._dynamo.exc import BackendCompilerFailed
        errs.append(BackendCompilerFailed)
    except ImportError:  # pragma: no cover - older torch
        pass
    try:
        from torch._inductor.exc import InductorError
        errs.append(InductorError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errs)


class EagerOnCompilerError:
    """Call `compiled`; if torch.compile's compiler fails (an error of the compiler, not of the function),
    log one warning and call `eager` from then on. The first compile runs before any compiled code, so a
    failure there repeats nothing; a failure in a later recompile, or after a graph break, re-runs the part
    already executed (random draws such as LoRA dropout are then taken again)."""

    def __init__(self, compiled: Callable, eager: Callable, name: str):
        self.compiled, self.eager, self.name, self.fell_back = compiled, eager, name, False

    def __call__(self, *args, **kwargs):
        if self.fell_back:
            return self.eager(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except _compiler_errors() as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            log.warning("torch.compile failed for the %s step (%s: %s); running it eagerly (same result, slower)",
                        self.name, type(e).__name__, first[:200])
            self.fell_back = True
            return self.eager(*args, **kwargs)


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
        if cfg.compile is True or cfg.compile == "on":
            self.compile()

    def compile(self) -> None:
        """torch.compile the teacher and student computations (default mode: fused Triton kernels).

        Why the fallback: a compiler crash (seen once: Triton's `make_ttgir` pass failing on one fused CE
        kernel at 16x24 patches on an H200) must not end a run that eager mode computes identically; the
        function then runs eagerly and says so once, at warning level."""
        self.teacher_fn = EagerOnCompilerError(torch.compile(self.d.teacher_features), self.d.teacher_features, "teacher")
        self.student_fn = EagerOnCompilerError(torch.compile(self.d.student_loss), self.d.student_loss, "student")
        self.compiled = True

    compiled = False

    def _autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        # no weight-cast cache: a CUDA graph capture must not keep casts that autocast frees on exit
        return torch.autocast(self.device.type, dtype=self.amp, cache_enabled=not self.capturing)

    capturing = False  # set by snd.train.graph while it captures

    # ---- the device-side pieces of a step (no host syncs; what snd.train.graph captures) -------------
    def teacher(self, batch: dict) -> Tensor:
        """Teacher patch features of the context views [B, 2, C, h, w]."""
        ctx = batch["ctx_images"]  # [B, 2, 3, H, W]
        B, V = ctx.shape[:2]
        with self._autocast():
            feats = self.teacher_fn(ctx.flatten(0, 1))  # [B*2, C, h, w]
        return feats.unflatten(0, (B, V))

    def targets(self, batch: dict, feats: Tensor) -> tuple[Tensor, Tensor]:
        """Context features -> loss targets [B, C, h, w] and valid [B, h, w] (operators or rendering)."""
        return self.d.build_targets(feats, batch, self.target_fn)

    def student(self, batch: dict, targets: Tensor, valid: Tensor) -> Tensor:
        """Student forward + backward; returns the detached loss (gradients are in the parameters)."""
        with self._autocast():
            loss = self.student_fn(batch["tgt_image"], targets, valid)
        loss.backward()
        return loss.detach()

    def pack(self, loss: Tensor) -> Tensor | None:
        """Multi-process: this rank's gradients and its loss-is-not-finite flag in one flat buffer (what
        `all_reduce` sums); None for a single process."""
        if self.world_size <= 1:
            return None
        return pack_grads(self.params, (~torch.isfinite(loss)).float())

    def all_reduce(self, flat: Tensor | None) -> None:
        """The step's one collective (eager, also in the fast path: it runs between two captured graphs)."""
        if flat is not None:
            dist.all_reduce(flat)

    def apply(self, loss: Tensor, flat: Tensor | None, *, force_skip: Tensor | None = None, zero_grad: bool = True) -> None:
        """Rank-averaged gradients (from `flat`), clip, NaN/inf guard, fused Adam (skips on device when any
        rank's loss or the averaged gradient norm is not finite, or `force_skip` is 1: parameters, moments
        and step counts stay untouched). Every rank takes the same decision from the same numbers."""
        if flat is not None:
            bad_loss = unpack_grads(flat, self.params, self.world_size)[0] > 0
        else:
            bad_loss = ~torch.isfinite(loss)
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip, foreach=True)
        bad = (bad_loss | ~torch.isfinite(gnorm)).float()
        self.skipped += bad
        if force_skip is not None:
            bad = torch.maximum(bad, force_skip)
        self.opt.found_inf.copy_(bad)
        self.opt.step()
        if zero_grad:
            self.opt.zero_grad(set_to_none=True)

    def optim(self, loss: Tensor, *, force_skip: Tensor | None = None, zero_grad: bool = True) -> None:
        """pack -> all-reduce -> apply (see each)."""
        flat = self.pack(loss)
        self.all_reduce(flat)
        self.apply(loss, flat, force_skip=force_skip, zero_grad=zero_grad)

    def after(self, step: int, ema: Callable[[], None] | None = None) -> None:
        """Host side of step `step`: advance the lr schedule, EMA-update the teacher every `ema_every`."""
        if step < self.sched.total_steps:
            self.sched.step()
        if self.d.ema_enabled and step % self.cfg.ema_every == 0:
            if ema is None:
                self.d.maybe_update_teacher(step)
            else:
                ema()
            self.ema_updates += 1

    def step(self, batch: dict, step: int, tick: Callable[[str], None] | None = None) -> Tensor:
        """Run optimizer step number `step` (1-based) on `batch` (a collated stream batch); returns the
        detached loss (a device scalar; NaN if the step was skipped)."""
        tick = tick or (lambda name: None)
        batch = select_views(to_device(batch, self.device), render_to_context=self.cfg.render_to_context)
        tick("data")
        feats = self.teacher(batch)
        tick("teacher")
        targets, valid = self.targets(batch, feats)  # [B, C, h, w], [B, h, w]
        tick("target")
        loss = self.student(batch, targets, valid)
        tick("student")
        flat = self.pack(loss)
        self.all_reduce(flat)
        tick("allreduce")
        self.apply(loss, flat)
        self.after(step)
        tick("optim")
        return loss

    @property
    def lr(self) -> float:
        return float(self.opt.param_groups[0]["lr"])
