"""The two evaluation protocols of `snd eval`, and the rules of the paper one as pure functions.

`paper` (the default) computes what the official evaluation computes around the metric functions
(`evaluation1/` mmseg configs and `evaluation2/` Probe3D scripts of davidshavin4/Splat-and-Distill):

* depth, test time: the prediction is the mean of the image's and the flipped image's (flipped back),
  mmseg `MultiScaleFlipAug(flip=True)`, and it is scored at the ground truth's own resolution
  (`flip_average`; datasets return the native-resolution target with `native_target=True`);
* depth input: at test time the whole native frame (NYU, ScanNet 480x640; ScanNet++ 584x876; KITTI the
  352x1216 KB crop) centre-padded to the patch as dinov2's `CenterPadding` does, never resized (`whole_frame`,
  `paper_val_hw`); in training the configs' rotation, flip, 416x544 (KITTI 352x704) crop and colour jitter of
  that native frame, drawn per item with the backbone live (`snd.eval.depth_aug`);
* depth crops on the validation ground truth: NYUv2 and ScanNet Eigen (rows 45:471, cols 41:601 of 480x640),
  KITTI Garg fractions of the 352x1216 KB-cropped map (`snd.eval.datasets.kitti.garg_mask`);
* depth optimiser: AdamW whose beta1 follows mmcv's `OneCycleMomentumUpdaterHook` (`onecycle_beta1`);
* segmentation labels: a ground-truth id >= the class count (other than 255) is not a class, but the
  prediction at that pixel still counts in the predicted class's union (mmseg `intersect_and_union`
  with `torch.histc`; `MmsegConfusion`).

`fast` is the cached single-pass path snd had before the paper protocol existed: one pass at the probe
input size, no crops beyond the dataset's own, beta1 fixed. It is what keeps the suite under 2 h; every
results table and JSON says which protocol made it. docs/evaluation.md lists per task what differs and
how much it moves the numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from snd.eval.metrics import confusion_matrix, seg_metrics_from_confusion

__all__ = ["Protocol", "PROTOCOLS", "check_protocol", "onecycle_beta1", "flip_average", "MmsegConfusion", "FlippedImages",
           "dataset_kwargs", "center_pad", "pad_to", "padded_hw", "paper_val_hw", "paper_train_hw", "pad_image", "PAPER_CORR_HW", "PAPER_VAL_NATIVE_HW", "PAPER_TRAIN_NATIVE_HW",
           "zero_normals_as_90deg", "IMAGENET_MEAN", "mmseg_seg_metrics", "PAPER_REV"]

Protocol = Literal["paper", "fast"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv2's normalisation mean: padding with it normalises to 0
PROTOCOLS: tuple[str, ...] = ("paper", "fast")


def check_protocol(protocol: str) -> str:
    """`protocol` itself, or a ValueError naming the two protocols."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {protocol!r}; expected one of {list(PROTOCOLS)}")
    return protocol


def onecycle_beta1(step: int, total: int, *, base: float = 0.85, peak: float = 0.95, pct_start: float = 0.3) -> float:
    """AdamW beta1 at iteration `step` (0-based) of `total` under mmcv's `momentum_config=dict(policy="OneCycle")`.

    mmcv (`OneCycleMomentumUpdaterHook`, defaults base 0.85, max 0.95, pct_start 0.3, cosine, two phases):
    phase 1 ends at iteration pct_start·total − 1 and anneals max -> base; phase 2 ends at total − 1 and
    anneals base -> max; each phase is cos-annealed, end + ½(start − end)(cos(π·t) + 1), with t the
    iteration's fraction of the phase (phase 2 starts counting at phase 1's end).
    """
    end1 = float(pct_start * total) - 1
    if step <= end1:
        start, a, b, end = 0.0, peak, base, end1
    else:
        start, a, b, end = end1, base, peak, float(total - 1)
    t = (step - start) / (end - start) if end != start else 1.0
    return b + 0.5 * (a - b) * (math.cos(math.pi * t) + 1)


def flip_average(pred: Tensor, pred_of_flipped: Tensor) -> Tensor:
    """mmseg's flip test: (pred + flip(pred of the flipped image)) / 2, the flip along the last (width) axis.

    Args:
        pred: [B, ..., H, W] prediction of the image.
        pred_of_flipped: same shape, the prediction of the horizontally flipped image (not flipped back).
    """
    assert pred.shape == pred_of_flipped.shape, f"{tuple(pred.shape)} vs {tuple(pred_of_flipped.shape)}"
    return 0.5 * (pred + pred_of_flipped.flip(-1))


