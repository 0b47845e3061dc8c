"""Which tensor of a distillation step first goes non-finite, item by item, on a scaffold store.

Why: the e2e run of 2026-12-05 (H100, docs/performance.md) skipped ~10 % of its steps for a non-finite loss or
gradient on a `snd precompute --source depth` store of fisheye procedural scenes, while the two in-memory bench
items never did. This pass runs the step's pieces eagerly (`StepRunner.teacher / targets / student`, no optimizer
update, so every item meets the same initial weights) and records, per item, the first of: stored operator
arrays, frames, teacher tokens, targets, loss, gradients that holds a NaN/inf. With `--amp both` it repeats the
pass in fp32, which separates bf16 arithmetic from the data.

Usage (GPU machine, repo root): python scripts/gpu_nan_hunt.py STORE [--items 300] [--amp both] [--out F.json]
Prints one JSON line per pass: counts per first-bad stage and the first bad items' stream positions and keys.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _finite(x) -> bool:
    return bool(torch.isfinite(x).all()) if torch.is_tensor(x) and x.is_floating_point() else True


def hunt(store: Path, items: int, amp: str, device: torch.device, model: str,
         hw: tuple[int, int] | None = None, workers: int = 4) -> dict:
    from snd.splat.target import target_features
    from snd.train.data import BatchIterator, DevicePrefetcher, select_views, shard_stream_factory, to_device
    from snd.train.distiller import Distiller, build_base_backbone
    from snd.pipeline.config import DistillConfig
    from snd.train.loop import input_sized
    from snd.train.step import StepRunner

    h, w = hw or (None, None)
    cfg = input_sized(DistillConfig(model=model, init="random", shards=store, device=str(device), amp=amp, compile="off",
                                    targets="auto", iters=items, num_workers=str(workers), img_height=h, img_width=w))
    torch.manual_seed(0)
    d = Distiller(cfg, build_base_backbone(cfg)).to(device).train()
    runner = StepRunner(d, cfg, device=device, target_fn=target_features)
    it = DevicePrefetcher(BatchIterator(shard_stream_factory(cfg), batch=1, start=0, rank=0, world_size=1,
                                        num_workers=workers, prefetch=2, pin_memory=False, seed=0), device)
    first_bad: dict[str, int] = {}
    examples: list[dict] = []
    for n in range(items):
        idx, batch = next(it)
        batch = select_views(to_device(batch, device), render_to_context=False)
        stage = None
        ops = {k: v for k, v in batch.items() if k.startswith("op_")}
        if not all(_finite(v) for v in ops.values()):
            stage = "stored_operators"
        elif not all(_finite(batch[k]) for k in ("ctx_images", "tgt_image")):
            stage = "frames"
        else:
            feats = runner.teacher(batch)
            if not _finite(feats):
                stage = "teacher_tokens"
            else:
                targets, valid = runner.targets(batch, feats)
                if not _finite(targets):
                    stage = "targets"
                else:
                    loss = runner.student(batch, targets, valid)
                    if not _finite(loss):
                        stage = "loss"
                    elif not all(_finite(p.grad) for p in runner.params if p.grad is not None):
                        stage = "gradients"
        for p in runner.params:
            p.grad = None
        if stage:
            first_bad[stage] = first_bad.get(stage, 0) + 1
            if len(examples) < 12:
                meta = {k: (v.tolist() if torch.is_tensor(v) and v.numel() < 8 else None) for k, v in batch.items()
                        if not k.startswith("op_") and not k.endswith("image") and not k.endswith("images")}
                examples.append({"position": idx, "stage": stage, **{k: v for k, v in meta.items() if v is not None}})
    return {"store": str(store), "amp": amp, "items": items, "bad": sum(first_bad.values()),
            "first_bad_stage": first_bad, "examples": examples}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", type=Path)
    ap.add_argument("--items", type=int, default=300)
    ap.add_argument("--amp", choices=["bf16", "fp32", "both"], default="both")
    ap.add_argument("--model", default="vit_small_patch14_dinov2")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--img-hw", type=int, nargs=2, help="backbone input (default: snd distill's for the model)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    res = [hunt(a.store, a.items, amp, torch.device(a.device), a.model, tuple(a.img_hw) if a.img_hw else None)
           for amp in (("bf16", "fp32") if a.amp == "both" else (a.amp,))]
    for r in res:
        print(json.dumps(r), flush=True)
    if a.out:
        a.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
