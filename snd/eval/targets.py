"""The probes' training targets, cached once per (dataset, split, task, input size) as compact Zarr rows.

Why: a probe reads every training item ~5 times (307,200 steps × batch 2 over ScanNet++'s 140 k views) and,
without this cache, each read decodes the image and the label file (or the ray-cast map) and crops it —
work that does not depend on the model and is the same every epoch. Here it is done once; training then
reads two raw chunks per item (tokens and target), which keeps a GPU step fed at hundreds of steps per
second. The store is model-independent: a baseline and an SnD checkpoint share it.

Layout (beside the feature cache; `snd.eval.rowstore` writes and resumes it):

    <cache>/targets/<dataset>/<split>_<task>_<H>x<W>[_n<N>].zarr   array `target`, one chunk per row
    <cache>/targets/<dataset>/<split>_<task>_<H>x<W>[_n<N>].json   progress / what it was made for

Storage per task, chosen so nothing the probes learn from is lost: depth float16 (metres; 2^-11 relative
rounding = 0.5 mm at 1 m, far below the probe's 256 bins of ~4 cm on ScanNet++; 0/NaN/inf invalid kept as
they are; it halves the bytes a streamed depth step reads), segmentation uint8 (class ids < 255 and the
ignore label 255; ids that do not fit are an error), normals float16 (unit vectors; ≈ 0.03°, far below the
metrics' 11.25° bins). Only *training* targets are cached: evaluation scores against the dataset's own
values. zstd (Zarr's default) shrinks the label and depth maps losslessly.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from snd.errors import SndError
from snd.eval.rowstore import LazyRows, OrderedWrites, RowWriter, open_rows

__all__ = ["TARGET_VERSION", "TargetStore", "ensure_targets", "STORED"]

TARGET_VERSION = 1
STORED = {"depth": "float16", "normals": "float16", "seg": "uint8"}


@dataclass
class TargetStore(LazyRows):
    """Cached targets of one (dataset, split, task, size): `len(store)`, `store.target(i)`."""

    path: Path
    n: int
    task: str
    _arr: Any = None

    def __len__(self) -> int:
        return self.n

    def target(self, i: int) -> Tensor:
        """Row i in the dtype the dataset yields (depth/normals float32, seg int64)."""
        t = torch.from_numpy(self._row("target", i))
        return t.long() if self.task == "seg" else t.float()


def _compact(task: str, t: Tensor, where: str) -> np.ndarray:
    if task == "seg":
        if t.numel() and (int(t.min()) < 0 or int(t.max()) > 255):
            raise SndError(f"{where}: segmentation ids must lie in 0..255 (255 = ignore) to be cached, "
                           f"got {int(t.min())}..{int(t.max())}")
        return t.to(torch.uint8).numpy()
    return t.to(getattr(torch, STORED[task])).numpy()


class _Take:
    """collate_fn: the task's target of each item, as a list (sizes are checked before stacking)."""

    def __init__(self, task: str):
        self.task = task

    def __call__(self, items: list[dict]) -> list[Tensor]:
        return [torch.as_tensor(it[self.task]) for it in items]


def ensure_targets(
    dataset: torch.utils.data.Dataset,
    indices: list[int],
    task: str,
    *,
    cache_dir: Path,
    dataset_name: str,
    split: str,
    img_hw: tuple[int, int],
    num_workers: int = 0,
    batch: int = 16,
    writers: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> TargetStore:
    """The task's targets of `dataset[indices]` from the cache, writing what is missing (resumable).

    Row i of the store is `dataset[indices[i]][task]`. `writers` threads compress and write blocks at
    once; progress is committed in row order, so a killed run resumes at the first unwritten block.
    """
    if task not in STORED:
        raise ValueError(f"unknown probe task {task!r}; expected one of {list(STORED)}")
    indices = list(indices)
    n = len(indices)
    stem = f"{split}_{task}_{img_hw[0]}x{img_hw[1]}" + ("" if n == len(dataset) else f"_n{n}")  # type: ignore[arg-type]
    folder = Path(cache_dir) / "targets" / dataset_name
    zpath, jpath = folder / f"{stem}.zarr", folder / f"{stem}.json"
    if n == 0:
        raise SndError(f"{dataset_name} {split}: no items to cache targets for")
    first = torch.as_tensor(dataset[indices[0]][task])
    want = {"n": n, "task": task, "shape": list(first.shape), "dtype": STORED[task], "img_hw": list(img_hw),
            "version": TARGET_VERSION, "indices_sha": hashlib.sha256(json.dumps(indices).encode()).hexdigest()[:16]}
    if open_rows(zpath, jpath, want):
        return TargetStore(zpath, n, task)
    writer = RowWriter(zpath, jpath, want, {"target": (tuple(first.shape), STORED[task], "auto")}, n)
    sub = torch.utils.data.Subset(dataset, indices[writer.done:])
    loader = torch.utils.data.DataLoader(sub, batch_size=batch, shuffle=False, num_workers=num_workers,
                                         collate_fn=_Take(task))
    where = f"{dataset_name} {split}"
    with OrderedWrites(writer, writers, progress) as out:  # blocks compressed and written side by side
        for block in loader:
            for t in block:
                if tuple(t.shape) != tuple(first.shape):
                    raise SndError(f"{where}: {task} targets change size ({tuple(first.shape)} vs "
                                   f"{tuple(t.shape)}); a probe needs one label size per split")
            rows = {"target": _compact(task, torch.stack(block), where)}
            out.submit(lambda rows=rows: rows, len(block))
    writer.finish()
    return TargetStore(zpath, n, task)
