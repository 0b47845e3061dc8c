"""`snd bench eval --protocol paper`: the paper protocol's suite time, projected from the fast suite's rates.

The paper protocol (`snd.eval.protocol`) runs the fast suite's work plus, per task (sizes for the backbone's
patch p, `padded_hw`: 490 / 490x644 / 420x546 / 364x714 / 588x882 / 364x1218 / 518 for p = 14; 480 / 480x640 /
416x544 / 352x704 / 592x880 / 352x1216 / 512 for p = 16):

* depth: a second (flipped) validation pass: its extraction and a second probe evaluation per image; the
  validation split reads its whole native frame padded to the patch (`paper_val_hw`: NYU and ScanNet 480x640,
  ScanNet++ 584x876, KITTI the 352x1216 KB crop) instead of the probe input size, and training runs the
  backbone live on the configs' augmented crops (`snd.eval.depth_aug`: 416x544, KITTI 352x704, padded to the
  patch: 420x546 / 364x714 for p = 14), batch x iters forwards, replacing the fast row's token and target
  caching; its probe steps and evaluation scale with those grids' tokens;
* normals: the test tokens of the 480x480 crop padded to the patch, and training on NYU "trainval" of GeoNet
  with Probe3D's augmentation, the backbone live on every training image: `normals_spec(GEONET_TRAINVAL)`
  steps of batch 8 (10 epochs, as `snd eval` runs them), one forward per image per step at the padded
  square, replacing the fast row's cached 795-image training and its target caching;
* correspondence: the pairs at 480x640 padded to the patch (instead of the probe input size);
* segmentation (`snd.eval.mmseg`): the sliding-window test with the live backbone (short side 512, 512x512
  windows, stride 341: 2 windows for every dataset's typical aspect, `SEG_WINDOWS`, each padded to the patch)
  and training on the config's augmented crops, live (batch x iters forwards at the padded crop), replacing
  the fast row's token and target caching (its probe steps and evaluation are kept as they are).

A rate at another input size is the measured extraction rate scaled by the token count (the ViT's cost is
close to linear in tokens at these sizes; stated in the JSON), and a probe's step or evaluation at another
grid scales the same way. Everything is per (task, dataset), summed per task and for the suite.
"""
from __future__ import annotations

import math

from snd.eval.mmseg import CROP
from snd.eval.probes.normals import normals_spec
from snd.eval.depth_aug import PAPER_DEPTH_AUG
from snd.eval.protocol import PAPER_CORR_HW, PAPER_TRAIN_NATIVE_HW, padded_hw, paper_val_hw

__all__ = ["paper_projection", "paper_depth_crop_hw", "GEONET_TRAINVAL", "SEG_WINDOWS"]

GEONET_TRAINVAL = 30_000  # NYU "trainval" of GeoNet as Probe3D reads it (~30k .mat frames, snd-facts)
GEONET_SQUARE = (480, 480)  # its centre square, padded to the patch for the ViT
SEG_WINDOWS = 2  # windows per image at short side 512, stride 341, for aspects 4:3 to 3:2: ceil((683..768-512)/341)+1


def paper_depth_crop_hw(name: str, patch: int) -> tuple[int, int] | None:
    """The padded input of a depth set's live training crops (`snd.eval.depth_aug.DepthTrain.img_hw`), or None."""
    aug, frame = PAPER_DEPTH_AUG.get(name), PAPER_TRAIN_NATIVE_HW.get((name, "depth"))
    if aug is None or frame is None:
        return None
    return padded_hw((min(aug.crop[0], frame[0]), min(aug.crop[1], frame[1])), patch)


def _tokens(hw: tuple[int, int], p: int) -> int:
    return math.ceil(hw[0] / p) * math.ceil(hw[1] / p)


# a live row's GPU parts (the backbone on the augmented items and the probe's steps on them)
_LIVE_PARTS = {"depth": ("augmented_live_training_s", "own_size_train_s"), "seg": ("augmented_live_training_s",),
               "normals": ("geonet_live_backbone_s", "geonet_probe_steps_s")}


