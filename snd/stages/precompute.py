"""Stage one: predict the Gaussian scaffold of every context pair once and store it in Zarr shards.

Three threads keep the device busy: a *loader* reads frames (images, masks, depth, cameras; a small pool
decodes in parallel, an LRU keeps frames shared by neighbouring pairs) one batch ahead into a bounded
queue; the *main* thread runs the scaffold source and quantises on the device; a *writer* compresses and
writes shards, commits scenes atomically and records them in the manifest. Time the main thread spends
blocked on the loader queue is reported ("the device waited on I/O").

Scenes are split over ranks (``names[rank::world_size]``, from --rank/--world-size or torchrun's RANK /
WORLD_SIZE); a scene that fails (missing file, bad image) is reported by name and the run goes on.
"""
from __future__ import annotations

import json
import logging
import math
import os
import queue
import tempfile
import threading
import time
import traceback
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from rich.console import Console

from snd.cache import manifest as M
from snd.cache.encode import decode_scaffold, encode_scaffold_device, fields_to_numpy
from snd.cache.opcodec import encode_operators
from snd.cache.schema import Encoding, OperatorSpec
from snd.cache.writer import SceneWriter, clear_stale
from snd.errors import SndError
from snd.pipeline.config import BenchPrecomputeConfig, PrecomputeConfig, to_jsonable
from snd.pipeline.device import to_host_async
from snd.scaffold import ScaffoldSource, create_source

log = logging.getLogger(__name__)
console = Console(stderr=True)

FRAME_CACHE = 64  # frames kept per scene (pairs are sorted by context index, so neighbours share frames)
LOAD_THREADS = 4  # parallel frame decoders


@dataclass
class Summary:
    """What a precompute run did (the CLI exits 1 when `failed` > 0)."""

    scenes_done: int = 0
    scenes_skipped: int = 0
    failed: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    pairs: int = 0
    bytes: int = 0
    seconds: float = 0.0
    wait_data_s: float = 0.0  # main (device) thread blocked on the loader queue
    wait_write_s: float = 0.0  # main thread blocked on a full writer queue
    batch_times: list[tuple[float, int, float, float]] = field(default_factory=list, repr=False)  # (t_end, pairs, wait_data, wait_write)
    phase_s: dict[str, float] = field(default_factory=dict)  # seconds per phase: main thread (launch, wait_device, operators_*), device (device_*)
    phase_log: list[dict[str, float]] = field(default_factory=list, repr=False)  # phase_s (+ writer_busy) after each batch

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_pair(self) -> float:
        return self.bytes / 1e6 / self.pairs if self.pairs else 0.0

    @property
    def steady_pairs_per_s(self) -> float | None:
        """pairs/s after the first two batches (compilation, CUDA-graph recording and warm-up excluded)."""
        bt = self.batch_times
        if len(bt) < 4:
            return None
        span = bt[-1][0] - bt[2][0]
        return sum(b[1] for b in bt[3:]) / span if span > 0 else None


def record_run(out: Path, s: Summary, rank: int, world: int, device: torch.device, scenes: list[str]) -> Path:
    """What this worker did, as JSON in the store (``_snd/runs/<time>-rank<r>of<w>.json``): with several
    workers writing one store, each leaves its own figures (pairs/s per worker; their sum is the total)."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    path = M.meta_dir(out) / "runs" / f"{stamp}-rank{rank}of{world}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    M.write_json_atomic(path, {
        "rank": rank, "world_size": world, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "scenes": scenes, "scenes_done": s.scenes_done, "scenes_skipped": s.scenes_skipped, "failed": s.failed,
        "pairs": s.pairs, "bytes": s.bytes, "seconds": s.seconds, "pairs_per_s": s.pairs_per_s,
        "steady_pairs_per_s": s.steady_pairs_per_s, "wait_data_s": s.wait_data_s, "wait_write_s": s.wait_write_s,
        "phase_s": s.phase_s})
    return path


def resolve_rank(cfg_rank: int, cfg_world: int) -> tuple[int, int]:
    """--rank/--world-size, or torchrun's RANK/WORLD_SIZE when the options are left at 0/1."""
    rank, world = cfg_rank, cfg_world
    if world == 1 and rank == 0 and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
    if world < 1 or not 0 <= rank < world:
        raise SndError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world}")
    return rank, world


