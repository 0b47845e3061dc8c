"""Trivial baselines: the best a probe could do without looking at the features.

Why: a probe's number means little on its own (on the procedural scenes there is no paper number to
compare with). A constant predictor fit on the *training* split and scored on the *val* split with the
*same* metric code (`snd.eval.metrics`) is the floor every probe must clear; a probe that does not beat
it has learned nothing from the features.

* depth: the **median** training depth (over every valid pixel of every training image, a pixel counting
  when it would count in the metric: finite and in (1e-3, max_depth)) as a constant map. The median, not
  the mean, because it is the stronger constant for AbsRel / log10 / δ (the depth maps are right-skewed);
  it is read off a histogram of `DEPTH_BINS` bins over (0, max_depth), so it is exact to one bin width
  (1 mm for a 10 m range);
* normals: the mean of the valid training GT normals, normalised, as a constant direction (camera frame);
* seg: the majority class of the non-ignored training pixels everywhere (ties: the lowest class id).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal

import torch
from torch import Tensor

from snd.eval.metrics import ConfusionAccumulator, MeanAccumulator, depth_metrics, normal_metrics

__all__ = ["Trivial", "DEPTH_BINS", "fit_trivial", "trivial_prediction", "evaluate_trivial"]

TrivialTask = Literal["depth", "normals", "seg"]
DEPTH_BINS = 10_000
MIN_DEPTH = 1e-3  # the metric's lower bound (`evaluate_probe` uses the same)


@dataclass
class Trivial:
    """A fitted constant predictor.

    value: depth -> [] metres; normals -> [3] unit vector; seg -> [] int64 class id.
    """

    task: TrivialTask
    value: Tensor
    n_pixels: int  # training pixels it was fit on

    def describe(self) -> str:
        if self.task == "depth":
            return f"median training depth {float(self.value):.3f} m everywhere"
        if self.task == "normals":
            x, y, z = (float(v) for v in self.value)
            return f"mean training normal ({x:.2f}, {y:.2f}, {z:.2f}) everywhere"
        return f"majority training class {int(self.value)} everywhere"

    def to_json(self) -> dict:
        return {"task": self.task, "value": self.value.tolist(), "n_pixels": self.n_pixels, "predictor": self.describe()}


def _check_task(task: str) -> None:
    if task not in ("depth", "normals", "seg"):
        raise ValueError(f"no trivial baseline for task {task!r}; expected 'depth', 'normals' or 'seg'")


def _median_from_histogram(counts: Tensor, hi: float) -> float:
    """Centre of the bin holding the median of the histogrammed values (bins uniform over (0, hi))."""
    n = int(counts.sum())
    cum = counts.cumsum(0)
    k = int(torch.searchsorted(cum, torch.tensor((n + 1) // 2, dtype=cum.dtype)))  # first bin reaching half
    width = hi / counts.numel()
    return (k + 0.5) * width


def fit_trivial(task: TrivialTask, targets: Iterable[Tensor], *, max_depth: float = 10.0,
                num_classes: int | None = None, ignore_index: int = 255) -> Trivial:
    """Fit the constant predictor of `task` on the training split's targets.

    Args:
        task: "depth" | "normals" | "seg".
        targets: one target per training image: depth [H,W] metres (<= 0 / non-finite invalid),
            normals [3,H,W] (all-zero / non-finite invalid), seg [H,W] int class ids (`ignore_index` ignored).
        max_depth: depth metric cap (GT >= max_depth does not count, as in the metric).
        num_classes: seg class count (labels must lie in [0, num_classes)).

    Raises:
        ValueError when the training targets have no valid pixel.
    """
    _check_task(task)
    if task == "depth":
        if not max_depth > MIN_DEPTH:
            raise ValueError(f"max_depth must exceed {MIN_DEPTH}, got {max_depth}")
        counts = torch.zeros(DEPTH_BINS, dtype=torch.int64)
        for d in targets:
            assert d.ndim == 2, f"depth target must be [H,W], got {tuple(d.shape)}"
            d = d.double().reshape(-1)
            d = d[torch.isfinite(d) & (d > MIN_DEPTH) & (d < max_depth)]
            b = (d / max_depth * DEPTH_BINS).long().clamp_(0, DEPTH_BINS - 1)
            counts += torch.bincount(b, minlength=DEPTH_BINS)
        n = int(counts.sum())
        if n == 0:
            raise ValueError("no valid training depth pixel")
        return Trivial("depth", torch.tensor(_median_from_histogram(counts, max_depth), dtype=torch.float64), n)
    if task == "normals":
        total, n = torch.zeros(3, dtype=torch.float64), 0
        for g in targets:
            assert g.ndim == 3 and g.shape[0] == 3, f"normal target must be [3,H,W], got {tuple(g.shape)}"
            g = g.double().reshape(3, -1)
            norm = g.norm(dim=0)
            ok = torch.isfinite(g).all(0) & (norm > 1e-6)
            total += (g[:, ok] / norm[ok]).sum(1)  # unit vectors, so each pixel weighs the same
            n += int(ok.sum())
        if n == 0 or total.norm() < 1e-12:
            raise ValueError("no valid training normal (or they cancel out exactly)")
        return Trivial("normals", total / total.norm(), n)
    if not num_classes or num_classes < 1:
        raise ValueError(f"seg needs num_classes >= 1, got {num_classes}")
    counts = torch.zeros(num_classes, dtype=torch.int64)
    for s in targets:
        assert s.ndim == 2, f"seg target must be [H,W], got {tuple(s.shape)}"
        s = s.reshape(-1).long()
        s = s[s != ignore_index]
        if s.numel() and (s.min() < 0 or s.max() >= num_classes):
            raise ValueError(f"seg labels outside [0, {num_classes}) (ignore label {ignore_index})")
        counts += torch.bincount(s, minlength=num_classes)
    if int(counts.sum()) == 0:
        raise ValueError("no labelled training pixel")
    return Trivial("seg", counts.argmax().reshape(()), int(counts.sum()))  # argmax: first max = lowest id


def trivial_prediction(t: Trivial, gt: Tensor) -> Tensor:
    """The constant prediction shaped like the probe's for target `gt` (depth/seg [..,H,W], normals [..,3,H,W])."""
    if t.task == "depth":
        return torch.full(gt.shape, float(t.value), dtype=torch.float32)
    if t.task == "normals":
        assert gt.shape[-3] == 3, f"normal target must be [...,3,H,W], got {tuple(gt.shape)}"
        shape = [1] * gt.ndim
        shape[-3] = 3
        return t.value.float().reshape(shape).expand(gt.shape).clone()
    return torch.full(gt.shape, int(t.value), dtype=torch.int64)


