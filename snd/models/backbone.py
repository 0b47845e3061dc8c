"""ViT backbones through timm (DINOv2, DINOv3): registry, creation, weight loading, normalisation and
patch-feature extraction.

The registry (`REGISTRY`: timm name -> `BackboneSpec`) is the one place a model family is described: its
patch size, the module suffixes LoRA adapts, its position-embedding rule and where its weights come from.
Every code path reads the patch size from the model (`patch_size`), never a constant; adding a family is one
registry entry plus passing the backbone contract test (tests/test_backbone_contract.py).

Why timm: its `VisionTransformer` is the DINOv2 architecture (layer scale, registers, dynamic input size),
has a pretrained-config table (mean/std, source URL) and `forward_features`, so snd keeps no model code.
Weights never come from the network: `init="pretrained"` needs a local file (`--weights`), which
`snd.models.weights` converts (official DINOv2 .pth, timm/HF safetensors, released SnD files) and loads
strictly.

Tokens vs. grid: the models are built at the weights' native grid (518 px = 37x37 patches for DINOv2)
with `dynamic_img_size=True`, so any multiple of 14 works. The position embedding always stays at the
native grid and is interpolated on every forward the way the official torch.hub DINOv2 does it
(``dinov2/models/vision_transformer.py`` ``interpolate_pos_encoding``; `hub_interpolate_pos_embed`), so a
released checkpoint gives the same tokens in snd as in the official SnD code (which uses torch.hub
DINOv2): timm's own resampling (antialiased bicubic to the exact size) differs from it by ~1e-3 relative
at 574x868. The hub models without registers interpolate with a scale factor of (grid + 0.1) / 37 and no
antialiasing; the register models with the exact size and antialiasing (= timm's rule).

Plain timm and snd's exports: the exported files keep the native grid (as the official release), so
plain `timm.create_model(..., dynamic_img_size=True)` loads them exactly and gives snd's tokens exactly at
the native size (518 x 518); at other sizes timm's resampling applies (docs/distill.md).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn

from snd.errors import SndError
from snd.models.dinov3 import TEST_MODEL_V3, tiny_model_cfg, use_cached_rope

log = logging.getLogger(__name__)

__all__ = ["ALIASES", "HUB_POS_INTERP", "REGISTRY", "SUPPORTED", "VIT_TYPES", "BackboneSpec", "DinoV2ViT",
           "create_backbone", "extract", "normalize", "hub_interpolate_pos_embed", "resolve_name", "patch_size",
           "embed_dim", "set_input_size", "spec_of", "DISTILL_FRAME_HW", "PROBE_FRAME_HW", "with_input_hw"]

# timm classes snd drives: DINOv2 is a VisionTransformer, DINOv3 an Eva (same forward_features contract).
VIT_TYPES = (VisionTransformer, Eva)

# Official torch.hub names -> timm architecture names (the weights are the same; see snd.models.weights).
ALIASES: dict[str, str] = {
    "dinov2_vits14": "vit_small_patch14_dinov2",
    "dinov2_vitb14": "vit_base_patch14_dinov2",
    "dinov2_vits14_reg": "vit_small_patch14_reg4_dinov2",
    "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2",
}
TEST_MODEL = "snd_test_vit_patch14"


@dataclass(frozen=True)
class BackboneSpec:
    """What snd needs to know about one timm architecture (everything else is read from the model)."""

    family: str  # "dinov2" (timm VisionTransformer, hub position interpolation) | "dinov3" (timm Eva, RoPE)
    patch: int  # patch size in pixels (checked against the created model by the contract test)
    lora: tuple[str, ...]  # module-name suffixes LoRA adapts: the attention's fused qkv and output projection
    weights: str  # where the pretrained weights come from (the hint when --weights is missing)
    test: bool = False  # tiny random-init test model (no pretrained weights)


_V2_W = "the official DINOv2 weights {url} (or the safetensors of the Hugging Face repo timm/{arch}.lvd142m)"
_V3_W = ("the official DINOv3 release .pth from https://github.com/facebookresearch/dinov3 (access form on the "
         "README), or the safetensors of the Hugging Face repo timm/{arch}.lvd1689m")
_LORA = ("attn.qkv", "attn.proj")  # DINOv2 Attention and DINOv3 EvaAttention use the same names
REGISTRY: dict[str, BackboneSpec] = {
    **{a: BackboneSpec("dinov2", 14, _LORA, _V2_W) for a in (
        "vit_small_patch14_dinov2", "vit_base_patch14_dinov2",
        "vit_small_patch14_reg4_dinov2", "vit_base_patch14_reg4_dinov2")},
    TEST_MODEL: BackboneSpec("dinov2", 14, _LORA, "", test=True),
    **{a: BackboneSpec("dinov3", 16, _LORA, _V3_W) for s in ("small", "small_plus", "base", "large")
       for a in (f"vit_{s}_patch16_dinov3", f"vit_{s}_patch16_dinov3_qkvb")},
    TEST_MODEL_V3: BackboneSpec("dinov3", 16, _LORA, "", test=True),
}
SUPPORTED = tuple(REGISTRY)

# torch.hub DINOv2's (interpolate_offset, interpolate_antialias) per architecture (dinov2/hub/backbones.py:
# the plain models use the defaults 0.1 / False, the register models 0.0 / True).
HUB_POS_INTERP: dict[str, tuple[float, bool]] = {
    "vit_small_patch14_dinov2": (0.1, False), "vit_base_patch14_dinov2": (0.1, False),
    "vit_small_patch14_reg4_dinov2": (0.0, True), "vit_base_patch14_reg4_dinov2": (0.0, True),
    TEST_MODEL: (0.1, False),
}


def hub_interpolate_pos_embed(patch_pos: Tensor, grid: tuple[int, int], *, offset: float = 0.1,
                              antialias: bool = False) -> Tensor:
    """Patch position embeddings [1, M*M, C] at the native M x M grid -> [1, h*w, C] for `grid` (h, w),
    as torch.hub DINOv2's ``interpolate_pos_encoding``: unchanged for the native square grid; otherwise
    bicubic in float32, with ``scale_factor = ((h + offset) / M, (w + offset) / M)`` when `offset` is set
    (the hub's historical kludge: PyTorch then maps coordinates with that factor, not with h / M) or the
    exact size when it is 0, and `antialias` as the hub model's flag."""
    _, N, C = patch_pos.shape
    M = int(math.isqrt(N))
    assert M * M == N, f"patch position embeddings must be a square grid, got {N} tokens"
    h, w = int(grid[0]), int(grid[1])
    if (h, w) == (M, M):
        return patch_pos
    x = patch_pos.float().reshape(1, M, M, C).permute(0, 3, 1, 2)
    if offset:
        kw = {"scale_factor": ((h + offset) / M, (w + offset) / M)}
    else:
        kw = {"size": (h, w)}
    x = F.interpolate(x, mode="bicubic", antialias=antialias, **kw)
    assert tuple(x.shape[-2:]) == (h, w), f"interpolated grid {tuple(x.shape[-2:])} vs {(h, w)}"
    return x.permute(0, 2, 3, 1).reshape(1, h * w, C).to(patch_pos.dtype)


class DinoV2ViT(VisionTransformer):
    """timm's ViT whose position embedding is interpolated as torch.hub DINOv2 does (`hub_interpolate_pos_embed`).

    Only `_pos_embed` differs; parameters, state dict and every other method are timm's, so the model
    saves and loads as a plain timm ViT. `create_backbone` turns its timm model into this class."""

    pos_offset: float = 0.1
    pos_antialias: bool = False

    def _pos_embed(self, x: Tensor) -> Tensor:
        if self.pos_embed is None or not self.dynamic_img_size:
            return super()._pos_embed(x)
        B, h, w, C = x.shape
        n_prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        pos = self.pos_embed
        patch_pos = hub_interpolate_pos_embed(pos[:, n_prefix:], (h, w), offset=self.pos_offset,
                                              antialias=self.pos_antialias)
        pos = torch.cat([pos[:, :n_prefix], patch_pos], dim=1) if n_prefix else patch_pos
        to_cat = []
        if self.cls_token is not None:
            to_cat.append(self.cls_token.expand(B, -1, -1))
        if self.reg_token is not None:
            to_cat.append(self.reg_token.expand(B, -1, -1))
        x = x.reshape(B, h * w, C)
        if self.no_embed_class:
            x = x + pos
            if to_cat:
                x = torch.cat(to_cat + [x], dim=1)
        else:
            if to_cat:
                x = torch.cat(to_cat + [x], dim=1)
            x = x + pos
        return self.pos_drop(x)


def use_hub_pos_embed(model: VisionTransformer, arch: str) -> VisionTransformer:
    """Give `model` (a timm DINOv2 ViT of architecture `arch`) torch.hub DINOv2's position interpolation."""
    if type(model) is VisionTransformer:
        model.__class__ = DinoV2ViT
    offset, antialias = HUB_POS_INTERP.get(arch, (0.1, False))
    model.pos_offset, model.pos_antialias = offset, antialias
    return model

# ---- the tiny test model ---------------------------------------------------------------------------
# Why: tests and the CPU demo need a DINOv2-shaped ViT (patch 14, CLS token, layer scale, final norm)
# that runs in milliseconds; registered in timm so every code path (timm.create_model, pretrained_cfg,
# forward_features) is the same as for the real models.
default_cfgs = generate_default_cfgs({TEST_MODEL: tiny_model_cfg(56)})


@register_model
def snd_test_vit_patch14(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DINOv2-style ViT (patch 14, depth 2, dim 64, 2 heads, layer scale): random init, or a file given
    through `pretrained_cfg_overlay=dict(file=...)` (how `snd export` round trips are tested)."""
    model_args = dict(patch_size=14, embed_dim=64, depth=2, num_heads=2, init_values=1e-5, img_size=56)
    return build_model_with_cfg(VisionTransformer, TEST_MODEL, pretrained=pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn, **dict(model_args, **kwargs))


# ---- creation ----------------------------------------------------------------------------------------
def resolve_name(name: str) -> str:
    """timm architecture name for `name` (an alias, a timm name, or a timm name with a `.tag`)."""
    base = ALIASES.get(name, name).split(".")[0]
    if base not in SUPPORTED:
        known = ", ".join(list(SUPPORTED) + list(ALIASES))
        raise SndError(f"unknown backbone {name!r}", hint=f"use one of: {known}")
    return base


def spec_of(name: str) -> BackboneSpec:
    """The registry entry of `name` (alias, timm name, or timm name with a `.tag`)."""
    return REGISTRY[resolve_name(name)]


# Default backbone inputs: a frame size floored to whole patches of the backbone, so the DINOv2 defaults are
# the official sizes (574x868 and 476x630 at patch 14) and a DINOv3 run (patch 16: 576x880, 480x640) needs no
# size flags. Stage two's frame is SnD's MVSplat input; the probes' is the eval datasets' 480x640 frames.
DISTILL_FRAME_HW = (576, 880)
PROBE_FRAME_HW = (480, 640)


def with_input_hw(cfg, patch: int, frame_hw: tuple[int, int]):
    """`cfg` (any dataclass config with `img_height`/`img_width`) with each size that is None set to
    `frame_hw`'s floored to a multiple of `patch`; sizes the user gave are kept (and checked elsewhere)."""
    from dataclasses import replace

    h, w = cfg.img_height, cfg.img_width
    if h is not None and w is not None:
        return cfg
    return replace(cfg, img_height=h if h is not None else frame_hw[0] // patch * patch,
                   img_width=w if w is not None else frame_hw[1] // patch * patch)


def _download_hint(arch: str) -> str:
    cfg = timm.models.get_pretrained_cfg(arch + ".lvd142m") if REGISTRY[arch].family == "dinov2" else None
    url = getattr(cfg, "url", "") if cfg is not None else ""
    where = REGISTRY[arch].weights.format(url=url, arch=arch)
    return (f"download {where} and pass the file with --weights (Python: weights=...); random init, where a "
            "command offers it (--init random), is only for tests and the demo")


def create_backbone(
    name: str,
    *,
    weights: str | Path | None = None,
    init: Literal["pretrained", "random"] = "pretrained",
    img_size: tuple[int, int] | int | None = None,
    arch_overrides: dict | None = None,
) -> VisionTransformer:
    """A DINOv2 / DINOv3 ViT from timm with dynamic input size, weights loaded strictly from a local file.

    Args:
        name: a `REGISTRY` name (`vit_{small,base}_patch14[_reg4]_dinov2`, `vit_{small,small_plus,base,large}
            _patch16_dinov3[_qkvb]`), a torch.hub alias (`dinov2_vits14`, ...) or a tiny test model
            (`snd_test_vit_patch14`, `snd_test_vit_patch16_dinov3`; random init only).
        weights: local weights file (official .pth, .safetensors, pytorch_model.bin, released SnD .pth) or a
            folder holding one (e.g. a Hugging Face cache folder). Required for `init="pretrained"`.
        init: "pretrained" (needs `weights`) or "random" (seeded by the caller's torch RNG).
        img_size: (H, W) in pixels (multiples of the patch size) the model is meant for: checked
            (`set_input_size`); DINOv2's position embedding stays at the native grid and is interpolated per
            forward (hub DINOv2 rule); DINOv3's RoPE is computed for the grid (and cached).
        arch_overrides: timm architecture arguments to override (e.g. ``{"depth": 1}`` in the backbone
            contract test, so every registry entry is checked in seconds).

    Returns:
        `DinoV2ViT` (a timm `VisionTransformer`) or a timm `Eva` (DINOv3) in eval mode, `num_classes=0`,
        `dynamic_img_size=True`.
    """
    if init not in ("pretrained", "random"):
        raise SndError(f"init must be 'pretrained' or 'random', got {init!r}")
    arch = resolve_name(name)
    spec = REGISTRY[arch]
    if init == "pretrained" and spec.test:
        raise SndError(f"{arch} has no pretrained weights", hint="use --init random")
    if init == "pretrained" and weights is None:
        raise SndError(f"backbone {name!r} needs pretrained weights, and snd never downloads them",
                       hint=_download_hint(arch))
    model = timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True, **(arch_overrides or {}))
    model = use_hub_pos_embed(model, arch) if spec.family == "dinov2" else use_cached_rope(model)
    if init == "pretrained":
        from snd.models.weights import load_backbone_weights

        report = load_backbone_weights(model, weights)
        log.info("loaded %s into %s: %s", weights, arch, report)
    elif weights is not None:
        raise SndError("--weights given together with --init random", path=weights,
                       hint="drop --weights, or use --init pretrained")
    if img_size is not None:
        set_input_size(model, img_size)
    return model.eval()


def set_input_size(model: VisionTransformer, img_size: tuple[int, int] | int) -> None:
    """Check that `img_size` (H, W) pixels are multiples of the patch size and record it
    (``model.snd_img_size``). The position embedding is NOT resampled: `DinoV2ViT` interpolates it from
    the native grid on every forward, as torch.hub DINOv2 does (resampling once, as timm's
    ``set_input_size`` does, would give timm's interpolation instead; the per-forward cost is one
    bicubic resize of a 37 x 37 grid)."""
    H, W = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    p = patch_size(model)
    if H % p or W % p:
        raise SndError(f"image size {H}x{W} is not a multiple of the patch size {p}",
                       hint=f"use {H // p * p}x{W // p * p}")
    if isinstance(model, VisionTransformer) and not isinstance(model, DinoV2ViT):
        model.set_input_size(img_size=(H, W))  # a timm ViT from elsewhere: timm's own rule, resampled once
    # Eva (DINOv3): no absolute position embedding; RoPE is built for each input grid
    model.snd_img_size = (H, W)


def patch_size(model: nn.Module) -> int:
    ps = model.patch_embed.patch_size
    return int(ps[0] if isinstance(ps, (tuple, list)) else ps)


def embed_dim(model: nn.Module) -> int:
    return int(model.embed_dim)


# ---- inputs and outputs ------------------------------------------------------------------------------
def normalize(model: nn.Module, images01: Tensor) -> Tensor:
    """Images in [0, 1] [B, 3, H, W] -> normalised with the mean/std of the model's pretrained config."""
    assert images01.ndim == 4 and images01.shape[1] == 3, f"images must be [B, 3, H, W], got {tuple(images01.shape)}"
    try:
        base = _unwrap(model)
    except TypeError:  # not a timm ViT: anything with a pretrained_cfg (or ImageNet defaults)
        base = model
    mean, std = _mean_std(base, images01.device, images01.dtype)
    return (images01 - mean) / std


def _mean_std(model: nn.Module, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """[3, 1, 1] mean/std from the pretrained config, cached per device/dtype (no host-to-device copy per step)."""
    cache = model.__dict__.setdefault("_snd_mean_std", {})
    key = (str(device), dtype)
    if key not in cache:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean = torch.tensor(cfg.get("mean", IMAGENET_DEFAULT_MEAN), dtype=dtype).view(3, 1, 1).to(device)
        std = torch.tensor(cfg.get("std", IMAGENET_DEFAULT_STD), dtype=dtype).view(3, 1, 1).to(device)
        cache[key] = (mean, std)
    return cache[key]


def extract(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """Final-norm CLS token and patch features of normalised images.

    Args:
        model: a timm ViT (plain, or wrapped by peft: anything with `forward_features`).
        images: [B, 3, H, W] normalised, H and W multiples of the patch size.

    Returns:
        cls [B, C] and patches [B, C, H/p, W/p] (p the patch size; register tokens dropped).
    """
    base = _unwrap(model)
    p = patch_size(base)
    B, three, H, W = images.shape
    assert three == 3, f"images must be [B, 3, H, W], got {tuple(images.shape)}"
    assert H % p == 0 and W % p == 0, f"image size {H}x{W} must be a multiple of patch size {p}"
    tokens = model.forward_features(images)  # [B, prefix + h*w, C]
    n_prefix = base.num_prefix_tokens
    h, w = H // p, W // p
    assert tokens.shape[1] == n_prefix + h * w, f"tokens {tuple(tokens.shape)} vs grid {h}x{w} + {n_prefix}"
    cls = tokens[:, 0]
    patches = tokens[:, n_prefix:].transpose(1, 2).reshape(B, tokens.shape[-1], h, w)
    return cls, patches


def _unwrap(model: nn.Module) -> nn.Module:
    """The timm ViT (VisionTransformer or Eva) inside a peft / DDP / compile wrapper."""
    seen = 0
    while not isinstance(model, VIT_TYPES) and seen < 8:
        for attr in ("module", "_orig_mod", "base_model", "model"):
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            break
        seen += 1
    if not isinstance(model, VIT_TYPES):
        raise TypeError(f"expected a timm VisionTransformer or Eva (maybe wrapped), got {type(model).__name__}")
    return model
