"""ScanNet `scannet_frames_25k` (25k exported frames of 1,513 scenes): depth and NYU40 segmentation.

Layout under `<data_root>/scannet/` (the unzipped scannet_frames_25k.zip from the ScanNet download script,
`--preprocessed_frames`; `<data_root>/scannet/<scene>/...` without the scannet_frames_25k level works too):
    scannet_frames_25k/<sceneXXXX_XX>/color/<frame>.jpg     RGB (1296x968)
    scannet_frames_25k/<sceneXXXX_XX>/depth/<frame>.png     uint16 millimetres (640x480), 0 = invalid
    scannet_frames_25k/<sceneXXXX_XX>/label/<frame>.png     class ids
    scannetv2-labels.combined.tsv  (optional) maps ScanNet label ids -> nyu40id; without it the label PNGs
                                   must already hold NYU40 ids (1..40, 0 = unlabelled)
Split: a random 80/20 split of all frames with `seed` (the paper's protocol; no official split exists).
Segmentation: NYU40 ids 1..40 -> 0..39, 0 -> 255 (SnD config: 40 classes, reduce_zero_label).
Depth above 10 m is set invalid; with `eval_crop` (the paper protocol: the official ScanNet depth config
has `eigen_crop=True`) validation depth outside the Eigen crop (rows 45:471, cols 41:601 of 480x640) too. Colour (1296x968) and depth (640x480) differ by 0.4% in aspect ratio;
each is center-cropped to `img_hw`'s aspect on its own, so they stay aligned to within that.

`whole_frame=True` (depth, the paper protocol, both splits; `ProbeDataset`): the official depth config feeds the
whole 480x640 frame (`img_scale=(480, 640)`, no Resize; its `eval_mask` indexes a 480x640 map, so its prepared
images share the depth's grid), padded to the patch: snd resizes the 1296x968 colour onto the 640x480 depth grid
(a 0.4 % aspect stretch; the official preparation of its `scannet_probe` frames is not published) and keeps the
native depth.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import numpy as np

from snd.errors import SndError
from snd.eval.datasets.base import IGNORE, ProbeDataset, RawSample
from snd.eval.datasets.io import random_split, read_label_png, read_png_u16, read_rgb
from snd.eval.datasets.registry import OFFICIAL_DEPTH_RANGE, register_dataset
from snd.eval.datasets.transforms import Fit

URL = "http://www.scan-net.org/ (download-scannet.py --preprocessed_frames -> scannet_frames_25k.zip)"
TSV = "scannetv2-labels.combined.tsv"
MAX_DEPTH = OFFICIAL_DEPTH_RANGE["scannet"][1]
EIGEN_CROP = (45, 471, 41, 601)  # rows [45, 471), cols [41, 601): the official ScanNet depth eval_mask


def _base(path: Path) -> Path:
    return path / "scannet_frames_25k" if (path / "scannet_frames_25k").is_dir() else path


def _frames(base: Path) -> list[str]:
    return sorted(f"{p.parent.parent.name}/{p.stem}" for p in base.glob("scene*/color/*.jpg"))


def _check(path: Path) -> str:
    base = _base(path)
    if not base.is_dir() or not any(base.glob("scene*/color/*.jpg")):
        return f"missing {path / 'scannet_frames_25k'}/<scene>/color/*.jpg (get {URL} and unzip it into {path})"
    return "ok"


def read_label_tsv(path: Path) -> np.ndarray:
    """scannetv2-labels.combined.tsv -> lookup table raw ScanNet label id -> nyu40id (0 where unknown)."""
    rows = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            try:
                rows[int(row["id"])] = int(row["nyu40id"])
            except (KeyError, ValueError):
                continue
    if not rows:
        raise SndError(f"{path}: no rows with 'id' and 'nyu40id' columns", path=path)
    lut = np.zeros(max(rows) + 1, dtype=np.int64)
    for k, v in rows.items():
        lut[k] = v
    return lut


def eigen_crop(depth: np.ndarray) -> np.ndarray:
    """Depth outside the Eigen crop (rows 45:471, cols 41:601) set to 0 (invalid); the official `eval_mask`
    indexes those rows/columns whatever the map's size, so only 480x640 maps are accepted."""
    if depth.shape != (480, 640):
        raise SndError(f"ScanNet Eigen crop needs 480x640 depth, got {depth.shape}")
    r0, r1, c0, c1 = EIGEN_CROP
    out = np.zeros_like(depth)
    out[r0:r1, c0:c1] = depth[r0:r1, c0:c1]
    return out


class ScanNetFrames(ProbeDataset):
    name = "scannet"
    tasks = ("depth", "seg")

    def __init__(self, path: Path, split: str, task: str, img_hw: tuple[int, int], *, fit: Fit = "crop",
                 seed: int = 0, train_fraction: float = 0.8, eval_crop: bool = False, whole_frame: bool = False):
        super().__init__(split, task, img_hw, fit=fit, whole_frame=whole_frame)
        status = _check(Path(path))
        if status != "ok":
            raise SndError(f"ScanNet frames: {status}", path=path, hint=f"download {URL}")
        self.base = _base(Path(path))
        self.eval_crop = eval_crop
        self.ids = random_split(_frames(self.base), train_fraction=train_fraction, seed=seed, split=split)
        tsv = Path(path) / TSV
        self._lut: Optional[np.ndarray] = read_label_tsv(tsv) if tsv.is_file() else None

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> RawSample:
        fid = self.ids[index]
        scene, frame = fid.split("/")
        d = self.base / scene
        raw = RawSample(image=read_rgb(d / "color" / f"{frame}.jpg"), id=fid)
        if self.task == "depth":
            depth = read_png_u16(d / "depth" / f"{frame}.png").astype(np.float32) / 1000.0
            depth = np.where(depth <= MAX_DEPTH, depth, 0.0).astype(np.float32)
            if self.split == "val" and self.eval_crop:
                depth = eigen_crop(depth)
            raw.depth = depth
        else:
            lab = read_label_png(d / "label" / f"{frame}.png")
            if self._lut is not None:
                lab = np.where(lab < len(self._lut), self._lut[np.minimum(lab, len(self._lut) - 1)], 0)
            elif lab.max() > 40:
                raise SndError(
                    f"ScanNet label {d / 'label' / f'{frame}.png'} has id {lab.max()} > 40 (raw ScanNet ids)",
                    hint=f"put {TSV} (ScanNet repo) into {self.base.parent if self.base.name == 'scannet_frames_25k' else self.base}",
                )
            raw.seg = np.where((lab >= 1) & (lab <= 40), lab - 1, IGNORE).astype(np.int64)
        return raw


@register_dataset("scannet", folder="scannet", tasks=("depth", "seg"), check=_check, num_classes=40,
                  depth_range=OFFICIAL_DEPTH_RANGE["scannet"],
                  protocol="scannet_frames_25k, random 80/20 frame split (seed); NYU40 classes; depth <= 10 m")
def build(path: Path, split: str, task: str, img_hw: tuple[int, int], **kw) -> ScanNetFrames:
    return ScanNetFrames(path, split, task, img_hw, **kw)
