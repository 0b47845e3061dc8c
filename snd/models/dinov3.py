"""DINOv3 backbones through timm's `Eva`: the tiny test model, and rotary embeddings cached per grid.

Why timm's Eva: timm 1.0.x ports DINOv3 (`vit_*_patch16_dinov3[_qkvb]`) as an `Eva` with rotary position
embeddings (RoPE, `RotaryEmbeddingDinoV3`), 4 register ("storage") tokens and layer scale, numerically
aligned with facebookresearch/dinov3; snd keeps no model code.

Why a RoPE cache: timm builds the RoPE coordinate grid on the CPU and copies it to the device on every
forward. A host-to-device copy cannot be captured in a CUDA graph (the fast path), and it is wasted work
per step anyway: for a fixed grid the sin/cos table never changes (training-time coordinate augmentation is
off in every DINOv3 config). `use_cached_rope` gives the model's RoPE module a per-(grid, device, dtype)
cache, filled at the first (warm-up) forward, so the captured graph reads a fixed tensor.
"""
from __future__ import annotations

import inspect

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.eva import Eva, checkpoint_filter_fn
from torch import Tensor, nn

__all__ = ["TEST_MODEL_V3", "CachedRopeDinoV3", "tiny_model_cfg", "use_cached_rope"]

TEST_MODEL_V3 = "snd_test_vit_patch16_dinov3"
# timm 1.0.29 (the GPU machine's) has `get_embed(shape)`, 1.0.31 (requirements.txt) adds `dtype`: pass it where it exists
_GET_EMBED_DTYPE = "dtype" in inspect.signature(RotaryEmbeddingDinoV3.get_embed).parameters


class CachedRopeDinoV3(RotaryEmbeddingDinoV3):
    """timm's DINOv3 RoPE whose table is computed once per (grid, device, dtype) (see the module docstring).

    Same numbers as timm's `get_embed` (it is called to fill the cache); only used when no coordinate
    augmentation is active (then every call draws new coordinates and nothing is cached)."""

    def get_embed(self, shape=None, dtype=None) -> Tensor:  # noqa: ANN001 - timm's signature
        if self.training and self.aug_active:
            return self._timm_embed(shape, dtype)
        key = (tuple(shape) if shape is not None else None, str(self.periods.device), dtype, self.periods.dtype)
        cache = self.__dict__.setdefault("_snd_rope_cache", {})
        if key not in cache:
            cache[key] = self._timm_embed(shape, dtype)
        return cache[key]

    def _timm_embed(self, shape, dtype) -> Tensor:  # noqa: ANN001
        return super().get_embed(shape, dtype) if _GET_EMBED_DTYPE else super().get_embed(shape)

    def _apply(self, fn, *args, **kwargs):  # noqa: ANN001 - nn.Module's signature
        self.__dict__.pop("_snd_rope_cache", None)  # device/dtype moves rebuild the table
        return super()._apply(fn, *args, **kwargs)


def use_cached_rope(model: nn.Module) -> nn.Module:
    """Give every timm DINOv3 RoPE module of `model` the per-grid cache (in place; state dict unchanged)."""
    for m in model.modules():
        if type(m) is RotaryEmbeddingDinoV3:
            m.__class__ = CachedRopeDinoV3
    return model


# ---- the tiny test model ---------------------------------------------------------------------------
# Why: tests need a DINOv3-shaped model (patch 16, RoPE, 4 registers, layer scale, no qkv bias) that runs in
# milliseconds; registered in timm so creation, pretrained_cfg and forward_features are the real code paths.
def tiny_model_cfg(side: int) -> dict:
    """timm pretrained config of a tiny test model (ImageNet mean/std, no URL: random init or a local file)."""
    return {"url": "", "num_classes": 0, "input_size": (3, side, side), "crop_pct": 1.0,
            "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "license": "apache-2.0",
            "first_conv": "patch_embed.proj", "classifier": "head"}


default_cfgs = generate_default_cfgs({TEST_MODEL_V3: tiny_model_cfg(64)})


@register_model
def snd_test_vit_patch16_dinov3(pretrained: bool = False, **kwargs) -> Eva:
    """DINOv3-style Eva (patch 16, depth 2, dim 64, 2 heads, RoPE, 4 registers): random init, or a file given
    through `pretrained_cfg_overlay=dict(file=...)` (export round trips)."""
    import torch.nn as tnn
    from functools import partial

    model_args = dict(patch_size=16, img_size=64, dynamic_img_size=True, embed_dim=64, depth=2, num_heads=2,
                      qkv_bias=False, init_values=1e-5, rope_type="dinov3", rope_temperature=100,
                      rope_rotate_half=True, use_rot_pos_emb=True, use_abs_pos_emb=False, num_reg_tokens=4,
                      use_fc_norm=False, norm_layer=partial(tnn.LayerNorm, eps=1e-5))
    return build_model_with_cfg(Eva, TEST_MODEL_V3, pretrained=pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                **dict(model_args, **kwargs))
