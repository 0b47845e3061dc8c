"""The paper protocol's live training sets split into a worker part and a batched `device_augment`: the split
gives per item the numbers the previous per-item pipeline gave (kept here as the reference, written from the
pure functions `rotate`, `color_aug`, `photometric_distortion`, `augment_geonet` that their own tests check),
for the same random draws, on batches mixing items with and without every transform."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from snd.eval.depth_aug import DepthAug, DepthTrain, _uniform, color_aug, rotate
from snd.eval.protocol import IMAGENET_MEAN, center_pad

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _augment_on_cpu_and_cuda(ds, n_items: int, n_frames: int, seed: int) -> tuple[dict, dict]:
    """One batch of `ds`'s worker items (frames reused in turn), augmented by `device_augment` on the CPU and on
    CUDA from the same draws: (cpu result, cuda result)."""
    torch.manual_seed(seed)
    batch = default_collate([ds.worker_item(i % n_frames) for i in range(n_items)])
    on_gpu = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    return ds.device_augment(batch), ds.device_augment(on_gpu)


class _Frames:
    """A whole-frame source of random uint8 images and depths (0 holes included)."""

    name = "frames"

    def __init__(self, hw, n=6, seed=0):
        rng = np.random.default_rng(seed)
        self.images = [rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for _ in range(n)]
        self.depths = [torch.from_numpy(np.where(rng.random(hw) < 0.1, 0, rng.uniform(0.5, 9, hw)).astype(np.float32))
                       for _ in range(n)]

    def __len__(self):
        return len(self.images)

    def native_frame(self, index):
        return self.images[index], self.depths[index], f"f{index}"


def _old_depth_item(ds: DepthTrain, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-item pipeline `DepthTrain.__getitem__` ran before the split (same draws, same order)."""
    image, depth, _ = ds.source.native_frame(index)
    h, w = ds.crop_hw
    img = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).float()
    d = torch.as_tensor(np.asarray(depth), dtype=torch.float32).clone()[None]
    a = ds.aug
    rot, degree = float(torch.rand(())) < a.p_rotate, _uniform(-a.degree, a.degree)
    if rot:
        img = torch.floor(rotate(img, degree, "bilinear") + 0.5).clamp(0, 255)
        d = rotate(d, degree, "nearest")
    if float(torch.rand(())) < a.p_flip:
        img, d = img.flip(-1), d.flip(-1)
    top = int(torch.randint(0, d.shape[-2] - h + 1, ()))
    left = int(torch.randint(0, d.shape[-1] - w + 1, ()))
    img, d = img[:, top : top + h, left : left + w], d[0, top : top + h, left : left + w]
    if float(torch.rand(())) < a.p_color:
        gamma, bright = _uniform(*a.gamma), _uniform(*a.brightness)
        img = color_aug(img, gamma, bright, _uniform(*a.color, 3))
    return center_pad((img / 255)[None], ds.patch, torch.tensor(IMAGENET_MEAN))[0], d


def _depth_set(degree=2.5):
    return DepthTrain(_Frames((30, 41)), DepthAug(crop=(20, 28), degree=degree), frame_hw=(30, 41), patch=7)


@pytest.mark.parametrize("degree", [2.5, 40.0])  # the paper's turns, and large ones (many border and tap cases)
def test_depth_device_augment_equals_the_per_item_pipeline_on_a_mixed_batch(degree):
    ds = _depth_set(degree)
    idx = [0, 1, 2, 3, 4, 5, 0, 3, 1, 2, 5, 4]
    torch.manual_seed(3)
    want = [_old_depth_item(ds, i) for i in idx]
    torch.manual_seed(3)
    batch = default_collate([ds.worker_item(i) for i in idx])
    aug = batch["aug"]
    colour = ~(batch["lut"] == torch.arange(256.0)).all(-1).all(-1)
    for flags in (aug[:, 0] > 0, aug[:, 1] > 0, colour):  # the batch mixes items with and without each transform
        assert 0 < int(flags.sum()) < len(idx)
    out = ds.device_augment(batch)
    assert out["image"].shape == (len(idx), 3, *ds.img_hw) and out["depth"].shape == (len(idx), *ds.crop_hw)
    for k, (img, d) in enumerate(want):
        assert torch.equal(out["image"][k], img) and torch.equal(out["depth"][k], d), k
    torch.manual_seed(3)  # `dataset[i]` is the same pipeline for one item
    assert all(torch.equal(ds[i]["image"], want[k][0]) for k, i in enumerate(idx[:4]))


