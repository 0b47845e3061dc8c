"""MVSplat's feature backbone: UniMatch's ResNet-like CNN (1/4 resolution) + a 6-layer multi-view
transformer (window self-attention, cross-attention to the other view, FFN).

Reimplemented from github.com/donydchen/mvsplat (`src/model/encoder/backbone/`, itself from
UniMatch/GMFlow); module and parameter names equal upstream's so checkpoints load strictly.
Token maps are kept channels-last ([N, H, W, C]) inside the transformer: linear layers and SDPA
want that layout, and it saves the transposes upstream does per layer.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import window_attention

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ResidualBlock(nn.Module):
    """conv-IN-ReLU x2 with a (strided 1x1 conv + IN) shortcut when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.norm1 = nn.InstanceNorm2d(planes)
        self.norm2 = nn.InstanceNorm2d(planes)
        if stride == 1 and in_planes == planes:
            self.downsample = None
        else:
            self.norm3 = nn.InstanceNorm2d(planes)
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride), self.norm3)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = F.relu(self.norm2(self.conv2(y)))
        if self.downsample is not None:
            x = self.downsample(x)
        return F.relu(x + y)


class CNNEncoder(nn.Module):
    """UniMatch's CNN: 7x7/2 stem, three 2-block stages (64, 96, 128 ch), 1x1 head; output at 1/4
    (MVSplat's downscale 4: the third stage keeps stride 1)."""

    def __init__(self, output_dim: int = 128, downscale_factor: int = 4):
        super().__init__()
        if downscale_factor not in (4, 8):
            raise ValueError(f"downscale_factor must be 4 or 8, got {downscale_factor}")
        dims = (64, 96, 128)
        self.conv1 = nn.Conv2d(3, dims[0], 7, stride=2, padding=3, bias=False)
        self.norm1 = nn.InstanceNorm2d(dims[0])
        self.layer1 = nn.Sequential(ResidualBlock(dims[0], dims[0]), ResidualBlock(dims[0], dims[0]))
        self.layer2 = nn.Sequential(ResidualBlock(dims[0], dims[1], 2), ResidualBlock(dims[1], dims[1]))
        s3 = 2 if downscale_factor == 8 else 1
        self.layer3 = nn.Sequential(ResidualBlock(dims[1], dims[2], s3), ResidualBlock(dims[2], dims[2]))
        self.conv2 = nn.Conv2d(dims[2], output_dim, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.norm1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.conv2(x)


def sine_position_embedding(h: int, w: int, channels: int, *, device=None) -> Tensor:
    """DETR's normalised sine embedding of an h x w grid -> [h, w, channels] (fp32).

    First half encodes y, second half x; within each half, channel 2i is sin and 2i+1 cos of the same
    frequency 10000^(2i/half). Coordinates are (index+1)/(n+1e-6) * 2*pi, as upstream.
    """
    half = channels // 2
    y = (torch.arange(1, h + 1, dtype=torch.float32, device=device) / (h + 1e-6)) * (2 * math.pi)
    x = (torch.arange(1, w + 1, dtype=torch.float32, device=device) / (w + 1e-6)) * (2 * math.pi)
    dim_t = torch.arange(half, dtype=torch.float32, device=device)
    dim_t = 10000 ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / half)

    def enc(c: Tensor) -> Tensor:  # [n] -> [n, half]
        p = c[:, None] / dim_t
        return torch.stack((p[:, 0::2].sin(), p[:, 1::2].cos()), dim=2).flatten(1)

    py, px = enc(y), enc(x)  # [h, half], [w, half]
    return torch.cat([py[:, None, :].expand(h, w, half), px[None, :, :].expand(h, w, half)], dim=-1)