PATCH = 14  # DINOv2's patch size: the operators are built for stage two's patch grids


def operator_spec(cfg: PrecomputeConfig) -> OperatorSpec | None:
    """The operator shape/knobs this run stores (None with --no-operator)."""
    if not getattr(cfg, "operator", False):
        return None
    ih = cfg.operator_img_height or cfg.height // PATCH * PATCH
    iw = cfg.operator_img_width or cfg.width // PATCH * PATCH
    if ih % PATCH or iw % PATCH or ih < PATCH or iw < PATCH:
        raise SndError(f"operator input size {ih}x{iw} is not a positive multiple of the patch size {PATCH}",
                       hint="pass --operator-img-height/--operator-img-width as multiples of 14")
    grid = (ih // PATCH, iw // PATCH)
    return OperatorSpec(ctx_hw=grid, out_hw=grid, upsample=cfg.operator_upsample, blend=cfg.operator_blend,
                        protocol=getattr(cfg, "targets_protocol", "official"),
                        row_cap=cfg.operator_row_cap, inst_cap=cfg.operator_inst_cap)


def store_header(cfg: PrecomputeConfig, ds: Any, source: ScaffoldSource, enc: Encoding) -> dict:
    src = source.describe()
    op = operator_spec(cfg)
    return {
        "operator": op.to_dict() if op is not None else None,
        "dataset": {"layout": ds.layout, "split": cfg.split},
        "data_root": str(Path(cfg.data).resolve()),
        "source": {k: v for k, v in src.items() if k != "ckpt"},
        "source_files": {"ckpt": src.get("ckpt")},
        "scaffold": {"height": cfg.height, "width": cfg.width},
        "sampler": {"gap_min": cfg.gap_min, "gap_max": cfg.gap_max, "pairs_per_scene": cfg.pairs_per_scene,
                    "targets_per_pair": cfg.targets_per_pair, "seed": cfg.seed},
        "encoding": enc.to_dict(),
        "config": {k: v for k, v in to_jsonable(cfg).items() if k not in ("rank", "world_size")},
    }


# -- loader --------------------------------------------------------------------------------------
@dataclass
class _Frame:
    image: np.ndarray  # [H,W,3] uint8
    mask: np.ndarray  # [H,W] int32
    depth: np.ndarray | None  # [H,W] float32
    K: np.ndarray
    c2w: np.ndarray


class _FrameCache:
    def __init__(self, scene: Any, *, need_depth: bool, pool: ThreadPoolExecutor, hw: tuple[int, int]):
        self.scene, self.need_depth, self.pool, self.hw = scene, need_depth, pool, hw
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
        return _Frame(img, mask.astype(np.int32, copy=False), depth, cam.K, cam.c2w)

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
    extra: dict[str, np.ndarray]  # masks, indices, target cameras


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
                fc = _FrameCache(scene, need_depth=source.needs_depth, pool=pool, hw=(H, W))
                for s in range(0, len(pairs), cfg.batch_pairs):
                    chunk = pairs[s:s + cfg.batch_pairs]
                    frames = fc.get([i for p in chunk for i in (*p.ctx, *p.targets[:T])])
                    if not put(("batch", _pack(name, chunk, frames, T, H, W, source.needs_depth, pin))):
                        return
                if not put(("end", name)):
                    return
            except Exception as e:  # noqa: BLE001 - a bad scene is reported, the run goes on
                log.debug("scene %s failed:\n%s", name, traceback.format_exc())
                msg = str(e) if isinstance(e, SndError) else f"{type(e).__name__}: {e}"
                if not put(("fail", name, msg, started)):
                    return
    put(("done",))


# -- writer --------------------------------------------------------------------------------------
class _Writer(threading.Thread):
    """Executes (start | add | commit | abort) per scene in order; a failing scene is recorded, not fatal."""

    def __init__(self, out: Path, cfg: PrecomputeConfig, enc: Encoding, on_commit: Callable[[str, dict], None],
                 on_fail: Callable[[str, str], None], maxsize: int = 2):
        super().__init__(name="snd-writer", daemon=True)
        self.q: queue.Queue = queue.Queue(maxsize=maxsize)
        self.out, self.cfg, self.enc = out, cfg, enc
        self.on_commit, self.on_fail = on_commit, on_fail
        self.writers: dict[str, SceneWriter] = {}
        self.bad: set[str] = set()
        self.error: BaseException | None = None
        self.busy_s = 0.0  # seconds spent writing (not waiting for work): how close the writer is to the limit

    def run(self) -> None:
        while True:
            op = self.q.get()
            if op[0] == "stop":
                return
            t = time.perf_counter()
            try:
                self._do(op)
            finally:
                self.busy_s += time.perf_counter() - t

    def _do(self, op: tuple) -> None:
        """One queued operation; a failing scene is recorded and aborted, the writer goes on."""
        kind, name = op[0], op[1]
        if name in self.bad and kind != "start":
            return
        try:
            if kind == "start":
                self.bad.discard(name)
                _, _, n_pairs, frame_ids = op
                self.writers[name] = SceneWriter(
                    self.out, name, n_pairs=n_pairs, n_targets=self.cfg.targets_per_pair, height=self.cfg.height,
                    width=self.cfg.width, enc=self.enc, attrs={"frame_ids": frame_ids}, op=operator_spec(self.cfg))
            elif kind == "add":
                self.writers[name].add(op[2])
            elif kind == "commit":
                rec = self.writers.pop(name).commit()
                M.write_marker(self.out, name, rec)
                M.merge_manifest(self.out)
                self.on_commit(name, rec)
            elif kind == "abort":
                w = self.writers.pop(name, None)
                if w is not None:
                    w.abort()
        except Exception as e:  # noqa: BLE001 - e.g. disk full for one scene: report it, go on
            log.debug("writing scene %s failed:\n%s", name, traceback.format_exc())
            self.bad.add(name)
            w = self.writers.pop(name, None)
            if w is not None:
                w.abort()
            self.on_fail(name, f"writing failed: {type(e).__name__}: {e}")


# -- run -----------------------------------------------------------------------------------------
def make_source(cfg: PrecomputeConfig | BenchPrecomputeConfig, *, random_init: bool = False) -> ScaffoldSource:
    return create_source(cfg.source, device=cfg.device, ckpt=cfg.mvsplat_ckpt, config=cfg.mvsplat_config,
                         precision=cfg.precision, near=getattr(cfg, "near", 1.0), far=getattr(cfg, "far", 100.0),
                         random_init=random_init, compile=getattr(cfg, "compile", "off"), pad_to=cfg.batch_pairs)


def run(cfg: PrecomputeConfig, *, source: ScaffoldSource | None = None, progress: bool = True,
        on_batch: Callable[[str, int], None] | None = None) -> Summary:
    """Precompute scaffolds of this rank's scenes into the store `cfg.out`.

    Args:
        cfg: the stage's options.
        source: a ready scaffold source (default: built from cfg).
        progress: show rich progress and the summary table.
        on_batch: called as on_batch(scene, pairs_done_in_scene) after each batch is queued for writing
            (tests use it to kill the process mid-scene).
    """
    from snd.data import open_dataset

    if cfg.batch_pairs < 1:
        raise SndError(f"--batch-pairs must be >= 1, got {cfg.batch_pairs}")
    rank, world = resolve_rank(cfg.rank, cfg.world_size)
    ds = open_dataset(cfg.data, cfg.layout, height=cfg.height, width=cfg.width)
    names = ds.scene_names(cfg.split)
    if cfg.scenes is not None:
        names = names[: cfg.scenes]
    if not names:
        raise SndError(f"no scenes in split {cfg.split!r} of {cfg.data}", path=cfg.data)
    for n in names:
        M.check_scene_name(n)
    ds.check_scenes(names)  # e.g. prepared scenes without instance masks: fail now, listing them
    if progress and rank == 0:
        console.print(ds.describe_selection(cfg.split, names))
    jobs = names[rank::world]
    source = source if source is not None else make_source(cfg)
    enc = Encoding(offset=source.has_offset)
    op_spec = operator_spec(cfg)
    out = Path(cfg.out)
    M.init_store(out, store_header(cfg, ds, source, enc))

    summary = Summary()
    lock = threading.Lock()

    def on_commit(name: str, rec: dict) -> None:
        with lock:
            summary.scenes_done += 1
            summary.pairs += rec["pairs"]
            summary.bytes += rec["bytes"]

    def on_fail(name: str, msg: str) -> None:
        with lock:
            if name not in summary.failures:
                summary.failures[name] = msg
                summary.failed += 1
        try:
            M.write_failure(out, name, msg)
        except OSError:  # pragma: no cover
            log.warning("could not record the failure of scene %s", name)

    t0 = time.perf_counter()
    lq: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()
    loader = threading.Thread(target=_loader, args=(jobs, ds, cfg, source, out, lq, stop), name="snd-loader", daemon=True)
    writer = _Writer(out, cfg, enc, on_commit, on_fail)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not progress, transient=False)
    est = cfg.pairs_per_scene * len(jobs) if cfg.pairs_per_scene else None
    t_scenes = prog.add_task(f"scenes (rank {rank}/{world})", total=len(jobs), info="")
    t_pairs = prog.add_task("pairs", total=est, info="")
    loader.start()
    writer.start()
    in_scene: dict[str, int] = {}
    queued_pairs = 0
    dev = torch.device(source.device)
    pending: _InFlight | None = None
    wait_data = 0.0

    def land() -> None:
        """Hand the in-flight batch to the writer (called after the next batch is launched, or before any
        scene event so the writer sees every scene's batches before its commit)."""
        nonlocal pending, queued_pairs
        if pending is None:
            return
        f, pending = pending, None
        fields = _land(f, enc, op_spec, summary.phase_s, dev)
        tw = time.perf_counter()
        writer.q.put(("add", f.batch.scene, fields))
        wait_write = time.perf_counter() - tw
        summary.wait_write_s += wait_write
        n = len(f.batch.ctx_K)
        in_scene[f.batch.scene] += n
        queued_pairs += n
        summary.batch_times.append((time.perf_counter() - t0, n, wait_data, wait_write))
        summary.phase_log.append(dict(summary.phase_s, writer_busy=writer.busy_s))
        el = time.perf_counter() - t0
        prog.update(t_pairs, advance=n, info=f"{queued_pairs / max(el, 1e-9):.1f} pairs/s, "
                                            f"{summary.bytes / 1e6:.0f} MB written")
        if on_batch is not None:
            on_batch(f.batch.scene, in_scene[f.batch.scene])

    try:
        with prog:
            while True:
                tw = time.perf_counter()
                msg = lq.get()
                wait_data = time.perf_counter() - tw
                summary.wait_data_s += wait_data
                kind = msg[0]
                if kind == "batch":
                    launched = _launch(source, msg[1], enc, summary.phase_s)
                    land()
                    pending = launched
                    continue
                land()
                if kind == "done":
                    break
                if kind == "skip":
                    summary.scenes_skipped += 1
                    prog.advance(t_scenes)
                    continue
                if kind == "start":
                    in_scene[msg[1]] = 0
                    writer.q.put(("start", msg[1], len(msg[2]), msg[3]))
                    if est is not None and len(msg[2]) < cfg.pairs_per_scene:
                        est -= cfg.pairs_per_scene - len(msg[2])
                        prog.update(t_pairs, total=est)
                    continue
                if kind == "fail":
                    name = msg[1]
                    if msg[3]:
                        writer.q.put(("abort", name))
                    on_fail(name, msg[2])
                    prog.advance(t_scenes)
                    continue
                if kind == "end":
                    writer.q.put(("commit", msg[1]))
                    prog.advance(t_scenes)
                    continue
            writer.q.put(("stop",))
            writer.join()
    finally:
        stop.set()
        if writer.is_alive():
            with _suppress_full():
                writer.q.put_nowait(("stop",))
        loader.join(timeout=5)
    summary.seconds = time.perf_counter() - t0
    record_run(out, summary, rank, world, dev, jobs)
    if progress:
        print_summary(summary, out)
    return summary


