"""The paper protocol's live training sets split into a worker part and a batched `device_augment`: the split
gives per item the numbers the previous per-item pipeline gave (kept here as the reference, written from the
pure functions `rotate`, `color_aug`, `photometric_distortion`, `augment_geonet` that their own tests check),
for the same random draws, on batches mixing items with and without every transform."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from snd.eval.depth_aug import DepthAug, DepthTrain, _uniform, color_aug, rotate, rotation_grid
from snd.eval.protocol import IMAGENET_MEAN, center_pad

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


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
        grid = rotation_grid(d.shape[-2:], degree)
        img = torch.floor(rotate(img, degree, "bilinear", grid) + 0.5).clamp(0, 255)
        d = rotate(d, degree, "nearest", grid)
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
    ds = _depth_set(10.0)
    torch.manual_seed(4)
    batch = default_collate([ds.worker_item(i % 6) for i in range(16)])
    cpu = ds.device_augment(batch)
    gpu = ds.device_augment({k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()})
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
