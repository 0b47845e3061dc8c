"""The experimental fused alpha + adjoint kernel (`snd.splat.fused`) against brute-force compositing.

Runs in Triton's interpreter on the CPU (a subprocess with TRITON_INTERPRET=1, read when the kernel is
defined); the reference walks every pixel's depth-sorted Gaussians with gsplat's rules, in float64.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def scene(seed: int, N: int, G: int, H: int, W: int, K: int):
    """N images of G random 2D Gaussians each (some with alpha below 1/255), every tile listing all of an image's
    Gaussians in depth order (a valid, if wasteful, tile list), a one-hot-like field Y and the same ids' depths."""
    g = torch.Generator().manual_seed(seed)
    means = torch.stack([torch.rand(N * G, generator=g) * W, torch.rand(N * G, generator=g) * H], 1)
    L = torch.randn(N * G, 2, 2, generator=g) * 2.0 + torch.eye(2) * 3.0
    cov = L @ L.transpose(1, 2) + 0.3 * torch.eye(2)
    inv = torch.linalg.inv(cov)
    conics = torch.stack([inv[:, 0, 0], inv[:, 0, 1], inv[:, 1, 1]], 1)
    opac = torch.rand(N * G, generator=g) * 0.98 + 0.01
    opac[::7] = 1e-3  # below 1/255 everywhere
    depth = torch.rand(N * G, generator=g)
    tiles = -(-H // 16) * -(-W // 16)
    ids, offsets = [], [0]
    for n in range(N):
        order = n * G + torch.argsort(depth[n * G:(n + 1) * G], stable=True)
        for _ in range(tiles):
            ids.append(order)
            offsets.append(offsets[-1] + G)
    labels = torch.randint(0, K, (N, H, W), generator=g)
    Y = torch.nn.functional.one_hot(labels, K).float() * (0.5 + torch.rand(N, 1, 1, K, generator=g))
    return means, conics, opac, torch.tensor(offsets), torch.cat(ids), Y


def reference(means, conics, opac, ids_per_image, Y):
    """Per pixel, front to back with gsplat's rules, in float64: (alpha [N,H,W], A [N*G, K])."""
    N, H, W, K = Y.shape
    A = torch.zeros(means.shape[0], K, dtype=torch.float64)
    alpha = torch.zeros(N, H, W, dtype=torch.float64)
    for n in range(N):
        order = ids_per_image[n]
        m, c, o = means[order].double(), conics[order].double(), opac[order].double()
        for y in range(H):
            for x in range(W):
                dx, dy = m[:, 0] - (x + 0.5), m[:, 1] - (y + 0.5)
                sig = 0.5 * (c[:, 0] * dx * dx + c[:, 2] * dy * dy) + c[:, 1] * dx * dy
                a = torch.clamp(o * torch.exp(-sig), max=0.999)
                T = 1.0
                for i in range(len(order)):
                    if sig[i] < 0 or a[i] < 1 / 255:
                        continue
                    nt = T * (1 - float(a[i]))
                    if nt <= 1e-4:
                        break
                    A[order[i]] += float(a[i]) * T * Y[n, y, x].double()
                    T = nt
                alpha[n, y, x] = 1 - T
    return alpha, A


CHECK = r"""
import sys, torch
sys.path.insert(0, {repo!r})
from tests.test_fused import scene
from snd.splat.fused import alpha_and_adjoint
means, conics, opac, offsets, ids, Y = scene(*{args})
alpha, A = alpha_and_adjoint(means, conics, opac, offsets, ids, Y, block_g={block_g})
torch.save({{"alpha": alpha, "A": A}}, {out!r})
"""


def test_fused_kernel_equals_brute_force_compositing(tmp_path, block_g=16):
    args = (0, 2, 100, 20, 36, 5)  # seed, N, G, H, W (tiles cut at the borders), K (padded to 16 inside)
    out = tmp_path / "fused.pt"
    code = CHECK.format(repo=str(REPO), args=args, block_g=block_g, out=str(out))
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(out)
    means, conics, opac, offsets, ids, Y = scene(*args)
    N = args[1]
    tiles = (offsets.numel() - 1) // N
    per_image = [ids[offsets[n * tiles]:offsets[n * tiles + 1]] for n in range(N)]  # each image's depth order
    ref_alpha, ref_A = reference(means, conics, opac, per_image, Y)
    # both regimes are present: pixels that stop at transmittance 1e-4 and pixels that stay see-through
    assert (ref_alpha > 1 - 1e-3).sum() > 50 and (ref_alpha < 0.5).sum() > 20
    torch.testing.assert_close(got["alpha"].double(), ref_alpha, atol=2e-5, rtol=0)
    torch.testing.assert_close(got["A"].double(), ref_A, atol=1e-4, rtol=1e-4)
    assert ref_A.abs().sum() > 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_kernel_matches_gsplats_forward_and_backward_on_the_gpu():
    """On CUDA (compiled, not interpreted): alpha and the adjoint of a procedural scaffold's render equal what
    `snd.splat.contrib` gets from gsplat's forward and backward kernels (float32: 1e-3 of the largest value)."""
    from snd.splat.contrib import contributions
    from snd.splat.fused import alpha_and_adjoint, gsplat_tiles
    from snd.splat.gaussians import PixelGaussians
    from snd.train.distiller import rigid_inverse
    from snd.train.synthetic import synthetic_sample

    dev = torch.device("cuda")
    x = synthetic_sample(0, img_hw=(126, 196), scaffold_hw=(96, 144))
    gs = [PixelGaussians(x["means"], x["quats"], x["scales"], x["opacities"]).to(device=dev)]
    H, W = 96, 144
    pair = torch.zeros(2, dtype=torch.long, device=dev)
    K = torch.stack([x["tgt_K"], x["ctx_K"][0]]).to(dev, torch.float32)
    w2c = torch.stack([rigid_inverse(x["tgt_c2w"]), rigid_inverse(x["ctx_c2w"][0])]).to(dev, torch.float32)
    labels = torch.randint(0, 6, (2, H, W), device=dev, generator=torch.Generator(device=dev).manual_seed(0))
    Y = torch.nn.functional.one_hot(labels, 6).float() / 100.0
    ref = contributions(gs, pair, K, w2c, H, W, backend="gsplat", adjoint=lambda alpha: Y)
    alpha, A = alpha_and_adjoint(*gsplat_tiles(gs, pair, K, w2c, H, W), Y)
    torch.testing.assert_close(alpha, ref.alpha, atol=1e-4, rtol=0)
    scale = ref.adjoint.abs().max()
    assert scale > 0
    torch.testing.assert_close(A.reshape(ref.adjoint.shape) / scale, ref.adjoint / scale, atol=1e-3, rtol=0)