class _suppress_full:
    def __enter__(self) -> None:
        return None

    def __exit__(self, et, e, tb) -> bool:
        return et is queue.Full


def _build_operators(fields: dict[str, np.ndarray], b: _Batch, enc: Encoding, spec: OperatorSpec,
                     dev: torch.device, ph: _Phases | None = None) -> dict[str, np.ndarray]:
    """Transfer operators of every (pair, target slot), built from the *decoded* stored scaffold, so that
    stage two's operator path equals its render path on exactly what the cache holds."""
    from snd.splat.gaussians import PixelGaussians
    from snd.splat.operator import build_operator
    from snd.train.distiller import rigid_inverse

    K = torch.from_numpy(b.ctx_K).to(dev)
    c2w = torch.from_numpy(b.ctx_c2w).to(dev)
    dec = {k: v for k, v in fields.items() if k in ("depth", "offset", "quats", "scales", "opacity", "offset_range", "scale_range")}
    means, quats, scales, opac = decode_scaffold(dec, K, c2w, enc=enc, device=dev)
    if ph is not None:
        ph.mark("operators_decode")
    ex = b.extra
    ops = []
    for i in range(len(b.ctx_K)):
        g = PixelGaussians(means[i], quats[i], scales[i], opac[i])
        ctx_masks = torch.from_numpy(ex["ctx_mask"][i].astype(np.int64)).to(dev)
        row = []
        for t, ti in enumerate(ex["tgt_index"][i]):
            if ti < 0:
                row.append(None)
                continue
            w2c = rigid_inverse(torch.from_numpy(ex["tgt_c2w"][i, t]).to(dev, torch.float32))
            row.append(build_operator(
                g, ctx_masks, torch.from_numpy(ex["tgt_mask"][i, t].astype(np.int64)).to(dev),
                torch.from_numpy(ex["tgt_K"][i, t]).to(dev, torch.float32), w2c, spec.ctx_hw, spec.out_hw,
                upsample=spec.upsample, blend=spec.blend, blend_weight=spec.blend_weight,
                protocol=spec.protocol, row_cap=spec.row_cap, inst_cap=spec.inst_cap))
        ops.append(row)
    if ph is not None:
        ph.mark("operators")
    out = encode_operators(ops, spec)
    if ph is not None:
        ph.mark("operators_to_host")
    return out


