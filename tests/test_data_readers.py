"""Dataset readers: raw ScanNet++ v2 (synth output and hand-written scenes), prepared layout round trip,
camera conventions, fisheye undistortion, and SndErrors that name the broken file."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from snd.data import list_layouts, open_dataset
from snd.data.camera import opencv_to_opengl
from snd.data.fisheye import (fisheye_distort_normalized, fisheye_undistort_map, fisheye_undistort_normalized,
                               remap_bilinear, toolkit_new_K)
from snd.data.formats import SYNTH_CLASSES
from snd.data.ply import write_ply
from snd.data.prepared import export_prepared
from snd.data.scene import Scene
from snd.data.synth_scene import build_scene
from snd.errors import SndError


def _copy_root(synth_root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "root"
    shutil.copytree(synth_root, dst, ignore=shutil.ignore_patterns(".snd_cache"))
    return dst


def test_reader_parses_procedural_scenes(synth_root, tmp_path):
    ds = open_dataset(synth_root, cache_dir=tmp_path / "cache")
    assert ds.layout == "scannetpp" and set(list_layouts()) >= {"scannetpp", "prepared"}
    train, val = ds.scene_names("train"), ds.scene_names("val")
    assert len(train) >= 1 and len(val) >= 1 and not set(train) & set(val)
    assert ds.scene_names("distill") == train + val
    sc = ds.scene(train[0])
    assert isinstance(sc, Scene)
    assert len(sc) == 16 and sc.frame_ids[0] == "DSC00001.JPG" and sc.frame_ids == sorted(sc.frame_ids)
    assert sc.pose_source == "colmap"
    img, inst, dep, sem = sc.image(3), sc.instance_mask(3), sc.depth(3), sc.semantic_mask(3)
    assert img.shape == (112, 168, 3) and img.dtype == np.uint8 and img.std() > 10
    assert inst.shape == dep.shape == sem.shape == (112, 168)
    assert inst.dtype == np.int32 and sem.dtype == np.int32 and dep.dtype == np.float32
    assert (dep > 0.3).all() and dep.max() < 10  # closed room: every ray hits something
    assert len(np.unique(inst)) >= 4  # walls, floor and objects
    assert sc.classes == list(SYNTH_CLASSES)
    # the cache returns exactly what was cast
    assert any((tmp_path / "cache").rglob("*.npz"))
    np.testing.assert_array_equal(sc.instance_mask(3), inst)
    np.testing.assert_array_equal(ds.scene(train[0]).depth(3), dep)


def test_instance_and_depth_match_the_analytic_spheres(synth_root, tmp_path):
    """Reader masks (mesh + segments + annotations + ray casting) vs the generator's analytic spheres."""
    ds = open_dataset(synth_root, cache_dir=tmp_path / "cache")
    names = ds.scene_names("all")
    checked = 0
    for k in range(2):
        truth = build_scene(0, k, frames=16, height=112, width=168, objects=5)
        sc = ds.scene(truth.name)
        assert truth.name in names
        spheres = [(oid, p.shape) for oid, p in zip(truth.object_ids, truth.parts) if p.shape.get("kind") == "sphere"]
        for i in (0, 7, 15):
            cam, inst, dep = sc.camera(i), sc.instance_mask(i), sc.depth(i)
            np.testing.assert_allclose(cam.c2w, truth.cameras[i].c2w, atol=1e-6)
            o, d = cam.rays()
            for oid, shp in spheres:
                c, r = np.array(shp["centre"]), shp["radius"]
                du = d / np.linalg.norm(d, axis=-1, keepdims=True)
                w = c - o
                along = (w * du).sum(-1)
                dist = np.linalg.norm(w - along[..., None] * du, axis=-1)
                # z-depth of the sphere's front surface (d has unit camera z, so divide the distance by |d|)
                t_front = (along - np.sqrt(np.clip(r * r - dist**2, 0, None))) / np.linalg.norm(d, axis=-1)
                assert (dist[inst == oid] <= r * 1.001).all()  # labelled pixels lie inside the disk
                visible = (dist < 0.98 * r) & (np.abs(dep - t_front) < 0.02 * t_front)
                assert (inst[visible] == oid).all()
                sem_id = SYNTH_CLASSES.index("sphere") + 1
                assert (sc.semantic_mask(i)[visible] == sem_id).all()
                checked += int(visible.sum())
    assert checked > 100


