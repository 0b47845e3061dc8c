"""DINOv3 weights: state dicts written from random weights in the official facebookresearch/dinov3 layout and in
timm's layout load strictly into snd's models, every dropped key reported; bad files give one clear error."""
from __future__ import annotations

import re

import pytest
import timm
import torch
from safetensors.torch import save_file

import snd
from snd.errors import SndError
from snd.models.backbone import create_backbone, extract, normalize
from snd.models.weights import load_backbone_weights


def _official(timm_sd: dict, *, qkv_bias: dict | None = None) -> dict:
    """The official DINOv3 keys, written here from the dinov3 model code's names (independent of snd's converter):
    storage_tokens, ls1/ls2.gamma, SwiGLU w1/w2/w3, qkv.bias + bias_mask, rope_embed.periods, mask_token."""
    out = {}
    swiglu = any(".fc1_g." in k for k in timm_sd)
    for k, v in timm_sd.items():
        if k.endswith(("q_bias", "v_bias")):
            continue
        n = {"reg_token": "storage_tokens"}.get(k, k)
        n = n.replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")
        if swiglu:
            n = n.replace(".mlp.fc1_g.", ".mlp.w1.").replace(".mlp.fc1_x.", ".mlp.w2.").replace(".mlp.fc2.", ".mlp.w3.")
        out[n] = v.clone()
        if k.endswith("attn.qkv.weight"):
            C = v.shape[1]
            i = int(re.match(r"blocks\.(\d+)\.", k).group(1))
            out[f"blocks.{i}.attn.qkv.bias"] = (qkv_bias or {}).get(i, torch.zeros(3 * C))
            out[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat([torch.ones(C), torch.zeros(C), torch.ones(C)])
    C = timm_sd["cls_token"].shape[-1]
    out["mask_token"] = torch.zeros(1, C)
    out["rope_embed.periods"] = torch.arange(1.0, 5.0)
    return out


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_official_layout_loads_strictly_and_reports_every_drop(tmp_path):
    torch.manual_seed(0)
    src = create_backbone("snd_test_vit_patch16_dinov3", init="random")
    f = tmp_path / "dinov3_test.pth"
    torch.save({"model": _official(src.state_dict())}, f)
    dst = create_backbone("snd_test_vit_patch16_dinov3", init="random")
    rep = load_backbone_weights(dst, f)
    assert rep.layout == "dinov3" and _same(src, dst)
    assert sorted(rep.dropped) == sorted(["mask_token", "rope_embed.periods", "blocks.0.attn.qkv.bias_mask",
                                          "blocks.1.attn.qkv.bias_mask",
                                          "blocks.0.attn.qkv.bias (all zero; the model has no qkv bias)",
                                          "blocks.1.attn.qkv.bias (all zero; the model has no qkv bias)"])
    # snd.load_backbone finds the architecture from the file alone
    m = snd.load_backbone(f)
    x = normalize(m, torch.rand(1, 3, 32, 48))
    assert torch.equal(extract(m, x)[1], extract(src, x)[1])


def test_official_qkv_biases_go_to_the_qkvb_model(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("vit_small_patch16_dinov3_qkvb", depth=1, num_classes=0)
    C = 384
    q, k, v = torch.randn(C), torch.randn(C), torch.randn(C)
    f = tmp_path / "qkvb.pth"
    torch.save(_official(src.state_dict(), qkv_bias={0: torch.cat([q, k, v])}), f)
    dst = timm.create_model("vit_small_patch16_dinov3_qkvb", depth=1, num_classes=0)
    rep = load_backbone_weights(dst, f)
    assert torch.equal(dst.blocks[0].attn.q_bias, q) and torch.equal(dst.blocks[0].attn.v_bias, v)
    assert "blocks.0.attn.qkv.bias[k part] (masked to 0 in DINOv3)" in rep.dropped
    # the same non-zero biases into the model without qkv bias: one clear error naming the file and the fix
    plain = timm.create_model("vit_small_patch16_dinov3", depth=1, num_classes=0)
    with pytest.raises(SndError, match="qkv.bias") as e:
        load_backbone_weights(plain, f)
    assert str(f) in str(e.value) and "_qkvb" in e.value.hint


def test_official_swiglu_layout_small_plus(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("vit_small_plus_patch16_dinov3", depth=1, num_classes=0)
    f = tmp_path / "splus.pth"
    off = _official(src.state_dict())
    assert "blocks.0.mlp.w1.weight" in off and "blocks.0.mlp.w3.weight" in off
    torch.save(off, f)
    dst = timm.create_model("vit_small_plus_patch16_dinov3", depth=1, num_classes=0)
    assert load_backbone_weights(dst, f).layout == "dinov3" and _same(src, dst)


def test_timm_safetensors_layout_loads_strictly(tmp_path):
    torch.manual_seed(1)
    src = create_backbone("snd_test_vit_patch16_dinov3", init="random")
    folder = tmp_path / "hf" / "snapshots" / "abc"
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(folder / "model.safetensors"))
    dst = create_backbone("snd_test_vit_patch16_dinov3", init="random")
    rep = load_backbone_weights(dst, tmp_path / "hf")
    assert rep.layout == "timm" and rep.dropped == [] and _same(src, dst)


def test_dinov3_file_into_a_dinov2_model_names_the_fix(tmp_path):
    src = create_backbone("snd_test_vit_patch16_dinov3", init="random")
    f = tmp_path / "v3.pth"
    torch.save(_official(src.state_dict()), f)
    with pytest.raises(SndError, match="do not fit") as e:
        load_backbone_weights(create_backbone("snd_test_vit_patch14", init="random"), f)
    assert "snd_test_vit_patch16_dinov3" in e.value.hint or "--model" in e.value.hint


def test_missing_weights_say_where_to_get_them():
    with pytest.raises(SndError) as e:
        create_backbone("vit_base_patch16_dinov3")
    assert "facebookresearch/dinov3" in e.value.hint and "timm/vit_base_patch16_dinov3.lvd1689m" in e.value.hint


def test_cli_features_with_an_official_dinov3_file(synth_root, tmp_path):
    """`snd features` on an official-layout DINOv3 file: the architecture comes from the file, the grid from
    its patch 16 (images of different sizes go to the first one's size rounded to multiples of 16)."""
    import numpy as np
    from PIL import Image

    from tests._cli import run_cli

    src = create_backbone("snd_test_vit_patch16_dinov3", init="random")
    f = tmp_path / "v3.pth"
    torch.save(_official(src.state_dict()), f)
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 150, 3), dtype=np.uint8)).save(a)
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(b)
    out = tmp_path / "feat"
    assert run_cli(["features", str(a), str(b), "--model", str(f), "--out", str(out), "--device", "cpu",
                    "--clusters", "2"]) == 0
    npz = np.load(out / "features.npz")
    assert npz["patches"].shape == (2, 64, 6, 9) and npz["cls"].shape == (2, 64)  # 100x150 -> 96x144