class TransformerLayer(nn.Module):
    """Single-head window attention (source attends to target) + merge + LayerNorm [+ FFN + LN]."""

    def __init__(self, d_model: int, *, ffn: bool, ffn_dim_expansion: int = 4):
        super().__init__()
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.merge = nn.Linear(d_model, d_model, bias=False)
        self.norm1 = nn.LayerNorm(d_model)
        self.has_ffn = ffn
        if ffn:
            c = 2 * d_model
            self.mlp = nn.Sequential(nn.Linear(c, c * ffn_dim_expansion, bias=False), nn.GELU(),
                                     nn.Linear(c * ffn_dim_expansion, d_model, bias=False))
            self.norm2 = nn.LayerNorm(d_model)

    def forward(self, source: Tensor, target: Tensor, *, splits: int, shift: bool) -> Tensor:
        """source, target: [N, H, W, C] -> [N, H, W, C]."""
        msg = window_attention(self.q_proj(source), self.k_proj(target), self.v_proj(target),
                               splits=splits, shift=shift)
        msg = self.norm1(self.merge(msg))
        if self.has_ffn:
            msg = self.norm2(self.mlp(torch.cat([source, msg.to(source.dtype)], dim=-1)))
        return source + msg


class TransformerBlock(nn.Module):
    """Self-attention (no FFN), then cross-attention to the other view + FFN."""

    def __init__(self, d_model: int, ffn_dim_expansion: int = 4):
        super().__init__()
        self.self_attn = TransformerLayer(d_model, ffn=False)
        self.cross_attn_ffn = TransformerLayer(d_model, ffn=True, ffn_dim_expansion=ffn_dim_expansion)


class MultiViewFeatureTransformer(nn.Module):
    def __init__(self, num_layers: int = 6, d_model: int = 128, ffn_dim_expansion: int = 4):
        super().__init__()
        self.layers = nn.ModuleList([TransformerBlock(d_model, ffn_dim_expansion) for _ in range(num_layers)])
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, x: Tensor, *, splits: int) -> Tensor:
        """x: [B, V=2, H, W, C] token maps -> same shape.

        Each layer: every view self-attends, then cross-attends to the *layer input* of the other view
        (upstream rebuilds the other-view keys once per layer, before self-attention).
        """
        B, V, H, W, C = x.shape
        assert V == 2, f"the multi-view transformer is implemented for 2 views, got {V}"
        for i, layer in enumerate(self.layers):
            shift = i % 2 == 1
            other = x.flip(1).reshape(B * V, H, W, C)
            flat = x.reshape(B * V, H, W, C)
            s = layer.self_attn(flat, flat, splits=splits, shift=shift)
            x = layer.cross_attn_ffn(s, other, splits=splits, shift=shift).reshape(B, V, H, W, C)
        return x


class BackboneMultiview(nn.Module):
    """Images [B, V, 3, H, W] in [0, 1] -> (transformer features, CNN features), both [B, V, C, H/4, W/4]."""

    def __init__(self, feature_channels: int = 128, downscale_factor: int = 4, num_transformer_layers: int = 6):
        super().__init__()
        self.feature_channels = feature_channels
        self.backbone = CNNEncoder(feature_channels, downscale_factor)
        self.transformer = MultiViewFeatureTransformer(num_transformer_layers, feature_channels)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(3, 1, 1), persistent=False)

    def forward(self, images: Tensor, *, attn_splits: int, channels_last: bool = False) -> tuple[Tensor, Tensor]:
        B, V, _, H, W = images.shape
        x = ((images - self.mean) / self.std).reshape(B * V, 3, H, W)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        cnn = self.backbone(x)  # [BV, C, h, w]
        _, C, h, w = cnn.shape
        # position encoding of one window, tiled over the K x K windows (upstream adds it per split)
        pe = sine_position_embedding(h // attn_splits, w // attn_splits, C, device=cnn.device)
        pe = pe.repeat(attn_splits, attn_splits, 1)  # [h, w, C]
        tokens = cnn.permute(0, 2, 3, 1) + pe  # [BV, h, w, C] (fp32 under autocast, as upstream)
        feats = self.transformer(tokens.reshape(B, V, h, w, C), splits=attn_splits)
        return feats.permute(0, 1, 4, 2, 3), cnn.reshape(B, V, C, h, w)


__all__ = ["BackboneMultiview", "CNNEncoder", "MultiViewFeatureTransformer", "sine_position_embedding"]
