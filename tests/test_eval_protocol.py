"""The paper protocol's rules, each against a hand-computed case (snd.eval.protocol and the datasets' options).

Rows of issue #19 covered here: depth flip averaging and GT-resolution scoring, the ScanNet Eigen crop, the
KITTI Garg crop on the KB-cropped map, the OneCycle beta1 of the depth optimiser, mmseg's union rule for
GT ids >= the class count.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from snd.eval.probes import DepthProbe, ProbeData, ProbeSpec, SegProbe, evaluate_probe, train_probe
from snd.eval.protocol import FlippedImages, MmsegConfusion, dataset_kwargs, flip_average, mmseg_seg_metrics, onecycle_beta1
from tests._stores import MemoryStore

pytestmark = pytest.mark.usefixtures("one_thread")

C = 6
GRID = (2, 3)
NORM = {"weight": torch.ones(C), "bias": torch.zeros(C), "eps": torch.tensor([1e-6], dtype=torch.float64)}


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


# ---- correspondence geometry (Probe3D) -----------------------------------------------------------------
def test_probe3d_geometry_hand_computed_on_4x4_views():
    """Two 4x4 views, scale 0.5. Probe3D: depth grid = depth[::2, ::2] (`nearest`), K[:2] *= 0.5 with
    pixel centres at +0.5. Grid pixel (r, c) is the point depth * K'^-1 [c + 0.5, r + 0.5, 1]."""
    from snd.eval.correspondence import _scaled_geometry, depth_points, probe3d_intrinsics

    K = torch.tensor([[4.0, 0, 2.0], [0, 4.0, 2.0], [0, 0, 1]])  # Probe3D's K of the 4x4 view
    depth = torch.arange(1.0, 17.0).reshape(4, 4)
    s = {"depth0": depth, "depth1": depth + 1, "K0": K, "K1": K}
    K0, K1, deps = _scaled_geometry(s, 0.5, "probe3d")
    assert deps[0].tolist() == [[1.0, 3.0], [9.0, 11.0]]  # rows/cols 0 and 2 (snd's nearest-exact: 1 and 3)
    _, _, deps_snd = _scaled_geometry(s, 0.5, "snd")
    assert deps_snd[0].tolist() == [[6.0, 8.0], [14.0, 16.0]]
    xyz, uv = depth_points(deps[0], K0)
    # grid (0, 0): u = v = 0.5 in Probe3D's frame; K' fx = 2, cx = 1: x = (0.5 - 1) / 2 * 1 = -0.25
    assert xyz[0].tolist() == pytest.approx([-0.25, -0.25, 1.0])
    # grid (1, 1), depth 11: x = (1.5 - 1) / 2 * 11 = 2.75
    assert xyz[3].tolist() == pytest.approx([2.75, 2.75, 11.0])
    assert probe3d_intrinsics(K, 0.5).tolist() == [[2.0, 0, 0.5], [0, 2.0, 0.5], [0, 0, 1]]


