"""Slow, literal re-statements of upstream MVSplat's formulations, for tests of the fast paths.

Each function follows the structure of the corresponding upstream code (github.com/donydchen/mvsplat:
`multiview_transformer.py`, `position.py` + `backbone_multiview.py`, `depth_predictor_multiview.py`,
`ldm_unet/unet.py`, `gaussian_adapter.py`) step by step: rolled windows with the -100 Swin mask,
(v b) batch order, general matrix inverses, xyzw quaternions. Not used at run time.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .unet import AttentionBlock


def _split(x: Tensor, k: int) -> Tensor:  # [B, H, W, C] -> [B*k*k, H/k, W/k, C]
    b, h, w, c = x.shape
    return x.view(b, k, h // k, k, w // k, c).permute(0, 1, 3, 2, 4, 5).reshape(b * k * k, h // k, w // k, c)


def _merge(x: Tensor, k: int) -> Tensor:  # inverse of _split
    bk, h, w, c = x.shape
    b = bk // (k * k)
    return x.view(b, k, k, h, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b, k * h, k * w, c)


def shift_window_mask(h: int, w: int, k: int, device=None) -> Tensor:
    """Upstream's Swin mask [k*k, L, L]: 0 within a region of the rolled map, -100 across regions."""
    wh, ww = h // k, w // k
    sh, sw = wh // 2, ww // 2
    img = torch.zeros(1, h, w, 1, device=device)
    cnt = 0
    for hs in (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)):
        for ws in (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)):
            img[:, hs, ws, :] = cnt
            cnt += 1
    mw = _split(img, k).reshape(-1, wh * ww)
    m = mw[:, None, :] - mw[:, :, None]
    return torch.where(m != 0, torch.full_like(m, -100.0), torch.zeros_like(m))


def window_attention_reference(q: Tensor, k: Tensor, v: Tensor, *, splits: int, shift: bool) -> Tensor:
    """[N, H, W, C] x3 -> [N, H, W, C]: roll, split, masked softmax(q k^T / sqrt(C)) v, merge, roll back."""
    N, H, W, C = q.shape
    if splits == 1:
        s = q.reshape(N, -1, C) @ k.reshape(N, -1, C).transpose(1, 2) / math.sqrt(C)
        return (torch.softmax(s, -1) @ v.reshape(N, -1, C)).reshape(N, H, W, C)
    wh, ww = H // splits, W // splits
    sh, sw = wh // 2, ww // 2
    if shift:
        q, k, v = (torch.roll(t, shifts=(-sh, -sw), dims=(1, 2)) for t in (q, k, v))
    qs, ks, vs = (_split(t, splits).reshape(N * splits * splits, wh * ww, C) for t in (q, k, v))
    s = qs @ ks.transpose(1, 2) / math.sqrt(C)
    if shift:
        s = s + shift_window_mask(H, W, splits, device=q.device).repeat(N, 1, 1)
    out = _merge((torch.softmax(s, -1) @ vs).reshape(-1, wh, ww, C), splits)
    if shift:
        out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
    return out


