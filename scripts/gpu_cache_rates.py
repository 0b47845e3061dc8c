"""GPU diagnostic: token-cache and target-cache write rates by DataLoader workers x writer threads.

Run on the GPU machine: `python3 scripts/gpu_cache_rates.py` (JSON lines)."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from snd.bench.eval_measure import GeneratedImages
from snd.eval.features import ensure_features, load_eval_backbone
from snd.eval.targets import ensure_targets

HW = (476, 630)
work = Path(tempfile.mkdtemp())
net = load_eval_backbone("dinov2_vits14", init="random").cuda()
ensure_features(net, GeneratedImages(32, HW), cache_dir=work / "warm", dataset_name="w", split="t", img_hw=HW, batch=32,
                device="cuda", precision="tf32")
for workers in (0, 8):
    for writers in (1, 4):
        for n_img, what in ((384, "features"), (384, "targets")):
            tag = f"{what}-{workers}-{writers}"
            t0 = time.perf_counter()
            if what == "features":
                ensure_features(net, GeneratedImages(n_img, HW), cache_dir=work / tag, dataset_name="b", split="t", img_hw=HW,
                                batch=32, device="cuda", precision="tf32", num_workers=workers, writers=writers)
                torch.cuda.synchronize()
            else:
                ensure_targets(GeneratedImages(n_img, HW), list(range(n_img)), "depth", cache_dir=work / tag, dataset_name="b",
                               split="t", img_hw=HW, num_workers=workers, writers=writers)
            print(json.dumps({"what": what, "workers": workers, "writers": writers,
                              "img_s": round(n_img / (time.perf_counter() - t0), 1)}), flush=True)
# the forward alone on a device-resident batch, and with the batch coming from host float32 / uint8
x = torch.rand(32, 3, *HW)
from snd.eval.features import extract_tokens
for src in ("device", "host_f32", "host_u8"):
    xb = x.cuda() if src == "device" else (x.pin_memory() if src == "host_f32" else (x * 255).to(torch.uint8).pin_memory())
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(8):
        b = xb.cuda(non_blocking=True)
        b = b.float() / 255 if b.dtype == torch.uint8 else b
        tok = extract_tokens(net, b, "tf32").half().cpu()
    torch.cuda.synchronize()
    print(json.dumps({"what": "forward+copy", "src": src, "img_s": round(256 / (time.perf_counter() - t0), 1)}), flush=True)