def _loader_s(task: str, name: str, extra: dict, iters: int, probes: dict, rates: dict | None,
              workers: int | None) -> tuple[float, float, int] | None:
    """(seconds `workers` DataLoader workers need to augment a live row's items, seconds its GPU parts take,
    the workers that would keep the GPU fed), or None for a row that is not live (or without a measured rate)."""
    from snd.bench.loaders import workers_needed

    parts = _LIVE_PARTS.get(task)
    if not rates or workers is None or parts is None or parts[0] not in extra:
        return None
    rate = rates.get(f"depth_{name}" if task == "depth" else task)
    if not rate:
        return None
    batch = probes[task]["batch"]
    if task == "normals":  # GeoNet's 10 epochs, whatever the fast row's iterations
        iters = normals_spec(GEONET_TRAINVAL, batch).iters
    gpu_s = sum(extra.get(k, 0.0) for k in parts)
    keep_up = workers_needed(rate, iters / gpu_s, batch) if gpu_s > 0 else 1
    return iters * batch / (rate * max(workers, 1)), gpu_s, keep_up  # workers 0: the main process, as one


def paper_projection(rows: list[dict], *, hw: tuple[int, int], extract_rate: float, probes: dict,
                     fast_parts: dict, patch: int = 14, seg_iters: dict | None = None,
                     augment_rates: dict | None = None, workers: int | None = None,
                     live_rates: dict[int, float] | None = None) -> dict:
    """Extra seconds of the paper protocol per (task, dataset) and the projected suite (one model).

    Args:
        rows: the fast projection's rows (`snd.eval.bench.bench`: n_train, n_val, eval_s, features_s, ...).
        hw: the fast input size; extract_rate: images/s measured at it.
        probes: measured per-task probe rates (`eval_images_per_s`, `train_iters_per_s_alone`, `batch`).
        fast_parts: the fast suite's parts (features_s, targets_s, train_s, eval_s).
        patch: the backbone's patch size (the paper's fixed inputs are centre-padded to its multiple).
        seg_iters: training iterations per seg dataset (default: each row's `probe_iters`).
        augment_rates, workers: items/s one worker augments per live set (`snd.bench.loaders.augment_rates`) and
            the DataLoader workers: a live row whose items take the workers longer than the GPU takes for its
            steps waits for them (`loader_wait_s`, each row as if trained alone with every worker;
            `workers_to_keep_up`, the workers it would need not to wait; the suite's `augment_core_hours` is
            the CPU time all live items take).
        live_rates: images/s of the live forward (at the suite's `--extract-precision`, no cache) at the fast
            size per probe batch (`snd.bench.eval_measure.measure_live`), for the live rows' backbone; without them (JSONs measured
            before it) those rows use the extraction rate, as the other paper passes do.
    """
    def ratio(other: tuple[int, int]) -> float:  # cost at `other` over the cost at the fast size
        return _tokens(other, patch) / _tokens(hw, patch)

    def rate_at(other: tuple[int, int]) -> float:
        return extract_rate / ratio(other)

    def live_at(other: tuple[int, int], batch: int) -> float:  # the live forward at the probe's batch
        return (live_rates or {}).get(batch, extract_rate) / ratio(other)

    out_rows, per_task, core_s = [], {}, 0.0
    for r in rows:
        task, name = r["task"], r["dataset"]
        extra: dict[str, float] = {}
        iters = (seg_iters or {}).get(name, r.get("probe_iters", 0)) if task == "seg" else r.get("probe_iters", 0)
        if task == "depth":
            vhw = paper_val_hw(name, task, patch) or hw
            extra["flip_features_s"] = r["n_val"] / rate_at(vhw)
            extra["flip_eval_s"] = r["eval_s"] * ratio(vhw)
            crop = paper_depth_crop_hw(name, patch)
            if crop is not None:  # live training on the config's crops, the whole frame on val (no caches)
                extra["val_features_own_size_s"] = r["n_val"] / rate_at(vhw)
                extra["augmented_live_training_s"] = r["probe_iters"] * probes["depth"]["batch"] / live_at(
                    crop, probes["depth"]["batch"])
                extra["own_size_train_s"] = r["train_s"] * (ratio(crop) - 1)
                extra["own_size_eval_s"] = r["eval_s"] * (ratio(vhw) - 1)
                extra["minus_fast_caching_s"] = -(r["features_s"] + r["targets_s"])
        elif task == "normals":
            test_hw = paper_val_hw(name, task, patch) or hw
            train_hw = padded_hw(GEONET_SQUARE, patch)
            spec = normals_spec(GEONET_TRAINVAL, probes["normals"]["batch"])
            extra["test_features_s"] = r["n_val"] / rate_at(test_hw)
            extra["test_eval_size_s"] = r["eval_s"] * (ratio(test_hw) - 1)
            extra["geonet_live_backbone_s"] = spec.iters * spec.batch / live_at(train_hw, spec.batch)
            extra["geonet_probe_steps_s"] = spec.iters / probes["normals"]["train_iters_per_s_alone"]["stream"]
            extra["minus_fast_training_s"] = -(r["train_s"] + r["targets_s"])  # live GeoNet caches no targets
        elif task == "seg":
            win = padded_hw(CROP, patch)
            extra["sliding_window_test_s"] = r["n_val"] * SEG_WINDOWS / rate_at(win)
            extra["augmented_live_training_s"] = iters * probes["seg"]["batch"] / live_at(win, probes["seg"]["batch"])
            extra["minus_fast_caching_s"] = -(r["features_s"] + r["targets_s"])  # neither split is cached
        elif task == "correspondence":
            corr = padded_hw(PAPER_CORR_HW.get(name, hw), patch)
            extra["pairs_at_paper_size_s"] = 2 * r["n_val"] / rate_at(corr) - r["features_s"]
        lw = _loader_s(task, name, extra, iters, probes, augment_rates, workers)
        if lw is not None:
            extra["loader_wait_s"] = max(0.0, lw[0] - lw[1])
            core_s += lw[0] * max(workers, 1)
        e = sum(extra.values())
        out_rows.append({"task": task, "dataset": name, "extra_s_parts": extra, "extra_s": e})
        if lw is not None:  # how many loader workers this row alone would need not to wait
            out_rows[-1]["workers_to_keep_up"] = lw[2]
        per_task[task] = per_task.get(task, 0.0) + e
    fast = sum(fast_parts[k] for k in ("features_s", "targets_s", "train_s", "eval_s"))
    fast_task = {}
    for r in rows:
        fast_task[r["task"]] = fast_task.get(r["task"], 0.0) + r["features_s"] + r["targets_s"] + r["eval_s"] + r["train_s"]
    return {
        "rows": out_rows,
        "patch": patch,
        "per_task_hours_fast": {t: s / 3600 for t, s in fast_task.items()},
        "per_task_extra_hours": {t: s / 3600 for t, s in per_task.items()},
        "per_task_hours_paper": {t: (fast_task[t] + per_task[t]) / 3600 for t in fast_task},
        "suite_hours_paper": (fast + sum(per_task.values())) / 3600,
        "goal_hours": 6.0,
        "augment_items_per_s_per_worker": augment_rates, "workers": workers, "augment_core_hours": core_s / 3600,
        "note": "per-task hours sum each task's rows with training at its probe's own rate (waves overlap "
                "probes, so the suite total uses the waves' time instead: the per-task split is an upper bound "
                "per task). Rates and probe costs at other input sizes = the measured ones x token-count ratio. "
                "The live rows (GeoNet normals, seg and depth training) forward at the probe's batch (8 / 2 / 2 images) "
                "and write no cache (at `live_images_per_s` when measured, else the extraction rate), and need the "
                "DataLoader workers to augment at the GPU's pace.",
        "live_images_per_s": {str(b): v for b, v in (live_rates or {}).items()} or None,
    }
