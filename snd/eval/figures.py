"""PNG figures of probe predictions (PIL only): one row per image, columns image | GT | model | baseline.

Depth uses one colour scale per row (the GT's valid 2–98% range) so GT and predictions compare directly;
invalid GT pixels are black. Normals map xyz in [-1, 1] to RGB; segmentation uses a fixed palette with the
ignore label black.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

__all__ = ["colorize_depth", "colorize_normals", "colorize_seg", "prediction_grid"]

# a perceptually ordered ramp (dark blue -> teal -> yellow), interpolated to 256 entries
_ANCHORS = np.array([[48, 18, 59], [50, 101, 230], [27, 208, 213], [98, 252, 108], [210, 233, 53], [251, 128, 34],
                     [122, 4, 3]], dtype=np.float64)
_LUT = np.stack([np.interp(np.linspace(0, len(_ANCHORS) - 1, 256), np.arange(len(_ANCHORS)), _ANCHORS[:, c])
                 for c in range(3)], 1).astype(np.uint8)


def colorize_depth(depth: Tensor, lo: float, hi: float) -> np.ndarray:
    """[H,W] metres -> [H,W,3] uint8; <= 0 / non-finite -> black."""
    d = depth.detach().float().cpu().numpy()
    valid = np.isfinite(d) & (d > 0)
    t = np.clip((d - lo) / max(hi - lo, 1e-6), 0, 1)
    out = _LUT[(np.nan_to_num(t) * 255).astype(np.int64)]
    out[~valid] = 0
    return out


def colorize_normals(n: Tensor) -> np.ndarray:
    """[3,H,W] unit normals -> [H,W,3] uint8; zero vectors -> black."""
    x = n.detach().float().cpu()
    valid = (x.norm(dim=0) > 1e-6).numpy()
    rgb = ((x.permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
    rgb[~valid] = 0
    return rgb


def colorize_seg(seg: Tensor, ignore_index: int = 255) -> np.ndarray:
    """[H,W] class ids -> [H,W,3] uint8 with a fixed pseudo-random palette; ignore -> black."""
    s = seg.detach().long().cpu().numpy()
    rng = np.random.default_rng(12345)
    pal = rng.integers(40, 256, size=(max(int(s.max(initial=0)) + 1, 256), 3), dtype=np.int64).astype(np.uint8)
    out = pal[np.clip(s, 0, len(pal) - 1)]
    out[s == ignore_index] = 0
    return out


def _image(img: Optional[Tensor], hw: tuple[int, int]) -> np.ndarray:
    if img is None:
        return np.full((*hw, 3), 128, np.uint8)
    return (img.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _render(task: str, x: Tensor, scale: tuple[float, float], ignore_index: int) -> np.ndarray:
    if task == "depth":
        return colorize_depth(x, *scale)
    if task == "normals":
        return colorize_normals(x)
    return colorize_seg(x, ignore_index)


def prediction_grid(task: str, samples: dict[str, list[dict]], path: str | Path, *, ignore_index: int = 255,
                    max_rows: int = 4, pad: int = 4) -> Path:
    """Write a PNG: rows = images, columns = image | GT | one prediction per entry of `samples`.

    Args:
        task: "depth" | "normals" | "seg".
        samples: {label: [{"image" [3,H,W] | None, "gt", "pred"}, ...]}; the first label's image/GT are shown.
    """
    from PIL import Image, ImageDraw

    labels = list(samples)
    if not labels or not samples[labels[0]]:
        raise ValueError("prediction_grid needs at least one labelled list of samples")
    rows = min(max_rows, min(len(v) for v in samples.values()))
    first = samples[labels[0]]
    H, W = first[0]["gt"].shape[-2:]
    cols = 2 + len(labels)
    top = 18
    canvas = Image.new("RGB", (cols * W + (cols + 1) * pad, top + rows * H + (rows + 1) * pad), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(["image", "ground truth"] + labels):
        draw.text((pad + c * (W + pad), 3), name[:max(W // 6, 8)], fill=(0, 0, 0))
    for r in range(rows):
        gt = first[r]["gt"]
        scale = (0.0, 1.0)
        if task == "depth":
            g = gt[torch.isfinite(gt) & (gt > 0)]
            scale = (float(g.quantile(0.02)), float(g.quantile(0.98))) if g.numel() else (0.0, 1.0)
        tiles = [_image(first[r]["image"], (H, W)), _render(task, gt, scale, ignore_index)]
        tiles += [_render(task, samples[k][r]["pred"], scale, ignore_index) for k in labels]
        for c, tile in enumerate(tiles):
            canvas.paste(Image.fromarray(np.ascontiguousarray(tile)), (pad + c * (W + pad), top + pad + r * (H + pad)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
