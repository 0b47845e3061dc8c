"""`snd precompute`: the four threads (loader, main, operators, writer; the writer a process on CUDA) wired together
over this rank's scenes."""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from snd.cache import manifest as M
from snd.cache.inuse import hold_in_use
from snd.cache.schema import Encoding
from snd.errors import SndError
from snd.pipeline import buildcache
from snd.pipeline.config import PrecomputeConfig
from snd.scaffold import ScaffoldSource
from snd.splat.operator_build import ChunkSize
from snd.stages.precompute.frames import _loader
from snd.stages.precompute.launch import _InFlight, _land, _launch
from snd.stages.precompute.operators import OperatorStage
from snd.stages.precompute.report import Summary, console, print_summary, record_run
from snd.stages.precompute.settings import (make_source, operator_spec, resolve_batch_pairs, resolve_operator_chunk,
                                             resolve_operator_workers, resolve_rank, resolve_writer, resolve_writer_codecs,
                                             store_header)
from snd.stages.precompute.writer import _suppress_full
from snd.stages.precompute.writer_process import make_writer

log = logging.getLogger(__name__)


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
    from snd.pipeline.compat import serialize_ast_parse

    serialize_ast_parse()  # the loader threads' np.load / trimesh calls parse ASTs at once (a CPython 3.11 race)
    cfg = replace(cfg, batch_pairs=resolve_batch_pairs(cfg.batch_pairs, cfg.device))  # 0 = auto, as used below
    resolve_operator_chunk(cfg.operator_chunk, cfg.device)  # a negative chunk fails here, before any work (used below)
    resolve_operator_workers(cfg.operator_workers, cfg.device)  # so does a negative worker count
    cfg = replace(cfg, writer=resolve_writer(cfg.writer, cfg.device))  # as used: the writer process gets the config
    resolve_writer_codecs(cfg.writer_codecs)  # zarrs asked for and not installed: fail now
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
    if progress and rank == 0 and str(source.device).startswith("cuda"):
        if cfg.operator:  # the operators use gsplat's kernels on CUDA: build them announced, before the first batch
            buildcache.build_gsplat(console)
        if cfg.source == "mvsplat" and cfg.compile != "off":
            buildcache.announce_compile(console, "MVSplat", "~100 s on a first run")
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
            summary.frame_bytes += rec.get("frame_bytes", 0)

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
    summary.writer, summary.writer_codecs = cfg.writer, cfg.writer_codecs
    writer = make_writer(cfg.writer, out, cfg, enc, on_commit, on_fail)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not progress, transient=False)
    est = cfg.pairs_per_scene * len(jobs) if cfg.pairs_per_scene else None
    t_scenes = prog.add_task(f"scenes (rank {rank}/{world})", total=len(jobs), info="")
    t_pairs = prog.add_task("pairs", total=est, info="")
    in_scene: dict[str, int] = {}
    queued_pairs = 0
    dev = torch.device(source.device)
    operator_chunk = ChunkSize(resolve_operator_chunk(cfg.operator_chunk, dev))  # halves itself on GPU OOM
    summary.operator_chunk = operator_chunk
    own_stream = dev.type == "cuda" and cfg.operator and cfg.operator_stream  # high priority: the syncs wait less
    priority = (-1 if cfg.operator_priority else 0) if own_stream else None
    pending: _InFlight | None = None
    wait_data = 0.0

    def added(scene: str, n: int, info: dict) -> None:
        """A batch went to the writer (in the operator stage's thread): progress and the timing record."""
        nonlocal queued_pairs
        summary.wait_write_s += info["wait_write"]
        in_scene[scene] += n
        queued_pairs += n
        summary.batch_times.append((time.perf_counter() - t0, n, info["wait_data"], info["wait_write"]))
        summary.phase_log.append(dict(summary.phase_s, writer_busy=writer.busy_s))
        el = time.perf_counter() - t0
        prog.update(t_pairs, advance=n, info=f"{queued_pairs / max(el, 1e-9):.1f} pairs/s, "
                                            f"{summary.bytes / 1e6:.0f} MB written")
        if on_batch is not None:
            on_batch(scene, in_scene[scene])

    ops = OperatorStage(writer.q, enc, op_spec, dev, summary.phase_s, chunk=operator_chunk, stream_priority=priority,
                        on_added=added, threaded=cfg.operator_thread,
                        workers=resolve_operator_workers(cfg.operator_workers, dev))
    summary.operator_workers = ops.workers
    summary.operator_stream, summary.operator_priority = bool(own_stream), bool(own_stream and cfg.operator_priority)
    # shared for the whole run (`snd cache gc` / `verify --fix` refuse meanwhile); taken right before the threads
    # that touch the store start, so only those starts lie between it and the `finally` that releases it
    busy = hold_in_use(M.meta_dir(out))
    loader.start()
    writer.start()
    ops.start()

    def land() -> None:
        """Hand the in-flight batch to the operator stage (called after the next batch is launched, or before
        any scene event, so the writer sees every scene's batches before its commit)."""
        nonlocal pending
        if pending is None:
            return
        f, pending = pending, None
        fields = _land(f, enc, summary.phase_s)
        ops.submit(("add", f.batch.scene, f.batch, fields, {"wait_data": wait_data}, f.device_fields))

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
                    ops.submit(("start", msg[1], len(msg[2]), msg[3]))
                    if est is not None and len(msg[2]) < cfg.pairs_per_scene:
                        est -= cfg.pairs_per_scene - len(msg[2])
                        prog.update(t_pairs, total=est)
                    continue
                if kind == "fail":
                    name = msg[1]
                    if msg[3]:
                        ops.submit(("abort", name))
                    on_fail(name, msg[2])
                    prog.advance(t_scenes)
                    continue
                if kind == "end":
                    ops.submit(("commit", msg[1]))
                    prog.advance(t_scenes)
                    continue
            ops.finish()
            writer.q.put(("stop",))
            writer.join()
    finally:
        stop.set()
        ops.stop_now()  # after an error in the main thread: the stage drops what it holds
        if writer.is_alive():
            with _suppress_full():
                writer.q.put_nowait(("stop",))
        loader.join(timeout=5)
        busy.close()
    summary.seconds = time.perf_counter() - t0
    record_run(out, summary, rank, world, dev, jobs)
    if progress:
        print_summary(summary, out)
        buildcache.report_compile(console)
    return summary
