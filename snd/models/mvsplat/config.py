"""MVSplat encoder configuration (the cost-volume encoder of Chen et al., ECCV 2024).

Why a dataclass of its own: every architecture number below decides a state-dict shape, so the two
presets must equal, field by field, the upstream configs that produced the released / SnD weights
(`config/model/encoder/costvolume.yaml` of github.com/donydchen/mvsplat and the SnD experiment's
overrides). The reference key lists in tests/data/ pin them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Literal

ConfigName = Literal["scannetpp", "re10k"]
CONFIG_NAMES: tuple[str, ...] = ("scannetpp", "re10k")


@dataclass(frozen=True)
class MVSplatConfig:
    """Architecture + Gaussian-adapter settings of MVSplat's `EncoderCostVolume`.

    Field names follow upstream's yaml so configs can be compared line by line.
    """

    name: str = "costvolume"
    d_feature: int = 128  # backbone feature width (UniMatch CNN + multi-view transformer)
    num_depth_candidates: int = 32  # plane-sweep inverse-depth samples of the cost volume
    num_surfaces: int = 1  # upstream only supports 1
    gaussians_per_pixel: int = 1  # upstream only supports 1
    unimatch_weights_path: str | None = None  # training-time backbone init; unused for inference
    downscale_factor: int = 4  # cost volume resolution = image / 4
    shim_patch_size: int = 4  # upstream crops images to multiples of shim_patch_size * downscale_factor
    multiview_trans_attn_split: int = 2  # the transformer attends within 2x2 (shifted) windows
    costvolume_unet_feat_dim: int = 128
    costvolume_unet_channel_mult: tuple[int, ...] = (1, 1, 1)
    costvolume_unet_attn_res: tuple[int, ...] = ()
    depth_unet_feat_dim: int = 64
    depth_unet_attn_res: tuple[int, ...] = ()
    depth_unet_channel_mult: tuple[int, ...] = (1, 1, 1)
    wo_depth_refine: bool = False
    wo_cost_volume: bool = False
    wo_backbone_cross_attn: bool = False
    wo_cost_volume_refine: bool = False
    use_epipolar_trans: bool = False
    # -- Gaussian adapter (no weights; upstream `gaussian_adapter:` block) ----------------------
    gaussian_scale_min: float = 0.5  # scale = (min + (max-min) * sigmoid(raw)) * depth * pixel size
    gaussian_scale_max: float = 15.0
    sh_degree: int = 4  # only decides the raw channel count (84); colours are dropped by SnD
    # upstream `opacity_mapping` (initial = final = 0 -> exponent 2**0 = 1 -> opacity = density)
    opacity_mapping_final: float = 0.0
    num_views: int = 2  # context views per sample (the cost volume / cross-view attention use pairs)

    def __post_init__(self) -> None:
        for f in ("costvolume_unet_channel_mult", "costvolume_unet_attn_res", "depth_unet_attn_res",
                  "depth_unet_channel_mult"):
            object.__setattr__(self, f, tuple(int(x) for x in getattr(self, f)))
        unsupported = {
            "num_surfaces": self.num_surfaces != 1,
            "gaussians_per_pixel": self.gaussians_per_pixel != 1,
            "wo_depth_refine": self.wo_depth_refine,
            "wo_cost_volume": self.wo_cost_volume,
            "wo_backbone_cross_attn": self.wo_backbone_cross_attn,
            "wo_cost_volume_refine": self.wo_cost_volume_refine,
            "use_epipolar_trans": self.use_epipolar_trans,
            "num_views": self.num_views != 2,
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"MVSplatConfig: upstream ablation/multi-surface settings are not implemented: {bad}")
        if self.d_feature % 2:
            raise ValueError(f"d_feature must be even (sine position encoding), got {self.d_feature}")

    # -- presets --------------------------------------------------------------------------------
    @classmethod
    def scannetpp(cls) -> "MVSplatConfig":
        """SnD's ScanNet++ experiment: 128 candidates, deeper U-Nets with attention (471 tensors)."""
        return cls(
            num_depth_candidates=128,
            costvolume_unet_attn_res=(4,),
            depth_unet_feat_dim=32,
            depth_unet_attn_res=(16,),
            depth_unet_channel_mult=(1, 1, 1, 1, 1),
        )

    @classmethod
    def re10k(cls) -> "MVSplatConfig":
        """MVSplat's released re10k/acid encoder (upstream yaml defaults; 371 tensors)."""
        return cls()

    @classmethod
    def from_name(cls, name: str) -> "MVSplatConfig":
        if name not in CONFIG_NAMES:
            raise ValueError(f"unknown MVSplat config {name!r}; expected one of {CONFIG_NAMES}")
        return getattr(cls, name)()

    def with_(self, **kw) -> "MVSplatConfig":
        return replace(self, **kw)

    # -- derived --------------------------------------------------------------------------------
    @property
    def d_sh(self) -> int:
        return (self.sh_degree + 1) ** 2

    @property
    def gaussian_raw_channels(self) -> int:
        """to_gaussians output: 2 offsets + 3 scales + 4 quaternion + 3 * d_sh SH coefficients."""
        return self.num_surfaces * (7 + 3 * self.d_sh + 2)

    @property
    def size_multiple(self) -> int:
        """Image height and width must be multiples of this.

        Why: the U-Nets downsample by 2 per level and concatenate skips (odd sizes break the concat),
        and the transformer splits the 1/4-resolution map into `attn_split` x `attn_split` windows.
        """
        ds = self.downscale_factor
        need = [
            ds * self.multiview_trans_attn_split,
            ds * 2 ** (len(self.costvolume_unet_channel_mult) - 1),
            2 ** (len(self.depth_unet_channel_mult) - 1),
            ds,
        ]
        return math.lcm(*need)

    def upstream_dict(self) -> dict:
        """The fields of the upstream encoder config line (as in the reference key lists)."""
        d = asdict(self)
        for k in ("gaussian_scale_min", "gaussian_scale_max", "sh_degree", "opacity_mapping_final", "num_views"):
            d.pop(k)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def resolve_config(config: "str | MVSplatConfig") -> MVSplatConfig:
    """A preset name or a config -> a config."""
    if isinstance(config, MVSplatConfig):
        return config
    return MVSplatConfig.from_name(str(config))


__all__ = ["MVSplatConfig", "ConfigName", "CONFIG_NAMES", "resolve_config"]