class _Phases:
    """Seconds the main thread spends per phase (device synced at each boundary: every phase ends in a
    device-to-host copy anyway, so the syncs cost nothing and the split is exact)."""

    def __init__(self, device: torch.device, into: dict[str, float]):
        self.device, self.into, self.t = device, into, time.perf_counter()

    def mark(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.into[name] = self.into.get(name, 0.0) + now - self.t
        self.t = now


@dataclass
class _InFlight:
    """A batch whose network and quantisation are queued on the device and whose fields are being copied
    into pinned host memory. The main thread launches the next batch before it lands this one, so the
    device never idles while the host turns fields into numpy, builds operators or queues writes."""

    batch: _Batch
    host: dict[str, torch.Tensor]  # stored fields on the host (pinned on CUDA; filled when `events[2]` fires)
    events: list | None  # CUDA events: queued, predicted, copied (None on CPU, where everything is done)


def _launch(source: ScaffoldSource, b: _Batch, enc: Encoding, phases: dict[str, float]) -> _InFlight:
    """Queue predict + quantise + device-to-host copy of one batch; returns without waiting for the device
    (nothing on this path reads a device value back: non-blocking copies, `inv_ex`, host-checked near/far)."""
    t0 = time.perf_counter()
    dev = torch.device(source.device)
    cuda = dev.type == "cuda"
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)] if cuda else None
    if ev:
        ev[0].record()
    images = b.images.to(dev, non_blocking=True).permute(0, 1, 4, 2, 3).float().div_(255.0)  # [B,2,3,H,W]

    def to_device(a: np.ndarray) -> torch.Tensor:  # through pinned memory: a truly asynchronous copy
        t = torch.from_numpy(a)
        return t.pin_memory().to(dev, non_blocking=True) if cuda else t

    K, c2w = to_device(b.ctx_K), to_device(b.ctx_c2w)  # float64
    depth = b.depth.to(dev, non_blocking=True) if b.depth is not None else None
    gs = source.predict(images, K.float(), c2w.float(), depth=depth)
    if ev:
        ev[1].record()
    stack = [torch.stack([getattr(g, k) for g in gs]) for k in ("means", "quats", "scales", "opacities")]
    fields = encode_scaffold_device(*stack, K, c2w, enc=enc)
    host = {k: to_host_async(v) for k, v in fields.items()}
    if ev:
        ev[2].record()
    phases["launch"] = phases.get("launch", 0.0) + time.perf_counter() - t0
    return _InFlight(b, host, ev)