def evaluate_trivial(t: Trivial, targets: Iterable[Tensor], *, max_depth: float = 10.0,
                     num_classes: int | None = None, ignore_index: int = 255, paper: bool = False) -> dict:
    """Metrics of the constant predictor on the val targets, with the probes' metric code and conventions.

    `paper` (the paper protocol's rules, `snd.eval.protocol`): seg GT ids >= num_classes (not the ignore
    label) enter the union as in mmseg (`MmsegConfusion`; otherwise they are an error); a zero normal at a
    valid pixel scores 90 degrees (`zero_normals_as_90deg`).

    Returns the same keys as `snd.eval.probes.evaluate_probe` (depth/normals: per-image means and
    "n_images"; seg: aAcc/mIoU/mAcc in percent from the summed confusion matrix and "n_images").
    """
    if t.task == "seg":
        if not num_classes:
            raise ValueError("seg needs num_classes")
        from snd.eval.protocol import MmsegConfusion

        acc = MmsegConfusion(num_classes, ignore_index) if paper else ConfusionAccumulator(num_classes, ignore_index)
        n = 0
        for g in targets:
            acc.update(trivial_prediction(t, g), g.long())
            n += 1
        m = acc.compute()
        out = {k: m[k] for k in ("aAcc", "mIoU", "mAcc")}
        out["n_images"] = n
        return out
    mean = MeanAccumulator()
    for g in targets:
        if t.task == "depth":
            mean.update(depth_metrics(trivial_prediction(t, g)[None], g[None].float(), min_depth=MIN_DEPTH,
                                      max_depth=max_depth))
        else:
            pred, gt = trivial_prediction(t, g)[None], g[None].float()
            if paper:
                from snd.eval.protocol import zero_normals_as_90deg

                gt = zero_normals_as_90deg(pred, gt)
            mean.update(normal_metrics(pred, gt))
    out = mean.compute()
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}