def test_probe3d_errors_with_a_known_pose_match_an_independent_probe3d_formula():
    """Pair errors under the probe3d rule = Probe3D's own formulas written out here (numpy), for a known
    pose and exact matches chosen by one-hot features."""
    from snd.eval.correspondence import _scaled_geometry, pair_errors

    rng = np.random.default_rng(0)
    K = np.array([[6.0, 0, 4.0], [0, 6.0, 4.0], [0, 0, 1]])
    d0 = torch.tensor(2 + rng.random((8, 8)), dtype=torch.float32)
    d1 = torch.tensor(2 + rng.random((8, 8)), dtype=torch.float32)
    T = np.eye(4)
    T[:3, 3] = [0.1, -0.05, 0.02]
    s = {"depth0": d0, "depth1": d1, "K0": torch.tensor(K), "K1": torch.tensor(K)}
    K0, K1, deps = _scaled_geometry(s, 0.5, "probe3d")
    ids = torch.arange(16).reshape(4, 4)
    f = torch.nn.functional.one_hot(ids, 16).permute(2, 0, 1).float()  # grid pixel i matches grid pixel i
    err = pair_errors(f, f, deps[0], deps[1], K0, K1, torch.tensor(T), num_corr=16, ratio_test=False)
    # Probe3D by hand: grid pixel centres (c + .5, r + .5), K' = K * 0.5, depth = d[::2, ::2]
    Ks = K.copy()
    Ks[:2] *= 0.5
    r, c = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    pix = np.stack([c.ravel() + 0.5, r.ravel() + 0.5, np.ones(16)], 0)
    x0 = (np.linalg.inv(Ks) @ pix * d0.numpy()[::2, ::2].ravel()).T
    x1 = (np.linalg.inv(Ks) @ pix * d1.numpy()[::2, ::2].ravel()).T
    x0in1 = x0 @ T[:3, :3].T + T[:3, 3]

    def proj(x):
        p = x @ Ks.T
        return p[:, :2] / p[:, 2:]

    want = np.linalg.norm(proj(x0in1) - proj(x1), axis=1)
    assert sorted(err.tolist()) == pytest.approx(sorted(want.tolist()), rel=1e-5)


def test_center_pad_480x640_to_490x644():
    from snd.eval.protocol import center_pad

    x = torch.ones(1, 3, 480, 640)
    out = center_pad(x, 14, torch.tensor([0.1, 0.2, 0.3]))
    assert tuple(out.shape) == (1, 3, 490, 644)
    # 10 extra rows: 5 above, 5 below; 4 extra columns: 2 left, 2 right
    assert out[0, :, 5:485, 2:642].eq(1).all() and out[0, 1, 4, 2].item() == pytest.approx(0.2)
    assert out[0, 0, 485, 2].item() == pytest.approx(0.1) and out[0, 2, 100, 1].item() == pytest.approx(0.3)
    assert center_pad(torch.ones(1, 3, 28, 42), 14, torch.zeros(3)).shape == (1, 3, 28, 42)


def test_scannet1500_intrinsics_from_each_scenes_npz(tmp_path):
    import snd.eval.datasets as D
    from PIL import Image

    from tests.test_eval_corr import LINE

    root = tmp_path / "scannet1500"
    sd = root / "scannet_test_1500" / "scene0707_00"
    for n in (15, 585):
        (sd / "color").mkdir(parents=True, exist_ok=True)
        (sd / "depth").mkdir(exist_ok=True)
        Image.fromarray(np.full((48, 64, 3), 90, np.uint8)).save(sd / "color" / f"{n}.jpg")
        Image.fromarray(np.full((48, 64), 1000, np.uint16)).save(sd / "depth" / f"{n}.png")
    (root / "scannet_test_pairs_with_gt.txt").write_text(LINE + "\n")
    from snd.errors import SndError

    with pytest.raises(SndError, match="intrinsics.npz"):
        D.get_dataset("scannet1500", tmp_path, "val", "correspondence", (480, 640), intrinsics="npz")
    Kn = np.array([[577.6, 0, 318.9], [0, 578.7, 242.7], [0, 0, 1]])
    np.savez(root / "scannet_test_1500" / "intrinsics.npz", scene0707_00=Kn)
    ds = D.get_dataset("scannet1500", tmp_path, "val", "correspondence", (480, 640), intrinsics="npz")
    s = ds[0]
    np.testing.assert_allclose(s["K0"].numpy(), Kn, rtol=1e-6)  # 480x640 is the npz's own size: K as stored
    np.testing.assert_allclose(s["K1"].numpy(), Kn, rtol=1e-6)


