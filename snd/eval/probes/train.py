"""Probe training and evaluation loops: deterministic batches, exact resume, a step fast enough for 10^5 steps.

Resume is exact: the batch order is a pure function of (seed, epoch) (`batch_order`), the learning rate a
pure function of the step (`schedules.lr_factor`), and the checkpoint (`checkpoint.py`) holds the probe, the
AdamW moments and the step.

Speed: the paper's schedules are 307,200 / 320,000 steps of a linear head whose GPU work is ~1 ms. So the
step reads nothing back to the host (masked-sum losses, the loss summed on the device and read every
`log_every` steps, fused capturable AdamW with a device-tensor lr), on CUDA it is captured once and replayed
as a CUDA graph, and a split that fits is held on the device (`rows.DeviceRows`): a batch is then a gather.
Larger splits stream from the token and target caches (`snd.eval.targets`) through DataLoader workers.

Together (`train_probes`): a suite has ~2 M such steps over several datasets, so all probes of one backbone
train at once, each on its own CUDA stream with its own graph; probes over the same rows share one source
(rows held once, tokens read once per streamed step), and a streamed source that is not ready is skipped
for a round rather than stalling the resident ones. Because a probe's batches, learning rates and steps do
not depend on what it trains beside, each probe ends exactly where it would alone (tests check this).
"""
from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from snd.eval.augment import augment_batch
from snd.eval.probes.base import Probe, ProbeSpec, to_device
from snd.eval.probes.checkpoint import load_checkpoint, save_checkpoint
from snd.eval.probes.rows import DeviceRows, Residency, SharedRows, budget_bytes, group_row_bytes, plan_residency
from snd.eval.probes.schedules import lr_factor
from snd.eval.protocol import onecycle_beta1

log = logging.getLogger(__name__)

__all__ = ["TARGETS", "ProbeData", "ProbeJob", "batch_order", "train_probe", "train_probes", "save_checkpoint",
           "load_checkpoint"]

TARGETS = {"depth": ("depth",), "normals": ("normals",), "seg": ("seg",)}


class ProbeData(torch.utils.data.Dataset):
    """Items for a probe: cached `tokens` (when a store is given) or the `image`, plus the task's targets.

    Args:
        dataset: items with `image [3,H,W]`, `depth [H,W]`, `normals [3,H,W]`, `seg [H,W]` (what the task needs).
        indices: which items (row i of the store is `dataset[indices[i]]`).
        task: "depth" | "normals" | "seg".
        store: a `FeatureStore` (cached path) or None (live path: images go through the backbone).
        with_image: also return the image when cached (for figures).
        memory_mb: keep decoded items in RAM up to this size per process (the probe reads every item once
            per epoch; small datasets — synth, NYUv2 — then load each file once). 0 disables.
        targets: a `snd.eval.targets.TargetStore` of the same rows: targets are read from it (two raw
            chunks per item with the token store) instead of decoding the dataset item every epoch.
        flip_store: cached tokens of the horizontally flipped images (same rows), returned as `tokens_flip`
            (the paper protocol's flip test; `snd.eval.protocol.flip_average`).
    """

    def __init__(self, dataset, indices: list[int], task: str, store=None, with_image: bool = False,
                 memory_mb: float = 1024.0, targets=None, flip_store=None):
        if task not in TARGETS:
            raise ValueError(f"unknown probe task {task!r}; expected one of {list(TARGETS)}")
        for what, s in (("feature", store), ("target", targets), ("flipped-feature", flip_store)):
            if s is not None and len(s) != len(indices):
                raise ValueError(f"{what} store has {len(s)} rows but {len(indices)} indices were given")
        self.dataset, self.indices, self.task, self.store, self.with_image = dataset, list(indices), task, store, with_image
        self.targets, self.flip_store = targets, flip_store
        self.budget = int(memory_mb * 2**20)
        self._mem: dict[int, dict[str, Tensor]] = {}
        self._used = 0

    def __len__(self) -> int:
        return len(self.indices)

    def _item(self, j: int) -> dict[str, Tensor]:
        if j in self._mem:
            return self._mem[j]
        need_image = self.store is None or self.with_image
        if self.targets is not None and not need_image:
            return {TARGETS[self.task][0]: self.targets.target(j)}  # already one raw chunk: no RAM copy
        item = self.dataset[self.indices[j]]
        keys = list(TARGETS[self.task]) + (["image"] if need_image else [])
        out = {k: torch.as_tensor(item[k]) for k in keys}
        size = sum(v.numel() * v.element_size() for v in out.values())
        if self._used + size <= self.budget:
            self._mem[j] = out
            self._used += size
        return out

    def target(self, j: int) -> Tensor:
        """The task's target of row `j` (no tokens; filling the in-RAM cache as training would)."""
        return self._item(j)[TARGETS[self.task][0]]

    def __getitem__(self, j: int) -> dict[str, Tensor]:
        out = dict(self._item(j))
        if self.store is not None:
            out["tokens"] = self.store.tokens(j)
        if self.flip_store is not None:
            out["tokens_flip"] = self.flip_store.tokens(j)
        out["row"] = torch.tensor(j)
        return out


