"""The per-pair transfer operator (snd.splat.operator) equals the render path it replaces."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from snd.splat.from_depth import gaussians_from_depth
from snd.splat.operator import apply_operator, build_operator, stack_operators
from snd.splat.target import target_features
from tests.test_splat_target import _planes_scene

H, W = 48, 64
CTX_HW = (6, 8)  # teacher grid of the context views (their own size; need not divide H, W)
OUT_HW = (5, 7)  # student grid of the target view


@pytest.fixture(scope="module")
def pair():
    cams, depth, ids = _planes_scene([(-0.35, -1.0, 1.3), (0.35, -1.0, 1.3), (0.0, -2.2, 1.6)])
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    K = torch.stack([t(c.K) for c in cams])
    c2w = torch.stack([t(c.c2w) for c in cams])
    w2c = torch.stack([t(c.w2c) for c in cams])
    g = gaussians_from_depth(t(depth[:2]), K[:2], c2w[:2], scale_mult=0.7, opacity=0.9)
    ids = torch.as_tensor(ids)
    return {"g": g, "ctx_masks": ids[:2], "tgt_mask": ids[2], "K": K[2], "w2c": w2c[2]}


def _both(pair, feats, **kw):
    ref, ref_valid = target_features(feats, pair["g"], pair["ctx_masks"], pair["tgt_mask"], pair["K"], pair["w2c"],
                                     OUT_HW, backend="torch", **kw)
    op = build_operator(pair["g"], pair["ctx_masks"], pair["tgt_mask"], pair["K"], pair["w2c"], CTX_HW, OUT_HW, **kw)
    got, valid = apply_operator(op, feats, OUT_HW)
    return ref, ref_valid, got, valid, op


@pytest.mark.parametrize("protocol", ["official", "snd"])
@pytest.mark.parametrize("kw", [dict(), dict(blend=False), dict(upsample="bilinear"), dict(blend_weight=0.3)])
def test_operator_equals_render_path(pair, kw, protocol):
    kw = dict(kw, protocol=protocol)
    torch.manual_seed(0)
    feats = torch.randn(2, 5, *CTX_HW, dtype=torch.float64).float()
    ref, ref_valid, got, valid, op = _both(pair, feats, **kw)
    assert float(op.dropped_direct) == 0.0 and float(op.dropped_inst) == 0.0
    assert int(op.max_row_nnz) <= op.cols.shape[1]
    assert torch.equal(valid, ref_valid) and valid.any() and not valid.all()
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    # the operator is not trivially zero: targets move with the features
    assert ref.abs().max() > 0.1


def test_operator_is_linear_and_batched(pair):
    torch.manual_seed(1)
    f1, f2 = torch.randn(2, 2, 3, *CTX_HW)
    op = build_operator(pair["g"], pair["ctx_masks"], pair["tgt_mask"], pair["K"], pair["w2c"], CTX_HW, OUT_HW)
    a, _ = apply_operator(op, f1, OUT_HW)
    b, _ = apply_operator(op, f2, OUT_HW)
    ab, _ = apply_operator(op, 2 * f1 - f2, OUT_HW)
    torch.testing.assert_close(ab, 2 * a - b, atol=1e-5, rtol=1e-5)
    batched, v = apply_operator(stack_operators([op, op]), torch.stack([f1, f2]), OUT_HW)
    torch.testing.assert_close(batched, torch.stack([a, b]))
    assert v.shape == (2, *OUT_HW)


def test_operator_caps_report_what_they_drop(pair):
    torch.manual_seed(2)
    feats = torch.randn(2, 4, *CTX_HW)
    full = build_operator(pair["g"], pair["ctx_masks"], pair["tgt_mask"], pair["K"], pair["w2c"], CTX_HW, OUT_HW)
    n = int(full.max_row_nnz)
    assert n > 2
    small = build_operator(pair["g"], pair["ctx_masks"], pair["tgt_mask"], pair["K"], pair["w2c"], CTX_HW, OUT_HW,
                           row_cap=2, inst_cap=1)
    assert small.cols.shape[1] == 2 and small.inst.shape[0] == 1
    assert 0 < float(small.dropped_direct) < 1 and 0 < float(small.dropped_inst) < 1
    # kept coefficients are the largest of each row
    ref, _ = apply_operator(full, feats, OUT_HW)
    got, _ = apply_operator(small, feats, OUT_HW)
    assert not torch.allclose(got, ref)


def test_operator_storage_dtype_error_is_small(pair):
    """fp16 coefficients (the cache's storage dtype) move targets by < 1e-3 of their scale."""
    torch.manual_seed(3)
    feats = torch.randn(2, 6, *CTX_HW)
    op = build_operator(pair["g"], pair["ctx_masks"], pair["tgt_mask"], pair["K"], pair["w2c"], CTX_HW, OUT_HW)
    ref, _ = apply_operator(op, feats, OUT_HW)
    half, _ = apply_operator(op.to(dtype=torch.float16), feats, OUT_HW)
    assert (half - ref).abs().max() < 1e-3 * ref.abs().max()