# ---- normals test (Probe3D): 480x480 crop padded to 490^2, valid = raw depth > 0, zero GT = 90 degrees --------
def test_zero_normal_at_a_valid_pixel_scores_90_degrees():
    from snd.eval.metrics import normal_metrics
    from snd.eval.protocol import zero_normals_as_90deg

    pred = torch.tensor([0.0, 0.6, 0.8]).view(1, 3, 1, 1).expand(1, 3, 1, 3).clone()
    nan = float("nan")
    gt = torch.tensor([[0.0, 0.0, nan], [0.6, 0.0, nan], [0.8, 0.0, nan]]).view(1, 3, 1, 3)  # exact, zero, invalid
    m = normal_metrics(pred, zero_normals_as_90deg(pred, gt))
    assert float(m["mean"][0]) == pytest.approx(45.0, abs=1e-4)  # (0 + 90) / 2; the NaN pixel is invalid
    assert float(m["rmse"][0]) == pytest.approx(math.sqrt(90.0 ** 2 / 2), abs=1e-3)
    assert float(normal_metrics(pred, gt)["mean"][0]) == pytest.approx(0.0, abs=1e-4)  # fast: zero skipped


def test_nyuv2_probe3d_normals_test_sample(tmp_path):
    import gzip
    import pickle

    import snd.eval.datasets as D
    from tests.test_eval_datasets import write_mat_v5, write_mat_v73

    rng = np.random.default_rng(0)
    d = tmp_path / "nyuv2"
    d.mkdir()
    images = rng.integers(0, 256, (2, 12, 16, 3), dtype=np.uint8)
    raw = rng.uniform(0.5, 9.0, (2, 12, 16)).astype(np.float32)
    raw[1, 3, 5] = 0.0  # no raw depth
    raw[1, 4, 6] = 11.0  # above 10 m: dropped as Probe3D does
    normals = np.tile(np.array([0.0, 0.0, 1.0], np.float32), (2, 12, 16, 1))
    normals[1, 5, 7] = 0.0  # a zero normal where the raw depth is valid
    write_mat_v73(d / "nyu_depth_v2_labeled.mat", {"images": images.transpose(0, 3, 2, 1),
                                                   "depths": raw.transpose(0, 2, 1), "rawDepths": raw.transpose(0, 2, 1)})
    write_mat_v5(d / "splits.mat", {"trainNdxs": np.array([[1]]), "testNdxs": np.array([[2]])})
    with gzip.open(d / "all_normals.pklz", "wb") as f:
        pickle.dump({"all_normals": normals}, f, protocol=2)
    with pytest.raises(Exception, match="does not fit"):  # padded, never resized
        D.get_dataset("nyuv2", tmp_path, "val", "normals", (10, 16), probe3d_test=True)[0]
    # a 16x16 input (patch 16 for a 12-pixel square): two rows/columns of the mean on each side
    s16 = D.get_dataset("nyuv2", tmp_path, "val", "normals", (16, 16), probe3d_test=True)[0]
    assert tuple(s16["image"].shape) == (3, 16, 16) and tuple(s16["normals"].shape) == (3, 12, 12)
    np.testing.assert_allclose(s16["image"][:, 2:14, 2:14].permute(1, 2, 0).numpy(), images[1][:, 2:14] / 255.0, atol=1e-6)
    assert s16["image"][:, 1, 5].tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert s16["image"][:, 14, 5].tolist() == pytest.approx([0.485, 0.456, 0.406])
    s = D.get_dataset("nyuv2", tmp_path, "val", "normals", (14, 14), probe3d_test=True)[0]
    img, n = s["image"], s["normals"]
    assert tuple(img.shape) == (3, 14, 14) and tuple(n.shape) == (3, 12, 12)
    # the centre square (columns 2:14 of 16) inside one padding row/column of the ImageNet mean
    np.testing.assert_allclose(img[:, 1:13, 1:13].permute(1, 2, 0).numpy(), images[1][:, 2:14] / 255.0, atol=1e-6)
    assert img[:, 0, 0].tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert torch.isnan(n[:, 3, 3]).all() and torch.isnan(n[:, 4, 4]).all()  # raw depth 0 / > 10 m, shifted 2 columns
    assert n[:, 5, 5].tolist() == [0.0, 0.0, 0.0] and n[:, 0, 0].tolist() == [0.0, 0.0, 1.0]
    assert dataset_kwargs("paper", "nyuv2", "normals", "val") == {"probe3d_test": True}