def test_gl_to_cv_on_hand_written_transforms(tmp_path):
    """A camera at (0, 0, 1) looking along +x (z up), written by hand in ScanNet++'s transforms convention.

    OpenGL c2w in the mesh world has columns x=(0,-1,0), y=(0,0,1), z=(-1,0,0); the toolkit then swaps
    world x/y and negates world z, giving the literal matrix below. The wall x = 3 is split in two
    instances: y > 0 (id 1) must appear on the image's left, y < 0 (id 2) on its right.
    """
    sd = tmp_path / "data" / "scene0"
    (sd / "dslr" / "resized_undistorted_images").mkdir(parents=True)
    (sd / "dslr" / "nerfstudio").mkdir()
    (sd / "scans").mkdir()
    Image.new("RGB", (60, 40), (128, 0, 0)).save(sd / "dslr" / "resized_undistorted_images" / "DSC00001.JPG")
    tm = [[-1, 0, 0, 0], [0, 0, -1, 0], [0, -1, 0, -1], [0, 0, 0, 1]]
    tf = {"fl_x": 30.0, "fl_y": 30.0, "cx": 29.5, "cy": 19.5, "w": 60, "h": 40, "camera_model": "PINHOLE", "frames": [{"file_path": "DSC00001.JPG", "transform_matrix": tm, "is_bad": False}]}
    (sd / "dslr" / "nerfstudio" / "transforms_undistorted.json").write_text(json.dumps(tf))
    verts = np.array([[3, 0, -10], [3, 10, -10], [3, 10, 10], [3, 0, 10], [3, -10, -10], [3, 0, -10], [3, 0, 10], [3, -10, 10]], float)
    faces = np.array([[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]])
    write_ply(sd / "scans" / "mesh_aligned_0.05.ply", verts, faces, np.full((8, 3), 200, np.uint8))
    (sd / "scans" / "segments.json").write_text(json.dumps({"segIndices": [0, 0, 0, 0, 1, 1, 1, 1]}))
    anno = {"segGroups": [{"id": 1, "objectId": 1, "label": "wall", "segments": [0]}, {"id": 2, "objectId": 2, "label": "door", "segments": [1]}]}
    (sd / "scans" / "segments_anno.json").write_text(json.dumps(anno))

    sc = open_dataset(tmp_path, cache_dir=tmp_path / "c").scene("scene0")
    assert sc.pose_source == "transforms"
    expected_cv = np.array([[0, 0, 1, 0], [-1, 0, 0, 0], [0, -1, 0, 1], [0, 0, 0, 1]], float)
    np.testing.assert_allclose(sc.camera(0).c2w, expected_cv, atol=1e-12)
    dep, inst, sem = sc.depth(0), sc.instance_mask(0), sc.semantic_mask(0)
    np.testing.assert_allclose(dep, 3.0, rtol=1e-6)  # a fronto-parallel wall: constant z-depth
    assert (inst[:, :29] == 1).all() and (inst[:, 31:] == 2).all()
    assert sc.classes == ["door", "wall"]  # no metadata/semantic_classes.txt: sorted scene labels
    assert (sem[:, :29] == 2).all() and (sem[:, 31:] == 1).all()
    # world up (+z) is up in the image: a point above the camera's height projects to a smaller row
    uv, z = sc.camera(0).project(np.array([[3.0, 0.0, 2.0]]))
    assert z[0] == pytest.approx(3.0) and uv[0, 1] < 19.5 and uv[0, 0] == pytest.approx(29.5)