def mmseg_seg_metrics(conf: Tensor, extra_pred: Tensor) -> dict:
    """aAcc / mIoU / mAcc (percent) as mmseg computes them when some GT ids are >= the class count.

    Args:
        conf: [K, K] confusion matrix (rows GT, columns prediction) of the pixels with GT ids in [0, K).
        extra_pred: [K] predicted-class counts at pixels whose GT id is >= K (and not the ignore label).
    mmseg counts GT areas with `histc(label, K, 0, K-1)` (ids >= K drop out) but predicted areas over every
    non-ignored pixel, so those pixels enter each predicted class's union (lowering its IoU) and nothing
    else: aAcc and mAcc are those of `conf`. Written with `seg_metrics_from_confusion` (unchanged) on a
    (K+1)x(K+1) matrix whose extra GT row holds `extra_pred`.
    """
    K = conf.shape[0]
    assert conf.shape == (K, K) and extra_pred.shape == (K,), f"conf {tuple(conf.shape)}, extra {tuple(extra_pred.shape)}"
    big = torch.zeros(K + 1, K + 1, dtype=torch.float64)
    big[:K, :K] = conf.double()
    big[K, :K] = extra_pred.double()
    with_extra = seg_metrics_from_confusion(big)
    inside = seg_metrics_from_confusion(conf)
    iou = torch.tensor(with_extra["IoU"][:K], dtype=torch.float64)
    iou = iou[~torch.isnan(iou)]
    return {"aAcc": inside["aAcc"], "mIoU": float(iou.mean()) if iou.numel() else math.nan, "mAcc": inside["mAcc"],
            "IoU": with_extra["IoU"][:K], "Acc": inside["Acc"]}


@dataclass
class MmsegConfusion:
    """`ConfusionAccumulator` with mmseg's rule for GT ids >= the class count (see `mmseg_seg_metrics`)."""

    num_classes: int
    ignore_index: int = 255
    conf: Tensor | None = None
    extra: Tensor | None = None

    def update(self, pred: Tensor, gt: Tensor) -> None:
        gt = gt.to(pred.device).long()
        inside = (gt >= 0) & (gt < self.num_classes)
        outside = ~inside & (gt != self.ignore_index)
        m = confusion_matrix(pred, torch.where(inside, gt, self.ignore_index), self.num_classes,
                             ignore_index=self.ignore_index)
        e = torch.bincount(pred[outside].reshape(-1).long(), minlength=self.num_classes)[: self.num_classes]
        self.conf = m if self.conf is None else self.conf + m
        self.extra = e if self.extra is None else self.extra + e

    def compute(self) -> dict:
        if self.conf is None:
            return {"aAcc": math.nan, "mIoU": math.nan, "mAcc": math.nan}
        return mmseg_seg_metrics(self.conf.cpu(), self.extra.cpu())


# Per (dataset, task): the validation-set options that make a dataset follow the official config under
# the paper protocol (each is the dataset's own keyword; docs/datasets.md). One table, so nothing
# downstream sniffs dataset names.
_PAPER_VAL_KW: dict[tuple[str, str], dict] = {
    ("scannet", "depth"): {"eval_crop": True, "whole_frame": True},  # official ScanNet depth config: eigen_crop=True
    ("kitti", "depth"): {"garg_on": "kb", "whole_frame": True},  # Garg fractions of the 352x1216 KB-cropped map
    ("nyuv2", "depth"): {"whole_frame": True, "depth_set": "bts"},  # the config's data_depth (BTS lists), not the .mat
    ("scannetpp", "depth"): {"whole_frame": True},
    ("scannetpp", "seg"): {"keep_extra_ids": True},  # ids beyond the 100 classes enter mmseg's union
    ("synth", "seg"): {"keep_extra_ids": True},
    ("scannet1500", "correspondence"): {"intrinsics": "npz"},  # each scene's intrinsics.npz, as Probe3D
    ("nyuv2", "normals"): {"probe3d_test": True},  # 480x480 centre crop padded to `paper_val_hw`, raw depth > 0
}
# Per (dataset, task): the training-set options of the paper protocol. Depth: the official configs test on the
# whole native frame (`test_cfg` mode "whole", no Resize in the test pipeline, dinov2's `CenterPadding` to the
# patch in a forward pre-hook of the backbone) and train on random crops of the native frame (416x544 of NYU's
# NYUCrop region [45:472, 43:608], of ScanNet's and ScanNet++'s whole frames; 352x704 of KITTI's KB crop): the
# training split is that native frame (`ProbeDataset.native_frame`), which `snd.eval.depth_aug.DepthTrain` rotates,
# flips, crops and colour-jitters afresh for every item (the backbone runs live on it); un-augmented, the same
# set is what the trivial baseline is fit on.
_PAPER_TRAIN_KW: dict[tuple[str, str], dict] = {
    (name, "depth"): {"whole_frame": True, "native_target": True} for name in ("nyuv2", "scannet", "scannetpp", "kitti")}
