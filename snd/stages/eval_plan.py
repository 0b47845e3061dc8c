"""`snd eval`'s plan: which (task, dataset) pairs run, their splits and subsets, the protocol's hash
(the resume key) and the trivial baselines. Split from `snd.stages.evaluate`.
"""
from __future__ import annotations

import hashlib
import json
import time

from typing import TYPE_CHECKING

import numpy as np

from snd.errors import SndError
from snd.eval.protocol import PAPER_REV
from snd.pipeline.config import EvalConfig
from snd.stages.eval_outputs import _clean

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch

# `snd eval` task names -> the dataset registry's task names
TASK_TO_DATASET_TASK = {"depth": "depth", "normals": "normals", "seg": "seg", "corr": "correspondence"}


def _subset(n: int, max_images: int | None) -> list[int]:
    """Evenly spaced indices (deterministic): every scene stays represented in a quick run."""
    if max_images is None or max_images >= n:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, max_images).round().astype(int).tolist()))


def _plan(cfg: EvalConfig, tasks: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """(task, dataset) pairs to evaluate, and one note per task/dataset that cannot be evaluated."""
    from snd.eval.datasets import available, list_datasets

    status = available(cfg.data_root)
    known = set(status)
    unknown = [d for d in cfg.datasets if d not in known]
    if unknown:
        raise SndError(f"unknown dataset(s) {unknown}; known: {', '.join(sorted(known))}")
    plan, notes = [], []
    for task in tasks:
        if task not in TASK_TO_DATASET_TASK:
            raise SndError(f"unknown eval task {task!r}; expected one of {list(TASK_TO_DATASET_TASK)}")
        names = list_datasets(TASK_TO_DATASET_TASK[task])
        if cfg.datasets:
            names = [d for d in names if d in cfg.datasets]
        missing = []
        for name in names:
            if str(status[name]).startswith("ok"):
                plan.append((task, name))
            else:
                missing.append(f"{name}: {status[name]}")
        if not names:
            notes.append(f"{task}: none of --datasets {cfg.datasets} supports this task")
        elif not any(t == task for t, _ in plan):
            notes.append(f"{task}: no dataset found under {cfg.data_root} — " + "; ".join(missing))
        else:
            notes += [f"{task}/{m}" for m in missing]
    return plan, notes


def _protocol(cfg: EvalConfig) -> dict:
    proto = {"img_hw": [cfg.img_height, cfg.img_width], "iters": cfg.iters, "batch": cfg.batch,
             "max_images": cfg.max_images, "feature_cache": cfg.feature_cache, "seed": cfg.seed}
    if cfg.lr_scale != 1.0:  # only when set, so records made before the option existed keep their folder
        proto["lr_scale"] = cfg.lr_scale
    if cfg.protocol != "fast":  # fast is what snd computed before protocols existed: its folders stay
        proto["protocol"] = cfg.protocol
        # the paper rules' revision (`PAPER_REV`: 3 = the depth sets' whole native frames): a probe half-trained
        # on an older input has the same weight shapes, so only a new folder keeps it from resuming on other data
        proto["paper_rev"] = PAPER_REV
    if cfg.protocol != "fast" or not cfg.feature_cache:
        # live rows forward at --extract-precision (records before this field: fp32 whatever the key said), so
        # a probe half-trained on the old arithmetic is never resumed on the new one
        proto["live_precision"] = cfg.extract_precision
    return proto


def _trivial_folder(cfg: EvalConfig) -> str:
    """Trivial baselines depend on the data seen (size, subset), not on the model or the probe recipe."""
    proto = {"img_hw": [cfg.img_height, cfg.img_width], "max_images": cfg.max_images}
    if cfg.protocol != "fast":  # the paper protocol scores other pixels (crops, native resolution)
        proto["protocol"] = cfg.protocol
        proto["fit_on"] = "unaugmented"  # earlier paper records fit GeoNet normals on augmented draws: not reused
        proto["paper_rev"] = PAPER_REV  # the depth constants are fit on the whole native training frames
    return "trivial-" + hashlib.sha256(json.dumps(proto, sort_keys=True).encode()).hexdigest()[:8]


def _depth_range(name: str) -> tuple[float, float]:
    from snd.eval import datasets as D
    from snd.eval.probes import DEPTH_RANGE

    return D.dataset_info(name).depth_range or DEPTH_RANGE.get(name, (1e-3, 10.0))


def _splits(task: str, name: str, cfg: EvalConfig, patch: int):
    """(train dataset, val dataset, train indices, val indices) of a dense task, subset per --max-images;
    `patch`: the backbone's patch size (the paper protocol's seg crops, GeoNet squares and NYU normals test are
    centre-padded to its multiple)."""
    from snd.eval import datasets as D
    from snd.eval.protocol import dataset_kwargs

    train_ds = paper_train_set(cfg, name, task, patch)
    if train_ds is None:
        train_ds = D.get_dataset(name, cfg.data_root, "train", task, train_hw(cfg, name, task, patch),
                                 **dataset_kwargs(cfg.protocol, name, task, "train"))
    val_ds = D.get_dataset(name, cfg.data_root, "val", task, val_hw(cfg, name, task, patch),
                           **dataset_kwargs(cfg.protocol, name, task, "val"))
    if cfg.protocol == "paper" and task == "seg":  # mmseg's test: short side 512, sliding windows, native GT
        from snd.eval.mmseg import MmsegTest

        val_ds = MmsegTest(val_ds)
    idx_tr, idx_va = _subset(len(train_ds), cfg.max_images), _subset(len(val_ds), cfg.max_images)
    if not idx_tr or not idx_va:
        raise SndError(f"{name}: empty split (train {len(idx_tr)}, val {len(idx_va)} images) for {task}")
    return train_ds, val_ds, idx_tr, idx_va


def paper_train_set(cfg: EvalConfig, name: str, task: str, patch: int):
    """The paper protocol's own training set where it differs from the dataset's train split (NYU normals:
    GeoNet's "trainval", `snd.eval.datasets.geonet`; segmentation: the train split through mmseg's augmentation,
    `snd.eval.mmseg.MmsegTrain`; the official depth sets: their native frames through the depth configs'
    augmentation, `snd.eval.depth_aug.DepthTrain`), else None. Missing data is an SndError naming it."""
    if cfg.protocol == "paper" and task == "seg":
        from snd.eval import datasets as D
        from snd.eval.mmseg import MmsegTrain
        from snd.eval.protocol import dataset_kwargs

        return MmsegTrain(D.get_dataset(name, cfg.data_root, "train", task, (cfg.img_height, cfg.img_width),
                                        **dataset_kwargs(cfg.protocol, name, task, "train")), patch=patch)
    if cfg.protocol == "paper" and task == "depth":
        from snd.eval.depth_aug import PAPER_DEPTH_AUG, DepthTrain
        from snd.eval.protocol import PAPER_TRAIN_NATIVE_HW, dataset_kwargs

        if name not in PAPER_DEPTH_AUG:
            return None
        from snd.eval import datasets as D

        source = D.get_dataset(name, cfg.data_root, "train", task, train_hw(cfg, name, task, patch),
                               **dataset_kwargs(cfg.protocol, name, task, "train"))
        return DepthTrain(source, PAPER_DEPTH_AUG[name], frame_hw=PAPER_TRAIN_NATIVE_HW[name, task], patch=patch)
    if cfg.protocol != "paper" or (name, task) != ("nyuv2", "normals"):
        return None
    from snd.eval.datasets.geonet import FOLDERS, URL, GeoNetNYU, find_geonet

    path = find_geonet(cfg.data_root)
    if path is None:
        raise SndError(f"the paper protocol trains NYU normals on GeoNet's NYU 'trainval': no .mat files in "
                       f"{cfg.data_root}/{FOLDERS[0]}", path=cfg.data_root / FOLDERS[0],
                       hint=f"download {URL} into {cfg.data_root / FOLDERS[0]}, or use --protocol fast")
    return GeoNetNYU(path, augment=True, patch=patch)


def trivial_train_set(train_ds):
    """What a trivial baseline is fit on: the training targets themselves. A training set that augments its
    own items (the paper's GeoNet normals, mmseg's seg pipeline) gives its un-augmented twin (`unaugmented()`:
    same files, same order), so the constant is deterministic and weighs every training pixel once."""
    return train_ds.unaugmented() if hasattr(train_ds, "unaugmented") else train_ds


def val_hw(cfg: EvalConfig, name: str, task: str, patch: int) -> tuple[int, int]:
    """Validation input size: `snd eval`'s, or the paper protocol's fixed one padded to the backbone's `patch`
    (`snd.eval.protocol.paper_val_hw`: NYU normals 490x490 for patch 14, 480x480 for 16: 480 = 30·16; the depth
    sets' whole frames, NYU / ScanNet 490x644 / 480x640, ScanNet++ 588x882 / 592x880, KITTI 364x1218 / 352x1216)."""
    from snd.eval.protocol import paper_val_hw

    fixed = paper_val_hw(name, task, patch) if cfg.protocol == "paper" else None
    return fixed or (cfg.img_height, cfg.img_width)


def train_hw(cfg: EvalConfig, name: str, task: str, patch: int) -> tuple[int, int]:
    """Training input size of a dataset's own train split: `snd eval`'s, or the paper protocol's fixed one
    (`snd.eval.protocol.paper_train_hw`: the depth sets at the test's native scale; NYU its NYUCrop region,
    434x574 / 432x576)."""
    from snd.eval.protocol import paper_train_hw

    fixed = paper_train_hw(name, task, patch) if cfg.protocol == "paper" else None
    return fixed or (cfg.img_height, cfg.img_width)


def _eval_trivial(task: str, name: str, data_tr, data_va, protocol: str = "fast") -> dict:
    """Constant predictor fit on `data_tr`, scored on `data_va` (`snd.eval.trivial`): the floor of a probe."""
    from snd.eval import datasets as D
    from snd.eval.trivial import evaluate_trivial, fit_trivial

    t0 = time.perf_counter()
    kw = {"max_depth": _depth_range(name)[1]} if task == "depth" else {}
    if task == "seg":
        kw = {"num_classes": D.num_classes(name), "ignore_index": 255}
    try:
        triv = fit_trivial(task, (data_tr.target(j) for j in range(len(data_tr))), **kw)
    except ValueError as e:
        raise SndError(f"{name}: no trivial {task} baseline: {e}") from e
    if protocol == "paper" and (task == "seg" or getattr(data_va.dataset, "zero_normal_is_error", False)):
        kw["paper"] = True
    metrics = evaluate_trivial(triv, (data_va.target(j) for j in range(len(data_va))), **kw)
    return {"dataset": name, "task": task, **triv.to_json(), "metrics": {k: _clean(v) for k, v in metrics.items()},
            "n_train": len(data_tr), "n_val": len(data_va), "seconds": time.perf_counter() - t0}


AUTO_EVAL_WORKERS_CAP = 32  # the paper protocol's live sets need ~10-50 ms of CPU per item (docs/performance.md)


def resolve_eval_workers(value, device: torch.device, cpus: int | None = None) -> int:
    """`snd eval --num-workers`: an integer as given, or "auto": the CPU cores less two (the main thread and
    the pin-memory thread) on CUDA, capped at `AUTO_EVAL_WORKERS_CAP`, because the paper protocol's live
    training items (depth crops, mmseg crops, GeoNet) are augmented by the workers and one core draws only
    ~15-50 of them per second (`snd.bench.loaders`); on a CPU device at most 2 (the probes need the cores)."""
    from snd.pipeline.device import cpu_cores, fixed_workers

    n = fixed_workers(value)
    if n is not None:
        return n
    if cpus is None:
        cpus = cpu_cores()
    if device.type != "cuda":
        return max(min(2, cpus - 1), 0)
    return max(min(cpus - 2, AUTO_EVAL_WORKERS_CAP), 1)


def probe_input_sized(cfg: EvalConfig, patches: list[int]) -> EvalConfig:
    """`cfg` with the probe input size it leaves to the default (None) set from the backbones' patch (480x640
    floored to it: 476x630 for DINOv2, 480x640 for DINOv3). One size serves every backbone evaluated (the
    tables compare them at one input), so a model and a baseline of two patch sizes need the size given."""
    from math import lcm

    from snd.models.backbone import PROBE_FRAME_HW, with_input_hw

    if cfg.img_height is not None and cfg.img_width is not None:
        return cfg
    patches = sorted(set(patches))
    if len(patches) > 1:
        m = lcm(*patches)
        raise SndError(f"--model and --baseline have different patch sizes ({' and '.join(map(str, patches))}), so "
                       "there is no default probe input size for both",
                       hint=f"pass --img-height and --img-width as multiples of {m}, e.g. --img-height "
                            f"{max(1, PROBE_FRAME_HW[0] // m) * m} --img-width {max(1, PROBE_FRAME_HW[1] // m) * m}")
    return with_input_hw(cfg, patches[0], PROBE_FRAME_HW)
