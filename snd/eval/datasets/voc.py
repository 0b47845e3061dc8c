"""Pascal VOC 2012 segmentation: 21 classes (background = 0), 255 = ignore, the official train/val lists.

Layout under `<data_root>/voc/` (the unpacked VOCtrainval_11-May-2012.tar, any of VOCdevkit/VOC2012/,
VOC2012/ or the folder itself):
    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png          palette ('P') PNG: pixel values ARE the class ids (255 = boundary)
    ImageSets/Segmentation/{train,val}.txt
An RGB-converted SegmentationClass PNG is mapped back through the standard VOC colour map.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from snd.errors import SndError
from snd.eval.datasets.base import ProbeDataset, RawSample
from snd.eval.datasets.io import read_rgb
from snd.eval.datasets.registry import register_dataset
from snd.eval.datasets.transforms import Fit

URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"


def voc_colormap(n: int = 256) -> np.ndarray:
    """The standard VOC palette [n, 3] uint8 (bit-interleaved class id -> colour)."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def _base(path: Path) -> Path:
    for p in (path / "VOCdevkit" / "VOC2012", path / "VOC2012", path):
        if (p / "ImageSets" / "Segmentation").is_dir():
            return p
    return path / "VOCdevkit" / "VOC2012"


def _check(path: Path) -> str:
    b = _base(path)
    need = [b / "JPEGImages", b / "SegmentationClass", b / "ImageSets/Segmentation/train.txt",
            b / "ImageSets/Segmentation/val.txt"]
    missing = [str(p) for p in need if not p.exists()]
    return "ok" if not missing else f"missing {', '.join(missing)} (download and untar {URL} into {path})"


def read_voc_label(path: Path) -> np.ndarray:
    """A SegmentationClass PNG -> class ids [H, W] int64 (palette indices; RGB mapped via the VOC colour map)."""
    try:
        with Image.open(path) as im:
            if im.mode in ("P", "L"):
                return np.asarray(im).astype(np.int64)
            rgb = np.asarray(im.convert("RGB")).astype(np.int64)
    except FileNotFoundError:
        raise SndError(f"missing VOC label {path}", path=path) from None
    cmap = voc_colormap().astype(np.int64)
    key = (cmap[:, 0] << 16) | (cmap[:, 1] << 8) | cmap[:, 2]
    lut = {int(k): i for i, k in enumerate(key) if i <= 20 or i == 255}
    pix = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    uniq, inv = np.unique(pix, return_inverse=True)
    ids = np.array([lut.get(int(u), 255) for u in uniq], dtype=np.int64)
    return ids[inv].reshape(pix.shape)


class VOC2012(ProbeDataset):
    name = "voc"
    tasks = ("seg",)

    def __init__(self, path: Path, split: str, task: str, img_hw: tuple[int, int], *, fit: Fit = "crop"):
        super().__init__(split, task, img_hw, fit=fit)
        status = _check(Path(path))
        if status != "ok":
            raise SndError(f"Pascal VOC 2012: {status}", path=path, hint=f"download {URL}")
        self.base = _base(Path(path))
        lst = self.base / "ImageSets" / "Segmentation" / f"{split}.txt"
        self.ids = [ln.strip() for ln in lst.read_text().splitlines() if ln.strip()]

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> RawSample:
        i = self.ids[index]
        raw = RawSample(image=read_rgb(self.base / "JPEGImages" / f"{i}.jpg"), id=i)
        lab = read_voc_label(self.base / "SegmentationClass" / f"{i}.png")
        raw.seg = np.where(lab <= 20, lab, 255).astype(np.int64)
        return raw


@register_dataset("voc", folder="voc", tasks=("seg",), check=_check, num_classes=21,
                  protocol="official train (1,464) / val (1,449) lists; 21 classes incl. background, 255 ignore")
def build(path: Path, split: str, task: str, img_hw: tuple[int, int], **kw) -> VOC2012:
    return VOC2012(path, split, task, img_hw, **kw)