def test_colmap_and_transforms_poses_agree(synth_root, tmp_path):
    root = _copy_root(synth_root, tmp_path)
    name = open_dataset(root).scene_names("all")[0]
    a = open_dataset(root, cache_dir=tmp_path / "c").scene(name)
    (root / "data" / name / "dslr" / "colmap" / "images.txt").unlink()
    b = open_dataset(root, cache_dir=tmp_path / "c").scene(name)
    assert (a.pose_source, b.pose_source) == ("colmap", "transforms")
    for i in range(len(a)):
        np.testing.assert_allclose(a.camera(i).c2w, b.camera(i).c2w, atol=1e-8)


def test_resized_scene_scales_K_and_casts_at_the_requested_size(synth_root, tmp_path):
    full = open_dataset(synth_root, cache_dir=tmp_path / "c")
    half = open_dataset(synth_root, height=56, width=84, cache_dir=tmp_path / "c")
    name = full.scene_names("all")[0]
    a, b = full.scene(name), half.scene(name)
    np.testing.assert_allclose(b.camera(2).K, a.camera(2).scaled(56, 84).K)
    assert b.image(2).shape == (56, 84, 3) and b.instance_mask(2).shape == (56, 84) and b.depth(2).shape == (56, 84)
    # a half-size pixel centre (v, u) sits at full-size position (2v + 0.5, 2u + 0.5): depth agrees on smooth areas
    small, big = b.depth(2), a.depth(2)
    approx = 0.25 * (big[0::2, 0::2] + big[1::2, 0::2] + big[0::2, 1::2] + big[1::2, 1::2])
    assert np.median(np.abs(small - approx) / approx) < 1e-2


def test_prepared_round_trip(synth_root, tmp_path):
    out = tmp_path / "prepared"
    raw = open_dataset(synth_root, cache_dir=tmp_path / "c")
    names = export_prepared(synth_root, out)
    assert names == raw.scene_names("distill")
    prep = open_dataset(out)
    assert prep.layout == "prepared"
    assert prep.scene_names("train") == raw.scene_names("train") and prep.scene_names("val") == raw.scene_names("val")
    for name in names:
        a, b = raw.scene(name), prep.scene(name)
        assert b.frame_ids == a.frame_ids and b.depth(0) is None and b.semantic_mask(0) is None
        for i in (0, 9):
            np.testing.assert_array_equal(b.image(i), a.image(i))
            np.testing.assert_array_equal(b.instance_mask(i), a.instance_mask(i))
            np.testing.assert_allclose(b.camera(i).K, a.camera(i).K, atol=1e-9)
            np.testing.assert_allclose(b.camera(i).c2w, a.camera(i).c2w, atol=1e-9)
    # SnD's naming: instance_segmentation/<image file name>.png, 16-bit
    png = out / "scenes" / names[0] / "instance_segmentation" / "DSC00001.JPG.png"
    assert png.is_file() and Image.open(png).mode.startswith("I")
    # resized prepared scene: nearest-resized masks, scaled K
    small = open_dataset(out, height=56, width=84).scene(names[0])
    assert small.instance_mask(0).shape == (56, 84)
    # nearest resize by 1/2 samples source pixel centres (2i + 0.5) + 0.5 -> index 2i + 1
    np.testing.assert_array_equal(small.instance_mask(0), prep.scene(names[0]).instance_mask(0)[1::2, 1::2])
    np.testing.assert_allclose(small.camera(0).K, prep.scene(names[0]).camera(0).scaled(56, 84).K)


