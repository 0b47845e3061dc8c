"""One shared-memory block per batch from the DataLoader workers to the training process.

Why: torch sends every tensor of a worker's batch as its own shared-memory file descriptor, and the receiving
process fetches each descriptor over a new authenticated connection to the worker (multiprocessing's resource
sharer: connect, challenge, reply, receive). A stage-two batch of the fast path holds 16 tensors, so the
training process spent 5.2 ms of CPU per batch of one item on receiving alone (this repo's CPU, 2026-12-05,
`scripts/loader_rates.py`). That was the loader's ceiling: ~150 items/s on the e2e runs' 16-core host whatever
the worker count, half that on a slower host, where the fast path needs ~108. Packed, a batch is one tensor:
one descriptor, and the training process only makes views.

`packed_collate` runs in the worker: tensors of the samples are stacked straight into one uint8 block (no
per-key allocation), everything else goes through the given collate and any tensor it makes is copied in too.
`PackedBatch.unpack` gives the same dict `collate` would have, as views of the block (pinned when the loader
pins: `PackedBatch.pin_memory` pins the block once).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.data import get_worker_info

__all__ = ["PackedBatch", "packed_collate", "unpack"]

ALIGN = 64  # every piece starts at a multiple: any dtype view is aligned


@dataclass(frozen=True)
class _Slot:
    """Where a tensor was in the batch's structure: piece `i` of the layout."""

    i: int


@dataclass
class PackedBatch:
    """A collated batch as one uint8 block, the (dtype, shape, byte offset) of each tensor in it, and the
    batch's structure with `_Slot` placeholders where the tensors were."""

    block: Tensor
    layout: list[tuple[torch.dtype, tuple[int, ...], int]]
    skeleton: Any

    def pin_memory(self, device: Any = None) -> "PackedBatch":  # called by the DataLoader's pin-memory thread
        return PackedBatch(self.block.pin_memory(), self.layout, self.skeleton)

    def unpack(self) -> Any:
        views = [_view(self.block, dt, shape, off) for dt, shape, off in self.layout]
        return _fill(self.skeleton, views)


def unpack(batch: Any) -> Any:
    """A `PackedBatch` unpacked; anything else as it is (a loader without workers does not pack)."""
    return batch.unpack() if isinstance(batch, PackedBatch) else batch


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= int(s)
    return n


def _view(block: Tensor, dtype: torch.dtype, shape: tuple[int, ...], off: int) -> Tensor:
    return block[off:off + _nbytes(dtype, shape)].view(dtype).view(shape)


def _map_only(kind: type, fn: Callable[[Any], Any], node: Any) -> Any:
    """`node` (dicts, lists and tuples of leaves) with every leaf of type `kind` replaced by `fn(leaf)`."""
    if isinstance(node, kind):
        return fn(node)
    if isinstance(node, dict):
        return {k: _map_only(kind, fn, v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(_map_only(kind, fn, v) for v in node)
    return node


def _fill(skeleton: Any, views: list[Tensor]) -> Any:
    return _map_only(_Slot, lambda s: views[s.i], skeleton)


def _extract(node: Any, found: list[Tensor], base: int) -> Any:
    """`node` with each tensor appended to `found` and replaced by `_Slot(base + its index in found)`."""
    def slot(t: Tensor) -> _Slot:
        found.append(t)
        return _Slot(base + len(found) - 1)

    return _map_only(Tensor, slot, node)


def packed_collate(samples: list[dict], collate: Callable[[list[dict]], dict], listed: tuple[str, ...] = ()) -> PackedBatch:
    """`collate(samples)` as one block. Keys whose values are tensors in every sample are stacked into the
    block directly (as `default_collate` stacks them), except `listed` (keys `collate` keeps as lists, e.g.
    variable-length JPEG bytes); the other keys go through `collate`, and the tensors it returns are copied in."""
    keys = list(samples[0])
    stacked = [k for k in keys if k not in listed and all(isinstance(s[k], Tensor) for s in samples)]
    rest = collate([{k: s[k] for k in keys if k not in stacked} for s in samples])
    found: list[Tensor] = []
    skel_rest = _extract(rest, found, len(stacked))
    pieces = [(samples[0][k].dtype, (len(samples), *samples[0][k].shape)) for k in stacked]
    pieces += [(t.dtype, tuple(t.shape)) for t in found]
    layout, off = [], 0
    for dt, shape in pieces:
        layout.append((dt, shape, off))
        off += -(-_nbytes(dt, shape) // ALIGN) * ALIGN
    # in a worker, allocated in shared memory at once (as default_collate does), so sending it copies nothing
    block = torch.empty(0, dtype=torch.uint8)
    if get_worker_info() is not None:
        block.set_(torch.UntypedStorage._new_shared(max(off, 1)))
    else:
        block.resize_(max(off, 1))
    for (dt, shape, o), k in zip(layout, stacked):
        torch.stack([s[k] for s in samples], out=_view(block, dt, shape, o))
    for (dt, shape, o), t in zip(layout[len(stacked):], found):
        _view(block, dt, shape, o).copy_(t)
    skeleton = {k: (_Slot(stacked.index(k)) if k in stacked else skel_rest[k]) for k in keys}
    return PackedBatch(block, layout, skeleton)
