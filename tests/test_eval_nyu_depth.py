"""NYU depth as the official SnD depth probe reads it (`snd.eval.datasets.nyu_depth`): the BTS / Toolbox layout
(nyu_train.txt / nyu_test.txt, JPEG colour, uint16 millimetre PNG depth), written here by hand or by the
procedural stand-in, and the paper protocol choosing it over the labelled set's .mat."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import snd.eval.datasets as D
from snd.errors import SndError
from snd.eval.datasets.nyu_depth import NYUDepth, parse_split, write_nyu_depth_standin
from snd.eval.datasets.nyuv2 import NYUv2
from snd.eval.protocol import dataset_kwargs

pytestmark = pytest.mark.usefixtures("one_thread")


def _frame(folder: Path, rgb: str, dep: str, mm: np.ndarray, colour=(200, 120, 40)) -> None:
    """One frame written by hand: a constant-colour JPEG and a 16-bit PNG of `mm` millimetres."""
    (folder / rgb).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*mm.shape, 3), colour, np.uint8)).save(folder / rgb, quality=95)
    Image.fromarray(mm.astype(np.uint16)).save(folder / dep)


def test_split_lists_parse_as_the_official_loader(tmp_path):
    """First two fields, one leading slash (or backslash) removed, depth "None" skipped, focal ignored, items sorted
    by image path; a line with one field names the file and line."""
    f = tmp_path / "nyu_train.txt"
    f.write_text("/study_0004/rgb_00070.jpg /study_0004/sync_depth_00070.png 518.8579\n"
                 "bathroom/rgb_00045.jpg bathroom/sync_depth_00045.png 1.0\n"
                 "/kitchen_0028b/rgb_00045.jpg None 518.8579\n"
                 "\n"
                 "\\bedroom_0001/rgb_00002.jpg \\bedroom_0001/sync_depth_00002.png\n"
                 "/aa/rgb_00001.jpg //aa/sync_depth_00001.png 518.8579")
    assert parse_split(f) == [("aa/rgb_00001.jpg", "/aa/sync_depth_00001.png"),  # only one slash is removed
                              ("bathroom/rgb_00045.jpg", "bathroom/sync_depth_00045.png"),
                              ("bedroom_0001/rgb_00002.jpg", "bedroom_0001/sync_depth_00002.png"),
                              ("study_0004/rgb_00070.jpg", "study_0004/sync_depth_00070.png")]
    f.write_text("a/rgb_00001.jpg a/sync_depth_00001.png 518.8579\nonlyone.jpg\n")
    with pytest.raises(SndError, match=r"nyu_train.txt:2: expected"):
        parse_split(f)


@pytest.fixture
def hand_root(tmp_path):
    """<root>/nyuv2/data_depth by hand: train one 480x640 frame, val one; depth in mm with known pixels."""
    folder = tmp_path / "nyuv2" / "data_depth"
    mm = np.full((480, 640), 2500, np.int64)
    mm[100, 200] = 1234  # -> 1.234 m
    mm[101, 200] = 0  # no depth -> invalid
    mm[102, 200] = 10000  # 10 m: kept (the cap is inclusive, as the labelled reader's)
    mm[103, 200] = 10001  # beyond 10 m -> invalid
    _frame(folder, "kitchen_0001/rgb_00000.jpg", "kitchen_0001/sync_depth_00000.png", mm)
    _frame(folder, "bathroom/rgb_00045.jpg", "bathroom/sync_depth_00045.png", mm + 500, colour=(10, 20, 30))
    (folder / "nyu_train.txt").write_text("/kitchen_0001/rgb_00000.jpg /kitchen_0001/sync_depth_00000.png 518.8579")
    (folder / "nyu_test.txt").write_text("bathroom/rgb_00045.jpg bathroom/sync_depth_00045.png 518.8579")
    return tmp_path


def test_millimetres_become_metres_with_the_10m_cap(hand_root):
    ds = D.get_dataset("nyuv2", hand_root, "train", "depth", (480, 640), depth_set="bts", fit="resize")
    assert isinstance(ds, NYUDepth) and len(ds) == 1
    raw = ds.load(0)
    assert raw.id == "kitchen_0001/rgb_00000" and raw.depth.dtype == np.float32
    assert raw.depth[100, 200] == np.float32(1.234) and raw.depth[0, 0] == np.float32(2.5)
    assert raw.depth[101, 200] == 0 and raw.depth[102, 200] == np.float32(10.0) and raw.depth[103, 200] == 0
    assert np.abs(raw.image.astype(int) - [200, 120, 40]).max() <= 2  # the JPEG's constant colour
    s = ds[0]
    assert tuple(s["image"].shape) == (3, 480, 640) and float(s["depth"][100, 200]) == pytest.approx(1.234)


def test_paper_train_is_the_nyucrop_region_and_val_the_eigen_cropped_frame(hand_root):
    """Under the paper options: train = rows 45:472, cols 43:608 (427x565) of image and depth, padded to 434x574 (rows
    3 | 4, cols 4 | 5); val = the whole frame padded to 490x644 (5 | 5, 2 | 2), depth 0 outside rows 45:471, cols
    41:601 (by hand: row 44 / 471 and col 40 / 601 are out, row 45 / 470 and col 41 / 600 are in)."""
    tr = D.get_dataset("nyuv2", hand_root, "train", "depth", (434, 574), **dataset_kwargs("paper", "nyuv2", "depth", "train"))
    assert isinstance(tr, NYUDepth)
    s = tr[0]
    assert tuple(s["image"].shape) == (3, 434, 574) and tuple(s["depth"].shape) == (427, 565)
    assert float(s["depth"][100 - 45, 200 - 43]) == pytest.approx(1.234)  # the hand pixel, moved by the crop's corner
    assert float(s["depth"][0, 0]) == pytest.approx(2.5) and bool((s["depth"][:, -1] == 2.5).all())
    decoded = np.asarray(Image.open(hand_root / "nyuv2/data_depth/kitchen_0001/rgb_00000.jpg").convert("RGB"))
    np.testing.assert_allclose(s["image"][:, 3:430, 4:569].permute(1, 2, 0).numpy(), decoded[45:472, 43:608] / 255,
                               atol=1e-6)
    assert s["image"][:, 2, 100].tolist() == pytest.approx([0.485, 0.456, 0.406])  # the mean padding
    va = D.get_dataset("nyuv2", hand_root, "val", "depth", (490, 644), **dataset_kwargs("paper", "nyuv2", "depth", "val"))
    v = va[0]
    assert tuple(v["image"].shape) == (3, 490, 644) and tuple(v["depth"].shape) == (480, 640)
    d = v["depth"].numpy()
    inside = np.zeros((480, 640), bool)
    inside[45:471, 41:601] = True
    assert bool((d[~inside] == 0).all()) and int((d[inside] != 3.0).sum()) == 4  # 3 m but for the 4 hand pixels
    assert d[44, 300] == 0 and d[45, 300] == 3.0 and d[470, 300] == 3.0 and d[471, 300] == 0
    assert d[200, 40] == 0 and d[200, 41] == 3.0 and d[200, 600] == 3.0 and d[200, 601] == 0
    assert d[100, 200] == np.float32(1.734) and d[101, 200] == np.float32(0.5)  # 1234 + 500 mm, 0 + 500 mm
    assert d[102, 200] == 0 and d[103, 200] == 0  # 10500 and 10501 mm: beyond the cap


def test_missing_layout_lists_and_files_name_what_to_download(tmp_path, hand_root):
    with pytest.raises(SndError) as e:  # nothing there: names both places, the download and the fast protocol
        D.get_dataset("nyuv2", tmp_path / "empty", "val", "depth", (490, 644), depth_set="bts")
    msg = str(e.value)
    assert "data_depth" in msg and "nyu_test.txt" in msg and "sync.zip" in msg
    folder = hand_root / "nyuv2" / "data_depth"
    (folder / "nyu_test.txt").unlink()
    with pytest.raises(SndError, match=r"split list missing: .*data_depth/nyu_test.txt(.|\n)*extract_official"):
        D.get_dataset("nyuv2", hand_root, "val", "depth", (490, 644), depth_set="bts")
    (folder / "kitchen_0001" / "sync_depth_00000.png").unlink()
    with pytest.raises(SndError, match=r"1 file\(s\) listed in .*nyu_train.txt are missing, first .*sync_depth_00000.png"):
        D.get_dataset("nyuv2", hand_root, "train", "depth", (434, 574), depth_set="bts")
    with pytest.raises(SndError, match="depth only"):
        D.get_dataset("nyuv2", hand_root, "train", "seg", (434, 574), depth_set="bts")


def test_toolbox_folder_and_bts_list_names_and_the_status_line(tmp_path):
    """`<root>/nyu/` (the Toolbox's / FiT3D's name) with BTS's own list names is found; `available` says the layout
    alone serves the paper protocol's depth, and what the labelled set would add."""
    folder = tmp_path / "nyu"
    mm = np.full((480, 640), 1500, np.int64)
    _frame(folder, "office_0003/rgb_00007.jpg", "office_0003/sync_depth_00007.png", mm)
    (folder / "nyudepthv2_train_files_with_gt.txt").write_text(
        "/office_0003/rgb_00007.jpg /office_0003/sync_depth_00007.png 518.8579\n")
    status = D.available(tmp_path)["nyuv2"]
    assert status.startswith("ok (depth of --protocol paper only") and "nyu_depth_v2_labeled.mat" in status
    ds = D.get_dataset("nyuv2", tmp_path, "train", "depth", (480, 640), depth_set="bts")
    assert ds.folder == folder and ds.items == [("office_0003/rgb_00007.jpg", "office_0003/sync_depth_00007.png")]
    with pytest.raises(SndError, match="labelled set missing"):  # the fast protocol still needs the .mat
        D.get_dataset("nyuv2", tmp_path, "train", "depth", (480, 640))
    assert D.available(tmp_path / "none")["nyuv2"].startswith("missing")


