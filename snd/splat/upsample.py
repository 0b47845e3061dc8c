"""Patch-grid features -> scaffold resolution, optionally mask-aware (SnD paper, eq. 3).

Two sampling grids (``grid``), see `snd.splat.protocol`:

* ``"corners"`` (the official SnD code, default): pixel y samples the patch grid at
  ``torch.linspace(0, h - 1, H)[y]`` (float32, as the official code computes it), i.e. the first and
  last pixel sit exactly on the first and last patch (``align_corners=True``); the patch labels of the
  mask-aware test are the high-res mask at rows ``round(linspace(0, H - 1, h))`` and the matching columns
  (rows 0, 14, 29, ..., H - 1: corners, not patch centres).
* ``"centres"`` (the "snd" variant): PyTorch's ``align_corners=False`` mapping, pixel y reads
  ``max(0, (y + 0.5) * h / H - 0.5)`` clamped like ``F.interpolate``, and the patch label is the mask at
  the patch centre ``(i + 0.5) * H / h - 0.5`` (rounded half up).

The ratio need not be an integer (41 x 62 patches -> 576 x 880 pixels).

Mask-aware mode: each pixel takes the 4 bilinear neighbours, keeps those whose *patch label* equals
the pixel's label and renormalises the kept weights. When no neighbour with a positive weight matches
(thin structures, label islands smaller than a patch), ``fallback="zero"`` gives 0 (official) and
``fallback="bilinear"`` keeps the plain bilinear value.

Memory: C = 768 at 576 x 880 is 1.5 GB per view in float32, so the 4 neighbours are gathered with
separable row/column indices, one channel chunk at a time, into a preallocated output.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

UpsampleMode = Literal["mask", "bilinear"]
Fallback = Literal["bilinear", "zero"]
Grid = Literal["corners", "centres"]
_MODES = ("mask", "bilinear")
_FALLBACKS = ("bilinear", "zero")
_GRIDS = ("corners", "centres")


def corner_coords(n_out: int, n_in: int, device: torch.device | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """1D bilinear taps of the corner-aligned grid ``linspace(0, n_in - 1, n_out)`` (official SnD).

    Returns (i0 [n_out] long, i1 [n_out] long, frac [n_out] float32) like `source_coords`; the positions
    are torch.linspace's own float32 values, so a position that rounds to just below an integer keeps
    the lower neighbour exactly as the official code does.
    """
    pos = torch.linspace(0, n_in - 1, n_out, device=device, dtype=torch.float32)
    i0 = pos.floor().long()
    i1 = (i0 + 1).clamp_max(n_in - 1)
    return i0, i1, pos - i0.to(torch.float32)


def taps(n_out: int, n_in: int, grid: Grid, device: torch.device | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """`corner_coords` or `source_coords` by `grid`."""
    if grid not in _GRIDS:
        raise ValueError(f"grid must be one of {_GRIDS}, got {grid!r}")
    return corner_coords(n_out, n_in, device) if grid == "corners" else source_coords(n_out, n_in, device)


def label_rows(n_patch: int, n_pix: int, grid: Grid, device: torch.device | None = None) -> Tensor:
    """Pixel index [n_patch] whose mask label each patch row (or column) takes for the neighbour test:
    ``round(linspace(0, n_pix - 1, n_patch))`` for "corners", the patch centre for "centres"."""
    if grid == "corners":
        return torch.linspace(0, n_pix - 1, n_patch, device=device).round().long().clamp(0, n_pix - 1)
    return patch_centres(n_patch, n_pix, device)


def source_coords(n_out: int, n_in: int, device: torch.device | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """1D bilinear taps for resizing n_in -> n_out with align_corners=False (PyTorch's clamping).

    Returns (i0 [n_out] long, i1 [n_out] long, frac [n_out] float32): value = (1-frac)*f[i0] + frac*f[i1].
    """
    scale = n_in / n_out
    dst = torch.arange(n_out, device=device, dtype=torch.float64)
    src = ((dst + 0.5) * scale - 0.5).clamp_min(0.0)
    i0 = src.floor().long().clamp_max(n_in - 1)
    i1 = (i0 + 1).clamp_max(n_in - 1)
    frac = (src - i0.to(torch.float64)).to(torch.float32)
    frac = torch.where(i1 == i0, torch.zeros_like(frac), frac)
    return i0, i1, frac


def patch_centres(n_patch: int, n_pix: int, device: torch.device | None = None) -> Tensor:
    """Pixel index [n_patch] nearest to each patch centre ((i + 0.5) * n_pix / n_patch - 0.5, rounded half up)."""
    c = (torch.arange(n_patch, device=device, dtype=torch.float64) + 0.5) * (n_pix / n_patch) - 0.5
    return (c + 0.5).floor().long().clamp(0, n_pix - 1)


def patch_labels(masks: Tensor, h: int, w: int, grid: Grid = "corners") -> Tensor:
    """High-res masks [V, H, W] -> patch-grid labels [V, h, w] (the mask at `label_rows` x `label_rows`)."""
    assert masks.dim() == 3, f"masks must be [V, H, W], got {tuple(masks.shape)}"
    _, H, W = masks.shape
    ry = label_rows(h, H, grid, masks.device)
    rx = label_rows(w, W, grid, masks.device)
    return masks[:, ry][:, :, rx]


def upsample_weights(
    masks: Tensor | None,  # [V, H, W] int
    h: int,
    w: int,
    H: int,
    W: int,
    *,
    fallback: Fallback = "zero",
    grid: Grid = "corners",
) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """Row/column taps and per-pixel weights of the 4 neighbours.

    Returns ((y0 [H], y1 [H], x0 [W], x1 [W]), weights [V, 4, H, W]) with neighbour order
    (y0,x0), (y0,x1), (y1,x0), (y1,x1). ``masks=None`` gives plain bilinear weights with V = 1.
    """
    if fallback not in _FALLBACKS:
        raise ValueError(f"fallback must be one of {_FALLBACKS}, got {fallback!r}")
    device = masks.device if masks is not None else None
    y0, y1, fy = taps(H, h, grid, device)
    x0, x1, fx = taps(W, w, grid, device)
    wy = torch.stack([1 - fy, fy])  # [2, H]
    wx = torch.stack([1 - fx, fx])  # [2, W]
    bil = (wy[:, None, :, None] * wx[None, :, None, :]).reshape(4, H, W)  # [4, H, W]
    if masks is None:
        return (y0, y1, x0, x1), bil[None]
    lab = patch_labels(masks, h, w, grid)  # [V, h, w]
    neigh = torch.stack([lab[:, y0][:, :, x0], lab[:, y0][:, :, x1],
                         lab[:, y1][:, :, x0], lab[:, y1][:, :, x1]], dim=1)  # [V, 4, H, W]
    keep = neigh == masks[:, None]  # [V, 4, H, W]
    wm = bil[None] * keep  # [V, 4, H, W]
    total = wm.sum(1, keepdim=True)  # [V, 1, H, W]
    matched = total > 0
    wm = wm / torch.where(matched, total, torch.ones_like(total))
    if fallback == "bilinear":
        wm = torch.where(matched, wm, bil[None].expand_as(wm))
    return (y0, y1, x0, x1), wm


def upsample_features(
    feats: Tensor,  # [V, C, h, w]
    masks: Tensor,  # [V, H, W] int
    *,
    mode: UpsampleMode = "mask",
    fallback: Fallback = "zero",
    grid: Grid = "corners",
    channel_chunk: int = 64,
) -> Tensor:
    """Patch features [V, C, h, w] -> pixel features [V, C, H, W] (H, W from `masks`).

    Args:
        feats: [V, C, h, w] patch features.
        masks: [V, H, W] integer instance labels at the target resolution (only their shape is used
            when ``mode="bilinear"``).
        mode: "mask" = mask-aware bilinear (paper eq. 3), "bilinear" = plain bilinear (ablation B).
        fallback: mask mode only: value of a pixel none of whose neighbours shares its label.
        grid: "corners" (official) or "centres" sampling grid (module docstring).
        channel_chunk: channels gathered at once (bounds temporary memory).

    Returns:
        [V, C, H, W] in feats' dtype. "bilinear" equals ``F.interpolate(..., mode="bilinear",
        align_corners=grid == "corners")``.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if fallback not in _FALLBACKS:
        raise ValueError(f"fallback must be one of {_FALLBACKS}, got {fallback!r}")
    assert feats.dim() == 4, f"feats must be [V, C, h, w], got {tuple(feats.shape)}"
    V, C, h, w = feats.shape
    assert masks.dim() == 3 and masks.shape[0] == V, f"masks must be [V={V}, H, W], got {tuple(masks.shape)}"
    _, H, W = masks.shape
    (y0, y1, x0, x1), wts = upsample_weights(masks if mode == "mask" else None, h, w, H, W, fallback=fallback,
                                             grid=grid)
    wts = wts.to(device=feats.device, dtype=feats.dtype)  # [V or 1, 4, H, W]
    y0, y1, x0, x1 = (t.to(feats.device) for t in (y0, y1, x0, x1))
    out = feats.new_empty(V, C, H, W)
    step = max(1, int(channel_chunk))
    for v in range(V):
        wv = wts[min(v, wts.shape[0] - 1)]  # [4, H, W]
        for c0 in range(0, C, step):
            f = feats[v, c0:c0 + step]  # [c, h, w]
            # columns first on the small grid (gathering along the last dim is the slow direction),
            # then whole rows, which are contiguous copies
            c0_, c1_ = f[:, :, x0], f[:, :, x1]  # [c, h, W]
            acc = c0_.index_select(1, y0).mul_(wv[0])
            acc.addcmul_(c1_.index_select(1, y0), wv[1])
            acc.addcmul_(c0_.index_select(1, y1), wv[2])
            acc.addcmul_(c1_.index_select(1, y1), wv[3])
            out[v, c0:c0 + step] = acc
    return out


