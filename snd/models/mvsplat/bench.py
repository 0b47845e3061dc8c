"""`python -m snd.models.mvsplat.bench`: MVSplat encoder throughput (random weights) with a per-module
breakdown, for choosing batch size / precision / channels_last / torch.compile on a GPU.

Prints one JSON line: pairs/s, ms per batch, peak memory and the median ms of each top-level stage
(the cost volume is what remains of the depth predictor besides its networks).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from .encoder import MVSplatEncoder

STAGES = {
    "cnn": "backbone.backbone",
    "transformer": "backbone.transformer",
    "costvolume_unet": "depth_predictor.corr_refine_net",  # incl. its in/out convs
    "depth_head": "depth_predictor.depth_head_lowres",
    "upsampler": "depth_predictor.upsampler",
    # the U-Net proper: on CUDA the refinement's first convolution and `to_gaussians.0` run as `depth.conv_aligned`
    # (zero-padded channels, not a module call), so they count in "other"
    "refine_unet": "depth_predictor.refine_unet.3",
    "to_disparity": "depth_predictor.to_disparity",
}


def benchmark(config: str = "scannetpp", *, batch: int = 4, height: int = 576, width: int = 880,
              precision: str = "bf16", channels_last: bool = True, compile: bool = False, iters: int = 10,
              warmup: int = 3, breakdown: bool = True, device: str = "cuda") -> dict:
    dev = torch.device(device)
    torch.manual_seed(0)
    enc = MVSplatEncoder(config).to(dev).eval().requires_grad_(False)
    if channels_last:
        enc.use_channels_last(True)
    if compile:
        enc.compile_networks(dynamic=False)
    B = batch
    images = torch.rand(B, 2, 3, height, width, device=dev)
    K = torch.tensor([[0.9, 0.0, 0.5], [0.0, 1.4, 0.5], [0.0, 0.0, 1.0]], device=dev).expand(B, 2, 3, 3).contiguous()
    c2w = torch.eye(4, device=dev).repeat(B, 2, 1, 1)
    c2w[:, 1, 0, 3] = 0.3
    near, far = torch.ones(B, 2, device=dev), torch.full((B, 2), 100.0, device=dev)
    cuda = dev.type == "cuda"

    events: dict[str, list] = {k: [] for k in STAGES}
    handles = []
    if breakdown and cuda and not compile:
        for name, path in STAGES.items():
            mod = enc.get_submodule(path)

            def pre(_m, _i, name=name):
                e = torch.cuda.Event(enable_timing=True)
                e.record()
                events[name].append([e, None])

            def post(_m, _i, _o, name=name):
                e = torch.cuda.Event(enable_timing=True)
                e.record()
                events[name][-1][1] = e

            handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]

    def step():
        return enc(images, K, c2w, near, far, precision=precision)

    t_compile = time.perf_counter()
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    t_compile = time.perf_counter() - t_compile
    for v in events.values():
        v.clear()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    for h in handles:
        h.remove()
    ms = statistics.median(times) * 1000
    out = {
        "config": config, "batch_pairs": B, "height": height, "width": width, "precision": precision,
        "channels_last": channels_last, "compile": compile, "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "ms_per_batch": round(ms, 2), "ms_per_pair": round(ms / B, 2), "pairs_per_s": round(1000 * B / ms, 2),
        "warmup_s": round(t_compile, 1),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if cuda else None,
    }
    if any(events.values()):
        stage = {k: round(statistics.median(a.elapsed_time(b) for a, b in v), 2) for k, v in events.items() if v}
        stage["other(costvolume,adapter,...)"] = round(ms - sum(stage.values()), 2)
        out["stage_ms_per_batch"] = stage
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="scannetpp", choices=["scannetpp", "re10k"])
    p.add_argument("--batch", type=int, nargs="+", default=[4])
    p.add_argument("--height", type=int, default=576)
    p.add_argument("--width", type=int, default=880)
    p.add_argument("--precision", nargs="+", default=["bf16"], choices=["fp32", "bf16", "fp16"])
    p.add_argument("--channels-last", type=int, nargs="+", default=[1], choices=[0, 1])
    p.add_argument("--compile", type=int, nargs="+", default=[0], choices=[0, 1])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--tf32", type=int, default=1, help="allow TF32 for fp32 matmuls/convs")
    p.add_argument("--device", default="cuda")
    a = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(a.tf32)
    torch.backends.cudnn.benchmark = True
    for comp in a.compile:
        for prec in a.precision:
            for cl in a.channels_last:
                for b in a.batch:
                    try:
                        r = benchmark(a.config, batch=b, height=a.height, width=a.width, precision=prec,
                                      channels_last=bool(cl), compile=bool(comp), iters=a.iters, device=a.device)
                    except torch.OutOfMemoryError:
                        r = {"batch_pairs": b, "precision": prec, "channels_last": cl, "compile": comp, "error": "OOM"}
                        torch.cuda.empty_cache()
                    print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
