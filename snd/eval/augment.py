"""Training-time augmentation for the live (`--no-feature-cache`) probe path.

The official probes augment every step; the parts that do not change the label geometry's meaning are
reproduced here on whole batches: horizontal flip (p=0.5; normals' x component changes sign) and the
official depth `ColorAug` (p=0.5: gamma in [0.9, 1.1], brightness in [0.75, 1.25], per-channel colour in
[0.9, 1.1]). Random crop / rotation / rescale are not reproduced (the images are already at the probe size).
`where_items` applies a per-item step to chosen items of a batch: the paper protocol's self-augmenting sets
use it in their `device_augment`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["augment_batch", "where_items", "augment_one", "LiveAugmented"]


def augment_batch(batch: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
    """Flip + colour jitter of `batch["image"] [B,3,H,W]` and the matching targets, one draw per item."""
    img = batch["image"]
    B = img.shape[0]
    out = dict(batch)
    flip = torch.rand(B, generator=generator) < 0.5
    if flip.any():
        f = flip.to(img.device)
        for key in ("image", "depth", "seg", "normals"):
            if key in out and isinstance(out[key], Tensor) and out[key].shape[0] == B:
                x = out[key]
                fx = x.flip(-1)
                if key == "normals":
                    fx = fx.clone()
                    fx[:, 0] = -fx[:, 0]
                shape = (B,) + (1,) * (x.ndim - 1)
                out[key] = torch.where(f.view(shape), fx, x)
    colour = torch.rand(B, generator=generator) < 0.5
    gamma = torch.empty(B).uniform_(0.9, 1.1, generator=generator)
    bright = torch.empty(B).uniform_(0.75, 1.25, generator=generator)
    chan = torch.empty(B, 3).uniform_(0.9, 1.1, generator=generator)
    x = out["image"]
    jit = (x.clamp(0, 1) ** gamma.view(B, 1, 1, 1).to(x)) * bright.view(B, 1, 1, 1).to(x) * chan.view(B, 3, 1, 1).to(x)
    out["image"] = torch.where(colour.view(B, 1, 1, 1).to(x.device), jit.clamp(0, 1), x)
    return out


def where_items(mask: Tensor, x: Tensor, fn: Callable[[Tensor | slice], Tensor]) -> Tensor:
    """`x [B, ...]` with the items where `mask [B]` replaced by `fn(sel)`: fn computes the new values of `x[sel]`
    (reading its own per-item parameters at `sel`). On CUDA for the whole batch, then `torch.where` (no host
    sync in the training step); elsewhere only for the selected items (a CPU has no spare throughput). Per item
    the same numbers either way: the sets' `device_augment` steps are per item."""
    if x.device.type == "cuda":
        return torch.where(mask.view(-1, *[1] * (x.ndim - 1)), fn(slice(None)), x)
    idx = mask.nonzero()[:, 0]
    if idx.numel() == 0:
        return x
    if idx.numel() == x.shape[0]:
        return fn(slice(None))
    out = x.clone()
    out[idx] = fn(idx)
    return out


def augment_one(ds, index: int, keys: tuple[str, ...]) -> dict:
    """Item `index` of a set split into `worker_item` and `device_augment` (the paper protocol's live sets):
    both halves for this one item, on the CPU, returning `keys` and the item's `meta` (what `dataset[i]` gives)."""
    item = ds.worker_item(index)
    meta = item.pop("meta")
    out = ds.device_augment({k: v[None] for k, v in item.items()})
    return {**{k: out[k][0] for k in keys}, "meta": meta}


class LiveAugmented(torch.utils.data.Dataset):
    """Base of a paper-protocol training set that augments another set's native items afresh per step
    (`snd.eval.depth_aug.DepthTrain`, `snd.eval.mmseg.MmsegTrain`): `snd eval` runs the backbone live on it
    (`self_augmenting`), its trivial baseline is fit on the source itself (`unaugmented`). A subclass gives
    `worker_item`, `device_augment`, `device_keys`, `img_hw` and `__getitem__` (usually `augment_one`)."""

    self_augmenting = True

    def __init__(self, source, patch: int):
        self.source, self.patch = source, int(patch)
        self.name = getattr(source, "name", "?")

    def __len__(self) -> int:
        return len(self.source)

    def unaugmented(self):
        """The same items without the augmentation (what the trivial baseline is fit on): the source set."""
        return self.source
