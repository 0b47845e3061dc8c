"""Probe datasets: one registry, one sample format, each dataset read from its published files.

    get_dataset(name, root, split, task, img_hw, **kw) -> torch Dataset
    available(root) -> {name: "ok" | what is missing and where to get it}
    num_classes(name), list_datasets(task=None), dataset_info(name)

`root` is the data root holding one folder per dataset (nyuv2/, scannetpp/, scannet/, kitti/, ade20k/,
voc/, scannet1500/, synth/); a dataset's own folder is accepted as root too. Sample formats: `base.py`
(depth / normals / seg) and `pairs.py` (correspondence). Per-dataset protocol notes: docs/datasets.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from snd.errors import SndError
from snd.eval.datasets.registry import SPLITS, TASKS, DatasetInfo, dataset_info, list_datasets, register_dataset

# importing the modules registers them (order = nothing depends on it)
from snd.eval.datasets import ade20k, kitti, nyuv2, pairs, scannet, scannetpp, synth, voc  # noqa: E402,F401

__all__ = [
    "DatasetInfo", "SPLITS", "TASKS", "available", "dataset_info", "get_dataset", "list_datasets",
    "num_classes", "register_dataset", "resolve_path",
]


def resolve_path(name: str, root: str | Path) -> Path:
    """The folder of dataset `name`: `root/<folder>`, or `root` itself when it already is that dataset."""
    info = dataset_info(name)
    root = Path(root)
    sub = root / info.folder
    if sub.exists():
        return sub
    if root.is_dir() and info.check(root).startswith("ok"):
        return root
    return sub


def get_dataset(name: str, root: str | Path, split: str, task: str, img_hw: tuple[int, int],
                **kw) -> torch.utils.data.Dataset:
    """Dataset `name` of `split` ("train" | "val") for `task` ("depth" | "normals" | "seg" | "correspondence").

    Args:
        root: the data root (see the module docstring).
        img_hw: (H, W) of every returned image and target (multiples of 14 for ViT-14 backbones).
        **kw: dataset options (e.g. fit="crop"|"resize", seed=, frame_stride=, gaps=); docs/datasets.md.
            native_target=True: targets at their own resolution (`base.ProbeDataset.native_target`).
    Raises:
        SndError naming the missing file and what to download when the data is absent.
    """
    info = dataset_info(name)
    if split not in SPLITS:
        raise SndError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    if task not in info.tasks:
        raise SndError(f"dataset {name!r} has no {task!r} task; it supports {list(info.tasks)}")
    path = resolve_path(name, root)
    status = info.check(path)
    if not status.startswith("ok"):
        raise SndError(f"{name}: {status}", path=path)
    native = bool(kw.pop("native_target", False))
    ds = info.builder(path, split, task, tuple(img_hw), **kw)
    if native:
        if not hasattr(ds, "target_hw"):
            raise SndError(f"{name}: native_target is for single-image probe datasets, not {task}")
        ds.native_target = True
    return ds


def available(root: str | Path) -> dict[str, str]:
    """{name: "ok" or exactly what is missing, where to put it and what to download} for every dataset."""
    out = {}
    for name in list_datasets():
        try:
            out[name] = dataset_info(name).check(resolve_path(name, root))
        except Exception as e:  # a broken folder must not hide the others
            out[name] = f"error: {e}"
    return out


def num_classes(name: str) -> Optional[int]:
    """Segmentation classes of `name` (ids 0..C-1, 255 = ignore); None when it has no seg task."""
    info = dataset_info(name)
    if name == "synth":
        return synth.synth_num_classes()
    return info.num_classes