def test_normals_evaluation_scores_zero_normals_only_where_the_dataset_validates_by_depth():
    from snd.eval.probes import NormalProbe

    probe = NormalProbe(C)
    with torch.no_grad():
        probe.conv.weight.zero_()
        probe.conv.bias.copy_(torch.tensor([0.0, 0.0, 1.0, 0.0]))  # predicts +z everywhere
    gt = torch.zeros(3, 4, 4)
    gt[2, :2] = 1.0  # top half exact, bottom half zero

    class Items(list):
        zero_normal_is_error = False

    plain, nyu = Items([{"image": torch.zeros(3, 4, 4), "normals": gt}]), Items([{"image": torch.zeros(3, 4, 4), "normals": gt}])
    nyu.zero_normal_is_error = True
    tok = MemoryStore(torch.randn(1, 7, C))
    m_plain, _ = evaluate_probe(probe, ProbeData(plain, [0], "normals", tok), grid=GRID, norm=NORM, protocol="paper")
    m_nyu, _ = evaluate_probe(probe, ProbeData(nyu, [0], "normals", tok), grid=GRID, norm=NORM, protocol="paper")
    assert m_plain["mean"] == pytest.approx(0.0, abs=1e-3)  # zero = invalid (synth, ScanNet++)
    assert m_nyu["mean"] == pytest.approx(45.0, abs=1e-3)  # half the pixels at 90 degrees


# ---- normals training set: NYU "trainval" of GeoNet (Probe3D's layout, file order, augmentation) -----------
def test_geonet_listing_drops_probe3d_bad_positions(monkeypatch):
    import snd.eval.datasets.geonet as G

    names = [f"f{i:05d}.mat" for i in range(21183)][::-1] + ["notes.txt"]
    monkeypatch.setattr(G.os, "listdir", lambda p: names)
    got = G.geonet_files(Path("x"))
    assert len(got) == 21181 and "f21181.mat" not in got and "f06919.mat" not in got
    assert got[6918:6920] == ["f06918.mat", "f06920.mat"] and got[-1] == "f21182.mat"  # sorted, the rest kept
    monkeypatch.setattr(G.os, "listdir", lambda p: ["b.mat", "a.mat"])
    assert G.geonet_files(Path("x")) == ["a.mat", "b.mat"]  # a small stand-in keeps every file


def test_geonet_sample_from_the_released_layout(tmp_path):
    from snd.eval.datasets.geonet import GEONET_MEAN, GeoNetNYU, find_geonet
    from snd.eval.datasets.matfile import save_mat_v5
    from snd.errors import SndError

    assert find_geonet(tmp_path) is None
    with pytest.raises(SndError, match="GeoNet"):
        GeoNetNYU(tmp_path / "nyuv2_geonet")
    d = tmp_path / "nyuv2_geonet"
    d.mkdir()
    H, W = 6, 10  # centre square: columns 2..7
    colour = np.arange(H * W * 3, dtype=np.float64).reshape(H, W, 3) % 200
    depth = np.full((H, W), 2.0, np.float32)
    depth[0, 3] = 0.0
    depth[1, 4] = 12.0  # above 10 m -> invalid
    norm = np.zeros((H, W, 3), np.float32)
    norm[..., 2] = -1.0
    norm[2, 5] = 0.0  # zero normal at valid depth: kept (an error of 90 degrees for Probe3D)
    # stored as colour + 0.5 - 2·mean: Probe3D's uint8 cast truncates, so every value reads back as `colour`
    save_mat_v5(d / "a.mat", {"img": (colour + 0.5 - 2 * GEONET_MEAN).astype(np.float32), "depth": depth, "norm": norm})
    ds = GeoNetNYU(find_geonet(tmp_path), augment=False)
    s = ds[0]
    assert ds.img_hw == (14, 14) and tuple(s["image"].shape) == (3, 14, 14) and tuple(s["normals"].shape) == (3, 6, 6)
    # the 6x6 square padded by 4 rows/columns on each side
    np.testing.assert_allclose(s["image"][:, 4:10, 4:10].permute(1, 2, 0).numpy() * 255,
                               colour[:, 2:8].astype(np.uint8), atol=1e-3)
    n = s["normals"]
    assert torch.isnan(n[:, 0, 1]).all() and torch.isnan(n[:, 1, 2]).all()
    assert n[:, 2, 3].tolist() == [0.0, 0.0, 0.0] and n[:, 3, 3].tolist() == [0.0, 0.0, -1.0]