def test_standin_is_the_published_layout(tmp_path):
    """The stand-in's lists and files look like BTS's: leading "/" on training lines only, three fields with the
    focal, JPEG colour, 16-bit PNG depth in mm, BTS's zeroed 7-pixel border on test frames; its training list is
    not sorted (as BTS's), the reader sorts it."""
    folder = write_nyu_depth_standin(tmp_path / "data_depth", n_train=4, n_test=2, seed=1)
    train = (folder / "nyu_train.txt").read_text().splitlines()
    test = (folder / "nyu_test.txt").read_text().splitlines()
    assert len(train) == 4 and len(test) == 2
    assert all(ln.startswith("/") and ln.endswith(" 518.8579") and len(ln.split(" ")) == 3 for ln in train)
    assert all(not ln.startswith("/") and len(ln.split(" ")) == 3 for ln in test)
    assert [ln.split(" ")[0] for ln in train] != sorted(ln.split(" ")[0] for ln in train)
    rgb, dep = parse_split(folder / "nyu_test.txt")[0]
    with Image.open(folder / dep) as im:
        assert im.mode.startswith("I;16") and im.size == (640, 480)
        mm = np.asarray(im)
    assert mm.dtype == np.uint16 and (mm == 0).any() and (mm > 10000).any() and 500 < np.median(mm) < 8000
    with Image.open(folder / rgb) as im:
        assert im.format == "JPEG"
        img = np.asarray(im.convert("RGB")).astype(int)
    for border in (img[:7], img[:, :7], img[474:], img[:, 632:]):  # black but for the JPEG's ringing
        assert border.mean() < 5
    assert img[7:474, 7:632].mean() > 30


