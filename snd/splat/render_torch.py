"""Pure-torch EWA splatting of N-channel features that reproduces gsplat 1.5.3's "classic" math.

Why: stage two must run (and be tested) without CUDA, and the gsplat backend needs an independent
implementation to be checked against. Everything below mirrors gsplat v1.5.3
(``gsplat/cuda/csrc/ProjectionEWA3DGSFused.cu``, ``RasterizeToPixels3DGSFwd.cu``,
``include/Utils.cuh``), written from scratch in torch:

* gsplat's pixel centres sit at +0.5; we shift cx, cy by +0.5 internally and evaluate pixel (i, j) at
  (j + 0.5, i + 0.5), so the caller keeps snd's integer-centre K.
* Projection: Gaussians with camera z outside [near, far] are culled; cov2d = J W Σ Wᵀ Jᵀ with the
  Jacobian evaluated at x/z, y/z clamped to 1.3x the field of view; ``eps2d = 0.3`` px² is added to
  the diagonal ("classic" mode: no opacity compensation); det <= 0 or opacity < 1/255 culls.
* Support: radius = ceil(extend * sqrt(cov2d diagonal)) with extend = min(3.33, sqrt(2 ln(255 o))),
  i.e. exactly where alpha falls below 1/255 (gsplat's opacity-aware box; "3 sigma" for o ~ 0.9).
* Per pixel, front to back by camera z of the mean (ties: lower Gaussian index first):
  alpha = min(0.999, o * exp(-q/2)) with q the Mahalanobis distance under the blurred cov2d; skip if
  q < 0 or alpha < 1/255; stop *before* the Gaussian that would bring transmittance T to <= 1e-4;
  colour = sum alpha_i T_i f_i (no background, no normalisation), alpha_out = 1 - T_final.

Vectorisation: the image is cut into row bands so that each band has at most ``max_pairs``
(Gaussian, pixel) pairs; each pair's alpha is computed at once, pairs are sorted by (pixel, depth), and
the transmittance is a segmented cumulative product (a cumulative sum of log(1 - alpha) in float64
minus its value at each pixel's segment start). The result is a sparse [H*W, N] "transfer" matrix of
compositing weights, so features of any channel count (and in channel chunks) are rendered by one
sparse matrix product each.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from snd.splat.gaussians import quat_to_rotmat
from snd.splat.inputs import ALPHA_MIN, SplatInput

log = logging.getLogger(__name__)

EPS2D = 0.3  # px², added to the projected covariance's diagonal (gsplat eps2d default, "classic")
ALPHA_MAX = 0.999  # per-Gaussian alpha clamp in gsplat's rasteriser (3DGS's original uses 0.99)
# ALPHA_MIN (1/255): contributions below it are skipped; Gaussians below it are culled (defined with the input type)
T_STOP = 1e-4  # a pixel stops before the Gaussian that would bring its transmittance to <= this
EXTEND_MAX = 3.33  # cap of the support radius in standard deviations


@dataclass
class Projected:
    """Screen-space Gaussians after gsplat-style projection and culling (only kept ones).

    ids [M] long: index into the input N; means2d [M, 2] in gsplat pixels (centres at +0.5);
    conics [M, 3] (a, b, c) of the inverse blurred covariance; depths [M]; opacities [M];
    radii [M, 2] long (x, y) in pixels.
    """

    ids: Tensor
    means2d: Tensor
    conics: Tensor
    depths: Tensor
    opacities: Tensor
    radii: Tensor


def _mm(a: Tensor, b: Tensor) -> Tensor:
    """Small matrix product as multiply + sum: full fp32 whatever the global matmul precision.

    Why: `torch.set_float32_matmul_precision("high")` (set by the training loop on CUDA) turns `@` into
    TF32 (10-bit mantissa), which moves radii and conics enough to change which pixels a Gaussian
    touches; gsplat computes these in fp32, and the two backends must agree.
    """
    return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)


def project_gaussians(inp: SplatInput, *, eps2d: float = EPS2D) -> Projected:
    """gsplat's EWA projection + culling (see module docstring); K in snd's integer-centre convention."""
    means, quats, scales, opacities, K, w2c = inp.means, inp.quats, inp.scales, inp.opacities, inp.K, inp.w2c
    height, width, near, far = inp.height, inp.width, inp.near, inp.far
    dt = means.dtype
    R, t = w2c[:3, :3].to(dt), w2c[:3, 3].to(dt)
    pc = _mm(means, R.T) + t  # [N, 3] camera frame
    z = pc[:, 2]
    keep = (z >= near) & (z <= far) & (opacities >= ALPHA_MIN)
    ids = keep.nonzero().squeeze(1)
    pc, z, o = pc[ids], z[ids], opacities[ids].to(dt)
    Rg = quat_to_rotmat(quats[ids].to(dt))  # [M, 3, 3]
    M_ = Rg * scales[ids].to(dt)[:, None, :]  # R S
    cov_w = _mm(M_, M_.transpose(1, 2))  # [M, 3, 3]
    cov_c = _mm(_mm(R, cov_w), R.T)  # [M, 3, 3]
    fx, fy = float(K[0, 0]), float(K[1, 1])
    cx, cy = float(K[0, 2]) + 0.5, float(K[1, 2]) + 0.5  # gsplat convention
    tan_fx, tan_fy = 0.5 * width / fx, 0.5 * height / fy
    lim_xp, lim_xn = (width - cx) / fx + 0.3 * tan_fx, cx / fx + 0.3 * tan_fx
    lim_yp, lim_yn = (height - cy) / fy + 0.3 * tan_fy, cy / fy + 0.3 * tan_fy
    x, y = pc[:, 0], pc[:, 1]
    tx = z * (x / z).clamp(-lim_xn, lim_xp)
    ty = z * (y / z).clamp(-lim_yn, lim_yp)
    zero = torch.zeros_like(z)
    J = torch.stack([fx / z, zero, -fx * tx / z**2, zero, fy / z, -fy * ty / z**2], -1).reshape(-1, 2, 3)
    cov2 = _mm(_mm(J, cov_c), J.transpose(1, 2))  # [M, 2, 2]
    a = cov2[:, 0, 0] + eps2d
    b = cov2[:, 0, 1]
    c = cov2[:, 1, 1] + eps2d
    det = a * c - b * b
    mean2d = torch.stack([fx * x / z + cx, fy * y / z + cy], -1)  # [M, 2]
    extend = torch.sqrt(2.0 * torch.log(o.clamp_min(ALPHA_MIN) / ALPHA_MIN)).clamp_max(EXTEND_MAX)
    rx = torch.ceil(extend * a.clamp_min(0).sqrt())
    ry = torch.ceil(extend * c.clamp_min(0).sqrt())
    ok = (det > 0) & ~((mean2d[:, 0] + rx <= 0) | (mean2d[:, 0] - rx >= width)
                       | (mean2d[:, 1] + ry <= 0) | (mean2d[:, 1] - ry >= height))
    ok &= (rx > 0) | (ry > 0)
    sel = ok.nonzero().squeeze(1)
    det_s = det[sel]
    conics = torch.stack([c[sel] / det_s, -b[sel] / det_s, a[sel] / det_s], -1)
    return Projected(ids=ids[sel], means2d=mean2d[sel], conics=conics, depths=z[sel], opacities=o[sel],
                     radii=torch.stack([rx[sel], ry[sel]], -1).long())


def composite_weights(pix: Tensor, alpha: Tensor, n_pixels: int, *,
                      t_stop: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Front-to-back compositing of pairs sorted by (pixel, depth): (weight alpha_i T_i [M'], final
    transmittance [n_pixels], kept [M] bool) in alpha's dtype.

    T is a segmented cumulative product, computed as a cumulative sum of log(1 - alpha) minus its value
    at each pixel's segment start. With `t_stop`, a pixel stops before the pair that would bring T to
    <= t_stop (T only falls along a pixel, so this keeps a prefix of each segment) and only kept pairs
    are weighted; without it every pair is kept (the caller already cut at the stop, as gsplat does)."""
    if pix.numel() == 0:
        return alpha.new_zeros(0), alpha.new_ones(n_pixels), torch.zeros(0, dtype=torch.bool, device=pix.device)
    logt = torch.log1p(-alpha)
    cs = torch.cumsum(logt, 0)
    new_seg = torch.ones_like(pix, dtype=torch.bool)
    new_seg[1:] = pix[1:] != pix[:-1]
    seg_id = torch.cumsum(new_seg.long(), 0) - 1
    incl = cs - (cs - logt)[new_seg][seg_id]  # log T after each pair
    t_after = torch.exp(incl)
    kept = t_after > t_stop if t_stop is not None else torch.ones_like(pix, dtype=torch.bool)
    w = (alpha * torch.exp(incl - logt))[kept]
    t_fin = alpha.new_ones(n_pixels).scatter_reduce_(0, pix[kept], t_after[kept], reduce="amin")
    return w, t_fin, kept


