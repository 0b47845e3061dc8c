"""The official depth probes' training pipeline (paper protocol), drawn afresh for every item.

Why: the official depth configs (SnD's `evaluation1/evaluation/configs/*_depth_linear_config.py`, the
Monocular-Depth-Estimation-Toolbox pipeline DINOv2 uses) never train on the whole frame: every step takes

    [NYUCrop | KBCrop] -> RandomRotate(p 0.5, +-2.5 deg) -> RandomFlip(p 0.5) -> RandomCrop(416x544; KITTI
    352x704) -> ColorAug(p 0.5) -> Normalize -> (dinov2's CenterPadding to the patch, in the backbone)

of the native frame (`ProbeDataset.native_frame`: NYU's NYUCrop region, KITTI's KB crop, the ScanNet and
ScanNet++ frames whole). No token cache can hold a fresh crop, rotation and colour draw per step, so
`snd eval` runs the backbone live on these items (`self_augmenting`, as for mmseg's seg crops and GeoNet).

The transforms follow the Toolbox's code, not a cleaned-up version of it:
* rotation = `mmcv.imrotate`: about ((w-1)/2, (h-1)/2), positive = clockwise, output the input's size,
  border 0; the uint8 image bilinear (rounded back to uint8), depth nearest (0 = invalid outside). The angle is
  drawn on every item, used with p 0.5.
* `ColorAug` works on the 0..255 values themselves: x**gamma (so gamma 1.1 maps 100 to 158.5 and most of the
  range to the 255 clip), then x brightness (NYU / ScanNet / ScanNet++ [0.75, 1.25], KITTI [0.9, 1.1]), then
  one factor per channel in [0.9, 1.1], clipped to [0, 255] and not rounded.
* the crop offsets are uniform over every position that fits (`np.random.randint(0, margin + 1)`).
Random draws come from torch's generator (seeded per DataLoader worker), the same distributions as numpy's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from snd.errors import SndError

__all__ = ["DepthAug", "PAPER_DEPTH_AUG", "DepthTrain", "rotation_grid", "rotate", "color_aug"]


@dataclass(frozen=True)
class DepthAug:
    """One dataset's official depth training augmentation (the config's numbers)."""

    crop: tuple[int, int] = (416, 544)  # RandomCrop size (h, w)
    brightness: tuple[float, float] = (0.75, 1.25)  # ColorAug brightness range
    gamma: tuple[float, float] = (0.9, 1.1)
    color: tuple[float, float] = (0.9, 1.1)
    degree: float = 2.5  # RandomRotate range +-degree
    p_rotate: float = 0.5
    p_flip: float = 0.5
    p_color: float = 0.5


# the official configs of the four depth sets (vits_{nyu,scannet,scannetpp,kitti}_depth_linear_config.py)
PAPER_DEPTH_AUG: dict[str, DepthAug] = {"nyuv2": DepthAug(), "scannet": DepthAug(), "scannetpp": DepthAug(),
                                        "kitti": DepthAug(crop=(352, 704), brightness=(0.9, 1.1))}


def rotation_grid(hw: tuple[int, int], degree: float) -> Tensor:
    """grid_sample's grid [1, H, W, 2] of `mmcv.imrotate(., degree)` on an H x W frame (about its centre,
    positive = clockwise, output the input's size).

    cv2's `getRotationMatrix2D(c, -degree)` maps a source pixel s to R (s - c) + c with
    R = [[cos t, sin t], [-sin t, cos t]], t = -degree, c = ((W-1)/2, (H-1)/2); `warpAffine` reads every output
    pixel d at s = R^T (d - c) + c. Pixel centres sit at integer coordinates, so grid_sample's align_corners=True
    normalisation reads exactly there; its zero padding is cv2's constant border 0 (a bilinear tap outside
    counts as 0 in both). float32: the sample positions are off by < 1e-3 px on a 1216-wide frame (cv2 itself
    rounds them to 1/32 px), and the loader draws it for every training item."""
    H, W = int(hw[0]), int(hw[1])
    t = math.radians(-degree)
    a, b = math.cos(t), math.sin(t)
    # s = R^T (d - c) + c in normalised coordinates (x = sw (u + 1), y = sh (v + 1), the centre at u = v = 0):
    # u_s = a u_d - b (sh / sw) v_d, v_s = b (sw / sh) u_d + a v_d: affine_grid's theta
    sw, sh = max(W - 1, 1) / 2, max(H - 1, 1) / 2
    theta = torch.tensor([[a, -b * sh / sw, 0.0], [b * sw / sh, a, 0.0]], dtype=torch.float32)[None]
    return F.affine_grid(theta, [1, 1, H, W], align_corners=True)


def rotate(x: Tensor, degree: float, mode: str, grid: Tensor | None = None) -> Tensor:
    """`mmcv.imrotate(x, degree)` of x [C, H, W] float (pixel values), border 0 (`rotation_grid`); `mode`
    "bilinear" (cv2's default, the image) or "nearest" (the depth map)."""
    g = rotation_grid(x.shape[-2:], degree) if grid is None else grid
    out = F.grid_sample(x[None].float(), g, mode=mode, padding_mode="zeros", align_corners=True)[0]
    return out.to(x.dtype)


def color_aug(img: Tensor, gamma: float, brightness: float, colors: Tensor) -> Tensor:
    """The Toolbox's `ColorAug` on img [3, H, W] holding 0..255 values: clip(img**gamma * brightness * colors).

    The image is uint8-valued here (the loaded frame, or cv2's rotation rounded back to uint8), so the float64
    formula is tabulated per channel over the 256 values and looked up: the same numbers, 10x faster than the
    power over the frame (the loader runs it for every other training item)."""
    v = torch.arange(256, dtype=torch.float64)
    lut = ((v ** gamma * brightness)[None] * colors.double().view(3, 1)).clamp(0, 255).to(img.dtype)  # [3, 256]
    idx = img.round().clamp(0, 255).long()
    if not torch.equal(idx.to(img.dtype), img):
        raise ValueError("color_aug expects uint8-valued pixels (0..255 integers)")
    return torch.gather(lut, 1, idx.view(3, -1)).view_as(img)


def _uniform(lo: float, hi: float, n: int | None = None) -> Tensor | float:
    u = torch.rand(n if n is not None else (), dtype=torch.float64) * (hi - lo) + lo
    return u if n is not None else float(u)


class DepthTrain(torch.utils.data.Dataset):
    """The official depth training pipeline over a whole-frame probe dataset's native frames (module docstring):
    image [3, h', w'] in [0, 1] (the crop centre-padded to the patch with the ImageNet mean, dinov2's
    `CenterPadding` of the normalised image with 0) and depth [h, w] metres (0 = invalid) at the crop size."""

    self_augmenting = True

    def __init__(self, source, aug: DepthAug, *, frame_hw: tuple[int, int], patch: int = 14):
        """`frame_hw`: the native frame's size (`snd.eval.protocol.PAPER_TRAIN_NATIVE_HW`); a frame smaller than the
        crop is cropped whole (the crop shrinks to the frame, so every item of the set has one size)."""
        from snd.eval.protocol import padded_hw

        self.source, self.aug, self.patch = source, aug, int(patch)
        self.crop_hw = (min(aug.crop[0], int(frame_hw[0])), min(aug.crop[1], int(frame_hw[1])))
        self.img_hw = padded_hw(self.crop_hw, self.patch)
        self.name = getattr(source, "name", "?")

    def __len__(self) -> int:
        return len(self.source)

    def unaugmented(self):
        """The same frames without the augmentation (what the trivial baseline is fit on): the source set."""
        return self.source

    def __getitem__(self, index: int) -> dict:
        from snd.eval.protocol import IMAGENET_MEAN, center_pad

        image, depth, rid = self.source.native_frame(index)
        h, w = self.crop_hw
        if depth.shape[0] < h or depth.shape[1] < w:
            raise SndError(f"{self.name}: frame {rid} is {depth.shape[0]}x{depth.shape[1]}, smaller than the training "
                           f"crop {h}x{w} of the other frames", hint="every frame of a depth set must have one size")
        img = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).float()
        d = torch.as_tensor(np.asarray(depth), dtype=torch.float32).clone()[None]
        a = self.aug
        rot, degree = float(torch.rand(())) < a.p_rotate, _uniform(-a.degree, a.degree)
        if rot:  # the image stays uint8 through cv2's warpAffine: round (half up) and saturate
            grid = rotation_grid(d.shape[-2:], degree)
            img = torch.floor(rotate(img, degree, "bilinear", grid) + 0.5).clamp(0, 255)
            d = rotate(d, degree, "nearest", grid)
        if float(torch.rand(())) < a.p_flip:
            img, d = img.flip(-1), d.flip(-1)
        top = int(torch.randint(0, d.shape[-2] - h + 1, ()))
        left = int(torch.randint(0, d.shape[-1] - w + 1, ()))
        img, d = img[:, top : top + h, left : left + w], d[0, top : top + h, left : left + w]
        if float(torch.rand(())) < a.p_color:
            gamma, bright = _uniform(*a.gamma), _uniform(*a.brightness)
            img = color_aug(img, gamma, bright, _uniform(*a.color, 3))
        image_out = center_pad((img / 255)[None], self.patch, torch.tensor(IMAGENET_MEAN))[0]
        return {"image": image_out.contiguous(), "depth": d.contiguous(),
                "meta": {"dataset": self.name, "split": "train", "index": int(index), "id": rid}}
