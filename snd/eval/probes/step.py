"""One probe's training: its optimizer, its step, and the state that steps it (`ProbeJob`, `_Run`).

Why its own module: the paper's schedules are 307,200 / 320,000 steps of a linear head whose GPU work is
~1 ms, so this step is the hot path and is kept apart from where its batches come from
(`snd.eval.probes.sources`) and from how several probes are scheduled (`snd.eval.probes.train`). The step
reads nothing back to the host (masked-sum losses, the loss summed on the device and read every `log_every`
steps, fused capturable AdamW with a device-tensor lr and beta1) and on CUDA it is captured once and
replayed as a CUDA graph. Resume is exact: the learning rate is a pure function of the step
(`schedules.lr_factor`) and the checkpoint (`checkpoint.py`) holds the probe, the AdamW moments and the step.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from snd.eval.probes.base import Probe, ProbeSpec
from snd.eval.probes.checkpoint import load_checkpoint, save_checkpoint
from snd.eval.probes.data import TARGETS, ProbeData
from snd.eval.probes.rows import Residency
from snd.eval.probes.schedules import lr_factor
from snd.eval.protocol import onecycle_beta1

log = logging.getLogger(__name__)

__all__ = ["ProbeJob"]


def _optimizer(probe: Probe, spec: ProbeSpec, device: torch.device) -> torch.optim.AdamW:
    """AdamW of the recipe; on CUDA fused and capturable with a device-tensor lr (CUDA-graph safe)."""
    if device.type == "cuda":
        lr = torch.tensor(spec.lr, dtype=torch.float32, device=device)
        betas = spec.betas
        if spec.beta1_cycle:  # a device tensor too, so a replayed graph reads each step's beta1
            # torch's Adam takes both betas as floats or both as tensors
            betas = tuple(torch.tensor(b, dtype=torch.float32, device=device) for b in betas)
        return torch.optim.AdamW(probe.parameters(), lr=lr, betas=betas, weight_decay=spec.weight_decay,
                                 fused=True, capturable=True)
    return torch.optim.AdamW(probe.parameters(), lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        if isinstance(g["lr"], Tensor):
            g["lr"].fill_(lr)  # a kernel with a scalar argument: no host sync, read by the replayed graph
        else:
            g["lr"] = lr


def _set_beta1(opt: torch.optim.Optimizer, beta1: float) -> None:
    for g in opt.param_groups:
        b1, b2 = g["betas"]
        if isinstance(b1, Tensor):
            b1.fill_(beta1)
        else:
            g["betas"] = (beta1, b2)


class _Step:
    """The probe's optimizer step on one batch (tokens, target), with no host reads: run eagerly, or
    captured once and replayed as a CUDA graph."""

    def __init__(self, probe: Probe, opt, spec: ProbeSpec, grid, norm, device: torch.device):
        # the norm's weights live on the device (a graph cannot copy from pageable host memory); eps stays
        # a host scalar
        norm = {k: (v if k == "eps" else v.to(device)) for k, v in norm.items()}
        self.probe, self.opt, self.spec, self.grid, self.norm = probe, opt, spec, grid, norm
        self.key = TARGETS[probe.task][0]
        self.loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        self.params = [p for p in probe.parameters() if p.requires_grad]

    def __call__(self, tokens: Tensor, target: Tensor, step: int) -> None:
        with torch.no_grad():
            feats = self.probe.prepare(tokens.float(), self.grid, self.norm)
        tgt = target.long() if self.probe.task == "seg" else target.float()
        loss = self.probe.loss(feats, {self.key: tgt}, step=step)
        loss.backward()
        if self.spec.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.spec.grad_clip, foreach=True)
        self.opt.step()
        self.loss_sum.add_(loss.detach())


@dataclass
class ProbeJob:
    """One probe to train: its head, training rows, recipe and checkpoint (see `train_probes`).

    Args:
        probe: the head (moved to the training device).
        data: `ProbeData` of the training split.
        spec: the recipe (iters, batch, AdamW, schedule, clip).
        ckpt: checkpoint file (safetensors); written every `ckpt_every` steps and at the end.
        progress: called as progress(step, iters, mean loss) every `log_every` steps and at the end.
        residency: overrides `train_probes`' residency for this probe's rows (probes sharing rows follow
            the first of them).
        augment: overrides `train_probes`' `augment` for this (live) probe.
    """

    probe: Probe
    data: ProbeData
    spec: ProbeSpec
    ckpt: Path | None = None
    ckpt_every: int = 2000
    progress: Callable[[int, int, float], None] | None = None
    residency: Residency | None = None
    augment: bool | None = None  # live rows: `augment_batch` per step (None: `train_probes`' flag); False when
    # the dataset augments its own items (Probe3D's GeoNet set)


class _Run:
    """A job's training state: optimizer, step, and (CUDA) its own stream and captured graph."""

    def __init__(self, job: ProbeJob, device: torch.device, grid, norm, use_graph: bool):
        self.job = job
        job.probe.to(device).train()
        self.opt = _optimizer(job.probe, job.spec, device)
        self.start = 0
        if job.ckpt is not None and Path(job.ckpt).is_file():
            self.start = load_checkpoint(Path(job.ckpt), job.probe, self.opt)["step"]
            log.info("resumed %s probe at step %d/%d from %s", job.probe.task, self.start, job.spec.iters, job.ckpt)
        self.step, self.window, self.last_loss = self.start, 0, math.nan
        self.use_graph = use_graph
        # 3 warm-up steps (on this run's side stream) before the capture; depth's loss changes form first
        self.eager_until = max(self.start, job.probe.graph_from()) + 3 if use_graph else math.inf
        self.graph: torch.cuda.CUDAGraph | None = None
        self.buf: tuple[Tensor, Tensor] | None = None
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.fn = _Step(job.probe, self.opt, job.spec, grid, norm, device)
        self.where, self.wave, self.together, self.shared, self.seconds = "", 0, 1, 1, 0.0

    def ctx(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def finished(self, stop_after: int | None) -> bool:
        return self.step >= self.job.spec.iters or (stop_after is not None and self.step - self.start >= stop_after)

    def advance(self, tokens: Tensor, target: Tensor, *, log_every: int, stop_after: int | None) -> None:
        """One optimizer step on (tokens, target) (already on the device, on this run's stream)."""
        spec, step = self.job.spec, self.step
        _set_lr(self.opt, spec.lr * lr_factor(spec.schedule, step, spec.iters, warmup=spec.warmup,
                                              warmup_ratio=spec.warmup_ratio, min_ratio=spec.min_ratio))
        if spec.beta1_cycle:
            _set_beta1(self.opt, onecycle_beta1(step, spec.iters))
        if step < self.eager_until:
            self.opt.zero_grad(set_to_none=True)
            self.fn(tokens, target, step)
        elif self.graph is None:  # capture once, on static buffers, after the warm-up steps (capture runs nothing)
            self.buf = (tokens.clone(), target.clone())
            self.opt.zero_grad(set_to_none=True)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: the DataLoader's pin-memory thread keeps allocating pinned buffers while this
            # thread captures; in the default (global) mode those calls would abort the capture
            with torch.cuda.graph(self.graph, stream=self.stream, capture_error_mode="thread_local"):
                self.fn(self.buf[0], self.buf[1], step)
            self.graph.replay()
        else:
            if tokens is not self.buf[0]:  # type: ignore[index]  # resident rows gather straight into buf
                self.buf[0].copy_(tokens, non_blocking=True)  # type: ignore[index]
                self.buf[1].copy_(target, non_blocking=True)  # type: ignore[index]
            self.graph.replay()
        self.step += 1
        self.window += 1
        last = self.finished(stop_after)
        if self.step % log_every == 0 or last:
            self.last_loss = float(self.fn.loss_sum) / max(self.window, 1)  # read on this run's stream
            self.fn.loss_sum.zero_()
            self.window = 0
            if self.job.progress is not None:
                self.job.progress(self.step, spec.iters, self.last_loss)
        if self.job.ckpt is not None and (self.step % self.job.ckpt_every == 0 or last):
            save_checkpoint(Path(self.job.ckpt), self.job.probe, self.opt, self.step, spec)

    def result(self) -> dict:
        return {"steps": self.step, "start_step": self.start, "loss": self.last_loss, "seconds": self.seconds,
                "residency": self.where, "graph": self.graph is not None, "wave": self.wave,
                "trained_together": self.together, "rows_shared_by": self.shared}