def test_prepared_transforms_are_opengl(tmp_path):
    sd = tmp_path / "scenes" / "s0"
    (sd / "images").mkdir(parents=True)
    (sd / "instance_segmentation").mkdir()
    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "nvs_sem_train.txt").write_text("s0\n")
    (tmp_path / "metadata" / "nvs_sem_val.txt").write_text("")
    Image.new("RGB", (8, 6)).save(sd / "images" / "DSC00002.JPG")
    Image.fromarray(np.full((6, 8), 300, np.uint16)).save(sd / "instance_segmentation" / "DSC00002.png")
    gl = np.array([[1, 0, 0, 1], [0, 1, 0, 2], [0, 0, 1, 3], [0, 0, 0, 1]], float)  # GL camera looking down -z
    tf = {"fl_x": 5, "fl_y": 5, "cx": 3.5, "cy": 2.5, "frames": [{"file_path": "DSC00002.JPG", "transform_matrix": gl.tolist(), "is_bad": True}]}
    (sd / "transforms_train.json").write_text(json.dumps(tf))
    sc = open_dataset(tmp_path).scene("s0")
    cam = sc.camera(0)
    np.testing.assert_allclose(cam.c2w[:3, 2], [0, 0, -1])  # OpenCV forward = GL -z
    np.testing.assert_allclose(cam.c2w[:3, 1], [0, -1, 0])  # OpenCV down = GL -y
    np.testing.assert_allclose(opencv_to_opengl(cam.c2w), gl)
    assert (sc.height, sc.width) == (6, 8) and sc.is_bad == [True]
    assert (sc.instance_mask(0) == 300).all()  # the <stem>.png name is accepted too


# -- errors naming the file ------------------------------------------------------------------------
def _first_scene(root: Path) -> Path:
    return sorted(p for p in (root / "data").iterdir() if p.is_dir() and not p.name.startswith("."))[0]


def test_missing_transforms_names_the_file(synth_root, tmp_path):
    root = _copy_root(synth_root, tmp_path)
    sd = _first_scene(root)
    (sd / "dslr" / "nerfstudio" / "transforms_undistorted.json").unlink()
    with pytest.raises(SndError, match="transforms_undistorted.json"):
        open_dataset(root).scene(sd.name)


def test_malformed_transforms_names_the_file(synth_root, tmp_path):
    root = _copy_root(synth_root, tmp_path)
    sd = _first_scene(root)
    (sd / "dslr" / "nerfstudio" / "transforms_undistorted.json").write_text("{not json")
    with pytest.raises(SndError, match="malformed transforms file.*transforms_undistorted.json"):
        open_dataset(root).scene(sd.name)


def test_truncated_jpeg_names_the_file(synth_root, tmp_path):
    root = _copy_root(synth_root, tmp_path)
    sd = _first_scene(root)
    jpg = sd / "dslr" / "resized_undistorted_images" / "DSC00002.JPG"
    jpg.write_bytes(jpg.read_bytes()[:200])
    sc = open_dataset(root, cache_dir=tmp_path / "c").scene(sd.name)
    with pytest.raises(SndError, match="DSC00002.JPG"):
        sc.image(1)


def test_ply_without_faces_names_the_file(synth_root, tmp_path):
    root = _copy_root(synth_root, tmp_path)
    sd = _first_scene(root)
    ply = sd / "scans" / "mesh_aligned_0.05.ply"
    n = len(json.loads((sd / "scans" / "segments.json").read_text())["segIndices"])
    header = f"ply\nformat ascii 1.0\nelement vertex {n}\nproperty float x\nproperty float y\nproperty float z\nend_header\n"
    ply.write_text(header + "0 0 0\n" * n)
    sc = open_dataset(root, cache_dir=tmp_path / "c").scene(sd.name)
    with pytest.raises(SndError, match="no faces.*mesh_aligned_0.05.ply"):
        sc.depth(0)


def test_segments_length_mismatch_names_the_file(synth_root, tmp_path):
    root = _copy_root(synth_root, tmp_path)
    sd = _first_scene(root)
    seg = json.loads((sd / "scans" / "segments.json").read_text())
    seg["segIndices"] = seg["segIndices"][:-3]
    (sd / "scans" / "segments.json").write_text(json.dumps(seg))
    sc = open_dataset(root, cache_dir=tmp_path / "c").scene(sd.name)
    with pytest.raises(SndError, match="segments length mismatch.*segments.json"):
        sc.instance_mask(0)


