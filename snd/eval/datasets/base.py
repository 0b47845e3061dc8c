"""The one sample format every probe dataset yields, and the base class that produces it.

A subclass lists its items and loads one raw sample at native resolution (`RawSample`, numpy); the base
class crops/resizes it to `img_hw` with the rules of `transforms.py` and converts to tensors:

    image   [3, H, W] float32 in [0, 1]
    depth   [H, W]    float32 metres, 0 = invalid             (task "depth")
    normals [3, H, W] float32 unit vectors, all-zero = invalid (task "normals")
    seg     [H, W]    int64 class ids 0..C-1, 255 = ignore    (task "seg")
    meta    dict: dataset (str), split (str), index (int), id (str)

With `native_target = True` (the paper protocol's validation sets: depth is scored at the ground truth's
own resolution) the target keeps its native resolution: it is only center-cropped to the region the
image's crop covers (`fit="crop"`), never resized.

With `whole_frame=True` (the paper protocol's depth sets, both splits: the official depth test feeds the whole
native frame, `test_cfg` mode "whole" without a Resize) the image is the dataset's native frame centre-padded
(never resized) to `img_hw` with the ImageNet mean (`snd.eval.protocol.pad_image`, dinov2's `CenterPadding`)
and the target is the native one. The frame is the image at its target's size: an image stored at another
size than its target (ScanNet's 1296x968 colour beside its 640x480 depth) is resized onto the target's grid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from snd.eval.datasets.registry import SPLITS, TASKS
from snd.eval.datasets.transforms import (Fit, center_crop_box, resize_depth, resize_image, resize_labels,
                                          resize_normals)
from snd.errors import SndError

IGNORE = 255


@dataclass
class RawSample:
    """One sample at native resolution; targets the task does not need may be None."""

    image: np.ndarray  # [H, W, 3] uint8
    id: str
    depth: Optional[np.ndarray] = None  # [H', W'] float32 metres (may differ in size from the image)
    normals: Optional[np.ndarray] = None  # [H', W', 3] float32
    seg: Optional[np.ndarray] = None  # [H', W'] int64, 255 ignore


def check_args(name: str, split: str, task: str, tasks: tuple[str, ...], img_hw: tuple[int, int]) -> None:
    if split not in SPLITS:
        raise SndError(f"{name}: unknown split {split!r}; expected one of {list(SPLITS)}")
    if task not in TASKS:
        raise SndError(f"{name}: unknown task {task!r}; expected one of {list(TASKS)}")
    if task not in tasks:
        raise SndError(f"dataset {name!r} has no {task!r} task; it supports {list(tasks)}")
    if len(img_hw) != 2 or min(img_hw) <= 0:
        raise SndError(f"{name}: img_hw must be (height, width) > 0, got {img_hw}")


class ProbeDataset(torch.utils.data.Dataset):
    """Base of every single-image probe dataset (see the module docstring for the sample format)."""

    name: str = "?"
    tasks: tuple[str, ...] = ()
    native_target: bool = False  # targets at their own resolution (cropped like the image, not resized)

    def __init__(self, split: str, task: str, img_hw: tuple[int, int], *, fit: Fit = "crop", whole_frame: bool = False):
        check_args(self.name, split, task, self.tasks, img_hw)
        if fit not in ("crop", "resize"):
            raise SndError(f"{self.name}: fit must be 'crop' or 'resize', got {fit!r}")
        self.split, self.task, self.fit = split, task, fit
        self.img_hw = (int(img_hw[0]), int(img_hw[1]))
        self.whole_frame = whole_frame  # the native frame padded to img_hw, native target (module docstring)

    # -- subclass API ------------------------------------------------------------------------------
    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self, index: int) -> RawSample:  # pragma: no cover - abstract
        """Raw sample `index` at native resolution, with the target of `self.task` filled in."""
        raise NotImplementedError

    # -- the common part ---------------------------------------------------------------------------
    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range [0, {len(self)})")
        if self.whole_frame:
            return self._whole_frame_item(index)
        raw = self.load(index)
        out: dict[str, Any] = {"image": resize_image(raw.image, self.img_hw, fit=self.fit)}
        if self.task == "depth":
            if raw.depth is None:
                raise SndError(f"{self.name}: sample {raw.id} has no depth")
            out["depth"] = resize_depth(raw.depth, self.target_hw(raw.depth.shape), fit=self.fit)
        elif self.task == "normals":
            if raw.normals is None:
                raise SndError(f"{self.name}: sample {raw.id} has no normals")
            out["normals"] = resize_normals(raw.normals, self.target_hw(raw.normals.shape), fit=self.fit)
        elif self.task == "seg":
            if raw.seg is None:
                raise SndError(f"{self.name}: sample {raw.id} has no segmentation")
            out["seg"] = resize_labels(raw.seg, self.target_hw(raw.seg.shape), fit=self.fit)
        out["meta"] = {"dataset": self.name, "split": self.split, "index": int(index), "id": str(raw.id)}
        return out

    def native_frame(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        """(image uint8 [H, W, 3], target, id): the native frame at its target's size, unpadded (`whole_frame`).

        What `whole_frame` pads, and what the paper protocol's depth training crops from
        (`snd.eval.depth_aug.DepthTrain`). An image stored at another size than its target (ScanNet's 1296x968
        colour beside its 640x480 depth) is resized onto the target's grid; the target keeps its size and gets
        only the dtype / invalid rules of its task."""
        raw = self.load(index)
        target = getattr(raw, self.task)
        if target is None:
            raise SndError(f"{self.name}: sample {raw.id} has no {self.task}")
        thw = (int(target.shape[0]), int(target.shape[1]))
        image = raw.image if raw.image.shape[:2] == thw else resize_image(raw.image, thw, fit="resize")
        resize = {"depth": resize_depth, "normals": resize_normals, "seg": resize_labels}[self.task]
        return image, resize(target, thw, fit="resize"), str(raw.id)

    def _whole_frame_item(self, index: int) -> dict[str, Any]:
        """The native frame centre-padded to `img_hw` and its native target (`whole_frame`, module docstring)."""
        from snd.eval.protocol import pad_image

        image, target, rid = self.native_frame(index)
        return {"image": pad_image(image, self.img_hw, f"{self.name} {self.split} {rid} (whole frame)"),
                self.task: target, "meta": {"dataset": self.name, "split": self.split, "index": int(index), "id": rid}}

    def target_hw(self, native_shape: tuple[int, ...]) -> tuple[int, int]:
        """Size of the returned target: `img_hw`, or with `native_target` the native target's region that the
        image's center crop covers (the whole target with fit="resize"): cropping to it resizes nothing."""
        if not self.native_target:
            return self.img_hw
        h, w = int(native_shape[0]), int(native_shape[1])
        if self.fit == "resize":
            return h, w
        _, _, ch, cw = center_crop_box(h, w, self.img_hw)
        return ch, cw
