"""snd.splat: pure tensor functions between teacher patch features and the loss target.

upsample (`upsample`) -> lift + render (`render`, backends `render_torch` / `render_gsplat`, all taking one
`inputs.SplatInput`) -> blend (`blend`) -> downsample; `target.target_features` chains them under a targets
protocol (`protocol`: official SnD rules or the "snd" variant); `operator` bakes the chain into a matrix. `from_depth` builds the "depth"
scaffold. No I/O here; gsplat is imported lazily inside its backend.
"""
from snd.splat.blend import semantic_blend
from snd.splat.from_depth import gaussians_from_depth
from snd.splat.gaussians import PixelGaussians
from snd.splat.inputs import SplatInput
from snd.splat.render import render_features
from snd.splat.target import target_features
from snd.splat.upsample import upsample_features

__all__ = [
    "PixelGaussians",
    "SplatInput",
    "gaussians_from_depth",
    "render_features",
    "semantic_blend",
    "target_features",
    "upsample_features",
]
