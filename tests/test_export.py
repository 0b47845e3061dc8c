"""`snd export`, `snd.load_backbone` and `snd features` on a real (tiny) run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import snd
from snd.errors import SndError
from snd.models.backbone import extract, normalize
from snd.pipeline.config import DistillConfig, PrecomputeConfig
from snd.train.checkpoint import load_backbone_from_run
from tests._cli import run_cli

HW = (56, 84)


@pytest.fixture(scope="module")
def run_dir(synth_root, tmp_path_factory) -> Path:
    from snd.stages.distill import run
    from snd.stages.precompute import run as precompute

    root = tmp_path_factory.mktemp("export")
    precompute(PrecomputeConfig(data=synth_root, out=root / "cache", height=HW[0], width=HW[1], pairs_per_scene=2,
                                targets_per_pair=1, device="cpu"), progress=False)
    run(DistillConfig(shards=root / "cache", run=root / "run", model="snd_test_vit_patch14", init="random",
                      img_height=HW[0], img_width=HW[1], head_hidden=64, head_bottleneck=32, head_prototypes=256,
                      iters=3, num_workers=0, ckpt_every=3, device="cpu", lr=1e-2))
    return root / "run"


def _patches(model, x):
    return extract(model, normalize(model, x))[1]


def test_export_round_trips_through_plain_timm(run_dir, tmp_path):
    out = tmp_path / "exp"
    assert run_cli(["export", str(run_dir), "--out", str(out), "--format", "snd-release"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "snd_test_vit_patch14" and cfg["num_features"] == 64
    assert cfg["pretrained_cfg"]["input_size"] == [3, *HW] and len(cfg["pretrained_cfg"]["mean"]) == 3
    card = (out / "README.md").read_text()
    assert "timm.create_model" in card and "lora_rank" in card
    ref = load_backbone_from_run(run_dir)
    base = timm.create_model("snd_test_vit_patch14", num_classes=0, dynamic_img_size=True).eval()
    m = timm.create_model("snd_test_vit_patch14", pretrained=True, num_classes=0, dynamic_img_size=True,
                          pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"))).eval()
    x = torch.rand(2, 3, 56, 98)
    x0 = torch.rand(2, 3, 56, 56)  # the native grid: no position interpolation anywhere
    with torch.no_grad():
        # the weights round-trip exactly; at the native size plain timm gives snd's tokens exactly
        msd, rsd = m.state_dict(), ref.state_dict()
        assert set(msd) == set(rsd) and all(torch.equal(msd[k], rsd[k]) for k in msd)
        assert (_patches(m, x0) - _patches(ref, x0)).abs().max() < 1e-6
        # elsewhere timm resamples the position embedding its own way (snd: the torch.hub DINOv2 rule)
        d = (_patches(m, x) - _patches(ref, x)).abs().max()
        assert 1e-7 < d < 0.1 * _patches(ref, x).abs().max()
        assert (_patches(base, x) - _patches(ref, x)).abs().max() > 1e-2  # the file really was loaded
    # the official release layout loads back through snd.load_backbone, reporting the dropped mask_token
    rel = snd.load_backbone(out / "snd_test_snd.pth")
    assert rel.snd_load_report.layout == "dinov2" and rel.snd_load_report.dropped == ["mask_token"]
    sd = torch.load(out / "snd_test_snd.pth", weights_only=True)
    assert "mask_token" in sd and "blocks.0.attn.qkv.weight" in sd
    with torch.no_grad():
        assert (_patches(rel, x) - _patches(ref, x)).abs().max() < 1e-5
        assert (_patches(snd.load_backbone(out), x) - _patches(ref, x)).abs().max() < 1e-5
        assert (_patches(snd.load_backbone(run_dir), x) - _patches(ref, x)).abs().max() == 0


def test_load_backbone_errors_name_the_file(tmp_path):
    bad = tmp_path / "mvsplat.pth"
    torch.save({"encoder.backbone.conv.weight": torch.zeros(3)}, bad)
    with pytest.raises(SndError, match="mvsplat.pth"):
        snd.load_backbone(bad)
    with pytest.raises(SndError, match="not found"):
        snd.load_backbone(tmp_path / "nope.pth")
    with pytest.raises(SndError, match="needs pretrained weights") as e:
        snd.load_backbone("dinov2_vits14")
    assert "weights=" in e.value.hint and "dinov2_vits14_pretrain.pth" in e.value.hint  # the Python spelling, the file


def test_extract_features_inputs_and_sizes():
    from PIL import Image

    torch.manual_seed(0)
    model = timm.create_model("snd_test_vit_patch14", num_classes=0, dynamic_img_size=True).eval()
    arr = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)  # odd size
    pil = Image.fromarray(arr)
    cls_p, pat_p = snd.extract_features(model, [pil, pil])
    assert cls_p.shape == (2, 64) and pat_p.shape == (2, 64, 4, 5)  # padded to 56 x 70
    cls_n, pat_n = snd.extract_features(model, arr)
    torch.testing.assert_close(pat_n[0], pat_p[0])
    t = torch.from_numpy(arr).permute(2, 0, 1)
    _, pat_t = snd.extract_features(model, t[None].float() / 255)
    torch.testing.assert_close(pat_t, pat_n)
    # padding keeps the pixels: the first rows of patches see the same image content as a crop
    _, pat_crop = snd.extract_features(model, t[:, :42, :70][None])
    assert pat_crop.shape == (1, 64, 3, 5)
    _, pat_r = snd.extract_features(model, pil, resize="resize")
    assert pat_r.shape == (1, 64, 4, 5)  # 50 x 70 -> 56 x 70 (nearest multiples of 14)
    _, pat_s = snd.extract_features(model, [pil, Image.fromarray(arr[:30])], size=(28, 42), resize="resize")
    assert pat_s.shape == (2, 64, 2, 3)
    with pytest.raises(ValueError, match="different sizes"):
        snd.extract_features(model, [pil, Image.fromarray(arr[:30])])