def test_eval_plan_reads_bts_under_paper_and_the_mat_under_fast(tmp_path):
    from snd.pipeline.config import EvalConfig
    from snd.stages.eval_plan import _splits
    from tests.test_eval_protocol_sizes import _nyu_480x640

    _nyu_480x640(tmp_path)
    paper = EvalConfig(data_root=tmp_path, protocol="paper")
    tr, va, _, _ = _splits("depth", "nyuv2", paper, 14)
    from snd.eval.depth_aug import DepthTrain

    assert isinstance(tr, DepthTrain) and tr.crop_hw == (416, 544)  # the live crops of the BTS training frames
    tr = tr.unaugmented()
    assert isinstance(tr, NYUDepth) and isinstance(va, NYUDepth) and tr.whole_frame and va.whole_frame
    assert va.items == [("bathroom/rgb_00045.jpg", "bathroom/sync_depth_00045.png")]
    fast = EvalConfig(data_root=tmp_path, protocol="fast", img_height=56, img_width=84)
    tr, va, _, _ = _splits("depth", "nyuv2", fast, 14)
    assert isinstance(tr, NYUv2) and isinstance(va, NYUv2) and [va.load(0).id] == ["0002"]


def test_paper_nyu_depth_end_to_end_on_the_standin_alone(tmp_path):
    """`snd eval depth` (paper) with only the BTS stand-in: every listed frame trains (3) and is tested (2); with only
    the labelled set, the task fails with the download named and `--protocol fast` suggested."""
    from snd.stages import evaluate
    from tests.test_evaluate import _cfg

    write_nyu_depth_standin(tmp_path / "data" / "nyuv2" / "data_depth", n_train=3, n_test=2)
    res = evaluate.run(_cfg(tmp_path / "data", tmp_path / "out", datasets=["nyuv2"], baseline=None, iters=2),
                       tasks=["depth"])
    (rec,) = res["records"]
    assert rec["status"] == "ok" and rec["protocol"] == "paper" and (rec["n_train"], rec["n_val"]) == (3, 2)
    assert 0 < rec["metrics"]["abs_rel"] < 10
    assert json.loads((tmp_path / "out" / "results.json").read_text())["protocol"] == "paper"
    from tests.test_eval_datasets import write_mat_v5, write_mat_v73

    d = tmp_path / "mat" / "nyuv2"
    d.mkdir(parents=True)
    write_mat_v73(d / "nyu_depth_v2_labeled.mat", {"images": np.zeros((2, 3, 640, 480), np.uint8),
                                                    "depths": np.ones((2, 640, 480), np.float32)})
    write_mat_v5(d / "splits.mat", {"trainNdxs": np.array([[1]]), "testNdxs": np.array([[2]])})
    with pytest.raises(SndError, match=r"(?s)nyuv2.*data_depth.*sync\.zip.*--protocol fast"):
        evaluate.run(_cfg(tmp_path / "mat", tmp_path / "out2", datasets=["nyuv2"], baseline=None, iters=2),
                     tasks=["depth"])
