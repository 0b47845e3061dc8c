"""Probe metrics against hand-computed cases (depth masking, per-image means, angles, confusion rules)."""
from __future__ import annotations

import math

import pytest
import torch

from snd.eval.metrics import (ConfusionAccumulator, MeanAccumulator, confusion_matrix, depth_metrics,
                              normal_metrics, seg_metrics_from_confusion)

nan = float("nan")


# ---- depth -------------------------------------------------------------------------------------------
def test_depth_metrics_hand_computed_with_invalid_pixels():
    # valid: (gt 1, pred 2) and (gt 1, pred 1); dropped: gt 0, gt NaN, gt beyond max, pred <= 0, pred NaN
    pred = torch.tensor([[[2.0, 1.0, 4.0], [5.0, 3.0, 0.0], [nan, 1.0, 1.0]]])
    gt = torch.tensor([[[1.0, 1.0, 0.0], [nan, 50.0, 2.0], [1.0, -1.0, float("inf")]]])
    m = depth_metrics(pred, gt, min_depth=1e-3, max_depth=10.0)
    assert m["abs_rel"].item() == pytest.approx(0.5)
    assert m["rmse"].item() == pytest.approx(math.sqrt(0.5))
    assert m["log10"].item() == pytest.approx(math.log10(2) / 2)
    # ratio 2 fails 1.25, 1.5625 and 1.953125; ratio 1 passes all
    assert [m[k].item() for k in ("delta1", "delta2", "delta3")] == pytest.approx([0.5, 0.5, 0.5])


def test_depth_delta_thresholds_and_image_without_valid_pixels():
    gt = torch.ones(2, 1, 4)
    pred = torch.tensor([[[1.2, 1.5, 1.9, 2.5]], [[1.0, 1.0, 1.0, 1.0]]])
    gt[1] = 0  # second image has no valid pixel -> NaN, skipped by the accumulator
    m = depth_metrics(pred, gt)
    assert m["delta1"][0].item() == pytest.approx(0.25)  # only 1.2 < 1.25
    assert m["delta2"][0].item() == pytest.approx(0.50)  # 1.2, 1.5 < 1.5625
    assert m["delta3"][0].item() == pytest.approx(0.75)  # 1.9 < 1.953
    assert all(math.isnan(m[k][1].item()) for k in m)
    acc = MeanAccumulator()
    acc.update(m)
    out = acc.compute()
    assert out["delta1"] == pytest.approx(0.25) and out["n_images"] == 2


def test_depth_is_mean_over_images_not_over_pixels():
    # image A: 1 pixel with AbsRel 1; image B: 3 pixels exact -> per-image mean 0.5 (pooled would be 0.25)
    acc = MeanAccumulator()
    acc.update(depth_metrics(torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]])))
    acc.update(depth_metrics(torch.tensor([[3.0, 3.0, 3.0]]), torch.tensor([[3.0, 3.0, 3.0]])))
    assert acc.compute()["abs_rel"] == pytest.approx(0.5)


# ---- normals -----------------------------------------------------------------------------------------
def _normals(vectors):
    """[N,3] list -> [1,3,1,N] tensor"""
    return torch.tensor(vectors, dtype=torch.float32).T[None, :, None, :]


def test_normal_metrics_hand_computed():
    gt = _normals([[0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 0], [0, 0, 1]])
    pred = _normals([[1, 0, 1], [0, 0, 2], [0, 1, 0], [1, 0, 0], [0, 0.2, 1]])
    mask = torch.tensor([[[True, True, True, True, False]]])  # last pixel masked by the caller
    m = normal_metrics(pred, gt, mask)
    errs = [45.0, 0.0, 90.0]  # invalid GT (zero vector) and masked pixel dropped
    assert m["rmse"].item() == pytest.approx(math.sqrt(sum(e * e for e in errs) / 3))
    assert m["mean"].item() == pytest.approx(45.0)
    assert m["median"].item() == pytest.approx(45.0)
    assert m["pct_11_25"].item() == pytest.approx(100 / 3)
    assert m["pct_22_5"].item() == pytest.approx(100 / 3)
    assert m["pct_30"].item() == pytest.approx(100 / 3)


def test_normal_median_even_count_and_empty_image():
    gt = _normals([[0, 0, 1]] * 4)
    pred = _normals([[0, 0, 1], [1, 0, 1], [0, 1, 0], [0, 1, 0]])  # 0, 45, 90, 90
    assert normal_metrics(pred, gt)["median"].item() == pytest.approx(67.5)
    m = normal_metrics(pred, torch.zeros_like(gt))
    assert all(math.isnan(v.item()) for v in m.values())


# ---- segmentation ------------------------------------------------------------------------------------
def test_seg_metrics_hand_computed_ignore_and_absent_class():
    gt = torch.tensor([0, 0, 1, 1, 255, 2])
    pred = torch.tensor([0, 1, 1, 1, 0, 1])
    conf = confusion_matrix(pred, gt, 4, ignore_index=255)
    assert conf.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    m = seg_metrics_from_confusion(conf)
    assert m["aAcc"] == pytest.approx(60.0)
    # IoU: c0 1/2, c1 2/4, c2 0/1, c3 absent from GT and prediction -> excluded
    assert m["mIoU"] == pytest.approx(100 / 3)
    assert m["mAcc"] == pytest.approx(50.0)  # (1/2 + 1 + 0) / 3
    assert math.isnan(m["IoU"][3]) and math.isnan(m["Acc"][3])


def test_seg_predicted_only_class_counts_as_zero_iou():
    m = seg_metrics_from_confusion(confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 0]), 4))
    assert m["IoU"][3] == 0.0 and math.isnan(m["Acc"][3])
    assert m["mIoU"] == pytest.approx(25.0) and m["mAcc"] == pytest.approx(50.0) and m["aAcc"] == pytest.approx(50.0)


def test_seg_ignore_label_zero_and_accumulation():
    acc = ConfusionAccumulator(num_classes=3, ignore_index=0)
    acc.update(torch.tensor([[1, 1]]), torch.tensor([[0, 1]]))
    acc.update(torch.tensor([[1]]), torch.tensor([[2]]))
    m = acc.compute()
    assert m["aAcc"] == pytest.approx(50.0)
    assert m["mIoU"] == pytest.approx(25.0)  # c1: 1/2, c2: 0; c0 is the ignore label -> never counted
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([0]), torch.tensor([7]), 3, ignore_index=255)


def test_confusion_matrix_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    gt = torch.randint(0, 6, (500,), generator=g)
    gt[::7] = 255
    pred = torch.randint(0, 6, (500,), generator=g)
    ref = torch.zeros(6, 6, dtype=torch.long)
    for a, b in zip(gt.tolist(), pred.tolist()):
        if a != 255:
            ref[a, b] += 1
    assert torch.equal(confusion_matrix(pred, gt, 6), ref)
