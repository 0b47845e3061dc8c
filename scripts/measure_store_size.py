"""MB per pair of `snd precompute` stores, split into scaffold / operators / frames, for each (source, operators,
frame codec) asked; JSON for docs/bench/store_size_*.json (read by `snd bench project`).

Why a script: sizes do not depend on the device, so they are measured where there is time (CPU, a few pairs)
on a dataset synthesised as the real one is read (`snd data synth --fisheye`: JPEG frames through the raw
OPENCV_FISHEYE layout at ScanNet++'s 584x876, so stage one decodes and undistorts every frame), with the stages
at their defaults (576x880 scaffold, 574x868 frames and operators). Frames are stored once per frame, so their
MB/pair depends on pairs per frame: the JSON also projects each run to the paper's sampler (180 pairs per scene
of ~611 frames, `snd.bench.project.frames_per_pair`).

Usage (repo root):
  snd data synth --out /tmp/d --scenes 1 --frames 24 --height 584 --width 876 --fisheye
  python -m snd.models.mvsplat.resave --random scannetpp /tmp/mv.safetensors
  python scripts/measure_store_size.py --data /tmp/d --work /tmp/w --pairs 4 --mvsplat-ckpt /tmp/mv.safetensors \
      --run depth:op:lossless --run mvsplat:noop:jpeg ... --out docs/bench/store_size_cpu.json
A store already complete in --work (same folder name) is reused: its run record gives the time.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def _run_record(store: Path) -> dict:
    runs = sorted((store / "_snd" / "runs").glob("*.json"))
    recs = [json.loads(p.read_text()) for p in runs if not p.name.startswith(".")]
    done = [r for r in recs if r.get("scenes_done")]
    return done[0] if done else (recs[0] if recs else {})


def measure(tag: str, args: argparse.Namespace) -> dict:
    from snd.bench.project import frames_per_pair
    from snd.cache.info import cache_info
    from snd.pipeline.config import PrecomputeConfig as P

    source, op, images = tag.split(":")
    store = Path(args.work) / f"c_{source}_{op}_{images}"
    cmd = [sys.executable, "-m", "snd.cli", "precompute", "--data", str(args.data), "--split", "all", "--out", str(store),
           "--source", source, "--images", images, "--pairs-per-scene", str(args.pairs), "--device", args.device,
           *(["--no-operator"] if op == "noop" else []),
           *(["--mvsplat-ckpt", str(args.mvsplat_ckpt)] if source == "mvsplat" else [])]
    if not (store / "_snd" / "markers").is_dir() or not any((store / "_snd" / "markers").glob("*.json")):
        print("running", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    info = cache_info(store)
    rec = _run_record(store)
    sp = info["split"]
    targets = info["targets"]
    fpp = frames_per_pair(args.frames_per_scene, pairs_per_scene=P.pairs_per_scene, targets_per_pair=P.targets_per_pair,
                          gap_min=P.gap_min, gap_max=P.gap_max)
    mb = sp["mb_per_pair"]
    paper = mb["scaffold"] + mb["operators"] + (sp["mb_per_frame"] or 0.0) * fpp
    return {
        "tag": tag, "source": source, "operator": op == "op", "images": images,
        "store": store.name,  # the folder under --work: a machine's absolute path means nothing in docs/bench
        "pairs": info["pairs"], "targets": targets, "frames": info["frames"], "mb_per_pair": info["mb_per_pair"],
        "split": sp, "arrays_mb_per_pair": {k: a["mb_per_pair"] for k, a in info["arrays"].items()},
        "seconds": rec.get("seconds"), "phase_s": rec.get("phase_s"),
        "operator_s_per_target": (rec.get("phase_s") or {}).get("operators", 0.0) / targets if op == "op" and targets else None,
        "paper_sampler": {"frames_per_pair": fpp, "mb_per_pair": paper, "gb_at_50k_pairs": paper * 50,
                          "goal_mb_per_pair": 8.0, "goal_met": paper <= 8.0},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--pairs", type=int, default=4, help="pairs per scene of each run")
    ap.add_argument("--run", action="append", required=True, help="source:op|noop:lossless|jpeg (repeat)")
    ap.add_argument("--mvsplat-ckpt", type=Path, help="random-init weights (python -m snd.models.mvsplat.resave --random)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--frames-per-scene", type=int, default=611, help="the paper-scale scenes' frames (ScanNet++ mean)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import torch

    cams = []
    for t in sorted(Path(args.data).glob("data/*/dslr/nerfstudio/transforms.json")):  # the raw layout's cameras
        c = json.loads(t.read_text())
        cams.append({k: c.get(k) for k in ("camera_model", "w", "h")} | {"frames": len(c.get("frames", [])) + len(c.get("test_frames", []))})
    res = {"device": args.device if args.device == "cpu" else torch.cuda.get_device_name(0), "torch": torch.__version__,
           "data": {"root": Path(args.data).name, "scenes": cams},  # the folder name only (as "store")
           "note": "MVSplat is random-init: a trained one's fields (depth, scales, opacity) compress differently; "
                   "procedural frames compress better losslessly than photos (docs/cache-format.md)",
           "runs": [measure(t, args) for t in args.run]}
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