def test_paper_train_set_pads_geonet_to_the_backbones_patch(tmp_path):
    from snd.eval.datasets.geonet import write_geonet_standin
    from snd.pipeline.config import EvalConfig
    from snd.stages.eval_plan import paper_train_set

    write_geonet_standin(tmp_path / "nyuv2_geonet", n=1, hw=(24, 32))
    cfg = EvalConfig(data_root=tmp_path, protocol="paper")
    # the 24x24 centre square: padded to 28 for patch 14, to 32 for patch 16 (DINOv3)
    assert paper_train_set(cfg, "nyuv2", "normals", 14).img_hw == (28, 28)
    ds = paper_train_set(cfg, "nyuv2", "normals", 16)
    assert ds.img_hw == (32, 32) and tuple(ds[0]["image"].shape) == (3, 32, 32)


def test_geonet_augmentation_crops_all_targets_alike():
    from snd.eval.datasets.geonet import augment_geonet, random_resized_square

    g = torch.Generator().manual_seed(0)
    sides = [random_resized_square(40, 40, g)[2] for _ in range(200)]
    assert min(sides) >= round(math.sqrt(0.5) * 40) and max(sides) <= 40 and len(set(sides)) > 5
    code = torch.arange(64.0).reshape(8, 8)
    crops = 0
    for seed in range(12):
        img, d, n = augment_geonet(torch.rand(3, 8, 8), code.clone(), code.expand(3, 8, 8).clone(),
                                   torch.Generator().manual_seed(seed))
        assert torch.equal(d, n[0]) and torch.equal(n[0], n[2])  # one crop for depth and normals
        crops += not torch.equal(d, code)
    assert 0 < crops < 12  # p = 0.5


def test_file_order_batches_and_the_finite_mask():
    from snd.eval.probes import NormalProbe
    from snd.eval.probes.normals import angular_nll
    from snd.eval.probes.train import batch_order

    assert list(batch_order(5, 2, 0, 0, 5, shuffle=False)) == [[0, 1], [2, 3], [0, 1], [2, 3], [0, 1]]
    probe = NormalProbe(C, mask="finite")
    gt = torch.zeros(1, 3, 8, 12)
    gt[:, 2] = 1.0
    gt[:, :, 0, 0] = 0.0  # zero normal: trained on with "finite"
    gt[:, :, 0, 1] = float("nan")  # no depth: excluded
    feats = torch.randn(1, C, 2, 3)
    pred = probe._at(feats, (8, 12))
    mask = torch.ones(1, 8, 12, dtype=torch.bool)
    mask[0, 0, 1] = False
    want = angular_nll(pred, gt, mask)
    assert probe.loss(feats, {"normals": gt}, step=0).item() == pytest.approx(want.item())
    assert NormalProbe(C).loss(feats, {"normals": gt}, step=0).item() != pytest.approx(want.item())
    assert probe.config()["mask"] == "finite" and "mask" not in NormalProbe(C).config()


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
