"""Stage two: `snd distill` (train or resume a run) and `snd bench distill` (step time per phase).

Both compose `snd.train`; this module only validates inputs, reports, and (for the benchmark) builds
generated data and times it.
"""
from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch
from rich.console import Console
from torch.utils.data import default_collate

from snd.errors import SndError
from snd.pipeline.config import BenchDistillConfig, DistillConfig
from snd.train.loop import TrainSummary, train

log = logging.getLogger(__name__)
console = Console(stderr=True)

__all__ = ["bench", "run"]

PHASES = ("data", "teacher", "target", "student", "optim")


def _check_sizes(h: int, w: int, patch: int = 14) -> None:
    if h % patch or w % patch:
        raise SndError(f"backbone input {h}x{w} is not a multiple of the patch size {patch}",
                       hint=f"use --img-height {h // patch * patch} --img-width {w // patch * patch}")


def run(cfg: DistillConfig) -> TrainSummary:
    """Train (or resume, if `cfg.run` holds a checkpoint) and return the summary; rank 0 prints it."""
    _check_sizes(cfg.img_height, cfg.img_width)
    if not Path(cfg.shards).exists():
        raise SndError(f"scaffold store not found: {cfg.shards}", path=cfg.shards,
                       hint="run `snd precompute --out <store>` first, then pass it with --shards")
    prev = torch.get_float32_matmul_precision()
    if torch.cuda.is_available() and cfg.device != "cpu":
        torch.set_float32_matmul_precision("high")  # TF32 for the ViT; restored below (global state)
    try:
        summary = train(cfg)
    finally:
        torch.set_float32_matmul_precision(prev)
    if summary.rank == 0:
        last = summary.losses.get(summary.step)
        console.print(f"[green]distilled[/] {summary.step - summary.start_step} steps "
                      f"(now at {summary.step}/{cfg.iters}) in {summary.seconds:.0f} s, {summary.it_per_s:.2f} it/s, "
                      f"last loss {last if last is not None else float('nan'):.4f}, skipped {summary.skipped}; "
                      f"checkpoint {summary.checkpoint}")
    return summary


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


