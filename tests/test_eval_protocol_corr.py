"""The paper protocol's correspondence rules (Probe3D), each against a hand-computed case or an independent
formula: the scaled depth grid and intrinsics, pair errors under a known pose, centre padding, and
ScanNet-1500's per-scene intrinsics.

Split from test_eval_protocol.py (one file per protocol rule family).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


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
