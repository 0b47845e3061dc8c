"""snd.splat: pure tensor functions between teacher patch features and the loss target.

upsample (`upsample`) -> lift + render (`render`, backends `render_torch` / `render_gsplat`) -> blend
(`blend`) -> downsample; `target.target_features` chains them. `from_depth` builds the "depth"
scaffold. No I/O here; gsplat is imported lazily inside its backend.
"""
from snd.splat.blend import semantic_blend
from snd.splat.from_depth import gaussians_from_depth
from snd.splat.gaussians import PixelGaussians
from snd.splat.render import render_features
from snd.splat.target import target_features
from snd.splat.upsample import upsample_features

__all__ = [
    "PixelGaussians",
    "gaussians_from_depth",
    "render_features",
    "semantic_blend",
    "target_features",
    "upsample_features",
]
