"""Where a probe's batches come from: rows held on the device or streamed from the caches, shared by the
probes that read the same rows, and (beside other sources) pulled ahead by a background thread.

Why its own module: a step is ~1 ms of GPU work, so the data path decides the speed. A split that fits is
held on the device (`rows.DeviceRows`) and a batch is a gather; larger splits stream from the token and
target caches (`snd.eval.targets`) through DataLoader workers. Probes over the same rows (one token store,
one batch size) share one source (`_Group`): rows are held once and tokens read once per streamed step,
which changes nothing a probe sees, since the batch order is a function of (rows, batch, seed, step) only.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from snd.eval.augment import augment_batch
from snd.eval.probes.base import to_device
from snd.eval.probes.data import TARGETS, _tokens, batch_order
from snd.eval.probes.rows import DeviceRows, Residency, SharedRows, group_row_bytes, plan_residency
from snd.eval.probes.step import _Run


class _Batches(torch.utils.data.Sampler):
    """`batch_order` as a DataLoader batch sampler (its arguments are `batch_order`'s), for streamed rows."""

    def __init__(self, *args):
        self.args = args

    def __iter__(self):
        return batch_order(*self.args)

    def __len__(self) -> int:
        return max(self.args[4] - self.args[3], 0)


class _Group:
    """Runs that read the same rows in the same order (one token store, one batch size): one source of
    batches serves them all, so a streamed step reads the tokens once and resident rows are held once.
    Sharing changes nothing a probe sees: the batch order is a function of (rows, batch, seed, step) only."""

    def __init__(self, runs: list[_Run]):
        self.runs = runs
        self.datas = [r.job.data for r in runs]
        self.batch = runs[0].job.spec.batch
        self.shuffle = runs[0].job.spec.shuffle
        self.where, self.why, self.need = "stream", "", 0

    def plan(self, device: torch.device, residency: Residency, budget_gib: float | None) -> None:
        d = self.datas[0]
        self.need = group_row_bytes(self.datas) * len(d) if d.store is not None else 0
        mode = self.runs[0].job.residency or residency
        self.where, self.why = plan_residency(d, device, mode, budget_gib, need=self.need)

    def steps(self, stop_after: int | None) -> tuple[int, int]:
        lo = min(r.step for r in self.runs)
        hi = max(r.job.spec.iters if stop_after is None else min(r.job.spec.iters, r.start + stop_after)
                 for r in self.runs)
        return lo, hi

    def batches(self, device: torch.device, seed: int, num_workers: int, stop_after: int | None,
                backbone: nn.Module | None, augment: bool, precision: str = "fp32") -> Iterator[tuple[int, Callable[[int], tuple[Tensor, Tensor]]]]:
        """(step, fetch) per step, where fetch(k) gives run k's (tokens, target) on the device, issued on the
        current stream (the run's).

        The setup happens here, on the calling thread, before the iterator is returned: resident rows are
        loaded and a streamed loader's worker processes are started. So no worker is forked while another
        group's prefetch thread runs (`_train_wave` opens every group first)."""
        lo, hi = self.steps(stop_after)
        if self.runs[0].job.augment is not None:  # a live probe's own choice (its dataset may augment itself)
            augment = self.runs[0].job.augment
        if self.where == "device":
            rows = DeviceRows.load(self.datas, device, num_workers=num_workers)
            streams = [r.stream for r in self.runs if r.stream is not None]
            for r in self.runs:
                if r.stream is not None:  # the rows were written on this stream: runs read them after that
                    r.stream.wait_stream(torch.cuda.current_stream(device))
            order = batch_order(len(rows), self.batch, seed, lo, hi, device=device, streams=streams,
                                shuffle=self.shuffle)
            return ((step, (lambda k, idx=idx: rows.gather(idx, out=self.runs[k].buf if self.runs[k].graph else None, k=k)))
                    for step, idx in zip(range(lo, hi), order))
        live = self.datas[0].store is None
        ds = self.datas[0] if live else SharedRows(self.datas)
        loader = iter(torch.utils.data.DataLoader(ds, batch_sampler=_Batches(len(ds), self.batch, seed, lo, hi, None,
                                                                             (), self.shuffle),
                                                  num_workers=num_workers, pin_memory=device.type == "cuda"))
        gen = torch.Generator().manual_seed(seed + 7919 * lo) if live else None
        key = TARGETS[self.datas[0].task][0]
        # a set that splits its augmentation: the workers drew each item's parameters, the device applies them
        deferred = self.datas[0].dataset.device_augment if live and getattr(self.datas[0], "deferred", False) else None

        def streamed():
            for step, b in zip(range(lo, hi), loader):
                if live:
                    if augment and deferred is None:
                        b = augment_batch(b, gen)

                    def fetch(k, b=b):
                        bb = to_device(b, device)
                        if deferred is not None:
                            bb = deferred(bb)
                            if augment:  # the generic live augmentation after the set's own (called once a step)
                                bb = augment_batch(bb, gen)
                        return _tokens(bb, backbone, precision), bb[key]
                else:
                    def fetch(k, b=b):
                        return b["tokens"].to(device, non_blocking=True), b[f"t{k}"].to(device, non_blocking=True)
                yield step, fetch
        return streamed()


class _Prefetch:
    """A streamed source's batches pulled by a background thread into a small queue, so the round-robin can
    skip the source while its next batch is still being read instead of holding every other probe to the
    disk's pace. Only host work happens on the thread (the DataLoader's collated, pinned batches); device
    copies stay on the training thread."""

    _END = object()

    def __init__(self, it: Iterator, depth: int = 8):
        self.q: queue.Queue = queue.Queue(depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._pull, args=(it,), daemon=True, name="snd-probe-prefetch")
        self.thread.start()

    def _put(self, x) -> bool:
        """Queue `x` unless the consumer closed the source meanwhile (then False)."""
        while not self.stop.is_set():
            try:
                self.q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _pull(self, it: Iterator) -> None:
        try:
            for x in it:
                if not self._put(x):
                    return
            self._put(self._END)
        except BaseException as e:  # re-raised on the training thread
            self._put(e)

    def get(self, block: bool):
        """The next item, `_Prefetch._END` when the source is exhausted, or None (not ready, `block=False`)."""
        try:
            x = self.q.get(block=block)
        except queue.Empty:
            return None
        if isinstance(x, BaseException):
            raise x
        return x

    def close(self) -> None:
        """Stop pulling and wait for the thread (a later wave forks loader workers: no thread of ours may be
        inside a loader then)."""
        self.stop.set()
        self.thread.join(timeout=30)
