"""Stage one's loader thread: scenes -> sampled pairs -> frames (a small decoding pool, an LRU of frames
shared by neighbouring pairs) -> packed batches, one batch ahead into a bounded queue."""
from __future__ import annotations

import logging
import queue
import threading
import traceback
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from snd.cache import manifest as M
from snd.cache.frames import encode_frame, resize_uint8
from snd.cache.schema import FrameSpec
from snd.cache.writer import clear_stale
from snd.errors import SndError
from snd.pipeline.config import PrecomputeConfig
from snd.scaffold import ScaffoldSource
from snd.stages.precompute.settings import frame_spec

log = logging.getLogger(__name__)

FRAME_CACHE = 64  # frames kept per scene (pairs are sorted by context index, so neighbours share frames)
LOAD_THREADS = 4  # parallel frame decoders


@dataclass
class _Frame:
    image: np.ndarray  # [H,W,3] uint8
    mask: np.ndarray  # [H,W] int32
    depth: np.ndarray | None  # [H,W] float32
    K: np.ndarray
    c2w: np.ndarray
    stored: np.ndarray | None = None  # the frame as the store keeps it (resized, encoded; None: --images off)


class _FrameCache:
    def __init__(self, scene: Any, *, need_depth: bool, pool: ThreadPoolExecutor, hw: tuple[int, int],
                 fspec: FrameSpec | None = None):
        self.scene, self.need_depth, self.pool, self.hw, self.fspec = scene, need_depth, pool, hw, fspec
        self.cache: OrderedDict[int, _Frame] = OrderedDict()

    def _load(self, i: int) -> _Frame:
        s = self.scene
        H, W = self.hw
        cam = s.camera(i)
        img = np.asarray(s.image(i))
        mask = np.asarray(s.instance_mask(i))
        depth = s.depth(i) if self.need_depth else None
        if img.shape != (H, W, 3) or img.dtype != np.uint8:
            raise SndError(f"frame {s.frame_ids[i]}: image is {img.shape} {img.dtype}, expected ({H}, {W}, 3) uint8")
        if mask.shape != (H, W):
            raise SndError(f"frame {s.frame_ids[i]}: instance mask is {mask.shape}, expected ({H}, {W})")
        if self.need_depth:
            if depth is None:
                raise SndError(f"scene {s.name} has no depth, which --source depth needs",
                               hint="use --source mvsplat (with --mvsplat-ckpt) for data without depth")
            depth = np.asarray(depth, np.float32)
        if (cam.height, cam.width) != (H, W):
            raise SndError(f"frame {s.frame_ids[i]}: camera is {cam.height}x{cam.width}, expected {H}x{W}")
        stored = None
        if self.fspec is not None:  # stage two's resize, once, here (on the pool: torch releases the GIL)
            small = resize_uint8(torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1), self.fspec.hw)
            stored = encode_frame(small.contiguous(), self.fspec.codec, quality=self.fspec.quality, filter=self.fspec.filter)
        return _Frame(img, mask.astype(np.int32, copy=False), depth, cam.K, cam.c2w, stored)

    def get(self, idx: list[int]) -> dict[int, _Frame]:
        need = [i for i in dict.fromkeys(idx) if i not in self.cache]
        for i, fr in zip(need, self.pool.map(self._load, need)):
            self.cache[i] = fr
        out = {}
        for i in idx:
            self.cache.move_to_end(i)
            out[i] = self.cache[i]
        while len(self.cache) > max(FRAME_CACHE, len(set(idx))):
            self.cache.popitem(last=False)
        return out


@dataclass
class _Batch:
    scene: str
    images: torch.Tensor  # [B,2,H,W,3] uint8
    depth: torch.Tensor | None  # [B,2,H,W]
    ctx_K: np.ndarray  # [B,2,3,3]
    ctx_c2w: np.ndarray
    extra: dict[str, Any]  # masks, indices, target cameras (arrays); 'frames': {frame index: stored bytes} first used here


