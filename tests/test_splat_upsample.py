"""Mask-aware / bilinear upsampling of patch features (snd.splat.upsample): the official corner-aligned
grid (default) and the "snd" patch-centred variant, each against hand-computed outputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from snd.splat.upsample import (label_rows, patch_centres, patch_labels, upsample_features,
                                upsample_features_reference)

C_ = dict(grid="centres")  # the "snd" variant's grid


def _blocky_mask(V: int, H: int, W: int, n_labels: int, seed: int) -> torch.Tensor:
    """Random coarse blobs plus isolated single-pixel labels (the hard cases)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, n_labels, (V, 1, max(1, H // 5), max(1, W // 5)), generator=g).float()
    m = F.interpolate(coarse, size=(H, W), mode="nearest")[:, 0].long()
    speck = torch.rand(V, H, W, generator=g) < 0.05
    return torch.where(speck, torch.randint(0, n_labels + 2, (V, H, W), generator=g), m)


def test_official_hand_computed_3x4_to_5x7_two_labels():
    """Corner-aligned grid: pixel y samples y * (h-1)/(H-1) = [0, .5, 1, 1.5, 2] (rows), x * 3/6 (cols); patch
    labels read at rows round(linspace(0, 4, 3)) = [0, 2, 4] and cols [0, 2, 4, 6]; zero where no neighbour
    matches."""
    feats = (10 * torch.arange(3.0)[:, None] + torch.arange(4.0)[None])[None, None]  # f[i, k] = 10 i + k
    mask = torch.ones(5, 7, dtype=torch.long)
    mask[:, 4:] = 2  # label 1 in cols 0-3, label 2 in cols 4-6
    mask[4, 6] = 3  # read as patch (2, 3)'s label (a corner row/col): that patch becomes label 3
    mask[1, 5] = 7  # a label no patch has: zero
    mask = mask[None]
    assert label_rows(3, 5, "corners").tolist() == [0, 2, 4] and label_rows(4, 7, "corners").tolist() == [0, 2, 4, 6]
    assert patch_labels(mask, 3, 4)[0].tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [1, 1, 2, 3]]
    expect = torch.tensor([
        [0.0, 0.5, 1.0, 1.0, 2.0, 2.5, 3.0],  # x = 3 (label 1) drops patch col 2 (label 2): 1, not 1.5
        [5.0, 5.5, 6.0, 6.0, 7.0, 0.0, 8.0],  # (1, 5) label 7: no neighbour matches -> 0
        [10.0, 10.5, 11.0, 11.0, 12.0, 12.5, 13.0],
        [15.0, 15.5, 16.0, 16.0, 17.0, 47.0 / 3.0, 13.0],  # (3, 5): (12 + 13 + 22) / 3; (3, 6): patch (2, 3) dropped
        [20.0, 20.5, 21.0, 21.0, 22.0, 22.0, 23.0],
    ])
    out = upsample_features(feats, mask)[0, 0]  # defaults: official (corners, zero fallback)
    torch.testing.assert_close(out, expect)
    torch.testing.assert_close(upsample_features_reference(feats, mask)[0, 0], expect)
    bil = upsample_features(feats, mask, mode="bilinear")[0, 0]
    torch.testing.assert_close(bil, 10 * torch.linspace(0, 2, 5)[:, None] + torch.linspace(0, 3, 7)[None])


def test_official_grid_is_align_corners_true():
    feats = torch.randn(2, 5, 7, 9)
    mask = torch.full((2, 41, 62), 3)
    ref = F.interpolate(feats, size=(41, 62), mode="bilinear", align_corners=True)
    torch.testing.assert_close(upsample_features(feats, mask, mode="mask"), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(upsample_features(feats, mask, mode="bilinear"), ref, atol=1e-5, rtol=1e-5)
    # 41 x 62 patches -> 576 x 880: label rows 0, 14, 29, ..., 575 (corners, not patch centres)
    rows = label_rows(41, 576, "corners")
    assert rows[:3].tolist() == [0, 14, 29] and int(rows[-1]) == 575


def test_hand_computed_2x2_to_4x4():
    # patch grid [[0, 4], [8, 12]]; align_corners=False taps per output row/col: (1,0), (.75,.25), (.25,.75), (0,1)
    feats = torch.tensor([[0.0, 4.0], [8.0, 12.0]])[None, None]  # [1, 1, 2, 2]
    mask = torch.tensor([[1, 1, 2, 2]] * 4)[None]  # left half label 1, right half label 2
    # patch centres sit at pixels 0.5 -> 1 and 2.5 -> 3: patch labels are [1, 2] in every row
    assert patch_centres(2, 4).tolist() == [1, 3]
    assert patch_labels(mask, 2, 2, "centres")[0].tolist() == [[1, 2], [1, 2]]
    bil = upsample_features(feats, mask, mode="bilinear", **C_)[0, 0]
    expect_bil = torch.tensor([[0.0, 1.0, 3.0, 4.0], [2.0, 3.0, 5.0, 6.0], [6.0, 7.0, 9.0, 10.0], [8.0, 9.0, 11.0, 12.0]])
    torch.testing.assert_close(bil, expect_bil)
    # mask-aware: columns 0-1 only see the left patch column, columns 2-3 only the right one
    out = upsample_features(feats, mask, mode="mask", **C_)[0, 0]
    expect = torch.tensor([[0.0, 0.0, 4.0, 4.0], [2.0, 2.0, 6.0, 6.0], [6.0, 6.0, 10.0, 10.0], [8.0, 8.0, 12.0, 12.0]])
    torch.testing.assert_close(out, expect)


def test_fallback_when_no_neighbour_matches():
    feats = torch.tensor([[0.0, 4.0], [8.0, 12.0]])[None, None]
    mask = torch.tensor([[1, 1, 2, 2]] * 4)[None].clone()
    mask[0, 2, 1] = 7  # a label no patch carries (pixel (2, 1) is no patch centre)
    bil = upsample_features(feats, mask, mode="bilinear", **C_)[0, 0]
    out_b = upsample_features(feats, mask, mode="mask", fallback="bilinear", **C_)[0, 0]
    out_z = upsample_features(feats, mask, mode="mask", fallback="zero", **C_)[0, 0]
    assert out_b[2, 1] == bil[2, 1] == 7.0
    assert out_z[2, 1] == 0.0
    keep = torch.ones(4, 4, dtype=torch.bool)
    keep[2, 1] = False
    torch.testing.assert_close(out_b[keep], out_z[keep])


def test_equals_plain_bilinear_for_constant_mask():
    feats = torch.randn(2, 5, 7, 9)
    mask = torch.full((2, 41, 62), 3)
    ref = F.interpolate(feats, size=(41, 62), mode="bilinear", align_corners=False)
    torch.testing.assert_close(upsample_features(feats, mask, mode="mask", **C_), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(upsample_features(feats, mask, mode="bilinear", **C_), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grid", ["corners", "centres"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_never_mixes_labels(seed, grid):
    """Features = one-hot of each patch's label: a pixel with a matching neighbour must get exactly its label."""
    V, h, w, H, W, L = 2, 5, 7, 23, 37, 4  # non-integer ratio, like 41x62 -> 576x880
    mask = _blocky_mask(V, H, W, L, seed)
    lab = patch_labels(mask, h, w, grid)  # [V, h, w]
    n_lab = int(mask.max()) + 1
    onehot = F.one_hot(lab, n_lab).permute(0, 3, 1, 2).float()  # [V, L', h, w]
    out = upsample_features(onehot, mask, mode="mask", fallback="zero", grid=grid)  # [V, L', H, W]
    total = out.sum(1)  # 1 where some neighbour matched, 0 where none did
    matched = total > 0.5
    assert matched.float().mean() > 0.6  # the property is checked on most pixels
    got = out.argmax(1)
    assert torch.equal(got[matched], mask[matched])
    own = out.gather(1, mask[:, None].clamp_max(n_lab - 1))[:, 0]
    torch.testing.assert_close(own[matched], torch.ones_like(own[matched]))  # no weight on other labels
    assert torch.all(total[~matched] == 0)


@pytest.mark.parametrize("grid", ["corners", "centres"])
@pytest.mark.parametrize("mode", ["mask", "bilinear"])
@pytest.mark.parametrize("fallback", ["bilinear", "zero"])
def test_fast_equals_reference(mode, fallback, grid):
    V, C, h, w, H, W = 2, 3, 3, 4, 11, 13  # corner positions y / 5, x / 4: the integer ones land exactly in float32
    feats = torch.randn(V, C, h, w, generator=torch.Generator().manual_seed(3))
    mask = _blocky_mask(V, H, W, 3, seed=4)
    fast = upsample_features(feats, mask, mode=mode, fallback=fallback, grid=grid, channel_chunk=2)
    ref = upsample_features_reference(feats, mask, mode=mode, fallback=fallback, grid=grid)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        upsample_features(torch.zeros(1, 1, 2, 2), torch.zeros(1, 4, 4, dtype=torch.long), mode="nearest")