def epoch_perm(n: int, seed: int, epoch: int) -> Tensor:
    """The row permutation of one epoch: a pure function of (seed, epoch), so resume is exact."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_order(n: int, batch: int, seed: int, start_step: int, total_steps: int,
                device: torch.device | None = None, streams: tuple | list = (), shuffle: bool = True) -> Iterator:
    """Batches of row indices for steps [start_step, total_steps): a fresh permutation per epoch.

    Lists of ints, or slices of a device tensor when `device` is given (device-resident rows gather with
    them; the order is the same either way). `streams`: CUDA streams that will read the slices (the
    permutation is copied on the current stream): they wait for the copy, and its memory is not reused
    before they are done with it. `shuffle=False`: rows in order every epoch (file order)."""
    if n <= 0:
        raise ValueError("cannot train a probe on an empty dataset")
    batch = min(batch, n)
    per_epoch = n // batch  # drop_last
    step, cur = start_step, (-1, None)
    while step < total_steps:
        epoch, k = divmod(step, per_epoch)
        if cur[0] != epoch:
            perm = epoch_perm(n, seed, epoch) if shuffle else torch.arange(n)
            if device is None:
                cur = (epoch, perm.tolist())
            else:
                perm = perm.to(device)
                for st in streams:
                    st.wait_stream(torch.cuda.current_stream(device))
                    perm.record_stream(st)
                cur = (epoch, perm)
        yield cur[1][k * batch:(k + 1) * batch]
        step += 1


def _tokens(batch: dict, backbone: nn.Module | None) -> Tensor:
    if "tokens" in batch:
        return batch["tokens"]
    if backbone is None:
        raise ValueError("a batch without cached tokens needs the backbone (live path)")
    from snd.eval.features import extract_tokens

    return extract_tokens(backbone, batch["image"])


def _float_tokens(batch: dict, backbone: nn.Module | None) -> Tensor:
    return _tokens(batch, backbone).float()


# ---- training -------------------------------------------------------------------------------------
class _Batches(torch.utils.data.Sampler):
    def __init__(self, *args):
        self.args = args

    def __iter__(self):
        return batch_order(*self.args)

    def __len__(self) -> int:
        return max(self.args[4] - self.args[3], 0)


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
                backbone: nn.Module | None, augment: bool) -> Iterator[tuple[int, Callable[[int], tuple[Tensor, Tensor]]]]:
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

        def streamed():
            for step, b in zip(range(lo, hi), loader):
                if live:
                    if augment:
                        b = augment_batch(b, gen)

                    def fetch(k, b=b):
                        bb = to_device(b, device)
                        return _tokens(bb, backbone), bb[key]
                else:
                    def fetch(k, b=b):
                        return b["tokens"].to(device, non_blocking=True), b[f"t{k}"].to(device, non_blocking=True)
                yield step, fetch
        return streamed()


def _waves(groups: list[_Group], budget: int, max_together: int | None) -> list[list[_Group]]:
    """Groups trained at the same time: resident groups packed so their rows fit `budget` together
    (largest first), at most `max_together` runs per wave; streamed groups join the first wave."""
    waves: list[list[_Group]] = []
    size: list[int] = []

    def runs(w: list[_Group]) -> int:
        return sum(len(g.runs) for g in w)

    for g in sorted(groups, key=lambda g: (g.where != "device", -g.need)):
        need = g.need if g.where == "device" else 0
        for i, w in enumerate(waves):
            if size[i] + need <= budget and (max_together is None or runs(w) + len(g.runs) <= max_together):
                w.append(g)
                size[i] += need
                break
        else:
            waves.append([g])
            size.append(need)
    return waves


def train_probes(
    jobs: list[ProbeJob],
    *,
    grid: tuple[int, int],
    norm: dict[str, Tensor],
    backbone: nn.Module | None = None,
    augment: bool = False,
    device: str | torch.device = "cpu",
    seed: int = 0,
    num_workers: int = 0,
    stop_after: int | None = None,
    residency: Residency = "auto",
    resident_gib: float | None = None,
    graph: str = "auto",
    log_every: int = 50,
    max_together: int | None = None,
) -> list[dict]:
    """Train several probes of one backbone at the same time, each resuming from its checkpoint.

    Why together: the suite has ~2 M probe steps of ~0.4–1.6 ms each, and its largest split (ScanNet++)
    streams from disk at a few hundred steps/s. Here each probe steps on its own CUDA stream (its own graph,
    optimizer and buffers), so the streamed probes train while the GPU also runs the resident ones, and
    small steps overlap (1.2–1.4x for depth steps on an H200; ~1.1x for 150-class seg, already
    memory-bound); probes over the same rows (e.g. ScanNet++ depth and segmentation) also share one copy of
    the rows and one read per streamed step. Every probe still sees
    exactly the batches, learning rates and steps it would see alone (`batch_order` is a pure function of
    the rows, batch, seed and step), so its result does not depend on what it was trained with.
    Resident rows of all probes in a wave must fit the budget together; what does not fit waits for a
    later wave.

    Args:
        jobs: the probes (`ProbeJob`).
        grid: patch grid (h, w) of the tokens; norm: the backbone's final LayerNorm params.
        backbone: frozen backbone for the live path (data without a store); augment: flip/colour per step.
        stop_after: stop (after checkpointing) once this many steps ran in this call (tests of resume).
        residency: keep every row on the device ("device"), read rows per step ("stream"), or decide by
            size ("auto", `snd.eval.probes.rows.plan_residency`).
        graph: "auto" (CUDA graphs on CUDA with cached tokens), "on", "off". The loss is read back only
            every `log_every` steps either way.
        max_together: at most this many probes at a time (None: as many as fit).

    Returns:
        per job: {"steps", "start_step", "loss" (mean of the last logged window), "seconds", "residency",
        "graph", "wave", "trained_together", "rows_shared_by"}.
    """
    device = torch.device(device)
    if graph == "on" and device.type != "cuda":
        raise ValueError("graph='on' needs a CUDA device")
    runs, groups = [], {}
    for job in jobs:
        if len(job.data) == 0:
            raise ValueError("cannot train a probe on an empty dataset")
        live = job.data.store is None
        if live and backbone is None:
            raise ValueError("a ProbeData without cached tokens needs the backbone (live path)")
        use_graph = not live and (graph == "on" or (graph == "auto" and device.type == "cuda"))
        run = _Run(job, device, grid, norm, use_graph)
        runs.append(run)
        if run.finished(stop_after):
            run.where = "done"
            continue
        # live runs never share a source: each augments its own batches
        store = job.data.store
        key = (str(getattr(store, "path", None) or id(store)), job.spec.batch) if not live else ("live", id(run))
        groups.setdefault(key, []).append(run)
    if backbone is not None and any(r.job.data.store is None for r in runs):
        backbone.to(device).eval()
    gs = [_Group(g) for g in groups.values()]
    for g in gs:
        g.plan(device, residency, resident_gib)
    budget = budget_bytes(device, resident_gib) if residency == "auto" else (1 << 62)
    for w_i, wave in enumerate(_waves(gs, budget, max_together)):
        together = sum(len(g.runs) for g in wave)
        for g in wave:
            for r in g.runs:
                r.where, r.wave, r.together, r.shared = g.where, w_i, together, len(g.runs)
                log.info("%s probe: rows %s (%s); %s; wave %d with %d probe(s)", r.job.probe.task, g.where, g.why,
                         "CUDA graph" if r.use_graph else "eager", w_i, together)
        _train_wave(wave, device, seed=seed, num_workers=num_workers, stop_after=stop_after, backbone=backbone,
                    augment=augment, log_every=log_every)
    return [r.result() for r in runs]


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


def _train_wave(wave: list[_Group], device: torch.device, *, seed: int, num_workers: int, stop_after: int | None,
                backbone, augment: bool, log_every: int) -> None:
    """Step every group of the wave in turn (one step per group per round) until all its runs finish. With
    several groups, a streamed group whose next batch is not read yet is skipped for that round (the others
    keep the GPU busy); the round blocks only when no group is ready."""
    t0 = time.perf_counter()
    several = len(wave) > 1
    # open every group (load resident rows, start loader workers) before any prefetch thread starts:
    # resident groups first, so no worker process is forked beside a running loader's threads
    opened = {id(g): g.batches(device, seed, num_workers, stop_after, backbone, augment)
              for g in sorted(wave, key=lambda g: g.where != "device")}
    active: list[tuple[_Group, Any]] = []
    for g in wave:
        it = opened[id(g)]
        active.append((g, _Prefetch(it) if several and g.where == "stream" else it))
    try:
        while active:
            stepped = False
            for entry in list(active):
                g, src = entry
                if isinstance(src, _Prefetch):
                    # block only when nothing else can run this round
                    nxt = src.get(block=not stepped and all(isinstance(s, _Prefetch) for _, s in active))
                    if nxt is None:
                        continue
                    nxt = None if nxt is _Prefetch._END else nxt
                else:
                    nxt = next(src, None)
                if nxt is None:
                    active.remove(entry)
                    continue
                stepped = True
                step, fetch = nxt
                for k, r in enumerate(g.runs):
                    if r.step != step or r.finished(stop_after):  # ahead of the group (resumed later) or done
                        continue
                    with r.ctx():
                        tokens, target = fetch(k)
                        r.advance(tokens, target, log_every=log_every, stop_after=stop_after)
                    if r.finished(stop_after):
                        r.seconds = time.perf_counter() - t0
                if all(r.finished(stop_after) for r in g.runs):
                    active.remove(entry)
                    if isinstance(src, _Prefetch):
                        src.close()
    finally:
        for _, src in active:
            if isinstance(src, _Prefetch):
                src.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    for g in wave:
        for r in g.runs:
            r.seconds = r.seconds or time.perf_counter() - t0


def train_probe(
    probe: Probe,
    data: ProbeData,
    spec: ProbeSpec,
    *,
    ckpt: Path | None = None,
    ckpt_every: int = 2000,
    progress: Callable[[int, int, float], None] | None = None,
    **kw,
) -> dict:
    """Train one probe for `spec.iters` steps, resuming from `ckpt` when it exists: `train_probes` of one
    `ProbeJob` (see there for the keyword arguments).

    Returns:
        {"steps", "start_step", "loss" (mean of the last logged window), "seconds", "residency", "graph", ...}.
    """
    return train_probes([ProbeJob(probe, data, spec, ckpt, ckpt_every, progress)], **kw)[0]
