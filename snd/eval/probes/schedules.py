"""Learning-rate schedules of the official probes, as pure functions of the step (so resume is exact).

* `mmcv_cosine`: mmcv `CosineAnnealing` + linear warm-up, the depth probe (warm-up 12,800 of 307,200 iters,
  warm-up ratio 1e-3, min lr ratio 1e-8).
* `mmcv_poly`: mmcv `poly` (power 1, min lr 0) + linear warm-up, the segmentation probe (1,500 of 320,000,
  ratio 1e-6).
* `probe3d_cosine`: probe3d `cosine_decay_linear_warmup` (min factor 0.01, warm-up 1.5 of 10 epochs), the
  normal probe. Note its decay is a quarter cosine, cos(0.5·π·t), reaching the floor only at the end.
"""
from __future__ import annotations

import math
from typing import Literal

__all__ = ["Schedule", "lr_factor"]

Schedule = Literal["mmcv_cosine", "mmcv_poly", "probe3d_cosine", "constant"]


def _mmcv_warmup(factor: float, step: int, warmup: int, ratio: float) -> float:
    """mmcv linear warm-up: the regular factor times 1 - (1 - step/warmup)(1 - ratio)."""
    if step >= warmup or warmup <= 0:
        return factor
    return factor * (1 - (1 - step / warmup) * (1 - ratio))


def lr_factor(schedule: Schedule, step: int, total: int, *, warmup: int = 0, warmup_ratio: float = 1e-3,
              min_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based) of `total`."""
    if schedule not in ("mmcv_cosine", "mmcv_poly", "probe3d_cosine", "constant"):
        raise ValueError(f"unknown schedule {schedule!r}")
    total = max(total, 1)
    if schedule == "constant":
        return 1.0
    if schedule == "mmcv_cosine":
        f = min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * step / total))
        return _mmcv_warmup(f, step, warmup, warmup_ratio)
    if schedule == "mmcv_poly":
        f = (1 - step / total) ** 1.0 * (1 - min_ratio) + min_ratio
        return _mmcv_warmup(f, step, warmup, warmup_ratio)
    # probe3d_cosine (min factor 0.01)
    lo = 0.01
    if step <= warmup and warmup > 0:
        return (1 - lo) * (step / warmup) + lo
    rel = (step - warmup) / max(total - warmup, 1)
    return (1 - lo) * math.cos(0.5 * rel * math.pi) + lo
