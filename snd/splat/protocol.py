"""The two rule sets for stage two's targets, coverage and loss: "official" (default) and "snd".

Why one named switch: every rule below is a small choice, but together they decide whether `snd distill`
trains the method whose numbers the paper reports. "official" is what the official SnD code computes
(``src/model/model_wrapper.py`` ``training_step``, ``src/model/vit/utils.py``
``mask_aware_bilinear_upsample_hr_mask`` / ``blend_with_mask``); "snd" is the set of choices snd made
before it followed the official code line by line, kept so the comparison is one flag
(``--targets-protocol snd``). docs/distill.md lists both side by side.

| rule | official | snd |
|---|---|---|
| x14 upsampling grid | corner-aligned: pixel i samples ``linspace(0, h-1, H)[i]`` | patch-centred (``align_corners=False``) |
| patch labels (mask-aware) | mask at rows/cols ``round(linspace(0, H-1, h))`` | mask at the patch centres |
| no neighbour with the pixel's label | feature 0 | plain bilinear value |
| blend: segment mean | over all pixels of the label (uncovered ones are 0) | over covered pixels only |
| covered pixel | any Gaussian contributes (alpha > 0) | alpha > 0.5 |
| pixel -> patch coverage | nearest, >= 0.5 | bilinear, >= 0.5 |
| loss | student and target zeroed at uncovered patches, mean over all | mean over covered patches |
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["PROTOCOLS", "Rules", "TargetsProtocol", "rules"]

TargetsProtocol = Literal["official", "snd"]
PROTOCOLS: tuple[str, ...] = ("official", "snd")


@dataclass(frozen=True)
class Rules:
    """What one protocol means for each step (see the module table)."""

    grid: Literal["corners", "centres"]  # x14 upsampling sampling grid
    fallback: Literal["zero", "bilinear"]  # mask-aware pixel with no matching neighbour
    mean_over_all: bool  # blend: segment mean over all pixels (True) or covered pixels only
    coverage_threshold: float  # a pixel is covered when the render's alpha exceeds this
    coverage_resize: Literal["nearest", "bilinear"]  # pixel coverage -> patch grid (then >= 0.5)
    loss_over_all: bool  # loss: zero both sides at uncovered patches and average over all patches


_RULES = {
    "official": Rules(grid="corners", fallback="zero", mean_over_all=True, coverage_threshold=0.0,
                      coverage_resize="nearest", loss_over_all=True),
    "snd": Rules(grid="centres", fallback="bilinear", mean_over_all=False, coverage_threshold=0.5,
                 coverage_resize="bilinear", loss_over_all=False),
}


def rules(protocol: str) -> Rules:
    """The rules of `protocol` ("official" or "snd"); ValueError naming the choices otherwise."""
    if protocol not in _RULES:
        raise ValueError(f"targets protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return _RULES[protocol]
