"""`snd demo`: the whole pipeline, for real, on procedural scenes with small random-init models.

The evaluation uses the fast protocol (`snd.eval.protocol`) and says so: the demo shows the pipeline
runs, not numbers to set beside the paper's.

Why: nobody can download ScanNet++, DINOv2 or MVSplat on a laptop or in CI, but every stage should still
run end to end — same code paths, same file formats — in a few minutes on two CPU cores.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.panel import Panel

from snd.pipeline.config import DistillConfig, EvalConfig, PrecomputeConfig, SynthConfig

console = Console(stderr=True)

# Demo sizes: small enough for 2 CPU cores, large enough that the probes have something to learn.
DEMO_HW = (112, 168)  # scaffold / image size (8 x 12 patches of 14)
DEMO_MODEL = "snd_test_vit_patch14"


@dataclass
class DemoPaths:
    data: Path
    cache: Path
    run: Path
    eval: Path


def demo_configs(out: Path, *, scenes: int, iters: int, seed: int) -> tuple[SynthConfig, PrecomputeConfig, DistillConfig, EvalConfig]:
    """The four stage configs of the demo (exposed so tests run exactly what the demo runs)."""
    h, w = DEMO_HW
    synth = SynthConfig(out=out / "data" / "synth", scenes=scenes, frames=24, height=h, width=w, objects=5, seed=seed)
    pre = PrecomputeConfig(data=synth.out, out=out / "cache", source="depth", height=h, width=w,
                           pairs_per_scene=8, targets_per_pair=2, device="cpu", seed=seed)
    dist = DistillConfig(shards=pre.out, run=out / "runs" / "demo", model=DEMO_MODEL, init="random",
                         img_height=h, img_width=w, head_hidden=256, head_bottleneck=64, head_prototypes=1024,
                         lr=1e-3, iters=iters, num_workers=0, log_every=5, ckpt_every=max(iters // 2, 1),
                         device="cpu", seed=seed)
    ev = EvalConfig(model=str(dist.run), init="random", baseline=DEMO_MODEL, data_root=out / "data",
                    datasets=["synth"], out=out / "eval", img_height=h, img_width=w, iters=200, batch=4,
                    lr_scale=10.0, device="cpu", seed=seed, protocol="fast")
    return synth, pre, dist, ev


def run_demo(out: Path, *, scenes: int = 3, iters: int = 40, seed: int = 0) -> DemoPaths:
    """synth -> precompute (depth scaffolds) -> distill (tiny ViT) -> eval all (vs the untrained init)."""
    from snd.data.synth import generate_dataset
    from snd.stages import distill, evaluate, precompute

    synth, pre, dist, ev = demo_configs(out, scenes=scenes, iters=iters, seed=seed)
    t0 = time.perf_counter()
    console.rule("[bold]1/4 procedural scenes")
    generate_dataset(synth, progress=True)
    console.rule("[bold]2/4 stage one: scaffolds -> Zarr shards")
    summary = precompute.run(pre)
    if summary.failed:
        raise RuntimeError(f"demo precompute failed on {summary.failed} scene(s)")
    console.rule("[bold]3/4 stage two: distillation")
    distill.run(dist)
    console.rule("[bold]4/4 evaluation: probes vs the untrained init (fast protocol: one cached pass, not the paper's)")
    evaluate.run(ev, tasks=["depth", "normals", "seg", "corr"])
    paths = DemoPaths(data=synth.out, cache=pre.out, run=dist.run, eval=ev.out)
    console.print(Panel.fit(
        f"data     {paths.data}\ncache    {paths.cache}\nrun      {paths.run}\neval     {paths.eval}/results.md\n"
        f"time     {time.perf_counter() - t0:.0f} s",
        title="snd demo finished",
    ))
    return paths
