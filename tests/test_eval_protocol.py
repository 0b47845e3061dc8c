"""The paper protocol's depth and segmentation rules, each against a hand-computed case (snd.eval.protocol
and the datasets' options).

Rows of issue #19 covered here: depth flip averaging and GT-resolution scoring, the ScanNet Eigen crop, the
KITTI Garg crop on the KB-cropped map, the OneCycle beta1 of the depth optimiser, mmseg's union rule for
GT ids >= the class count. The Probe3D rules live beside: correspondence in test_eval_protocol_corr.py,
surface normals in test_eval_protocol_normals.py.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from snd.eval.probes import DepthProbe, ProbeData, ProbeSpec, SegProbe, evaluate_probe, train_probe
from snd.eval.protocol import FlippedImages, MmsegConfusion, dataset_kwargs, flip_average, mmseg_seg_metrics, onecycle_beta1
from tests._stores import MemoryStore, identity_norm

pytestmark = pytest.mark.usefixtures("one_thread")

C = 6
GRID = (2, 3)
NORM = identity_norm(C)


# ---- depth optimiser: mmcv OneCycle momentum -------------------------------------------------------------
def test_onecycle_beta1_hand_computed():
    # total 10, pct_start 0.3: phase 1 ends at iteration 0.3*10 - 1 = 2 (0.95 -> 0.85), phase 2 at 9 (-> 0.95)
    assert onecycle_beta1(0, 10) == pytest.approx(0.95)
    assert onecycle_beta1(1, 10) == pytest.approx(0.90)  # half-way: 0.85 + 0.05 (cos(pi/2) + 1)
    assert onecycle_beta1(2, 10) == pytest.approx(0.85)
    assert onecycle_beta1(3, 10) == pytest.approx(0.95 + 0.5 * (0.85 - 0.95) * (math.cos(math.pi / 7) + 1))
    assert onecycle_beta1(9, 10) == pytest.approx(0.95)
    # the paper's depth schedule: lowest at iteration 92,159 of 307,200
    assert onecycle_beta1(92_159, 307_200) == pytest.approx(0.85)


def test_depth_training_cycles_beta1_like_a_hand_adamw_loop():
    """Two steps of a probe with beta1_cycle equal a hand-written AdamW loop whose beta1 is set per step."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(1, 1 + 6, C, generator=g)  # one row, batch 1: no batch order to match
    items = [{"image": torch.zeros(3, 8, 12), "depth": 1.0 + torch.rand(8, 12, generator=g) * 3}]
    probe = DepthProbe(C, min_depth=0.1, max_depth=5.0, warmup_loss_iters=0)
    ref = copy.deepcopy(probe)
    spec = ProbeSpec(iters=3, batch=1, lr=1e-2, weight_decay=0.01, schedule="constant", warmup=0, beta1_cycle=True)
    train_probe(probe, ProbeData(items, [0], "depth", MemoryStore(tokens)), spec, grid=GRID, norm=NORM, seed=0,
                residency="stream")

    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.999), weight_decay=0.01)
    gt = torch.stack([it["depth"] for it in items])
    for step in range(3):
        for grp in opt.param_groups:
            grp["betas"] = (onecycle_beta1(step, 3), 0.999)
        opt.zero_grad()
        ref.loss(ref.prepare(tokens, GRID, NORM), {"depth": gt}, step=step).backward()
        opt.step()
    for a, b in zip(probe.parameters(), ref.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
    assert spec.to_json()["beta1_cycle"] is True


# ---- depth test time: flip average, scored at the GT's resolution ---------------------------------------
def test_flip_average_hand_computed():
    pred = torch.tensor([[[1.0, 2.0, 3.0]]])
    pred_of_flipped = torch.tensor([[[10.0, 20.0, 30.0]]])  # flipped back: 30, 20, 10
    assert flip_average(pred, pred_of_flipped).tolist() == [[[15.5, 11.0, 6.5]]]


def test_flipped_images_flip_only_the_image():
    items = [{"image": torch.arange(6.0).reshape(1, 2, 3), "depth": torch.arange(6.0).reshape(2, 3)}]
    f = FlippedImages(items)[0]
    assert f["image"].tolist() == [[[2.0, 1.0, 0.0], [5.0, 4.0, 3.0]]] and f["depth"].tolist() == items[0]["depth"].tolist()


def test_paper_depth_evaluation_averages_the_flipped_pass_at_the_gt_resolution():
    """A probe on tokens that encode depth: paper = metrics of the hand-made flip average at 6x8 (the GT's size,
    not the 8x12 of the probe grid's x4 map); fast = one pass."""
    g = torch.Generator().manual_seed(1)
    probe = DepthProbe(C, min_depth=0.1, max_depth=5.0).eval()
    tok, tok_f = torch.randn(1, 7, C, generator=g), torch.randn(1, 7, C, generator=g)
    gt = 1.0 + 2 * torch.rand(6, 8, generator=g)
    gt[0, 0] = 0.0  # invalid pixel
    items = [{"image": torch.zeros(3, 28, 42), "depth": gt}]
    paper = ProbeData(items, [0], "depth", MemoryStore(tok), flip_store=MemoryStore(tok_f))
    m_paper, _ = evaluate_probe(probe, paper, grid=GRID, norm=NORM, protocol="paper")
    m_fast, _ = evaluate_probe(probe, ProbeData(items, [0], "depth", MemoryStore(tok)), grid=GRID, norm=NORM,
                               protocol="fast")
    from snd.eval.metrics import depth_metrics

    with torch.no_grad():
        p1 = probe.predict(probe.prepare(tok, GRID, NORM), (6, 8))
        p2 = probe.predict(probe.prepare(tok_f, GRID, NORM), (6, 8))
    want = depth_metrics(0.5 * (p1 + p2.flip(-1)), gt[None], min_depth=1e-3, max_depth=5.0)
    assert m_paper["abs_rel"] == pytest.approx(float(want["abs_rel"][0]), rel=1e-5)
    assert m_fast["abs_rel"] == pytest.approx(float(depth_metrics(p1, gt[None], min_depth=1e-3, max_depth=5.0)["abs_rel"][0]), rel=1e-5)
    assert m_paper["abs_rel"] != pytest.approx(m_fast["abs_rel"])
    with pytest.raises(ValueError, match="flip"):  # cached tokens without the flipped pass: an error, not fast
        evaluate_probe(probe, ProbeData(items, [0], "depth", MemoryStore(tok)), grid=GRID, norm=NORM, protocol="paper")


def test_native_target_keeps_the_gt_resolution_cropped_like_the_image():
    from snd.eval.datasets.base import ProbeDataset, RawSample

    class Toy(ProbeDataset):
        name, tasks = "toy", ("depth",)

        def __len__(self):
            return 1

        def load(self, i):  # image 12x16, depth 6x8 (half resolution, same aspect)
            return RawSample(image=np.zeros((12, 16, 3), np.uint8), id="0",
                             depth=np.arange(48, dtype=np.float32).reshape(6, 8) + 1)

    ds = Toy("val", "depth", (6, 6))  # square input: center crop of the columns
    assert tuple(ds[0]["image"].shape) == (3, 6, 6) and tuple(ds[0]["depth"].shape) == (6, 6)
    big = Toy("val", "depth", (3, 3))  # a smaller input: the target stays at 6x6 (native rows, cropped cols)
    big.native_target = True
    d = big[0]["depth"]
    assert tuple(d.shape) == (6, 6) and d[0].tolist() == [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]  # cols 1..6 of 8
    stretch = Toy("val", "depth", (3, 3), fit="resize")
    stretch.native_target = True
    assert tuple(stretch[0]["depth"].shape) == (6, 8)


# ---- depth crops ---------------------------------------------------------------------------------------
def test_scannet_eigen_crop_hand_computed():
    from snd.eval.datasets.scannet import eigen_crop

    d = np.ones((480, 640), np.float32)
    out = eigen_crop(d)
    assert out.sum() == (471 - 45) * (601 - 41)
    assert out[45, 41] == 1 and out[44, 41] == 0 and out[45, 40] == 0 and out[470, 600] == 1 and out[471, 600] == 0


def test_kitti_garg_crop_on_the_kb_map_hand_computed():
    """Fractions of 352x1216: rows int(.40810811*352)=143 .. int(.99189189*352)=349, cols 43 .. 1172."""
    from snd.eval.datasets.kitti import garg_mask

    m = garg_mask(352, 1216, full_hw=(352, 1216))
    rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
    assert (rows[0], rows[-1], cols[0], cols[-1]) == (143, 348, 43, 1171)
    # today's rule (fractions of the full 375x1242 frame, then the KB crop) keeps ~8 % more pixels
    old = garg_mask(352, 1216, offset=(375 - 352, (1242 - 1216) // 2))
    assert 1.07 < old.sum() / m.sum() < 1.09


def test_paper_dataset_options_by_split():
    assert dataset_kwargs("fast", "kitti", "depth", "val") == {} and dataset_kwargs("fast", "kitti", "depth", "train") == {}
    whole = {"whole_frame": True, "native_target": True}
    for name in ("kitti", "nyuv2", "scannet", "scannetpp"):  # every depth set: the whole native frame, both splits
        assert dataset_kwargs("paper", name, "depth", "train") == {**whole, **({"depth_set": "bts"} if name == "nyuv2" else {})}
    assert dataset_kwargs("paper", "kitti", "depth", "val") == {"garg_on": "kb", **whole}
    assert dataset_kwargs("paper", "nyuv2", "depth", "val") == {"depth_set": "bts", **dataset_kwargs("paper", "scannetpp", "depth", "val")} == {"depth_set": "bts", **whole}
    assert dataset_kwargs("paper", "scannet", "depth", "val") == {"eval_crop": True, **whole}
    assert dataset_kwargs("paper", "synth", "depth", "train") == {} and dataset_kwargs("paper", "nyuv2", "seg", "train") == {}
    assert dataset_kwargs("paper", "scannetpp", "seg", "val") == {"keep_extra_ids": True}
    with pytest.raises(ValueError, match="protocol"):
        dataset_kwargs("exact", "kitti", "depth", "val")


# ---- segmentation: GT ids >= the class count enter mmseg's union -------------------------------------
def test_mmseg_union_rule_hand_computed():
    """3 classes; GT id 7 (>= 3) at two pixels predicted 0 and 1; one 255 pixel predicted 2.

    GT   0 0 1 7 | 2 7 255 1      pred 0 1 1 0 | 2 1 2 1
    class 0: TP 1, GT 2, pred 1 + 1 (at the id-7 pixel) -> IoU 1/(2+2-1) = 1/3
    class 1: TP 2, GT 2, pred 3 + 1 (at the id-7 pixel) -> IoU 2/(2+4-2) = 1/2   (2/(2+3-2) = 2/3 without)
    class 2: TP 1, GT 1, pred 1 -> IoU 1
    aAcc = 4 TP / 5 labelled in-range pixels = 80 %; mAcc = mean(1/2, 1, 1)."""
    gt = torch.tensor([[0, 0, 1, 7], [2, 7, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 0], [2, 1, 2, 1]])
    acc = MmsegConfusion(3)
    acc.update(pred, gt)
    m = acc.compute()
    assert m["IoU"] == pytest.approx([100 / 3, 50.0, 100.0])
    assert m["mIoU"] == pytest.approx(100 * (1 / 3 + 1 / 2 + 1) / 3)
    assert m["aAcc"] == pytest.approx(80.0) and m["mAcc"] == pytest.approx(100 * (0.5 + 1 + 1) / 3)
    # without extra ids the rule is the plain confusion matrix
    from snd.eval.metrics import ConfusionAccumulator

    plain, mm = ConfusionAccumulator(3), MmsegConfusion(3)
    ok = torch.tensor([[0, 0, 1, 2], [2, 1, 255, 1]])
    plain.update(pred, ok)
    mm.update(pred, ok)
    assert plain.compute()["mIoU"] == pytest.approx(mm.compute()["mIoU"])
    with pytest.raises(ValueError):  # the plain matrix refuses ids >= K
        ConfusionAccumulator(3).update(pred, gt)


def test_mmseg_metrics_absent_class_and_seg_evaluation_uses_the_rule():
    conf = torch.tensor([[3, 0], [0, 0]])
    m = mmseg_seg_metrics(conf, torch.tensor([0, 2]))  # class 1: no GT, predicted at 2 extra pixels -> IoU 0
    assert m["IoU"][1] == 0.0 and m["mIoU"] == pytest.approx(50.0) and m["mAcc"] == pytest.approx(100.0)
    probe = SegProbe(C, num_classes=2)
    with torch.no_grad():
        probe.conv.weight.zero_()
        probe.conv.bias.copy_(torch.tensor([0.0, 1.0]))  # predicts class 1 everywhere
    items = [{"image": torch.zeros(3, 2, 2), "seg": torch.tensor([[1, 1], [5, 255]])}]
    data = ProbeData(items, [0], "seg", MemoryStore(torch.randn(1, 7, C)))
    paper, _ = evaluate_probe(probe, data, grid=GRID, norm=NORM, protocol="paper")
    assert paper["mIoU"] == pytest.approx(100 * 2 / 3)  # class 1: TP 2, GT 2, pred 3
    with pytest.raises(ValueError):
        evaluate_probe(probe, data, grid=GRID, norm=NORM, protocol="fast")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_beta1_cycle_under_cuda_graphs_equals_eager():
    """The replayed graph reads each step's beta1 from the device tensor: graph = eager, and both differ from
    a fixed beta1."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(4, 7, C, generator=g)
    items = [{"image": torch.zeros(3, 8, 12), "depth": 1.0 + torch.rand(8, 12, generator=g) * 3} for _ in range(4)]
    base = DepthProbe(C, min_depth=0.1, max_depth=5.0, warmup_loss_iters=0)
    out = {}
    for name, graph, cyc in (("graph", "on", True), ("eager", "off", True), ("fixed", "off", False)):
        probe = copy.deepcopy(base)
        spec = ProbeSpec(iters=40, batch=2, lr=1e-2, weight_decay=0.01, schedule="constant", warmup=0, beta1_cycle=cyc)
        train_probe(probe, ProbeData(items, list(range(4)), "depth", MemoryStore(tokens)), spec, grid=GRID, norm=NORM,
                    seed=0, device="cuda", graph=graph, residency="device")
        out[name] = torch.cat([p.detach().flatten().cpu() for p in probe.parameters()])
    torch.testing.assert_close(out["graph"], out["eager"], rtol=1e-4, atol=1e-5)
    assert (out["eager"] - out["fixed"]).abs().max() > 1e-4


def test_demo_evaluates_with_the_fast_protocol(tmp_path):
    from snd.pipeline.demo import demo_configs

    assert demo_configs(tmp_path, scenes=1, iters=1, seed=0)[3].protocol == "fast"
