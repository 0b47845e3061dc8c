"""Fisheye undistortion (the ScanNet++ toolkit's OPENCV_FISHEYE model): the maps against an analytic pattern,
the toolkit's new pinhole K by hand, and the raw reader recovering a scene rewritten as fisheye frames.

Split from test_data_readers.py (one file per reader concern)."""
import json
import shutil

import numpy as np
from PIL import Image

from snd.data import open_dataset
from snd.data.fisheye import (fisheye_distort_normalized, fisheye_undistort_map, fisheye_undistort_normalized,
                               remap_bilinear, toolkit_new_K)
from tests._scenes import copied_scene


def _invert_theta(thd, k, iters=30):
    th = thd.copy()
    for _ in range(iters):  # Newton on theta (1 + k1 th^2 + ...) = thd
        t2 = th * th
        f = th * (1 + t2 * (k[0] + t2 * (k[1] + t2 * (k[2] + t2 * k[3])))) - thd
        df = 1 + t2 * (3 * k[0] + t2 * (5 * k[1] + t2 * (7 * k[2] + t2 * 9 * k[3])))
        th = th - f / df
    return th


def test_fisheye_undistortion_matches_analytic_pattern():
    """Fisheye image of a smooth pattern f(x, y) on the pinhole plane -> undistort -> f at pinhole pixels."""
    k = np.array([0.05, -0.01, 0.003, -0.0005])
    H, W = 90, 120
    K = np.array([[70.0, 0, 59.5], [0, 70.0, 44.5], [0, 0, 1]])
    pattern = lambda x, y: 0.5 + 0.25 * np.sin(4 * x) + 0.25 * np.cos(5 * y)  # noqa: E731
    # render the fisheye image: per fisheye pixel, invert the distortion to pinhole coordinates
    v, u = np.meshgrid(np.arange(H, dtype=float), np.arange(W, dtype=float), indexing="ij")
    xd, yd = (u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1]
    rd = np.hypot(xd, yd)
    th = _invert_theta(rd, k)
    s = np.where(rd > 1e-12, np.tan(th) / np.maximum(rd, 1e-12), 1.0)
    fish = pattern(xd * s, yd * s)
    # check the forward model against the inverse we just used
    back = fisheye_distort_normalized(np.stack([xd * s, yd * s], -1), k)
    np.testing.assert_allclose(back, np.stack([xd, yd], -1), atol=1e-9)
    mx, my = fisheye_undistort_map(K, k, K, H, W)
    und = remap_bilinear(fish, mx, my)
    x, y = (u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1]
    err = np.abs(und - pattern(x, y))
    assert err[10:-10, 10:-10].max() < 5e-3


def test_reader_undistorts_fisheye_scenes(synth_root, tmp_path):
    """Turn a pinhole scene into a fisheye one (resized_images + transforms.json); the reader must recover it."""
    root, sd = copied_scene(synth_root, tmp_path)
    dslr = sd / "dslr"
    tf = json.loads((dslr / "nerfstudio" / "transforms_undistorted.json").read_text())
    k = [0.03, -0.005, 0.0, 0.0]
    K = np.array([[tf["fl_x"], 0, tf["cx"]], [0, tf["fl_y"], tf["cy"]], [0, 0, 1]])
    H, W = tf["h"], tf["w"]
    v, u = np.meshgrid(np.arange(H, dtype=float), np.arange(W, dtype=float), indexing="ij")
    xd, yd = (u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1]
    rd = np.hypot(xd, yd)
    s = np.where(rd > 1e-12, np.tan(_invert_theta(rd, k)) / np.maximum(rd, 1e-12), 1.0)
    src = dslr / "resized_undistorted_images"
    (dslr / "resized_images").mkdir()
    for p in sorted(src.iterdir()):
        pin = np.asarray(Image.open(p).convert("RGB"))
        fish = remap_bilinear(pin, K[0, 0] * xd * s + K[0, 2], K[1, 1] * yd * s + K[1, 2])
        Image.fromarray(fish).save(dslr / "resized_images" / p.name, quality=95)
    tf.update(camera_model="OPENCV_FISHEYE", k1=k[0], k2=k[1], k3=k[2], k4=k[3])
    (dslr / "nerfstudio" / "transforms.json").write_text(json.dumps(tf))
    pinhole = open_dataset(synth_root, cache_dir=tmp_path / "c").scene(sd.name)
    shutil.rmtree(src)
    (dslr / "nerfstudio" / "transforms_undistorted.json").unlink()
    sc = open_dataset(root, cache_dir=tmp_path / "c").scene(sd.name)
    assert sc.fisheye and sc.image_dir.name == "resized_images"
    # the reader's pinhole camera is the toolkit's (balance 0, centred), not the fisheye K
    Kn = toolkit_new_K(K, np.array(k), H, W)
    np.testing.assert_allclose(sc.camera(4).K, sc._base.scaled(sc.height, sc.width).K)
    np.testing.assert_allclose(sc._base.K, Kn)
    assert Kn[0, 2] == W / 2 and Kn[1, 2] == H / 2 and abs(Kn[0, 0] - K[0, 0]) > 1  # centred; another focal length
    # its image = the original pinhole image seen through the new K
    pin = pinhole.image(4).astype(float)
    x, y = (u - Kn[0, 2]) / Kn[0, 0], (v - Kn[1, 2]) / Kn[1, 1]
    expect = remap_bilinear(pin, K[0, 0] * x + K[0, 2], K[1, 1] * y + K[1, 2])
    a = sc.image(4).astype(float)
    assert np.median(np.abs(a - expect)[8:-8, 8:-8]) < 6  # three bilinear resamplings + JPEG
    assert np.median(np.abs(a - pin)[8:-8, 8:-8]) > np.median(np.abs(a - expect)[8:-8, 8:-8])


def test_toolkit_new_K_hand_computed():
    """A centred K, k1 only: the edge midpoints (80, 30), (0, 30) reach x = +-tan(theta(0.4)), (40, 0), (40, 60)
    reach y = +-tan(theta(0.3)), theta the root of theta (1 + k1 theta^2) = theta_d (equidistant when k1 = 0;
    a cubic solved independently with numpy.roots); centre of mass 0, so f = max(40 / tan, 30 / tan)."""
    K = np.array([[100.0, 0, 40.0], [0, 100.0, 30.0], [0, 0, 1]])
    for k1 in (0.0, 0.08):
        def theta(thd):
            if k1 == 0:
                return thd
            r = np.roots([k1, 0.0, 1.0, -thd])
            return float(min(x.real for x in r if abs(x.imag) < 1e-12 and x.real > 0))
        f = max(40.0 / np.tan(theta(0.4)), 30.0 / np.tan(theta(0.3)))
        Kn = toolkit_new_K(K, np.array([k1, 0, 0, 0]), 60, 80)
        np.testing.assert_allclose(Kn, [[f, 0, 40.0], [0, f, 30.0], [0, 0, 1]], rtol=1e-9)
    assert 96.9 < toolkit_new_K(K, np.zeros(4), 60, 80)[0, 0] < 97.0  # 30 / tan(0.3): zoomed in from 100
    # undistort inverts distort
    xy = np.array([[0.3, -0.2], [0.01, 0.4]])
    np.testing.assert_allclose(fisheye_undistort_normalized(fisheye_distort_normalized(xy, [k1, 0.01, 0, 0]), [k1, 0.01, 0, 0]),
                               xy, atol=1e-10)
