"""The 2D U-Net MVSplat uses twice (cost-volume refinement at 1/4 resolution, depth refinement at
full resolution): latent-diffusion's `UNetModel` stripped to what MVSplat instantiates.

Reimplemented from github.com/donydchen/mvsplat `src/model/encoder/costvolume/ldm_unet/unet.py` with
MVSplat's arguments (post-norm ResBlocks, one ResBlock per level, conv down/up-sampling, 32-channel
attention heads whose tokens span both views, no timestep embedding). Module names equal upstream's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GroupNormF32(nn.GroupNorm):
    """GroupNorm computed in fp32 and cast back (upstream's GroupNorm8/GroupNorm4 do the same)."""

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)


def normalization(channels: int) -> GroupNormF32:
    """Upstream's rule: 8 groups when channels divide by 8, else 4."""
    return GroupNormF32(8 if channels % 8 == 0 else 4, channels)


class ResBlock(nn.Module):
    """Post-norm residual block: skip(x) + [conv-GN-SiLU]x2 (x)."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        out = out_channels or channels
        self.in_layers = nn.Sequential(nn.Conv2d(channels, out, 3, padding=1), normalization(out), nn.SiLU())
        self.out_layers = nn.Sequential(nn.Conv2d(out, out, 3, padding=1), normalization(out), nn.SiLU())
        nn.init.zeros_(self.out_layers[1].weight)  # upstream zero_module on the post-norm
        nn.init.zeros_(self.out_layers[1].bias)
        self.skip_connection = nn.Identity() if out == channels else nn.Conv2d(channels, out, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.skip_connection(x) + self.out_layers(self.in_layers(x))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class AttentionBlock(nn.Module):
    """Post-norm self-attention over the tokens of *all views* of a sample (upstream's
    `use_cross_view_self_attn`): x + GN(proj(attn(qkv(x)))).

    qkv is upstream's legacy layout: output channel = head * 3 * d + {q, k, v} * d + i (d = 32).
    The input batch is (b v)-ordered [B*V, C, h, w]; upstream orders (v b), which only permutes
    the token order inside attention and so gives identical results.
    """

    def __init__(self, channels: int, num_head_channels: int = 32, num_views: int = 2):
        super().__init__()
        assert channels % num_head_channels == 0, (channels, num_head_channels)
        self.num_heads = channels // num_head_channels
        self.num_views = num_views
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        self.norm = normalization(channels)
        nn.init.zeros_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)

    def forward(self, x: Tensor) -> Tensor:
        N, C, h, w = x.shape
        V, nh = self.num_views, self.num_heads
        B, d, T = N // V, C // nh, h * w
        qkv = F.conv2d(x, self.qkv.weight[..., None], self.qkv.bias)  # [N, 3C, h, w]
        qkv = qkv.reshape(B, V, nh, 3, d, T).permute(3, 0, 2, 1, 5, 4).reshape(3, B, nh, V * T, d)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [B, nh, V*T, d]
        a = a.reshape(B, nh, V, T, d).permute(0, 2, 1, 4, 3).reshape(N, C, T)
        hdn = self.norm(F.conv1d(a, self.proj_out.weight, self.proj_out.bias))
        return x + hdn.reshape(N, C, h, w).to(x.dtype)


class UNetModel(nn.Module):
    """MVSplat's U-Net: in-conv, per level [ResBlock (+Attn)] (+Downsample), middle [ResBlock, -, ResBlock],
    mirrored decoder with skip concatenation, out [conv, GN, SiLU]. `attention_resolutions` are
    downsampling factors (1, 2, 4, ...) at which attention blocks are inserted."""

    def __init__(self, in_channels: int, model_channels: int, out_channels: int, *,
                 attention_resolutions: tuple[int, ...], channel_mult: tuple[int, ...],
                 num_head_channels: int = 32, num_views: int = 2, num_res_blocks: int = 1):
        super().__init__()
        self.input_blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_head_channels, num_views))
                self.input_blocks.append(nn.Sequential(*layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(nn.Sequential(Downsample(ch)))
                chans.append(ch)
                ds *= 2
        self.middle_block = nn.Sequential(ResBlock(ch), nn.Identity(), ResBlock(ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_head_channels, num_views))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(nn.Sequential(*layers))
        self.out = nn.Sequential(nn.Conv2d(model_channels, out_channels, 3, padding=1),
                                 normalization(out_channels), nn.SiLU())

    def forward(self, x: Tensor) -> Tensor:
        hs = []
        h = x
        for block in self.input_blocks:
            h = block(h)
            hs.append(h)
        h = self.middle_block(h)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1))
        return self.out(h)


__all__ = ["UNetModel", "ResBlock", "AttentionBlock", "GroupNormF32"]
