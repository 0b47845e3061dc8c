"""Stage two: `snd distill` (train or resume a run) and `snd bench distill` (step time per phase).

Both compose `snd.train`; this module only validates inputs, reports, and (for the benchmark) builds
generated data and times it.
"""
from __future__ import annotations

import json
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
def _bench_one(name: str, cfg: BenchDistillConfig, device: torch.device) -> dict:
    from snd.train.distiller import Distiller, build_base_backbone
    from snd.train.step import StepRunner
    from snd.train.synthetic import synthetic_sample

    dcfg = DistillConfig(model=name, init="random", img_height=cfg.img_height, img_width=cfg.img_width,
                         head_prototypes=cfg.head_prototypes, renderer=cfg.renderer, compile=cfg.compile,
                         device=str(device), iters=cfg.warmup + 2 * cfg.iters + 1, num_workers=0)
    torch.manual_seed(0)
    d = Distiller(dcfg, build_base_backbone(dcfg)).to(device).train()
    from snd.splat.target import target_features

    runner = StepRunner(d, dcfg, device=device, target_fn=target_features)
    pool = [default_collate([synthetic_sample(i, img_hw=(cfg.img_height, cfg.img_width),
                                              scaffold_hw=(cfg.scaffold_height, cfg.scaffold_width))]) for i in range(2)]
    if device.type == "cuda":
        pool = [{k: (v.pin_memory() if isinstance(v, torch.Tensor) else v) for k, v in b.items()} for b in pool]
        torch.cuda.reset_peak_memory_stats(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step = 0
    t0 = time.perf_counter()
    for _ in range(cfg.warmup):
        step += 1
        runner.step(pool[step % 2], step)
    sync()
    warm_s = time.perf_counter() - t0
    # throughput: no syncs inside the loop (as in training)
    t0 = time.perf_counter()
    for _ in range(cfg.iters):
        step += 1
        loss = runner.step(pool[step % 2], step)
    sync()
    total = time.perf_counter() - t0
    # phases: sync at every boundary (slower overall; shows where the time goes)
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
        runner.step(pool[step % 2], step, tick)
    out = {
        "model": name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "img_hw": [cfg.img_height, cfg.img_width],
        "scaffold_hw": [cfg.scaffold_height, cfg.scaffold_width],
        "patch_grid": list(d.grid),
        "prototypes": cfg.head_prototypes,
        "compile": cfg.compile,
        "renderer": cfg.renderer,
        "amp": str(runner.amp).replace("torch.", "") if runner.amp else "fp32",
        "it_per_s": cfg.iters / total,
        "ms_per_step": total / cfg.iters * 1e3,
        "phases_ms_median": {p: statistics.median(v) for p, v in phases.items() if v},
        "phases_ms_sum": sum(statistics.median(v) for v in phases.values() if v),
        "warmup_s": warm_s,
        "trainable_params": sum(p.numel() for p in runner.params),
        "final_loss": float(loss),
        "skipped": int(runner.skipped.item()),
    }
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del runner, d, pool
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def bench(cfg: BenchDistillConfig) -> dict:
    """Time the distillation step per model on generated data (random init); print and return a JSON dict.

    Phases: data (host-to-device copy of a pinned batch; stream decoding is `snd bench precompute`'s
    business), teacher (2 context views), target (upsample + splat + blend + downsample), student
    (forward + backward incl. heads and loss), optim (clip, NaN guard, Adam, schedule, EMA)."""
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
    text = json.dumps(results, indent=2)
    print(text)
    if cfg.out is not None:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(text)
    return results