def _pack(scene: str, pairs: list, frames: dict[int, _Frame], T: int, H: int, W: int, need_depth: bool, pin: bool) -> _Batch:
    B = len(pairs)
    imgs = np.stack([[frames[i].image for i in p.ctx] for p in pairs])  # [B,2,H,W,3]
    depth = np.stack([[frames[i].depth for i in p.ctx] for p in pairs]) if need_depth else None
    ctx_K = np.stack([[frames[i].K for i in p.ctx] for p in pairs])
    ctx_c2w = np.stack([[frames[i].c2w for i in p.ctx] for p in pairs])
    tgt_index = np.full((B, T), -1, np.int32)
    tgt_mask = np.zeros((B, T, H, W), np.int32)
    tgt_K = np.zeros((B, T, 3, 3))
    tgt_c2w = np.tile(np.eye(4), (B, T, 1, 1))
    for b, p in enumerate(pairs):
        for t, i in enumerate(p.targets[:T]):
            tgt_index[b, t] = i
            tgt_mask[b, t] = frames[i].mask
            tgt_K[b, t] = frames[i].K
            tgt_c2w[b, t] = frames[i].c2w
    extra = {
        "ctx_mask": np.stack([[frames[i].mask for i in p.ctx] for p in pairs]).astype(np.int32),
        "tgt_mask": tgt_mask, "ctx_index": np.array([p.ctx for p in pairs], np.int32), "tgt_index": tgt_index,
        "ctx_K": ctx_K, "ctx_c2w": ctx_c2w, "tgt_K": tgt_K, "tgt_c2w": tgt_c2w,
    }
    images = torch.from_numpy(imgs)
    dt = torch.from_numpy(depth) if depth is not None else None
    if pin:
        images = images.pin_memory()
        dt = dt.pin_memory() if dt is not None else None
    return _Batch(scene, images, dt, ctx_K, ctx_c2w, extra)


def _loader(jobs: list[str], ds: Any, cfg: PrecomputeConfig, source: ScaffoldSource, out: Path,
            q: "queue.Queue", stop: threading.Event) -> None:
    from snd.data.pairs import sample_pairs

    T, H, W = cfg.targets_per_pair, cfg.height, cfg.width
    pin = source.device.type == "cuda"
    fspec = frame_spec(cfg)

    def put(msg: tuple) -> bool:
        while not stop.is_set():
            try:
                q.put(msg, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    with ThreadPoolExecutor(LOAD_THREADS, thread_name_prefix="snd-load") as pool:
        for name in jobs:
            if stop.is_set():
                return
            if M.complete_record(out, name) is not None:
                if not put(("skip", name)):
                    return
                continue
            started = False
            try:
                clear_stale(out, name)
                scene = ds.scene(name)
                pairs = sample_pairs(scene, gap_min=cfg.gap_min, gap_max=cfg.gap_max, pairs_per_scene=cfg.pairs_per_scene,
                                     targets_per_pair=T, seed=cfg.seed)
                if not pairs:
                    raise SndError(f"no context pairs with a frame gap of {cfg.gap_min}-{cfg.gap_max} among {len(scene)} frames")
                pairs = sorted(pairs, key=lambda p: (p.ctx, p.targets))
                if not put(("start", name, pairs, list(scene.frame_ids))):
                    return
                started = True
                fc = _FrameCache(scene, need_depth=source.needs_depth, pool=pool, hw=(H, W), fspec=fspec)
                sent: set[int] = set()  # frames already handed to the writer (each is stored once per scene)
                for s in range(0, len(pairs), cfg.batch_pairs):
                    chunk = pairs[s:s + cfg.batch_pairs]
                    frames = fc.get([i for p in chunk for i in (*p.ctx, *p.targets[:T])])
                    b = _pack(name, chunk, frames, T, H, W, source.needs_depth, pin)
                    if fspec is not None:
                        b.extra["frames"] = {i: fr.stored for i, fr in frames.items() if i not in sent}
                        sent.update(frames)
                    if not put(("batch", b)):
                        return
                if not put(("end", name)):
                    return
            except Exception as e:  # noqa: BLE001 - a bad scene is reported, the run goes on
                log.debug("scene %s failed:\n%s", name, traceback.format_exc())
                msg = str(e) if isinstance(e, SndError) else f"{type(e).__name__}: {e}"
                if not put(("fail", name, msg, started)):
                    return
    put(("done",))
