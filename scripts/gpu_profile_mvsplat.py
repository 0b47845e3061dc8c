"""Where MVSplat's device time goes at stage one's shape (issue 20: stage one at >= 30 pairs/s needs MVSplat faster).

`python scripts/gpu_profile_mvsplat.py [--batch 8] [--iters 5]` prints JSON lines:
  * `eager`: per-stage CUDA-event times of the bf16 channels-last network, uncompiled (snd.models.mvsplat.bench);
  * `compiled`: the compiled networks as stage one runs them (without the CUDA-graph replay, so the profiler
    sees each kernel), the top kernels by device time per batch and their sum by kind (cuDNN conv,
    attention, Triton pointwise / reduction, grid_sample, GEMM, copies);
  * `corr`: the plane-sweep correlation alone at the real shape: eager, compiled and snd's fused kernel;
  * `conv_padding`: convolutions whose channel counts are not multiples of 8, as they are and zero-padded.
`--corr-kernel on off` profiles the compiled networks with and without the fused correlation kernel.
Random weights: speed does not depend on them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

import torch


def _kind(name: str) -> str:
    n = name.lower()
    for key, kind in (("grid_sampler", "grid_sample"), ("flash", "attention"), ("fmha", "attention"),
                      ("attention", "attention"), ("triton_red", "triton_reduction"), ("triton_per", "triton_reduction"),
                      ("triton_poi", "triton_pointwise"), ("conv", "conv"), ("xmma", "conv"), ("implicit", "conv"),
                      ("cudnn", "conv"), ("gemm", "gemm"), ("cutlass", "gemm"), ("memcpy", "copy"), ("memset", "copy"),
                      ("elementwise", "aten_elementwise"), ("reduce", "aten_reduce")):
        if key in n:
            return kind
    return "other"


def _inputs(B: int, H: int, W: int, dev: torch.device):
    images = torch.rand(B, 2, 3, H, W, device=dev)
    K = torch.tensor([[0.9, 0.0, 0.5], [0.0, 1.4, 0.5], [0.0, 0.0, 1.0]], device=dev).expand(B, 2, 3, 3).contiguous()
    c2w = torch.eye(4, device=dev).repeat(B, 2, 1, 1)
    c2w[:, 1, 0, 3] = 0.3
    return images, K, c2w, torch.ones(B, 2, device=dev), torch.full((B, 2), 100.0, device=dev)


def _time(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def compiled_profile(B: int, H: int, W: int, iters: int, corr_kernel: bool) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from snd.models.mvsplat.encoder import MVSplatEncoder
    dev = torch.device("cuda")
    torch.manual_seed(0)
    enc = MVSplatEncoder("scannetpp", corr_kernel=corr_kernel).to(dev).eval().requires_grad_(False).use_channels_last(True)
    enc.compile_networks(dynamic=False)
    args = _inputs(B, H, W, dev)
    t = time.perf_counter()
    for _ in range(3):
        enc(*args, precision="bf16")
    torch.cuda.synchronize()
    warm = time.perf_counter() - t
    torch.backends.cudnn.benchmark = False  # stage one's setting
    for _ in range(2):
        enc(*args, precision="bf16")
    ms_heuristic = _time(lambda: enc(*args, precision="bf16"), iters)
    torch.backends.cudnn.benchmark = True
    for _ in range(2):
        enc(*args, precision="bf16")
    ms = _time(lambda: enc(*args, precision="bf16"), iters)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            enc(*args, precision="bf16")
        torch.cuda.synchronize()
    per = defaultdict(float)
    count = defaultdict(int)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name] += e.device_time / 1000 / iters  # us -> ms per batch
            count[e.name] += 1
    kinds = defaultdict(float)
    for n, v in per.items():
        kinds[_kind(n)] += v
    top = sorted(per.items(), key=lambda kv: -kv[1])[:40]
    return {"what": "compiled", "corr_kernel": corr_kernel, "batch_pairs": B, "ms_per_batch": round(ms, 2), "ms_per_pair": round(ms / B, 2),
            "ms_per_batch_cudnn_heuristics": round(ms_heuristic, 2), "warmup_s": round(warm, 1), "kernel_ms_per_batch": round(sum(per.values()), 2),
            "kinds_ms_per_batch": {k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top": [[n[:160], round(v, 3), count[n] // iters] for n, v in top]}


def corr_alone(B: int, H: int, W: int, iters: int) -> dict:
    from snd.models.mvsplat.depth import plane_sweep_correlation, plane_sweep_grids
    dev = torch.device("cuda")
    h, w = H // 4, W // 4
    feats = torch.randn(B, 2, 128, h, w, device=dev, dtype=torch.bfloat16)
    _, K, c2w, near, far = _inputs(B, H, W, dev)
    eager = _time(lambda: plane_sweep_correlation(feats, K, c2w, near, far, 128), iters)
    comp = torch.compile(plane_sweep_correlation, dynamic=False)
    for _ in range(2):
        comp(feats, K, c2w, near, far, 128)
    compiled = _time(lambda: comp(feats, K, c2w, near, far, 128), iters)
    kernel = _time(lambda: plane_sweep_correlation(feats, K, c2w, near, far, 128, kernel=True), iters)
    a = plane_sweep_correlation(feats, K, c2w, near, far, 128)[0]
    b = comp(feats, K, c2w, near, far, 128)[0]
    k = plane_sweep_correlation(feats, K, c2w, near, far, 128, kernel=True)[0]
    # the kernel alone at other launch shapes (pixels per program x warps), on the sweep's own grid
    from snd.models.mvsplat import corr_kernel
    grid = plane_sweep_grids(K, c2w, near, far, 128, h, w)[0]
    f = feats.reshape(2 * B, 128, h, w)
    ref = f.float().permute(0, 2, 3, 1).contiguous()
    src = f.reshape(B, 2, 128, h, w).flip(1).reshape(2 * B, 128, h, w).float().permute(0, 2, 3, 1).contiguous()
    out = torch.empty(2 * B, 128, h, w, device=dev)
    shapes = {}
    for blk in (16, 32, 64):
        for nw in (2, 4, 8):
            run = lambda blk=blk, nw=nw: corr_kernel.launch(corr_kernel._corr_kernel, ref, src, grid, out,  # noqa: E731
                                                            block=blk, num_warps=nw)
            run()
            shapes[f"{blk}x{nw}"] = round(_time(run, iters), 2)
            assert float((out - a).abs().max()) <= 1e-5 * float(a.abs().max()), (blk, nw)
    return {"what": "corr", "batch_pairs": B, "eager_ms_per_batch": round(eager, 2), "compiled_ms_per_batch": round(compiled, 2),
            "kernel_ms_per_batch": round(kernel, 2), "kernel_alone_ms_per_batch_by_block_x_warps": shapes,
            "max_abs_diff_compiled": float((a - b).abs().max()), "max_abs_diff_kernel": float((a - k).abs().max()),
            "max_abs": float(a.abs().max())}


def conv_padding(B: int, H: int, W: int, iters: int) -> dict:
    """cuDNN pads NHWC inputs whose channel count is not a multiple of 8 (nhwcAddPaddingKernel in the profile):
    MVSplat's convolutions with such inputs, timed as they are and with zero channels added to input and weight."""
    dev = torch.device("cuda")
    N = 2 * B
    cases = {"stem 3->64 7x7/2": (3, 64, 7, 2, H, W), "refine_unet.0 37->32": (37, 32, 3, 1, H, W),
             "to_gaussians.0 163->168": (163, 168, 3, 1, H, W), "to_gaussians.2 168->9": (168, 9, 3, 1, H, W),
             "to_disparity.2 64->2": (64, 2, 3, 1, H, W)}
    out = {}
    for name, (cin, cout, k, stride, h, w) in cases.items():
        row = {}
        for label, pin, pout in (("as is", cin, cout), ("padded", -(-cin // 8) * 8, -(-cout // 8) * 8)):
            x = torch.randn(N, pin, h, w, device=dev, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
            wt = torch.randn(pout, pin, k, k, device=dev, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
            def f(x=x, wt=wt, stride=stride, k=k):
                return torch.nn.functional.conv2d(x, wt, None, stride, k // 2)
            for _ in range(3):
                f()
            row[label] = round(_time(f, iters), 3)
        out[name] = row
    return {"what": "conv_padding", "batch_pairs": B, "ms_per_batch": out}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--height", type=int, default=576)
    p.add_argument("--width", type=int, default=880)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--what", nargs="+", default=["eager", "corr", "conv_padding", "compiled"])
    p.add_argument("--corr-kernel", nargs="+", default=["on", "off"], choices=["on", "off"])
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    for what in a.what:
        if what == "eager":
            from snd.models.mvsplat.bench import benchmark
            r = {"what": "eager", **benchmark(batch=a.batch, height=a.height, width=a.width, iters=a.iters)}
        elif what == "corr":
            r = corr_alone(a.batch, a.height, a.width, a.iters)
        elif what == "conv_padding":
            r = conv_padding(a.batch, a.height, a.width, a.iters)
        else:
            for ck in a.corr_kernel:
                print(json.dumps(compiled_profile(a.batch, a.height, a.width, a.iters, ck == "on")), flush=True)
            continue
        print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
