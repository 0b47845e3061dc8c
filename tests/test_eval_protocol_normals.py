"""The paper protocol's surface-normal rules (Probe3D), each against a hand-computed case: the NYUv2 test
sample (480x480 crop padded to the patch, valid = raw depth > 0, zero GT = 90 degrees) and the training set
(GeoNet's NYU "trainval": listing, layout, file order, augmentation, the finite mask).

Split from test_eval_protocol.py (one file per protocol rule family).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from snd.eval.probes import ProbeData, evaluate_probe
from snd.eval.protocol import dataset_kwargs
from tests._stores import MemoryStore, identity_norm

pytestmark = pytest.mark.usefixtures("one_thread")

C = 6
GRID = (2, 3)
NORM = identity_norm(C)


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
    from snd.eval.probes.data import batch_order

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
