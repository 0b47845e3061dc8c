"""Context-pair and target sampling: SnD's "bounded" view sampler made deterministic and enumerable.

What the official sampler does (``src/dataset/view_sampler/view_sampler_bounded.py`` and
``dataset_scannetpp.py`` of davidshavin4/Splat-and-Distill, ScanNet++ config): two context frames a
gap of 8-12 positions apart in the scene's frame list (sorted by the number in the file name), one
target drawn between them, and the draw is rejected when the gap in file numbers differs from the gap
in list positions (a frame is missing in between, e.g. a removed blurry frame).

Where snd differs, on purpose:
  * upstream redraws at every step; snd enumerates the valid pairs once and keeps `pairs_per_scene` of
    them (stage one caches a scaffold per pair), seeded per scene, so runs are reproducible.
  * upstream's non-circular branch sets ``max_gap = min(num_views - 1, min_gap)`` (a bug kept "to follow
    pixelSplat cfgs"), so its gap is effectively always ``min_gap`` = 8; snd uses the configured range.
  * upstream's target may equal a context frame (``min_distance_to_context_views: 0``); snd draws
    targets strictly between the contexts (a context target teaches nothing about 3D consistency),
    `targets_per_pair` distinct ones, stratified so they spread over the interval.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from snd.data.formats import frame_number


@dataclass(frozen=True)
class Pair:
    """Two context frame indices (positions in the scene's frame list, ctx[0] < ctx[1]) and targets between."""

    ctx: tuple[int, int]
    targets: tuple[int, ...]


def valid_context_pairs(frame_ids: list[str], *, gap_min: int, gap_max: int) -> list[tuple[int, int]]:
    """All (left, right) index pairs with gap in [gap_min, gap_max] and no missing frame in between.

    "No missing frame": the difference of the numbers in the two file names equals the index gap.
    Names without a number cannot be checked and are accepted.
    """
    nums = [frame_number(f) for f in frame_ids]
    out = []
    for left in range(len(frame_ids)):
        for gap in range(gap_min, gap_max + 1):
            right = left + gap
            if right >= len(frame_ids):
                break
            a, b = nums[left], nums[right]
            if a >= 0 and b >= 0 and b - a != gap:
                continue
            out.append((left, right))
    return out


def _stratified(rng: np.random.Generator, lo: int, hi: int, k: int) -> tuple[int, ...]:
    """k distinct integers in [lo, hi] (inclusive), one per equal-width stratum (all of them if k >= count)."""
    n = hi - lo + 1
    if k >= n:
        return tuple(range(lo, hi + 1))
    edges = np.linspace(0, n, k + 1)
    picks = []
    for s in range(k):
        a, b = int(np.ceil(edges[s] - 1e-9)), int(np.ceil(edges[s + 1] - 1e-9))  # stratum [a, b)
        picks.append(lo + int(rng.integers(a, max(b, a + 1))))
    return tuple(picks)


def sample_pairs(scene: Any, *, gap_min: int, gap_max: int, pairs_per_scene: int, targets_per_pair: int, seed: int) -> list[Pair]:
    """Context pairs and their targets for one scene.

    Args:
        scene: anything with ``frame_ids`` (list of file names, capture order) and ``name``.
        gap_min, gap_max: context gap range in list positions (SnD ScanNet++: 8 and 12); gap_min >= 2 so a
            target fits strictly between.
        pairs_per_scene: number of pairs to keep (drawn without replacement); 0 = every valid pair.
        targets_per_pair: distinct targets per pair, strictly between the contexts, spread over the gap.
        seed: the result is a pure function of (seed, scene name, frame ids, the knobs).
    Returns:
        Pairs sorted by context indices.
    """
    if gap_min < 2 or gap_max < gap_min:
        raise ValueError(f"need 2 <= gap_min <= gap_max, got gap_min={gap_min}, gap_max={gap_max}")
    if pairs_per_scene < 0 or targets_per_pair < 1:
        raise ValueError(f"need pairs_per_scene >= 0 and targets_per_pair >= 1, got {pairs_per_scene}, {targets_per_pair}")
    frame_ids = list(scene.frame_ids)
    name = str(getattr(scene, "name", ""))
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode())])
    pairs = valid_context_pairs(frame_ids, gap_min=gap_min, gap_max=gap_max)
    if pairs_per_scene and len(pairs) > pairs_per_scene:
        keep = np.sort(rng.choice(len(pairs), size=pairs_per_scene, replace=False))
        pairs = [pairs[k] for k in keep]
    return [Pair(ctx=(l, r), targets=_stratified(rng, l + 1, r - 1, targets_per_pair)) for l, r in pairs]
