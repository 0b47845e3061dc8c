"""CPU figures of the batched operator builder quoted in docs/performance.md (not a GPU speed figure).

1. compositing weights of one 576x880 procedural target (`snd.splat.contrib`, torch plan);
2. seconds per target at 288x440 (9 targets of 3 pairs, 1 thread): the earlier one-target builder
   (tests/operator_reference.py) vs `build_operators` at chunk 1 and 9.
Usage: PYTHONPATH=$PWD python scripts/cpu_operator_batching.py   (~5 min on 2 cores; prints JSON lines)
"""
import json
import time

import torch

from snd.splat.contrib import contributions
from snd.splat.gaussians import PixelGaussians
from snd.splat.operator import build_operators
from snd.train.distiller import rigid_inverse
from snd.train.synthetic import synthetic_sample
from tests.operator_reference import reference_operator

torch.set_num_threads(1)
x = synthetic_sample(0, img_hw=(574, 868), scaffold_hw=(576, 880))
g = PixelGaussians(x["means"], x["quats"], x["scales"], x["opacities"])
c = contributions([g], torch.zeros(1, dtype=torch.long), x["tgt_K"][None], rigid_inverse(x["tgt_c2w"])[None], 576, 880,
                  backend="torch")
print(json.dumps({"scaffold": [576, 880], "entries_per_target": int(c.weight.numel()),
                  "per_pixel": c.weight.numel() / (576 * 880)}))

S, grid = (288, 440), (20, 31)
xs = [synthetic_sample(i, img_hw=(280, 434), scaffold_hw=S) for i in range(3)]
gs = [PixelGaussians(x["means"], x["quats"], x["scales"], x["opacities"]) for x in xs]
masks = torch.stack([x["ctx_masks"] for x in xs])
src = [i for i in range(3) for _ in range(3)]
tm = torch.stack([xs[i]["tgt_mask"] for i in src])
tK = torch.stack([xs[i]["tgt_K"] for i in src])
tw = torch.stack([rigid_inverse(xs[i]["tgt_c2w"]) for i in src])
t0 = time.perf_counter()
for n, i in enumerate(src):
    reference_operator(gs[i], masks[i], tm[n], tK[n], tw[n], grid, grid)
res = {"scaffold": list(S), "jobs": len(src), "threads": 1, "reference_s_per_target": (time.perf_counter() - t0) / len(src)}
for chunk in (1, len(src)):
    t0 = time.perf_counter()
    build_operators(gs, masks, tm, tK, tw, torch.tensor(src), grid, grid, chunk=chunk, backend="torch")
    res[f"batched_chunk{chunk}_s_per_target"] = (time.perf_counter() - t0) / len(src)
print(json.dumps(res))
