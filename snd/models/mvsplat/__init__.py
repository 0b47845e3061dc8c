"""snd.models.mvsplat: MVSplat's cost-volume encoder (frozen) as the stage-one scaffold source.

Reimplemented from github.com/donydchen/mvsplat (state-dict compatible with its checkpoints).
"""
from .config import MVSplatConfig
from .encoder import MVSplatEncoder, MVSplatOutput
from .geometry import gaussian_means, pixel_K_to_normalized
from .load import convert_mvsplat_state_dict, load_mvsplat
from .source import MVSplatSource

__all__ = [
    "MVSplatConfig", "MVSplatEncoder", "MVSplatOutput", "load_mvsplat", "convert_mvsplat_state_dict",
    "gaussian_means", "pixel_K_to_normalized", "MVSplatSource",
]
