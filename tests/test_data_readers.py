"""The raw ScanNet++ v2 reader (synth output and hand-written scenes): scenes, masks and depth against the
generator's analytic truth, camera conventions, resizing, the toolkit's folders and split lists, and
SndErrors that name the broken file. The prepared layout and fisheye undistortion have their own files
(test_data_prepared.py, test_data_fisheye.py)."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from snd.data import list_layouts, open_dataset
from snd.data.formats import SYNTH_CLASSES
from snd.data.ply import write_ply
from snd.data.scene import Scene
from snd.data.synth_scene import build_scene
from snd.errors import SndError
from tests._scenes import copied_scene, copy_root


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
    root = copy_root(synth_root, tmp_path)
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


# -- errors naming the file ------------------------------------------------------------------------
def test_missing_transforms_names_the_file(synth_root, tmp_path):
    root, sd = copied_scene(synth_root, tmp_path)
    (sd / "dslr" / "nerfstudio" / "transforms_undistorted.json").unlink()
    with pytest.raises(SndError, match="transforms_undistorted.json"):
        open_dataset(root).scene(sd.name)


def test_malformed_transforms_names_the_file(synth_root, tmp_path):
    root, sd = copied_scene(synth_root, tmp_path)
    (sd / "dslr" / "nerfstudio" / "transforms_undistorted.json").write_text("{not json")
    with pytest.raises(SndError, match="malformed transforms file.*transforms_undistorted.json"):
        open_dataset(root).scene(sd.name)


def test_truncated_jpeg_names_the_file(synth_root, tmp_path):
    root, sd = copied_scene(synth_root, tmp_path)
    jpg = sd / "dslr" / "resized_undistorted_images" / "DSC00002.JPG"
    jpg.write_bytes(jpg.read_bytes()[:200])
    sc = open_dataset(root, cache_dir=tmp_path / "c").scene(sd.name)
    with pytest.raises(SndError, match="DSC00002.JPG"):
        sc.image(1)


def test_ply_without_faces_names_the_file(synth_root, tmp_path):
    root, sd = copied_scene(synth_root, tmp_path)
    ply = sd / "scans" / "mesh_aligned_0.05.ply"
    n = len(json.loads((sd / "scans" / "segments.json").read_text())["segIndices"])
    header = f"ply\nformat ascii 1.0\nelement vertex {n}\nproperty float x\nproperty float y\nproperty float z\nend_header\n"
    ply.write_text(header + "0 0 0\n" * n)
    sc = open_dataset(root, cache_dir=tmp_path / "c").scene(sd.name)
    with pytest.raises(SndError, match="no faces.*mesh_aligned_0.05.ply"):
        sc.depth(0)


def test_segments_length_mismatch_names_the_file(synth_root, tmp_path):
    root, sd = copied_scene(synth_root, tmp_path)
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


# -- the toolkit's folders and the split lists ------------------------------------------------------
def test_toolkit_undistorted_images_folder_is_accepted(synth_root, tmp_path):
    """The toolkit's dslr/undistort.py writes dslr/undistorted_images/ (+ transforms_undistorted.json)."""
    root, sd = copied_scene(synth_root, tmp_path)
    (sd / "dslr" / "resized_undistorted_images").rename(sd / "dslr" / "undistorted_images")
    sc = open_dataset(root, cache_dir=tmp_path / "c").scene(sd.name)
    assert sc.image_dir.name == "undistorted_images" and not sc.fisheye
    assert sc.image(0).shape[:2] == (sc.height, sc.width)
    shutil.rmtree(sd / "dslr" / "undistorted_images")
    with pytest.raises(SndError, match="undistorted_images"):
        open_dataset(root, cache_dir=tmp_path / "c2").scene(sd.name)


def test_split_lists_v1_vs_v2_are_reported(synth_root, tmp_path):
    root = copy_root(synth_root, tmp_path)
    ds = open_dataset(root)
    names = ds.scene_names("distill")
    line = ds.describe_selection("distill", names)
    assert f"{len(names)} scenes selected" in line and "v2 lists" not in line
    # a v2-like list: more than v1's 230 training scenes (the absent ones are skipped with a warning)
    extra = "".join(f"scene{i:04d}\n" for i in range(240))
    (root / "splits" / "nvs_sem_train.txt").write_text((root / "splits" / "nvs_sem_train.txt").read_text() + extra)
    line = open_dataset(root).describe_selection("distill", names)
    assert "look like the v2 lists" in line and "not the paper's 280" in line
