"""`ShardStream`: the endless, deterministic, resumable stream of stage-two samples from a scaffold store.

Order: the items are every (scene, pair, target) of the store's complete scenes, sorted; epoch e is the
permutation ``default_rng([seed, e]).permutation(N)``, and epochs follow each other forever. Global
position g = e * N + k. Rank r of R owns the global positions g = j * R + r (j = 0, 1, ... is the rank's
*local* position), so ranks are disjoint and together cover every item. `start` is a local position:
the stream begins at j = start (a run that consumed `start` samples per rank resumes exactly).

DataLoader workers: with batch size B and W workers, local positions are cut into blocks of B counted
from `start`; block b goes to worker b % W. PyTorch's DataLoader takes batches from workers round-robin
(0, 1, ..., W-1, 0, ...), so its output is exactly the rank's order, whatever W is.

Each sample decodes the pair's scaffold to float32 (means rebuilt from depth/offset and the camera),
verifies its checksums (an `SndError` names scene and pair), and takes the context/target images from
the store's frames (schema v3: stored at the backbone input size by stage one; no dataset access) or, for
stores without frames and whenever `data_root` is given, from the dataset at the scaffold size, resized
to `img_hw` with the same `resize_uint8` stage one uses (so lossless frames give bit-identical images).
With `decode="device"` and frames stored at `img_hw` the sample carries them still encoded, to be decoded on
the GPU for the whole batch (`snd.train.data.to_device`): JPEG bytes (``ctx_jpeg``, ``tgt_jpeg``) or the
lossless ``grad`` filter's residual planes (``ctx_grad``, ``tgt_grad``; uint8, the frames' own shape).
Images stay uint8 [3, Hi, Wi] (`snd.train.data.to_device` makes them float in [0, 1] on the device): a
quarter of the bytes through the DataLoader's shared memory, the pin-memory thread and PCIe, which is
what kept the fast path's loader from feeding ~100 steps/s.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info, default_collate

from snd.cache.frames import resize_uint8
from snd.cache.reader import CacheReader
from snd.errors import SndError

log = logging.getLogger(__name__)

_SCENE_CACHE = 16  # dataset Scene objects kept open per worker


class ShardStream(IterableDataset):
    """Samples of a scaffold store (see the module docstring for the order and the splitting rules).

    Args:
        store_path: the `snd precompute --out` folder.
        data_root: dataset root for the images (default: the one recorded in the manifest).
        img_hw: (Hi, Wi) backbone input size of the returned images (uint8).
        seed: shuffling seed (epoch e uses [seed, e]).
        rank, world_size: this process's share of the global order.
        start: local positions to skip (exact resume).
        batch_size: the DataLoader batch size the worker split is made for (`make_loader` sets it).
        verify: check per-pair checksums on every read.
        gaussians: decode the scaffold Gaussians and masks (the render path needs them; the operator path does
            not: its samples carry empty tensors there).
        operator: add the target's stored transfer operator (``op_*`` keys) when the store has them.
        decode: "cpu" (decode stored frames here, in the worker) or "device" (frames stored at `img_hw` as JPEG
            or lossless ``grad`` travel encoded, ``ctx_jpeg``/``tgt_jpeg`` or ``ctx_grad``/``tgt_grad``, for one
            batched decode on the GPU; other frames decode here).
    """

    def __init__(self, store_path: str | Path, *, data_root: str | Path | None = None, img_hw: tuple[int, int],
                 seed: int, rank: int = 0, world_size: int = 1, start: int = 0, batch_size: int = 1, verify: bool = True,
                 gaussians: bool = True, operator: bool = True, decode: Literal["cpu", "device"] = "cpu"):
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if start < 0 or batch_size < 1:
            raise ValueError(f"need start >= 0 and batch_size >= 1, got start={start}, batch_size={batch_size}")
        self.store = Path(store_path)
        man = CacheReader(self.store, verify=verify).manifest
        self.header = {k: v for k, v in man.items() if k != "scenes"}
        recs = {n: r for n, r in man["scenes"].items() if r.get("status") == "complete"}
        if not recs:
            raise SndError(f"scaffold cache {self.store} has no complete scene", path=self.store,
                           hint="run (or finish) `snd precompute` first")
        self.scenes = sorted(recs)
        items = []
        for si, name in enumerate(self.scenes):
            for p, n_t in enumerate(recs[name]["targets"]):
                items.extend((si, p, t) for t in range(n_t))
        self.items = np.asarray(items, dtype=np.int64).reshape(-1, 3)  # [N, 3] (scene, pair, target slot)
        self.data_root = Path(data_root) if data_root is not None else Path(self.header["data_root"])
        self.store_images = data_root is None and self.header.get("images") is not None  # else: the dataset
        self.decode = decode
        self.img_hw = (int(img_hw[0]), int(img_hw[1]))
        self.seed, self.rank, self.world_size, self.start = int(seed), rank, world_size, int(start)
        self.batch_size, self.verify = batch_size, verify
        self.gaussians, self.operator = gaussians, operator
        self._reader: CacheReader | None = None
        self._dataset: Any = None
        self._scene_objs: OrderedDict[str, tuple[Any, dict[str, int]]] = OrderedDict()
        self._perm: tuple[int, np.ndarray] | None = None

    # -- order ------------------------------------------------------------------------------------
    @property
    def num_items(self) -> int:
        """Items per epoch (all ranks together)."""
        return len(self.items)

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_items))
        return self._perm[1]

    def global_position(self, j: int) -> int:
        """Global position of this rank's local position j."""
        return j * self.world_size + self.rank

    def item_at(self, g: int) -> tuple[int, int, int]:
        """(scene index, pair, target slot) at global position g."""
        e, k = divmod(g, self.num_items)
        return tuple(int(x) for x in self.items[self.permutation(e)[k]])  # type: ignore[return-value]

    def local_positions(self, worker: int = 0, num_workers: int = 1) -> Iterator[int]:
        """Local positions (from `start`, endless) that DataLoader worker `worker` of `num_workers` serves."""
        B = self.batch_size
        block = worker
        while True:
            first = self.start + block * B
            yield from range(first, first + B)
            block += num_workers

    # -- loading ----------------------------------------------------------------------------------
    def _open(self) -> None:
        if self._reader is None:
            from snd.data import open_dataset

            self._reader = CacheReader(self.store, verify=self.verify)
            if self.store_images:
                return
            sc = self.header["scaffold"]
            self._dataset = open_dataset(self.data_root, self.header["dataset"]["layout"], height=sc["height"], width=sc["width"])

    def _scene(self, name: str) -> tuple[Any, dict[str, int]]:
        if name not in self._scene_objs:
            s = self._dataset.scene(name)
            self._scene_objs[name] = (s, {f: i for i, f in enumerate(s.frame_ids)})
            while len(self._scene_objs) > _SCENE_CACHE:
                self._scene_objs.popitem(last=False)
        self._scene_objs.move_to_end(name)
        return self._scene_objs[name]

    def _image(self, name: str, stored_index: int, frame_ids: list[str]) -> torch.Tensor:
        """Frame `stored_index` of the pair as uint8 [3, Hi, Wi] (from the store's frames when it has them)."""
        if self.store_images:
            assert self._reader is not None
            return resize_uint8(self._reader.scene(name).frame(stored_index), self.img_hw)
        scene, lookup = self._scene(name)
        fid = frame_ids[stored_index]
        if fid not in lookup:
            raise SndError(f"frame {fid} of scene {name} (used by the cache) is missing from the dataset at {self.data_root}",
                           path=self.data_root, hint="point --data at the dataset the cache was built from")
        img = torch.from_numpy(np.array(scene.image(lookup[fid]), dtype=np.uint8, copy=True)).permute(2, 0, 1)
        return resize_uint8(img, self.img_hw)

    def _on_device(self, name: str) -> str | None:
        """How this scene's frames travel when the GPU decodes them: "jpeg" (bytes), "grad" (residual planes), or
        None (decoded here)."""
        if not (self.store_images and self.decode == "device"):
            return None
        assert self._reader is not None
        fs = self._reader.scene(name).frames
        if fs is None or fs.hw != self.img_hw:
            return None
        return "jpeg" if fs.codec == "jpeg" else "grad" if fs.filter == "grad" else None

    def sample(self, j: int) -> dict[str, Any]:
        """The sample at this rank's local position j."""
        self._open()
        assert self._reader is not None
        g = self.global_position(j)
        si, p, t = self.item_at(g)
        name = self.scenes[si]
        sr = self._reader.scene(name)
        d = sr.pair(p, gaussians=self.gaussians, operator=self.operator, op_target=t)  # only this item's target slot
        ti = d.tgt_index[t]
        ops = {k: v[0] for k, v in d.operator.items()} if d.operator is not None else {}
        travel = self._on_device(name)
        if travel == "jpeg":
            images: dict[str, Any] = {"ctx_jpeg": [torch.from_numpy(np.array(sr.frame_bytes(i))) for i in d.ctx_index],
                                      "tgt_jpeg": torch.from_numpy(np.array(sr.frame_bytes(ti)))}
        elif travel == "grad":  # residual planes as stored (one copy out of Zarr's buffer), undone on the GPU
            planes = lambda i: torch.from_numpy(np.array(sr.frame_bytes(i)).reshape(3, *self.img_hw))  # noqa: E731
            images = {"ctx_grad": torch.stack([planes(i) for i in d.ctx_index]), "tgt_grad": planes(ti)}
        else:
            images = {"ctx_images": torch.stack([self._image(name, i, sr.frame_ids) for i in d.ctx_index]),
                      "tgt_image": self._image(name, ti, sr.frame_ids)}
        return {
            **ops, **images,
            "means": d.means, "quats": d.quats, "scales": d.scales, "opacities": d.opacities,
            "ctx_masks": d.ctx_masks, "tgt_mask": d.tgt_masks[t],
            "ctx_K": d.ctx_K, "ctx_c2w": d.ctx_c2w, "tgt_K": d.tgt_K[t], "tgt_c2w": d.tgt_c2w[t],
            "index": torch.tensor(g, dtype=torch.int64), "scene": name,
            "ctx_frames": torch.tensor(d.ctx_index, dtype=torch.int64), "tgt_frame": int(ti),
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        w, W = (info.id, info.num_workers) if info is not None else (0, 1)
        for j in self.local_positions(w, W):
            yield self.sample(j)


JPEG_KEYS = ("ctx_jpeg", "tgt_jpeg")


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """`default_collate`, except that JPEG bytes (variable length) stay lists: ``ctx_jpeg`` [B][2] and
    ``tgt_jpeg`` [B] of 1-D uint8 tensors."""
    if not samples or JPEG_KEYS[0] not in samples[0]:
        return default_collate(samples)
    rest = default_collate([{k: v for k, v in s.items() if k not in JPEG_KEYS} for s in samples])
    return {**rest, "ctx_jpeg": [list(s["ctx_jpeg"]) for s in samples], "tgt_jpeg": [s["tgt_jpeg"] for s in samples]}


def make_loader(stream: ShardStream, num_workers: int = 2, prefetch: int = 4, pin_memory: bool = False, *,
                batch_size: int | None = None) -> DataLoader:
    """A DataLoader over `stream` whose output order is the rank's order (batches of `stream.batch_size`)."""
    if batch_size is not None:
        stream.batch_size = batch_size
    kw: dict[str, Any] = {}
    if num_workers > 0:
        kw.update(prefetch_factor=prefetch, persistent_workers=True)
    return DataLoader(stream, batch_size=stream.batch_size, num_workers=num_workers, pin_memory=pin_memory,
                      collate_fn=collate, **kw)


__all__ = ["ShardStream", "collate", "make_loader", "JPEG_KEYS"]
