"""The official depth training pipeline of the paper protocol (`snd.eval.depth_aug`), against hand-computed cases."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from snd.eval.depth_aug import PAPER_DEPTH_AUG, DepthAug, DepthTrain, color_aug, rotate
from snd.eval.protocol import IMAGENET_MEAN


def test_rotate_positive_degrees_turn_clockwise_about_the_centre_like_mmcv():
    """mmcv.imrotate(img, 90) turns the picture clockwise: the top row becomes the right column."""
    x = torch.arange(1.0, 10.0).view(1, 3, 3)
    want = torch.tensor([[7.0, 4.0, 1.0], [8.0, 5.0, 2.0], [9.0, 6.0, 3.0]])
    for mode in ("bilinear", "nearest"):
        assert torch.allclose(rotate(x, 90.0, mode)[0], want, atol=1e-5)


def test_rotate_counter_clockwise_for_negative_degrees():
    x = torch.arange(1.0, 10.0).view(1, 3, 3)
    want = torch.tensor([[3.0, 6.0, 9.0], [2.0, 5.0, 8.0], [1.0, 4.0, 7.0]])  # the top row becomes the left column
    assert torch.allclose(rotate(x, -90.0, "bilinear")[0], want, atol=1e-5)


def test_rotate_bilinear_reproduces_a_linear_ramp_and_zeroes_the_border():
    """Bilinear interpolation of a plane is exact: inside, out(d) = plane(R^T (d - c) + c) with cv2's matrix for
    -2 degrees (t = +2 deg in getRotationMatrix2D's sense is -degree); outside the source, the constant border 0."""
    H, W, deg = 9, 11, 2.0
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    plane = 2 * xs + 3 * ys + 1
    out = rotate(plane[None], deg, "bilinear")[0]
    t = math.radians(-deg)
    cx, cy = 5.0, 4.0
    r, c = 4, 7  # an interior pixel, worked by hand: d - c = (2, 0)
    sx, sy = math.cos(t) * 2 + cx, math.sin(t) * 2 + cy
    assert out[r, c].item() == pytest.approx(2 * sx + 3 * sy + 1, abs=1e-4)
    assert sy < 4  # clockwise: a point right of the centre reads a source point above the centre row
    # a 45 degree turn of a 5x5 field of ones: the corners read outside the source -> 0 (depth: invalid)
    d = rotate(torch.ones(1, 5, 5), 45.0, "nearest")[0]
    assert d[0, 0] == 0 and d[0, 4] == 0 and d[4, 0] == 0 and d[4, 4] == 0 and d[2, 2] == 1


def test_color_aug_works_on_the_0_255_values_as_the_toolbox_does():
    img = torch.tensor([100.0, 200.0, 0.0]).view(1, 1, 3).expand(3, 1, 3).clone()
    out = color_aug(img, 1.1, 1.0, torch.tensor([1.0, 0.9, 1.1]))
    g = 100.0 ** 1.1  # 158.489..., not 255 * (100/255)**1.1
    assert out[0, 0, 0].item() == pytest.approx(g, rel=1e-6)
    assert out[1, 0, 0].item() == pytest.approx(0.9 * g, rel=1e-6)
    assert out[2, 0, 0].item() == pytest.approx(1.1 * g, rel=1e-6)
    assert (out[:, 0, 1] == 255).all()  # 200**1.1 = 339.8 -> clipped
    assert (out[:, 0, 2] == 0).all()
    out = color_aug(img, 0.9, 1.25, torch.ones(3))
    assert out[0, 0, 0].item() == pytest.approx(1.25 * 100.0 ** 0.9, rel=1e-6)
    every = torch.arange(256.0).view(1, 1, 256).expand(3, 1, 256)  # the lookup = the formula on every value
    cols = torch.tensor([0.95, 1.0, 1.07])
    want = (every.double() ** 1.08 * 0.8 * cols.double().view(3, 1, 1)).clamp(0, 255).float()
    assert torch.equal(color_aug(every.clone(), 1.08, 0.8, cols), want)
    with pytest.raises(ValueError, match="uint8-valued"):
        color_aug(every + 0.25, 1.0, 1.0, torch.ones(3))


class _Frames:
    """A whole-frame source whose depth encodes each pixel's position: depth = 1 + row + col / 1000."""

    name = "frames"

    def __init__(self, hw, n=2):
        self.hw, self.n = hw, n

    def __len__(self):
        return self.n

    def native_frame(self, index):
        if getattr(self, "_cached", (None,))[0] == (self.hw, index):
            return self._cached[1]
        H, W = self.hw
        r, c = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
        depth = (1 + r + c / 1000).astype(np.float32)
        image = np.stack([r % 256, c % 256, np.full_like(r, 7 + index)], -1).astype(np.uint8)
        self._cached = ((self.hw, index), (image, torch.from_numpy(depth), f"f{index}"))
        return self._cached[1]


def _where(depth: torch.Tensor) -> tuple[int, int]:
    """(row, col) of the source pixel a crop's top-left depth came from (depth = 1 + row + col / 1000)."""
    v = float(depth[0, 0])
    return int(math.floor(v)) - 1, int(round((v - math.floor(v)) * 1000))


def test_depth_train_crops_the_frame_pads_to_the_patch_and_draws_every_offset():
    torch.manual_seed(0)
    aug = DepthAug(crop=(4, 6), p_rotate=0.0, p_flip=0.0, p_color=0.0)
    ds = DepthTrain(_Frames((6, 9)), aug, frame_hw=(6, 9), patch=7)
    assert ds.img_hw == (7, 7) and ds.crop_hw == (4, 6)
    seen = set()
    for _ in range(200):
        item = ds[1]
        img, d = item["image"], item["depth"]
        assert tuple(img.shape) == (3, 7, 7) and tuple(d.shape) == (4, 6)
        top, left = _where(d)
        assert torch.allclose(d, 1 + torch.arange(top, top + 4)[:, None] + torch.arange(left, left + 6)[None] / 1000)
        # the crop sits at rows 1..4, cols 0..5 of the 7x7 padded input (pads 3 -> 1|2, 1 -> 0|1), mean elsewhere
        assert torch.allclose(img[0, 1:5, 0:6] * 255, torch.arange(top, top + 4, dtype=torch.float32)[:, None].expand(4, 6))
        assert torch.allclose(img[2, 1:5, 0:6] * 255, torch.full((4, 6), 8.0))
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1)
        assert torch.allclose(img[:, 0, :], mean.expand(3, 7)) and torch.allclose(img[:, :, 6], mean.expand(3, 7))
        seen.add((top, left))
    assert seen == {(t, l) for t in range(3) for l in range(4)}  # margins 2 and 3: every offset, uniform


