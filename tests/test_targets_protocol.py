"""The targets protocol (snd.splat.protocol): the loss rule, the store header and the run's record.

Hand-checked: under "official" the loss is the mean over ALL patches with the student's and the target's
features zeroed at uncovered patches, so it decomposes as (n_cov * L_snd + n_unc * c0) / N with c0 the
heads' cross-entropy on a zero vector, and the backbone's gradient is n_cov / N times the "snd" one.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from snd.errors import SndError
from snd.models.backbone import create_backbone
from snd.pipeline.config import DistillConfig
from snd.splat.protocol import rules
from snd.train.data import operator_decision
from snd.train.distiller import Distiller

IMG = (56, 84)  # 4 x 6 patches


def _cfg(**kw) -> DistillConfig:
    base = dict(model="snd_test_vit_patch14", init="random", img_height=IMG[0], img_width=IMG[1], head_hidden=32,
                head_bottleneck=16, head_prototypes=64, lora_dropout=0.0, device="cpu")
    base.update(kw)
    return DistillConfig(**base)


def _pair():
    torch.manual_seed(0)
    d_off = Distiller(_cfg(targets_protocol="official"), create_backbone("snd_test_vit_patch14", init="random"))
    d_snd = copy.deepcopy(d_off)
    d_snd.cfg = _cfg(targets_protocol="snd")
    d_snd.loss_over_all = rules("snd").loss_over_all
    return d_off, d_snd


def test_official_loss_is_mean_over_all_patches_with_both_sides_zeroed():
    d_off, d_snd = _pair()
    g = torch.Generator().manual_seed(1)
    img = torch.rand(1, 3, *IMG, generator=g)
    targets = torch.randn(1, 64, 4, 6, generator=g)
    valid = torch.rand(1, 4, 6, generator=g) > 0.4
    n_cov, N = int(valid.sum()), valid.numel()
    assert 0 < n_cov < N
    l_off = d_off.student_loss(img, targets, valid)
    l_snd = d_snd.student_loss(img, targets, valid)
    with torch.no_grad():  # c0: CE between the teacher's and the student's head outputs for a zero input
        zero = torch.zeros(1, 64)
        p = F.softmax(d_off.teacher.head.bottleneck(zero) @ d_off.teacher.head.prototypes().t(), -1)
        logq = F.log_softmax(d_off.student_head.bottleneck(zero) @ d_off.student_head.prototypes().t(), -1)
        c0 = float(-(p * logq).sum())
    assert c0 > 0.1
    expect = (n_cov * float(l_snd.detach()) + (N - n_cov) * c0) / N
    assert float(l_off.detach()) == pytest.approx(expect, rel=1e-5)
    # the uncovered patches reach the backbone with zero gradient: LoRA grads scale by n_cov / N
    l_off.backward()
    l_snd.backward()
    lora_off = {n: p.grad for n, p in d_off.student.named_parameters() if p.requires_grad}
    lora_snd = {n: p.grad for n, p in d_snd.student.named_parameters() if p.requires_grad}
    assert lora_off and set(lora_off) == set(lora_snd)
    for n in lora_off:
        torch.testing.assert_close(lora_off[n], lora_snd[n] * (n_cov / N), atol=1e-7, rtol=1e-4)
    # all covered: the two rules agree
    full = torch.ones_like(valid)
    with torch.no_grad():
        assert float(d_off.student_loss(img, targets, full)) == pytest.approx(float(d_snd.student_loss(img, targets, full)),
                                                                             rel=1e-6)


def _header(protocol: str | None) -> dict:
    op = {"ctx_hw": [4, 6], "out_hw": [4, 6], "upsample": "mask", "blend": True, "blend_weight": 0.5, "row_cap": 64,
          "inst_cap": 128}
    if protocol is None:  # a store written before the protocol field existed
        op.update(coverage_threshold=0.5, upsample_fallback="bilinear")
    else:
        op["protocol"] = protocol
    return {"operator": op}


def test_store_protocol_decides_the_target_path(tmp_path):
    off, old = _cfg(shards=tmp_path), _cfg(shards=tmp_path, targets_protocol="snd")
    assert operator_decision(off, _header("official"))[0]
    assert operator_decision(old, _header("snd"))[0]
    use, why = operator_decision(off, _header("snd"))  # auto: falls back to rendering, says why
    assert not use and "protocol 'snd' vs 'official'" in why
    use, why = operator_decision(off, _header(None))  # an old store: detected as the earlier rules
    assert not use and "predates the protocol field" in why
    assert operator_decision(old, _header(None))[0]
    with pytest.raises(SndError, match="protocol 'snd' vs 'official'"):
        operator_decision(_cfg(shards=tmp_path, targets="operator"), _header(None))


def test_rules_table():
    off, snd = rules("official"), rules("snd")
    assert (off.grid, off.fallback, off.mean_over_all, off.coverage_threshold, off.coverage_resize, off.loss_over_all) == \
        ("corners", "zero", True, 0.0, "nearest", True)
    assert (snd.grid, snd.fallback, snd.mean_over_all, snd.coverage_threshold, snd.coverage_resize, snd.loss_over_all) == \
        ("centres", "bilinear", False, 0.5, "bilinear", False)
    with pytest.raises(ValueError, match="official"):
        rules("paper")


def test_resuming_a_run_from_before_the_protocol_field_needs_snd(tmp_path):
    """A run's config.json without targets_protocol trained with the earlier rules: resuming it with the
    default (official) is refused, with --targets-protocol snd it is allowed."""
    import json

    from snd.pipeline.config import save_config
    from snd.train.loop import _check_resume_config

    save_config(_cfg(run=tmp_path), tmp_path / "config.json")
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["config"]["targets_protocol"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(SndError, match="targets_protocol: run has 'snd', now 'official'"):
        _check_resume_config(tmp_path, _cfg(run=tmp_path))
    _check_resume_config(tmp_path, _cfg(run=tmp_path, targets_protocol="snd"))
