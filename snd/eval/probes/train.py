"""Training probes: all probes of one backbone at once (`train_probes`), or one alone (`train_probe`).

Why together: a suite has ~2 M probe steps over several datasets, so all probes of one backbone train at
once, each on its own CUDA stream with its own graph (`snd.eval.probes.step`); probes over the same rows
share one source (`snd.eval.probes.sources`: rows held once, tokens read once per streamed step), and a
streamed source that is not ready is skipped for a round rather than stalling the resident ones. Because a
probe's batches, learning rates and steps do not depend on what it trains beside, each probe ends exactly
where it would alone (tests check this). This module is the scheduler: groups into waves that fit the
memory budget (`_waves`), and the round-robin over a wave's sources (`_train_wave`).

Also the public home of what a caller of probe training needs: `ProbeJob`, `ProbeData`, `batch_order`.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from snd.eval.probes.base import Probe, ProbeSpec
from snd.eval.probes.data import TARGETS, ProbeData, batch_order
from snd.eval.probes.rows import Residency, budget_bytes
from snd.eval.probes.sources import _Group, _Prefetch
from snd.eval.probes.step import ProbeJob, _Run

log = logging.getLogger(__name__)

__all__ = ["TARGETS", "ProbeData", "ProbeJob", "batch_order", "train_probe", "train_probes"]


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
    live_precision: str = "fp32",
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
        live_precision: the backbone's arithmetic on the live path (`extract_tokens`; the suite passes its
            `--extract-precision`, the one its cached tokens were made with).

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
                    augment=augment, log_every=log_every, live_precision=live_precision)
    return [r.result() for r in runs]


def _train_wave(wave: list[_Group], device: torch.device, *, seed: int, num_workers: int, stop_after: int | None,
                backbone, augment: bool, log_every: int, live_precision: str = "fp32") -> None:
    """Step every group of the wave in turn (one step per group per round) until all its runs finish. With
    several groups, a streamed group whose next batch is not read yet is skipped for that round (the others
    keep the GPU busy); the round blocks only when no group is ready."""
    t0 = time.perf_counter()
    several = len(wave) > 1
    # open every group (load resident rows, start loader workers) before any prefetch thread starts:
    # resident groups first, so no worker process is forked beside a running loader's threads
    opened = {id(g): g.batches(device, seed, num_workers, stop_after, backbone, augment, live_precision)
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