@dataclass
class SplatPlan:
    """Compositing weights of one render: features [N, C] -> image [C, H, W] is ``weights @ features``.

    weights: sparse COO [H*W, N], coalesced (row = pixel y*W + x, column = Gaussian index), alpha: [H, W].
    """

    weights: Tensor
    alpha: Tensor
    height: int
    width: int

    def apply(self, features: Tensor, *, channel_chunk: int | None = None) -> Tensor:
        """features [N, C] -> image [C, H, W] (in features' dtype), optionally channel by channel chunk."""
        N, C = features.shape
        assert N == self.weights.shape[1], f"features must be [N={self.weights.shape[1]}, C], got {tuple(features.shape)}"
        W = self.weights.to(features.dtype) if self.weights.dtype != features.dtype else self.weights
        step = C if not channel_chunk else int(channel_chunk)
        out = features.new_empty(C, self.height * self.width)
        for c0 in range(0, C, step):
            out[c0:c0 + step] = torch.sparse.mm(W, features[:, c0:c0 + step]).T
        return out.reshape(C, self.height, self.width)


def _band_pairs(p: Projected, rows: tuple[int, int], width: int) -> tuple[Tensor, Tensor, Tensor]:
    """All (Gaussian, pixel) pairs of projected Gaussians whose box meets pixel rows [r0, r1).

    Returns (g [P] index into p, pix [P] flat pixel index y*W + x, alpha [P]). Pairs with alpha < 1/255
    or a negative exponent are dropped (gsplat skips them without touching T).
    """
    r0, r1 = rows
    mx, my = p.means2d[:, 0], p.means2d[:, 1]
    rx, ry = p.radii[:, 0].to(mx.dtype), p.radii[:, 1].to(mx.dtype)
    # pixel j is at j + 0.5: keep |j + 0.5 - m| <= r
    xa = torch.ceil(mx - rx - 0.5).clamp_min(0).long()
    xb = torch.floor(mx + rx - 0.5).clamp_max(width - 1).long()
    ya = torch.ceil(my - ry - 0.5).clamp_min(r0).long()
    yb = torch.floor(my + ry - 0.5).clamp_max(r1 - 1).long()
    nx = (xb - xa + 1).clamp_min(0)
    ny = (yb - ya + 1).clamp_min(0)
    cnt = nx * ny
    P = int(cnt.sum())
    dev = cnt.device
    if P == 0:
        e = torch.zeros(0, dtype=torch.long, device=dev)
        return e, e, torch.zeros(0, dtype=mx.dtype, device=dev)
    g = torch.repeat_interleave(torch.arange(len(cnt), device=dev), cnt, output_size=P)
    # one gather of all per-Gaussian parameters (indexing dominates the cost here). Pair offsets and box widths
    # go through this float table: exact only below 2 / eps of its dtype (float32: 2^24 pairs), so a bigger band
    # builds it in float64, converting the integers directly. Bands hold ~max_pairs on average, so the fullest can
    # pass 2^24 (a 576x880 MVSplat target: 265M pairs in 16 bands, the fullest 16.68M of 16.78M).
    dt = mx.dtype if P < 2 / torch.finfo(mx.dtype).eps else torch.float64
    prm = torch.stack([(mx - 0.5 - xa.to(mx.dtype)).to(dt), (my - 0.5 - ya.to(mx.dtype)).to(dt), *p.conics.to(dt).unbind(-1),
                       p.opacities.to(dt), nx.to(dt), (torch.cumsum(cnt, 0) - cnt).to(dt)], -1)
    pg = prm.index_select(0, g)  # [P, 8]
    k = torch.arange(P, device=dev, dtype=pg.dtype) - pg[:, 7]
    ky = torch.div(k, pg[:, 6], rounding_mode="floor")
    kx = k - ky * pg[:, 6]
    dx = (pg[:, 0] - kx).to(mx.dtype)  # mean - pixel centre, relative to the box corner
    dy = (pg[:, 1] - ky).to(mx.dtype)
    q = 0.5 * (pg[:, 2].to(mx.dtype) * dx * dx + pg[:, 4].to(mx.dtype) * dy * dy) + pg[:, 3].to(mx.dtype) * dx * dy
    alpha = (pg[:, 5].to(mx.dtype) * torch.exp(-q)).clamp_max(ALPHA_MAX)
    ok = ((q >= 0) & (alpha >= ALPHA_MIN)).nonzero().squeeze(1)
    g, alpha, kx, ky = g[ok], alpha[ok], kx[ok].long(), ky[ok].long()
    px = xa[g] + kx
    py = ya[g] + ky
    return g, py * width + px, alpha


