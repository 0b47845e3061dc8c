"""The step loop's logging windows, read back without stalling the GPU.

Every `--log-every` steps the loop closes a *window*: its steps' losses and running skip counts (device
tensors) are stacked, averaged over ranks and copied to the host behind the window's last step, and an
event marks when that copy is done. The window is *written* (metrics.jsonl rows, skipped.jsonl, TensorBoard,
the progress bar) when the next window closes, by which time the GPU finished it long ago, so the
read-back waits for nothing. At a checkpoint, a stop and the end the loop writes every open window first
(`write(all_=True)`, one sync), so rows up to a checkpoint are still written with it.

Why: the loop used to read each window back at once, a host sync every 10 steps. The sync empties the
GPU's queue, and the writing and the next step's launch then run with the GPU idle. `snd bench distill`
never syncs inside its timed loop, and on an H200 the default `snd distill` ran at 0.967 of it in its
last window (docs/performance.md, "Runs 5 and 6").

The rate of a window (`it_per_s` in its rows) on CUDA is its steps over the GPU time between its last
step's end and the previous window's (timing events), i.e. the rate the GPU moved through them, idle
gaps included; elsewhere (or for the first window) the host's time between window closes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from snd.train.distributed import DistEnv, all_gather_objects
from snd.train.rundir import RunLogger

__all__ = ["StepRecord", "WindowLog"]


@dataclass
class StepRecord:
    """What the loop keeps of one step until its window is written."""
    step: int
    loss: torch.Tensor  # device scalar
    lr: float
    skipped: torch.Tensor  # the running skip count after this step (device scalar, a copy)
    items: tuple  # (stream positions, scenes): where a skipped step's items came from


@dataclass
class _Window:
    records: list[StepRecord]
    values: torch.Tensor  # [2, n] on the host: rank-averaged losses, skip counts (filled when `done` is reached)
    done: Any  # CUDA event after the copy, or None (the copy was synchronous)
    end: Any  # CUDA timing event at the window's last step, or None
    host_s: float  # host seconds since the previous window closed
    wait_ms: float  # host ms per step blocked on the loader
    path: str


@dataclass
class WindowLog:
    """Open windows of one run: `close` after a window's last step, `write` to log the finished ones."""
    logger: RunLogger
    env: DistEnv
    device: torch.device
    summary: Any  # TrainSummary: losses, lrs and skipped are filled as windows are written
    ema_updates: Any  # () -> int, the runner's EMA update count (TensorBoard)
    _open: list[_Window] = field(default_factory=list)
    _prev_end: Any = None
    _t_close: float = field(default_factory=time.perf_counter)

    def close(self, records: list[StepRecord], *, wait_ms: float, path: str) -> None:
        """Queue the read-back of the window `records` (its last step just queued)."""
        if not records:
            return
        now = time.perf_counter()
        host_s, self._t_close = now - self._t_close, now
        losses = torch.stack([r.loss for r in records]).float()
        if self.env.world_size > 1:
            dist.all_reduce(losses)
            losses /= self.env.world_size
        packed = torch.stack([losses, torch.stack([r.skipped for r in records]).float()])
        done = end = None
        if self.device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            values = packed.to("cpu", non_blocking=True)  # into pinned memory, behind the window's work
            done = torch.cuda.Event()
            done.record()
        else:
            values = packed
        self._open.append(_Window(records, values, done, end, host_s, wait_ms, path))

    def write(self, *, all_: bool = False) -> None:
        """Write the open windows but the newest (all of them with `all_`: before a checkpoint, a stop, the end)."""
        keep = 0 if all_ else 1
        while len(self._open) > keep:
            self._write_one(self._open.pop(0))

    def _write_one(self, w: _Window) -> None:
        """Rows, skipped steps and scalars of one window (its read-back complete).

        A skipped step (non-finite loss or gradient on any rank) is marked in its metrics.jsonl row and its items
        (every rank's stream positions and scenes) go to skipped.jsonl, so a user can find the pairs behind it
        (`scripts/gpu_nan_hunt.py` then says which tensor goes non-finite) instead of only a count."""
        if w.done is not None:
            w.done.synchronize()
        rate_s = w.host_s
        if w.end is not None:
            if self._prev_end is not None:
                rate_s = self._prev_end.elapsed_time(w.end) / 1e3
            self._prev_end = w.end
        it_per_s = len(w.records) / max(rate_s, 1e-9)
        values, counts = w.values.tolist()
        summary = self.summary
        before = [float(summary.skipped)] + counts[:-1]
        bad = [c > b for c, b in zip(counts, before)]
        summary.skipped = int(counts[-1])
        rows = []
        for r, loss, b in zip(w.records, values, bad):
            summary.losses[r.step] = loss
            summary.lrs[r.step] = r.lr
            rows.append({"step": r.step, "loss": loss, "lr": r.lr, "it_per_s": it_per_s, "path": w.path, "skipped": int(b),
                         "data_wait_ms": w.wait_ms})
        self.logger.steps(rows)
        if any(bad):  # the same decision on every rank (the guard uses rank-averaged numbers): a safe collective
            mine = [{"step": r.step, "rank": self.env.rank, "positions": list(r.items[0]), "scenes": r.items[1]}
                    for r, b in zip(w.records, bad) if b]
            self.logger.skipped([x for part in all_gather_objects(mine, self.env.world_size) for x in part])
        finite = [v for v in values if v == v and abs(v) != float("inf")]
        last = w.records[-1]
        scalars = {"train/loss": sum(finite) / max(len(finite), 1), "train/lr": last.lr,
                   "train/skipped_steps": float(summary.skipped), "perf/it_per_s": it_per_s, "perf/data_wait_ms": w.wait_ms,
                   "train/ema_updates": self.ema_updates()}
        if self.device.type == "cuda":
            scalars["perf/gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.logger.scalars(last.step, scalars)
