"""Backbones, weight conversion/loading, LoRA, EMA teacher, DINO head and the fused CE (CPU, tiny models)."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from snd.errors import SndError
from snd.models.backbone import TEST_MODEL, create_backbone, extract, normalize
from snd.models.ema import EmaTeacher, ema_update_
from snd.models.head import DINOHead
from snd.models.lora import LoraSpec, apply_lora, lora_parameters, merged_copy
from snd.models.loss import cosine_loss, dino_ce, dino_ce_reference, feature_mse_loss
from snd.models.weights import convert_dinov2_state_dict, load_backbone_weights


def _tiny(**kw) -> torch.nn.Module:
    torch.manual_seed(kw.pop("seed", 0))
    return timm.create_model(TEST_MODEL, num_classes=0, dynamic_img_size=True, **kw).eval()


def _official_from_timm(sd: dict, *, registers: bool, seed: int = 1) -> dict:
    """Write a timm state dict in facebookresearch/dinov2 key layout, by hand (independent of snd's code)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    C = sd["cls_token"].shape[-1]
    if registers:
        p0 = torch.randn(1, 1, C, generator=g)  # official keeps a CLS position that timm folds into cls_token
        out["pos_embed"] = torch.cat([p0, sd["pos_embed"]], dim=1)
        out["cls_token"] = sd["cls_token"] - p0
        out["register_tokens"] = sd["reg_token"]
    else:
        out["pos_embed"] = sd["pos_embed"]
        out["cls_token"] = sd["cls_token"]
    for k, v in sd.items():
        if k not in ("pos_embed", "cls_token", "reg_token"):
            out[k] = v
    out["mask_token"] = torch.randn(1, C, generator=g)
    return out


# ---- backbone ----------------------------------------------------------------------------------------
def test_extract_shapes_and_normalize():
    m = create_backbone(TEST_MODEL, init="random")
    x = torch.rand(2, 3, 56, 84)
    xn = normalize(m, x)
    assert torch.allclose(xn[:, 0], (x[:, 0] - 0.485) / 0.229)
    cls, patches = extract(m, xn)
    assert cls.shape == (2, 64) and patches.shape == (2, 64, 4, 6)
    tokens = m.forward_features(xn)  # [B, 1 + 24, C]
    assert torch.equal(patches[1, :, 2, 3], tokens[1, 1 + 2 * 6 + 3])
    assert torch.equal(cls, tokens[:, 0])


def test_img_size_keeps_the_native_grid_and_matches_dynamic():
    a = create_backbone(TEST_MODEL, init="random")
    b = create_backbone(TEST_MODEL, init="random", img_size=(70, 98))
    b.load_state_dict(a.state_dict())
    assert b.pos_embed.shape[1] == 1 + 4 * 4 and b.snd_img_size == (70, 98)
    x = normalize(a, torch.rand(1, 3, 70, 98))
    with torch.no_grad():
        assert torch.equal(extract(a, x)[1], extract(b, x)[1])
    with pytest.raises(SndError, match="multiple of the patch size"):
        create_backbone(TEST_MODEL, init="random", img_size=(70, 99))


def test_pretrained_without_weights_names_the_download():
    with pytest.raises(SndError, match="dinov2_vits14_pretrain.pth"):
        create_backbone("dinov2_vits14")
    with pytest.raises(SndError, match="unknown backbone"):
        create_backbone("resnet50", init="random")


# ---- weights -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("registers", [False, True])
def test_official_layout_loads_into_timm(tmp_path, registers):
    kw = dict(reg_tokens=4, no_embed_class=True) if registers else {}
    src = _tiny(seed=3, **kw)
    official = _official_from_timm(src.state_dict(), registers=registers)
    assert "mask_token" in official and "reg_token" not in official
    path = tmp_path / "dinov2_official.pth"
    torch.save(official, path)
    dst = _tiny(seed=4, **kw)
    report = load_backbone_weights(dst, path)
    assert report.layout == "dinov2" and report.dropped == ["mask_token"]
    for k, v in src.state_dict().items():
        assert torch.allclose(dst.state_dict()[k], v, atol=1e-6), k
    x = normalize(src, torch.rand(1, 3, 56, 70))
    assert torch.allclose(extract(src, x)[1], extract(dst, x)[1], atol=1e-5)


def test_wrapped_prefixed_and_safetensors_files(tmp_path):
    from safetensors.torch import save_file

    src = _tiny(seed=5)
    torch.save({"model": {"module." + k: v for k, v in _official_from_timm(src.state_dict(), registers=False).items()}},
               tmp_path / "wrapped.pth")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "model.safetensors")
    for name, layout in (("wrapped.pth", "dinov2"), ("model.safetensors", "timm")):
        dst = _tiny(seed=6)
        assert load_backbone_weights(dst, tmp_path / name).layout == layout
        assert all(torch.equal(dst.state_dict()[k], v) for k, v in src.state_dict().items())
    dst = _tiny(seed=7)  # a folder (HF cache snapshot) holding model.safetensors
    load_backbone_weights(dst, tmp_path)
    assert torch.equal(dst.pos_embed, src.pos_embed)


