"""`snd cache add-operators SRC --out DST`: a store's transfer operators built from the store alone.

Why: the operators are what lets `snd distill` take its fast path (no render per step, ~10x the it/s), and many
stores lack usable ones: `snd precompute --no-operator` runs MVSplat at about twice the pairs/s of the default
(docs/performance.md), older stores were written before operators existed or by an older builder revision (the
reader warns), and a run at another backbone size, patch or targets protocol needs operators built for it.
Re-running stage one would repeat MVSplat over every pair. It need not: stage one builds the operators from the
*decoded stored* scaffold, the stored instance masks and the stored cameras (`operators._build_operators`), so
everything they depend on is in the store. This builds them from there, with the same function, without the
dataset or MVSplat; on the CPU the result equals stage one's bit for bit (tests/test_add_operators.py).

The source is never modified. DST is a new store written as stage one writes one: scene by scene, each scene
built in a temp folder and renamed into place with its marker, so a killed run leaves no half-written scene and
a rerun skips the complete ones. Every array of the source is copied as read (its checksums verified on the way),
frames as stored (their filter recorded), the operators added (any old ones replaced).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from snd.cache import manifest as M
from snd.cache.reader import CacheReader, SceneReader
from snd.cache.schema import Encoding, FrameSpec, OperatorSpec
from snd.cache.writer import SceneWriter, clear_stale
from snd.errors import SndError
from snd.pipeline.config import CacheAddOperatorsConfig, PrecomputeConfig, to_jsonable
from snd.stages.precompute.frames import _Batch
from snd.stages.precompute.operators import _build_operators
from snd.stages.precompute.settings import operator_spec, resolve_operator_chunk, resolve_rank

log = logging.getLogger(__name__)

__all__ = ["add_operators", "operator_config"]

OPERATOR_OPTIONS = ("patch_size", "operator_img_height", "operator_img_width", "operator_upsample", "operator_blend",
                    "targets_protocol", "operator_row_cap", "operator_inst_cap")


def operator_config(header: dict, cfg: CacheAddOperatorsConfig) -> PrecomputeConfig:
    """The stage-one config the source store was written with (its header's), with operators on and the
    operator options of `cfg` that are set (None: the source's own setting, else stage one's default)."""
    known = {f.name for f in dataclasses.fields(PrecomputeConfig)}
    base = {k: v for k, v in (header.get("config") or {}).items() if k in known}
    base.update({k: header["scaffold"][k] for k in ("height", "width") if k in (header.get("scaffold") or {})})  # the stored size
    asked = {k: getattr(cfg, k) for k in OPERATOR_OPTIONS if getattr(cfg, k) is not None}
    return dataclasses.replace(PrecomputeConfig(**base), operator=True, device=cfg.device, **asked)


def _target_header(header: dict, pcfg: PrecomputeConfig, spec: OperatorSpec, src: Path) -> dict:
    """DST's header: the source's, with the operators this run stores and the frames' filter written out."""
    frames = FrameSpec.from_dict(header.get("images"))
    keep = {k: v for k, v in header.items() if k not in ("format", "schema_version", "totals", "scenes")}
    config = {**(header.get("config") or {}), **{k: v for k, v in to_jsonable(pcfg).items() if k in OPERATOR_OPTIONS},
              "operator": True}
    return {**keep, "operator": spec.to_dict(), "images": frames.to_dict() if frames is not None else None, "config": config,
            "operators_added_from": {"store": str(src.resolve()), "schema_version": header.get("schema_version")}}


def _scene(sr: SceneReader, out: Path, enc: Encoding, spec: OperatorSpec, dev: Any, chunk: Any, batch_pairs: int,
           pool: ThreadPoolExecutor, bar: Any) -> dict:
    """Copy one scene with operators built for `spec` into `out`; returns its marker record.

    The next batch's pairs are read on `pool` while this one's operators are built: a pair's arrays take ~40 ms to
    read and check on one CPU thread (576x880, this repo's CPU), more than the GPU needs to build its operators, and
    Zarr's reads and decompression release the GIL."""
    names = {n for n in sr.specs if not n.startswith("op_")}
    w = SceneWriter(out, sr.scene, n_pairs=sr.n_pairs, n_targets=sr.n_targets, height=sr.height,
                    width=sr.width, enc=enc, attrs={"frame_ids": list(sr.frame_ids)}, op=spec, frames=sr.frames)
    starts = list(range(0, sr.n_pairs, batch_pairs))
    read = lambda lo: [pool.submit(sr.read_stored, p, names) for p in range(lo, min(lo + batch_pairs, sr.n_pairs))]  # noqa: E731
    try:
        ahead = read(starts[0])
        for k in range(len(starts)):
            rows = [f.result() for f in ahead]
            if k + 1 < len(starts):
                ahead = read(starts[k + 1])
            fields = {key: np.stack([r[key] for r in rows]) for key in rows[0]}
            extra = {key: fields[key] for key in ("ctx_mask", "tgt_mask", "ctx_index", "tgt_index", "tgt_K", "tgt_c2w")}
            batch = _Batch(sr.scene, None, None, fields["ctx_K"], fields["ctx_c2w"], extra)  # type: ignore[arg-type]
            fields.update(_build_operators(fields, batch, enc, spec, dev, chunk=chunk))
            if sr.frames is not None and k == 0:  # SRC's frames as stored, once (the writer keeps them until commit)
                fields["frames"] = {i: sr.frame_bytes(i) for i in sr.stored_frames}
            w.add(fields)
            bar.update(len(rows))
        return w.commit()
    except BaseException:
        for f in ahead:
            f.cancel()
        w.abort()
        raise


def add_operators(src: str | Path, cfg: CacheAddOperatorsConfig, *, progress: bool = True) -> dict:
    """Write `cfg.out`: the store `src` with transfer operators built for the asked settings. Returns a summary
    (scenes written / already complete, pairs, seconds, pairs/s, MB per pair of DST)."""
    from tqdm import tqdm

    from snd.pipeline import buildcache
    from snd.pipeline.device import resolve_device
    from snd.splat.operator_build import ChunkSize

    src, out = Path(src), Path(cfg.out)
    if out.resolve() == src.resolve():
        raise SndError(f"--out {out} is the source store itself", path=out,
                       hint="write to a new folder (the source is never modified); delete the source afterwards if you like")
    reader = CacheReader(src)  # an SndError naming the folder when it is not a readable store
    header = M.read_header(src)
    pcfg = operator_config(header, cfg)
    spec = operator_spec(pcfg)
    assert spec is not None
    rank, world = resolve_rank(cfg.rank, cfg.world_size)  # scenes[rank::world], as stage one splits them
    local = int(os.environ.get("LOCAL_RANK", rank)) if world > 1 else None
    dev = resolve_device(cfg.device, local_rank=local)  # 'auto' -> cuda when present; missing CUDA is an SndError
    if dev.type == "cuda" and progress:
        from rich.console import Console

        buildcache.build_gsplat(Console(stderr=True))  # the builder's kernels, announced before the first scene
    chunk = ChunkSize(resolve_operator_chunk(cfg.operator_chunk, dev))
    M.init_store(out, _target_header(header, pcfg, spec, src))
    enc = Encoding.from_dict(header["encoding"])
    mine = reader.scenes[rank::world]
    todo = [n for n in mine if M.complete_record(out, n) is None]
    pairs = sum(reader.scene(n).n_pairs for n in todo)
    t0 = time.perf_counter()
    desc = "add-operators" if world == 1 else f"add-operators (rank {rank}/{world})"
    with tqdm(total=pairs, unit="pair", desc=desc, disable=not progress) as bar, \
            ThreadPoolExecutor(max_workers=max(1, cfg.read_threads), thread_name_prefix="snd-addops-read") as pool:
        for name in todo:
            clear_stale(out, name)  # a killed attempt's temp group or unmarked final group
            rec = _scene(reader.scene(name), out, enc, spec, dev, chunk, max(1, cfg.batch_pairs), pool, bar)
            M.write_marker(out, name, rec)
            M.merge_manifest(out)
    seconds = time.perf_counter() - t0
    done = CacheReader(out)
    total_pairs = sum(done.records[n]["pairs"] for n in done.scenes)
    return {"out": str(out), "scenes_written": len(todo), "scenes_already_complete": len(mine) - len(todo), "rank": rank,
            "world_size": world,
            "pairs": pairs, "seconds": seconds, "pairs_per_s": pairs / seconds if seconds > 0 and pairs else None,
            "mb_per_pair": sum(done.records[n]["bytes"] for n in done.scenes) / 1e6 / max(total_pairs, 1),
            "operator": spec.to_dict(), "device": str(dev), "operator_chunk": chunk.size}
