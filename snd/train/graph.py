"""The fast path: the whole distillation step replayed as CUDA graphs.

Why: at batch 1 the step is launch-bound (perf-notes: the GPU is busy ~5 ms of a 26 ms ViT-S
forward/backward; the rest is the CPU issuing ~1,000 kernels). A captured graph issues them all at once.
What makes the step capturable:

* static shapes and no host syncs: targets come from the stored per-pair operators
  (`snd.splat.operator`), not from a render whose Gaussian count varies; the NaN/inf guard, the skipped
  counter and the loss stay on the device (`StepRunner.optim`);
* static inputs: each batch is copied (device to device, after `DevicePrefetcher` moved it on a side
  stream from pinned memory) into buffers allocated once;
* the optimizer: fused Adam with ``capturable=True`` reads its lr from a device tensor filled on the host
  before each replay (the schedule, the checkpoints and the logs keep a float lr);
* the teacher: the EMA update (foreach lerp over all parameter pairs) and the re-merge of its LoRA into the
  plain teacher ViT (in place, `merge_lora_into`) are a second graph, replayed every `ema_every` steps;
* autocast without its weight-cast cache (`StepRunner.capturing`), as graph capture requires;
* several processes: the step's one collective (the all-reduce of the packed gradients and loss flags,
  `StepRunner.pack`) runs eagerly between two graphs — teacher, targets, student forward/backward and the
  packing before it; unpacking, clipping, the guard and Adam after it. NCCL orders it on the stream, so
  the host still never waits.

Warm-up before capture (CUDA graphs need the lazily created state — cuBLAS workspaces, Adam moments,
gradient buffers — to exist) runs the step with ``force_skip = 1``, so fused Adam leaves parameters,
moments and step counts untouched, and the CUDA RNG state is restored afterwards: the first captured step
is the same step an eager run would take, and a resumed run replays the same sequence.

Logging reads the loss every `log_every` steps (`loop._flush`), never inside the step.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch
from torch import Tensor

from snd.train.data import to_device
from snd.train.step import StepRunner

log = logging.getLogger(__name__)

__all__ = ["GraphStep", "graph_supported"]

WARMUP = 3  # eager warm-up iterations before capture (PyTorch's whole-network capture recipe uses 3)
# Capture refuses unsafe CUDA calls from this thread only: the DataLoader's pin-memory thread (cudaHostAlloc)
# and NCCL's watchdog (event queries) run on while the step is captured, and "global" mode let them
# invalidate the capture (seen on 2 H200s streaming a store: cudaErrorStreamCaptureInvalidated).
CAPTURE_MODE = "thread_local"


def graph_supported(runner: StepRunner, batch: dict) -> tuple[bool, str]:
    """Whether the fast path can run `runner` on this batch; (False, why) otherwise."""
    if "op_cols" not in batch or runner.cfg.targets == "render":
        return False, "targets are rendered (the store has no operators matching this run, or --targets render)"
    if runner.cfg.render_to_context:
        return False, "--render-to-context renders its targets"
    return True, ""


class GraphStep:
    """Drop-in for `StepRunner.step` that captures the device side once and replays it.

    Args:
        runner: the StepRunner whose optimizer, schedule and networks are used.
        phases: capture three graphs (targets | student fwd+bwd | optimizer) instead of one, so a
            benchmark can time each phase with syncs in between; training uses one graph.
    """

    def __init__(self, runner: StepRunner, *, phases: bool = False, capture: bool | None = None):
        self.r = runner
        self.phases = phases
        self.capture = runner.device.type == "cuda" if capture is None else capture
        self.ready = False
        dev = runner.device
        self.lr_t = torch.zeros((), dtype=torch.float32, device=dev)
        self.force_skip = torch.zeros((), dtype=torch.float32, device=dev)
        self.buf: dict[str, Tensor] | None = None
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.ema_graph: torch.cuda.CUDAGraph | None = None
        self.loss_out: Tensor | None = None
        self._keys: tuple[str, ...] = ()

    # ---- capture -------------------------------------------------------------------------------------
    def _alloc(self, batch: dict) -> None:
        self._keys = tuple(k for k, v in batch.items() if isinstance(v, Tensor) and (k in ("ctx_images", "tgt_image") or k.startswith("op_")))
        self.buf = {k: torch.empty_like(batch[k], device=self.r.device) for k in self._keys}
        self._load(batch)

    def _load(self, batch: dict) -> None:
        assert self.buf is not None
        for k in self._keys:
            src = batch[k]
            if src.shape != self.buf[k].shape:
                raise ValueError(f"fast path: batch {k} has shape {tuple(src.shape)}, captured {tuple(self.buf[k].shape)}"
                                 " (static shapes: one store, one batch size)")
            self.buf[k].copy_(src, non_blocking=True)

    def _segments(self) -> list[Callable[[], None]]:
        r, state = self.r, {}

        def teacher() -> None:
            state["feats"] = r.teacher(self.buf)

        def targets() -> None:
            state["targets"], state["valid"] = r.targets(self.buf, state["feats"])

        def student() -> None:
            state["loss"] = r.student(self.buf, state["targets"], state["valid"])
            state["flat"] = r.pack(state["loss"])  # None for one process

        def optim() -> None:
            r.apply(state["loss"], state["flat"], force_skip=self.force_skip, zero_grad=False)
            self.loss_out.copy_(state["loss"])

        self._state = state  # intermediates stay alive between the phase graphs
        return [teacher, targets, student, optim]

    def _reduce(self) -> None:
        """The eager collective between the student and optimizer segments (a no-op for one process)."""
        self.r.all_reduce(self._state.get("flat"))

    def _capture(self, batch: dict) -> None:
        r, dev = self.r, self.r.device
        cuda = self.capture
        if cuda and r.cfg.compile == "auto" and not r.compiled:
            r.compile()  # fused kernels inside the graph: ~2x fewer GPU milliseconds per step
        self._alloc(batch)
        self.loss_out = torch.zeros((), dtype=torch.float32, device=dev)
        for g in r.opt.param_groups:
            g["capturable"] = True
        rng = torch.cuda.get_rng_state(dev) if cuda else torch.get_rng_state()
        skipped = r.skipped.clone()
        self._segs = self._segments()
        float_lr = [g["lr"] for g in r.opt.param_groups]
        for g in r.opt.param_groups:
            g["lr"] = self.lr_t  # the captured kernels read the lr from this tensor
        self.lr_t.fill_(float(float_lr[0]))
        self.force_skip.fill_(1.0)
        r.capturing = cuda
        try:
            side = torch.cuda.Stream(dev) if cuda else None
            if cuda:
                side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
                for _ in range(WARMUP):
                    self._run_eager()
                    r.opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.current_stream(dev).wait_stream(side)
                torch.cuda.synchronize(dev)
                pool = None
                # one graph (two around the collective with several processes); one per phase for benchmarks
                split = r.world_size > 1
                parts = ([[s_] for s_ in self._segs] if self.phases else
                         [self._segs[:3], self._segs[3:]] if split else [self._segs])
                self._reduce_before = len(parts) - 1 if split else None
                for part in parts:
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=pool, capture_error_mode=CAPTURE_MODE):
                        for seg in part:
                            seg()
                    pool = g.pool()
                    self.graphs.append(g)
                if r.d.ema_enabled:
                    self._capture_ema(side)
        finally:
            r.capturing = False
            for g, lr in zip(r.opt.param_groups, float_lr):  # schedule, logs and checkpoints keep floats
                g["lr"] = lr
        if cuda:
            torch.cuda.synchronize(dev)
        self.force_skip.fill_(0.0)
        r.skipped.copy_(skipped)
        if cuda:
            torch.cuda.set_rng_state(rng, dev)
        else:
            torch.set_rng_state(rng)
        self.ready = True
        log.info("fast path: %s", f"captured {len(self.graphs)} step graph(s)" + (" + EMA graph" if self.ema_graph else "")
                 if cuda else "eager replay of the captured body (no CUDA)")

    def _capture_ema(self, side: torch.cuda.Stream) -> None:
        """EMA update + re-merge as one graph. Warm-up runs only the merge (idempotent), so capturing
        changes no teacher weight."""
        teacher, d = self.r.d.teacher, self.r.d
        with torch.cuda.stream(side):
            for _ in range(2):
                teacher.sync_merged()
        torch.cuda.current_stream(self.r.device).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, capture_error_mode=CAPTURE_MODE):
            teacher.update(d.student, d.student_head)
        self.ema_graph = g

    def _run_eager(self, tick: Callable[[str], None] | None = None) -> None:
        """The captured body run eagerly (warm-up; CPU), each phase ticked when `tick` is given."""
        tick = tick or (lambda name: None)
        teacher, targets, student, optim = self._segs
        teacher()
        tick("teacher")
        targets()
        tick("target")
        student()
        tick("student")
        self._reduce()
        tick("allreduce")
        optim()

    _reduce_before: int | None = None  # index of the graph the collective precedes (several processes)

    # ---- step ----------------------------------------------------------------------------------------
    def step(self, batch: dict, step: int, tick: Callable[[str], None] | None = None) -> Tensor:
        """Same contract as `StepRunner.step` (1-based `step`, returns the detached device loss)."""
        r = self.r
        batch = to_device(batch, r.device)  # a no-op for DevicePrefetcher's batches (already there, float)
        if not self.ready:
            self._capture(batch)
        self._load(batch)
        if tick is not None:
            tick("data")
        self.lr_t.fill_(float(r.opt.param_groups[0]["lr"]))  # read by the captured Adam (host float -> device)
        if not self.capture:
            self._run_eager(tick)
            r.opt.zero_grad(set_to_none=True)
        else:
            names = ("teacher", "target", "student", "optim")
            for i, g in enumerate(self.graphs):
                if i == self._reduce_before:
                    self._reduce()
                    if tick is not None and self.phases:
                        tick("allreduce")
                g.replay()
                if tick is not None and self.phases:
                    tick(names[i])
        r.after(step, ema=self.ema_graph.replay if self.ema_graph is not None else None)
        if tick is not None and (not self.phases or not self.capture):
            tick("optim")
        return self.loss_out.clone()