def test_unknown_layout_and_missing_split(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SndError, match="unknown dataset layout"):
        open_dataset(tmp_path / "empty")
    with pytest.raises(SndError, match="unknown layout"):
        open_dataset(tmp_path / "empty", layout="scannet")
    (tmp_path / "raw" / "data" / "x" / "dslr").mkdir(parents=True)
    with pytest.raises(SndError, match="nvs_sem_train.txt"):
        open_dataset(tmp_path / "raw").scene_names("train")


def test_missing_instance_png_names_the_file(synth_root, tmp_path):
    out = tmp_path / "prep"
    names = export_prepared(synth_root, out, scenes=[open_dataset(synth_root).scene_names("all")[0]])
    png = out / "scenes" / names[0] / "instance_segmentation" / "DSC00003.JPG.png"
    png.unlink()
    with pytest.raises(SndError, match="DSC00003.JPG.png"):
        open_dataset(out).scene(names[0]).instance_mask(2)


# -- fisheye ---------------------------------------------------------------------------------------
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
    root = _copy_root(synth_root, tmp_path)
    sd = _first_scene(root)
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


def test_toolkit_undistorted_images_folder_is_accepted(synth_root, tmp_path):
    """The toolkit's dslr/undistort.py writes dslr/undistorted_images/ (+ transforms_undistorted.json)."""
    root = _copy_root(synth_root, tmp_path)
    sd = _first_scene(root)
    (sd / "dslr" / "resized_undistorted_images").rename(sd / "dslr" / "undistorted_images")
    sc = open_dataset(root, cache_dir=tmp_path / "c").scene(sd.name)
    assert sc.image_dir.name == "undistorted_images" and not sc.fisheye
    assert sc.image(0).shape[:2] == (sc.height, sc.width)
    shutil.rmtree(sd / "dslr" / "undistorted_images")
    with pytest.raises(SndError, match="undistorted_images"):
        open_dataset(root, cache_dir=tmp_path / "c2").scene(sd.name)


def test_prepared_scenes_without_instance_masks_fail_at_start(synth_root, tmp_path):
    """FiT3D's prepared folders lack instance_segmentation/: snd precompute fails before any work, naming them."""
    from snd.pipeline.config import PrecomputeConfig
    from snd.stages.precompute import run

    out = tmp_path / "prep"
    names = export_prepared(synth_root, out)
    shutil.rmtree(out / "scenes" / names[0] / "instance_segmentation")
    ds = open_dataset(out)
    with pytest.raises(SndError, match=f"1 of {len(names)} prepared scenes have no instance_segmentation/ folder: {names[0]}"):
        ds.check_scenes(names)
    with pytest.raises(SndError, match="instance_segmentation"):
        run(PrecomputeConfig(data=out, out=tmp_path / "cache", height=28, width=42, split="all", device="cpu"),
            progress=False)
    assert not (tmp_path / "cache").exists()  # nothing half-written
    ds.check_scenes(names[1:])  # the others are fine


def test_split_lists_v1_vs_v2_are_reported(synth_root, tmp_path):
    root = _copy_root(synth_root, tmp_path)
    ds = open_dataset(root)
    names = ds.scene_names("distill")
    line = ds.describe_selection("distill", names)
    assert f"{len(names)} scenes selected" in line and "v2 lists" not in line
    # a v2-like list: more than v1's 230 training scenes (the absent ones are skipped with a warning)
    extra = "".join(f"scene{i:04d}\n" for i in range(240))
    (root / "splits" / "nvs_sem_train.txt").write_text((root / "splits" / "nvs_sem_train.txt").read_text() + extra)
    line = open_dataset(root).describe_selection("distill", names)
    assert "look like the v2 lists" in line and "not the paper's 280" in line
