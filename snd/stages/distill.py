"""Stage two: `snd distill` (train or resume a run).

Composes `snd.train`; this module only validates inputs and reports (`snd bench distill` lives in
`snd.bench.distill`).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from rich.console import Console

from snd.errors import SndError
from snd.pipeline import buildcache
from snd.pipeline.config import DistillConfig
from snd.train.loop import TrainSummary, input_sized, resume_point, train
from snd.train.rundir import SKIPPED_FILE

log = logging.getLogger(__name__)
console = Console(stderr=True)

__all__ = ["check_sizes", "run"]


def check_sizes(h: int, w: int, patch: int = 14) -> None:
    """The backbone input must tile into whole patches (stage two and its benchmark both check it)."""
    if h % patch or w % patch:
        raise SndError(f"backbone input {h}x{w} is not a multiple of the patch size {patch}",
                       hint=f"use --img-height {-(-h // patch) * patch} --img-width {-(-w // patch) * patch} "
                            f"(or {h // patch * patch} x {w // patch * patch})")


def run(cfg: DistillConfig) -> TrainSummary:
    """Train (or resume, if `cfg.run` holds a checkpoint) and return the summary; rank 0 prints it."""
    from snd.models.backbone import spec_of

    cfg = input_sized(cfg)
    check_sizes(cfg.img_height, cfg.img_width, spec_of(cfg.model).patch)
    if not Path(cfg.shards).exists():
        raise SndError(f"scaffold store not found: {cfg.shards}", path=cfg.shards,
                       hint="run `snd precompute --out <store>` first, then pass it with --shards")
    point = resume_point(cfg.run)
    if point is not None and point[1] < cfg.iters and point[2] not in (None, cfg.iters):
        console.print(f"continuing run {cfg.run} from step {point[1]} to {cfg.iters} (it was set for {point[2]} steps; "
                      f"the one-cycle schedule is re-laid over {cfg.iters} steps from here)")
    if cfg.verify_store and (point is None or point[1] < cfg.iters):
        _verify_store(Path(cfg.shards))
    prev = torch.get_float32_matmul_precision()
    if torch.cuda.is_available() and cfg.device != "cpu":
        torch.set_float32_matmul_precision("high")  # TF32 for the ViT; restored below (global state)
    if torch.cuda.is_available() and cfg.device != "cpu" and cfg.compile != "off" and cfg.fast != "off" \
            and (point is None or point[1] < cfg.iters) and os.environ.get("RANK", "0") == "0":
        buildcache.announce_compile(console, "the distillation step (teacher, student, fast-path graphs)")
    try:
        summary = train(cfg)
    finally:
        torch.set_float32_matmul_precision(prev)
    if summary.rank == 0:
        buildcache.report_compile(console)
    if summary.rank == 0 and summary.interrupted:
        console.print(f"[yellow]interrupted[/] at step {summary.step}/{cfg.iters}; checkpoint {summary.checkpoint}. "
                      "Rerun the same command to resume from it.")
    elif summary.rank == 0 and summary.complete:
        console.print(f"[green]run {summary.run} is complete[/] at step {summary.step} (--iters {cfg.iters}); "
                      f"checkpoint {summary.checkpoint}. A larger --iters continues it.")
    elif summary.rank == 0:
        last = summary.losses.get(summary.step)
        console.print(f"[green]distilled[/] {summary.step - summary.start_step} steps "
                      f"(now at {summary.step}/{cfg.iters}) in {summary.seconds:.0f} s, {summary.it_per_s:.2f} it/s, "
                      f"last loss {last if last is not None else float('nan'):.4f}, skipped {summary.skipped}; "
                      f"checkpoint {summary.checkpoint}")
    # on a GPU only: a CPU run's steps share the cores with the workers (at most 2 by default), where waiting is expected
    note = loader_bound_note(summary) if torch.cuda.is_available() and cfg.device != "cpu" else None
    if summary.rank == 0 and note:
        console.print(f"[yellow]note[/]: {note}")
    ran = summary.step - summary.start_step
    if summary.rank == 0 and ran and summary.skipped:
        # counted over the whole run (it is checkpointed); a non-finite loss or gradient left those steps' weights
        # untouched, so the run trained on fewer items than --iters says
        console.print(f"[yellow]warning[/]: {summary.skipped} of {summary.step} steps had a non-finite loss or "
                      "gradient and were skipped (no update); their items (stream positions, scenes) are in "
                      f"{summary.run / SKIPPED_FILE}; `python scripts/gpu_nan_hunt.py STORE` says which tensor goes "
                      "non-finite")
    return summary


LOADER_BOUND = 0.5  # share of the step time the host waited for data past which a run is called loader-bound


def loader_bound_note(summary: TrainSummary, *, min_steps: int = 20) -> str | None:
    """A line saying the loader bounded the run, when the host waited for data more than `LOADER_BOUND` of the
    time after the first step (worker start-up left out), over at least `min_steps` steps; else None.

    Why: a loader-bound run looks like a slow GPU in its it/s alone. The e2e runs of 2026-12-05 on a host with
    slower CPUs waited 12.9 ms of 14.3 per step (docs/performance.md); the user should be told what to change."""
    if summary.timed_steps < min_steps or summary.timed_s <= 0:
        return None
    share = summary.data_wait_s / summary.timed_s
    if share <= LOADER_BOUND:
        return None
    per_step = summary.data_wait_s / summary.timed_steps * 1e3
    return (f"the data loader bounded this run: the training loop waited for data {share:.0%} of the time "
            f"({per_step:.1f} ms per step, {summary.num_workers} loader workers). More --num-workers (if cores are "
            f"free), or a store built with `snd precompute --images jpeg` (its frames are decoded on the GPU), "
            f"lowers the loader's cost per item")


def _verify_store(store: Path) -> None:
    """`--verify-store`: every checksum of the store before the first step (each rank checks it)."""
    from snd.cache.verify import verify_store

    rep = verify_store(store)
    if not rep.ok:
        shown = "\n  ".join(str(p) for p in rep.problems[:10]) + ("\n  ..." if len(rep.problems) > 10 else "")
        raise SndError(f"scaffold store {store} is corrupted ({len(rep.problems)} problem(s) in scene(s) "
                       f"{', '.join(rep.bad_scenes)}):\n  {shown}", path=store,
                       hint=f"snd cache verify {store} --fix, then rerun the same `snd precompute`")
    console.print(f"[green]verified[/] {store}: {rep.scenes} scenes, {rep.rows} rows checksummed, {rep.bytes / 1e6:.0f} MB read")

