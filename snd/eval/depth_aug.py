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
from snd.eval.augment import LiveAugmented, where_items

__all__ = ["DepthAug", "PAPER_DEPTH_AUG", "DepthTrain", "rotation_theta", "turn", "rotate", "color_lut", "apply_lut",
           "color_aug"]


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


def rotation_theta(hw: tuple[int, int], degree: float) -> Tensor:
    """affine_grid's theta [2, 3] (float32) of `mmcv.imrotate(., degree)` on an H x W frame (about its centre,
    positive = clockwise, output the input's size).

    cv2's `getRotationMatrix2D(c, -degree)` maps a source pixel s to R (s - c) + c with
    R = [[cos t, sin t], [-sin t, cos t]], t = -degree, c = ((W-1)/2, (H-1)/2); `warpAffine` reads every output
    pixel d at s = R^T (d - c) + c. Pixel centres sit at integer coordinates, so grid_sample's align_corners=True
    normalisation reads exactly there; its zero padding is cv2's constant border 0 (a bilinear tap outside
    counts as 0 in both). float32: the sample positions are off by < 1e-3 px on a 1216-wide frame (cv2 itself
    rounds them to 1/32 px)."""
    H, W = int(hw[0]), int(hw[1])
    t = math.radians(-degree)
    a, b = math.cos(t), math.sin(t)
    # s = R^T (d - c) + c in normalised coordinates (x = sw (u + 1), y = sh (v + 1), the centre at u = v = 0):
    # u_s = a u_d - b (sh / sw) v_d, v_s = b (sw / sh) u_d + a v_d: affine_grid's theta
    sw, sh = max(W - 1, 1) / 2, max(H - 1, 1) / 2
    return torch.tensor([[a, -b * sh / sw, 0.0], [b * sw / sh, a, 0.0]], dtype=torch.float32)


def turn(x: Tensor, theta: Tensor, mode: str) -> Tensor:
    """x [B, C, H, W] turned by each item's `rotation_theta` [B, 2, 3] (border 0), the same size; `mode`
    "bilinear" (cv2's default, the image) or "nearest" (the depth map)."""
    grid = F.affine_grid(theta.to(x.device, torch.float32), [x.shape[0], 1, *x.shape[-2:]], align_corners=True)
    return F.grid_sample(x.float(), grid, mode=mode, padding_mode="zeros", align_corners=True).to(x.dtype)


def rotate(x: Tensor, degree: float, mode: str) -> Tensor:
    """`mmcv.imrotate(x, degree)` of one x [C, H, W] float (pixel values): `turn` at `rotation_theta`."""
    return turn(x[None], rotation_theta(x.shape[-2:], degree)[None], mode)[0]


def color_lut(gamma: float, brightness: float, colors: Tensor) -> Tensor:
    """`ColorAug`'s float64 formula over the 256 uint8 values, per channel: [3, 256] float32."""
    v = torch.arange(256, dtype=torch.float64)
    return ((v ** gamma * brightness)[None] * colors.double().view(3, 1)).clamp(0, 255).float()


def apply_lut(img: Tensor, lut: Tensor) -> Tensor:
    """img [..., 3, H, W] holding uint8 values looked up in its per-channel table lut [..., 3, 256]."""
    flat = img.long().reshape(*img.shape[:-2], -1)
    return torch.gather(lut.to(img.device, torch.float32), -1, flat).view(img.shape)


def color_aug(img: Tensor, gamma: float, brightness: float, colors: Tensor) -> Tensor:
    """The Toolbox's `ColorAug` on img [3, H, W] holding 0..255 values: clip(img**gamma * brightness * colors).

    The image is uint8-valued here (the loaded frame, or cv2's rotation rounded back to uint8), so the float64
    formula is tabulated per channel over the 256 values and looked up (`color_lut`, `apply_lut`): the same
    numbers, 10x faster than the power over the frame."""
    if not torch.equal(img.round().clamp(0, 255), img):
        raise ValueError("color_aug expects uint8-valued pixels (0..255 integers)")
    return apply_lut(img, color_lut(gamma, brightness, colors)).to(img.dtype)


def _uniform(lo: float, hi: float, n: int | None = None) -> Tensor | float:
    u = torch.rand(n if n is not None else (), dtype=torch.float64) * (hi - lo) + lo
    return u if n is not None else float(u)


