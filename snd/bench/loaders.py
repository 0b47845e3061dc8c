"""How fast one CPU core draws the paper protocol's augmented training items, and how many cores that needs.

Why: the paper protocol trains three kinds of probe with the backbone live on items augmented afresh
(`snd.eval.depth_aug.DepthTrain`, `snd.eval.mmseg.MmsegTrain`, `snd.eval.datasets.geonet.GeoNetNYU`). A
DataLoader worker does each item's CPU part (`worker_item`: load, draw, the steps that need the item alone) and
the training device the batched rest (`device_augment`). A GPU that steps faster than the workers can feed it
waits, and the suite's projected hours assume it does not. `augment_rates` measures the worker part on frames of
the real datasets' sizes held in memory (procedural content; the transforms' cost does not depend on it), in
this process with one thread: items/s per worker; `device_augment_rates` the batched part on a device.
Reading and decoding the files comes on top and depends on the disk (the stand-ins' load is excluded
on purpose: it would measure this machine's disk, not the datasets').

`workers_needed(rate, steps_per_s, batch)` turns it into the cores a given training rate needs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["AUGMENT_FRAMES", "augment_rates", "device_augment_rates", "workers_needed"]

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


class _GeoNetFrames:
    """GeoNet's training set over one in-memory 480x480 square (`GeoNetNYU`'s pipeline without its files)."""

    def __new__(cls, hw: tuple[int, int], patch: int):
        from snd.eval.datasets.geonet import GeoNetNYU

        frames = _Frames(hw)
        normals = torch.nn.functional.normalize(torch.randn(*hw, 3), dim=-1).numpy()
        ds = GeoNetNYU.__new__(GeoNetNYU)
        ds.augment = ds.self_augmenting = True
        ds.patch, ds.files, ds.path = patch, ["bench"], None
        ds.load = lambda index: (frames.image, frames.depth.numpy(), normals)  # type: ignore[method-assign]
        return ds


def _live_sets(patch: int):
    """(key, live training set over one in-memory frame) per `AUGMENT_FRAMES` entry."""
    from snd.eval.depth_aug import PAPER_DEPTH_AUG, DepthTrain
    from snd.eval.mmseg import MmsegTrain

    for key, hw in AUGMENT_FRAMES.items():
        task, _, name = key.partition("_")
        if task == "depth":
            yield key, DepthTrain(_Frames(hw), PAPER_DEPTH_AUG[name], frame_hw=hw, patch=patch)
        elif task == "seg":
            yield key, MmsegTrain(_Frames(hw), patch=patch)
        else:
            yield key, _GeoNetFrames(hw, patch)


def augment_rates(seconds: float = 2.0, *, patch: int = 14, seed: int = 0) -> dict[str, float]:
    """Items/s one thread prepares per live training set of the paper protocol (`AUGMENT_FRAMES`): what a
    DataLoader worker does per item (`worker_item`: the frame, the random draws, the per-item CPU steps); the
    batched rest runs on the training device (`device_augment_rates`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    out: dict[str, float] = {}
    try:
        for key, ds in _live_sets(patch):
            out[key] = _rate(lambda: ds.worker_item(0), seconds)
    finally:
        torch.set_num_threads(threads)
    return out


def device_augment_rates(seconds: float = 2.0, *, patch: int = 14, batch: int = 8, seed: int = 0,
                         device: str | torch.device = "cpu", threads: int | None = 1) -> dict[str, float]:
    """Items/s of each live set's batched `device_augment` on `device` (batches of `batch` worker items, each
    with its own draws, already on the device; CUDA synchronised per batch). On the CPU with `threads` threads:
    what the same work would cost a worker, for comparison."""
    from torch.utils.data import default_collate

    device = torch.device(device)
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out: dict[str, float] = {}
    try:
        for key, ds in _live_sets(patch):
            b = default_collate([ds.worker_item(0) for _ in range(batch)])
            b = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in b.items()}

            def step(ds=ds, b=b):
                ds.device_augment(b)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            out[key] = _rate(step, seconds) * batch
    finally:
        torch.set_num_threads(old)
    return out


def workers_needed(items_per_s_per_worker: float, steps_per_s: float, batch: int) -> int:
    """DataLoader workers that keep `steps_per_s` training steps of `batch` items fed (at least 1)."""
    return max(1, int(np.ceil(steps_per_s * batch / max(items_per_s_per_worker, 1e-9))))