def upsample_features_reference(
    feats: Tensor,  # [V, C, h, w]
    masks: Tensor,  # [V, H, W] int
    *,
    mode: UpsampleMode = "mask",
    fallback: Fallback = "zero",
    grid: Grid = "corners",
) -> Tensor:
    """Slow, obviously-correct version of `upsample_features` (explicit loops; tiny inputs only).

    The corner grid's positions are computed here in exact rationals y * (h - 1) / (H - 1); tests use
    sizes where that equals torch.linspace's float32 values."""
    V, C, h, w = feats.shape
    _, H, W = masks.shape
    out = torch.zeros(V, C, H, W, dtype=torch.float64)
    f64 = feats.to(torch.float64)

    def taps1(n_out: int, n_in: int, d: int) -> list[tuple[int, float]]:
        if grid == "corners":
            s = d * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        else:
            s = max(0.0, (d + 0.5) * n_in / n_out - 0.5)
        i0 = min(int(s // 1), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        fr = s - i0 if i1 != i0 else 0.0
        return [(i0, 1.0 - fr), (i1, fr)]

    def centre(i: int, n_patch: int, n_pix: int) -> int:
        if grid == "corners":  # round half to even, as torch.round
            return min(max(round(i * (n_pix - 1) / (n_patch - 1) if n_patch > 1 else 0), 0), n_pix - 1)
        c = (i + 0.5) * n_pix / n_patch - 0.5
        return min(max(int((c + 0.5) // 1), 0), n_pix - 1)

    for v in range(V):
        for y in range(H):
            for x in range(W):
                nb = [(iy, ix, wy * wx) for iy, wy in taps1(H, h, y) for ix, wx in taps1(W, w, x)]
                if mode == "mask":
                    lab = int(masks[v, y, x])
                    kept = [(iy, ix, wt) for iy, ix, wt in nb
                            if int(masks[v, centre(iy, h, H), centre(ix, w, W)]) == lab]
                    tot = sum(wt for _, _, wt in kept)
                    if tot > 0:
                        nb = [(iy, ix, wt / tot) for iy, ix, wt in kept]
                    elif fallback == "zero":
                        nb = []
                for iy, ix, wt in nb:
                    out[v, :, y, x] += wt * f64[v, :, iy, ix]
    return out.to(feats.dtype)


def bilinear_resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """[..., C, h, w] -> [..., C, H, W] plain bilinear (align_corners=False, no antialias)."""
    lead = x.shape[:-3]
    y = F.interpolate(x.reshape(-1, *x.shape[-3:]), size=size, mode="bilinear", align_corners=False)
    return y.reshape(*lead, *y.shape[-3:])
