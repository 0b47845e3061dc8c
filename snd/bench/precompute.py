"""`snd bench precompute`: stage one's throughput on generated scenes, and the stores other benches stream.

Runs the real pipeline (`snd.stages.precompute.run`) on procedural scenes cached in a work folder and
times it after two warm-up batches.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from snd.cache.info import scaffold_info
from snd.cache.schema import Encoding
from snd.errors import SndError
from snd.pipeline.config import BenchPrecomputeConfig, PrecomputeConfig
from snd.scaffold import ScaffoldSource
from snd.splat import kernels
from snd.stages.precompute import LOAD_THREADS, make_source, run
from snd.stages.precompute.settings import resolve_batch_pairs

log = logging.getLogger(__name__)
console = Console(stderr=True)


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
    operators and frames (the default codec) for backbone input `img_hw`: what `snd bench distill` streams. Built once per size in `work`
    (depth source: exact and fast), reused while its stamp matches; always a single worker, also when the
    caller runs under torchrun (the benchmark's rank 0 builds it while the others wait)."""
    import shutil

    per_scene_max = 5 * _BENCH_FRAMES - 50
    scenes = max(2, math.ceil(pairs / per_scene_max))
    store = work / "store"
    key = {"height": height, "width": width, "pairs": pairs, "img_hw": list(img_hw), "frames": _BENCH_FRAMES,
           "images": PrecomputeConfig.images}
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


def _corr_kernel_used(source: ScaffoldSource) -> bool | None:
    """Whether MVSplat's cost volume ran through snd's Triton kernel (None: no MVSplat, or not on CUDA)."""
    from snd.models.mvsplat import corr_kernel

    net = getattr(source, "net", None)  # MVSplatScaffold's encoder (compiled or not: attributes reach the module)
    if net is None or source.device.type != "cuda":
        return None
    return bool(net.depth_predictor.corr_kernel and corr_kernel.available())


def prepare(cfg: BenchPrecomputeConfig) -> tuple[PrecomputeConfig, ScaffoldSource]:
    """The generated dataset (cached in the work folder), the stage's config and its scaffold source: what
    `measure` runs, once or (scripts/gpu_precompute_ab.py) several times over one compiled source."""
    work = Path(cfg.workdir) if cfg.workdir is not None else Path(tempfile.mkdtemp(prefix="snd-bench-precompute-"))
    work.mkdir(parents=True, exist_ok=True)
    bp = resolve_batch_pairs(cfg.batch_pairs, cfg.device)  # 0 = auto: 8 on CUDA, 1 on CPU
    total = 2 * bp + cfg.pairs  # two warm-up batches
    per_scene_max = 5 * _BENCH_FRAMES - 50
    scenes = max(2, math.ceil(total / per_scene_max))
    data = _bench_dataset(work, cfg, scenes)
    pcfg = PrecomputeConfig(data=data, out=work / "cache", split="all", source=cfg.source, mvsplat_ckpt=cfg.mvsplat_ckpt,
                            mvsplat_config=cfg.mvsplat_config, height=cfg.height, width=cfg.width,
                            pairs_per_scene=math.ceil(total / scenes), targets_per_pair=3, batch_pairs=bp,
                            precision=cfg.precision, device=cfg.device, compile=cfg.compile, operator=cfg.operator,
                            images=cfg.images, operator_chunk=cfg.operator_chunk,
                            operator_stream=cfg.operator_stream, operator_thread=cfg.operator_thread,
                            operator_priority=cfg.operator_priority, operator_workers=cfg.operator_workers,
                            writer=cfg.writer, writer_codecs=cfg.writer_codecs)
    return pcfg, make_source(pcfg, random_init=cfg.mvsplat_ckpt is None)


def _busy(prof, t0_ns: int, t1_ns: int) -> dict:
    """Fraction of [t0, t1] (unix ns, the profiler's clock) in which the GPU ran a kernel: all streams
    together (the union of their intervals), and each stream alone."""
    def kernel(e) -> bool:  # torch 2.11's events have no activity_type(): copies and memsets are told by name
        kind = getattr(e, "activity_type", None)
        return kind() == "kernel" if kind is not None else not e.name().startswith(("Memcpy", "Memset"))

    spans: dict[int, list[tuple[int, int]]] = {}
    for e in prof.profiler.kineto_results.events():
        if e.device_type() == torch.autograd.DeviceType.CUDA and kernel(e):
            lo, hi = max(e.start_ns(), t0_ns), min(e.end_ns(), t1_ns)
            if hi > lo:
                spans.setdefault(e.device_resource_id(), []).append((lo, hi))

    def union(iv: list[tuple[int, int]]) -> int:
        tot, end = 0, -1
        for lo, hi in sorted(iv):
            if hi > end:
                tot += hi - max(lo, end)
                end = hi
        return tot

    win = max(t1_ns - t0_ns, 1)
    return {"fraction": union([x for v in spans.values() for x in v]) / win, "window_s": win / 1e9,
            "per_stream": {str(k): union(v) / win for k, v in sorted(spans.items(), key=lambda kv: -union(kv[1]))}}


