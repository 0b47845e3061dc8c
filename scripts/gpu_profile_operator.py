"""Where stage one's operator build spends its GPU time (one synthetic 576x880 pair, 41x62 grids).

Prints JSON lines: wall ms per build (gsplat contributions), and the top CUDA ops by device time.
Usage (device): python3 scripts/gpu_profile_operator.py
"""
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from snd.splat.gaussians import PixelGaussians
from snd.splat.operator import build_operator
from snd.train.distiller import rigid_inverse
from snd.train.synthetic import synthetic_sample

dev = torch.device("cuda")
x = synthetic_sample(1, img_hw=(574, 868), scaffold_hw=(576, 880))
g = PixelGaussians(x["means"], x["quats"], x["scales"], x["opacities"]).to(device=dev)
args = (g, x["ctx_masks"].to(dev), x["tgt_mask"].to(dev), x["tgt_K"].to(dev), rigid_inverse(x["tgt_c2w"]).to(dev),
        (41, 62), (41, 62))
for _ in range(2):
    build_operator(*args)
torch.cuda.synchronize()
t0 = time.perf_counter()
for _ in range(5):
    build_operator(*args)
torch.cuda.synchronize()
print(json.dumps({"build_ms": (time.perf_counter() - t0) / 5 * 1e3}))
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    build_operator(*args)
    torch.cuda.synchronize()
rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:15]
for e in rows:
    print(json.dumps({"op": e.key[:80], "device_ms": e.device_time_total / 1e3, "cpu_ms": e.cpu_time_total / 1e3,
                      "calls": e.count}))
