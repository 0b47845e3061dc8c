"""Registry of probe datasets: one decorator, one dict, errors that name the unknown key.

Why a registry: `snd eval` iterates "every dataset found for the task"; each dataset module registers
its builder together with the facts the probes need (tasks, class count, depth range, folder under the
data root) so nothing downstream sniffs dataset names.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

from snd.errors import SndError

Task = Literal["depth", "normals", "seg", "correspondence"]
Split = Literal["train", "val"]
TASKS: tuple[str, ...] = ("depth", "normals", "seg", "correspondence")
SPLITS: tuple[str, ...] = ("train", "val")

# The official (min, max) valid depth per dataset in metres — the depth probe's bin range and the metrics'
# valid range (official SnD evaluation1/evaluation/baseline_configs/*_depth_linear_config.py:
# min_depth=0.001; max_depth 10 NYUv2/ScanNet, 20 ScanNet++, 80 KITTI). One table: datasets register
# from it and `snd.eval.probes.DEPTH_RANGE` is this dict.
OFFICIAL_DEPTH_RANGE: dict[str, tuple[float, float]] = {
    "nyuv2": (1e-3, 10.0), "scannet": (1e-3, 10.0), "scannetpp": (1e-3, 20.0), "kitti": (1e-3, 80.0)}


@dataclass(frozen=True)
class DatasetInfo:
    """What the probes need to know about a dataset without opening it."""

    name: str
    folder: str  # sub-folder of the data root (EvalConfig.data_root) that holds it
    tasks: tuple[str, ...]
    num_classes: Optional[int]  # segmentation classes (ids 0..C-1, 255 = ignore); None = no seg task
    depth_range: Optional[tuple[float, float]]  # (min, max) metres of valid depth: the depth probe's bins
    builder: Callable  # (path: Path, split, task, img_hw, **kw) -> torch Dataset
    check: Callable[[Path], str]  # path -> "ok" or what is missing and how to get it
    protocol: str = ""  # one line: split / crop / resize choices vs the paper (docs/datasets.md has more)


_REGISTRY: dict[str, DatasetInfo] = {}


def register_dataset(
    name: str,
    *,
    folder: str,
    tasks: tuple[str, ...],
    check: Callable[[Path], str],
    num_classes: Optional[int] = None,
    depth_range: Optional[tuple[float, float]] = None,
    protocol: str = "",
) -> Callable[[Callable], Callable]:
    """Decorator registering `builder(path, split, task, img_hw, **kw)` under `name`."""
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ValueError(f"dataset {name!r}: unknown tasks {bad}; expected a subset of {TASKS}")

    def deco(fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"dataset {name!r} registered twice")
        _REGISTRY[name] = DatasetInfo(name, folder, tuple(tasks), num_classes, depth_range, fn, check, protocol)
        return fn

    return deco


def list_datasets(task: Optional[str] = None) -> list[str]:
    """Registered dataset names (sorted), optionally only those supporting `task`."""
    if task is not None and task not in TASKS:
        raise SndError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    return sorted(n for n, i in _REGISTRY.items() if task is None or task in i.tasks)


def dataset_info(name: str) -> DatasetInfo:
    """The registry entry of `name`; an SndError lists the known names when it is unknown."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SndError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(_REGISTRY))}") from None
