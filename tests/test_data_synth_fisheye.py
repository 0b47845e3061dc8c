"""`snd data synth --fisheye`: raw ScanNet++ fisheye frames rendered along their true rays, checked against
the pinhole frame rendered directly with the toolkit's camera (independent of the reader's undistortion)."""
import json

import numpy as np
import pytest

from snd.data.camera import Camera, intrinsics
from snd.data.fisheye import fisheye_camera_dirs, fisheye_undistort_map, remap_bilinear, toolkit_new_K
from snd.data.raycast import MeshRaycaster
from snd.data.scannetpp import ScanNetppScene
from snd.data.synth import generate_dataset
from snd.data.synth_scene import build_scene, fisheye_intrinsics
from snd.pipeline.config import SynthConfig

H, W = 192, 288  # large enough that bilinear error stays on texture edges


def test_fisheye_rays_are_the_equidistant_model_by_hand():
    # k = 0: theta = r_d exactly, so the pixel 30 px right of the centre at f = 60 looks at atan-angle 0.5 rad
    K = intrinsics(60.0, 60.0, 50.0, 40.0)
    d = fisheye_camera_dirs(K, np.zeros(4), 81, 101)
    assert np.allclose(d[40, 80], [np.tan(0.5), 0.0, 1.0], atol=1e-12)
    assert np.allclose(d[40, 50], [0.0, 0.0, 1.0])
    # with distortion: theta_d = theta (1 + k1 theta^2 + ...) holds for the returned ray's theta
    k = np.array([-0.03, -0.005, 0.002, -0.0005])
    d = fisheye_camera_dirs(K, k, 81, 101)
    th = np.arctan(np.hypot(d[0, 0, 0], d[0, 0, 1]))
    thd = np.hypot(50.0, 40.0) / 60.0
    assert th * (1 - 0.03 * th**2 - 0.005 * th**4 + 0.002 * th**6 - 0.0005 * th**8) == pytest.approx(thd, abs=1e-12)
    with pytest.raises(ValueError, match="not invertible"):
        fisheye_camera_dirs(intrinsics(10.0, 10.0, 50.0, 40.0), np.array([-0.3, 0, 0, 0]), 81, 101)


@pytest.fixture(scope="module")
def fisheye_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fisheye")
    names = generate_dataset(SynthConfig(out=root, scenes=1, frames=2, height=H, width=W, fisheye=True, workers=1))
    return root / "data" / names[0]


def test_fisheye_layout_is_the_raw_release(fisheye_root):
    dslr = fisheye_root / "dslr"
    assert sorted(p.name for p in (dslr / "resized_images").iterdir()) == ["DSC00001.JPG", "DSC00002.JPG"]
    assert not (dslr / "resized_undistorted_images").exists() and not (dslr / "nerfstudio" / "transforms_undistorted.json").exists()
    tf = json.loads((dslr / "nerfstudio" / "transforms.json").read_text())
    K, k = fisheye_intrinsics(H, W)
    assert tf["camera_model"] == "OPENCV_FISHEYE" and (tf["w"], tf["h"]) == (W, H)
    assert [tf[f"k{j}"] for j in range(1, 5)] == k.tolist() and tf["fl_x"] == K[0, 0]
    assert (dslr / "colmap" / "cameras.txt").read_text().splitlines()[-1].split()[1] == "OPENCV_FISHEYE"


def test_reader_undistortion_equals_the_pinhole_render(fisheye_root):
    sc = build_scene(0, 0, frames=2, height=H, width=W, objects=6)
    rc = MeshRaycaster(sc.vertices, sc.faces)
    reader = ScanNetppScene(fisheye_root)
    Kf, k = fisheye_intrinsics(H, W)
    K_new = toolkit_new_K(Kf, k, H, W)
    assert reader.fisheye and np.allclose(reader.camera(0).K, K_new)
    c2w = sc.cameras[0].c2w
    pin = sc.render(rc, Camera(K=K_new, c2w=c2w, height=H, width=W)).astype(float)
    fish = sc.render_fisheye(rc, c2w, H, W)
    err = lambda a: np.abs(a.astype(float) - pin).max(-1)  # noqa: E731
    # in memory: only bilinear interpolation error, on texture edges (median 0, mean ~5 levels)
    e_mem = err(remap_bilinear(fish, *fisheye_undistort_map(Kf, k, K_new, H, W)))
    assert np.median(e_mem) <= 1 and e_mem.mean() < 8
    # through the files: JPEG (quality 92) + decode + the reader's undistortion (median ~5, mean ~11)
    e_read = err(reader.image(0))
    assert np.median(e_read) <= 8 and e_read.mean() < 14
    # control: undistorting with the fisheye K kept (a ~1.3x wider view) is far off, so the bounds can fail
    e_wrong = err(remap_bilinear(fish, *fisheye_undistort_map(Kf, k, Kf, H, W)))
    assert e_wrong.mean() > 30

    # geometry: the fisheye rays' depth and instances, undistorted, are the reader's ray-cast maps
    d = fisheye_camera_dirs(Kf, k, H, W) @ c2w[:3, :3].T
    hits = rc.cast_rays(np.broadcast_to(c2w[:3, 3], d.shape).copy(), d)
    mx, my = fisheye_undistort_map(Kf, k, K_new, H, W)
    depth = remap_bilinear(hits.depth.astype(np.float64), mx, my)
    rel = np.abs(depth - reader.depth(0)) / reader.depth(0)
    assert np.median(rel) < 1e-4 and np.percentile(rel, 90) < 1e-3
    inst_fish = np.where(hits.face >= 0, sc.face_part[hits.face] + 1, 0)  # objectId = part index + 1
    inst = inst_fish[np.clip(np.round(my).astype(int), 0, H - 1), np.clip(np.round(mx).astype(int), 0, W - 1)]
    assert (inst == reader.instance_mask(0)).mean() > 0.97


def test_workers_write_the_same_bytes(tmp_path):
    cfg = dict(scenes=2, frames=2, height=24, width=36, objects=2, fisheye=True)
    generate_dataset(SynthConfig(out=tmp_path / "a", workers=1, **cfg))
    generate_dataset(SynthConfig(out=tmp_path / "b", workers=2, **cfg))
    tree = lambda r: {str(p.relative_to(r)): p.read_bytes() for p in sorted(r.rglob("*")) if p.is_file()}  # noqa: E731
    assert tree(tmp_path / "a") == tree(tmp_path / "b")
