"""The FiT3D/SnD prepared layout: a round trip from the raw layout (`export_prepared`), its OpenGL poses, and
SndErrors for missing instance masks (one file, or a scene's whole folder before precompute starts).

Split from test_data_readers.py (one file per reader)."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from snd.data import open_dataset
from snd.data.camera import opencv_to_opengl
from snd.data.prepared import export_prepared
from snd.errors import SndError


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


def test_missing_instance_png_names_the_file(synth_root, tmp_path):
    out = tmp_path / "prep"
    names = export_prepared(synth_root, out, scenes=[open_dataset(synth_root).scene_names("all")[0]])
    png = out / "scenes" / names[0] / "instance_segmentation" / "DSC00003.JPG.png"
    png.unlink()
    with pytest.raises(SndError, match="DSC00003.JPG.png"):
        open_dataset(out).scene(names[0]).instance_mask(2)


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
