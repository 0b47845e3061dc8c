"""GPU probe: where target building spends its time, and where gsplat and the torch renderer differ.

Run on a CUDA machine with gsplat: `python scripts/gpu_probe_target.py`. Prints one JSON line per case.
"""
import json
import time

import torch

from snd.splat.inputs import SplatInput
from snd.splat.render import render_features
from snd.splat.target import target_features
from snd.splat.gaussians import PixelGaussians


def timed(fn, n=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) * 1e3)
    return sorted(ts)[len(ts) // 2]


def scaffold(H=576, W=880, dev="cuda"):
    g = torch.Generator(device="cpu").manual_seed(0)
    K = torch.tensor([[600.0, 0, W / 2 - 0.5], [0, 600.0, H / 2 - 0.5], [0, 0, 1]])
    depth = 2 + torch.rand(2, H, W, generator=g)
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    d = torch.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], torch.ones_like(u)], -1)
    means = d[None] * depth[..., None]
    means[1, ..., 0] += 0.2
    quats = torch.zeros(2, H, W, 4); quats[..., 0] = 1
    scales = (depth / 600.0 * 0.5)[..., None].expand(2, H, W, 3).contiguous()
    opac = torch.full((2, H, W), 0.9)
    masks = (torch.arange(H)[:, None] // 64 * 20 + torch.arange(W)[None] // 80).expand(2, H, W).contiguous()
    w2c = torch.eye(4); w2c[0, 3] = -0.1
    return PixelGaussians(means, quats, scales, opac).to(dev), masks.to(dev), K.to(dev), w2c.to(dev)


def main():
    dev = "cuda"
    gs, masks, K, w2c = scaffold()
    for C in (384, 768):
        feats = torch.randn(2, C, 41, 62, device=dev)
        for cc, rc in ((128, 32), (None, 32), (None, 128), (None, 256), (None, 512)):
            ms = timed(lambda: target_features(feats, gs, masks, masks[0], K, w2c, (41, 62), backend="gsplat",
                                               channel_chunk=cc, render_chunk=rc))
            print(json.dumps({"case": "target_features", "C": C, "channel_chunk": cc, "render_chunk": rc, "ms": round(ms, 2)}))
        from snd.splat.upsample import upsample_features
        ms = timed(lambda: upsample_features(feats, masks, mode="mask"))
        print(json.dumps({"case": "upsample_mask", "C": C, "ms": round(ms, 2)}))
        m, q, s, o = gs.flatten()
        f = torch.randn(m.shape[0], C, device=dev)
        for rc in (32, 128, 512):
            from snd.splat.render_gsplat import render_gsplat
            ms = timed(lambda: render_gsplat(SplatInput(m, q, s, o, K, w2c, 576, 880), f, channel_chunk=rc))
            print(json.dumps({"case": "render_gsplat", "C": C, "render_chunk": rc, "ms": round(ms, 2)}))
    # gsplat vs torch: where do they differ?
    torch.manual_seed(0)
    N, H, W = 4000, 60, 80
    means = torch.randn(N, 3, device=dev) * torch.tensor([1.0, 1.0, 0.3], device=dev) + torch.tensor([0, 0, 4.0], device=dev)
    quats = torch.nn.functional.normalize(torch.randn(N, 4, device=dev), dim=-1)
    scales = torch.rand(N, 3, device=dev) * 0.03 + 0.005
    opac = torch.rand(N, device=dev) * 0.9 + 0.05
    feats = torch.rand(N, 3, device=dev)
    K = torch.tensor([[70.0, 0, 39.5], [0, 70.0, 29.5], [0, 0, 1]], device=dev)
    w2c = torch.eye(4, device=dev)
    gi, ga = render_features(SplatInput(means, quats, scales, opac, K, w2c, H, W), feats, backend="gsplat")
    for shift in (0.0, 0.5, -0.5):
        K2 = K.clone(); K2[0, 2] += shift; K2[1, 2] += shift
        ti, ta = render_features(SplatInput(means, quats, scales, opac, K2, w2c, H, W), feats, backend="torch")
        d = (ga - ta).abs()
        bad = (d > 1e-3).nonzero()
        rec = {"case": "gsplat_vs_torch", "torch_K_shift": shift, "rel_feat": ((gi - ti).norm() / ti.norm()).item(),
               "alpha_max": d.max().item(), "n_bad_px": int(bad.shape[0]), "mean_alpha": ta.mean().item()}
        if bad.shape[0]:
            rec["bad_y_mod16"] = torch.bincount(bad[:, 0] % 16, minlength=16).tolist()
            rec["bad_x_mod16"] = torch.bincount(bad[:, 1] % 16, minlength=16).tolist()
            rec["bad_border"] = int(((bad[:, 0] == 0) | (bad[:, 0] == H - 1) | (bad[:, 1] == 0) | (bad[:, 1] == W - 1)).sum())
            rec["g_minus_t_mean_on_bad"] = (ga - ta)[bad[:, 0], bad[:, 1]].mean().item()
        print(json.dumps(rec))
    # same scene in float64 on the torch side
    ti, ta = render_features(SplatInput(means.double(), quats.double(), scales.double(), opac.double(), K.double(), w2c.double(), H, W), feats.double(), backend="torch")
    print(json.dumps({"case": "gsplat_vs_torch64", "rel_feat": ((gi.double() - ti).norm() / ti.norm()).item(), "alpha_max": (ga.double() - ta).abs().max().item()}))


if __name__ == "__main__":
    main()
