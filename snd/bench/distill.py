"""`snd bench distill`: step time per phase and path (render / operator / fast), in memory or streamed.

Composes `snd.train` exactly as `snd distill` does; generates its store with `snd.bench.precompute`.
"""
from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from rich.console import Console
from torch.utils.data import default_collate

from snd.errors import SndError
from snd.pipeline.config import BenchDistillConfig, DistillConfig
from snd.stages.distill import check_sizes

log = logging.getLogger(__name__)
console = Console(stderr=True)

__all__ = ["bench"]

PHASES = ("data", "teacher", "target", "student", "allreduce", "optim")


# ---- benchmark ---------------------------------------------------------------------------------------
def _busy_fraction(fn, n: int, device: torch.device) -> float | None:
    """GPU busy fraction over `n` calls of `fn`: summed kernel time (profiler) / wall time."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
    kernels: dict[str, float] = {}
    for e in prof.events():
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
            kernels[e.name] = kernels.get(e.name, 0.0) + e.device_time
    _busy_fraction.top = {k[:90]: v / 1e3 / n for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:12]}
    return sum(kernels.values()) / 1e6 / wall


class _PoolBatches:
    """Two in-memory batches, alternated: the step alone, no data loading in the timing."""

    def __init__(self, pool: list[dict]):
        self.pool, self.k, self.seen = pool, 0, []

    def next(self) -> dict:
        self.k += 1
        return self.pool[self.k % 2]

    def close(self) -> None:
        pass


class _StoreBatches:
    """Batches streamed from a scaffold store exactly as `snd distill` gets them (ShardStream ->
    DataLoader workers -> pinned memory -> side-stream copy to the GPU), this rank's disjoint part;
    `seen` collects the stream's global positions and `wait_s` the host time spent waiting for them."""

    def __init__(self, dcfg: DistillConfig, env, device: torch.device):
        from snd.train.data import BatchIterator, DevicePrefetcher, resolve_num_workers, shard_stream_factory

        self.num_workers = resolve_num_workers(dcfg.num_workers, device=device, world_size=env.world_size,
                                               operators=dcfg.targets != "render")
        it = BatchIterator(shard_stream_factory(dcfg), batch=dcfg.batch, start=0, rank=env.rank, world_size=env.world_size,
                           num_workers=self.num_workers, prefetch=dcfg.prefetch, pin_memory=device.type == "cuda",
                           seed=dcfg.seed)
        self.it, self.seen = DevicePrefetcher(it, device), []

    def next(self) -> dict:
        idx, batch = next(self.it)
        self.seen.extend(idx)
        return batch

    def close(self) -> None:
        self.it = None  # ends the DataLoader's workers


def _bench_path(name: str, path: str, cfg: BenchDistillConfig, device: torch.device, env, *,
                pool: list[dict] | None, store: Path | None) -> dict:
    """Time one target/step path on this rank: "render" (eager, per-step render), "operator" (eager,
    stored operators) or "fast" (operators, whole step in CUDA graphs; two graphs around the all-reduce
    with several ranks). Batches come from `pool` (in memory) or are streamed from `store`."""
    from snd.splat.target import target_features
    from snd.train.distiller import Distiller, build_base_backbone
    from snd.train.distributed import broadcast_params
    from snd.train.graph import GraphStep
    from snd.train.step import StepRunner

    total_iters = cfg.warmup + 3 * cfg.iters + 20
    dcfg = DistillConfig(model=name, init="random", img_height=cfg.img_height, img_width=cfg.img_width,
                         head_prototypes=cfg.head_prototypes, renderer=cfg.renderer, compile=cfg.compile,
                         targets="render" if path == "render" else "operator", device=str(device),
                         iters=total_iters, num_workers=cfg.num_workers, shards=store or Path("-"),
                         targets_protocol=cfg.targets_protocol)
    workers = None
    if store is not None:
        src = _StoreBatches(dcfg, env, device)
        workers = src.num_workers
    else:
        src = _PoolBatches(pool if path != "render" else [{k: v for k, v in b.items() if not k.startswith("op_")} for b in pool])

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if env.world_size > 1:
            torch.distributed.barrier()

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    d = Distiller(dcfg, build_base_backbone(dcfg)).to(device).train()
    runner = StepRunner(d, dcfg, device=device, target_fn=target_features, world_size=env.world_size)
    broadcast_params(list(runner.named.values()) + list(d.teacher_state().values()), env.world_size)
    stepper = GraphStep(runner) if path == "fast" else runner
    step = 0
    t0 = time.perf_counter()
    for _ in range(cfg.warmup):
        step += 1
        stepper.step(src.next(), step)
    sync()
    warm_s = time.perf_counter() - t0
    # throughput: no syncs inside the loop (as in training)
    wait = 0.0
    t0 = time.perf_counter()
    for _ in range(cfg.iters):
        step += 1
        tw = time.perf_counter()
        batch = src.next()
        wait += time.perf_counter() - tw
        loss = stepper.step(batch, step)
    sync()
    total = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    def one() -> None:
        nonlocal step
        step += 1
        stepper.step(src.next(), step)

    busy = _busy_fraction(one, min(cfg.iters, 20), device)
    top = getattr(_busy_fraction, "top", None) if device.type == "cuda" else None
    skipped = int(runner.skipped.item())
    # phases: sync at every boundary (slower overall; shows where the time goes); the fast path captures
    # one graph per phase for this (same networks and optimizer, a second capture)
    if path == "fast":
        del stepper
        stepper = GraphStep(runner, phases=True)
    phases: dict[str, list[float]] = {p: [] for p in PHASES}
    for _ in range(cfg.iters):
        step += 1
        batch = src.next()
        mark = [time.perf_counter()]

        def tick(phase: str) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            phases[phase].append((now - mark[0]) * 1e3)
            mark[0] = now

        sync()
        mark[0] = time.perf_counter()
        stepper.step(batch, step, tick)
    src.close()
    out = {
        "path": path,
        "it_per_s": cfg.iters / total,
        "ms_per_step": total / cfg.iters * 1e3,
        "data_wait_ms_per_step": wait / cfg.iters * 1e3,
        "num_workers": workers,
        "phases_ms_median": {p: statistics.median(v) for p, v in phases.items() if v},
        "phases_ms_sum": sum(statistics.median(v) for v in phases.values() if v),
        "gpu_busy_fraction": busy,
        "top_kernels_ms_per_step": top,
        "warmup_s": warm_s,
        "trainable_params": sum(p.numel() for p in runner.params),
        "amp": str(runner.amp).replace("torch.", "") if runner.amp else "fp32",
        "final_loss": float(loss),
        "skipped": skipped,
        "peak_mem_gib": peak,
        "seen": src.seen,
    }
    del stepper, runner, d
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