def test_depth_worker_refuses_a_frame_of_another_size():
    from snd.errors import SndError

    ds = DepthTrain(_Frames((30, 41)), DepthAug(crop=(20, 28)), frame_hw=(30, 40), patch=7)
    with pytest.raises(SndError, match="not the set's native 30x40"):
        ds.worker_item(0)


@pytest.mark.gpu
@cuda
def test_depth_device_augment_on_cuda_matches_cpu():
    cpu, gpu = _augment_on_cpu_and_cuda(_depth_set(10.0), 16, 6, seed=4)
    # grid_sample's float32 sample positions may differ in the last bit between devices: a rounded uint8 level
    # can flip by one where a bilinear value sits at .5 (ColorAug's table then maps it up to ~3 levels apart), a
    # nearest tap where a position sits at .5
    diff = (gpu["image"].cpu() - cpu["image"]).abs()
    assert diff.max() <= 4 / 255 and (diff > 1e-6).float().mean() < 1e-3
    assert (gpu["depth"].cpu() != cpu["depth"]).float().mean() < 1e-3


def test_probe_data_passes_worker_items_of_a_live_set_and_keeps_the_cached_path():
    from snd.eval.probes.data import ProbeData

    ds = _depth_set()
    live = ProbeData(ds, [0, 1], "depth")  # no token store: the live path, whose batches `device_augment` finishes
    assert live.deferred and set(live[0]) == {"depth", "image", "aug", "theta", "lut", "row"}
    assert live[0]["image"].dtype == torch.uint8 and live[0]["depth"].shape == (30, 41) and not live._mem
    ds.self_augmenting = False  # a set that does not augment itself (GeoNet's `unaugmented()`) is read whole
    assert not ProbeData(ds, [0, 1], "depth").deferred


