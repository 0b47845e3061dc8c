"""Where stage one's operator build spends its GPU time, and what one plain render of the same targets costs.

Four 576x880 pairs, 3 targets each (12 jobs, 41x62 grids): synthetic (`snd.train.synthetic`, depth-like
Gaussians) or, with ``--store DIR``, the first four pairs of a stage-one store (e.g. the random-init MVSplat
scaffold of `snd bench precompute --source mvsplat --workdir W`, DIR = W/cache), decoded as stage two reads them.
Prints JSON lines: warm wall ms per target of the batched builder for each `chunk`; the "render floor": ms per
target of gsplat's plain forward `rasterization` (3 channels, the same 12 cameras, one call per pair), which
any construction of an exact operator must at least match (it visits every (pixel, Gaussian) pair of the
target); then the top CUDA kernels and the top torch ops by device time of one build (``--profile-chunk``, 12).
(An experimental fused Triton alpha + adjoint kernel was timed here against gsplat's forward + backward on
2026-12-05 and removed: slower at every setting, docs/performance.md.)
``--builder FILE`` times another version of `snd/splat/operator_build.py` (e.g. `git show REV:snd/splat/operator_build.py`)
on the same inputs, for an A/B in one device call; ``--quick`` leaves out the render floor and the kernel profile;
``--adjoint on`` builds the instance part with snd's slot kernel and ``--direct on`` the direct part with snd's
direct-rows kernel (`snd.splat.kernels`) instead of gsplat's backward kernel / the torch glue; ``--ab off/off on/on
...`` (slot/direct per config) times chunk 12 under each config in turn, ``--rounds`` times, in this one process;
with ``--direct on`` the kernel's rows are also checked against the glue's at chunk 12 (``direct_check``).
Usage (device): python3 scripts/gpu_profile_operator.py [--store DIR] [--tag NAME] [--builder FILE] [--chunks 8] [--quick]
[--adjoint on|off] [--direct on|off] [--ab off/off on/off off/on on/on --rounds 2]
"""
import argparse
import json
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from snd.splat.gaussians import PixelGaussians
from snd.splat.operator import build_operators
from snd.train.distiller import rigid_inverse

ap = argparse.ArgumentParser()
ap.add_argument("--store", default=None)
ap.add_argument("--tag", default="synthetic")
ap.add_argument("--builder", default=None)
ap.add_argument("--chunks", type=int, nargs="+", default=[1, 3, 6, 8, 12])
ap.add_argument("--quick", action="store_true")
ap.add_argument("--adjoint", choices=["on", "off"], default="on")
ap.add_argument("--direct", choices=["on", "off"], default="on")
ap.add_argument("--ab", nargs="*", default=[])
ap.add_argument("--rounds", type=int, default=2)
ap.add_argument("--profile-chunk", type=int, default=12, help="the chunk of the profiled build (stage one's: 24)")
a = ap.parse_args()
from snd.splat import kernels  # noqa: E402

kernels.USE.update(slot=a.adjoint, direct=a.direct)
if a.builder:  # another version of the builder module, loaded under its own name
    from gpu_precompute_ab import builder_module  # this script's folder is on sys.path

    build_operators = builder_module(a.builder).build_operators  # noqa: F811
dev = torch.device("cuda")
if a.store:
    from snd.cache.reader import CacheReader

    r = CacheReader(a.store)
    ps = [r.scene(r.scenes[0]).pair(i) for i in range(4)]
    gs = [PixelGaussians(p.means, p.quats, p.scales, p.opacities).to(device=dev) for p in ps]
    masks = torch.stack([p.ctx_masks for p in ps]).to(dev)
    tgt = [(p.tgt_masks[t], p.tgt_K[t], p.tgt_c2w[t]) for p in ps for t in range(3)]
    H, W = ps[0].means.shape[1:3]
else:
    from snd.train.synthetic import synthetic_sample

    xs = [synthetic_sample(i, img_hw=(574, 868), scaffold_hw=(576, 880)) for i in range(4)]
    gs = [PixelGaussians(x["means"], x["quats"], x["scales"], x["opacities"]).to(device=dev) for x in xs]
    masks = torch.stack([x["ctx_masks"] for x in xs]).to(dev)
    tgt = [(xs[i]["tgt_mask"], xs[i]["tgt_K"], xs[i]["tgt_c2w"]) for i in range(4) for _ in range(3)]  # same camera
    H, W = 576, 880
