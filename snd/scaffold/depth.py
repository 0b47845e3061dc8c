"""The "depth" scaffold source: one isotropic Gaussian per pixel at the dataset's (mesh) depth.

Why: procedural scenes and ScanNet++ meshes give exact depth, so stage two can run (and be tested)
without MVSplat; this is the default for the demo and for procedural data.
"""
from __future__ import annotations

from torch import Tensor

from snd.errors import SndError
from snd.scaffold.base import ScaffoldSource, register_source, resolve_device
from snd.splat.from_depth import gaussians_from_depth
from snd.splat.gaussians import PixelGaussians


@register_source("depth")
class DepthSource(ScaffoldSource):
    """`snd.splat.from_depth.gaussians_from_depth` on the context views' depth maps.

    Args:
        device: where Gaussians are built ('auto', 'cpu', 'cuda[:i]').
        scale_mult: Gaussian std in pixel footprints (see `gaussians_from_depth`).
        opacity: opacity of valid pixels.
    """

    name = "depth"
    needs_depth = True
    has_offset = False

    def __init__(self, *, device: str = "auto", scale_mult: float = 1.0, opacity: float = 0.9, **_ignored):
        self.device = resolve_device(device)
        self.scale_mult = float(scale_mult)
        self.opacity = float(opacity)

    def predict(self, images: Tensor, K: Tensor, c2w: Tensor, *, depth: Tensor | None = None) -> list[PixelGaussians]:
        if depth is None:
            raise SndError("the 'depth' scaffold source needs depth maps, and this dataset gives none",
                           hint="use a layout with meshes/depth (raw ScanNet++ v2, `snd data synth`), or --source mvsplat")
        B, V, H, W = depth.shape
        assert V == 2, f"depth must be [B, 2, H, W], got {tuple(depth.shape)}"
        assert K.shape == (B, 2, 3, 3), f"K must be [B, 2, 3, 3], got {tuple(K.shape)}"
        assert c2w.shape == (B, 2, 4, 4), f"c2w must be [B, 2, 4, 4], got {tuple(c2w.shape)}"
        dev = self.device  # non_blocking copies: a blocking one would synchronise the stream the caller queues on
        g = gaussians_from_depth(depth.to(dev, non_blocking=True).reshape(B * 2, H, W),
                                 K.to(dev, non_blocking=True).reshape(B * 2, 3, 3),
                                 c2w.to(dev, non_blocking=True).reshape(B * 2, 4, 4), scale_mult=self.scale_mult,
                                 opacity=self.opacity)
        return [PixelGaussians(g.means[2 * b:2 * b + 2], g.quats[2 * b:2 * b + 2], g.scales[2 * b:2 * b + 2],
                               g.opacities[2 * b:2 * b + 2]) for b in range(B)]

    def describe(self) -> dict:
        return {"name": self.name, "scale_mult": self.scale_mult, "opacity": self.opacity}


__all__ = ["DepthSource"]
