"""Resizing a probe sample consistently, and surface normals from a depth map.

Resizing rules (one place, every dataset): the image is bilinear with antialiasing; depth is
nearest-exact (no mixing across depth edges, so 0 = invalid stays exact); normals are nearest-exact then
renormalised (all-zero = invalid survives); labels are nearest-exact. `fit="crop"` first center-crops
to the target aspect ratio (no distortion: Probe3D's NYU normals use a center crop); `fit="resize"`
stretches (what mmseg-style "resize to a fixed size" does when aspect ratios differ).
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

Fit = Literal["crop", "resize"]


def center_crop_box(height: int, width: int, out_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, h, w) of the largest centred box of aspect out_hw inside a height x width image."""
    th, tw = out_hw
    if width * th > height * tw:  # too wide: crop columns
        w = max(1, int(round(height * tw / th)))
        return 0, (width - w) // 2, height, w
    h = max(1, int(round(width * th / tw)))
    return (height - h) // 2, 0, h, width


def _check_hw(img_hw: tuple[int, int]) -> tuple[int, int]:
    h, w = int(img_hw[0]), int(img_hw[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"img_hw must be positive, got {img_hw}")
    return h, w


def resize_image(image: np.ndarray, img_hw: tuple[int, int], *, fit: Fit = "crop") -> torch.Tensor:
    """RGB [H, W, 3] uint8 -> [3, h, w] float32 in [0, 1]."""
    assert image.ndim == 3 and image.shape[2] == 3, f"image must be [H,W,3], got {image.shape}"
    h, w = _check_hw(img_hw)
    t = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float().div_(255.0)
    t = _crop(t, img_hw, fit)
    if tuple(t.shape[-2:]) != (h, w):
        t = F.interpolate(t[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
    return t.clamp_(0.0, 1.0).contiguous()


def _crop(t: torch.Tensor, img_hw: tuple[int, int], fit: Fit) -> torch.Tensor:
    if fit not in ("crop", "resize"):
        raise ValueError(f"fit must be 'crop' or 'resize', got {fit!r}")
    if fit == "resize":
        return t
    top, left, ch, cw = center_crop_box(t.shape[-2], t.shape[-1], img_hw)
    return t[..., top : top + ch, left : left + cw]


def resize_nearest(arr: np.ndarray, img_hw: tuple[int, int], *, fit: Fit = "crop") -> torch.Tensor:
    """[H, W] or [H, W, C] array -> tensor [h, w] or [C, h, w] by nearest-exact sampling (same crop as the image)."""
    h, w = _check_hw(img_hw)
    t = torch.from_numpy(np.array(arr, copy=True))
    chw = t.ndim == 3
    if chw:
        t = t.permute(2, 0, 1)
    t = _crop(t, img_hw, fit)
    if tuple(t.shape[-2:]) != (h, w):
        dtype = t.dtype
        x = t[None] if chw else t[None, None]
        x = F.interpolate(x.double() if not dtype.is_floating_point else x, size=(h, w), mode="nearest-exact")
        t = (x[0] if chw else x[0, 0]).to(dtype)
    return t.contiguous()


def resize_depth(depth: np.ndarray, img_hw: tuple[int, int], *, fit: Fit = "crop") -> torch.Tensor:
    """z-depth [H, W] metres (0 invalid) -> [h, w] float32, nearest-exact so invalid pixels never blend."""
    assert depth.ndim == 2, f"depth must be [H,W], got {depth.shape}"
    d = np.nan_to_num(depth.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    d[d < 0] = 0.0
    return resize_nearest(d, img_hw, fit=fit).float()


def resize_normals(normals: np.ndarray, img_hw: tuple[int, int], *, fit: Fit = "crop") -> torch.Tensor:
    """Normals [H, W, 3] (all-zero = invalid) -> [3, h, w] float32 unit vectors (zeros kept)."""
    assert normals.ndim == 3 and normals.shape[2] == 3, f"normals must be [H,W,3], got {normals.shape}"
    n = np.nan_to_num(normals.astype(np.float32))
    t = resize_nearest(n, img_hw, fit=fit).float()
    norm = t.norm(dim=0, keepdim=True)
    return torch.where(norm > 1e-6, t / norm.clamp_min(1e-6), torch.zeros_like(t)).contiguous()


def resize_labels(seg: np.ndarray, img_hw: tuple[int, int], *, fit: Fit = "crop") -> torch.Tensor:
    """Class ids [H, W] (255 = ignore) -> [h, w] int64, nearest-exact."""
    assert seg.ndim == 2, f"seg must be [H,W], got {seg.shape}"
    return resize_nearest(seg.astype(np.int64), img_hw, fit=fit).long()


def normals_from_depth(depth: np.ndarray, K: np.ndarray, *, max_rel_jump: float = 0.05) -> np.ndarray:
    """Camera-frame surface normals [H, W, 3] from a z-depth map [H, W] and pixel intrinsics K [3, 3].

    Axes are snd's OpenCV camera frame (x right, y down, z forward); normals point towards the camera
    (n . p < 0). Each tangent uses the one-sided difference (left/right, up/down) with the smaller depth
    change, so a pixel next to an occlusion edge still gets its own surface's normal; pixels whose both
    neighbours are invalid or jump more than `max_rel_jump` x depth get all-zero (invalid) normals.
    """
    assert depth.ndim == 2, f"depth must be [H,W], got {depth.shape}"
    assert K.shape == (3, 3), f"K must be [3,3], got {K.shape}"
    d = depth.astype(np.float64)
    H, W = d.shape
    v, u = np.meshgrid(np.arange(H, dtype=np.float64), np.arange(W, dtype=np.float64), indexing="ij")
    Kinv = np.linalg.inv(K)
    rays = np.stack([u, v, np.ones_like(u)], -1) @ Kinv.T  # [H, W, 3], z = 1
    P = rays * d[..., None]  # [H, W, 3]
    valid = d > 0

    def tangent(axis: int) -> tuple[np.ndarray, np.ndarray]:
        # forward and backward differences along `axis`, padded with invalid at the border
        fwd = np.zeros_like(P)
        bwd = np.zeros_like(P)
        dfw = np.full(d.shape, np.inf)
        dbw = np.full(d.shape, np.inf)
        sl_a = [slice(None)] * 2
        sl_b = [slice(None)] * 2
        sl_a[axis], sl_b[axis] = slice(0, -1), slice(1, None)
        a, b = tuple(sl_a), tuple(sl_b)
        ok = valid[a] & valid[b]
        jump = np.where(ok, np.abs(d[b] - d[a]), np.inf)
        fwd[a] = P[b] - P[a]
        dfw[a] = jump
        bwd[b] = P[b] - P[a]
        dbw[b] = jump
        use_fwd = dfw <= dbw
        t = np.where(use_fwd[..., None], fwd, bwd)
        best = np.minimum(dfw, dbw)
        good = valid & (best <= max_rel_jump * np.maximum(d, 1e-9))
        return t, good

    tu, gu = tangent(1)
    tv, gv = tangent(0)
    n = np.cross(tu, tv)  # for a fronto-parallel plane: x cross y = +z (away) -> flipped below
    norm = np.linalg.norm(n, axis=-1, keepdims=True)
    ok = gu & gv & (norm[..., 0] > 1e-12)
    n = np.where(ok[..., None], n / np.maximum(norm, 1e-12), 0.0)
    flip = (n * P).sum(-1) > 0
    n[flip] *= -1.0
    return n.astype(np.float32)
