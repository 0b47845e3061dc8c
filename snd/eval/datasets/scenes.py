"""Probe samples from multi-view `Scene`s (ScanNet++ and the procedural scenes) through `snd.data`.

Every frame of every scene of the split is one sample (optionally every `frame_stride`-th). Depth and
semantics come from the Scene (ray cast from the annotated mesh); normals are computed from the depth
map and the camera (`normals_from_depth`: camera frame, OpenCV axes, facing the camera), because the
Scene contract exposes depth, not face normals. Frames are rendered by `snd.data` directly at a size
that covers `img_hw` after the center crop, so the crop/resize step is (nearly) an identity.

Segmentation ids above `num_classes` are ignored (255), or with `keep_extra_ids` (the paper protocol's
validation sets) kept (each as id num_classes, which can never read as 255), so that mmseg's union rule can count them
(`snd.eval.protocol.MmsegConfusion`).

With `whole_frame=True` and `frame_hw` (ScanNet++ depth under the paper protocol: FiT3D's 584x876 frames) the
frames are rendered at exactly `frame_hw` and centre-padded to `img_hw` (`ProbeDataset`), the target native;
`image_resize="cv2_cubic"` makes those frames as FiT3D does (`snd.data.scannetpp`).

Scenes are opened lazily and the last `max_open_scenes` are kept per process: iterate in order
(`shuffle=False`, as the feature cache does) to open each scene once.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import numpy as np

from snd.errors import SndError
from snd.eval.datasets.base import IGNORE, ProbeDataset, RawSample
from snd.eval.datasets.transforms import Fit, center_crop_box, normals_from_depth


def render_size(native_hw: tuple[int, int], img_hw: tuple[int, int], fit: Fit) -> tuple[int, int]:
    """Smallest size with the native aspect whose crop (fit='crop') or stretch covers img_hw."""
    H, W = native_hw
    if fit == "resize":
        s = max(img_hw[0] / H, img_hw[1] / W)
    else:
        _, _, ch, cw = center_crop_box(H, W, img_hw)
        s = max(img_hw[0] / ch, img_hw[1] / cw)
    s = min(s, 1.0)  # never render above native resolution
    return max(1, int(math.ceil(H * s))), max(1, int(math.ceil(W * s)))


class SceneFrames(ProbeDataset):
    """All frames of the scenes of one split of an `snd.data` dataset, as probe samples."""

    tasks = ("depth", "normals", "seg")

    def __init__(self, name: str, path: Path, scene_names: list[str], split: str, task: str,
                 img_hw: tuple[int, int], *, fit: Fit = "crop", num_classes: Optional[int] = None,
                 frame_stride: int = 1, cache_dir: Optional[Path] = None, max_open_scenes: int = 2,
                 layout: str = "auto", keep_extra_ids: bool = False, whole_frame: bool = False,
                 frame_hw: Optional[tuple[int, int]] = None, image_resize: str = "bilinear"):
        self.name = name
        super().__init__(split, task, img_hw, fit=fit, whole_frame=whole_frame)
        from snd.data import open_dataset

        if frame_stride < 1:
            raise SndError(f"{name}: frame_stride must be >= 1, got {frame_stride}")
        if not scene_names:
            raise SndError(f"{name}: split {split!r} has no scenes under {path}", path=path)
        self.path, self.num_classes, self.max_open = Path(path), num_classes, max_open_scenes
        self.keep_extra_ids = keep_extra_ids
        probe = open_dataset(self.path, layout, cache_dir=cache_dir).scene(scene_names[0]).camera(0)
        if whole_frame and frame_hw is None:
            raise SndError(f"{name}: whole_frame needs the native frame size frame_hw")
        self.render_hw = (tuple(int(v) for v in frame_hw) if whole_frame
                          else render_size((probe.height, probe.width), self.img_hw, fit))
        self._open_args = dict(layout=layout, height=self.render_hw[0], width=self.render_hw[1], cache_dir=cache_dir,
                               image_resize=image_resize)
        # frames made another way than the default get their own token stores (`snd eval`'s store name)
        self.frame_tag = "" if image_resize == "bilinear" else f"-{image_resize}"
        self._ds = None
        self._scenes: OrderedDict = OrderedDict()
        self.items: list[tuple[str, int]] = []
        for s in scene_names:
            n = len(self._scene(s))
            self.items += [(s, i) for i in range(0, n, frame_stride)]

    def _dataset(self):
        if self._ds is None:
            from snd.data import open_dataset

            a = self._open_args
            self._ds = open_dataset(self.path, a["layout"], height=a["height"], width=a["width"], cache_dir=a["cache_dir"],
                                    image_resize=a["image_resize"])
        return self._ds

    def _scene(self, name: str):
        if name in self._scenes:
            self._scenes.move_to_end(name)
            return self._scenes[name]
        sc = self._dataset().scene(name)
        self._scenes[name] = sc
        while len(self._scenes) > self.max_open:
            self._scenes.popitem(last=False)
        return sc

    def __getstate__(self):  # DataLoader workers reopen scenes themselves
        state = dict(self.__dict__)
        state["_ds"], state["_scenes"] = None, OrderedDict()
        return state

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> RawSample:
        sname, i = self.items[index]
        sc = self._scene(sname)
        raw = RawSample(image=np.asarray(sc.image(i), dtype=np.uint8), id=f"{sname}/{sc.frame_ids[i]}")
        if self.task in ("depth", "normals"):
            d = sc.depth(i)
            if d is None:
                raise SndError(f"{self.name}: scene {sname} has no depth (needs the mesh to ray cast)")
            d = np.asarray(d, dtype=np.float32)
            if self.task == "depth":
                raw.depth = d
            else:
                raw.normals = normals_from_depth(d, sc.camera(i).K)
        else:
            sem = sc.semantic_mask(i)
            if sem is None:
                raise SndError(f"{self.name}: scene {sname} has no semantics (segments_anno.json missing?)")
            sem = np.asarray(sem, dtype=np.int64)
            ok = sem >= 1
            if self.num_classes is not None and not self.keep_extra_ids:
                ok &= sem <= self.num_classes
            seg = np.where(ok, sem - 1, IGNORE)
            if self.keep_extra_ids and self.num_classes is not None:  # every extra id -> num_classes (never 255)
                seg = np.where(ok & (sem > self.num_classes), self.num_classes, seg)
            raw.seg = seg.astype(np.int64)
        return raw