def measure(cfg: BenchPrecomputeConfig, pcfg: PrecomputeConfig, source: ScaffoldSource) -> dict:
    """One timed run of stage one into a fresh store at `pcfg.out` (the figures of `bench`, without the PSNR).

    With `cfg.gpu_busy` on CUDA the run is traced (kernels only, through CUPTI) and the result says how much of
    the timed window the GPU was busy: near 1, stage one is device-bound; well below, a host thread limits it."""
    import shutil

    store = Path(pcfg.out)
    shutil.rmtree(store, ignore_errors=True)
    marks: list[int] = []  # unix ns of each batch handed to the writer (the profiler's clock)
    cuda = source.device.type == "cuda"
    prof = None
    if cfg.gpu_busy and cuda:
        from torch.profiler import ProfilerActivity, profile

        prof = profile(activities=[ProfilerActivity.CUDA])
        prof.start()
    try:
        s = run(pcfg, source=source, progress=True, on_batch=lambda scene, n: marks.append(time.time_ns()))
    finally:
        if prof is not None:
            prof.stop()
    if s.failed:
        raise SndError(f"bench precompute: {s.failed} scene(s) failed: {s.failures}")
    bt = s.batch_times
    k0 = min(2, len(bt) - 1)
    timed = bt[k0 + 1:]
    span = bt[-1][0] - bt[k0][0] if timed else float("nan")
    timed_pairs = sum(b[1] for b in timed)
    wait_data = sum(b[2] for b in timed)
    wait_write = sum(b[3] for b in timed)
    gauss = 2 * pcfg.height * pcfg.width
    res: dict[str, Any] = {
        "source": source.describe(), "device": str(source.device),
        "device_name": torch.cuda.get_device_name(source.device) if cuda else "cpu",
        "torch": torch.__version__, "height": pcfg.height, "width": pcfg.width, "batch_pairs": pcfg.batch_pairs,
        "precision": cfg.precision, "pairs_total": s.pairs, "pairs_timed": timed_pairs, "seconds_timed": span,
        "pairs_per_s": timed_pairs / span if span > 0 else None,
        "pairs_per_s_end_to_end": s.pairs_per_s, "data_wait_s": wait_data,
        "data_wait_frac": wait_data / span if span > 0 else None,
        "gpu_waited_on_io": bool(span > 0 and wait_data / span > 0.02), "write_wait_s": wait_write,
        # seconds per pair each thread spent per phase: main (launch, wait_device), operator stage (operators_*),
        # writer (writer_busy), device (device_*, from events); with the operator thread they overlap
        "phase_ms_per_pair": _timed_phases(s.phase_log, k0, timed_pairs),
        # the GPU's busy fraction over the timed batches (--gpu-busy; None when not traced)
        "gpu_busy": _busy(prof, marks[k0], marks[-1]) if prof is not None and len(marks) > k0 + 1 else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated(source.device) / 2**30 if cuda else None,
        "mb_per_pair": s.mb_per_pair, "images": pcfg.images, "operator": pcfg.operator,
        "operator_chunk": s.operator_chunk.size if s.operator_chunk else None,  # as used at the end (auto resolved, shrunk on OOM)
        "operator_chunk_asked": s.operator_chunk.initial if s.operator_chunk else None,
        "operator_stream": s.operator_stream,
        "operator_thread": bool(pcfg.operator_thread),
        "operator_workers": s.operator_workers,
        "operator_priority": s.operator_priority,
        "writer": s.writer,  # "thread" or "process", as run
        "writer_codecs": s.writer_codecs,  # "zarr" or "zarrs", as run
        # snd's CUDA kernels for the operators (snd.splat.kernels) as this run used them; "off" after a failed build
        "operator_kernels": {k: kernels.enabled(k) for k in kernels.ENV} if cuda else None,
        # MVSplat's cost volume through snd's Triton kernel (snd.models.mvsplat.corr_kernel)
        "mvsplat_corr_kernel": _corr_kernel_used(source),
        "frame_mb_per_pair": s.frame_bytes / 1e6 / max(s.pairs, 1),  # the frames' bytes before Zarr's codecs
        "size_split": scaffold_info(store)["split"],  # MB/pair per part as stored, MB/frame, pairs per frame
        "gaussians_per_pair": gauss, "bytes_per_gaussian": s.bytes / max(s.pairs, 1) / gauss,
        "projected_gb_at_50k_pairs": s.mb_per_pair * PAPER_PAIRS / 1e3, "goal": {"pairs_per_s": 30, "mb_per_pair": 8},
        "store": str(store),
    }
    return res


def bench(cfg: BenchPrecomputeConfig) -> dict:
    """Stage-one throughput (pairs/s), device waits on I/O, MB/pair and the PSNR loss of the encoding.

    Generates procedural scenes at the bench size (cached in the workdir), runs the real precompute
    pipeline (loader, source, quantiser, operator stage, writer) and times it after two warm-up batches.
    """
    pcfg, source = prepare(cfg)
    res = measure(cfg, pcfg, source)
    store = Path(pcfg.out)
    try:
        res["psnr"] = _bench_psnr(store, source, Encoding(offset=source.has_offset))
    except Exception as e:  # noqa: BLE001 - the throughput numbers stand without the render check
        log.debug("bench psnr failed:\n%s", traceback.format_exc())
        res["psnr"] = {"error": f"{type(e).__name__}: {e}"}
    from snd.pipeline.jsonout import emit_json

    return emit_json(res, cfg.out)