def test_hf_transformers_layout(tmp_path):
    from snd.models.weights import convert_hf_dinov2_state_dict

    src = _tiny(seed=8)
    sd = src.state_dict()
    hf = {"embeddings.cls_token": sd["cls_token"], "embeddings.mask_token": torch.zeros(1, 64),
          "embeddings.position_embeddings": sd["pos_embed"],
          "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
          "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
          "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
    for i in range(2):
        b = f"blocks.{i}."
        L = f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd[b + f"attn.qkv.{kind}"].chunk(3)
            hf[L + f"attention.attention.query.{kind}"] = q
            hf[L + f"attention.attention.key.{kind}"] = k
            hf[L + f"attention.attention.value.{kind}"] = v
            hf[L + f"attention.output.dense.{kind}"] = sd[b + f"attn.proj.{kind}"]
            for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                hf[L + f"{n}.{kind}"] = sd[b + f"{n}.{kind}"]
        hf[L + "layer_scale1.lambda1"] = sd[b + "ls1.gamma"]
        hf[L + "layer_scale2.lambda1"] = sd[b + "ls2.gamma"]
    conv = convert_hf_dinov2_state_dict(hf)
    assert set(conv) == set(sd)
    torch.save(hf, tmp_path / "pytorch_model.bin")
    dst = _tiny(seed=9)
    assert load_backbone_weights(dst, tmp_path / "pytorch_model.bin").layout == "hf"
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in sd.items())


def test_converter_swiglu_and_block_chunks():
    sd = {"mask_token": torch.zeros(1, 4), "cls_token": torch.zeros(1, 1, 4), "pos_embed": torch.zeros(1, 5, 4),
          "blocks.0.3.mlp.w12.weight": torch.ones(8, 4), "blocks.0.3.mlp.w3.bias": torch.ones(4),
          "blocks.1.ls1.gamma": torch.ones(4)}
    out = convert_dinov2_state_dict(sd)
    assert set(out) == {"cls_token", "pos_embed", "blocks.3.mlp.fc1.weight", "blocks.3.mlp.fc2.bias", "blocks.1.ls1.gamma"}
    assert "mask_token" in sd, "converter must not mutate its input"


def test_wrong_model_errors(tmp_path):
    src = _tiny(seed=10)
    torch.save(_official_from_timm(src.state_dict(), registers=False), tmp_path / "small.pth")
    wider = timm.create_model(TEST_MODEL, num_classes=0, embed_dim=96, num_heads=2)
    with pytest.raises(SndError) as e:
        load_backbone_weights(wider, tmp_path / "small.pth")
    msg = str(e.value)
    assert "small.pth" in msg and "expected embed dim 96, depth 2" in msg and "found embed dim 64, depth 2" in msg
    assert "fix:" in msg
    deeper = timm.create_model(TEST_MODEL, num_classes=0, depth=3)
    with pytest.raises(SndError, match="expected embed dim 64, depth 3.*found embed dim 64, depth 2"):
        load_backbone_weights(deeper, tmp_path / "small.pth")
    torch.save({"state_dict": {"encoder.backbone.conv1.weight": torch.zeros(2, 3, 7, 7)}}, tmp_path / "mvsplat.ckpt")
    with pytest.raises(SndError, match="not a DINOv2"):
        load_backbone_weights(_tiny(), tmp_path / "mvsplat.ckpt")
    with pytest.raises(SndError, match="not found"):
        load_backbone_weights(_tiny(), tmp_path / "missing.pth")