def _land(f: _InFlight, enc: Encoding, spec: OperatorSpec | None, phases: dict[str, float],
          dev: torch.device) -> dict[str, np.ndarray]:
    """Wait for a launched batch's fields, add the loader's arrays (and the operators); the writer's input."""
    t0 = time.perf_counter()
    if f.events is not None:
        ev = f.events
        ev[2].synchronize()
        # device time of each part, from the events (exact even though the host did not wait for them)
        phases["device_predict"] = phases.get("device_predict", 0.0) + ev[0].elapsed_time(ev[1]) / 1e3
        phases["device_encode"] = phases.get("device_encode", 0.0) + ev[1].elapsed_time(ev[2]) / 1e3
    phases["wait_device"] = phases.get("wait_device", 0.0) + time.perf_counter() - t0
    fields = fields_to_numpy(f.host, enc)
    fields.update(f.batch.extra)
    if spec is not None:
        ph = _Phases(dev, phases)
        ph.mark("operators_wait")  # the next batch's network, queued ahead of the operator kernels
        fields.update(_build_operators(fields, f.batch, enc, spec, dev, ph))
    return fields


def print_summary(s: Summary, out: Path) -> None:
    from rich.table import Table

    t = Table(title=f"snd precompute -> {out}")
    for col in ("scenes done", "skipped", "failed", "pairs", "pairs/s", "MB written", "MB/pair", "waited on data"):
        t.add_column(col, justify="right")
    t.add_row(str(s.scenes_done), str(s.scenes_skipped), str(s.failed), str(s.pairs), f"{s.pairs_per_s:.2f}",
              f"{s.bytes / 1e6:.1f}", f"{s.mb_per_pair:.2f}", f"{s.wait_data_s:.1f} s")
    console.print(t)
    for name, msg in s.failures.items():
        console.print(f"[red]failed[/] {name}: {msg}")


