"""Experimental: alpha and the one-hot instance adjoint of a batch of renders in one front-to-back pass (Triton).

Why: the operator builder gets the instance part from gsplat's backward kernel, which also computes the
means', conics' and opacities' gradients and needs gsplat's forward pass first; on the stored random-init
MVSplat scaffold the two cost 36 of the builder's 113 ms per 12 targets on an H100, against 0.95 ms per target
for a plain render (docs/performance.md, "Why >= 30 pairs/s is out of reach of this builder"). The instance
part only needs sum_q w_qg Y[q] with w_qg = alpha_g(q) T_g(q), which a forward traversal already has at hand:
per tile and block of Gaussians it is one [Gaussians x pixels] @ [pixels x labels] product.

Status: tested on the CPU in Triton's interpreter against a brute-force compositing reference
(`tests/test_fused.py`); NOT yet run on a GPU and NOT used by the builder. The next device session runs its
GPU test and times it against gsplat's pair of kernels before anything depends on it.

Semantics are gsplat's ``rasterize_to_pixels_3dgs`` (pixel centres at +0.5; sigma < 0 or alpha < 1/255 skip a
Gaussian; alpha <= 0.999; a pixel stops before the Gaussian that would take its transmittance to <= 1e-4).
Within a block the transmittance is a cumulative sum of log(1 - alpha) instead of gsplat's running product:
equal to float32 round-off, so a pixel whose transmittance lands within round-off of 1e-4 may stop one
Gaussian apart from gsplat (a weight below 1e-4).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["alpha_and_adjoint", "gsplat_tiles"]


@triton.jit
def _alpha_adjoint_kernel(means2d, conics, opac, offsets, flat_ids, Y, A, alpha_out, H, W, tiles_w, tiles_per_img,
                          K: tl.constexpr, TILE: tl.constexpr, BLOCK_G: tl.constexpr):
    pid = tl.program_id(0)  # one program per (image, tile)
    img = pid // tiles_per_img
    t = pid % tiles_per_img
    pix = tl.arange(0, TILE * TILE)
    py = (t // tiles_w) * TILE + pix // TILE
    px = (t % tiles_w) * TILE + pix % TILE
    inside = (py < H) & (px < W)
    fx = px.to(tl.float32) + 0.5
    fy = py.to(tl.float32) + 0.5
    q = (img * H + py) * W + px
    kk = tl.arange(0, K)
    y = tl.load(Y + q[:, None] * K + kk[None, :], mask=inside[:, None], other=0.0)  # [pixels, K]
    start = tl.load(offsets + pid)
    end = tl.load(offsets + pid + 1)
    T = tl.full([TILE * TILE], 1.0, tl.float32)
    done = ~inside
    b = start
    while (b < end) & (tl.sum(done.to(tl.int32), axis=0) < TILE * TILE):
        gi = b + tl.arange(0, BLOCK_G)
        gm = gi < end
        gid = tl.load(flat_ids + gi, mask=gm, other=0)
        mx = tl.load(means2d + gid * 2, mask=gm, other=0.0)
        my = tl.load(means2d + gid * 2 + 1, mask=gm, other=0.0)
        ca = tl.load(conics + gid * 3, mask=gm, other=0.0)
        cb = tl.load(conics + gid * 3 + 1, mask=gm, other=0.0)
        cc = tl.load(conics + gid * 3 + 2, mask=gm, other=0.0)
        o = tl.load(opac + gid, mask=gm, other=0.0)
        dx = mx[None, :] - fx[:, None]
        dy = my[None, :] - fy[:, None]
        sigma = 0.5 * (ca[None, :] * dx * dx + cc[None, :] * dy * dy) + cb[None, :] * dx * dy
        a = tl.minimum(0.999, o[None, :] * tl.exp(-sigma))
        va = (sigma >= 0) & (a >= 1.0 / 255.0) & gm[None, :] & (done == 0)[:, None]
        a = tl.where(va, a, 0.0)
        l1m = tl.log(1.0 - a)
        t_after = T[:, None] * tl.exp(tl.cumsum(l1m, axis=1))
        ok = va & (t_after > 1e-4)
        w = tl.where(ok, a * t_after / (1.0 - a), 0.0)  # alpha * T before the Gaussian
        T = T * tl.exp(tl.sum(tl.where(ok, l1m, 0.0), axis=1))
        done = done | (tl.sum((va & (t_after <= 1e-4)).to(tl.int32), axis=1) > 0)
        acc = tl.dot(tl.trans(w), y, input_precision="ieee")  # [BLOCK_G, K]: sum over the tile's pixels
        tl.atomic_add(A + gid[:, None] * K + kk[None, :], acc, mask=gm[:, None])
        b += BLOCK_G
    tl.store(alpha_out + q, 1.0 - T, mask=inside)


def alpha_and_adjoint(means2d: Tensor, conics: Tensor, opacities: Tensor, offsets: Tensor, flat_ids: Tensor,
                      Y: Tensor, *, tile: int = 16, block_g: int = 32) -> tuple[Tensor, Tensor]:
    """Alpha [N, H, W] and the adjoint [N * G, K] of N renders, each over its tiles' depth-sorted lists.

    Args:
        means2d [N * G, 2], conics [N * G, 3] (a, b, c of the inverse 2D covariance), opacities [N * G]: float32,
            projected as by gsplat's `fully_fused_projection` (batch-flat Gaussian ids).
        offsets [N * th * tw + 1] int: where each tile's list starts in `flat_ids` (gsplat's `isect_offset_encode`
            flattened, plus the total); flat_ids [M] int: batch-flat Gaussian ids, depth-sorted within a tile.
        Y [N, H, W, K] float32: the field pulled back (K is padded to a power of two >= 16 here).
    Returns (alpha, A) with A[g, k] = sum over pixels q of w_qg * Y[q, k].
    """
    N, H, W, K = Y.shape
    Kp = max(16, 1 << max(K - 1, 0).bit_length())
    Yp = torch.nn.functional.pad(Y.float(), (0, Kp - K)).contiguous()
    th, tw = -(-H // tile), -(-W // tile)
    assert offsets.numel() == N * th * tw + 1, (offsets.numel(), N, th, tw)
    A = torch.zeros(means2d.shape[0], Kp, dtype=torch.float32, device=Y.device)
    alpha = torch.zeros(N, H, W, dtype=torch.float32, device=Y.device)
    _alpha_adjoint_kernel[(N * th * tw,)](
        means2d.float().contiguous(), conics.float().contiguous(), opacities.float().contiguous(),
        offsets.to(torch.int64).contiguous(), flat_ids.to(torch.int64).contiguous(), Yp, A, alpha, H, W, tw, th * tw,
        K=Kp, TILE=tile, BLOCK_G=block_g)
    return alpha, A[:, :K]


def gsplat_tiles(gaussians, pair: Tensor, K: Tensor, w2c: Tensor, height: int, width: int, *, near: float = 0.01,
                 far: float = 1e10, tile: int = 16) -> tuple[Tensor, ...]:
    """gsplat's projection and depth-sorted tile lists of N jobs (job n draws ``gaussians[pair[n]]`` into camera
    K[n], w2c[n]), set up as `snd.splat.contrib` sets them up, flattened for `alpha_and_adjoint`:
    (means2d [N*G, 2], conics [N*G, 3], opacities [N*G], offsets [N*th*tw + 1], flat_ids [M]). CUDA only."""
    import math

    from gsplat.cuda._wrapper import fully_fused_projection, isect_offset_encode, isect_tiles

    from snd.splat.contrib import _job_scenes
    from snd.splat.render_gsplat import gsplat_K

    dev = gaussians[0].means.device
    means, quats, scales, opac = _job_scenes(gaussians, pair)
    N = opac.shape[0]
    radii, means2d, depths, conics, _ = fully_fused_projection(
        means, None, quats, scales, w2c.to(dev, torch.float32)[:, None].contiguous(), gsplat_K(K, dev)[:, None].contiguous(),
        width, height, eps2d=0.3, near_plane=near, far_plane=far, packed=False, opacities=opac)
    tw, th = math.ceil(width / tile), math.ceil(height / tile)
    _, isect_ids, flat_ids = isect_tiles(means2d, radii, depths, tile, tw, th, packed=False)
    offsets = isect_offset_encode(isect_ids, N, tw, th).reshape(-1)
    offsets = torch.cat([offsets, offsets.new_tensor([flat_ids.numel()])])
    return means2d.reshape(-1, 2), conics.reshape(-1, 3), opac.reshape(-1), offsets, flat_ids