def build_plan(inp: SplatInput, *, max_pairs: int = 1 << 24) -> SplatPlan:
    """Compute the compositing weights of every (pixel, Gaussian) pair (see module docstring).

    Args:
        inp: the Gaussians and the camera (`snd.splat.inputs.SplatInput`).
        max_pairs: upper bound on (Gaussian, pixel) pairs processed at once (memory ~ 100 bytes/pair).
    """
    N, height, width = inp.n, inp.height, inp.width
    device = inp.device
    p = project_gaussians(inp)
    # front-to-back rank by depth; stable sort keeps the lower Gaussian index first on ties (as gsplat's
    # stable radix sort over an index-ordered intersection list)
    order = torch.sort(p.depths, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=device)
    # choose row bands so each holds about max_pairs pairs (box areas are an upper bound)
    ny_all = (2 * p.radii[:, 1] + 1).clamp_max(height)
    nx_all = (2 * p.radii[:, 0] + 1).clamp_max(width)
    total = int((nx_all * ny_all).sum()) if len(ny_all) else 0
    n_bands = max(1, min(height, math.ceil(total / max(1, max_pairs))))
    band_h = math.ceil(height / n_bands)
    rows_i, cols_i, vals = [], [], []
    alpha_img = torch.zeros(height * width, dtype=torch.float64, device=device)
    M = len(rank)
    top = p.means2d[:, 1] - p.radii[:, 1]  # gsplat rows: pixel row i is centred at i + 0.5
    bot = p.means2d[:, 1] + p.radii[:, 1]
    for r0 in range(0, height, band_h):
        r1 = min(height, r0 + band_h)
        in_band = ((bot >= r0) & (top <= r1)).nonzero().squeeze(1)
        if in_band.numel() == 0:
            continue
        sub = Projected(*(getattr(p, f)[in_band] for f in ("ids", "means2d", "conics", "depths", "opacities", "radii")))
        g, pix, alpha = _band_pairs(sub, (r0, r1), width)
        if g.numel() == 0:
            continue
        g = in_band[g]  # index into p
        key = pix * M + rank[g]
        srt = torch.sort(key).indices
        g, pix, alpha = g[srt], pix[srt], alpha[srt].to(torch.float64)
        w, t_fin, use = composite_weights(pix - r0 * width, alpha, (r1 - r0) * width, t_stop=T_STOP)
        rows_i.append(pix[use])
        cols_i.append(p.ids[g[use]])
        vals.append(w)
        alpha_img[r0 * width:r1 * width] = 1.0 - t_fin
    if rows_i:
        r, c, v = torch.cat(rows_i), torch.cat(cols_i), torch.cat(vals)
    else:
        r = c = torch.zeros(0, dtype=torch.long, device=device)
        v = torch.zeros(0, dtype=torch.float64, device=device)
    log.debug("torch splat: %d Gaussians kept of %d, %d pairs, %d bands", M, N, v.numel(), n_bands)
    srt = torch.sort(r * N + c).indices  # (pixel, Gaussian) pairs are unique: sorted = coalesced
    weights = torch.sparse_coo_tensor(torch.stack([r[srt], c[srt]]), v[srt].to(inp.means.dtype),
                                      (height * width, N), is_coalesced=True, check_invariants=False)
    return SplatPlan(weights=weights, alpha=alpha_img.to(inp.means.dtype).reshape(height, width),
                     height=height, width=width)


def render_torch(inp: SplatInput, features: Tensor, *, max_pairs: int = 1 << 24,
                 channel_chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """Render features [N, C] -> (image [C, H, W], alpha [H, W]); see `build_plan`."""
    inp.check_features(features)
    plan = build_plan(inp.to(device=inp.device), max_pairs=max_pairs)
    return plan.apply(features, channel_chunk=channel_chunk), plan.alpha