# -- bench ---------------------------------------------------------------------------------------
PAPER_PAIRS = 50_000  # ~180 pairs x 280 scenes: the store SnD's stage two reads
_BENCH_FRAMES = 24  # frames per generated scene: 5 * 24 - 50 = 70 context pairs with gaps 8..12


def _bench_dataset(work: Path, cfg: BenchPrecomputeConfig, scenes: int) -> Path:
    from snd.data.synth import generate_dataset
    from snd.pipeline.config import SynthConfig

    data = work / "data"
    key = {"height": cfg.height, "width": cfg.width, "scenes": scenes, "frames": _BENCH_FRAMES}
    stamp = data / "bench.json"
    if not (stamp.is_file() and json.loads(stamp.read_text()) == key):
        import shutil

        shutil.rmtree(data, ignore_errors=True)
        console.print(f"generating {scenes} procedural scenes at {cfg.height}x{cfg.width} in {data} ...")
        generate_dataset(SynthConfig(out=data, scenes=scenes, frames=_BENCH_FRAMES, height=cfg.height, width=cfg.width,
                                     objects=6, seed=0), progress=True)
        stamp.write_text(json.dumps(key))
    # Ray-cast masks/depth once (cached on disk), as a second pass over real data would find them, so
    # the timed run measures the steady state rather than first-touch ray casting.
    from snd.data import open_dataset

    ds = open_dataset(data, height=cfg.height, width=cfg.width)
    with ThreadPoolExecutor(LOAD_THREADS) as pool:
        for name in ds.scene_names("all"):
            sc = ds.scene(name)
            list(pool.map(lambda i: (sc.instance_mask(i), sc.depth(i)), range(len(sc))))
    return data