def _bench_path(name: str, path: str, cfg: BenchDistillConfig, device: torch.device, pool: list[dict]) -> dict:
    """Time one target/step path: "render" (eager, per-step render), "operator" (eager, stored operators)
    or "fast" (operators, whole step in CUDA graphs)."""
    from snd.train.distiller import Distiller, build_base_backbone
    from snd.train.graph import GraphStep
    from snd.train.step import StepRunner

    total_iters = cfg.warmup + 3 * cfg.iters + 20
    dcfg = DistillConfig(model=name, init="random", img_height=cfg.img_height, img_width=cfg.img_width,
                         head_prototypes=cfg.head_prototypes, renderer=cfg.renderer,
                         compile=cfg.compile,
                         targets="render" if path == "render" else "operator", device=str(device),
                         iters=total_iters, num_workers=0)
    if path == "render":
        pool = [{k: v for k, v in b.items() if not k.startswith("op_")} for b in pool]

    def make():
        torch.manual_seed(0)
        d = Distiller(dcfg, build_base_backbone(dcfg)).to(device).train()
        from snd.splat.target import target_features

        r = StepRunner(d, dcfg, device=device, target_fn=target_features)
        return d, r

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    d, runner = make()
    stepper = GraphStep(runner) if path == "fast" else runner
    step = 0
    t0 = time.perf_counter()
    for _ in range(cfg.warmup):
        step += 1
        stepper.step(pool[step % 2], step)
    sync()
    warm_s = time.perf_counter() - t0
    # throughput: no syncs inside the loop (as in training)
    t0 = time.perf_counter()
    for _ in range(cfg.iters):
        step += 1
        loss = stepper.step(pool[step % 2], step)
    sync()
    total = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    def one() -> None:
        nonlocal step
        step += 1
        stepper.step(pool[step % 2], step)

    busy = _busy_fraction(one, min(cfg.iters, 20), device)
    top = getattr(_busy_fraction, "top", None) if device.type == "cuda" else None
    skipped = int(runner.skipped.item())
    # phases: sync at every boundary (slower overall; shows where the time goes); the fast path captures
    # one graph per phase for this
    if path == "fast":
        del stepper, runner, d
        d, runner = make()
        stepper = GraphStep(runner, phases=True)
        step = 0
    phases: dict[str, list[float]] = {p: [] for p in PHASES}
    for _ in range(cfg.iters):
        step += 1
        mark = [time.perf_counter()]

        def tick(phase: str) -> None:
            sync()
            now = time.perf_counter()
            phases[phase].append((now - mark[0]) * 1e3)
            mark[0] = now

        sync()
        mark[0] = time.perf_counter()
        stepper.step(pool[step % 2], step, tick)
    out = {
        "path": path,
        "it_per_s": cfg.iters / total,
        "ms_per_step": total / cfg.iters * 1e3,
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
    }
    del stepper, runner, d
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _bench_one(name: str, cfg: BenchDistillConfig, device: torch.device) -> dict:
    from snd.models.backbone import create_backbone, patch_size
    from snd.train.synthetic import synthetic_sample, with_operator

    patch = patch_size(create_backbone(name, init="random"))
    grid = (cfg.img_height // patch, cfg.img_width // patch)
    t0 = time.perf_counter()
    items = [with_operator(synthetic_sample(i, img_hw=(cfg.img_height, cfg.img_width),
                                            scaffold_hw=(cfg.scaffold_height, cfg.scaffold_width)), grid, device=device)
             for i in range(2)]
    op_build_s = (time.perf_counter() - t0) / 2
    pool = [default_collate([it]) for it in items]
    if device.type == "cuda":
        pool = [{k: (v.pin_memory() if isinstance(v, torch.Tensor) else v) for k, v in b.items()} for b in pool]
    paths = {p: _bench_path(name, p, cfg, device, pool) for p in cfg.paths}
    first = paths[cfg.paths[0]]
    out = {
        "model": name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "img_hw": [cfg.img_height, cfg.img_width],
        "scaffold_hw": [cfg.scaffold_height, cfg.scaffold_width],
        "patch_grid": list(grid),
        "prototypes": cfg.head_prototypes,
        "compile": cfg.compile,
        "renderer": cfg.renderer,
        "operator_build_s_per_target": op_build_s,
        "operator_max_row_nnz": max(int(b["op_stats"][0, 2]) for b in pool),
        "paths": paths,
        # the first path's figures at the top level (the layout of earlier snd versions)
        **{k: first[k] for k in ("it_per_s", "ms_per_step", "phases_ms_median", "phases_ms_sum", "final_loss",
                                 "skipped", "peak_mem_gib", "amp", "trainable_params")},
    }
    return out


def bench(cfg: BenchDistillConfig) -> dict:
    """Time the distillation step per model on generated data (random init); print and return a JSON dict.

    Phases: data (host-to-device copy of a pinned batch; stream decoding is `snd bench precompute`'s
    business), teacher (2 context views), target (upsample + splat + blend + downsample, or the stored
    operator), student (forward + backward incl. heads and loss), optim (clip, NaN guard, Adam, schedule,
    EMA). Paths (`cfg.paths`): render / operator (eager) and fast (CUDA graphs), side by side."""
    from snd.train.distributed import DistEnv, resolve_device

    _check_sizes(cfg.img_height, cfg.img_width)
    device = resolve_device(cfg.device, DistEnv())
    prev = torch.get_float32_matmul_precision()
    results = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
               "torch": torch.__version__, "models": []}
    for name in cfg.models:
        console.print(f"[bold]bench distill[/] {name} on {device} ...")
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for the ViT, as in `run`; restored below
        try:
            results["models"].append(_bench_one(name, cfg, device))
        finally:
            torch.set_float32_matmul_precision(prev)
    from snd.pipeline.jsonout import emit_json

    return emit_json(results, cfg.out)
