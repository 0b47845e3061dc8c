"""Segmentation under the paper protocol: the official mmseg pipeline of the SnD linear probe, as pure functions.

What the official configs (`evaluation1/evaluation/configs/*_sem_linear_config.py` of
davidshavin4/Splat-and-Distill, mmseg 0.x transforms in `segmentation/datasets/pipelines/transforms.py`,
`segmentor/encoder_decoder.py`, `eval_utils/misc.py`) do, checked by hand-computed tests
(`tests/test_eval_mmseg.py`):

* test: `Resize(img_scale=(2048, 512), keep_ratio=True)`: mmcv `rescale_size`, factor
  min(2048 / long side, 512 / short side), sizes int(x·f + 0.5) (`rescale_size`), bilinear on the uint8
  image; then `slide_inference` with 512x512 windows at stride 341 (`slide_windows`): each window's logits
  are bilinearly resized to the window, summed, and divided by how many windows cover the pixel
  (`count_mat`, `slide_merge`), then resized (bilinear) to the original size and argmax'd; the ground truth
  is never resized;
* the ViT sees a window centre-padded to a multiple of the patch (`CenterPadding`, 512 -> 518 for
  patch 14, 512 itself for 16; the normalised image padded with 0 = the mean colour), and its 37x37 (32x32)
  logits are resized to the 512x512 window (padding included in the resize, as `encode_decode` does);
* training: `Resize(img_scale=(2048, 512), ratio_range=(0.5, 2.0))` (a ratio uniform in [0.5, 2) times
  both scale numbers, truncated, then the keep-ratio rescale; labels nearest), `RandomCrop(512, 512,
  cat_max_ratio=0.75)` (`cat_max_crop`: up to 10 redraws while one class covers >= 75 % of the crop's
  labelled pixels or only one class is there; the 11th draw is kept unchecked), `RandomFlip(0.5)`,
  `PhotoMetricDistortion` (`photometric_distortion`), `Normalize`, `Pad(512x512)` bottom/right with 0
  (the mean colour) and label 255, then the backbone's centre padding to 518x518 for /14 (`MmsegTrain`).

Differences (docs/evaluation.md): OpenCV's uint8 resize and HSV conversion are fixed-point; here they are
their float formulas rounded at the same points (within one intensity level); random numbers come from
torch's global generator (seeded per DataLoader worker), not numpy's.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from snd.eval.augment import LiveAugmented

__all__ = ["CROP", "STRIDE", "SCALE", "RATIO_RANGE", "CAT_MAX_RATIO", "rescale_size", "slide_windows", "slide_merge",
           "crop_box", "cat_max_crop", "photometric_distortion", "rgb_to_hsv_u8", "hsv_to_rgb_u8", "MmsegTrain",
           "MmsegTest", "slide_logits"]

CROP = (512, 512)  # crop_size of the training RandomCrop and of test_cfg (mode="slide")
STRIDE = (341, 341)  # test_cfg stride
SCALE = (2048, 512)  # Resize img_scale (long, short)
RATIO_RANGE = (0.5, 2.0)  # training Resize ratio_range
CAT_MAX_RATIO = 0.75  # RandomCrop cat_max_ratio
IGNORE = 255
Box = tuple[int, int, int, int]  # (y1, y2, x1, x2)


def rescale_size(h: int, w: int, scale: tuple[int, int] = SCALE) -> tuple[int, int]:
    """(new_h, new_w) of mmcv `imrescale(img, scale)`: factor min(max(scale)/max(h, w), min(scale)/min(h, w)),
    each side int(side·factor + 0.5)."""
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


def slide_windows(h: int, w: int, crop: tuple[int, int] = CROP, stride: tuple[int, int] = STRIDE) -> list[Box]:
    """mmseg `slide_inference`'s windows (y1, y2, x1, x2) of an h x w image, row by row; the last window of a
    row/column is shifted back to end at the border; a side shorter than the crop is one smaller window."""
    out = []
    gh = max(h - crop[0] + stride[0] - 1, 0) // stride[0] + 1
    gw = max(w - crop[1] + stride[1] - 1, 0) // stride[1] + 1
    for i in range(gh):
        for j in range(gw):
            y2, x2 = min(i * stride[0] + crop[0], h), min(j * stride[1] + crop[1], w)
            out.append((max(y2 - crop[0], 0), y2, max(x2 - crop[1], 0), x2))
    return out


def slide_merge(logits: list[Tensor], boxes: list[Box], hw: tuple[int, int]) -> Tensor:
    """Sum of window logits [B, K, y2-y1, x2-x1] placed at their boxes, divided by the per-pixel window count
    (`count_mat`). Returns [B, K, H, W]."""
    B, K = logits[0].shape[:2]
    acc = logits[0].new_zeros(B, K, *hw)
    count = logits[0].new_zeros(1, 1, *hw)
    for lg, (y1, y2, x1, x2) in zip(logits, boxes):
        assert lg.shape[-2:] == (y2 - y1, x2 - x1), f"window logits {tuple(lg.shape)} vs box {(y1, y2, x1, x2)}"
        acc[..., y1:y2, x1:x2] += lg
        count[..., y1:y2, x1:x2] += 1
    assert bool((count > 0).all()), "the windows do not cover the image"
    return acc / count


def crop_box(h: int, w: int, crop: tuple[int, int] = CROP, gen: Optional[torch.Generator] = None) -> Box:
    """`RandomCrop.get_crop_bbox`: offsets uniform in [0, max(side - crop, 0)]; the box may pass the border."""
    oy = int(torch.randint(0, max(h - crop[0], 0) + 1, (), generator=gen))
    ox = int(torch.randint(0, max(w - crop[1], 0) + 1, (), generator=gen))
    return oy, oy + crop[0], ox, ox + crop[1]


def cat_max_crop(seg: Tensor, draw: Callable[[], Box], ratio: float = CAT_MAX_RATIO, ignore: int = IGNORE) -> Box:
    """`RandomCrop` with `cat_max_ratio`: draw a box; up to 10 times, keep it if the crop of `seg [H, W]` has
    more than one labelled class and the largest covers < `ratio` of its labelled pixels, else draw again
    (after 10 rejections the 11th draw is kept unchecked). `ratio >= 1` keeps the first draw."""
    box = draw()
    if ratio < 1.0:
        for _ in range(10):
            y1, y2, x1, x2 = box
            lab = seg[y1:y2, x1:x2].reshape(-1)
            cnt = torch.bincount(lab[lab != ignore].long())
            cnt = cnt[cnt > 0]
            if cnt.numel() > 1 and float(cnt.max()) / float(cnt.sum()) < ratio:
                break
            box = draw()
    return box


def _convert(x: Tensor, alpha: float = 1.0, beta: float = 0.0) -> Tensor:
    """`PhotoMetricDistortion.convert`: x·alpha + beta in float32, clipped to [0, 255], cast to uint8 (truncated)."""
    return (x.float() * alpha + beta).clamp_(0, 255).floor_()


def rgb_to_hsv_u8(img: Tensor) -> Tensor:
    """OpenCV's 8-bit RGB -> HSV on [..., 3, H, W] values 0..255: H in [0, 180] (degrees / 2), S and V in 0..255,
    each rounded. The sector is R's when max = R, else G's when max = G, else B's (OpenCV's order)."""
    x = img.float()
    r, g, b = x.unbind(-3)
    v, mn = x.amax(-3), x.amin(-3)
    d = v - mn
    s = 255 * d / v.clamp_min(1e-6)
    dd = d.clamp_min(1e-6)
    h = torch.where(v == r, (g - b) / dd * 60, torch.where(v == g, (b - r) / dd * 60 + 120, (r - g) / dd * 60 + 240))
    h = torch.where(h < 0, h + 360, h) * (d > 0)
    return torch.stack([(h / 2).round_(), s.round_(), v], -3)


def hsv_to_rgb_u8(hsv: Tensor) -> Tensor:
    """OpenCV's 8-bit HSV -> RGB on [..., 3, H, W]: h = 2H degrees, s = S/255, v = V; the six-sector formula
    (written as c_n = v − v·s·clamp(min(k, 4 − k), 0, 1), k = (n + h/60) mod 6, n = 5, 3, 1 for R, G, B), rounded."""
    H, S, V = hsv.float().unbind(-3)
    h6, vs = H / 30, V * S / 255
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(h6 + n, 6.0)
        out.append(V - vs * torch.minimum(k, 4 - k).clamp_(0, 1))
    return torch.stack(out, -3).round_().clamp_(0, 255)


def photometric_distortion(img: Tensor, gen: Optional[torch.Generator] = None) -> Tensor:
    """mmseg `PhotoMetricDistortion` (defaults) on `img [3, H, W]` RGB 0..255: brightness ±32 (p 0.5); contrast
    ×[0.5, 1.5] (p 0.5) first or last (a coin); saturation ×[0.5, 1.5] (p 0.5); hue shift in [-18, 18) (p 0.5)."""
    def coin() -> bool:
        return bool(torch.randint(0, 2, (), generator=gen))

    def uniform(lo: float, hi: float) -> float:
        return float(torch.empty((), dtype=torch.float64).uniform_(lo, hi, generator=gen))

    if coin():
        img = _convert(img, beta=uniform(-32, 32))
    contrast_first = coin()
    if contrast_first and coin():
        img = _convert(img, alpha=uniform(0.5, 1.5))
    if coin():
        hsv = rgb_to_hsv_u8(img)
        hsv[1] = _convert(hsv[1], alpha=uniform(0.5, 1.5))
        img = hsv_to_rgb_u8(hsv)
    if coin():
        hsv = rgb_to_hsv_u8(img)
        hsv[0] = (hsv[0] + int(torch.randint(-18, 18, (), generator=gen))) % 180
        img = hsv_to_rgb_u8(hsv)
    if not contrast_first and coin():
        img = _convert(img, alpha=uniform(0.5, 1.5))
    return img


def _resize_u8(img: Tensor, hw: tuple[int, int]) -> Tensor:
    """Bilinear (no antialiasing, as OpenCV's INTER_LINEAR) resize of [3, H, W] 0..255, rounded to uint8 levels."""
    if tuple(img.shape[-2:]) == tuple(hw):
        return img
    out = F.interpolate(img[None].float(), size=hw, mode="bilinear", align_corners=False)[0]
    return out.round_().clamp_(0, 255)


def _taps(n_in: int, n_out: int, lo: int, hi: int) -> tuple[Tensor, Tensor, Tensor]:
    """Output positions [lo, hi) of a 1-D bilinear resize n_in -> n_out (align_corners=False), as PyTorch's
    upsample kernel computes them in float32: source = max((dst + 0.5)·(n_in / n_out) − 0.5, 0), the taps
    floor(source) and the next one (clamped to the last), the second tap's weight the fractional part."""
    scale = torch.tensor(n_in / n_out, dtype=torch.float32)
    src = ((torch.arange(lo, hi, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_min(0)
    i0 = src.floor().long().clamp_max(n_in - 1)
    return i0, (i0 + 1).clamp_max(n_in - 1), src - i0


def _resize_u8_window(img: Tensor, hw: tuple[int, int], box: Box) -> Tensor:
    """`_resize_u8(img, hw)[:, y1:y2, x1:x2]` (the box clipped to hw), computing only the window's pixels:
    the training crop is at most 512x512 of a rescale up to ~4x the source's pixels, so resizing the whole image
    was the augmentation's largest cost (one row pass, then one column pass, of two taps each: ~4x faster on a
    512x683 image rescaled to 900x1200, and equal to the whole resize on all but ~1e-5 of the pixels)."""
    y1, y2, x1, x2 = box
    y2, x2 = min(y2, hw[0]), min(x2, hw[1])
    if tuple(img.shape[-2:]) == tuple(hw):
        return img[:, y1:y2, x1:x2]
    r0, r1, wr = _taps(img.shape[-2], hw[0], y1, y2)
    c0, c1, wc = _taps(img.shape[-1], hw[1], x1, x2)
    x = img.float()
    rows = torch.lerp(x.index_select(1, r0), x.index_select(1, r1), wr[:, None])  # [3, h, W]
    rows = rows.transpose(1, 2).contiguous()  # [3, W, h]: the column taps become row gathers too
    out = torch.lerp(rows.index_select(1, c0), rows.index_select(1, c1), wc[:, None])  # [3, w, h]
    return out.transpose(1, 2).round_().clamp_(0, 255)


def _resize_labels(seg: Tensor, hw: tuple[int, int]) -> Tensor:
    """OpenCV's INTER_NEAREST (source index floor(dst · in/out)) = torch's "nearest"."""
    if tuple(seg.shape[-2:]) == tuple(hw):
        return seg
    return F.interpolate(seg[None, None].float(), size=hw, mode="nearest")[0, 0].long()


def _raw(source, index: int) -> tuple[Tensor, Tensor]:
    """(image [3, H, W] float 0..255, labels [H, W] int64) at the dataset's native resolution (`load`)."""
    raw = source.load(index)
    img = torch.from_numpy(np.array(raw.image, dtype=np.uint8, copy=True)).permute(2, 0, 1).float()
    return img, torch.from_numpy(np.asarray(raw.seg, dtype=np.int64))


class MmsegTrain(LiveAugmented):
    """The official training pipeline over a probe dataset's native samples (`ProbeDataset.load`), drawn
    afresh for every item: image [3, 518, 518] in [0, 1] for /14 (512x512 padded, then centre-padded to the patch
    multiple with the mean colour) and seg [512, 512] (255 in the padding). `snd eval` runs the backbone
    live on it (`self_augmenting`): no token cache holds a fresh augmentation per step. Split as `DepthTrain`:
    `worker_item` on a DataLoader worker, `device_augment` batched on the training device."""

    device_keys = ("aug",)  # what `worker_item` adds for `device_augment` (`ProbeData` passes it on)

    def __init__(self, source, *, patch: int = 14):
        from snd.eval.protocol import padded_hw

        super().__init__(source, patch)
        self.img_hw = padded_hw(CROP, patch)

    def worker_item(self, index: int) -> dict:
        """The per-item CPU part, every draw in the pipeline's order: the rescale ratio, the label resize and the
        `cat_max_crop` draws (they need the labels), the image resized inside the crop window only, the flip coin,
        `PhotoMetricDistortion`'s draws (`snd.eval.mmseg_device.draw_photometric`). Returns the window as uint8
        [3, 512, 512] (zeros past its h x w), seg [512, 512] flipped and padded with 255 (final), and `aug`
        float64 [flip, h, w, *PHOTO_PARAMS] for `device_augment`."""
        from snd.eval.mmseg_device import draw_photometric

        img, seg = _raw(self.source, index)
        ratio = RATIO_RANGE[0] + float(torch.rand((), dtype=torch.float64)) * (RATIO_RANGE[1] - RATIO_RANGE[0])
        hw = rescale_size(*img.shape[-2:], (int(SCALE[0] * ratio), int(SCALE[1] * ratio)))
        seg = _resize_labels(seg, hw)
        y1, y2, x1, x2 = box = cat_max_crop(seg, lambda: crop_box(hw[0], hw[1]))
        img, seg = _resize_u8_window(img, hw, box), seg[y1:y2, x1:x2]
        flip = float(torch.rand(())) < 0.5
        photo = draw_photometric()
        h, w = seg.shape
        window = torch.zeros(3, *CROP, dtype=torch.uint8)
        window[:, :h, :w] = img.to(torch.uint8)
        label = torch.full(CROP, IGNORE, dtype=torch.long)
        label[:h, :w] = seg.flip(-1) if flip else seg
        return {"image": window, "seg": label, "aug": torch.tensor([flip, h, w, *photo], dtype=torch.float64),
                "meta": {"dataset": self.name, "split": "train", "index": int(index)}}

    def device_augment(self, batch: dict) -> dict:
        """The rest on a collated batch of `worker_item`s, on the batch's device: the flip of each window,
        `PhotoMetricDistortion` (`snd.eval.mmseg_device.photometric_batch`), /255, the mean colour past the
        window, the centre padding to the patch. Per item exactly `dataset[i]`'s numbers."""
        from snd.eval.mmseg_device import flip_windows, pad_windows, photometric_batch
        from snd.eval.protocol import IMAGENET_MEAN, center_pad

        p = batch["aug"]
        img = flip_windows(batch["image"].float(), p[:, 1:3], p[:, 0] > 0)
        img = pad_windows(photometric_batch(img, p[:, 3:]) / 255, p[:, 1:3], torch.tensor(IMAGENET_MEAN))
        out = {k: v for k, v in batch.items() if k not in self.device_keys}
        out["image"] = center_pad(img, self.patch, torch.tensor(IMAGENET_MEAN)).contiguous()
        return out

    def __getitem__(self, index: int) -> dict:
        from snd.eval.augment import augment_one

        return augment_one(self, index, ("image", "seg"))


class MmsegTest(torch.utils.data.Dataset):
    """The official test input: the image rescaled to (2048, 512) keeping its ratio (`rescale_size`), in [0, 1],
    and the ground truth at its own resolution. Sizes differ per image: evaluate one image at a time
    (`slide_logits`)."""

    slide = True

    def __init__(self, source):
        self.source = source
        self.name = getattr(source, "name", "?")

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        img, seg = _raw(self.source, index)
        img = _resize_u8(img, rescale_size(*img.shape[-2:])) / 255
        return {"image": img.contiguous(), "seg": seg, "meta": {"dataset": self.name, "split": "val", "index": int(index)}}


@torch.no_grad()
def slide_logits(probe: nn.Module, backbone: nn.Module, image: Tensor, norm: dict[str, Tensor],
                 crop: tuple[int, int] = CROP, stride: tuple[int, int] = STRIDE, precision: str = "fp32") -> Tensor:
    """mmseg `slide_inference` of a linear probe with the live backbone: image [1, 3, H, W] in [0, 1] ->
    merged logits [1, K, H, W]. Each window is centre-padded to the patch multiple with the mean colour, its
    patch-grid logits resized (bilinear) to the window; windows of one size run as one batch."""
    from snd.eval.features import _vit, extract_tokens
    from snd.eval.protocol import IMAGENET_MEAN, center_pad
    from snd.models.backbone import patch_size

    assert image.ndim == 4 and image.shape[:2] == (1, 3), f"image must be [1, 3, H, W], got {tuple(image.shape)}"
    p = patch_size(_vit(backbone))
    H, W = image.shape[-2:]
    boxes = slide_windows(H, W, crop, stride)
    mean = torch.tensor(IMAGENET_MEAN)
    logits: list[Tensor] = [None] * len(boxes)  # type: ignore[list-item]
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, (y1, y2, x1, x2) in enumerate(boxes):
        by_size.setdefault((y2 - y1, x2 - x1), []).append(i)
    for (h, w), idx in by_size.items():
        wins = torch.cat([image[..., boxes[i][0]:boxes[i][1], boxes[i][2]:boxes[i][3]] for i in idx])
        padded = center_pad(wins, p, mean)
        grid = (padded.shape[-2] // p, padded.shape[-1] // p)
        out = probe(probe.prepare(extract_tokens(backbone, padded, precision), grid, norm))
        out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
        for k, i in enumerate(idx):
            logits[i] = out[k : k + 1]
    return slide_merge(logits, boxes, (H, W))

