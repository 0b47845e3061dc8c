"""A worker's batch as one shared-memory block (`snd.cache.packed`): the same batch as `collate`, one storage."""
from __future__ import annotations

import pytest
import torch

from snd.cache.packed import PackedBatch, packed_collate, unpack
from snd.cache.stream import JPEG_KEYS, collate
from snd.train.data import BatchIterator
from snd.train.synthetic import SyntheticStream


def _sample(i: int, jpeg: bool = False) -> dict:
    g = torch.Generator().manual_seed(i)
    s = {
        "op_vals": torch.randn(5, 3, generator=g).half(),
        "op_valid": torch.rand(5, generator=g) > 0.5,
        "op_cols": torch.randint(-3, 900, (5, 3), generator=g, dtype=torch.int16),
        "image": torch.randint(0, 256, (3, 4, 7), generator=g, dtype=torch.uint8),
        "empty": torch.zeros(0, dtype=torch.float32),
        "K": torch.randn(3, 3, generator=g, dtype=torch.float64)[:, :2],  # not contiguous
        "index": torch.tensor(i, dtype=torch.int64),
        "scene": f"scene{i}", "tgt_frame": 10 + i,
    }
    if jpeg:  # variable-length bytes, kept as lists by `collate`
        s["ctx_jpeg"] = [torch.randint(0, 256, (11 + i,), generator=g, dtype=torch.uint8),
                         torch.randint(0, 256, (4,), generator=g, dtype=torch.uint8)]
        s["tgt_jpeg"] = torch.randint(0, 256, (7 + 2 * i,), generator=g, dtype=torch.uint8)
    return s


def _same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        assert a == b


def test_packed_batch_unpacks_to_what_collate_gives():
    for jpeg in (False, True):
        samples = [_sample(i, jpeg) for i in range(3)]
        p = packed_collate(samples, collate, listed=JPEG_KEYS)
        assert isinstance(p, PackedBatch) and p.block.dtype == torch.uint8 and p.block.dim() == 1
        got = p.unpack()
        _same(collate(samples), got)
        ts = [got[k] for k in got if isinstance(got[k], torch.Tensor)]
        ptrs = {t.untyped_storage().data_ptr() for t in ts}
        assert ptrs == {p.block.untyped_storage().data_ptr()}  # every tensor is a view of the one block
        assert all(t.data_ptr() % 64 == 0 for t in ts if t.numel())  # aligned pieces


def test_packed_batch_survives_pickling_as_the_loader_sends_it():
    import pickle

    p = packed_collate([_sample(0, True), _sample(1, True)], collate, listed=JPEG_KEYS)
    _same(collate([_sample(0, True), _sample(1, True)]), pickle.loads(pickle.dumps(p)).unpack())
    assert unpack({"a": 1}) == {"a": 1}  # a loader without workers does not pack


def test_loader_workers_send_one_block_with_the_same_batches():
    """Through a real DataLoader with 2 workers: the batches equal those without workers (same order, same
    values), and each arrives as views of one storage (one descriptor per batch)."""
    def make(start, rank, world):
        return SyntheticStream(img_hw=(28, 28), scaffold_hw=(7, 7), rank=rank, world_size=world, start=start, batch_size=2)

    kw = dict(batch=2, start=0, rank=0, world_size=1, prefetch=2, pin_memory=False, seed=0)
    plain = BatchIterator(make, num_workers=0, **kw)
    workers = BatchIterator(make, num_workers=2, **kw)
    for _ in range(3):
        a, b = next(plain), next(workers)
        _same(a, b)
        ptrs = {v.untyped_storage().data_ptr() for v in b.values() if isinstance(v, torch.Tensor)}
        assert len(ptrs) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_packed_batches_reach_the_gpu_unchanged():
    """With pin_memory (as `snd distill` on CUDA): the block is pinned once, every view is pinned, and
    `to_device` moves the same values as from an unpinned loader without workers."""
    from snd.train.data import to_device

    def make(start, rank, world):
        return SyntheticStream(img_hw=(28, 28), scaffold_hw=(7, 7), rank=rank, world_size=world, start=start, batch_size=2)

    kw = dict(batch=2, start=0, rank=0, world_size=1, prefetch=2, seed=0)
    plain = BatchIterator(make, num_workers=0, pin_memory=False, **kw)
    pinned = BatchIterator(make, num_workers=2, pin_memory=True, **kw)
    dev = torch.device("cuda")
    for _ in range(2):
        a, b = next(plain), next(pinned)
        assert all(v.is_pinned() for v in b.values() if isinstance(v, torch.Tensor))
        a, b = to_device(a, dev), to_device(b, dev)
        torch.cuda.synchronize()
        _same(a, b)
