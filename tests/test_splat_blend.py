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
