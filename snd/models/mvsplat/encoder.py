"""MVSplat's cost-volume encoder (frozen, inference only): two context views -> pixel-aligned Gaussians.

`MVSplatEncoder(cfg).state_dict()` has exactly upstream `EncoderCostVolume`'s keys, shapes and dtypes
(tests/data/mvsplat_*_state_dict.txt), so a Lightning checkpoint's `encoder.*` tensors load strictly.
The forward pass follows upstream `encoder_costvolume.py` + `gaussian_adapter.py`, minus what SnD
does not use (SH colours, visualisation) and with fp32 camera math under bf16/fp16 autocast.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor, nn

from snd.errors import SndError
from snd.splat.gaussians import PixelGaussians

from . import corr_kernel as corr_kernels
from .backbone import BackboneMultiview
from .config import MVSplatConfig, resolve_config
from .depth import DepthPredictorMultiView
from .geometry import activate_scales, covariances_from, gaussian_means, world_quats

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")


@dataclass
class MVSplatOutput:
    """Per-batch-item Gaussians plus the compact per-pixel quantities they were built from.

    `means == gaussian_means(depth, offset_xy, K_norm, c2w)` exactly (same function, fp32), so a cache
    may store depth + offsets instead of means.
    """

    gaussians: list[PixelGaussians]  # one per batch item, [V=2, H, W]; views of the stacked tensors below
    depth: Tensor  # [B, V, H, W] distance along the unit pixel ray (upstream semantics), in [near, far]
    offset_xy: Tensor  # [B, V, H, W, 2] sub-pixel shift (x, y) in pixels, in (-0.5, 0.5)
    means: Tensor  # [B, V, H, W, 3] world
    quats: Tensor  # [B, V, H, W, 4] unit (w, x, y, z), world, w >= 0
    scales: Tensor  # [B, V, H, W, 3] std devs along the rotated axes (world units)
    opacities: Tensor  # [B, V, H, W] in (0, 1)
    coarse_depth: Tensor  # [B, V, H/4, W/4] the cost volume's z-depth estimate (diagnostics)
    covariances: Optional[Tensor] = None  # [B, V, H, W, 3, 3] world, when asked for


def resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """'auto' -> bf16 on CUDA, fp32 elsewhere. Returns the autocast dtype, or None for plain fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _depth_range(near: "float | Tensor", far: "float | Tensor", B: int, V: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """near/far as [B, V] device tensors, checked where the values live on the host (numbers, CPU tensors).
    Device tensors are used unchecked: reading them back, or a blocking copy in, would synchronise the
    stream and stall a caller that queues batches ahead (stage one)."""
    host = [x for x in (near, far) if not isinstance(x, Tensor) or x.device.type == "cpu"]
    if len(host) == 2:
        n, f = (torch.as_tensor(x, dtype=torch.float32) for x in host)
        if not bool((n > 0).all() and (f > n).all()):
            raise ValueError(f"need 0 < near < far, got near={n.tolist()} far={f.tolist()}")

    def dev(x: "float | Tensor") -> Tensor:
        if not isinstance(x, Tensor):
            return torch.full((B, V), float(x), device=device)  # filled on the device: no copy at all
        return x.to(device, torch.float32, non_blocking=True).expand(B, V)

    return dev(near), dev(far)


class MVSplatEncoder(nn.Module):
    """Upstream `EncoderCostVolume` (2 context views), inference only.

    Args:
        cfg: architecture (a preset name or a `MVSplatConfig`).
        corr_kernel: the cost volume's correlation through snd's fused Triton kernel on CUDA (the same values up to
            fp32 rounding; `corr_kernel`); None: on unless ``SND_CORR_KERNEL=off``. No effect on the CPU.
    """

    def __init__(self, cfg: "MVSplatConfig | str" = "scannetpp", *, corr_kernel: Optional[bool] = None):
        super().__init__()
        self.cfg = resolve_config(cfg)
        self.backbone = BackboneMultiview(self.cfg.d_feature, self.cfg.downscale_factor)
        self.depth_predictor = DepthPredictorMultiView(self.cfg)
        self.depth_predictor.corr_kernel = corr_kernels.enabled() if corr_kernel is None else bool(corr_kernel)
        self.channels_last = False
        self._compiled = None

    # -- setup ----------------------------------------------------------------------------------
    def use_channels_last(self, enabled: bool = True) -> "MVSplatEncoder":
        """Run convolutions in NHWC (faster cuDNN kernels for bf16/fp16 on GPU)."""
        self.channels_last = enabled
        fmt = torch.channels_last if enabled else torch.contiguous_format
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data = m.weight.data.contiguous(memory_format=fmt)
        return self

    def compile_networks(self, **kwargs) -> "MVSplatEncoder":
        """torch.compile the network part (camera math stays eager). kwargs go to torch.compile."""
        self._compiled = torch.compile(self._networks, **kwargs)
        return self

    # -- forward --------------------------------------------------------------------------------
    def _networks(self, images: Tensor, K_norm: Tensor, c2w: Tensor, near: Tensor, far: Tensor):
        feats, cnn = self.backbone(images, attn_splits=self.cfg.multiview_trans_attn_split,
                                   channels_last=self.channels_last)
        return self.depth_predictor(feats, cnn, images, K_norm, c2w, near, far)

    @torch.no_grad()
    def forward(self, images: Tensor, K_norm: Tensor, c2w: Tensor, near: Tensor, far: Tensor, *,
                precision: Precision = "auto", with_covariances: bool = False) -> MVSplatOutput:
        """Predict pixel-aligned Gaussians for B context pairs.

        Args:
            images: [B, 2, 3, H, W] RGB in [0, 1]; H, W multiples of `cfg.size_multiple` (16).
            K_norm: [B, 2, 3, 3] normalised intrinsics (`geometry.pixel_K_to_normalized`).
            c2w: [B, 2, 4, 4] OpenCV camera-to-world.
            near, far: [B, 2] depth range of the plane sweep (SnD ScanNet++: 1, 100).
            precision: network autocast dtype; 'auto' = bf16 on CUDA, fp32 on CPU. Camera math is fp32.
            with_covariances: also return world covariances [B, 2, H, W, 3, 3].
        """
        B, V, three, H, W = images.shape
        assert three == 3 and V == 2, f"images must be [B, 2, 3, H, W], got {tuple(images.shape)}"
        assert K_norm.shape == (B, V, 3, 3), f"K_norm must be [B, 2, 3, 3], got {tuple(K_norm.shape)}"
        assert c2w.shape == (B, V, 4, 4), f"c2w must be [B, 2, 4, 4], got {tuple(c2w.shape)}"
        near, far = _depth_range(near, far, B, V, images.device)
        m = self.cfg.size_multiple
        if H % m or W % m:
            raise SndError(
                f"MVSplat needs image height and width divisible by {m}, got {H}x{W}",
                hint=f"resize or crop to e.g. {H // m * m}x{W // m * m} (SnD uses 576x880)")
        dev = images.device
        amp = resolve_precision(precision, dev)
        ctx = torch.autocast(device_type=dev.type, dtype=amp) if amp is not None else nullcontext()
        images = images.float()
        K_norm, c2w = K_norm.float(), c2w.float()
        run = self._compiled if self._compiled is not None else self._networks
        if self._compiled is not None:  # a new step for CUDA-graph replays: the previous outputs are consumed
            torch.compiler.cudagraph_mark_step_begin()
        with ctx:
            pred = run(images, K_norm, c2w, near, far)

        # Gaussian adapter, fp32 (upstream gaussian_adapter.py)
        raw = pred.raw  # [B, V, H, W, 9]
        offset_xy = torch.sigmoid(raw[..., 0:2]) - 0.5
        depth = pred.depth
        means = gaussian_means(depth, offset_xy, K_norm, c2w)
        scales = activate_scales(raw[..., 2:5], depth, K_norm, scale_min=self.cfg.gaussian_scale_min,
                                 scale_max=self.cfg.gaussian_scale_max)
        quats = world_quats(raw[..., 5:9], c2w)
        opacities = self.map_density_to_opacity(pred.density) / self.cfg.gaussians_per_pixel
        covs = covariances_from(quats, scales) if with_covariances else None
        gaussians = [PixelGaussians(means=means[b], quats=quats[b], scales=scales[b], opacities=opacities[b])
                     for b in range(B)]
        return MVSplatOutput(gaussians=gaussians, depth=depth, offset_xy=offset_xy, means=means, quats=quats,
                             scales=scales, opacities=opacities, coarse_depth=pred.coarse_depth, covariances=covs)

    def map_density_to_opacity(self, density: Tensor) -> Tensor:
        """Upstream `map_pdf_to_opacity` at the end of its warm-up: 0.5 (1 - (1-p)^e + p^(1/e)), e = 2^x.
        With the released configs (x = 0) this is the identity."""
        x = self.cfg.opacity_mapping_final
        if x == 0.0:
            return density
        e = 2.0 ** x
        return 0.5 * (1 - (1 - density) ** e + density ** (1 / e))


__all__ = ["MVSplatEncoder", "MVSplatOutput", "Precision", "resolve_precision"]