_PAPER_TRAIN_KW["nyuv2", "depth"]["depth_set"] = "bts"  # nyu_train.txt: BTS's 24,231 frames (datasets/nyu_depth.py)
# Validation inputs the paper protocol fixes, before the ViT's padding: Probe3D's NYU normals test (the 480x480
# centre crop) and the official depth test's whole frames (NYU and ScanNet 480x640, ScanNet++ FiT3D's 584x876
# = the 1168x1752 DSLR frame halved, KITTI the 352x1216 KB crop). The ViT sees them centre-padded to a multiple
# of its patch (`paper_val_hw`: 490x490 / 490x644 / 588x882 / 364x1218 for patch 14; 480x480 / 480x640 / 592x880
# / 352x1216 for 16). The others use `snd eval`'s size. The probe is a 1x1 head, so it applies to any patch grid.
PAPER_VAL_NATIVE_HW: dict[tuple[str, str], tuple[int, int]] = {
    ("nyuv2", "normals"): (480, 480), ("nyuv2", "depth"): (480, 640), ("scannet", "depth"): (480, 640),
    ("scannetpp", "depth"): (584, 876), ("kitti", "depth"): (352, 1216)}
# The frame the official depth training crops from, at its native scale (`paper_train_hw`: NYU's 427x565 NYUCrop
# region, padded 434x574 for /14, 432x576 for /16: the un-augmented training set's size); the crops themselves are
# `snd.eval.depth_aug.PAPER_DEPTH_AUG`'s. The others train at `snd eval`'s size (or their own set's, GeoNet / mmseg
# crops).
PAPER_TRAIN_NATIVE_HW: dict[tuple[str, str], tuple[int, int]] = {
    ("nyuv2", "depth"): (427, 565), ("scannet", "depth"): (480, 640), ("scannetpp", "depth"): (584, 876),
    ("kitti", "depth"): (352, 1216)}
# Correspondence input size under the paper protocol (Probe3D resizes ScanNet frames to 480x640); the ViT
# centre-pads them to a multiple of its patch (490x644 for 14, unchanged for 16, `center_pad` in the model
# function); datasets not listed keep `snd eval`'s size.
PAPER_CORR_HW: dict[str, tuple[int, int]] = {"scannet1500": (480, 640)}
# Bumped when a paper rule changes what a record computes, so result folders (and trivial baselines) made under
# the old rule are never resumed: 2 = KITTI's whole KB crop, 3 = NYU / ScanNet / ScanNet++ depth whole frames,
# 4 = depth trained on the configs' augmented crops (live), seg trained shuffled as mmseg does, ScanNet++ depth
# frames made as FiT3D's (cv2 cubic), correspondence inputs normalised as Probe3D's, NYU depth on the BTS set.
PAPER_REV = 4