def test_a_partial_file_of_the_right_model_is_not_called_another_model(tmp_path):
    """A ViT-S file with one tensor missing used to get the hint 'this file holds a vit_small...: use --model
    vit_small...', the very --model given; it is a partial/damaged file and the hint must say so."""
    model = create_backbone("vit_small_patch14_dinov2", init="random", arch_overrides={"depth": 1})
    sd = model.state_dict()
    sd.pop("blocks.0.attn.qkv.weight")
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(SndError, match="blocks.0.attn.qkv.weight") as e:
        load_backbone_weights(model, tmp_path / "partial.pth")
    assert "use --model" not in str(e.value) and "download the weights again" in str(e.value)


# ---- LoRA / EMA --------------------------------------------------------------------------------------
@pytest.mark.parametrize("patch_embed", [True, False])
def test_only_lora_trainable(patch_embed):
    m = apply_lora(_tiny(), LoraSpec(patch_embed=patch_embed))
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    adapted = sorted({n.split(".lora_")[0] for n in trainable})
    expect = [f"blocks.{i}.attn.{k}" for i in range(2) for k in ("proj", "qkv")]
    assert adapted == sorted(expect + (["patch_embed.proj"] if patch_embed else []))
    assert all(p.shape[0] == 8 or p.shape[1] == 8 for n, p in lora_parameters(m).items())


def test_ema_update_exact():
    t = [torch.tensor([4.0, 8.0, 1.5]), torch.tensor([[2.0]])]
    s = [torch.tensor([8.0, 0.0, 1.5]), torch.tensor([[6.0]])]
    ema_update_(t, s, momentum=0.75)  # 0.75 t + 0.25 s, exact in binary
    assert torch.equal(t[0], torch.tensor([5.0, 6.0, 1.5])) and torch.equal(t[1], torch.tensor([[3.0]]))
    a = torch.randn(1000)
    b = a.clone()
    ema_update_([b], [a.clone()], momentum=0.999)
    assert torch.equal(a, b), "identical tensors must stay bit-identical (frozen base weights)"
    x, y = torch.randn(100), torch.randn(100)
    z = x.clone()
    ema_update_([z], [y], momentum=0.999)
    assert torch.allclose(z, 0.999 * x + 0.001 * y, atol=1e-7)


def _lora_student(seed=0):
    m = apply_lora(_tiny(seed=seed), LoraSpec())
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in lora_parameters(m).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)  # B != 0, so adapters matter
    return m


def test_merged_teacher_equals_wrapped_teacher():
    student = _lora_student()
    head = DINOHead(64, hidden=32, bottleneck=16, prototypes=40)
    teacher = EmaTeacher(student, head, momentum=0.5)
    base_before = {n: p.clone() for n, p in teacher.ema_backbone.named_parameters() if ".lora_" not in n}
    with torch.no_grad():
        for p in lora_parameters(student).values():
            p.add_(0.3)
    teacher.update(student, head)
    for n, p in teacher.ema_backbone.named_parameters():
        if ".lora_" in n:
            continue
        assert torch.equal(p, base_before[n]), f"frozen {n} changed"
    x = normalize(student, torch.rand(2, 3, 56, 70))
    merged = extract(teacher.backbone, x)[1]
    wrapped = extract(teacher.ema_backbone.eval(), x)[1]
    assert torch.allclose(merged, wrapped, atol=1e-5)
    plain = extract(merged_copy(student).eval(), x)[1]
    assert not torch.allclose(plain, merged, atol=1e-3), "teacher moved only half-way to the student"
    assert not any(".lora_" in n for n, _ in teacher.backbone.named_parameters())