class DepthTrain(LiveAugmented):
    """The official depth training pipeline over a whole-frame probe dataset's native frames (module docstring):
    image [3, h', w'] in [0, 1] (the crop centre-padded to the patch with the ImageNet mean, dinov2's
    `CenterPadding` of the normalised image with 0) and depth [h, w] metres (0 = invalid) at the crop size.

    Split in two so the heavy part runs batched on the training device: `worker_item` (a DataLoader worker:
    load the frame, draw every random number in the order above) and `device_augment` (rotate, flip, crop,
    colour, pad a collated batch wherever it lives). `dataset[i]` is both, on the CPU, for one item."""

    device_keys = ("aug", "theta", "lut")  # what `worker_item` adds for `device_augment` (`ProbeData` passes it on)

    def __init__(self, source, aug: DepthAug, *, frame_hw: tuple[int, int], patch: int = 14):
        """`frame_hw`: the native frame's size (`snd.eval.protocol.PAPER_TRAIN_NATIVE_HW`); a frame smaller than the
        crop is cropped whole (the crop shrinks to the frame, so every item of the set has one size). Every frame
        must have this size (the workers' items collate whole frames)."""
        from snd.eval.protocol import padded_hw

        super().__init__(source, patch)
        self.aug = aug
        self.frame_hw = (int(frame_hw[0]), int(frame_hw[1]))
        self.crop_hw = (min(aug.crop[0], self.frame_hw[0]), min(aug.crop[1], self.frame_hw[1]))
        self.img_hw = padded_hw(self.crop_hw, self.patch)

    def worker_item(self, index: int) -> dict:
        """The per-item CPU part: the native frame (image uint8 [3, H, W], depth [H, W]) and this item's draws:
        `aug` float64 [rotate?, flip?, top, left], `theta` [2, 3] the rotation's affine_grid matrix, `lut`
        [3, 256] ColorAug's table (the identity without colour). Draw order and distributions as the Toolbox's
        pipeline (module docstring): rotate coin, angle, flip coin, crop offsets, colour coin, gamma, brightness,
        per-channel colours."""
        image, depth, rid = self.source.native_frame(index)
        h, w = self.crop_hw
        H, W = int(depth.shape[0]), int(depth.shape[1])
        if H < h or W < w:
            raise SndError(f"{self.name}: frame {rid} is {H}x{W}, smaller than the training "
                           f"crop {h}x{w} of the other frames", hint="every frame of a depth set must have one size")
        if (H, W) != self.frame_hw:
            raise SndError(f"{self.name}: frame {rid} is {H}x{W}, not the set's native {self.frame_hw[0]}x"
                           f"{self.frame_hw[1]}", hint="every frame of a depth set must have one size")
        a = self.aug
        rot, degree = float(torch.rand(())) < a.p_rotate, _uniform(-a.degree, a.degree)
        flip = float(torch.rand(())) < a.p_flip
        top = int(torch.randint(0, H - h + 1, ()))
        left = int(torch.randint(0, W - w + 1, ()))
        lut = torch.arange(256, dtype=torch.float32).expand(3, 256).clone()
        if float(torch.rand(())) < a.p_color:
            gamma, bright = _uniform(*a.gamma), _uniform(*a.brightness)
            lut = color_lut(gamma, bright, _uniform(*a.color, 3))
        img = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
        d = torch.as_tensor(np.asarray(depth), dtype=torch.float32).clone()
        return {"image": img, "depth": d, "aug": torch.tensor([rot, flip, top, left], dtype=torch.float64),
                "theta": rotation_theta((H, W), degree), "lut": lut,
                "meta": {"dataset": self.name, "split": "train", "index": int(index), "id": rid}}

    def device_augment(self, batch: dict) -> dict:
        """The rest of the pipeline on a collated batch of `worker_item`s, on the batch's device: rotation
        (grid_sample at each item's theta, the image rounded back to uint8 as cv2's warpAffine, the depth nearest),
        flip, crop, ColorAug (each item's table), /255, centre padding. Returns `image [B, 3, h', w']`, `depth
        [B, h, w]` (and the batch's other keys): per item exactly `dataset[i]`'s numbers."""
        from snd.eval.protocol import IMAGENET_MEAN, center_pad

        img, d, p = batch["image"].float(), batch["depth"].float()[:, None], batch["aug"]
        B, dev, (h, w) = img.shape[0], img.device, self.crop_hw
        rot = p[:, 0] > 0

        theta = batch["theta"]
        d = where_items(rot, d, lambda sel: turn(d[sel], theta[sel], "nearest"))
        img = where_items(rot, img, lambda sel: torch.floor(turn(img[sel], theta[sel], "bilinear") + 0.5).clamp(0, 255))
        flip = p[:, 1] > 0
        img, d = where_items(flip, img, lambda sel: img[sel].flip(-1)), where_items(flip, d, lambda sel: d[sel].flip(-1))
        rows = p[:, 2].long()[:, None, None] + torch.arange(h, device=dev)[None, :, None]  # [B, h, 1]
        cols = p[:, 3].long()[:, None, None] + torch.arange(w, device=dev)[None, None, :]  # [B, 1, w]
        bi = torch.arange(B, device=dev)[:, None, None]
        img = img[bi, :, rows, cols].permute(0, 3, 1, 2)  # [B, h, w, 3] -> [B, 3, h, w]
        d = d[bi, 0, rows, cols]
        img = apply_lut(img, batch["lut"])
        image = center_pad(img / 255, self.patch, torch.tensor(IMAGENET_MEAN))
        out = {k: v for k, v in batch.items() if k not in self.device_keys}
        out.update(image=image.contiguous(), depth=d.contiguous())
        return out

    def __getitem__(self, index: int) -> dict:
        from snd.eval.augment import augment_one

        return augment_one(self, index, ("image", "depth"))
