"""Pair sampler invariants: gap range, targets strictly between, missing-frame skip, determinism."""
from dataclasses import dataclass

import pytest

from snd.data.pairs import Pair, sample_pairs, valid_context_pairs


@dataclass
class FakeScene:
    name: str
    frame_ids: list


def _scene(missing=(15,), n=40, name="s"):
    return FakeScene(name, [f"DSC{i:05d}.JPG" for i in range(1, n + 1) if i not in missing])


def _brute_force(frame_ids, gmin, gmax):
    nums = [int(f[3:8]) for f in frame_ids]
    return [(a, b) for a in range(len(frame_ids)) for b in range(len(frame_ids)) if gmin <= b - a <= gmax and nums[b] - nums[a] == b - a]


def test_all_pairs_valid_and_complete():
    sc = _scene(missing=(15, 27))
    pairs = sample_pairs(sc, gap_min=8, gap_max=12, pairs_per_scene=0, targets_per_pair=3, seed=0)
    assert [p.ctx for p in pairs] == sorted(_brute_force(sc.frame_ids, 8, 12))
    nums = [int(f[3:8]) for f in sc.frame_ids]
    for p in pairs:
        l, r = p.ctx
        assert 8 <= r - l <= 12
        assert nums[r] - nums[l] == r - l  # no missing frame in between
        assert not (nums[l] < 15 < nums[r]) and not (nums[l] < 27 < nums[r])
        assert len(p.targets) == 3 and len(set(p.targets)) == 3
        assert all(l < t < r for t in p.targets)
        # stratified: one target per third of the open interval (l, r)
        inner = r - l - 1
        thirds = sorted(int((t - l - 1) * 3 // inner) for t in p.targets)
        assert thirds == [0, 1, 2]


def test_missing_frame_is_skipped_exactly():
    sc = _scene(missing=(15,), n=30)
    pairs = valid_context_pairs(sc.frame_ids, gap_min=8, gap_max=8)
    # list index 13 is DSC00014, index 14 is DSC00016: any pair with l <= 13 < 14 <= r spans the hole
    assert all(not (l <= 13 and r >= 14) for l, r in pairs)
    assert (5, 13) in pairs and (14, 22) in pairs and (6, 14) not in pairs
    assert len(pairs) == (13 - 8 + 1) + (28 - 14 - 8 + 1)


def test_deterministic_and_subsampled():
    sc = _scene()
    kw = dict(gap_min=8, gap_max=12, pairs_per_scene=10, targets_per_pair=2)
    a = sample_pairs(sc, seed=1, **kw)
    assert a == sample_pairs(sc, seed=1, **kw)
    assert a != sample_pairs(sc, seed=2, **kw)
    assert len(a) == 10 and len({p.ctx for p in a}) == 10
    assert all(isinstance(p, Pair) for p in a)
    every = {p.ctx for p in sample_pairs(sc, gap_min=8, gap_max=12, pairs_per_scene=0, targets_per_pair=1, seed=0)}
    assert {p.ctx for p in a} <= every
    # a different scene name gives a different draw with the same seed
    other = FakeScene("other", sc.frame_ids)
    assert sample_pairs(other, seed=1, **kw) != a


def test_more_targets_than_room_takes_all_between():
    sc = _scene(missing=(), n=12)
    pairs = sample_pairs(sc, gap_min=3, gap_max=3, pairs_per_scene=0, targets_per_pair=5, seed=0)
    assert pairs[0] == Pair(ctx=(0, 3), targets=(1, 2))


def test_too_short_scene_and_bad_knobs():
    assert sample_pairs(_scene(missing=(), n=5), gap_min=8, gap_max=12, pairs_per_scene=0, targets_per_pair=1, seed=0) == []
    with pytest.raises(ValueError):
        sample_pairs(_scene(), gap_min=1, gap_max=12, pairs_per_scene=0, targets_per_pair=1, seed=0)
    with pytest.raises(ValueError):
        sample_pairs(_scene(), gap_min=8, gap_max=12, pairs_per_scene=0, targets_per_pair=0, seed=0)