# ---- head / losses -----------------------------------------------------------------------------------
def test_head_weight_norm():
    h = DINOHead(8, hidden=16, bottleneck=4, prototypes=10)
    with torch.no_grad():
        h.last_g.mul_(torch.arange(1, 11, dtype=torch.float32)[:, None])
    W = h.prototypes()
    assert torch.allclose(W.norm(dim=1), torch.arange(1, 11, dtype=torch.float32), atol=1e-6)
    z = h.bottleneck(torch.randn(5, 8))
    assert torch.allclose(z.norm(dim=1), torch.ones(5), atol=1e-6)
    ref = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(4, 10, bias=False))
    with torch.no_grad():
        ref.parametrizations.weight.original0.copy_(h.last_g)
        ref.parametrizations.weight.original1.copy_(h.last_v)
    assert torch.allclose(ref.weight, W, atol=1e-6)


def test_dino_ce_hand_computed():
    # K = 2, one valid patch: teacher logits (0, 0) -> p = (.5, .5); student logits (0, log 3) -> q = (.25, .75)
    z_s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    w_s = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    z_t = torch.zeros(2, 2)
    w_t = torch.zeros(2, 2)
    valid = torch.tensor([True, False])
    expect = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    for fn in (dino_ce, dino_ce_reference):
        assert abs(fn(z_s, w_s, z_t, w_t, valid).item() - expect) < 1e-6


@pytest.mark.parametrize("temps", [(1.0, 1.0), (0.1, 0.04)])
def test_dino_ce_fused_equals_naive_and_masks(temps):
    ts, tt = temps
    g = torch.Generator().manual_seed(0)
    N, D, K = 45, 16, 512
    z_s = F.normalize(torch.randn(N, D, generator=g), dim=-1).requires_grad_()
    w_s = torch.randn(K, D, generator=g).requires_grad_()
    z_t = F.normalize(torch.randn(N, D, generator=g), dim=-1)
    w_t = torch.randn(K, D, generator=g)
    valid = torch.rand(N, generator=g) > 0.3
    a = dino_ce(z_s, w_s, z_t, w_t, valid, student_temp=ts, teacher_temp=tt, chunk=16)
    ga = torch.autograd.grad(2.0 * a, [z_s, w_s])
    b = dino_ce_reference(z_s, w_s, z_t, w_t, valid, student_temp=ts, teacher_temp=tt)
    gb = torch.autograd.grad(2.0 * b, [z_s, w_s])
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-5)
    assert torch.all(ga[0][~valid] == 0), "invalid patches must get no gradient"
    # changing invalid patches (student or teacher side) leaves the loss unchanged
    z_s2 = z_s.detach().clone()
    z_s2[~valid] = F.normalize(torch.randn(int((~valid).sum()), D, generator=g), dim=-1)
    z_t2 = z_t.clone()
    z_t2[~valid] = 0
    c = dino_ce(z_s2, w_s.detach(), z_t2, w_t, valid, student_temp=ts, teacher_temp=tt)
    assert torch.allclose(a.detach(), c, rtol=1e-6, atol=1e-6)


def test_ablation_losses():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    t = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    valid = torch.tensor([True, True, False])
    assert abs(cosine_loss(s, t, valid).item() - 0.5) < 1e-6  # (1 - 0 + 1 - 1) / 2
    assert abs(feature_mse_loss(s, t, valid).item() - 0.75) < 1e-6  # ((1+1)/2 + (0+1)/2) / 2
    assert cosine_loss(s, t, torch.zeros(3, dtype=torch.bool)).item() == 0.0