class _SegSource:
    """Random images of two sizes, labels of a few blobs (so `cat_max_crop` accepts or redraws)."""

    name = "segsrc"

    def __init__(self, n=5, seed=0):
        rng = np.random.default_rng(seed)
        self.samples = []
        for i in range(n):
            H, W = (120, 170) if i % 2 else (200, 150)
            lab = (np.arange(H)[:, None] // 40 + np.arange(W)[None] // 60 * (i % 3)).astype(np.int64) % 5
            lab[rng.random((H, W)) < 0.05] = 255
            self.samples.append((rng.integers(0, 256, (H, W, 3), dtype=np.uint8), lab))

    def __len__(self):
        return len(self.samples)

    def load(self, index):
        from snd.eval.datasets.base import RawSample

        img, seg = self.samples[index]
        return RawSample(image=img, id=f"s{index}", seg=seg)


def _old_seg_item(ds, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-item pipeline `MmsegTrain.__getitem__` ran before the split (same draws, same order)."""
    from snd.eval.mmseg import (CROP, IGNORE, RATIO_RANGE, SCALE, _raw, _resize_labels, _resize_u8_window, cat_max_crop,
                                crop_box, photometric_distortion, rescale_size)

    img, seg = _raw(ds.source, index)
    ratio = RATIO_RANGE[0] + float(torch.rand((), dtype=torch.float64)) * (RATIO_RANGE[1] - RATIO_RANGE[0])
    hw = rescale_size(*img.shape[-2:], (int(SCALE[0] * ratio), int(SCALE[1] * ratio)))
    seg = _resize_labels(seg, hw)
    y1, y2, x1, x2 = box = cat_max_crop(seg, lambda: crop_box(hw[0], hw[1]))
    img, seg = _resize_u8_window(img, hw, box), seg[y1:y2, x1:x2]
    if float(torch.rand(())) < 0.5:
        img, seg = img.flip(-1), seg.flip(-1)
    img = photometric_distortion(img) / 255
    h, w = seg.shape
    padded = torch.tensor(IMAGENET_MEAN).view(3, 1, 1).expand(3, *CROP).clone()
    padded[:, :h, :w] = img
    label = torch.full(CROP, IGNORE, dtype=torch.long)
    label[:h, :w] = seg
    return center_pad(padded[None], ds.patch, torch.tensor(IMAGENET_MEAN))[0], label


def test_seg_device_augment_equals_the_per_item_pipeline_on_a_mixed_batch():
    from snd.eval.mmseg import MmsegTrain
    from snd.eval.mmseg_device import PHOTO_PARAMS

    ds = MmsegTrain(_SegSource(), patch=14)
    idx = [0, 1, 2, 3, 4, 1, 0, 3, 2, 4, 0, 1, 2, 3, 4, 2]
    torch.manual_seed(5)
    want = [_old_seg_item(ds, i) for i in idx]
    torch.manual_seed(5)
    batch = default_collate([ds.worker_item(i) for i in idx])
    aug = batch["aug"]
    assert 0 < int(aug[:, 0].sum()) < len(idx) and 0 < int((aug[:, 1] < 512).sum()) < len(idx)  # flips, small windows
    for name in ("bright_on", "contrast_first", "contrast_on", "sat_on", "hue_on"):  # every step: some items, not all
        assert 0 < int(aug[:, 3 + PHOTO_PARAMS.index(name)].sum()) < len(idx), name
    out = ds.device_augment(batch)
    assert out["image"].shape == (len(idx), 3, 518, 518) and out["seg"].shape == (len(idx), 512, 512)
    for k, (img, seg) in enumerate(want):
        assert torch.equal(out["image"][k], img) and torch.equal(out["seg"][k], seg), k


@pytest.mark.gpu
@cuda
def test_seg_device_augment_on_cuda_matches_cpu():
    from snd.eval.mmseg import MmsegTrain

    cpu, gpu = _augment_on_cpu_and_cuda(MmsegTrain(_SegSource(), patch=14), 12, 5, seed=6)
    # the same IEEE float32 steps on both devices: equal but where a value rounded to a uint8 level sits at .5 and
    # the devices' last bits differ; a hue one level (2 degrees) off then moves a saturated pixel by up to ~8 levels
    diff = (gpu["image"].cpu() - cpu["image"]).abs()
    assert diff.max() <= 10 / 255 and (diff > 1e-6).float().mean() < 1e-3
    assert torch.equal(gpu["seg"].cpu(), cpu["seg"])


def _old_geonet_item(ds, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-item `GeoNetNYU.__getitem__` before the split: `augment_geonet` on the loaded square."""
    from snd.eval.datasets.geonet import augment_geonet

    image, depth, norm = ds.load(index)
    img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255
    d, n = torch.from_numpy(np.ascontiguousarray(depth)), torch.from_numpy(np.ascontiguousarray(norm)).permute(2, 0, 1)
    if ds.augment:
        img, d, n = augment_geonet(img, d, n)
    n = torch.where((d > 0)[None], n, torch.full_like(n, float("nan")))
    return center_pad(img[None], ds.patch, torch.tensor(IMAGENET_MEAN))[0], n


@pytest.fixture(scope="module")
def geonet(tmp_path_factory):
    from snd.eval.datasets.geonet import GeoNetNYU, write_geonet_standin

    return GeoNetNYU(write_geonet_standin(tmp_path_factory.mktemp("geonet") / "nyuv2_geonet", 4, hw=(45, 60)), patch=7)


def test_geonet_device_augment_equals_augment_geonet_on_a_mixed_batch(geonet):
    ds, idx = geonet, [0, 1, 2, 3] * 5
    torch.manual_seed(7)
    want = [_old_geonet_item(ds, i) for i in idx]
    torch.manual_seed(7)
    batch = default_collate([ds.worker_item(i) for i in idx])
    aug = batch["aug"]
    jit, crop = aug[:, 0] > 0, aug[:, 11] < 45
    assert 0 < int(jit.sum()) < len(idx) and 0 < int(crop.sum()) < len(idx)  # with and without each transform
    assert len({tuple(o) for o in aug[jit, 1:5].tolist()}) > 3  # ColorJitter's orders differ between items
    out = ds.device_augment(batch)
    assert out["image"].shape == (len(idx), 3, 49, 49) and out["normals"].shape == (len(idx), 3, 45, 45)
    for k, (img, n) in enumerate(want):
        # exact but for float32 summation order: ColorJitter's contrast mean over a batch vs one image
        assert torch.allclose(out["image"][k], img, atol=1e-6, rtol=0), k
        assert torch.equal(out["normals"][k].isnan(), n.isnan()) and torch.equal(out["normals"][k].nan_to_num(), n.nan_to_num())
    plain = ds.unaugmented()  # the trivial baseline's set: the frame itself, unchanged by the split
    img, n = _old_geonet_item(plain, 2)
    assert torch.equal(plain[2]["image"], img) and torch.equal(plain[2]["normals"].nan_to_num(), n.nan_to_num())


@pytest.mark.gpu
@cuda
def test_geonet_device_augment_on_cuda_matches_cpu(geonet):
    cpu, gpu = _augment_on_cpu_and_cuda(geonet, 12, 4, seed=8)
    assert torch.allclose(gpu["image"].cpu(), cpu["image"], atol=1e-5, rtol=0)  # float32 formulas, no rounding
    assert torch.equal(gpu["normals"].cpu().nan_to_num(), cpu["normals"].nan_to_num())