def bench_store(work: Path, *, height: int, width: int, pairs: int, img_hw: tuple[int, int], device: str) -> Path:
    """A scaffold store of at least `pairs` context pairs (3 targets each) over generated scenes, with the
    operators for backbone input `img_hw`: what `snd bench distill` streams. Built once per size in `work`
    (depth source: exact and fast), reused while its stamp matches; always a single worker, also when the
    caller runs under torchrun (the benchmark's rank 0 builds it while the others wait)."""
    import shutil

    per_scene_max = 5 * _BENCH_FRAMES - 50
    scenes = max(2, math.ceil(pairs / per_scene_max))
    store = work / "store"
    key = {"height": height, "width": width, "pairs": pairs, "img_hw": list(img_hw), "frames": _BENCH_FRAMES}
    stamp = work / "store.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == key and (store / "manifest.json").is_file():
        return store
    data = _bench_dataset(work, BenchPrecomputeConfig(height=height, width=width), scenes)
    shutil.rmtree(store, ignore_errors=True)
    stamp.unlink(missing_ok=True)
    pcfg = PrecomputeConfig(data=data, out=store, split="all", source="depth", height=height, width=width,
                            pairs_per_scene=math.ceil(pairs / scenes), targets_per_pair=3, device=device,
                            operator=True, operator_img_height=img_hw[0], operator_img_width=img_hw[1], rank=0, world_size=1)
    saved = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}  # one worker builds it all
    try:
        s = run(pcfg, progress=True)
    finally:
        os.environ.update(saved)
    if s.failed:
        raise SndError(f"bench store: {s.failed} scene(s) failed: {s.failures}")
    stamp.write_text(json.dumps(key))
    return store


def _bench_psnr(store: Path, source: ScaffoldSource, enc: Encoding) -> dict:
    """Colour render of one target view from the cached vs the float32 scaffold (torch backend)."""
    import math as _m

    from snd.data import open_dataset
    from snd.splat.render import render_features

    r = __import__("snd.cache.reader", fromlist=["CacheReader"]).CacheReader(store)
    name = r.scenes[0]
    sr = r.scene(name)
    dp = sr.pair(0)
    hdr = r.manifest
    ds = open_dataset(hdr["data_root"], hdr["dataset"]["layout"], height=sr.height, width=sr.width)
    scene = ds.scene(name)
    dev = source.device
    imgs = torch.stack([torch.from_numpy(np.array(scene.image(i))) for i in dp.ctx_index]).to(dev)  # [2,H,W,3]
    K64 = torch.from_numpy(sr.read_stored(0)["ctx_K"])[None]
    c2w64 = torch.from_numpy(sr.read_stored(0)["ctx_c2w"])[None]
    depth = None
    if source.needs_depth:
        depth = torch.from_numpy(np.stack([scene.depth(i) for i in dp.ctx_index]))[None].float().to(dev)
    g = source.predict(imgs.permute(0, 3, 1, 2)[None].float() / 255, K64.float(), c2w64.float(), depth=depth)[0]
    colours = imgs.reshape(-1, 3).float() / 255
    t = dp.tgt_index[0]
    tcam = scene.camera(t)
    K_t = torch.tensor(tcam.K, dtype=torch.float32, device=dev)
    w2c = torch.tensor(tcam.w2c, dtype=torch.float32, device=dev)
    gt = torch.from_numpy(np.array(scene.image(t))).to(dev).permute(2, 0, 1).float() / 255

    def render(means, quats, scales, opac):
        from snd.splat.inputs import SplatInput

        img, _ = render_features(SplatInput(means.reshape(-1, 3).to(dev), quats.reshape(-1, 4).to(dev), scales.reshape(-1, 3).to(dev),
                                            opac.reshape(-1).to(dev), K_t, w2c, sr.height, sr.width), colours, backend="torch")
        return img.clamp(0, 1)

    def psnr(a, b):
        return 10 * _m.log10(1.0 / max(float(((a - b) ** 2).mean()), 1e-20))

    ref = render(g.means, g.quats, g.scales, g.opacities)
    got = render(dp.means, dp.quats, dp.scales, dp.opacities)
    return {"scene": name, "pair": 0, "target": t, "psnr_fp32_vs_gt": psnr(ref, gt), "psnr_cached_vs_gt": psnr(got, gt),
            "psnr_loss_db": psnr(ref, gt) - psnr(got, gt), "psnr_cached_vs_fp32": psnr(got, ref)}