# ---- position embeddings as torch.hub DINOv2 interpolates them --------------------------------------
def _hub_interpolate_pos_encoding(pos_embed, x, w, h, *, patch=14, offset=0.1, antialias=False):
    """A re-statement of torch.hub DINOv2's `interpolate_pos_encoding` (dinov2/models/vision_transformer.py):
    x = tokens incl. CLS [B, 1 + npatch, C]; (w, h) = the image's dims 2 and 3 (the hub's own naming)."""
    import math

    import torch.nn.functional as F

    npatch, N = x.shape[1] - 1, pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    pos = pos_embed.float()
    cls_pos, patch_pos = pos[:, 0], pos[:, 1:]
    dim = x.shape[-1]
    w0, h0 = w // patch, h // patch
    M = int(math.sqrt(N))
    kwargs = {"scale_factor": (float(w0 + offset) / M, float(h0 + offset) / M)} if offset else {"size": (w0, h0)}
    patch_pos = F.interpolate(patch_pos.reshape(1, M, M, dim).permute(0, 3, 1, 2), mode="bicubic",
                              antialias=antialias, **kwargs)
    assert (w0, h0) == patch_pos.shape[-2:]
    patch_pos = patch_pos.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((cls_pos.unsqueeze(0), patch_pos), dim=1).to(x.dtype)


@pytest.mark.parametrize("offset,antialias", [(0.1, False), (0.0, True)])
@pytest.mark.parametrize("grid", [(41, 62), (34, 45), (37, 37), (37, 50)])
def test_hub_pos_embed_matches_the_hub_function(grid, offset, antialias):
    from snd.models.backbone import hub_interpolate_pos_embed

    g = torch.Generator().manual_seed(0)
    pos = torch.randn(1, 1 + 37 * 37, 8, generator=g)
    x = torch.zeros(1, 1 + grid[0] * grid[1], 8)
    ref = _hub_interpolate_pos_encoding(pos, x, 14 * grid[0], 14 * grid[1], offset=offset, antialias=antialias)
    got = hub_interpolate_pos_embed(pos[:, 1:], grid, offset=offset, antialias=antialias)
    torch.testing.assert_close(got, ref[:, 1:], rtol=0, atol=0)
    if grid == (41, 62) and offset:  # timm's own resampling is a different rule (what the hub model fixes)
        from timm.layers import resample_abs_pos_embed

        timm_pos = resample_abs_pos_embed(pos, new_size=list(grid), num_prefix_tokens=1)[:, 1:]
        assert (timm_pos - ref[:, 1:]).abs().max() > 1e-3


def test_backbone_tokens_use_the_hub_interpolation():
    """The model's token input at a non-native size = patch embedding + the hub's position embedding, for
    a plain and a register architecture; the stored position embedding stays at the native grid."""
    from snd.models.backbone import DinoV2ViT, set_input_size

    m = create_backbone(TEST_MODEL, init="random")
    assert isinstance(m, DinoV2ViT) and (m.pos_offset, m.pos_antialias) == (0.1, False)
    set_input_size(m, (70, 98))
    assert m.pos_embed.shape[1] == 1 + 4 * 4  # native 56 px grid kept
    img = normalize(m, torch.rand(2, 3, 70, 98))
    with torch.no_grad():
        x = m.patch_embed(img)  # [B, 5, 7, C] (NHWC, dynamic size)
        got = m._pos_embed(x)
        flat = x.reshape(2, 35, -1)
        ref = torch.cat([m.cls_token.expand(2, -1, -1), flat], 1) + _hub_interpolate_pos_encoding(m.pos_embed, torch.cat(
            [m.cls_token.expand(2, -1, -1), flat], 1), 70, 98)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    # at the native size the hub leaves the embedding alone: identical to timm
    import timm

    t = timm.create_model(TEST_MODEL, num_classes=0, dynamic_img_size=True).eval()
    t.load_state_dict(m.state_dict())
    x56 = normalize(m, torch.rand(1, 3, 56, 56))
    with torch.no_grad():
        assert torch.equal(t.forward_features(x56), m.forward_features(x56))
        assert (t.forward_features(img) - m.forward_features(img)).abs().max() > 1e-6  # timm's rule differs


def test_register_models_use_antialiased_exact_size():
    from snd.models.backbone import HUB_POS_INTERP

    assert HUB_POS_INTERP["vit_small_patch14_reg4_dinov2"] == (0.0, True)
    assert HUB_POS_INTERP["vit_base_patch14_dinov2"] == (0.1, False)
