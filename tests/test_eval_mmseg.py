"""The paper protocol's segmentation rules (`snd.eval.mmseg`) against hand-computed cases: mmcv's keep-ratio
rescale, mmseg's sliding windows and their count-normalised merge, RandomCrop's cat_max_ratio, the
photometric distortion's HSV arithmetic, the training sample's padding, and the slide test end to end."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from snd.eval.datasets.base import RawSample
from snd.eval.mmseg import (MmsegTest, MmsegTrain, cat_max_crop, crop_box, hsv_to_rgb_u8, photometric_distortion,
                            rescale_size, rgb_to_hsv_u8, slide_logits, slide_merge, slide_windows)
from snd.eval.protocol import IMAGENET_MEAN


# ---- test-time resize: mmcv rescale_size with img_scale (2048, 512) ---------------------------------------
def test_rescale_size_short_side_512_and_long_side_cap():
    # 480x640: factor min(2048/640, 512/480) = 1.0667; width int(640 * 1.0667 + 0.5) = int(683.33 + 0.5) = 683
    assert rescale_size(480, 640) == (512, 683)
    assert rescale_size(640, 480) == (683, 512)  # portrait: the short side is the width
    assert rescale_size(375, 500) == (512, 683)  # VOC-like: 512/375 = 1.3653; 500 * 1.3653 = 682.67 -> 683
    # 100x1000: the long side binds (2048/1000 = 2.048 < 5.12): 204.8 -> 205 rows, 2048 columns
    assert rescale_size(100, 1000) == (205, 2048)
    # training: ratio 0.5 -> scale (1024, 256): 480x640 -> factor 256/480 -> 256 x int(341.33 + 0.5) = 341
    assert rescale_size(480, 640, (1024, 256)) == (256, 341)


# ---- sliding windows -----------------------------------------------------------------------------------
def test_slide_windows_512x700_stride_341_by_hand():
    # rows: max(512 - 512 + 340, 0) // 341 + 1 = 1; columns: (700 - 512 + 340) // 341 + 1 = 528 // 341 + 1 = 2
    # second window: x1 = 341, x2 = min(853, 700) = 700, x1 = max(700 - 512, 0) = 188
    assert slide_windows(512, 700) == [(0, 512, 0, 512), (0, 512, 188, 700)]
    # 512x683 (a 4:3 image at short side 512): (683 - 512 + 340) // 341 + 1 = 2 windows, the second at 171
    assert slide_windows(512, 683) == [(0, 512, 0, 512), (0, 512, 171, 683)]
    # 1200 columns: (1200 - 512 + 340) // 341 + 1 = 4: x1 = 0, 341, 682, then 1023 -> shifted back to 688
    assert [b[2:] for b in slide_windows(512, 1200)] == [(0, 512), (341, 853), (682, 1194), (688, 1200)]
    # a side shorter than the crop: one smaller window ("decode without padding")
    assert slide_windows(205, 2048)[0] == (0, 205, 0, 512) and len(slide_windows(205, 2048)) == 6


def test_slide_merge_divides_by_the_window_count():
    # 1x5 image, windows of 3 columns at stride 2: (0, 3) and (2, 5); column 2 is covered twice
    boxes = slide_windows(1, 5, crop=(1, 3), stride=(1, 2))
    assert boxes == [(0, 1, 0, 3), (0, 1, 2, 5)]
    a = torch.tensor([1.0, 1.0, 1.0]).view(1, 1, 1, 3)
    b = torch.tensor([3.0, 5.0, 7.0]).view(1, 1, 1, 3)
    out = slide_merge([a, b], boxes, (1, 5))
    assert out.flatten().tolist() == [1.0, 1.0, 2.0, 5.0, 7.0]  # (1 + 3) / 2 at column 2


# ---- RandomCrop(cat_max_ratio=0.75) ----------------------------------------------------------------------
def _draws(*boxes):
    it = iter(boxes)
    return lambda: next(it)


def test_cat_max_ratio_rejects_single_class_and_dominant_crops():
    seg = torch.tensor([[0, 0, 1, 1],
                        [0, 0, 1, 2],
                        [0, 0, 255, 255],
                        [0, 0, 255, 255]])
    only0, mixed, three_to_one, ignored = (0, 2, 0, 2), (0, 2, 1, 3), (0, 2, 2, 4), (2, 4, 2, 4)
    # a crop of class 0 only (one class) is redrawn; the 0/1 half-half crop (max share 1/2 < 3/4) is kept
    assert cat_max_crop(seg, _draws(only0, mixed)) == mixed
    # 1,1,1,2: share 3/4 is not < 0.75 -> redrawn; an all-ignore crop has no class -> redrawn
    assert cat_max_crop(seg, _draws(three_to_one, ignored, mixed)) == mixed
    # ten rejections: the 11th draw is kept unchecked
    assert cat_max_crop(seg, _draws(*([only0] * 10 + [ignored]))) == ignored
    # ratio 1 (the transform's default): the first draw, no check
    assert cat_max_crop(seg, _draws(only0), ratio=1.0) == only0


def test_crop_box_offsets_stay_inside_and_pass_small_sides():
    g = torch.Generator().manual_seed(0)
    boxes = [crop_box(600, 700, (512, 512), g) for _ in range(200)]
    assert all(0 <= y1 <= 88 and y2 == y1 + 512 and 0 <= x1 <= 188 and x2 == x1 + 512 for y1, y2, x1, x2 in boxes)
    assert {b[0] for b in boxes} >= {0} and max(b[2] for b in boxes) > 150  # the whole range is drawn
    assert crop_box(256, 341, (512, 512), g) == (0, 512, 0, 512)  # smaller image: the crop is the image


# ---- PhotoMetricDistortion's colour arithmetic ----------------------------------------------------------
def _px(*rgb):
    return torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1)


def test_hsv_u8_by_hand_and_round_trip():
    assert rgb_to_hsv_u8(_px(255, 0, 0)).flatten().tolist() == [0, 255, 255]
    assert rgb_to_hsv_u8(_px(0, 255, 0)).flatten().tolist() == [60, 255, 255]  # 120 degrees / 2
    assert rgb_to_hsv_u8(_px(0, 0, 255)).flatten().tolist() == [120, 255, 255]
    assert rgb_to_hsv_u8(_px(128, 128, 128)).flatten().tolist() == [0, 0, 128]
    # (200, 100, 50): V 200, S round(255 * 150 / 200) = 191, H = (100 - 50) / 150 * 60 = 20 degrees -> 10
    assert rgb_to_hsv_u8(_px(200, 100, 50)).flatten().tolist() == [10, 191, 200]
    # saturation halved on pure red: S = floor(127.5) = 127 -> G = B = round(255 * (1 - 127/255)) = 128
    hsv = rgb_to_hsv_u8(_px(255, 0, 0))
    hsv[1] = (hsv[1] * 0.5).floor()
    assert hsv_to_rgb_u8(hsv).flatten().tolist() == [255, 128, 128]
    # hue + 60 (120 degrees) turns red into green
    hsv = rgb_to_hsv_u8(_px(255, 0, 0))
    hsv[0] = (hsv[0] + 60) % 180
    assert hsv_to_rgb_u8(hsv).flatten().tolist() == [0, 255, 0]
    # round trip of random uint8 colours (OpenCV's 8-bit HSV loses the same): H is kept to 2 degrees, so a
    # channel moves by at most 255 * 1/60 (half a step) + 1 (rounding) = 5.25 levels
    img = torch.randint(0, 256, (3, 32, 32), generator=torch.Generator().manual_seed(0)).float()
    err = (hsv_to_rgb_u8(rgb_to_hsv_u8(img)) - img).abs()
    assert err.max() <= 5 and err.mean() < 1


def test_photometric_distortion_keeps_uint8_levels_and_is_sometimes_identity():
    img = torch.randint(0, 256, (3, 8, 8), generator=torch.Generator().manual_seed(1)).float()
    outs = [photometric_distortion(img, torch.Generator().manual_seed(s)) for s in range(40)]
    assert all(bool(((o == o.round()) & (o >= 0) & (o <= 255)).all()) for o in outs)
    changed = sum(not torch.equal(o, img) for o in outs)
    # every one of the four steps is skipped with p 0.5: P(identity) = 1/16
    assert 25 <= changed < 40


# ---- the datasets --------------------------------------------------------------------------------------
class _Source(torch.utils.data.Dataset):
    """A native 240x320 image (colour = class) with labels 0 | 1 | 255, as `ProbeDataset.load` gives."""

    name = "toy"

    def __len__(self):
        return 3

    def load(self, i):
        seg = np.zeros((240, 320), np.int64)
        seg[:, 160:] = 1
        seg[:20] = 255
        img = np.where(seg[..., None] == 1, 200, 40).astype(np.uint8).repeat(3, -1)
        return RawSample(image=img, id=str(i), seg=seg)


def test_training_sample_is_512_padded_to_518_with_ignore_padding():
    torch.manual_seed(0)
    ds = MmsegTrain(_Source())
    assert ds.img_hw == (518, 518) and ds.self_augmenting
    seen_small, n = False, 0
    while not seen_small or n < 2:  # P(rows < 512) = P(ratio < 1) = 1/3 per draw
        it, n = ds[0], n + 1
        assert n < 20
        assert it["image"].shape == (3, 518, 518) and it["seg"].shape == (512, 512)
        mean = torch.tensor(IMAGENET_MEAN)
        assert torch.allclose(it["image"][:, :3, :].permute(1, 2, 0), mean.expand(3, 518, 3), atol=1e-6)  # centre pad
        seg = it["seg"]
        assert set(seg.unique().tolist()) <= {0, 1, 255}
        # an image rescaled below 512 (ratio < ~1.07 for 240 rows) leaves label 255 and the mean colour at the
        # bottom rows: 240 * factor rows of data, the rest padding
        if bool((seg[-1] == 255).all()):
            seen_small = True
            assert torch.allclose(it["image"][:, 3 + 511, 3:515].T, mean.expand(512, 3), atol=1e-6)


def test_test_sample_rescales_the_image_and_keeps_the_native_labels():
    it = MmsegTest(_Source())[0]
    assert it["image"].shape == (3, 512, 683) and it["seg"].shape == (240, 320)
    assert float(it["image"].max()) <= 1.0


def test_slide_logits_equal_a_hand_merge_of_live_windows():
    from snd.eval.features import extract_tokens, final_norm_params
    from snd.eval.probes import SegProbe
    from snd.models.backbone import create_backbone

    torch.manual_seed(0)
    net = create_backbone("snd_test_vit_patch14", init="random").eval()
    norm = final_norm_params(net)
    dim = norm["weight"].numel()
    probe = SegProbe(dim, num_classes=3).eval()
    image = torch.rand(1, 3, 30, 40)
    crop, stride = (28, 28), (20, 20)  # windows (0,28,0,28), (0,28,12,40) and (2,30,...): 4 windows
    out = slide_logits(probe, net, image, norm, crop=crop, stride=stride)
    boxes = slide_windows(30, 40, crop, stride)
    assert boxes == [(0, 28, 0, 28), (0, 28, 12, 40), (2, 30, 0, 28), (2, 30, 12, 40)]
    acc, cnt = torch.zeros(1, 3, 30, 40), torch.zeros(30, 40)
    for y1, y2, x1, x2 in boxes:  # 28 is a multiple of 14: no padding, a 2x2 grid
        tok = extract_tokens(net, image[..., y1:y2, x1:x2])
        lg = probe(probe.prepare(tok, (2, 2), norm))
        acc[..., y1:y2, x1:x2] += torch.nn.functional.interpolate(lg, size=(28, 28), mode="bilinear")
        cnt[y1:y2, x1:x2] += 1
    assert torch.allclose(out, acc / cnt, atol=1e-5)
    assert cnt.max() == 4 and cnt.min() == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_slide_logits_on_cuda_equal_cpu():
    from snd.eval.features import final_norm_params
    from snd.eval.probes import SegProbe
    from snd.models.backbone import create_backbone

    torch.manual_seed(0)
    net = create_backbone("snd_test_vit_patch14", init="random").eval()
    norm = final_norm_params(net)
    probe = SegProbe(norm["weight"].numel(), num_classes=5).eval()
    image = torch.rand(1, 3, 512, 683)  # a 4:3 frame at short side 512: two 512x512 windows padded to 518
    cpu = slide_logits(probe, net, image, norm)
    gpu = slide_logits(probe.cuda(), net.cuda(), image.cuda(), {k: v.cuda() for k, v in norm.items()})
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-3, rtol=1e-3)


def test_the_training_crop_is_resized_only_inside_its_window():
    """`_resize_u8_window` = the whole bilinear resize, then the crop (clipped at the border), to one uint8 level
    (float summation order), and exactly equal on all but a few pixels; a box past the border is clipped."""
    from snd.eval.mmseg import _resize_u8, _resize_u8_window

    g = torch.Generator().manual_seed(0)
    differ = total = 0
    for H, W, h, w, box in ((300, 420, 700, 980, (100, 612, 300, 812)),  # upscale
                            (640, 480, 400, 300, (0, 512, 0, 512)),  # downscale, box past both borders
                            (375, 500, 512, 683, (0, 512, 171, 683))):
        img = torch.randint(0, 256, (3, H, W), generator=g).float()
        want = _resize_u8(img, (h, w))[:, box[0]:box[1], box[2]:box[3]]
        got = _resize_u8_window(img, (h, w), box)
        assert got.shape == want.shape and (got - want).abs().max() <= 1
        differ, total = differ + int((got != want).sum()), total + want.numel()
    assert differ < 1e-4 * total
    same = torch.randint(0, 256, (3, 40, 50), generator=g).float()
    assert torch.equal(_resize_u8_window(same, (40, 50), (10, 522, 5, 517)), same[:, 10:, 5:])
