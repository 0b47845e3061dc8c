"""Metrics of the three dense probes: depth, surface normals, semantic segmentation.

Conventions (each one is what the official SnD evaluation code does, so numbers compare to the paper):

* Depth (`evaluation1/.../depth/core/evaluation/metrics.py`): a pixel counts when the ground truth is
  finite and inside (min_depth, max_depth) and the prediction is finite and > 0. Every metric is computed
  **per image** and the split's value is the **mean over images** (images without a valid pixel give NaN
  and are skipped, like `np.nanmean`). AbsRel = mean |d - d*| / d*, RMSE = sqrt(mean (d - d*)^2),
  log10 = mean |log10 d - log10 d*|, delta_k = fraction with max(d/d*, d*/d) < 1.25^k.
* Normals (probe3d `evaluate_surface_norm`): angle between prediction (any length; only the direction
  counts) and ground truth, in degrees; a pixel counts when the GT normal is non-zero and finite (and the
  caller's optional mask is set). RMSE, mean, median and the fractions below 11.25/22.5/30 degrees are
  computed **per image**, then averaged over images.
* Segmentation (mmseg `intersect_and_union`, which the official code uses): one confusion matrix summed
  over all pixels of the split (not per image). Pixels whose GT equals `ignore_index` are dropped.
  aAcc = trace / total. Per class c: IoU_c = TP / (GT_c + Pred_c - TP), Acc_c = TP / GT_c.
  **Rule for absent classes:** a class with no GT pixel has Acc_c = NaN (excluded from mAcc); a class
  with neither GT nor predicted pixels has IoU_c = NaN (excluded from mIoU); a class that is predicted but
  never in the GT keeps IoU_c = 0 (a false positive is a real error). mIoU / mAcc are means over the
  non-NaN classes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "DEPTH_METRICS", "NORMAL_METRICS", "SEG_METRICS", "LOWER_IS_BETTER",
    "depth_metrics", "normal_metrics", "confusion_matrix", "seg_metrics_from_confusion",
    "MeanAccumulator", "ConfusionAccumulator",
]

DEPTH_METRICS = ("abs_rel", "rmse", "log10", "delta1", "delta2", "delta3")
NORMAL_METRICS = ("rmse", "mean", "median", "pct_11_25", "pct_22_5", "pct_30")
SEG_METRICS = ("aAcc", "mIoU", "mAcc")
# Direction of every metric name used in reports (correspondence recalls are higher-is-better).
LOWER_IS_BETTER = {"abs_rel": True, "rmse": True, "log10": True, "mean": True, "median": True,
                   "delta1": False, "delta2": False, "delta3": False, "pct_11_25": False, "pct_22_5": False,
                   "pct_30": False, "aAcc": False, "mIoU": False, "mAcc": False}


def depth_metrics(pred: Tensor, gt: Tensor, *, min_depth: float = 1e-3, max_depth: float = float("inf")
                  ) -> dict[str, Tensor]:
    """Per-image depth metrics.

    Args:
        pred: predicted depth in metres, [B, H, W] (or [H, W]).
        gt: ground-truth depth in metres, same shape; <= 0, NaN or inf means invalid.
        min_depth, max_depth: GT outside the open interval (min_depth, max_depth) is ignored
            (official: 1e-3 and the dataset's cap, e.g. 10 m NYUv2, 20 m ScanNet++, 80 m KITTI).

    Returns:
        {name: [B] float64 tensor} for `DEPTH_METRICS`, NaN for images without a valid pixel.
    """
    if pred.shape != gt.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and gt {tuple(gt.shape)} differ")
    if pred.ndim == 2:
        pred, gt = pred[None], gt[None]
    assert pred.ndim == 3, f"expected [B,H,W], got {tuple(pred.shape)}"
    p, g = pred.double().flatten(1), gt.double().flatten(1)
    valid = torch.isfinite(g) & (g > min_depth) & (g < max_depth) & torch.isfinite(p) & (p > 0)
    n = valid.sum(1).double()
    # Substitute 1 at invalid pixels so that logs and divisions stay finite; they are masked out below.
    p = torch.where(valid, p, torch.ones_like(p))
    g = torch.where(valid, g, torch.ones_like(g))
    v = valid.double()

    def mean(x: Tensor) -> Tensor:
        return (x * v).sum(1) / n  # n == 0 -> NaN, as intended

    ratio = torch.maximum(p / g, g / p)
    out = {
        "abs_rel": mean((p - g).abs() / g),
        "rmse": mean((p - g) ** 2).sqrt(),
        "log10": mean((torch.log10(p) - torch.log10(g)).abs()),
        "delta1": mean((ratio < 1.25).double()),
        "delta2": mean((ratio < 1.25 ** 2).double()),
        "delta3": mean((ratio < 1.25 ** 3).double()),
    }
    return out


def normal_metrics(pred: Tensor, gt: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
    """Per-image angular-error metrics in degrees.

    Args:
        pred: predicted normals [B, 3, H, W] (normalised here; a zero-length prediction gives 90 deg).
        gt: ground-truth normals [B, 3, H, W]; all-zero or non-finite vectors are invalid.
        mask: optional extra validity [B, H, W] bool (e.g. probe3d's depth > 0).

    Returns:
        {name: [B] float64} for `NORMAL_METRICS` (angles in degrees, fractions in percent),
        NaN for images without a valid pixel.
    """
    if pred.shape != gt.shape or pred.ndim != 4 or pred.shape[1] != 3:
        raise ValueError(f"expected pred and gt [B,3,H,W], got {tuple(pred.shape)} and {tuple(gt.shape)}")
    p, g = pred.double(), gt.double()
    gnorm = g.norm(dim=1)
    valid = torch.isfinite(g).all(1) & (gnorm > 1e-6) & torch.isfinite(p).all(1)
    if mask is not None:
        assert mask.shape == valid.shape, f"mask {tuple(mask.shape)} vs {tuple(valid.shape)}"
        valid &= mask.bool()
    cos = (p * g).sum(1) / (p.norm(dim=1).clamp_min(1e-12) * gnorm.clamp_min(1e-12))
    err = torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))  # [B,H,W]
    out: dict[str, list[float]] = {k: [] for k in NORMAL_METRICS}
    for b in range(err.shape[0]):
        e = err[b][valid[b]]
        if e.numel() == 0:
            for k in NORMAL_METRICS:
                out[k].append(math.nan)
            continue
        out["rmse"].append(float(e.pow(2).mean().sqrt()))
        out["mean"].append(float(e.mean()))
        # the lower median of an even count would bias low; use the midpoint of the two middle values
        s = e.sort().values
        m = s.numel()
        out["median"].append(float((s[(m - 1) // 2] + s[m // 2]) / 2))
        out["pct_11_25"].append(float((e < 11.25).double().mean() * 100))
        out["pct_22_5"].append(float((e < 22.5).double().mean() * 100))
        out["pct_30"].append(float((e < 30.0).double().mean() * 100))
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


def confusion_matrix(pred: Tensor, gt: Tensor, num_classes: int, *, ignore_index: int | None = 255) -> Tensor:
    """Confusion matrix [num_classes, num_classes] int64, rows = GT class, columns = predicted class.

    Args:
        pred: predicted class ids, any shape, integer, in [0, num_classes).
        gt: GT class ids, same shape; `ignore_index` pixels are dropped. Other ids outside
            [0, num_classes) are an error (a wrong num_classes would silently skew mIoU).
        num_classes: number of classes.
        ignore_index: label to drop (255 after mmseg's reduce_zero_label; 0 for raw ScanNet++-style masks);
            None keeps every pixel.
    """
    if pred.shape != gt.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and gt {tuple(gt.shape)} differ")
    p, g = pred.reshape(-1).long(), gt.reshape(-1).long()
    if ignore_index is not None:
        keep = g != ignore_index
        p, g = p[keep], g[keep]
    for name, x in (("GT", g), ("predicted", p)):
        if x.numel() and (x.min() < 0 or x.max() >= num_classes):
            bad = x[(x < 0) | (x >= num_classes)].unique()[:8].tolist()
            raise ValueError(f"{name} labels {bad} outside [0, {num_classes}) (ignore label {ignore_index})")
    conf = torch.bincount(g * num_classes + p, minlength=num_classes * num_classes)
    return conf.reshape(num_classes, num_classes)


def seg_metrics_from_confusion(conf: Tensor) -> dict:
    """aAcc, mIoU, mAcc in percent from a confusion matrix (rows GT, columns prediction).

    Args:
        conf: [K, K] counts.

    Returns:
        {"aAcc", "mIoU", "mAcc"} floats in percent, plus "IoU" and "Acc" lists (NaN for absent classes).
        See the module docstring for the absent-class rule.
    """
    assert conf.ndim == 2 and conf.shape[0] == conf.shape[1], f"expected [K,K], got {tuple(conf.shape)}"
    c = conf.double()
    tp = c.diag()
    gt_count = c.sum(1)
    pred_count = c.sum(0)
    union = gt_count + pred_count - tp
    total = gt_count.sum()
    nan = torch.tensor(math.nan, dtype=torch.float64)
    iou = torch.where(union > 0, tp / union.clamp_min(1), nan)
    acc = torch.where(gt_count > 0, tp / gt_count.clamp_min(1), nan)

    def nanmean(x: Tensor) -> float:
        x = x[~torch.isnan(x)]
        return float(x.mean() * 100) if x.numel() else math.nan

    return {
        "aAcc": float(tp.sum() / total * 100) if total > 0 else math.nan,
        "mIoU": nanmean(iou),
        "mAcc": nanmean(acc),
        "IoU": (iou * 100).tolist(),
        "Acc": (acc * 100).tolist(),
    }


@dataclass
class MeanAccumulator:
    """Collects per-image metric tensors and reports the mean over images, skipping NaN images."""

    values: dict[str, list[Tensor]] = field(default_factory=dict)

    def update(self, per_image: dict[str, Tensor]) -> None:
        for k, v in per_image.items():
            self.values.setdefault(k, []).append(v.detach().double().reshape(-1).cpu())

    def compute(self) -> dict[str, float]:
        out = {}
        for k, vs in self.values.items():
            x = torch.cat(vs)
            x = x[~torch.isnan(x)]
            out[k] = float(x.mean()) if x.numel() else math.nan
        out["n_images"] = int(sum(v.numel() for v in next(iter(self.values.values()), [])))
        return out


@dataclass
class ConfusionAccumulator:
    """Sums confusion matrices over a split (the mmseg convention: one matrix for all pixels)."""

    num_classes: int
    ignore_index: int | None = 255
    conf: Tensor | None = None

    def update(self, pred: Tensor, gt: Tensor) -> None:
        """Add one batch, on the predictions' device (integer counts: exact in any order; counting 300 k
        pixels per image on the host made evaluation CPU-bound at ~40 images/s)."""
        m = confusion_matrix(pred, gt.to(pred.device), self.num_classes, ignore_index=self.ignore_index)
        self.conf = m if self.conf is None else self.conf + m

    def compute(self) -> dict:
        if self.conf is None:
            return {"aAcc": math.nan, "mIoU": math.nan, "mAcc": math.nan}
        return seg_metrics_from_confusion(self.conf.cpu())
