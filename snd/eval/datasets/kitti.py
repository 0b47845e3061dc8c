"""KITTI depth: RGB + projected LiDAR ground truth (uint16 PNG, metres x 256, 0 = invalid).

Two layouts under `<data_root>/kitti/`, tried in this order:

1. A split-file layout (Eigen split as BTS / the Monocular-Depth-Estimation-Toolbox write it): files
   `kitti_train.txt` + `kitti_val.txt` or `eigen_train_files_with_gt.txt` + `eigen_test_files_with_gt.txt`,
   one sample per line: `<rgb path> <depth path | None> [focal]`; RGB paths are resolved against kitti/,
   kitti/raw/ or kitti/images/, depth paths against kitti/, kitti/depth/ or
   kitti/data_depth_annotated/{train,val}/ (`*_depth` PNGs of data_depth_annotated.zip). Lines without
   depth are skipped.
2. The depth-selection layout (the paper's "random 85/15", seeded):
   `depth_selection/val_selection_cropped/image/*.png` and `.../groundtruth_depth/*.png`
   (from data_depth_selection.zip, https://www.cvlibs.net/datasets/kitti/eval_depth.php).

Raw frames (~375x1242) get the KB crop (bottom-centred 352x1216, as the toolbox); depth above 80 m is
invalid; on the val split depth outside the Garg crop is set invalid (standard KITTI evaluation). Where the
Garg fractions apply: `garg_on="kb"` (the paper protocol, as the official `eval_mask`: fractions of the
352x1216 KB-cropped map, rows 143:349 and cols 43:1172) or `garg_on="full"` (fractions of the full
375x1242 frame, then the KB crop: ~8 % more pixels; the fast protocol keeps it).

`whole_frame=True` (the paper protocol, both splits; `ProbeDataset`): the image is the whole 352x1216 KB crop
centre-padded (never resized) to `img_hw` with the ImageNet mean, as the official depth test feeds it (`test_cfg`
mode "whole", no Resize in its pipeline, dinov2's `CenterPadding` to the patch: 364x1218 for /14, 352x1216 itself
for /16), and the depth stays the native 352x1216 map: the prediction of the padded frame is resized onto it, as
the official `encode_decode` resizes to `ori_shape`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from snd.errors import SndError
from snd.eval.datasets.base import ProbeDataset, RawSample
from snd.eval.datasets.io import first_existing, random_split, read_png_u16, read_rgb
from snd.eval.datasets.registry import OFFICIAL_DEPTH_RANGE, register_dataset
from snd.eval.datasets.transforms import Fit

URL = "https://www.cvlibs.net/datasets/kitti/eval_depth.php (data_depth_selection.zip or data_depth_annotated.zip + raw)"
SPLIT_FILES = (("kitti_train.txt", "kitti_val.txt"), ("eigen_train_files_with_gt.txt", "eigen_test_files_with_gt.txt"))
SELECTION = Path("depth_selection") / "val_selection_cropped"
MAX_DEPTH = OFFICIAL_DEPTH_RANGE["kitti"][1]
KB_HW = (352, 1216)
GARG = (0.40810811, 0.99189189, 0.03594771, 0.96405229)  # rows/cols fractions of the full 375x1242 frame
FULL_HW = (375, 1242)


def _split_files(path: Path) -> Optional[tuple[Path, Path]]:
    for tr, va in SPLIT_FILES:
        if (path / tr).is_file() and (path / va).is_file():
            return path / tr, path / va
    return None


def _check(path: Path) -> str:
    if _split_files(path) is not None:
        return "ok"
    if (path / SELECTION / "image").is_dir() and (path / SELECTION / "groundtruth_depth").is_dir():
        return "ok"
    return (f"missing {path / SELECTION}/{{image,groundtruth_depth}} or split files "
            f"{path}/kitti_train.txt + kitti_val.txt (get {URL})")


def kb_crop_box(h: int, w: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) of the KB crop: bottom-centred 352x1216 (identity for smaller images)."""
    if h < KB_HW[0] or w < KB_HW[1]:
        return 0, 0, h, w
    return h - KB_HW[0], (w - KB_HW[1]) // 2, KB_HW[0], KB_HW[1]


def garg_mask(h: int, w: int, *, offset: tuple[int, int] = (0, 0), full_hw: tuple[int, int] = FULL_HW) -> np.ndarray:
    """Garg et al.'s evaluation crop for an array that is a window at `offset` of a `full_hw` frame."""
    H, W = full_hw
    r0, r1 = int(GARG[0] * H) - offset[0], int(GARG[1] * H) - offset[0]
    c0, c1 = int(GARG[2] * W) - offset[1], int(GARG[3] * W) - offset[1]
    m = np.zeros((h, w), dtype=bool)
    m[max(r0, 0) : max(r1, 0), max(c0, 0) : max(c1, 0)] = True
    return m


