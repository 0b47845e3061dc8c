"""Where stage one's operator build spends its GPU time: the batched builder at several chunk sizes.

Four synthetic 576x880 pairs, 3 targets each (12 jobs, 41x62 grids). Prints JSON lines: warm wall ms per
target for each `chunk`, then the top CUDA ops by device time of one chunk-12 build.
Usage (device): python3 scripts/gpu_profile_operator.py
"""
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from snd.splat.gaussians import PixelGaussians
from snd.splat.operator import build_operators
from snd.train.distiller import rigid_inverse
from snd.train.synthetic import synthetic_sample

dev = torch.device("cuda")
xs = [synthetic_sample(i, img_hw=(574, 868), scaffold_hw=(576, 880)) for i in range(4)]
gs = [PixelGaussians(x["means"], x["quats"], x["scales"], x["opacities"]).to(device=dev) for x in xs]
masks = torch.stack([x["ctx_masks"] for x in xs]).to(dev)
src = [i for i in range(4) for _ in range(3)]  # 3 targets per pair (the same camera: equal cost)
pair = torch.tensor(src, device=dev)
args = (gs, masks, torch.stack([xs[i]["tgt_mask"] for i in src]).to(dev), torch.stack([xs[i]["tgt_K"] for i in src]).to(dev),
        torch.stack([rigid_inverse(xs[i]["tgt_c2w"]) for i in src]).to(dev), pair, (41, 62), (41, 62))
for chunk in (1, 3, 6, 12):
    for _ in range(2):
        build_operators(*args, chunk=chunk)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(3):
        build_operators(*args, chunk=chunk)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / 3 * 1e3
    print(json.dumps({"chunk": chunk, "ms_per_target": ms / len(src), "ms_per_pair": ms / 4,
                      "peak_gib": torch.cuda.max_memory_allocated() / 2**30}))
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    build_operators(*args, chunk=12)
    torch.cuda.synchronize()
rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:15]
for e in rows:
    print(json.dumps({"op": e.key[:80], "device_ms": e.device_time_total / 1e3, "cpu_ms": e.cpu_time_total / 1e3,
                      "calls": e.count}))
