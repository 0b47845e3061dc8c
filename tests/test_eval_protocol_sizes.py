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
    paper, fast = EvalConfig(data_root=tmp_path, protocol="paper"), EvalConfig(data_root=tmp_path, protocol="fast")
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
    from snd.stages.eval_corr import _backbone_mean, corr_model_fn

    net = create_backbone("snd_test_vit_patch16_dinov3", init="random").eval()

    f = corr_model_fn(net, paper=True, precision="fp32", device=torch.device("cpu"))
    assert tuple(f(torch.rand(2, 3, 480, 640)).shape[-2:]) == (30, 40)
    assert tuple(f(torch.rand(2, 3, 470, 630)).shape[-2:]) == (30, 40)
    assert _backbone_mean(net).tolist() == pytest.approx([0.485, 0.456, 0.406], abs=1e-6)


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
    paper, fast = EvalConfig(data_root=tmp_path, protocol="paper"), EvalConfig(data_root=tmp_path, protocol="fast")
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

    paper, fast = EvalConfig(data_root=tmp_path, protocol="paper"), EvalConfig(data_root=tmp_path, protocol="fast")
    assert _protocol(paper)["paper_rev"] == 3
    assert "paper_rev" not in _protocol(fast)
    # the trivial folder of revision 3 differs from the one every earlier paper run wrote (same fields, no revision)
    import hashlib
    import json

    old = {"img_hw": [476, 630], "max_images": None, "protocol": "paper", "fit_on": "unaugmented"}
    assert _trivial_folder(paper) != "trivial-" + hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:8]
    old_fast = {"img_hw": [476, 630], "max_images": None}
    assert _trivial_folder(fast) == "trivial-" + hashlib.sha256(json.dumps(old_fast, sort_keys=True).encode()).hexdigest()[:8]
