"""Probe evaluation: metrics at the label resolution, under the fast or the paper protocol (`snd.eval.protocol`).

Apart from training (`snd.eval.probes.train`); both read the rows and tokens of `snd.eval.probes.data`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from snd.eval.metrics import ConfusionAccumulator, MeanAccumulator, depth_metrics, normal_metrics
from snd.eval.mmseg import slide_logits
from snd.eval.probes.base import Probe, to_device
from snd.eval.probes.data import TARGETS, ProbeData, _float_tokens
from snd.eval.protocol import MmsegConfusion, flip_average, zero_normals_as_90deg

__all__ = ["evaluate_probe"]


@torch.no_grad()
def evaluate_probe(
    probe: Probe,
    data: ProbeData,
    *,
    grid: tuple[int, int],
    norm: dict[str, Tensor],
    backbone: nn.Module | None = None,
    device: str | torch.device = "cpu",
    batch: int = 8,
    keep: int = 4,
    num_workers: int = 0,
    protocol: str = "fast",
    precision: str = "fp32",
) -> tuple[dict, list[dict]]:
    """Metrics of `probe` on `data` at the label resolution, and the first `keep` predictions (for figures).

    `protocol="paper"`: depth is the flip average (`tokens_flip` from `data.flip_store`, or the backbone
    on the flipped image on the live path), scored at whatever resolution the targets have (native with
    the paper's datasets; one image per batch, since native sizes may differ); segmentation counts GT ids
    >= the class count in mmseg's union (`MmsegConfusion`) and, on an `MmsegTest` set, is predicted by
    mmseg's sliding windows with the live backbone (`snd.eval.mmseg.slide_logits`); where the dataset marks validity by raw depth
    (`dataset.zero_normal_is_error`, NYU's Probe3D test) a zero normal at a valid pixel scores 90 degrees
    (`zero_normals_as_90deg`). "fast": one pass, the plain confusion matrix, zero normals skipped.
    `precision`: the live backbone's arithmetic (`extract_tokens`), as the cached tokens' `--extract-precision`.

    Returns:
        (metrics, samples): depth -> per-image means of `DEPTH_METRICS` (GT in (1e-3, max_depth) of the
        probe); normals -> per-image means of `NORMAL_METRICS`; seg -> aAcc/mIoU/mAcc from the summed
        confusion matrix. samples: dicts with `image`, `pred`, `gt` (CPU tensors).
    """
    probe.to(device).eval()
    if backbone is not None:
        backbone.to(device).eval()
    task = probe.task
    paper = protocol == "paper"
    flip = paper and task == "depth"
    if flip and data.store is not None and data.flip_store is None:
        raise ValueError("the paper protocol's depth test needs the flipped images' tokens (ProbeData flip_store)")
    # the official seg test: sliding windows on the image rescaled to short side 512, live backbone, one image
    # at a time (sizes differ), logits resized to the ground truth's own size (`snd.eval.mmseg`)
    slide = paper and task == "seg" and bool(getattr(data.dataset, "slide", False))
    if slide and backbone is None:
        raise ValueError("the paper protocol's sliding-window seg test runs the backbone on every window")
    loader = torch.utils.data.DataLoader(data, batch_size=1 if flip or slide else batch, shuffle=False,
                                         num_workers=num_workers)
    # zero normals are errors only where validity comes from the raw depth (NaN marks invalid pixels there)
    z90 = paper and task == "normals" and bool(getattr(data.dataset, "zero_normal_is_error", False))
    if task == "seg":
        acc = (MmsegConfusion if paper else ConfusionAccumulator)(probe.num_classes, probe.ignore_index)
    else:
        acc = MeanAccumulator()
    samples: list[dict] = []
    for b in loader:
        b = to_device(b, device)
        gt = b[TARGETS[task][0]]
        if slide:
            logits = slide_logits(probe, backbone, b["image"], norm, precision=precision)
            pred = F.interpolate(logits, size=tuple(gt.shape[-2:]), mode="bilinear", align_corners=False).argmax(1)
            b["image"] = F.interpolate(b["image"], size=tuple(gt.shape[-2:]), mode="bilinear", align_corners=False)
        else:
            pred = probe.predict(probe.prepare(_float_tokens(b, backbone, precision), grid, norm), tuple(gt.shape[-2:]))
        if flip:
            fb = {"tokens": b["tokens_flip"]} if "tokens_flip" in b else {"image": b["image"].flip(-1)}
            pred = flip_average(pred, probe.predict(probe.prepare(_float_tokens(fb, backbone, precision), grid, norm),
                                                    tuple(gt.shape[-2:])))
        if task == "depth":
            acc.update(depth_metrics(pred, gt, min_depth=1e-3, max_depth=probe.max_depth))
        elif task == "normals":
            acc.update(normal_metrics(pred, zero_normals_as_90deg(pred, gt) if z90 else gt))
        else:
            acc.update(pred, gt)
        for i in range(pred.shape[0]):
            if len(samples) < keep:
                samples.append({"image": b["image"][i].cpu() if "image" in b else None, "pred": pred[i].cpu(),
                                "gt": gt[i].cpu()})
    metrics = acc.compute()
    if task == "seg":
        metrics = {k: v for k, v in metrics.items() if k in ("aAcc", "mIoU", "mAcc")}
        metrics["n_images"] = len(data)
    return metrics, samples