@pytest.mark.parametrize("gated", [False, True])
def test_hf_transformers_dinov3_agrees_with_snd_after_conversion(gated, tmp_path):
    """Two backends: a random transformers `DINOv3ViTModel` (the facebook/dinov3-* hub layout) and snd's timm
    model loaded strictly from its safetensors give the same tokens at a non-square size."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if gated:  # S+ (SwiGLU), one block
        dst = create_backbone("vit_small_plus_patch16_dinov3", init="random", arch_overrides={"depth": 1})
        dim, depth, heads, inter = 384, 1, 6, dst.blocks[0].mlp.fc1_g.weight.shape[0]
    else:
        dst = create_backbone("snd_test_vit_patch16_dinov3", init="random")
        dim, depth, heads, inter = 64, 2, 2, 256
    cfg = transformers.DINOv3ViTConfig(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads,
                                       intermediate_size=inter, patch_size=16, num_register_tokens=4, rope_theta=100.0,
                                       layerscale_value=0.5, use_gated_mlp=gated, image_size=64, query_bias=False,
                                       key_bias=False, value_bias=False, layer_norm_eps=1e-5,
                                       hidden_act="silu" if gated else "gelu")
    hf = transformers.DINOv3ViTModel(cfg).eval()
    f = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(f))
    rep = load_backbone_weights(dst, f)
    assert rep.layout == "hf_dinov3" and rep.dropped == ["embeddings.mask_token"]
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
        got = dst.forward_features(x)
    assert got.shape == ref.shape and (got - ref).abs().max() < 1e-4 * ref.abs().max()