def _timed_phases(log_: list[dict[str, float]], k0: int, pairs: int) -> dict[str, float]:
    """ms per pair of each main-thread phase (and the writer's busy time) over the timed batches."""
    if not log_ or pairs <= 0 or k0 + 1 >= len(log_):
        return {}
    a, b = log_[k0], log_[-1]
    return {k: 1e3 * (b[k] - a.get(k, 0.0)) / pairs for k in b}


def bench(cfg: BenchPrecomputeConfig) -> dict:
    """Stage-one throughput (pairs/s), device waits on I/O, MB/pair and the PSNR loss of the encoding.

    Generates procedural scenes at the bench size (cached in the workdir), runs the real precompute
    pipeline (loader, source, quantiser, writer) and times it after two warm-up batches.
    """
    import shutil

    work = Path(cfg.workdir) if cfg.workdir is not None else Path(tempfile.mkdtemp(prefix="snd-bench-precompute-"))
    work.mkdir(parents=True, exist_ok=True)
    warm = 2 * cfg.batch_pairs
    total = warm + cfg.pairs
    per_scene_max = 5 * _BENCH_FRAMES - 50
    scenes = max(2, math.ceil(total / per_scene_max))
    data = _bench_dataset(work, cfg, scenes)
    store = work / "cache"
    shutil.rmtree(store, ignore_errors=True)
    pcfg = PrecomputeConfig(data=data, out=store, split="all", source=cfg.source, mvsplat_ckpt=cfg.mvsplat_ckpt,
                            mvsplat_config=cfg.mvsplat_config, height=cfg.height, width=cfg.width,
                            pairs_per_scene=math.ceil(total / scenes), targets_per_pair=3, batch_pairs=cfg.batch_pairs,
                            precision=cfg.precision, device=cfg.device, compile=cfg.compile, operator=cfg.operator)
    source = make_source(pcfg, random_init=cfg.mvsplat_ckpt is None)
    s = run(pcfg, source=source, progress=True)
    if s.failed:
        raise SndError(f"bench precompute: {s.failed} scene(s) failed: {s.failures}")
    bt = s.batch_times
    k0 = min(2, len(bt) - 1)
    timed = bt[k0 + 1:]
    span = bt[-1][0] - bt[k0][0] if timed else float("nan")
    timed_pairs = sum(b[1] for b in timed)
    wait_data = sum(b[2] for b in timed)
    wait_write = sum(b[3] for b in timed)
    gauss = 2 * cfg.height * cfg.width
    res: dict[str, Any] = {
        "source": source.describe(), "device": str(source.device),
        "device_name": torch.cuda.get_device_name(source.device) if source.device.type == "cuda" else "cpu",
        "torch": torch.__version__, "height": cfg.height, "width": cfg.width, "batch_pairs": cfg.batch_pairs,
        "precision": cfg.precision, "pairs_total": s.pairs, "pairs_timed": timed_pairs, "seconds_timed": span,
        "pairs_per_s": timed_pairs / span if span > 0 else None,
        "pairs_per_s_end_to_end": s.pairs_per_s, "data_wait_s": wait_data,
        "data_wait_frac": wait_data / span if span > 0 else None,
        "gpu_waited_on_io": bool(span > 0 and wait_data / span > 0.02), "write_wait_s": wait_write,
        "phase_ms_per_pair": _timed_phases(s.phase_log, k0, timed_pairs),
        "peak_mem_gib": torch.cuda.max_memory_allocated(source.device) / 2**30 if source.device.type == "cuda" else None,
        "mb_per_pair": s.mb_per_pair, "gaussians_per_pair": gauss, "bytes_per_gaussian": s.bytes / max(s.pairs, 1) / gauss,
        "projected_gb_at_50k_pairs": s.mb_per_pair * PAPER_PAIRS / 1e3, "goal": {"pairs_per_s": 30, "mb_per_pair": 8},
        "store": str(store),
    }
    try:
        res["psnr"] = _bench_psnr(store, source, Encoding(offset=source.has_offset))
    except Exception as e:  # noqa: BLE001 - the throughput numbers stand without the render check
        log.debug("bench psnr failed:\n%s", traceback.format_exc())
        res["psnr"] = {"error": f"{type(e).__name__}: {e}"}
    from snd.pipeline.jsonout import emit_json

    return emit_json(res, cfg.out)