def add_position_reference(feature: Tensor, splits: int) -> Tensor:
    """[N, C, H, W] + DETR sine position of one window, added per split window (upstream)."""
    N, C, H, W = feature.shape
    x = _split(feature.permute(0, 2, 3, 1), splits).permute(0, 3, 1, 2)  # [N*k*k, C, h, w]
    b, _, h, w = x.shape
    npf = C // 2
    mask = torch.ones(b, h, w, device=x.device)
    y_embed = mask.cumsum(1, dtype=torch.float32)
    x_embed = mask.cumsum(2, dtype=torch.float32)
    y_embed = y_embed / (y_embed[:, -1:, :] + 1e-6) * 2 * math.pi
    x_embed = x_embed / (x_embed[:, :, -1:] + 1e-6) * 2 * math.pi
    dim_t = torch.arange(npf, dtype=torch.float32, device=x.device)
    dim_t = 10000 ** (2 * (dim_t // 2) / npf)
    px = x_embed[..., None] / dim_t
    py = y_embed[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    pos = torch.cat((py, px), dim=3).permute(0, 3, 1, 2)
    return _merge((x + pos).permute(0, 2, 3, 1), splits).permute(0, 3, 1, 2)


def cost_volume_reference(feats: Tensor, K_norm: Tensor, c2w: Tensor, near: Tensor, far: Tensor, num: int) -> Tensor:
    """Upstream's 2-view plane-sweep correlation [B, V, D, h, w] (fp32; whole volume at once).

    Like upstream, both back-projection and re-projection use the *reference* view's intrinsics
    (exact when the two views share intrinsics).
    """
    B, V, C, h, w = feats.shape
    assert V == 2
    vb = lambda t: t.transpose(0, 1).reshape(V * B, *t.shape[2:])  # noqa: E731  "b v ... -> (v b) ..."
    feat0 = vb(feats.float())
    feat1 = vb(feats.float()[:, [1, 0]])
    pose = torch.inverse(c2w[:, 1].double()) @ c2w[:, 0].double()
    poses = torch.cat([pose, torch.inverse(pose)], 0).float()
    intr = K_norm.float().clone()
    intr[:, :, 0, :] *= float(w)
    intr[:, :, 1, :] *= float(h)
    intr = vb(intr)
    lo = vb((1.0 / far.float())[..., None])
    hi = vb((1.0 / near.float())[..., None])
    disp = lo + torch.linspace(0.0, 1.0, num)[None] * (hi - lo)  # [VB, D]
    depth = (1.0 / disp)[:, :, None, None].repeat(1, 1, h, w)
    n, d = depth.shape[:2]
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    grid = torch.stack([xs, ys, torch.ones_like(xs)], 0).float()[None].repeat(n, 1, 1, 1)
    pts = torch.inverse(intr).bmm(grid.view(n, 3, -1))
    pts = torch.bmm(poses[:, :3, :3], pts).unsqueeze(2).repeat(1, 1, d, 1) * depth.view(n, 1, d, h * w)
    pts = pts + poses[:, :3, -1:].unsqueeze(-1)
    pts = torch.bmm(intr, pts.view(n, 3, -1)).view(n, 3, d, h * w)
    pix = pts[:, :2] / pts[:, -1:].clamp(min=1e-3)
    gx = 2 * pix[:, 0] / (w - 1) - 1
    gy = 2 * pix[:, 1] / (h - 1) - 1
    g = torch.stack([gx, gy], -1)
    warped = F.grid_sample(feat1, g.view(n, d * h, w, 2), mode="bilinear", padding_mode="zeros",
                           align_corners=True).view(n, C, d, h, w)
    corr = (feat0.unsqueeze(2) * warped).sum(1) / C ** 0.5  # [(v b), D, h, w]
    return corr.view(V, B, d, h, w).transpose(0, 1)


def attention_block_reference(block: AttentionBlock, x: Tensor) -> Tensor:
    """Upstream AttentionBlock (post-norm, legacy QKV order, views joined in the token axis).
    `x` is [B*V, C, h, w] in (b v) order."""
    N, C, h, w = x.shape
    V, nh = block.num_views, block.num_heads
    B = N // V
    xr = x.reshape(N, C, h * w)
    qkv = F.conv1d(xr, block.qkv.weight, block.qkv.bias)  # [N, 3C, T]
    qkv = qkv.view(B, V, 3 * C, h * w).permute(0, 2, 1, 3).reshape(B, 3 * C, V * h * w)  # "b n (v t)"
    ch = C // nh
    q, k, v = qkv.reshape(B * nh, ch * 3, -1).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    wgt = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale).float(), dim=-1)
    a = torch.einsum("bts,bcs->bct", wgt, v).reshape(B, C, V, h * w).permute(0, 2, 1, 3).reshape(N, C, h * w)
    hdn = block.norm(F.conv1d(a, block.proj_out.weight, block.proj_out.bias))
    return (xr + hdn).reshape(N, C, h, w)


def gaussian_adapter_reference(raw: Tensor, depth: Tensor, density: Tensor, K_norm: Tensor, c2w: Tensor, *,
                               scale_min: float, scale_max: float) -> tuple[Tensor, Tensor, Tensor]:
    """Upstream encoder + GaussianAdapter -> (means [B,V,H,W,3], world covariances [...,3,3], opacities).

    raw: [B, V, H, W, 9] (offset logits 2, scale logits 3, rotation xyzw 4); depth, density: [B, V, H, W].
    """
    B, V, H, W, _ = raw.shape
    xs = (torch.arange(W, dtype=torch.float32) + 0.5) / W
    ys = (torch.arange(H, dtype=torch.float32) + 0.5) / H
    xy = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)  # [H, W, 2]
    pixel_size = 1 / torch.tensor((W, H), dtype=torch.float32)
    xy = xy + (raw[..., :2].sigmoid() - 0.5) * pixel_size
    Kx = K_norm.double()[:, :, None, None]  # [B, V, 1, 1, 3, 3]
    E = c2w.double()[:, :, None, None]
    s = scale_min + (scale_max - scale_min) * raw[..., 2:5].double().sigmoid()
    mult = 0.1 * (torch.inverse(Kx[..., :2, :2]) @ pixel_size.double()[:, None])[..., 0].sum(-1)
    s = s * depth.double()[..., None] * mult[..., None]
    rot = raw[..., 5:9].double()
    rot = rot / (rot.norm(dim=-1, keepdim=True) + 1e-8)
    i, j, k, r = rot.unbind(-1)
    two_s = 2 / ((rot * rot).sum(-1) + 1e-8)
    R = torch.stack([
        1 - two_s * (j * j + k * k), two_s * (i * j - k * r), two_s * (i * k + j * r),
        two_s * (i * j + k * r), 1 - two_s * (i * i + k * k), two_s * (j * k - i * r),
        two_s * (i * k - j * r), two_s * (j * k + i * r), 1 - two_s * (i * i + j * j),
    ], -1).reshape(*rot.shape[:-1], 3, 3)
    S = torch.diag_embed(s)
    cov = R @ S @ S.transpose(-1, -2) @ R.transpose(-1, -2)
    Rw = E[..., :3, :3]
    cov = Rw @ cov @ Rw.transpose(-1, -2)
    homo = torch.cat([xy.double(), torch.ones_like(xy[..., :1]).double()], -1)  # [B?, H, W, 3]
    dirs = (torch.inverse(Kx) @ homo[..., None])[..., 0]
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    dirs = (E @ torch.cat([dirs, torch.zeros_like(dirs[..., :1])], -1)[..., None])[..., :3, 0]
    means = E[..., :3, 3] + dirs * depth.double()[..., None]
    return means.float(), cov.float(), density.float()


__all__ = [
    "window_attention_reference", "shift_window_mask", "add_position_reference", "cost_volume_reference",
    "attention_block_reference", "gaussian_adapter_reference",
]
