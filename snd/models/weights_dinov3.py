"""DINOv3 weights: the official release layout -> timm's Eva keys (pure), and the architecture of a file.

Official layout (facebookresearch/dinov3 ``dinov3/models/vision_transformer.py`` `DinoVisionTransformer`,
the released ``dinov3_vit*16_pretrain_lvd1689m-*.pth``): ``cls_token``, ``storage_tokens`` (the 4
registers), ``mask_token`` (pre-training only), ``rope_embed.periods`` (a buffer timm recomputes),
``blocks.i.{norm1,norm2}``, ``blocks.i.attn.qkv.{weight,bias,bias_mask}`` (`LinearKMaskedBias`: the k
part of the bias is masked to 0), ``blocks.i.attn.proj``, ``blocks.i.ls{1,2}.gamma``, ``blocks.i.mlp.fc1/
fc2`` (S, B, L) or SwiGLU ``mlp.w1/w2/w3`` (S+, H+), ``norm``; some files add ``local_cls_norm`` or
distillation ``projectors``. timm's HF-hub safetensors are already in timm keys (`detect_layout` "timm").

The mapping is timm's (``timm/models/eva.py`` checkpoint_filter_fn for DINOv3), written here as a pure
function that also returns every key it drops and why, so loading stays strict and reported:
qkv bias -> ``q_bias`` + ``v_bias`` for the `_qkvb` models; for the others (timm built the S/B/L ports
without a qkv bias because the released biases are all zero) a zero bias is dropped and reported, a
non-zero one is kept under its own name so the strict check fails with the fix (use the `_qkvb` model).
"""
from __future__ import annotations

import re

from torch import Tensor

__all__ = ["convert_dinov3_state_dict", "convert_hf_dinov3_state_dict", "guess_dinov3_arch", "is_dinov3_official",
           "is_hf_dinov3", "to_dinov3_state_dict"]

# (official, timm) key fragments; `.mlp.w3.` <-> `.mlp.fc2.` only in the SwiGLU models (S+, H+)
_RENAMES = (("storage_tokens", "reg_token"), (".ls1.gamma", ".gamma_1"), (".ls2.gamma", ".gamma_2"),
            (".mlp.w1.", ".mlp.fc1_g."), (".mlp.w2.", ".mlp.fc1_x."), (".mlp.w3.", ".mlp.fc2."))
_DROP = re.compile(r"(^mask_token$|\.periods$|\.bias_mask$|^local_cls_norm\.|^projectors\.)")
_SIZES = {384: "small", 768: "base", 1024: "large", 1280: "huge_plus"}


def is_dinov3_official(sd: dict[str, Tensor]) -> bool:
    """The official DINOv3 layout: registers are called ``storage_tokens``."""
    return "storage_tokens" in sd


def convert_dinov3_state_dict(sd: dict[str, Tensor], *, qkv_bias: bool) -> tuple[dict[str, Tensor], list[str]]:
    """Official DINOv3 keys -> timm Eva keys: (state dict, dropped keys with the reason).

    Args:
        sd: the official state dict (prefixes already stripped).
        qkv_bias: whether the target model has q/v biases (timm's `_qkvb` variants).
    """
    out: dict[str, Tensor] = {}
    dropped: list[str] = []
    for k, v in sd.items():
        if _DROP.search(k):
            dropped.append(k)
            continue
        if k.endswith("attn.qkv.bias"):
            q, kb, vb = v.chunk(3, dim=-1)
            if qkv_bias:
                out[k.replace("qkv.bias", "q_bias")] = q
                out[k.replace("qkv.bias", "v_bias")] = vb
                dropped.append(f"{k}[k part] (masked to 0 in DINOv3)")
            elif not v.any():
                dropped.append(f"{k} (all zero; the model has no qkv bias)")
            else:
                out[k] = v  # non-zero: left for the strict check (the fix: the _qkvb model)
            continue
        for official, timm_name in _RENAMES:
            k = k.replace(official, timm_name)
        out[k] = v
    return out, dropped


def guess_dinov3_arch(sd: dict[str, Tensor]) -> str | None:
    """timm DINOv3 architecture of a timm-keyed state dict (None: not a DINOv3 Eva).

    Eva keys: ``blocks.0.gamma_1`` (layer scale) with no ``pos_embed`` (RoPE); the size from the width
    (S+ is the 384-wide SwiGLU model, H+ the 1280-wide one), `_qkvb` from ``q_bias``."""
    if "blocks.0.gamma_1" not in sd or "pos_embed" in sd or "cls_token" not in sd:
        return None
    dim = int(sd["cls_token"].shape[-1])
    if dim == 64:
        return "snd_test_vit_patch16_dinov3"
    size = _SIZES.get(dim)
    if size is None:
        return None
    if size == "small" and "blocks.0.mlp.fc1_g.weight" in sd:
        size = "small_plus"
    has_bias = "blocks.0.attn.q_bias" in sd or "blocks.0.attn.qkv.bias" in sd  # the latter: non-zero, unconverted
    return f"vit_{size}_patch16_dinov3" + ("_qkvb" if has_bias else "")


