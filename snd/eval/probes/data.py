"""What a probe trains on: its rows (`ProbeData`), their order (`batch_order`) and their tokens.

Why its own module: training (`snd.eval.probes.train`), evaluation (`snd.eval.probes.evaluate`) and the
resident rows (`snd.eval.probes.rows`) all read the same rows, so their definition sits below all three.
Resume is exact because the batch order is a pure function of (seed, epoch) (`batch_order`).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor, nn

__all__ = ["TARGETS", "ProbeData", "epoch_perm", "batch_order"]

TARGETS = {"depth": ("depth",), "normals": ("normals",), "seg": ("seg",)}


class ProbeData(torch.utils.data.Dataset):
    """Items for a probe: cached `tokens` (when a store is given) or the `image`, plus the task's targets.

    Args:
        dataset: items with `image [3,H,W]`, `depth [H,W]`, `normals [3,H,W]`, `seg [H,W]` (what the task needs).
        indices: which items (row i of the store is `dataset[indices[i]]`).
        task: "depth" | "normals" | "seg".
        store: a `FeatureStore` (cached path) or None (live path: images go through the backbone).
        with_image: also return the image when cached (for figures).
        memory_mb: keep decoded items in RAM up to this size per process (the probe reads every item once
            per epoch; small datasets — synth, NYUv2 — then load each file once). 0 disables.
        targets: a `snd.eval.targets.TargetStore` of the same rows: targets are read from it (two raw
            chunks per item with the token store) instead of decoding the dataset item every epoch.
        flip_store: cached tokens of the horizontally flipped images (same rows), returned as `tokens_flip`
            (the paper protocol's flip test; `snd.eval.protocol.flip_average`).
    """

    def __init__(self, dataset, indices: list[int], task: str, store=None, with_image: bool = False,
                 memory_mb: float = 1024.0, targets=None, flip_store=None):
        if task not in TARGETS:
            raise ValueError(f"unknown probe task {task!r}; expected one of {list(TARGETS)}")
        for what, s in (("feature", store), ("target", targets), ("flipped-feature", flip_store)):
            if s is not None and len(s) != len(indices):
                raise ValueError(f"{what} store has {len(s)} rows but {len(indices)} indices were given")
        self.dataset, self.indices, self.task, self.store, self.with_image = dataset, list(indices), task, store, with_image
        self.targets, self.flip_store = targets, flip_store
        # live rows of a set that splits its augmentation (`worker_item` here, `device_augment` on the training
        # device, `sources._Group`): the workers return its worker items, and the extra keys they carry
        self.deferred = (store is None and bool(getattr(dataset, "self_augmenting", False))
                         and hasattr(dataset, "device_augment") and hasattr(dataset, "worker_item"))
        self.budget = int(memory_mb * 2**20)
        self._mem: dict[int, dict[str, Tensor]] = {}
        self._used = 0

    def __len__(self) -> int:
        return len(self.indices)

    def _item(self, j: int) -> dict[str, Tensor]:
        if j in self._mem:
            return self._mem[j]
        need_image = self.store is None or self.with_image
        if self.targets is not None and not need_image:
            return {TARGETS[self.task][0]: self.targets.target(j)}  # already one raw chunk: no RAM copy
        if self.deferred:
            item = self.dataset.worker_item(self.indices[j])
            keys = list(TARGETS[self.task]) + ["image"] + list(self.dataset.device_keys)
        else:
            item = self.dataset[self.indices[j]]
            keys = list(TARGETS[self.task]) + (["image"] if need_image else [])
        out = {k: torch.as_tensor(item[k]) for k in keys}
        size = sum(v.numel() * v.element_size() for v in out.values())
        if not self.deferred and self._used + size <= self.budget:  # fresh draws every epoch: never kept
            self._mem[j] = out
            self._used += size
        return out

    def target(self, j: int) -> Tensor:
        """The task's target of row `j` (no tokens; filling the in-RAM cache as training would)."""
        return self._item(j)[TARGETS[self.task][0]]

    def __getitem__(self, j: int) -> dict[str, Tensor]:
        out = dict(self._item(j))
        if self.store is not None:
            out["tokens"] = self.store.tokens(j)
        if self.flip_store is not None:
            out["tokens_flip"] = self.flip_store.tokens(j)
        out["row"] = torch.tensor(j)
        return out


def epoch_perm(n: int, seed: int, epoch: int) -> Tensor:
    """The row permutation of one epoch: a pure function of (seed, epoch), so resume is exact."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_order(n: int, batch: int, seed: int, start_step: int, total_steps: int,
                device: torch.device | None = None, streams: tuple | list = (), shuffle: bool = True) -> Iterator:
    """Batches of row indices for steps [start_step, total_steps): a fresh permutation per epoch.

    Lists of ints, or slices of a device tensor when `device` is given (device-resident rows gather with
    them; the order is the same either way). `streams`: CUDA streams that will read the slices (the
    permutation is copied on the current stream): they wait for the copy, and its memory is not reused
    before they are done with it. `shuffle=False`: rows in order every epoch (file order)."""
    if n <= 0:
        raise ValueError("cannot train a probe on an empty dataset")
    batch = min(batch, n)
    per_epoch = n // batch  # drop_last
    step, cur = start_step, (-1, None)
    while step < total_steps:
        epoch, k = divmod(step, per_epoch)
        if cur[0] != epoch:
            perm = epoch_perm(n, seed, epoch) if shuffle else torch.arange(n)
            if device is None:
                cur = (epoch, perm.tolist())
            else:
                perm = perm.to(device)
                for st in streams:
                    st.wait_stream(torch.cuda.current_stream(device))
                    perm.record_stream(st)
                cur = (epoch, perm)
        yield cur[1][k * batch:(k + 1) * batch]
        step += 1


def _tokens(batch: dict, backbone: nn.Module | None, precision: str = "fp32") -> Tensor:
    """The batch's cached tokens, or the live backbone's at `precision` (the suite's `--extract-precision`, so
    live and cached rows of one run share one arithmetic)."""
    if "tokens" in batch:
        return batch["tokens"]
    if backbone is None:
        raise ValueError("a batch without cached tokens needs the backbone (live path)")
    from snd.eval.features import extract_tokens

    return extract_tokens(backbone, batch["image"], precision)


def _float_tokens(batch: dict, backbone: nn.Module | None, precision: str = "fp32") -> Tensor:
    return _tokens(batch, backbone, precision).float()
