"""How fast one CPU core draws the paper protocol's augmented training items, and how many cores that needs.

Why: the paper protocol trains three kinds of probe with the backbone live on items a DataLoader worker
augments afresh (`snd.eval.depth_aug.DepthTrain`, `snd.eval.mmseg.MmsegTrain`, GeoNet's `augment_geonet`). A
GPU that steps faster than the workers can feed it waits, and the suite's projected hours assume it does not.
This measures the augmentation itself on frames of the real datasets' sizes held in memory (procedural
content; the transforms' cost does not depend on it), in this process with one thread: items/s per worker.
Reading and decoding the files comes on top and depends on the disk (the stand-ins' load is excluded
on purpose: it would measure this machine's disk, not the datasets').

`workers_needed(rate, steps_per_s, batch)` turns it into the cores a given training rate needs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["AUGMENT_FRAMES", "augment_rates", "workers_needed"]

# native frame sizes the live sets augment: NYU's NYUCrop region, ScanNet's 480x640, ScanNet++ FiT3D's frames,
# KITTI's KB crop; for seg an ADE20k-like 512x683 image (mmseg rescales every set to short side 512 x ratio, so
# its cost hardly depends on the source size); GeoNet's 480x480 centre squares
AUGMENT_FRAMES: dict[str, tuple[int, int]] = {"depth_nyuv2": (427, 565), "depth_scannet": (480, 640),
                                              "depth_scannetpp": (584, 876), "depth_kitti": (352, 1216),
                                              "seg": (512, 683), "normals": (480, 480)}


@dataclass
class _Frames:
    """An in-memory whole-frame source (what `ProbeDataset.native_frame` / `load` return), one frame."""

    hw: tuple[int, int]
    name: str = "bench"

    def __post_init__(self):
        rng = np.random.default_rng(0)
        H, W = self.hw
        self.image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        self.depth = torch.from_numpy(rng.uniform(0.5, 9.0, (H, W)).astype(np.float32))
        self.seg = rng.integers(0, 20, (H, W)).astype(np.int64)

    def __len__(self) -> int:
        return 1

    def native_frame(self, index: int):
        return self.image, self.depth, "bench"

    def load(self, index: int):
        from snd.eval.datasets.base import RawSample

        return RawSample(image=self.image, id="bench", seg=self.seg)


def _rate(fn, seconds: float) -> float:
    fn()  # warm-up (allocations, lazy imports)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
        fn()
        n += 1
    return n / (time.perf_counter() - t0)


def augment_rates(seconds: float = 2.0, *, patch: int = 14, seed: int = 0) -> dict[str, float]:
    """Items/s one thread augments, per live training set of the paper protocol (`AUGMENT_FRAMES`)."""
    from snd.eval.datasets.geonet import augment_geonet
    from snd.eval.depth_aug import PAPER_DEPTH_AUG, DepthTrain
    from snd.eval.mmseg import MmsegTrain

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    out: dict[str, float] = {}
    try:
        for key, hw in AUGMENT_FRAMES.items():
            task, _, name = key.partition("_")
            src = _Frames(hw)
            if task == "depth":
                ds = DepthTrain(src, PAPER_DEPTH_AUG[name], frame_hw=hw, patch=patch)
                out[key] = _rate(lambda: ds[0], seconds)
            elif task == "seg":
                ds = MmsegTrain(src, patch=patch)
                out[key] = _rate(lambda: ds[0], seconds)
            else:
                img = torch.from_numpy(src.image).permute(2, 0, 1).float() / 255
                normals = torch.nn.functional.normalize(torch.randn(3, *hw), dim=0)
                out[key] = _rate(lambda: augment_geonet(img, src.depth, normals), seconds)
    finally:
        torch.set_num_threads(threads)
    return out


def workers_needed(items_per_s_per_worker: float, steps_per_s: float, batch: int) -> int:
    """DataLoader workers that keep `steps_per_s` training steps of `batch` items fed (at least 1)."""
    return max(1, int(np.ceil(steps_per_s * batch / max(items_per_s_per_worker, 1e-9))))
