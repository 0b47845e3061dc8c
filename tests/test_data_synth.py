"""Procedural scenes: byte-identical per seed, the ScanNet++ v2 file set, geometry a camera can use."""
import json
from pathlib import Path

import numpy as np

from snd.data.synth import generate_dataset
from snd.data.synth_scene import build_scene
from snd.pipeline.config import SynthConfig


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes(tmp_path):
    cfg = dict(scenes=2, frames=4, height=40, width=56, objects=3)
    a = generate_dataset(SynthConfig(out=tmp_path / "a", seed=3, **cfg))
    b = generate_dataset(SynthConfig(out=tmp_path / "b", seed=3, **cfg))
    c = generate_dataset(SynthConfig(out=tmp_path / "c", seed=4, **cfg))
    assert a == b and a != c
    ta, tb, tc = _tree(tmp_path / "a"), _tree(tmp_path / "b"), _tree(tmp_path / "c")
    assert ta == tb
    assert len(ta) == len(tc) and ta != tc
    # regenerating into an existing root replaces the scenes atomically and leaves no temp folders
    generate_dataset(SynthConfig(out=tmp_path / "a", seed=3, **cfg))
    assert _tree(tmp_path / "a") == ta
    assert not [p for p in (tmp_path / "a" / "data").iterdir() if p.name.startswith(".")]


def test_file_set_is_the_scannetpp_v2_layout(synth_root):
    train = (synth_root / "splits" / "nvs_sem_train.txt").read_text().split()
    val = (synth_root / "splits" / "nvs_sem_val.txt").read_text().split()
    assert len(train) == 1 and len(val) == 1
    for name in train + val:
        sd = synth_root / "data" / name
        imgs = sorted((sd / "dslr" / "resized_undistorted_images").glob("DSC*.JPG"))
        assert [p.name for p in imgs] == [f"DSC{i:05d}.JPG" for i in range(1, 17)]
        tf = json.loads((sd / "dslr" / "nerfstudio" / "transforms_undistorted.json").read_text())
        assert tf["camera_model"] == "PINHOLE" and (tf["w"], tf["h"]) == (168, 112)
        listed = [f["file_path"] for f in tf["frames"] + tf["test_frames"]]
        assert listed == [p.name for p in imgs] and tf["train_filenames"] + tf["test_filenames"] == listed
        assert all(np.asarray(f["transform_matrix"]).shape == (4, 4) for f in tf["frames"])
        ply = (sd / "scans" / "mesh_aligned_0.05.ply").read_bytes()
        assert ply.startswith(b"ply\nformat binary_little_endian 1.0\n")
        seg = json.loads((sd / "scans" / "segments.json").read_text())["segIndices"]
        n_vert = int(ply.split(b"element vertex ")[1].split(b"\n")[0])
        assert len(seg) == n_vert
        groups = json.loads((sd / "scans" / "segments_anno.json").read_text())["segGroups"]
        assert {g["label"] for g in groups} >= {"wall", "floor", "ceiling"}
        assert all(g["objectId"] >= 1 for g in groups)
        assert sorted(s for g in groups for s in g["segments"]) == sorted(set(seg))  # every segment annotated once


def test_cameras_stay_inside_and_views_overlap():
    sc = build_scene(0, 0, frames=30, height=60, width=90, objects=6)
    lo, hi = sc.vertices.min(0), sc.vertices.max(0)
    for cam in sc.cameras:
        assert (cam.center > lo + 0.2).all() and (cam.center < hi - 0.2).all()
    assert sum(p.label in ("box", "cylinder", "sphere") for p in sc.parts) == 6
    # frames 12 apart: most pixels of frame 0 project into frame 12 (and are not occluded there)
    from snd.data.raycast import MeshRaycaster

    rc = MeshRaycaster(sc.vertices, sc.faces)
    a, b = sc.cameras[0], sc.cameras[12]
    pts = rc.cast(a).points.reshape(-1, 3)
    uv, z = b.project(pts)
    inside = (z > 0) & (uv[:, 0] >= 0) & (uv[:, 0] <= b.width - 1) & (uv[:, 1] >= 0) & (uv[:, 1] <= b.height - 1)
    assert inside.mean() > 0.5
