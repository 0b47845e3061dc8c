"""Semantic blending (snd.splat.blend)."""
from __future__ import annotations

import torch

from snd.splat.blend import semantic_blend, semantic_blend_reference


def test_toy_mask_hand_computed():
    feats = torch.tensor([[[1.0, 3.0, 10.0], [5.0, 20.0, 30.0]]])  # [1, 2, 3]
    mask = torch.tensor([[1, 1, 2], [0, 2, 2]])
    # label 1 mean 2, label 2 mean 20, label 0 (blended too, as officially) mean 5
    out = semantic_blend(feats, mask, weight=0.5)
    expect = torch.tensor([[[1.5, 2.5, 15.0], [5.0, 20.0, 25.0]]])
    torch.testing.assert_close(out, expect)
    # weight 1 = segment mean, weight 0 = identity
    torch.testing.assert_close(semantic_blend(feats, mask, weight=1.0),
                               torch.tensor([[[2.0, 2.0, 20.0], [5.0, 20.0, 20.0]]]))
    torch.testing.assert_close(semantic_blend(feats, mask, weight=0.0), feats)


def test_valid_restricts_means():
    feats = torch.tensor([[[1.0, 3.0, 10.0], [5.0, 20.0, 30.0]]])
    mask = torch.tensor([[1, 1, 2], [0, 2, 2]])
    valid = torch.tensor([[True, True, True], [False, False, True]])
    # label 2 mean over valid pixels = (10 + 30) / 2 = 20 (the uncovered 20 left out; same here by design)
    # label 0 has no valid pixel -> unchanged
    feats[0, 1, 1] = 0.0  # uncovered pixel rendered as 0: must not drag label 2's mean
    out = semantic_blend(feats, mask, weight=0.5, valid=valid)
    expect = torch.tensor([[[1.5, 2.5, 15.0], [5.0, 10.0, 25.0]]])
    torch.testing.assert_close(out, expect)


def test_matches_reference_loop():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(6, 17, 23, generator=g)
    mask = torch.randint(0, 5, (17, 23), generator=g)
    valid = torch.rand(17, 23, generator=g) > 0.3
    torch.testing.assert_close(semantic_blend(feats, mask), semantic_blend_reference(feats, mask))
    torch.testing.assert_close(semantic_blend(feats, mask, weight=0.3, valid=valid),
                               semantic_blend_reference(feats, mask, weight=0.3, valid=valid))


def test_official_means_over_all_pixels_uncovered_zeros_included():
    """Official blend_with_mask: the segment mean runs over ALL pixels of a label; uncovered pixels render
    exactly 0 and pull the mean toward 0; label 0 is a segment. (2 x 3, two labels + label 0.)"""
    feats = torch.tensor([[[2.0, 4.0, 0.0], [6.0, 0.0, 3.0]]])  # zeros = uncovered
    mask = torch.tensor([[0, 0, 1], [1, 1, 1]])
    # label 0: (2 + 4) / 2 = 3; label 1: (0 + 6 + 0 + 3) / 4 = 2.25; out = 0.5 F + 0.5 mean
    expect = torch.tensor([[[2.5, 3.5, 1.125], [4.125, 1.125, 2.625]]])
    torch.testing.assert_close(semantic_blend(feats, mask), expect)
    # the "snd" variant: means over covered pixels only (label 1: (6 + 3) / 2 = 4.5)
    covered = feats[0] != 0
    expect_snd = torch.tensor([[[2.5, 3.5, 2.25], [5.25, 2.25, 3.75]]])
    torch.testing.assert_close(semantic_blend(feats, mask, valid=covered), expect_snd)
