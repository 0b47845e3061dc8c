"""The paper protocol's fixed input sizes for a /14 and a /16 backbone (the official code centre-pads each to the
patch: `snd.eval.protocol.padded_hw`), KITTI's whole KB crop, and how the correspondence probe reads the padded
frame's features (as Probe3D does). Every size below is computed by hand."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from snd.eval.protocol import dataset_kwargs

pytestmark = pytest.mark.usefixtures("one_thread")


def test_paper_sizes_follow_the_backbones_patch(tmp_path):
    """NYU normals test, GeoNet, correspondence: the 480-row inputs centre-padded to the patch, by hand."""
    from snd.eval.protocol import center_pad, padded_hw, paper_val_hw
    from snd.pipeline.config import EvalConfig
    from snd.stages.eval_plan import val_hw

    assert padded_hw((480, 480), 14) == (490, 490) and padded_hw((480, 480), 16) == (480, 480)  # 35², 30² patches
    assert padded_hw((480, 640), 14) == (490, 644) and padded_hw((480, 640), 16) == (480, 640)  # 35x46, 30x40
    assert padded_hw((470, 630), 16) == (480, 640) and padded_hw((1, 17), 16) == (16, 32)
    assert paper_val_hw("nyuv2", "normals", 16) == (480, 480) and paper_val_hw("synth", "depth", 16) is None
    sized = dict(data_root=tmp_path, img_height=476, img_width=630)  # as `probe_input_sized` sets them for /14
    paper, fast = EvalConfig(protocol="paper", **sized), EvalConfig(protocol="fast", **sized)
    assert val_hw(paper, "nyuv2", "normals", 14) == (490, 490) and val_hw(paper, "nyuv2", "normals", 16) == (480, 480)
    assert val_hw(fast, "nyuv2", "normals", 16) == (476, 630) and val_hw(paper, "synth", "depth", 16) == (476, 630)
    # correspondence: 480x640 -> 490x644 (rows 5 | 5, columns 2 | 2) for /14; 470x630 -> 480x640 (5 | 5) for /16
    fill = torch.tensor([0.1, 0.2, 0.3])
    for p, (h, w), (top, left, hp, wp) in ((14, (480, 640), (5, 2, 490, 644)), (16, (470, 630), (5, 5, 480, 640))):
        x = torch.rand(1, 3, h, w)
        out = center_pad(x, p, fill)
        assert tuple(out.shape) == (1, 3, hp, wp)
        assert torch.equal(out[..., top : top + h, left : left + w], x)
        assert out[0, :, top - 1, 300].tolist() == pytest.approx(fill.tolist())
        assert out[0, :, top + h, 300].tolist() == pytest.approx(fill.tolist())
        assert out[0, :, 100, left - 1].tolist() == pytest.approx(fill.tolist())
    assert center_pad(torch.ones(1, 3, 480, 640), 16, fill).shape == (1, 3, 480, 640)  # /16: nothing to pad


def test_paper_correspondence_features_cover_the_padded_input():
    """`_eval_corr`'s model function pads pairs for the backbone's own patch: 480x640 is a 30x40 grid for /16
    (no padding), 470x630 is padded to 480x640."""
    from snd.models.backbone import create_backbone
    from snd.stages.eval_corr import corr_model_fn

    net = create_backbone("snd_test_vit_patch16_dinov3", init="random").eval()

    f = corr_model_fn(net, paper=True, precision="fp32", device=torch.device("cpu"))
    assert tuple(f(torch.rand(2, 3, 480, 640)).shape[-2:]) == (30, 40)
    assert tuple(f(torch.rand(2, 3, 470, 630)).shape[-2:]) == (30, 40)


def test_paper_correspondence_samples_the_padded_map_as_probe3d_does():
    """Probe3D's `sample_pointcloud_features` normalises the points' pixels by the 120x160 depth grid, so the
    35x46 map of the 490x644 padded input is read as if it covered the 480x640 image (the official code does
    not shift by the padding). A map whose channels hold their own column / row index shows where it reads."""
    from snd.eval.correspondence import sample_features

    i, j = torch.meshgrid(torch.arange(35.0), torch.arange(46.0), indexing="ij")
    fmap = torch.stack([j, i])  # [2, 35, 46]: bilinear sampling of a linear map returns the position itself
    uv = torch.tensor([[40.0, 60.0], [100.0, 2.0]], dtype=torch.float64)  # (u, v) on the 120x160 grid
    got = sample_features(fmap, uv, (120, 160))
    # stretched, by hand: column (u + 0.5)·46/160 − 0.5, row (v + 0.5)·35/120 − 0.5
    assert got[0].tolist() == pytest.approx([40.5 * 46 / 160 - 0.5, 60.5 * 35 / 120 - 0.5], abs=1e-5)
    assert got[1].tolist() == pytest.approx([100.5 * 46 / 160 - 0.5, 2.5 * 35 / 120 - 0.5], abs=1e-5)
    # the padded frame's true position of grid row 2 is ((2.5)·4 + 5) / 14 − 0.5 = 0.571 patches: not what is read
    assert abs(float(got[1, 1]) - ((2.5 * 4 + 5) / 14 - 0.5)) > 0.3


def write_kitti_frame(root: Path, *, seed: int = 0) -> np.ndarray:
    """One raw 375x1242 KITTI frame (split-file layout) listed in both splits; depth 2 m everywhere."""
    from tests.test_eval_datasets import png

    k = root / "kitti"
    img = np.random.default_rng(seed).integers(0, 256, (375, 1242, 3), dtype=np.uint8)
    png(k / "raw/2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000005.png", img)
    png(k / "data_depth_annotated/train/2011_09_26_drive_0002_sync/proj_depth/groundtruth/image_02/0000000005.png",
        np.full((375, 1242), 512, np.uint16))
    line = ("2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000005.png "
            "2011_09_26_drive_0002_sync/proj_depth/groundtruth/image_02/0000000005.png 721.5377\n")
    (k / "kitti_train.txt").write_text(line * 2)
    (k / "kitti_val.txt").write_text(line)
    return img


def test_paper_kitti_feeds_the_whole_kb_crop_padded_to_the_patch(tmp_path):
    """The official KITTI depth test feeds the whole 352x1216 KB crop (no Resize, dinov2's CenterPadding):
    364x1218 (rows 6 | 6, columns 1 | 1) for /14, 352x1216 itself for /16; the depth stays the native KB map
    with the Garg region of that map (rows 143..348, cols 43..1171); training reads the same frame at that scale."""
    import snd.eval.datasets as D
    from snd.pipeline.config import EvalConfig
    from snd.stages.eval_plan import train_hw, val_hw

    img = write_kitti_frame(tmp_path)
    kb = img[375 - 352 :, 13 : 13 + 1216] / 255.0  # bottom-centred 352x1216
    sized = dict(data_root=tmp_path, img_height=476, img_width=630)  # as `probe_input_sized` sets them for /14
    paper, fast = EvalConfig(protocol="paper", **sized), EvalConfig(protocol="fast", **sized)
    assert val_hw(paper, "kitti", "depth", 14) == (364, 1218) and train_hw(paper, "kitti", "depth", 14) == (364, 1218)
    assert val_hw(paper, "kitti", "depth", 16) == (352, 1216) and train_hw(paper, "kitti", "depth", 16) == (352, 1216)
    assert val_hw(fast, "kitti", "depth", 14) == (476, 630) and train_hw(fast, "kitti", "depth", 14) == (476, 630)
    assert train_hw(paper, "synth", "depth", 14) == (476, 630)
    va = D.get_dataset("kitti", tmp_path, "val", "depth", (364, 1218), **dataset_kwargs("paper", "kitti", "depth", "val"))
    s = va[0]
    assert tuple(s["image"].shape) == (3, 364, 1218) and tuple(s["depth"].shape) == (352, 1216)
    np.testing.assert_allclose(s["image"][:, 6:358, 1:1217].permute(1, 2, 0).numpy(), kb, atol=1e-6)
    for r, c in ((5, 600), (358, 600), (100, 0), (100, 1217)):
        assert s["image"][:, r, c].tolist() == pytest.approx([0.485, 0.456, 0.406])
    rows, cols = np.nonzero(s["depth"].numpy().any(1))[0], np.nonzero(s["depth"].numpy().any(0))[0]
    assert (rows[0], rows[-1], cols[0], cols[-1]) == (143, 348, 43, 1171) and float(s["depth"].max()) == 2.0
    s16 = D.get_dataset("kitti", tmp_path, "val", "depth", (352, 1216),
                        **dataset_kwargs("paper", "kitti", "depth", "val"))[0]
    np.testing.assert_allclose(s16["image"].permute(1, 2, 0).numpy(), kb, atol=1e-6)
    tr = D.get_dataset("kitti", tmp_path, "train", "depth", (364, 1218),
                       **dataset_kwargs("paper", "kitti", "depth", "train"))[0]
    assert tuple(tr["image"].shape) == (3, 364, 1218) and bool((tr["depth"] == 2.0).all())
    assert tuple(tr["depth"].shape) == (352, 1216)  # no Garg crop on training depth
    with pytest.raises(Exception, match="does not fit"):
        D.get_dataset("kitti", tmp_path, "val", "depth", (350, 1218), whole_frame=True)[0]


def test_paper_records_of_the_old_kitti_input_are_not_resumed(tmp_path):
    """The paper depth inputs changed (KITTI's whole KB crop: revision 2; NYU / ScanNet / ScanNet++ whole frames: 3):
    paper result and trivial folders get a new hash, fast ones keep theirs."""
    from snd.pipeline.config import EvalConfig
    from snd.stages.eval_plan import _protocol, _trivial_folder

    sized = dict(data_root=tmp_path, img_height=476, img_width=630)  # as `probe_input_sized` sets them for /14
    paper, fast = EvalConfig(protocol="paper", **sized), EvalConfig(protocol="fast", **sized)
    assert _protocol(paper)["paper_rev"] == 4
    assert "paper_rev" not in _protocol(fast)
    # the trivial folder of revision 3 differs from the one every earlier paper run wrote (same fields, no revision)
    import hashlib
    import json

    old = {"img_hw": [476, 630], "max_images": None, "protocol": "paper", "fit_on": "unaugmented"}
    assert _trivial_folder(paper) != "trivial-" + hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:8]
    old_fast = {"img_hw": [476, 630], "max_images": None}
    assert _trivial_folder(fast) == "trivial-" + hashlib.sha256(json.dumps(old_fast, sort_keys=True).encode()).hexdigest()[:8]


def test_paper_depth_whole_frames_padded_to_the_patch():
    """The official depth test feeds each set's whole native frame padded by dinov2's CenterPadding: NYU and ScanNet
    480x640 -> 490x644 (35x46 patches) for /14, itself (30x40) for /16; ScanNet++ 584x876 -> 588x882 (42x63) for /14,
    592x880 (37x55) for /16. NYU trains on its NYUCrop region, 427x565 -> 434x574 (31x41) / 432x576 (27x36)."""
    from snd.eval.datasets.scannetpp import FRAME_HW
    from snd.eval.protocol import PAPER_VAL_NATIVE_HW, paper_train_hw, paper_val_hw

    assert FRAME_HW == PAPER_VAL_NATIVE_HW[("scannetpp", "depth")] == (584, 876)
    by_hand = {  # (name, patch): (val, train)
        ("nyuv2", 14): ((490, 644), (434, 574)), ("nyuv2", 16): ((480, 640), (432, 576)),
        ("scannet", 14): ((490, 644), (490, 644)), ("scannet", 16): ((480, 640), (480, 640)),
        ("scannetpp", 14): ((588, 882), (588, 882)), ("scannetpp", 16): ((592, 880), (592, 880)),
    }
    for (name, p), (val, train) in by_hand.items():
        assert paper_val_hw(name, "depth", p) == val and paper_train_hw(name, "depth", p) == train, (name, p)
    # the flip test flips the padded frame (`FlippedImages`): the same as padding the flipped frame (the official
    # order) only when the columns are padded evenly, which every depth test frame is, for /14 and /16
    for (name, task), (h, w) in PAPER_VAL_NATIVE_HW.items():
        for p in (14, 16):
            assert task != "depth" or (paper_val_hw(name, task, p)[1] - w) % 2 == 0, (name, p)


def _nyu_480x640(root: Path) -> dict:
    """NYU stand-ins of 480x640 frames: the labelled set's .mat (the fast protocol: image 1 trains, image 2 is tested,
    depths 0.5..12 m) and the BTS layout the paper protocol reads (`write_nyu_depth_standin`: one training and one
    test frame); returns the paper frames as their files decode (JPEG colour, PNG mm / 1000, > 10 m -> 0)."""
    from PIL import Image

    from snd.eval.datasets.nyu_depth import parse_split, write_nyu_depth_standin
    from tests.test_eval_datasets import write_mat_v5, write_mat_v73

    d = root / "nyuv2"
    d.mkdir(parents=True)
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (2, 480, 640, 3), dtype=np.uint8)
    depths = rng.uniform(0.5, 12.0, (2, 480, 640)).astype(np.float32)
    write_mat_v73(d / "nyu_depth_v2_labeled.mat", {"images": images.transpose(0, 3, 2, 1),
                                                    "depths": depths.transpose(0, 2, 1)})
    write_mat_v5(d / "splits.mat", {"trainNdxs": np.array([[1]]), "testNdxs": np.array([[2]])})
    bts = write_nyu_depth_standin(d / "data_depth", n_train=1, n_test=1)
    out: dict = {"images": [], "depths": []}
    for name in ("nyu_train.txt", "nyu_test.txt"):
        ((rgb, dep),) = parse_split(bts / name)
        out["images"].append(np.asarray(Image.open(bts / rgb).convert("RGB")))
        mm = np.asarray(Image.open(bts / dep), dtype=np.float32) / 1000
        out["depths"].append(np.where(mm <= 10.0, mm, 0.0))
    return out


def test_paper_nyu_depth_whole_frame_and_nyucrop_training(tmp_path):
    """NYU under the paper protocol (the BTS layout): the test image is the whole 480x640 frame padded to 490x644 (rows
    5 | 5, columns 2 | 2) with the native Eigen-cropped depth; training reads the NYUCrop region (rows 45:472, cols
    43:608, 427x565) padded to 434x574 (rows 3 | 4, columns 4 | 5) for /14 and 432x576 (rows 2 | 3, columns 5 | 6)
    for /16."""
    import snd.eval.datasets as D

    t = _nyu_480x640(tmp_path)
    mean = [0.485, 0.456, 0.406]
    va = D.get_dataset("nyuv2", tmp_path, "val", "depth", (490, 644), **dataset_kwargs("paper", "nyuv2", "depth", "val"))[0]
    assert tuple(va["image"].shape) == (3, 490, 644) and tuple(va["depth"].shape) == (480, 640)
    np.testing.assert_allclose(va["image"][:, 5:485, 2:642].permute(1, 2, 0).numpy(), t["images"][1] / 255, atol=1e-6)
    for r, c in ((4, 300), (485, 300), (200, 1), (200, 642)):
        assert va["image"][:, r, c].tolist() == pytest.approx(mean)
    eigen = np.zeros((480, 640), bool)
    eigen[45:471, 41:601] = True
    np.testing.assert_allclose(va["depth"].numpy(), np.where(eigen, t["depths"][1], 0.0), rtol=1e-6)
    for p, hw, (top, left) in ((14, (434, 574), (3, 4)), (16, (432, 576), (2, 5))):
        tr = D.get_dataset("nyuv2", tmp_path, "train", "depth", hw, **dataset_kwargs("paper", "nyuv2", "depth", "train"))[0]
        assert tuple(tr["image"].shape) == (3, *hw) and tuple(tr["depth"].shape) == (427, 565), p
        np.testing.assert_allclose(tr["image"][:, top : top + 427, left : left + 565].permute(1, 2, 0).numpy(),
                                   t["images"][0][45:472, 43:608] / 255, atol=1e-6)
        assert tr["image"][:, top - 1, 100].tolist() == pytest.approx(mean)
        assert tr["image"][:, top + 427, 100].tolist() == pytest.approx(mean)
        assert tr["image"][:, 100, left + 565].tolist() == pytest.approx(mean)
        np.testing.assert_allclose(tr["depth"].numpy(), t["depths"][0][45:472, 43:608], rtol=1e-6)
    fast = D.get_dataset("nyuv2", tmp_path, "train", "depth", (476, 630))[0]  # fast: unchanged, 476x630 resized
    assert tuple(fast["image"].shape) == (3, 476, 630) and tuple(fast["depth"].shape) == (476, 630)


def test_paper_scannet_depth_whole_frame_on_the_depth_grid(tmp_path):
    """ScanNet: the colour frame (here 24x32, as 968x1296 is twice 480x640 less 0.4 %) is resized onto its depth's
    grid (12x16) and centre-padded (rows 1 | 1, columns 6 | 6 to 14x28), the depth native; val keeps the Eigen
    crop of a 480x640 map."""
    import snd.eval.datasets as D
    from tests.test_eval_datasets import png

    b = tmp_path / "scannet" / "scannet_frames_25k" / "scene0000_00"
    for f in ("000000", "000100"):
        png(b / "color" / f"{f}.jpg", np.full((24, 32, 3), (100, 150, 200), np.uint8))
        png(b / "depth" / f"{f}.png", np.full((12, 16), 1500, np.uint16))
    s = D.get_dataset("scannet", tmp_path, "train", "depth", (14, 28), train_fraction=1.0,
                      **dataset_kwargs("paper", "scannet", "depth", "train"))[0]
    assert tuple(s["image"].shape) == (3, 14, 28) and tuple(s["depth"].shape) == (12, 16)
    np.testing.assert_allclose(s["image"][:, 1:13, 6:22].mean((1, 2)).numpy(), np.array([100, 150, 200]) / 255, atol=2 / 255)
    assert s["image"][:, 0, 10].tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert s["image"][:, 5, 22].tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert bool((s["depth"] == 1.5).all())
    with pytest.raises(Exception, match="Eigen crop needs 480x640"):  # the official eval_mask indexes a 480x640 map
        D.get_dataset("scannet", tmp_path, "val", "depth", (14, 28), train_fraction=0.5,
                      **dataset_kwargs("paper", "scannet", "depth", "val"))[0]


def test_paper_scene_frames_render_the_frame_then_pad(synth_root):
    """Scene datasets (ScanNet++: FiT3D's 584x876): with whole_frame the frame is rendered at exactly `frame_hw` and
    centre-padded, never resized to the input: here 56x84 (the 112x168 procedural frames halved) padded to 64x96
    (rows 4 | 4, columns 6 | 6) equals the plain 56x84 sample inside the border, depth native."""
    import snd.eval.datasets as D

    plain = D.get_dataset("synth", synth_root, "val", "depth", (56, 84))
    whole = D.get_dataset("synth", synth_root, "val", "depth", (64, 96), whole_frame=True, frame_hw=(56, 84))
    assert whole.render_hw == (56, 84)
    a, b = plain[3], whole[3]
    assert tuple(b["image"].shape) == (3, 64, 96) and tuple(b["depth"].shape) == (56, 84)
    assert torch.equal(b["image"][:, 4:60, 6:90], a["image"]) and torch.equal(b["depth"], a["depth"])
    assert b["image"][:, 3, 50].tolist() == pytest.approx([0.485, 0.456, 0.406])
    pp = D.get_dataset("scannetpp", synth_root, "val", "depth", (588, 882),
                       **dataset_kwargs("paper", "scannetpp", "depth", "val"))
    assert pp.render_hw == (584, 876) and pp.whole_frame and pp.native_target
