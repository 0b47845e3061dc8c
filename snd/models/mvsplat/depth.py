"""MVSplat's depth predictor: plane-sweep cost volume -> cost-volume U-Net -> softmax over inverse-depth
candidates -> full-resolution refinement U-Net -> per-pixel depth, confidence and raw Gaussian
parameters.

Reimplemented from github.com/donydchen/mvsplat `src/model/encoder/costvolume/depth_predictor_multiview.py`
(module names equal upstream's). Batches are (b v)-ordered here ([B*V, ...]); upstream uses (v b).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import corr_kernel
from .config import MVSplatConfig
from .geometry import inverse_depth_candidates, plane_sweep_grid, rigid_inverse
from .unet import GroupNormF32, UNetModel

# Upper bound on the fp32 warped-feature chunk of the cost volume (bytes); the volume is built in
# depth chunks so memory stays flat with batch size.
WARP_CHUNK_BYTES = 1 << 30

# to_gaussians channels actually used by SnD: 2 offsets + 3 scales + 4 rotation (SH colours dropped).
USED_RAW_CHANNELS = 9


@dataclass
class DepthPrediction:
    """Per-pixel outputs at full resolution ([B, V, ...])."""

    depth: Tensor  # [B, V, H, W] fp32, in [near, far]
    density: Tensor  # [B, V, H, W] fp32 in (0, 1), the confidence upstream maps to opacity
    raw: Tensor  # [B, V, H, W, 9] fp32: offset logits (2), scale logits (3), rotation xyzw (4)
    coarse_depth: Tensor  # [B, V, h, w] fp32, the cost volume's softmax estimate at 1/4 resolution


def correlation_volume(feat_ref: Tensor, feat_src: Tensor, grid: Tensor, *, chunk_bytes: int = WARP_CHUNK_BYTES,
                       kernel: bool = False) -> Tensor:
    """<f_ref(p), f_src(warp(p, d))> / sqrt(C) for every pixel and depth candidate.

    Args:
        feat_ref, feat_src: [N, C, h, w] (any float dtype; sampled in fp32).
        grid: [N, D, h, w, 2] from `plane_sweep_grid`.
        kernel: on CUDA, snd's fused Triton kernel (`corr_kernel`: no [N, C, D, h, w] warped features in
            memory) instead of `grid_sample` + multiply + sum in depth chunks of `chunk_bytes`.
    Returns:
        [N, D, h, w] fp32.
    """
    N, C, h, w = feat_ref.shape
    D = grid.shape[1]
    assert grid.shape == (N, D, h, w, 2), f"grid {tuple(grid.shape)} vs features {tuple(feat_ref.shape)}"
    if kernel and feat_ref.is_cuda and corr_kernel.available():
        return corr_kernel.correlation(feat_ref, feat_src, grid)
    ref = feat_ref.float().contiguous()
    src = feat_src.float().contiguous()
    step = max(1, min(D, chunk_bytes // max(1, N * C * h * w * 4)))
    out = []
    for d0 in range(0, D, step):
        g = grid[:, d0:d0 + step]
        dc = g.shape[1]
        warped = F.grid_sample(src, g.reshape(N, dc * h, w, 2), mode="bilinear", padding_mode="zeros",
                               align_corners=True).view(N, C, dc, h, w)
        out.append((ref[:, :, None] * warped).sum(1))
    return torch.cat(out, 1) / math.sqrt(C)


def plane_sweep_grids(K_norm: Tensor, c2w: Tensor, near: Tensor, far: Tensor, num: int, h: int, w: int
                      ) -> tuple[Tensor, Tensor]:
    """The two-view plane sweep's sampling grids (fp32): view v's pixels at each candidate depth, in view 1 - v.

    Args:
        K_norm: [B, 2, 3, 3] normalised intrinsics.  c2w: [B, 2, 4, 4].  near, far: [B, 2].
        num: depth candidates, uniform in inverse depth between 1/far and 1/near.  h, w: the feature size.
    Returns:
        (grid [B*2, num, h, w, 2] for `correlation_volume`, candidate disparities [B*2, num]), (b v)-ordered.
    """
    N = K_norm.shape[0] * 2
    with torch.autocast(device_type=K_norm.device.type, enabled=False):
        Kf = K_norm.float().clone()  # upstream: normalised K times the feature size
        Kf[..., 0, :] *= w
        Kf[..., 1, :] *= h
        ref_to_src = rigid_inverse(c2w.flip(1)) @ c2w.float()  # [B, V, 4, 4]
        disp = inverse_depth_candidates(near, far, num).reshape(N, num)
        grid = plane_sweep_grid(Kf.reshape(N, 3, 3), Kf.flip(1).reshape(N, 3, 3), ref_to_src.reshape(N, 4, 4),
                                disp, h, w)
    return grid, disp


def plane_sweep_correlation(feats: Tensor, K_norm: Tensor, c2w: Tensor, near: Tensor, far: Tensor, num: int, *,
                            chunk_bytes: int = WARP_CHUNK_BYTES, kernel: bool = False) -> tuple[Tensor, Tensor]:
    """Two-view plane-sweep cost volume (fp32, autocast off).

    Args:
        feats: [B, 2, C, h, w] per-view features; view v is matched against view 1 - v.
        K_norm, c2w, near, far, num: as `plane_sweep_grids`.
        kernel: use the fused CUDA kernel (`correlation_volume`).
    Returns:
        (correlation [B*2, num, h, w], candidate disparities [B*2, num]), (b v)-ordered.
    """
    B, V, C, h, w = feats.shape
    assert V == 2, f"the cost volume is implemented for 2 context views, got {V}"
    N = B * V
    grid, disp = plane_sweep_grids(K_norm, c2w, near, far, num, h, w)
    with torch.autocast(device_type=feats.device.type, enabled=False):
        corr = correlation_volume(feats.reshape(N, C, h, w), feats.flip(1).reshape(N, C, h, w), grid,
                                  chunk_bytes=chunk_bytes, kernel=kernel)
    return corr, disp


def conv_aligned(conv: nn.Conv2d, parts: list[Tensor], *, align: int | None = None) -> Tensor:
    """`conv(torch.cat(parts, 1))`, on CUDA with zero channels appended up to a multiple of 8 (and zero weights for
    them). Why: cuDNN's NHWC kernels want channel counts in multiples of 8 and otherwise pad the input themselves,
    a copy of the whole full-resolution map per call (nhwcAddPaddingKernel); appending the zeros in the concatenation
    that is written anyway is free, and a zero channel adds exactly 0 to every output. MVSplat's 163- and
    37-channel full-resolution convolutions went from 16.9 / 3.3 to 11.9 / 2.0 ms per batch of 8 pairs on an H100
    (`docs/bench/profile_mvsplat_corr_h100.jsonl`); on the CPU nothing changes (`align`: None = 8 on CUDA, 1 else)."""
    cin = sum(int(t.shape[1]) for t in parts)
    pad = -cin % (align or (8 if parts[0].is_cuda else 1))
    if pad == 0:
        return conv(torch.cat(parts, 1))
    p0 = parts[0]
    x = torch.cat([*parts, p0.new_zeros(p0.shape[0], pad, *p0.shape[2:])], 1)
    if p0.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
    weight = F.pad(conv.weight, (0, 0, 0, 0, 0, pad))
    return F.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class DepthPredictorMultiView(nn.Module):
    def __init__(self, cfg: MVSplatConfig):
        super().__init__()
        C, D = cfg.d_feature, cfg.num_depth_candidates
        self.num_depth_candidates = D
        # the cost volume's correlation through snd's fused kernel on CUDA (`corr_kernel`; set by the encoder)
        self.corr_kernel = False
        self.upscale_factor = cfg.downscale_factor
        cv_ch = cfg.costvolume_unet_feat_dim
        cv_in = D + C
        self.corr_refine_net = nn.Sequential(
            nn.Conv2d(cv_in, cv_ch, 3, 1, 1),
            GroupNormF32(8, cv_ch),
            nn.GELU(),
            UNetModel(cv_ch, cv_ch, cv_ch, attention_resolutions=cfg.costvolume_unet_attn_res,
                      channel_mult=cfg.costvolume_unet_channel_mult, num_views=cfg.num_views),
            nn.Conv2d(cv_ch, D, 3, 1, 1),
        )
        self.regressor_residual = nn.Conv2d(cv_in, D, 1, 1, 0)
        self.depth_head_lowres = nn.Sequential(nn.Conv2d(D, 2 * D, 3, 1, 1), nn.GELU(), nn.Conv2d(2 * D, D, 3, 1, 1))
        self.upsampler = nn.Sequential(
            nn.Conv2d(2 * C, C, 3, 1, 1),
            nn.Upsample(scale_factor=cfg.downscale_factor, mode="bilinear", align_corners=True),
            nn.GELU(),
        )
        fd = cfg.depth_unet_feat_dim
        self.proj_feature = nn.Conv2d(C, fd, 3, 1, 1)
        self.refine_unet = nn.Sequential(
            nn.Conv2d(3 + fd + 1 + 1, fd, 3, 1, 1),
            GroupNormF32(4, fd),
            nn.GELU(),
            UNetModel(fd, fd, fd, attention_resolutions=cfg.depth_unet_attn_res,
                      channel_mult=cfg.depth_unet_channel_mult, num_views=cfg.num_views),
        )
        raw = cfg.gaussian_raw_channels
        self.to_gaussians = nn.Sequential(nn.Conv2d(fd + 3 + C, 2 * raw, 3, 1, 1), nn.GELU(), nn.Conv2d(2 * raw, raw, 3, 1, 1))
        self.to_disparity = nn.Sequential(nn.Conv2d(fd, 2 * fd, 3, 1, 1), nn.GELU(), nn.Conv2d(2 * fd, 2, 3, 1, 1))

    def forward(self, feats: Tensor, cnn_feats: Tensor, images: Tensor, K_norm: Tensor, c2w: Tensor,
                near: Tensor, far: Tensor) -> DepthPrediction:
        """feats, cnn_feats: [B, V, C, h, w]; images [B, V, 3, H, W] in [0, 1]; K_norm [B, V, 3, 3];
        c2w [B, V, 4, 4]; near, far [B, V]."""
        B, V, C, h, w = feats.shape
        H, W = images.shape[-2:]
        N, D = B * V, self.num_depth_candidates
        f_ref = feats.reshape(N, C, h, w)

        corr, disp = plane_sweep_correlation(feats, K_norm, c2w, near, far, D,
                                             kernel=self.corr_kernel)  # fp32 [N, D, h, w], [N, D]
        x = torch.cat([corr.to(f_ref.dtype), f_ref], 1)  # [N, D + C, h, w]
        raw_corr = self.corr_refine_net(x) + self.regressor_residual(x)
        logits = self.depth_head_lowres(raw_corr)
        with torch.autocast(device_type=feats.device.type, enabled=False):
            pdf = torch.softmax(logits.float(), dim=1)  # [N, D, h, w]
            coarse_disp = (disp[:, :, None, None] * pdf).sum(1, keepdim=True)
            pdf_max = F.interpolate(pdf.amax(1, keepdim=True), scale_factor=self.upscale_factor, mode="nearest")
            full_disp = F.interpolate(coarse_disp, scale_factor=self.upscale_factor, mode="bilinear", align_corners=True)

        proj_full = self.upsampler(torch.cat([f_ref, cnn_feats.reshape(N, C, h, w).to(f_ref.dtype)], 1))
        proj = self.proj_feature(proj_full)
        imgs = images.reshape(N, 3, H, W)
        cdt = proj.dtype
        refine_out = conv_aligned(self.refine_unet[0], [imgs.to(cdt), proj, full_disp.to(cdt), pdf_max.to(cdt)])
        for layer in self.refine_unet[1:]:
            refine_out = layer(refine_out)

        rdt = refine_out.dtype
        g = self.to_gaussians[1](conv_aligned(self.to_gaussians[0], [refine_out, imgs.to(rdt), proj_full.to(rdt)]))
        last = self.to_gaussians[2]
        raw = F.conv2d(g, last.weight[:USED_RAW_CHANNELS], last.bias[:USED_RAW_CHANNELS], padding=1)
        dd = self.to_disparity(refine_out)

        with torch.autocast(device_type=feats.device.type, enabled=False):
            dd = dd.float()
            lo = (1.0 / far.float()).reshape(N, 1, 1, 1)
            hi = (1.0 / near.float()).reshape(N, 1, 1, 1)
            fine_disp = torch.minimum(torch.maximum(full_disp + dd[:, :1], lo), hi)
            depth = (1.0 / fine_disp).reshape(B, V, H, W)
            density = torch.sigmoid(dd[:, 1]).reshape(B, V, H, W)
            raw = raw.float().permute(0, 2, 3, 1).reshape(B, V, H, W, USED_RAW_CHANNELS)
            coarse = (1.0 / coarse_disp).reshape(B, V, h, w)
        return DepthPrediction(depth=depth, density=density, raw=raw, coarse_depth=coarse)


__all__ = ["DepthPredictorMultiView", "DepthPrediction", "conv_aligned", "correlation_volume", "plane_sweep_correlation",
           "plane_sweep_grids", "WARP_CHUNK_BYTES"]
