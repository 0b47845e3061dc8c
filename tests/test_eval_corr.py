"""Correspondence probe: exact toy pairs, a brute-force twin, rotation bins, pair datasets."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import snd.eval.datasets as D
from snd.data.camera import Camera
from snd.errors import SndError
from snd.eval.correspondence import (
    bin_by_rotation,
    evaluate_correspondence,
    match_features,
    match_features_reference,
    pair_errors,
    rotation_angle_deg,
    write_recall_curve_png,
)
from snd.eval.datasets.pairs import parse_frame_name, parse_pair_line

H, W = 120, 160  # full resolution; the probe grid at scale 0.25 is 30 x 40
h, w = 30, 40
K_FULL = np.array([[100.0, 0, 79.5], [0, 100.0, 59.5], [0, 0, 1]])


def rot(axis, deg):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = math.radians(deg)
    Kx = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(a) * Kx + (1 - math.cos(a)) * Kx @ Kx


def pair(depth0, depth1, T, K0=K_FULL, K1=K_FULL, hw=(H, W)):
    return {"image0": torch.zeros(3, *hw), "image1": torch.zeros(3, *hw),
            "depth0": torch.as_tensor(depth0, dtype=torch.float32), "depth1": torch.as_tensor(depth1, dtype=torch.float32),
            "K0": torch.as_tensor(K0, dtype=torch.float32), "K1": torch.as_tensor(K1, dtype=torch.float32),
            "T_0to1": torch.as_tensor(T, dtype=torch.float32), "meta": {"id": "toy"}}


class Pairs(torch.utils.data.Dataset):
    def __init__(self, items, feats):
        self.items, self.feats, self.k = items, feats, 0

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        self.k = i
        return self.items[i]

    def model_fn(self, images):  # features of the pair most recently fetched
        return self.feats[self.k]


def one_hot(ids, dim):  # ids [h, w] -> [dim, h, w]
    return torch.nn.functional.one_hot(torch.as_tensor(ids), dim).permute(2, 0, 1).float()


def test_exact_one_hot_matches_give_full_recall():
    """Camera moved sideways by 5 grid pixels; features = one-hot of the true 3D point -> recall 1.0."""
    Z, dx = 2.0, 5
    tx = dx * Z / 25.0  # grid fx = 100 * 0.25
    T = np.eye(4)
    T[0, 3] = -tx
    v, u = np.mgrid[0:h, 0:w]
    f0 = one_hot(v * (w + dx) + u, h * (w + dx))
    f1 = one_hot(v * (w + dx) + u + dx, h * (w + dx))
    ds = Pairs([pair(np.full((H, W), Z), np.full((H, W), Z), T)], [torch.stack([f0, f1])])
    r = evaluate_correspondence(ds.model_fn, ds, num_corr=1000)
    assert r["num_correspondences"] == 1000  # 35 x 30 = 1050 matchable points, the top 1000 kept
    assert r["recall"] == {"5px": 1.0, "10px": 1.0, "20px": 1.0}
    assert r["recall_by_rotation"] == {"0-15": 1.0, "15-30": None, "30-60": None, "60-180": None}
    assert r["pairs_by_rotation"]["0-15"] == 1


def test_known_fraction_of_wrong_matches():
    """200 of 1200 points carry the feature of the point 15 rows below: recall 5/6 at 5 and 10 px, 1 at 20 px."""
    v, u = np.mgrid[0:h, 0:w]
    ids0 = v * w + u
    wrong = (v < 10) & (u < 20)
    ids0 = np.where(wrong, (v + 15) * w + u, ids0)
    feats = torch.stack([one_hot(ids0, h * w), one_hot(v * w + u, h * w)])
    ds = Pairs([pair(np.full((H, W), 2.0), np.full((H, W), 2.0), np.eye(4))], [feats])
    r = evaluate_correspondence(ds.model_fn, ds, num_corr=h * w)
    assert r["num_correspondences"] == 1200
    assert r["recall"]["5px"] == pytest.approx(1000 / 1200)
    assert r["recall"]["10px"] == pytest.approx(1000 / 1200)
    assert r["recall"]["20px"] == 1.0
    i = r["curve"]["px"].index(14.0)  # the wrong matches are 15 px off
    assert r["curve"]["recall"][i] == pytest.approx(1000 / 1200) and r["curve"]["recall"][i + 2] == 1.0


def brute_force_errors(feats, depth_full, K0_full, K1_full, T, num_corr, scale_hw, full_hw):
    """Independent numpy twin: camera classes for geometry, a full distance matrix, full sorts."""
    hh, ww = scale_hw
    cams = [Camera(K, np.eye(4), *full_hw).scaled(hh, ww) for K in (K0_full, K1_full)]
    pts, pix, fs = [], [], []
    for k in range(2):
        d = depth_full[k][1::2, 1::2]  # blocks of 2x2 share one depth: any nearest pick gives this
        vv, uu = np.nonzero(d > 0)
        uv = np.stack([uu, vv], -1).astype(np.float64)
        pts.append(cams[k].unproject(uv, d[vv, uu]))  # c2w = I: camera-frame points
        pix.append(uv)
        fs.append(feats[k][:, vv, uu].T.double().numpy())
    a = fs[0] / np.linalg.norm(fs[0], axis=1, keepdims=True)
    b = fs[1] / np.linalg.norm(fs[1], axis=1, keepdims=True)
    dist = 1 - a @ b.T
    order = np.argsort(dist, axis=1, kind="stable")
    d1 = dist[np.arange(len(a)), order[:, 0]]
    d2 = dist[np.arange(len(a)), order[:, 1]]
    weight = 1 - np.maximum(d1, 1e-9) / np.maximum(d2, 1e-9)
    keep = np.argsort(-weight, kind="stable")[:num_corr]
    cam1_in_0 = Camera(cams[1].K, np.linalg.inv(T), hh, ww)  # camera 1 seen from camera-0 coordinates
    uv01, _ = cam1_in_0.project(pts[0][keep])
    return np.linalg.norm(uv01 - pix[1][order[keep, 0]], axis=1)


def test_matches_brute_force_twin():
    g = torch.Generator().manual_seed(0)
    Hs, Ws = 60, 80
    hh, ww = Hs // 2, Ws // 2
    depth = (torch.rand(2, hh, ww, generator=g) * 2 + 1).numpy()
    depth[0, :3, :] = 0  # invalid rows
    depth_full = depth.repeat(2, 1).repeat(2, 2)
    feats = torch.randn(2, 16, hh, ww, generator=g)
    T = np.eye(4)
    T[:3, :3] = rot([0.2, 1, 0.1], 20)
    T[:3, 3] = [0.3, -0.1, 0.2]
    K1 = K_FULL.copy()
    K1[0, 0] = 110.0
    ds = Pairs([pair(depth_full[0], depth_full[1], T, K1=K1, hw=(Hs, Ws))], [feats])
    r = evaluate_correspondence(ds.model_fn, ds, scale=0.5, num_corr=300, thresholds=(2, 5, 10))
    ref = brute_force_errors(feats, depth_full, K_FULL, K1, T, 300, (hh, ww), (Hs, Ws))
    for t in (2, 5, 10):
        assert r["recall"][f"{t}px"] == pytest.approx(float((ref < t).mean()), abs=1e-12)
    assert r["num_correspondences"] == 300
    assert 0 < r["recall"]["10px"] < 1  # random features: a non-trivial case


def test_fast_matcher_equals_reference():
    g = torch.Generator().manual_seed(1)
    f0, f1 = torch.randn(300, 8, generator=g), torch.randn(400, 8, generator=g)
    for ratio in (True, False):
        a = match_features(f0, f1, num_corr=200, ratio_test=ratio, chunk=64)
        b = match_features_reference(f0, f1, num_corr=200, ratio_test=ratio)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert torch.allclose(a[2].double(), b[2], rtol=1e-4, atol=1e-5)


def test_pair_errors_use_pose():
    """Identity features on identical views but a GT pose claiming a 3-pixel shift: every error is 3 px."""
    d = torch.full((10, 12), 2.0)
    K = torch.tensor([[20.0, 0, 5.5], [0, 20.0, 4.5], [0, 0, 1]])
    T = torch.eye(4)
    T[0, 3] = 3 * 2.0 / 20.0
    v, u = np.mgrid[0:10, 0:12]
    f = one_hot(v * 12 + u, 120)
    err = pair_errors(f, f, d, d, K, K, T, num_corr=120)
    assert torch.allclose(err, torch.full((120,), 3.0, dtype=err.dtype), atol=1e-6, rtol=0)


def test_rotation_angles_and_bins():
    angles = [0, 10, 15, 29.9, 45, 60, 90, 180]
    R = torch.tensor(np.stack([rot([1, 2, 3], a) for a in angles]))
    assert torch.allclose(rotation_angle_deg(R), torch.tensor(angles, dtype=R.dtype), atol=1e-4, rtol=0)
    recalls = [1.0, 0.5, 0.2, 0.4, 0.3, 0.9, 0.1, 0.2]
    bins = ((0, 15), (15, 30), (30, 60), (60, 180))
    means, counts = bin_by_rotation(recalls, angles, bins)
    assert counts == {"0-15": 2, "15-30": 2, "30-60": 1, "60-180": 3}
    assert means["0-15"] == pytest.approx(0.75) and means["15-30"] == pytest.approx(0.3)
    assert means["30-60"] == pytest.approx(0.3) and means["60-180"] == pytest.approx(0.4)
    assert bin_by_rotation([1.0], [5.0], ((10, 20),))[0] == {"10-20": None}


def test_evaluate_bins_pairs_by_pose_rotation():
    """Three pairs rotated about the optical axis by 0, 90 and 180 deg (square grid: exact correspondences)."""
    n = 24
    Kf = np.array([[50.0, 0, (n * 4 - 1) / 2], [0, 50.0, (n * 4 - 1) / 2], [0, 0, 1]])
    v, u = np.mgrid[0:n, 0:n]
    items, feats = [], []
    for deg, (rv, ru) in ((0, (v, u)), (90, (n - 1 - u, v)), (180, (n - 1 - v, n - 1 - u))):
        T = np.eye(4)
        T[:3, :3] = rot([0, 0, 1], deg)
        # pixel (v, u) of view 1 sees the point of view-0 pixel (rv, ru) for this in-plane rotation
        ids1 = np.empty((n, n), int)
        ids1[v, u] = rv * n + ru
        items.append(pair(np.full((4 * n, 4 * n), 2.0), np.full((4 * n, 4 * n), 2.0), T, Kf, Kf, (4 * n, 4 * n)))
        feats.append(torch.stack([one_hot(v * n + u, n * n), one_hot(ids1, n * n)]))
    ds = Pairs(items, feats)
    r = evaluate_correspondence(ds.model_fn, ds, num_corr=n * n)
    assert r["pairs_by_rotation"] == {"0-15": 1, "15-30": 0, "30-60": 0, "60-180": 2}
    assert r["recall"]["5px"] == pytest.approx(1.0)  # the id map matches the pose's geometry
    assert r["recall_by_rotation"]["60-180"] == pytest.approx(1.0)


def test_recall_curve_png(tmp_path):
    curves = {"dinov2": {"px": list(range(41)), "recall": [min(1, p / 30) for p in range(41)]},
              "snd": {"px": list(range(41)), "recall": [min(1, p / 20) for p in range(41)]}}
    p = write_recall_curve_png(curves, tmp_path / "fig" / "recall.png")
    im = np.asarray(Image.open(p).convert("RGB"))
    assert im.shape == (420, 640, 3)
    reds = (im[..., 0] > 180) & (im[..., 1] < 80) & (im[..., 2] < 80)
    assert reds.sum() > 100  # the second curve is drawn


# -- pair datasets --------------------------------------------------------------------------------
LINE = ("scene0707_00_frame-000015.jpg scene0707_00_frame-000585.jpg 0 0 "
        "1165.72 0. 649.095 0. 1165.74 484.765 0. 0. 1. 1165.72 0. 649.095 0. 1165.74 484.765 0. 0. 1. "
        "0.97598 0.05925 0.20966 -0.03968 -0.08203 0.99143 0.10171 0.00746 -0.20184 -0.11647 0.97247 "
        "0.54255 0. 0. 0. 1.")


def test_scannet1500_pair_line_and_reader(tmp_path):
    p = parse_pair_line(LINE)
    assert p["name0"] == "scene0707_00_frame-000015.jpg" and p["rot0"] == 0
    np.testing.assert_allclose(p["K0"], [[1165.72, 0, 649.095], [0, 1165.74, 484.765], [0, 0, 1]])
    np.testing.assert_allclose(p["T_0to1"][0], [0.97598, 0.05925, 0.20966, -0.03968])
    np.testing.assert_allclose(p["T_0to1"][3], [0, 0, 0, 1])
    assert parse_frame_name("scans_test/scene0707_00/sens/frame-000585.color.jpg") == ("scene0707_00", 585)
    with pytest.raises(SndError, match="37 fields"):
        parse_pair_line(LINE.rsplit(" ", 1)[0])

    root = tmp_path / "scannet1500"
    root.mkdir()
    (root / "scannet_test_pairs_with_gt.txt").write_text(LINE + "\n")
    with pytest.raises(SndError, match="scannet_test_1500"):
        D.get_dataset("scannet1500", tmp_path, "val", "correspondence", (24, 32))
    for n, dep in ((15, 1234), (585, 2000)):
        sd = root / "scannet_test_1500" / "scene0707_00"
        (sd / "color").mkdir(parents=True, exist_ok=True)
        (sd / "depth").mkdir(exist_ok=True)
        Image.fromarray(np.full((48, 64, 3), 90, np.uint8)).save(sd / "color" / f"{n}.jpg")
        Image.fromarray(np.full((48, 64), dep, np.uint16)).save(sd / "depth" / f"{n}.png")
    ds = D.get_dataset("scannet1500", tmp_path, "val", "correspondence", (24, 32))
    s = ds[0]
    assert s["image0"].shape == (3, 24, 32) and s["depth1"].shape == (24, 32)
    assert torch.allclose(s["depth0"], torch.full((24, 32), 1.234))
    sx, sy = 32 / 1296, 24 / 968
    exp = [[1165.72 * sx, 0, (649.095 + 0.5) * sx - 0.5], [0, 1165.74 * sy, (484.765 + 0.5) * sy - 0.5], [0, 0, 1]]
    np.testing.assert_allclose(s["K0"].numpy(), exp, rtol=1e-6)
    np.testing.assert_allclose(s["T_0to1"].numpy(), p["T_0to1"], rtol=1e-6)
    assert s["meta"]["id"] == "scene0707_00/15-scene0707_00/585"
    with pytest.raises(SndError, match="evaluation-only"):
        D.get_dataset("scannet1500", tmp_path, "train", "correspondence", (24, 32))
    (root / "scannet_test_1500" / "scene0707_00" / "depth" / "585.png").unlink()
    with pytest.raises(SndError, match="585.png"):
        ds[0]


def test_synth_pairs_ground_truth_reprojects(synth_root):
    ds = D.get_dataset("synth", synth_root, "val", "correspondence", (56, 84), gaps=(2, 4), stride=4)
    assert len(ds) == 4 + 3  # 16 frames, stride 4: gap 2 starts 0,4,8,12; gap 4 starts 0,4,8 (j < 16)
    agree = []
    for i in range(len(ds)):
        s = ds[i]
        c0 = Camera(s["K0"].double().numpy(), np.eye(4), 56, 84)
        d0 = s["depth0"].numpy()
        vv, uu = np.nonzero(d0 > 0)
        X0 = c0.unproject(np.stack([uu, vv], -1).astype(float), d0[vv, uu])  # camera-0 frame
        T = s["T_0to1"].double().numpy()
        X1 = X0 @ T[:3, :3].T + T[:3, 3]
        c1 = Camera(s["K1"].double().numpy(), np.eye(4), 56, 84)
        uv1, z1 = c1.project(X1)
        x, y = uv1[:, 0], uv1[:, 1]
        inside = (z1 > 0) & (x >= 0) & (x < 83) & (y >= 0) & (y < 55)
        x, y, z = x[inside], y[inside], z1[inside]
        x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
        ax, ay = x - x0, y - y0
        d1 = s["depth1"].numpy().astype(np.float64)
        q = [d1[y0, x0], d1[y0, x0 + 1], d1[y0 + 1, x0], d1[y0 + 1, x0 + 1]]
        bil = q[0] * (1 - ax) * (1 - ay) + q[1] * ax * (1 - ay) + q[2] * (1 - ax) * ay + q[3] * ax * ay
        assert inside.mean() > 0.5
        rel = np.abs(bil - z) / z  # depth1 interpolated where the view-0 points land
        assert np.median(rel) < 1e-3
        agree.append((rel < 0.01).mean())
    assert min(agree) > 0.75  # the rest: occlusions (and bilinear mixing across depth edges)


def test_evaluate_on_synth_pairs_runs(synth_root):
    ds = D.get_dataset("synth", synth_root, "val", "correspondence", (56, 84), gaps=(2,), stride=8)

    def model_fn(images):  # colour + position of 14x14 patches: a crude but real dense feature
        f = torch.nn.functional.avg_pool2d(images, 14)
        yy, xx = torch.meshgrid(torch.linspace(0, 1, f.shape[2]), torch.linspace(0, 1, f.shape[3]), indexing="ij")
        pos = torch.stack([yy, xx])[None].expand(f.shape[0], -1, -1, -1)
        return torch.cat([f, pos], 1)

    r = evaluate_correspondence(model_fn, ds, num_corr=100)
    assert r["num_pairs"] == len(ds) == 2 and r["num_correspondences"] == 200
    rec = [r["recall"][k] for k in ("5px", "10px", "20px")]
    assert all(0 <= x <= 1 for x in rec) and rec == sorted(rec)
    assert sum(r["pairs_by_rotation"].values()) == 2