def padded_hw(hw: tuple[int, int], patch: int) -> tuple[int, int]:
    """`hw` rounded up to multiples of `patch`: the size `center_pad` gives (Probe3D's / the official
    `CenterPadding`: 480x640 -> 490x644 for patch 14, 480x640 itself for 16)."""
    return -(-int(hw[0]) // patch) * patch, -(-int(hw[1]) // patch) * patch


def paper_val_hw(name: str, task: str, patch: int) -> tuple[int, int] | None:
    """The paper protocol's fixed validation input of (name, task) as the ViT of patch `patch` sees it, or None."""
    hw = PAPER_VAL_NATIVE_HW.get((name, task))
    return None if hw is None else padded_hw(hw, patch)


def paper_train_hw(name: str, task: str, patch: int) -> tuple[int, int] | None:
    """The paper protocol's fixed training input of (name, task) for patch `patch`, or None."""
    hw = PAPER_TRAIN_NATIVE_HW.get((name, task))
    return None if hw is None else padded_hw(hw, patch)


def dataset_kwargs(protocol: str, name: str, task: str, split: str) -> dict:
    """Keyword options of `get_dataset(name, ..., split, task)` under `protocol` ({} for fast: today's data).

    Paper, validation split: depth targets at their native resolution (`native_target`), plus the
    dataset's official crop / label options from `_PAPER_VAL_KW`; training split: `_PAPER_TRAIN_KW`.
    """
    if check_protocol(protocol) == "fast":
        return {}
    if split != "val":
        return dict(_PAPER_TRAIN_KW.get((name, task), {}))
    kw = dict(_PAPER_VAL_KW.get((name, task), {}))
    if task == "depth":
        kw["native_target"] = True
    return kw


def center_pad(images: Tensor, patch: int, fill: Tensor) -> Tensor:
    """Probe3D's `center_padding`: pad [B, 3, H, W] to multiples of `patch` (`padded_hw`), the extra
    rows/columns split as (pad // 2 before, the rest after), with `fill` [3] per channel (Probe3D pads
    normalised images with 0: pass the value that normalises to 0, the backbone's mean)."""
    return pad_to(images, padded_hw(images.shape[-2:], patch), fill)


def pad_to(images: Tensor, hw: tuple[int, int], fill: Tensor) -> Tensor:
    """[B, 3, H, W] centre-padded to `hw` (>= (H, W)) as `center_pad` splits it: (pad // 2 before, the rest
    after), with `fill` [3] per channel."""
    B, _, H, W = images.shape
    ph, pw = int(hw[0]) - H, int(hw[1]) - W
    if ph < 0 or pw < 0:
        raise ValueError(f"cannot pad {H}x{W} to the smaller {hw[0]}x{hw[1]}")
    if not ph and not pw:
        return images
    out = fill.to(images).view(1, 3, 1, 1).expand(B, 3, H + ph, W + pw).clone()
    out[..., ph // 2 : ph // 2 + H, pw // 2 : pw // 2 + W] = images
    return out


def pad_image(image, img_hw: tuple[int, int], where: str) -> Tensor:
    """A native uint8 [H, W, 3] image (or a [3, H, W] float tensor in [0, 1]) -> [3, *img_hw] in [0, 1],
    centre-padded (never resized) with the ImageNet mean, which normalises to the official code's zero padding;
    an image larger than `img_hw` is an SndError naming `where`."""
    from snd.errors import SndError

    if torch.is_tensor(image) and image.is_floating_point():
        img = image
    else:
        img = torch.tensor(image).permute(2, 0, 1).float() / 255  # a copy: rendered frames may be read-only
    if img.shape[-2] > img_hw[0] or img.shape[-1] > img_hw[1]:
        raise SndError(f"{where}: the {img.shape[-2]}x{img.shape[-1]} image does not fit the input size "
                       f"{img_hw[0]}x{img_hw[1]} (it is padded to it, never resized)")
    return pad_to(img[None], img_hw, torch.tensor(IMAGENET_MEAN))[0].contiguous()


def zero_normals_as_90deg(pred: Tensor, gt: Tensor) -> Tensor:
    """`gt` with every zero normal at a valid (finite) pixel replaced by a unit vector orthogonal to `pred`.

    Probe3D scores such a pixel as acos(cosine_similarity(pred, 0)) = 90 degrees (its validity is raw depth
    > 0, not the normal); `snd.eval.metrics.normal_metrics` (unchanged) skips zero normals, so the
    substitute makes it score them at exactly 90 degrees too.

    Args:
        pred: [B, 3, H, W] predicted normals; gt: [B, 3, H, W], NaN = invalid.
    """
    assert pred.shape == gt.shape and pred.shape[1] == 3, f"pred {tuple(pred.shape)} vs gt {tuple(gt.shape)}"
    zero = torch.isfinite(gt).all(1, keepdim=True) & (gt.norm(dim=1, keepdim=True) <= 1e-6)
    p = torch.nn.functional.normalize(pred.float(), dim=1)
    axis = torch.zeros_like(p).scatter_(1, p.abs().argmin(1, keepdim=True), 1.0)  # least parallel axis
    ortho = torch.nn.functional.normalize(torch.cross(p, axis, dim=1), dim=1)
    return torch.where(zero, ortho.to(gt.dtype), gt)


class FlippedImages(torch.utils.data.Dataset):
    """`dataset` with every image flipped horizontally (targets untouched): what the token cache of the
    paper protocol's flip test is extracted from (`ensure_features(..., split="val_flip")`)."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.frame_tag = getattr(dataset, "frame_tag", "")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.dataset[i])
        item["image"] = item["image"].flip(-1)
        return item