def test_depth_train_flips_rotates_and_jitters_about_half_the_items():
    """With the crop the whole frame, an item is the frame, flipped or not, unless it was turned; a turn moves the
    corners by > 0.5 px (so nearest reads another pixel) unless |angle| < 0.5 px / the corner radius (the
    the turns; 120x160: 0.29 deg, 12 %): about 0.5 * 0.88 of the items read as turned."""
    torch.manual_seed(1)
    ds = DepthTrain(_Frames((120, 160)), DepthAug(crop=(120, 160)), frame_hw=(120, 160), patch=8)
    src_img, src_d, _ = ds.source.native_frame(0)
    src_img = torch.from_numpy(src_img).permute(2, 0, 1).float() / 255
    flips = rots = cols = 0
    n = 120
    for _ in range(n):
        item = ds[0]
        d = item["depth"]
        flipped = torch.equal(d, src_d.flip(-1))
        if not (flipped or torch.equal(d, src_d)):
            rots += 1
            continue
        flips += flipped
        base = src_img.flip(-1) if flipped else src_img
        cols += not torch.allclose(item["image"], base, atol=1e-6)
    assert 0.3 < rots / n < 0.58
    kept = n - rots
    assert 0.3 < flips / kept < 0.7 and 0.3 < cols / kept < 0.7


def test_depth_train_rotation_keeps_the_image_uint8_and_the_depth_nearest():
    torch.manual_seed(2)
    aug = DepthAug(crop=(10, 12), p_rotate=1.0, p_flip=0.0, p_color=0.0)
    ds = DepthTrain(_Frames((10, 12)), aug, frame_hw=(10, 12), patch=2)
    item = ds[0]
    v = item["image"] * 255
    assert torch.allclose(v, v.round(), atol=1e-4)  # rounded back to uint8 values, as cv2's warpAffine on uint8
    d = item["depth"]
    src = set(np.round(ds.source.native_frame(0)[1].numpy().ravel(), 4).tolist()) | {0.0}
    assert set(np.round(d.numpy().ravel(), 4).tolist()) <= src  # nearest: only source values (or 0 outside)


def test_depth_train_refuses_a_frame_smaller_than_the_crop():
    from snd.errors import SndError

    ds = DepthTrain(_Frames((6, 9)), DepthAug(crop=(4, 6)), frame_hw=(6, 9), patch=7)
    ds.source.hw = (3, 9)
    with pytest.raises(SndError, match="smaller than the training crop"):
        ds[0]


def test_the_paper_crops_per_dataset():
    assert PAPER_DEPTH_AUG["nyuv2"].crop == (416, 544) and PAPER_DEPTH_AUG["kitti"].crop == (352, 704)
    assert PAPER_DEPTH_AUG["kitti"].brightness == (0.9, 1.1) and PAPER_DEPTH_AUG["scannetpp"].brightness == (0.75, 1.25)
    assert replace(PAPER_DEPTH_AUG["scannet"], crop=(1, 1)).degree == 2.5


@pytest.mark.parametrize("patch,img_hw", [(14, (364, 714)), (16, (352, 704))])
def test_paper_train_set_of_kitti_depth_is_the_live_pipeline(tmp_path, patch, img_hw):
    from snd.pipeline.config import EvalConfig
    from snd.stages.eval_plan import paper_train_set
    from tests.test_eval_protocol_sizes import write_kitti_frame

    write_kitti_frame(tmp_path)
    ds = paper_train_set(EvalConfig(data_root=tmp_path, protocol="paper"), "kitti", "depth", patch)
    assert isinstance(ds, DepthTrain) and ds.self_augmenting and ds.img_hw == img_hw and ds.crop_hw == (352, 704)
    item = ds[0]
    assert tuple(item["image"].shape) == (3, *img_hw) and tuple(item["depth"].shape) == (352, 704)
    assert set(item["depth"].unique().tolist()) <= {0.0, 2.0}  # 2 m everywhere, 0 where a turn reads outside
    assert ds.unaugmented().whole_frame  # the trivial baseline reads the un-augmented KB crops
    assert paper_train_set(EvalConfig(data_root=tmp_path, protocol="fast"), "kitti", "depth", patch) is None