src = [i for i in range(4) for _ in range(3)]
pair = torch.tensor(src, device=dev)
tK = torch.stack([t[1] for t in tgt]).to(dev, torch.float32)
tw2c = torch.stack([rigid_inverse(t[2].float()) for t in tgt]).to(dev)
args = (gs, masks, torch.stack([t[0] for t in tgt]).to(dev), tK, tw2c, pair, (41, 62), (41, 62))


def timed(fn, reps=3):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


for chunk in a.chunks:
    ms = timed(lambda: build_operators(*args, chunk=chunk))
    print(json.dumps({"tag": a.tag, "adjoint": kernels.USE["slot"], "direct": kernels.USE["direct"], "chunk": chunk,
                      "ms_per_target": ms / len(src), "ms_per_pair": ms / 4,
                      "peak_gib": torch.cuda.max_memory_allocated() / 2**30}), flush=True)

for r in range(a.rounds if a.ab else 0):  # the configs alternate, so drift of the machine hits them alike
    for cfg in a.ab:
        slot_on, direct_on = cfg.split("/")
        kernels.USE.update(slot=slot_on, direct=direct_on)
        ms = timed(lambda: build_operators(*args, chunk=12))
        print(json.dumps({"tag": a.tag, "round": r, "adjoint": slot_on, "direct": direct_on, "chunk": 12,
                          "ms_per_target": ms / len(src), "peak_gib": torch.cuda.max_memory_allocated() / 2**30}),
              flush=True)
kernels.USE.update(slot=a.adjoint, direct=a.direct)
if a.direct == "on":  # the kernel's rows against the torch glue's, same inputs, chunk 12
    from snd.splat.operator import apply_operator  # noqa: E402

    got = build_operators(*args, chunk=12)
    kernels.USE["direct"] = "off"
    ref = build_operators(*args, chunk=12)
    kernels.USE["direct"] = "on"
    feats = torch.randn(len(src), 2, 64, 41, 62, device=dev)
    x, vx = apply_operator(got, feats, (41, 62))
    y, vy = apply_operator(ref, feats, (41, 62))
    print(json.dumps({"tag": a.tag, "direct_check": {
        "cols_equal_share": (got.cols == ref.cols).float().mean().item(),
        "vals_max_abs_diff": (got.vals - ref.vals).abs().max().item(),
        "max_row_nnz_equal": bool(torch.equal(got.max_row_nnz, ref.max_row_nnz)),
        "max_row_nnz": ref.max_row_nnz.tolist(),
        "dropped_direct": ref.dropped_direct.tolist(),
        "dropped_direct_max_diff": (got.dropped_direct - ref.dropped_direct).abs().max().item(),
        "targets_rel_diff": ((x - y).norm() / y.norm()).item(), "valid_equal": bool(torch.equal(vx, vy))}}), flush=True)
if a.quick:
    raise SystemExit(0)
from gsplat import rasterization  # noqa: E402


def render_all():
    for i, g in enumerate(gs):
        f = g.flatten()
        sel = slice(3 * i, 3 * i + 3)
        n = f[0].shape[0]
        rasterization(f[0].float(), f[1].float(), f[2].float(), f[3].float(), torch.ones(n, 3, device=dev),
                      tw2c[sel], tK[sel], W, H, packed=False)


ms = timed(render_all)
f = gs[0].flatten()
print(json.dumps({"tag": a.tag, "render_floor_ms_per_target": ms / len(src), "gaussians_per_pair": int(f[0].shape[0]),
                  "what": "gsplat.rasterization forward, 3 channels, 3 cameras per call"}), flush=True)
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    build_operators(*args, chunk=a.profile_chunk)
    torch.cuda.synchronize()
avg = prof.key_averages()
# kernels (device events) apart from the torch ops that launch them: an op's device time includes its kernels'
kern = [e for e in avg if e.device_type == DeviceType.CUDA]
ops = [e for e in avg if e.device_type != DeviceType.CUDA]
print(json.dumps({"tag": a.tag, "chunk": a.profile_chunk,
                  "kernels_device_ms": round(sum(e.device_time_total for e in kern) / 1e3, 3),
                  "kernel_launches": sum(e.count for e in kern)}))
for kind, rows in (("kernel", kern), ("op", ops)):
    for e in sorted(rows, key=lambda e: -e.device_time_total)[:20]:
        print(json.dumps({"tag": a.tag, kind: e.key[:100], "device_ms": round(e.device_time_total / 1e3, 3),
                          "cpu_ms": round(e.cpu_time_total / 1e3, 3), "calls": e.count}))
