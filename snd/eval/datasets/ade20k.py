"""ADE20k scene parsing (SceneParsing / ADEChallengeData2016): 150 classes, the official split.

Layout under `<data_root>/ade20k/` (the unzipped http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip):
    ADEChallengeData2016/images/{training,validation}/ADE_*_XXXXXXXX.jpg
    ADEChallengeData2016/annotations/{training,validation}/ADE_*_XXXXXXXX.png   (0 = other -> 255, k -> k-1)
(`<data_root>/ade20k/images/...` without the ADEChallengeData2016 level works too.)
split "train" = training (20,210), "val" = validation (2,000), as in the paper (mmseg reduce_zero_label).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from snd.errors import SndError
from snd.eval.datasets.base import IGNORE, ProbeDataset, RawSample
from snd.eval.datasets.io import read_label_png, read_rgb
from snd.eval.datasets.registry import register_dataset
from snd.eval.datasets.transforms import Fit

URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
_SUB = {"train": "training", "val": "validation"}


def _base(path: Path) -> Path:
    return path / "ADEChallengeData2016" if (path / "ADEChallengeData2016").is_dir() else path


def _check(path: Path) -> str:
    b = _base(path)
    missing = [str(b / d / s) for d in ("images", "annotations") for s in _SUB.values() if not (b / d / s).is_dir()]
    return "ok" if not missing else f"missing {', '.join(missing)} (download and unzip {URL} into {path})"


class ADE20k(ProbeDataset):
    name = "ade20k"
    tasks = ("seg",)

    def __init__(self, path: Path, split: str, task: str, img_hw: tuple[int, int], *, fit: Fit = "crop"):
        super().__init__(split, task, img_hw, fit=fit)
        status = _check(Path(path))
        if status != "ok":
            raise SndError(f"ADE20k: {status}", path=path, hint=f"download {URL}")
        b = _base(Path(path))
        self.img_dir, self.ann_dir = b / "images" / _SUB[split], b / "annotations" / _SUB[split]
        self.ids = sorted(p.stem for p in self.img_dir.glob("*.jpg"))
        if not self.ids:
            raise SndError(f"ADE20k: no .jpg images in {self.img_dir}", path=self.img_dir)

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> RawSample:
        i = self.ids[index]
        raw = RawSample(image=read_rgb(self.img_dir / f"{i}.jpg"), id=i)
        lab = read_label_png(self.ann_dir / f"{i}.png")
        raw.seg = np.where((lab >= 1) & (lab <= 150), lab - 1, IGNORE).astype(np.int64)
        return raw


@register_dataset("ade20k", folder="ade20k", tasks=("seg",), check=_check, num_classes=150,
                  protocol="official training/validation split; 150 classes, 0 -> ignore")
def build(path: Path, split: str, task: str, img_hw: tuple[int, int], **kw) -> ADE20k:
    return ADE20k(path, split, task, img_hw, **kw)