RANK_KEYS = ("it_per_s", "ms_per_step", "data_wait_ms_per_step", "phases_ms_median", "gpu_busy_fraction", "peak_mem_gib",
             "skipped", "final_loss")


def _across_ranks(per_rank: list[dict], store: Path | None, img_hw: tuple[int, int]) -> dict:
    """One path's result on rank 0: its own figures, every rank's, the total rate and (streaming a
    store) which items each rank trained on — the ranks must split the store without overlap."""
    out = {k: v for k, v in per_rank[0].items() if k != "seen"}
    out["ranks"] = [{"rank": r, **{k: x[k] for k in RANK_KEYS}} for r, x in enumerate(per_rank)]
    out["it_per_s_total"] = sum(x["it_per_s"] for x in per_rank)
    if store is not None:
        from snd.cache.stream import ShardStream

        s = ShardStream(store, img_hw=img_hw, seed=0)
        items = [[s.item_at(g) for g in x["seen"]] for x in per_rank]
        sets = [set(i) for i in items]
        overlap = set.intersection(*sets) if len(sets) > 1 else set()
        for r, (x, its) in enumerate(zip(out["ranks"], items)):
            x.update(items_seen=len(its), distinct_items=len(set(its)), distinct_pairs=len({i[:2] for i in its}),
                     positions=[min(per_rank[r]["seen"]), max(per_rank[r]["seen"])] if its else None)
        out["split"] = {"store_items": s.num_items, "items_shared_by_ranks": len(overlap),
                        "positions_disjoint": len(set().union(*[set(x["seen"]) for x in per_rank])) == sum(len(x["seen"]) for x in per_rank),
                        "one_epoch": max((max(x["seen"]) for x in per_rank if x["seen"]), default=0) < s.num_items}
    return out


