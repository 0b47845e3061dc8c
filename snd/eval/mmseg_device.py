"""mmseg's training pipeline split for the live paper protocol: the random draws per item on a DataLoader
worker, `PhotoMetricDistortion` (and the flip, padding) batched on the training device.

Why its own module: `PhotoMetricDistortion`'s float passes and two HSV round trips were over half of a worker's
time per seg item (`snd.bench.loaders.augment_rates`), and they are the same arithmetic on every pixel, so the
device does them for a whole batch. `draw_photometric` draws exactly what `snd.eval.mmseg.photometric_distortion`
draws, in its order, and `photometric_batch` applies the draws per item under masks: per item the numbers
`photometric_distortion` gives (tests/test_eval_device_aug.py). `snd.eval.mmseg.MmsegTrain` uses both.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from snd.eval.augment import where_items
from snd.eval.mmseg import hsv_to_rgb_u8, rgb_to_hsv_u8

__all__ = ["PHOTO_PARAMS", "draw_photometric", "photometric_batch", "flip_windows", "pad_windows"]

# draw_photometric's fields, in order (an item's float64 parameters)
PHOTO_PARAMS = ("bright_on", "beta", "contrast_first", "contrast_on", "contrast", "sat_on", "sat", "hue_on", "hue")


def draw_photometric(gen: Optional[torch.Generator] = None) -> list[float]:
    """`photometric_distortion`'s random draws, in its order, as `PHOTO_PARAMS` (a value not drawn is 0)."""
    def coin() -> bool:
        return bool(torch.randint(0, 2, (), generator=gen))

    def uniform(lo: float, hi: float) -> float:
        return float(torch.empty((), dtype=torch.float64).uniform_(lo, hi, generator=gen))

    p = dict.fromkeys(PHOTO_PARAMS, 0.0)
    if coin():
        p["bright_on"], p["beta"] = 1.0, uniform(-32, 32)
    p["contrast_first"] = float(coin())
    if p["contrast_first"] and coin():
        p["contrast_on"], p["contrast"] = 1.0, uniform(0.5, 1.5)
    if coin():
        p["sat_on"], p["sat"] = 1.0, uniform(0.5, 1.5)
    if coin():
        p["hue_on"], p["hue"] = 1.0, float(torch.randint(-18, 18, (), generator=gen))
    if not p["contrast_first"] and coin():
        p["contrast_on"], p["contrast"] = 1.0, uniform(0.5, 1.5)
    return [p[k] for k in PHOTO_PARAMS]


def _convert(x: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """`PhotoMetricDistortion.convert` with per-item float32 alpha, beta (as the scalar ones are cast)."""
    return (x * alpha + beta).clamp_(0, 255).floor_()


def photometric_batch(img: Tensor, p: Tensor) -> Tensor:
    """`photometric_distortion` of every item of img [B, 3, H, W] (0..255 float) with its draws p [B, 9]
    (`PHOTO_PARAMS`): each step computed for the batch and kept where the item drew it."""
    B = img.shape[0]

    def col(name: str) -> Tensor:
        return p[:, PHOTO_PARAMS.index(name)].float().view(B, 1, 1, 1)

    def on(name: str) -> Tensor:
        return col(name) > 0

    def convert(x: Tensor, sel, alpha: str | None, beta: str | None) -> Tensor:
        a = col(alpha)[sel] if alpha else torch.ones_like(col("beta")[sel])
        return _convert(x[sel], a, col(beta)[sel] if beta else torch.zeros_like(a))

    def hsv_step(x: Tensor, sel, ch: int) -> Tensor:
        hsv = rgb_to_hsv_u8(x[sel])
        if ch == 1:
            sat = col("sat")[sel]
            hsv[:, 1:2] = _convert(hsv[:, 1:2], sat, torch.zeros_like(sat))
        else:
            hsv[:, 0:1] = torch.remainder(hsv[:, 0:1] + col("hue")[sel], 180)
        return hsv_to_rgb_u8(hsv)

    first, contrast = on("contrast_first"), on("contrast_on")
    img = where_items(on("bright_on").view(B), img, lambda sel: convert(img, sel, None, "beta"))
    img = where_items((first & contrast).view(B), img, lambda sel: convert(img, sel, "contrast", None))
    img = where_items(on("sat_on").view(B), img, lambda sel: hsv_step(img, sel, 1))
    img = where_items(on("hue_on").view(B), img, lambda sel: hsv_step(img, sel, 0))
    return where_items((~first & contrast).view(B), img, lambda sel: convert(img, sel, "contrast", None))


def flip_windows(img: Tensor, hw: Tensor, flip: Tensor) -> Tensor:
    """Each item's top-left window [:h, :w] of img [B, C, H, W] mirrored left-right where `flip` [B] (bool):
    column x < w reads w - 1 - x; columns past w are the padding and stay."""
    B, C, H, W = img.shape
    x = torch.arange(W, device=img.device)[None]
    w = hw[:, 1].long()[:, None]
    src = torch.where(flip[:, None] & (x < w), w - 1 - x, x)  # [B, W]
    return torch.gather(img, 3, src.view(B, 1, 1, W).expand(B, C, H, W))


def pad_windows(img: Tensor, hw: Tensor, fill: Tensor) -> Tensor:
    """img [B, 3, H, W] with every pixel outside its item's top-left h x w window set to `fill` [3]."""
    B, _, H, W = img.shape
    y, x = torch.arange(H, device=img.device), torch.arange(W, device=img.device)
    inside = (y[None, :, None] < hw[:, 0, None, None]) & (x[None, None, :] < hw[:, 1, None, None])  # [B, H, W]
    return torch.where(inside[:, None], img, fill.to(img).view(1, 3, 1, 1))