def to_dinov3_state_dict(timm_sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of `convert_dinov3_state_dict` (timm Eva -> official DINOv3 keys) for `snd export
    --format snd-release`: q/v biases back into one ``qkv.bias`` with a zero k part (zeros for models
    without biases, as the release files), ``bias_mask`` and a zero ``mask_token`` as the official model holds."""
    import torch

    out: dict[str, Tensor] = {}
    C = timm_sd["cls_token"].shape[-1]
    for k, v in timm_sd.items():
        if k.startswith(("head.", "fc_norm.")) or k.endswith(("attn.q_bias", "attn.v_bias")):
            continue
        swiglu = f"{k.split('.mlp.')[0]}.mlp.fc1_g.weight" in timm_sd
        k2 = k
        for official, timm_name in _RENAMES:
            if swiglu or timm_name != ".mlp.fc2.":
                k2 = k2.replace(timm_name, official)
        out[k2] = v
        if k.endswith("attn.qkv.weight"):
            pre = k[: -len("qkv.weight")]
            q = timm_sd.get(pre + "q_bias", torch.zeros(C, dtype=v.dtype))
            vb = timm_sd.get(pre + "v_bias", torch.zeros(C, dtype=v.dtype))
            out[pre + "qkv.bias"] = torch.cat([q, torch.zeros_like(q), vb])
            out[pre + "qkv.bias_mask"] = torch.cat([torch.ones_like(q), torch.zeros_like(q), torch.ones_like(q)])
    out["mask_token"] = torch.zeros(1, C, dtype=timm_sd["cls_token"].dtype)
    return out


def is_hf_dinov3(sd: dict[str, Tensor]) -> bool:
    """Hugging Face transformers `DINOv3ViTModel` keys (the facebook/dinov3-* hub repos)."""
    return "embeddings.cls_token" in sd and any(".attention.o_proj." in k for k in sd)


def convert_hf_dinov3_state_dict(sd: dict[str, Tensor], *, qkv_bias: bool) -> tuple[dict[str, Tensor], list[str]]:
    """transformers `DINOv3ViTModel` keys (``embeddings.*``, ``[model.]layer.i.*``, ``norm``) -> timm Eva keys:
    separate q/k/v projections concatenated into ``attn.qkv``; q/v biases to ``q_bias``/``v_bias`` for `_qkvb`
    models (dropped and reported when all zero otherwise); gated MLP gate/up/down -> ``fc1_g``/``fc1_x``/``fc2``."""
    import torch

    out: dict[str, Tensor] = {}
    dropped: list[str] = []
    gated = any(".mlp.gate_proj." in k for k in sd)
    mlp = {"gate_proj": "fc1_g", "up_proj": "fc1_x" if gated else "fc1", "down_proj": "fc2"}
    for k, v in sd.items():
        m = re.match(r"^(?:model\.)?layer\.(\d+)\.(.+)$", k)
        if k == "embeddings.mask_token":
            dropped.append(k)
        elif k in ("embeddings.cls_token", "embeddings.register_tokens"):
            out["cls_token" if k.endswith("cls_token") else "reg_token"] = v
        elif k.startswith("embeddings.patch_embeddings."):
            out["patch_embed.proj." + k.rsplit(".", 1)[1]] = v
        elif m is None:
            out[k] = v  # norm.*, or unknown (left for the strict check)
        else:
            i, rest = m.groups()
            b = f"blocks.{i}."
            if rest.startswith("attention.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                if rest.endswith(".bias"):
                    name = {"q_proj": "q_bias", "v_proj": "v_bias", "k_proj": "k_bias"}[rest.split(".")[1]]
                    if qkv_bias and name != "k_bias":
                        out[b + "attn." + name] = v
                    elif not v.any():
                        dropped.append(f"{k} (all zero)")
                    else:
                        out[k] = v  # a non-zero bias the model cannot hold: the strict check reports it
                continue  # weights: concatenated below
            rest = rest.replace("attention.o_proj.", "attn.proj.")
            rest = rest.replace("layer_scale1.lambda1", "gamma_1").replace("layer_scale2.lambda1", "gamma_2")
            for hf_name, timm_name in mlp.items():
                rest = rest.replace(f"mlp.{hf_name}.", f"mlp.{timm_name}.")
            out[b + rest] = v
    for k in sd:
        m = re.match(r"^((?:model\.)?layer\.(\d+)\.attention\.)q_proj\.weight$", k)
        if m:
            out[f"blocks.{m.group(2)}.attn.qkv.weight"] = torch.cat([sd[m.group(1) + f"{n}_proj.weight"] for n in "qkv"])
    return out, dropped