def model_sized(cfg: BenchDistillConfig, name: str) -> BenchDistillConfig:
    """`cfg` at `name`'s input size: by default `snd distill`'s (576x880 floored to the patch), so one call
    times every family at the input its real runs use; a given size that is not a multiple of the model's
    patch is rounded up to the next multiple (574x868 -> 576x880 for patch 16). Each model's JSON row
    records its `img_hw`."""
    from snd.models.backbone import DISTILL_FRAME_HW, spec_of, with_input_hw

    p = spec_of(name).patch
    cfg = with_input_hw(cfg, p, DISTILL_FRAME_HW)
    h, w = -(-cfg.img_height // p) * p, -(-cfg.img_width // p) * p
    check_sizes(h, w, p)
    return cfg if (h, w) == (cfg.img_height, cfg.img_width) else replace(cfg, img_height=h, img_width=w)


def _bench_one(name: str, cfg: BenchDistillConfig, device: torch.device, env, store: Path | None) -> dict | None:
    from snd.models.backbone import create_backbone, patch_size
    from snd.train.distributed import all_gather_objects
    from snd.train.synthetic import synthetic_sample, with_operator

    patch = patch_size(create_backbone(name, init="random"))
    grid = (cfg.img_height // patch, cfg.img_width // patch)
    pool, op_build_s, nnz = None, None, None
    if store is None:
        t0 = time.perf_counter()
        items = [with_operator(synthetic_sample(i, img_hw=(cfg.img_height, cfg.img_width),
                                                scaffold_hw=(cfg.scaffold_height, cfg.scaffold_width)), grid, device=device,
                                 protocol=cfg.targets_protocol)
                 for i in range(2)]
        op_build_s = (time.perf_counter() - t0) / 2
        pool = [default_collate([it]) for it in items]
        nnz = max(int(b["op_stats"][0, 2]) for b in pool)
        if device.type == "cuda":
            pool = [{k: (v.pin_memory() if isinstance(v, torch.Tensor) else v) for k, v in b.items()} for b in pool]
    paths = {}
    for p in cfg.paths:
        mine = _bench_path(name, p, cfg, device, env, pool=pool, store=store)
        paths[p] = all_gather_objects(mine, env.world_size)
    if not env.is_main:
        return None
    paths = {p: _across_ranks(v, store, (cfg.img_height, cfg.img_width)) for p, v in paths.items()}
    first = paths[cfg.paths[0]]
    return {
        "model": name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": env.world_size,
        "data": "store" if store is not None else "memory",
        "img_hw": [cfg.img_height, cfg.img_width],
        "scaffold_hw": [cfg.scaffold_height, cfg.scaffold_width],
        "patch_grid": list(grid),
        "prototypes": cfg.head_prototypes,
        "compile": cfg.compile,
        "renderer": cfg.renderer,
        "targets_protocol": cfg.targets_protocol,
        "operator_build_s_per_target": op_build_s,
        "operator_max_row_nnz": nnz,
        "paths": paths,
        # the first path's figures at the top level (the layout of earlier snd versions)
        **{k: first[k] for k in ("it_per_s", "it_per_s_total", "ms_per_step", "phases_ms_median", "phases_ms_sum",
                                 "final_loss", "skipped", "peak_mem_gib", "amp", "trainable_params")},
    }


def _bench_store(cfg: BenchDistillConfig, env, device: torch.device) -> Path | None:
    """The store to stream (None: in-memory batches). Generated by rank 0 when not given, sized so that
    every rank's batches of one path come from one epoch (no item needs to repeat)."""
    import math
    import tempfile

    use = cfg.data == "store" or (cfg.data == "auto" and (env.world_size > 1 or cfg.shards is not None))
    if not use:
        return None
    if cfg.shards is not None:
        if not Path(cfg.shards).exists():
            raise SndError(f"scaffold store not found: {cfg.shards}", path=cfg.shards,
                           hint="run `snd precompute` first, or leave --shards out to generate one")
        return Path(cfg.shards)
    from snd.bench.precompute import bench_store

    per_rank = cfg.warmup + 2 * cfg.iters + min(cfg.iters, 20) + 2
    pairs = math.ceil(max(env.world_size, 2) * per_rank / 3)
    work = Path(cfg.workdir) if cfg.workdir is not None else Path(tempfile.gettempdir()) / "snd-bench-distill"
    if env.is_main:
        work.mkdir(parents=True, exist_ok=True)
        first = model_sized(cfg, cfg.models[0])  # the store's frames and operators are for the first model's input
        bench_store(work, height=cfg.scaffold_height, width=cfg.scaffold_width, pairs=pairs,
                    img_hw=(first.img_height, first.img_width), device=str(device))
    if env.world_size > 1:
        torch.distributed.barrier()
    return work / "store"


def bench(cfg: BenchDistillConfig) -> dict | None:
    """Time the distillation step per model (random init); print and return a JSON dict (rank 0).

    Phases: data (copy of the batch into the step's buffers), teacher (2 context views), target (upsample
    + splat + blend + downsample, or the stored operator), student (forward + backward incl. heads and
    loss), allreduce (several ranks: the one collective), optim (clip, NaN guard, Adam, schedule, EMA).
    Paths (`cfg.paths`): render / operator (eager) and fast (CUDA graphs), side by side. Under torchrun
    every rank times its own GPU and streams its own part of the store; rank 0 reports them all."""
    from snd.train.distributed import dist_env, init_distributed, resolve_device

    from snd.models.backbone import spec_of

    for name in cfg.models:
        spec_of(name)  # unknown names fail before any work
    env = dist_env()
    device = resolve_device(cfg.device, env)
    created = init_distributed(env, device)
    prev = torch.get_float32_matmul_precision()
    results = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
               "torch": torch.__version__, "world_size": env.world_size, "models": []}
    try:
        store = _bench_store(cfg, env, device)
        for name in cfg.models:
            if env.is_main:
                console.print(f"[bold]bench distill[/] {name} on {device} x {env.world_size} "
                              f"({'streaming ' + str(store) if store else 'in-memory batches'}) ...")
            if device.type == "cuda":
                torch.set_float32_matmul_precision("high")  # TF32 for the ViT, as in `run`; restored below
            try:
                results["models"].append(_bench_one(name, model_sized(cfg, name), device, env, store))
            finally:
                torch.set_float32_matmul_precision(prev)
    finally:
        if created:
            torch.distributed.destroy_process_group()
    if not env.is_main:
        return None
    from snd.pipeline.jsonout import emit_json

    return emit_json(results, cfg.out)