class KITTIDepth(ProbeDataset):
    name = "kitti"
    tasks = ("depth",)

    def __init__(self, path: Path, split: str, task: str, img_hw: tuple[int, int], *, fit: Fit = "crop",
                 seed: int = 0, train_fraction: float = 0.85, kb_crop: bool = True, eval_crop: bool = True,
                 garg_on: str = "full", whole_frame: bool = False):
        super().__init__(split, task, img_hw, fit=fit, whole_frame=whole_frame)
        self.path = Path(path)
        status = _check(self.path)
        if status != "ok":
            raise SndError(f"KITTI: {status}", path=self.path, hint=f"download {URL}")
        if garg_on not in ("kb", "full"):
            raise SndError(f"KITTI: garg_on must be 'kb' or 'full', got {garg_on!r}")
        self.kb_crop, self.eval_crop, self.garg_on = kb_crop, eval_crop, garg_on
        files = _split_files(self.path)
        self.items: list[tuple[Path, Path]] = []
        if files is not None:
            self.layout = "split_files"
            lst = files[0] if split == "train" else files[1]
            for ln in lst.read_text().splitlines():
                parts = ln.split()
                if len(parts) < 2 or parts[1] == "None":
                    continue
                self.items.append((self._resolve_rgb(parts[0]), self._resolve_depth(parts[1])))
            if not self.items:
                raise SndError(f"KITTI: no samples with depth in {lst}", path=lst)
        else:
            self.layout = "depth_selection"
            imgs = sorted(p.name for p in (self.path / SELECTION / "image").glob("*.png"))
            for name in random_split(imgs, train_fraction=train_fraction, seed=seed, split=split):
                gt = name.replace("_image_", "_groundtruth_depth_", 1)
                self.items.append((self.path / SELECTION / "image" / name,
                                   self.path / SELECTION / "groundtruth_depth" / gt))

    def _resolve_rgb(self, rel: str) -> Path:
        rel = rel.lstrip("/")
        cands = [self.path / rel, self.path / "raw" / rel, self.path / "images" / rel]
        return first_existing(*cands) or cands[0]

    def _resolve_depth(self, rel: str) -> Path:
        rel = rel.lstrip("/")
        cands = [self.path / rel, self.path / "depth" / rel, self.path / "data_depth_annotated" / "train" / rel,
                 self.path / "data_depth_annotated" / "val" / rel]
        return first_existing(*cands) or cands[0]

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> RawSample:
        rgb_path, depth_path = self.items[index]
        image = read_rgb(rgb_path)
        depth = read_png_u16(depth_path).astype(np.float32) / 256.0
        if depth.shape != image.shape[:2]:
            raise SndError(f"KITTI: depth {depth_path} is {depth.shape}, image {rgb_path} is {image.shape[:2]}")
        depth = np.where(depth <= MAX_DEPTH, depth, 0.0).astype(np.float32)
        h, w = depth.shape
        if self.split == "val" and self.eval_crop and self.garg_on == "full":
            offset = (FULL_HW[0] - KB_HW[0], (FULL_HW[1] - KB_HW[1]) // 2) if (h, w) == KB_HW else (0, 0)
            full = FULL_HW if (h, w) == KB_HW else (h, w)
            depth = np.where(garg_mask(h, w, offset=offset, full_hw=full), depth, 0.0).astype(np.float32)
        if self.kb_crop:
            t, l, ch, cw = kb_crop_box(h, w)
            image, depth = image[t : t + ch, l : l + cw], depth[t : t + ch, l : l + cw]
        if self.split == "val" and self.eval_crop and self.garg_on == "kb":
            depth = np.where(garg_mask(*depth.shape, full_hw=depth.shape), depth, 0.0).astype(np.float32)
        return RawSample(image=np.ascontiguousarray(image), id=rgb_path.stem if self.layout == "depth_selection"
                         else str(rgb_path.relative_to(self.path)) if rgb_path.is_relative_to(self.path)
                         else rgb_path.name, depth=np.ascontiguousarray(depth))


@register_dataset("kitti", folder="kitti", tasks=("depth",), check=_check, depth_range=OFFICIAL_DEPTH_RANGE["kitti"],
                  protocol="split files (Eigen) if present, else depth selection random 85/15 (seed); KB crop; "
                           "depth <= 80 m, Garg crop on val")
def build(path: Path, split: str, task: str, img_hw: tuple[int, int], **kw) -> KITTIDepth:
    return KITTIDepth(path, split, task, img_hw, **kw)
