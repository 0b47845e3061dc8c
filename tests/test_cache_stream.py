"""ShardStream: deterministic order, disjoint+complete rank/worker split, exact resume, sample contents."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from snd.cache.reader import CacheReader
from snd.cache.stream import ShardStream, make_loader
from snd.errors import SndError
from snd.pipeline.config import PrecomputeConfig
from snd.stages.precompute import run

IMG_HW = (98, 154)


@pytest.fixture(scope="module")
def store(synth_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stream") / "cache"
    s = run(PrecomputeConfig(data=synth_root, out=out, height=112, width=168, pairs_per_scene=3, targets_per_pair=2,
                             batch_pairs=3, device="cpu", source="depth"), progress=False)
    assert s.pairs == 6
    return out


def keys(stream: ShardStream, positions) -> list[tuple[int, int, int]]:
    return [stream.item_at(stream.global_position(j)) for j in positions]


def test_order_is_a_seeded_permutation_per_epoch(store):
    a = ShardStream(store, img_hw=IMG_HW, seed=3)
    N = a.num_items
    assert N == 12  # 2 scenes x 3 pairs x 2 targets
    e0, e1 = keys(a, range(N)), keys(a, range(N, 2 * N))
    assert sorted(e0) == sorted(map(tuple, a.items.tolist())) == sorted(e1)  # each epoch covers every item once
    assert e0 != e1
    assert keys(ShardStream(store, img_hw=IMG_HW, seed=3), range(2 * N)) == e0 + e1
    assert keys(ShardStream(store, img_hw=IMG_HW, seed=4), range(N)) != e0


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_are_disjoint_and_complete(store, world):
    streams = [ShardStream(store, img_hw=IMG_HW, seed=0, rank=r, world_size=world) for r in range(world)]
    M = 10
    pos = [s.global_position(j) for s in streams for j in range(M)]
    assert sorted(pos) == list(range(world * M))
    single = ShardStream(store, img_hw=IMG_HW, seed=0)
    for r, s in enumerate(streams):
        assert keys(s, range(M)) == [single.item_at(j * world + r) for j in range(M)]


@pytest.mark.parametrize("W,B,start", [(1, 1, 0), (2, 1, 3), (3, 2, 5)])
def test_worker_split_round_robin_equals_rank_order(store, W, B, start):
    s = ShardStream(store, img_hw=IMG_HW, seed=0, start=start, batch_size=B)
    its = [s.local_positions(w, W) for w in range(W)]
    merged = []
    while len(merged) < 24:  # the DataLoader takes one batch from each worker in turn
        for it in its:
            merged.extend(next(it) for _ in range(B))
    assert merged[:24] == list(range(start, start + 24))


def test_start_resume_equals_skipping(store):
    full = ShardStream(store, img_hw=IMG_HW, seed=1)
    resumed = ShardStream(store, img_hw=IMG_HW, seed=1, start=5)
    it_full, it_res = iter(full), iter(resumed)
    skipped = [next(it_full) for _ in range(5)]
    assert [int(x["index"]) for x in skipped] == [0, 1, 2, 3, 4]
    for _ in range(3):
        a, b = next(it_full), next(it_res)
        assert int(a["index"]) == int(b["index"]) and a["scene"] == b["scene"]
        for k in ("means", "ctx_images", "tgt_mask"):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_dataloader_with_workers_yields_the_rank_order(store):
    s = ShardStream(store, img_hw=IMG_HW, seed=2, rank=1, world_size=2, start=3)
    dl = make_loader(s, num_workers=2, prefetch=1, batch_size=2)
    it = iter(dl)
    got = [int(i) for _ in range(3) for i in next(it)["index"]]
    assert got == [s.global_position(j) for j in range(3, 9)]


def test_sample_matches_contract_and_sources(store, synth_root):
    from snd.data import open_dataset

    s = ShardStream(store, data_root=synth_root, img_hw=IMG_HW, seed=0)  # --data: images from the dataset
    x = s.sample(0)
    shapes = {"ctx_images": (2, 3, *IMG_HW), "tgt_image": (3, *IMG_HW), "means": (2, 112, 168, 3), "quats": (2, 112, 168, 4),
              "scales": (2, 112, 168, 3), "opacities": (2, 112, 168), "ctx_masks": (2, 112, 168), "tgt_mask": (112, 168),
              "ctx_K": (2, 3, 3), "ctx_c2w": (2, 4, 4), "tgt_K": (3, 3), "tgt_c2w": (4, 4), "index": ()}
    for k, shp in shapes.items():
        assert tuple(x[k].shape) == shp, (k, tuple(x[k].shape))
    assert x["ctx_masks"].dtype == torch.int64 and x["means"].dtype == torch.float32
    scene = open_dataset(synth_root, height=112, width=168).scene(x["scene"])
    # images: the dataset's frames at the scaffold size, resized to img_hw
    raw = torch.tensor(scene.image(x["tgt_frame"]), dtype=torch.float32).permute(2, 0, 1)[None] / 255
    ref = F.interpolate(raw, size=IMG_HW, mode="bilinear", align_corners=False, antialias=True)[0]
    assert x["tgt_image"].dtype == torch.uint8  # float on the device (to_device), a quarter of the bytes until then
    assert (x["tgt_image"].float() - ref * 255).abs().max() <= 1 + 1e-3  # the same resize in uint8 fixed point
    from snd.train.data import to_device

    dev = to_device({"tgt_image": x["tgt_image"], "tgt_mask": x["tgt_mask"]}, torch.device("cpu"))
    torch.testing.assert_close(dev["tgt_image"], x["tgt_image"].float() / 255)
    assert dev["tgt_mask"].dtype == torch.int64
    np.testing.assert_array_equal(x["tgt_mask"].numpy(), scene.instance_mask(x["tgt_frame"]))
    np.testing.assert_allclose(x["tgt_c2w"].numpy(), scene.camera(x["tgt_frame"]).c2w, atol=1e-6)
    a, b = x["ctx_frames"].tolist()
    assert 8 <= b - a <= 12 and a < x["tgt_frame"] < b
    # scaffold: the reader's decode of the same pair
    si, p, t = s.item_at(0)
    d = CacheReader(store).scene(x["scene"]).pair(p)
    torch.testing.assert_close(x["means"], d.means)
    # without --data the images are the store's JPEG frames: the same picture within JPEG's error
    y = ShardStream(store, img_hw=IMG_HW, seed=0).sample(0)
    assert y["tgt_frame"] == x["tgt_frame"] and (y["tgt_image"].float() - x["tgt_image"].float()).abs().mean() < 3


def test_stream_names_scene_and_pair_of_a_corrupted_chunk(store, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(store, bad)
    s = ShardStream(bad, img_hw=IMG_HW, seed=0)
    scene = s.scenes[0]
    f = next(p for p in sorted((bad / scene / "depth").rglob("*")) if p.is_file() and p.name != "zarr.json")
    data = bytearray(f.read_bytes())
    data[30] ^= 0x5A  # first chunk of the first shard: pair 0
    f.write_bytes(bytes(data))
    j = next(j for j in range(100) if s.item_at(j)[:2] == (0, 0))
    with pytest.raises(SndError, match=rf"scene '{scene}' pair 0"):
        s.sample(j)


def test_empty_store_is_a_clear_error(tmp_path):
    with pytest.raises(SndError, match="scaffold cache"):
        ShardStream(tmp_path, img_hw=IMG_HW, seed=0)
