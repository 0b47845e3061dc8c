"""Atomic scene-group writer: build the group in a temp folder inside the store, then rename it in place.

Why: a killed precompute (even ``kill -9``) must never leave a half-written scene that looks complete.
A scene becomes visible only by `os.rename` of its finished folder plus its completion marker; a rerun
skips scenes with a marker and redoes everything else (see `snd.cache.manifest`).

Pairs arrive in order, a batch at a time; fields are written one full shard (`PAIRS_PER_SHARD` pairs)
at a time so no shard file is ever rewritten (no read-modify-write), and at most one shard of pairs is
held in memory.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import google_crc32c
import numpy as np

from snd.cache import manifest as M
from snd.cache.schema import (CHECKSUM_ARRAY, FRAME_CHECKSUM_ARRAY, FRAMES_PER_SHARD, OP_CHECKSUM_ARRAY, OPERATOR_BUILDER,
                              PAIRS_PER_SHARD, SCHEMA_VERSION, ArraySpec, Encoding, FrameSpec, OperatorSpec, chunk_shape,
                              codecs_for, delta_encode, frame_layout, layout, operator_fields)

log = logging.getLogger(__name__)


# zarr codec pipelines a writer can encode its shards with, by name: zarr-python's own, and zarrs-python's (the zarrs
# Rust crate: a shard's chunks are encoded outside Python). Both write the same Zarr v3 format; the stored values and
# checksums are identical, the compressed bytes may differ a little (their Blosc/Zstd builds differ).
CODEC_PIPELINES = {"zarr": "zarr.core.codec_pipeline.BatchedCodecPipeline", "zarrs": "zarrs.ZarrsCodecPipeline"}


def codec_pipeline(name: str):
    """A context in which new zarr arrays bind the codec pipeline `name` (zarr binds it when an array object is made,
    so the writer's arrays keep it; the setting is zarr's global config, restored on exit)."""
    import zarr

    if name == "zarr":
        return contextlib.nullcontext()
    return zarr.config.set({"codec_pipeline.path": CODEC_PIPELINES[name]})


def crc32c(a: np.ndarray) -> int:
    """CRC-32C of an array's C-order bytes."""
    return int(google_crc32c.value(np.ascontiguousarray(a)))  # the buffer itself: no copy of the bytes


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def to_stored(spec: ArraySpec, a: np.ndarray) -> np.ndarray:
    """A batch of one array as it is stored: dtype checked, row deltas for the delta-filtered fields."""
    a = np.asarray(a)
    if spec.name.endswith("mask") and a.dtype != spec.dtype and a.size and (a.min() < 0 or a.max() > np.iinfo(spec.dtype).max):
        raise ValueError(f"{spec.name}: instance ids must be in [0, {np.iinfo(spec.dtype).max}], got [{a.min()}, {a.max()}]")
    if a.dtype != spec.dtype:
        if np.issubdtype(spec.dtype, np.floating) or spec.name.endswith("mask") or spec.name.endswith("index"):
            a = a.astype(spec.dtype)
        else:
            raise TypeError(f"{spec.name}: expected dtype {spec.dtype}, got {a.dtype}")
    assert a.shape[1:] == spec.shape, f"{spec.name} must be [B, {', '.join(map(str, spec.shape))}], got {a.shape}"
    return delta_encode(a) if spec.delta else np.ascontiguousarray(a)


_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="snd-shard")
    return _POOL


class SceneWriter:
    """Write one scene group of `n_pairs` pairs into ``<store>/_snd/tmp``; `commit` renames it into place."""

    def __init__(self, root: Path, scene: str, *, n_pairs: int, n_targets: int, height: int, width: int,
                 enc: Encoding, attrs: dict, pairs_per_shard: int = PAIRS_PER_SHARD, op: OperatorSpec | None = None,
                 frames: FrameSpec | None = None, codecs: str = "zarr"):
        import zarr

        M.check_scene_name(scene)
        if n_pairs < 1:
            raise ValueError(f"scene {scene}: need at least one pair, got {n_pairs}")
        self.root, self.scene, self.n_pairs = Path(root), scene, n_pairs
        self.specs = layout(height, width, n_targets, enc, op)
        self.enc, self.codecs = enc, codecs
        self.tmp = M.tmp_dir(self.root) / f"{scene}.{uuid.uuid4().hex[:12]}"
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        self.group = zarr.open_group(store=str(self.tmp), mode="w", zarr_format=3, attributes={
            "format": M.FORMAT_NAME, "schema_version": SCHEMA_VERSION, "scene": scene, "height": height,
            "width": width, "n_pairs": n_pairs, "n_targets": n_targets, "encoding": enc.to_dict(),
            "operator": op.to_dict() if op is not None else None,
            **({"operator_builder": OPERATOR_BUILDER} if op is not None else {}),
            "frames": frames.to_dict() if frames is not None else None,
            "checksum": {"algorithm": "crc32c", "of": "stored bytes of each pair", "arrays": list(self.specs)},
            **attrs,
        })
        self.pps = min(pairs_per_shard, n_pairs)
        self.arrays = {}
        from zarr.codecs import BytesCodec

        with codec_pipeline(codecs):
            for name, s in self.specs.items():
                if s.kind == "field":
                    self.arrays[name] = self.group.create_array(
                        name, shape=(n_pairs, *s.shape), dtype=s.dtype, chunks=chunk_shape(s), shards=(self.pps, *s.shape),
                        serializer=BytesCodec(), compressors=codecs_for(s), fill_value=0,
                        config={"write_empty_chunks": True})  # skips a per-chunk emptiness scan; every chunk exists
        self._small: dict[str, list[np.ndarray]] = {n: [] for n, s in self.specs.items() if s.kind == "small"}
        self._pending: dict[str, list[np.ndarray]] = {n: [] for n, s in self.specs.items() if s.kind == "field"}
        self._crc = np.zeros((n_pairs, len(self.specs)), np.uint32)
        self._ops = operator_fields(self.specs)  # v4: also checked per target slot (`op_crc32c`)
        self._op_crc = np.zeros((n_pairs, n_targets, len(self._ops)), np.uint32)
        self._writes: list = []  # futures of the shard being written
        self._added = 0  # pairs received
        self._flushed = 0  # pairs written to disk
        self.frames = frames
        self._frames: dict[int, np.ndarray] = {}  # frame index -> stored bytes (written at commit)

    def add(self, fields: dict[str, np.ndarray]) -> None:
        """Append a batch of B pairs: every array of the layout with a leading B axis (logical values); with
        frames, ``fields["frames"]`` maps frame indices first used by this batch to their stored bytes."""
        if self.frames is not None:
            self._frames.update(fields.get("frames", {}))
        missing = sorted(set(self.specs) - set(fields))
        if missing:
            raise KeyError(f"scene {self.scene}: batch lacks arrays {missing}")
        B = len(fields["depth"])
        if self._added + B > self.n_pairs:
            raise ValueError(f"scene {self.scene}: {self._added + B} pairs added, declared {self.n_pairs}")

        def prepare(name: str) -> tuple[np.ndarray, list[int], list[list[int]]]:
            a = to_stored(self.specs[name], fields[name])
            assert len(a) == B, f"{name}: batch of {len(a)} pairs, expected {B}"
            per_slot = [[crc32c(a[i, t]) for t in range(a.shape[1])] for i in range(B)] if name in self._ops else []
            return a, [crc32c(a[i]) for i in range(B)], per_slot

        # per array on the pool (deltas and checksums release the GIL), alongside the previous shard's writes
        rows = slice(self._added, self._added + B)
        for col, (name, (a, crcs, per_slot)) in enumerate(zip(self.specs, _pool().map(prepare, list(self.specs)))):
            self._crc[rows, col] = crcs
            if per_slot:
                self._op_crc[rows, :, self._ops.index(name)] = per_slot
            (self._small if self.specs[name].kind == "small" else self._pending)[name].append(a)
        self._added += B
        self._flush(final=False)

    def _wait_writes(self) -> None:
        """Wait for the shard in flight (its errors surface here, in the writer's thread)."""
        writes, self._writes = self._writes, []
        for w in writes:
            w.result()

    def _flush(self, *, final: bool) -> None:
        """Write every full shard (all of them when `final`). One shard is in flight at a time: its arrays
        compress concurrently on the pool while the next batch is prepared (memory stays at ~2 shards)."""
        while True:
            buffered = self._added - self._flushed
            if buffered == 0 or (buffered < self.pps and not final):
                break
            n = min(self.pps, buffered)
            blocks = {}
            for name, parts in self._pending.items():
                block = np.concatenate(parts) if len(parts) > 1 else parts[0]
                blocks[name] = block[:n]
                self._pending[name] = [block[n:]] if len(block) > n else []
            lo = self._flushed
            self._wait_writes()  # no two writes of one shard file's array at once

            def put(name: str, lo: int = lo, n: int = n, blocks: dict = blocks) -> None:
                self.arrays[name][lo:lo + n] = blocks[name]

            self._writes = [_pool().submit(put, name) for name in blocks]
            self._flushed += n
        if final:
            self._wait_writes()

    def commit(self) -> dict:
        """Flush, write the small arrays and the checksum table, rename into place; returns the marker record."""
        if self._added != self.n_pairs:
            raise ValueError(f"scene {self.scene}: commit after {self._added} of {self.n_pairs} pairs")
        self._flush(final=True)
        with codec_pipeline(self.codecs):
            for name, parts in self._small.items():
                self._write_small(name, np.concatenate(parts))
            checksums_sha256 = self._write_table(CHECKSUM_ARRAY, self._crc)
            op_record = {}
            if self._ops:
                op_record = {"op_checksums_sha256": self._write_table(OP_CHECKSUM_ARRAY, self._op_crc)}
                self.group.attrs["checksum_ops"] = {"algorithm": "crc32c", "of": "stored bytes of each pair's target slot",
                                                    "arrays": self._ops, "table": OP_CHECKSUM_ARRAY}
            frame_record = self._write_frames() if self.frames is not None else {}
        nbytes = folder_bytes(self.tmp)
        final = self.root / self.scene
        if final.exists():  # a renamed group whose marker never got written (killed in between): redo it
            shutil.rmtree(final)
        os.rename(self.tmp, final)
        tgt = np.concatenate(self._small["tgt_index"])
        return {"pairs": self.n_pairs, "items": int((tgt >= 0).sum()), "targets": (tgt >= 0).sum(1).tolist(),
                "bytes": nbytes, "checksums_sha256": checksums_sha256, **op_record, **frame_record}

    def _write_small(self, name: str, a: np.ndarray) -> None:
        """A small per-scene array: one zstd chunk, with Zarr's crc32c of the chunk."""
        from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

        self.group.create_array(name, shape=a.shape, dtype=a.dtype, chunks=a.shape, serializer=BytesCodec(),
                                compressors=[ZstdCodec(level=3), Crc32cCodec()], fill_value=0)[...] = a

    def _write_table(self, name: str, table: np.ndarray) -> str:
        """A checksum table (one uncompressed chunk); returns the SHA-256 that pins it in the scene's marker."""
        from zarr.codecs import BytesCodec, Crc32cCodec

        table = np.ascontiguousarray(table, dtype=np.uint32)
        self.group.create_array(name, shape=table.shape, dtype=np.uint32, chunks=table.shape, serializer=BytesCodec(),
                                compressors=[Crc32cCodec()], fill_value=0)[...] = table
        return hashlib.sha256(table.tobytes()).hexdigest()

    def _write_frames(self) -> dict:
        """The scene's frames (schema v3): every frame a stored pair uses, once, with their checksum table."""
        from zarr.codecs import BytesCodec

        used = np.concatenate([np.concatenate(self._small["ctx_index"]).reshape(-1),
                               np.concatenate(self._small["tgt_index"]).reshape(-1)])
        used = sorted({int(i) for i in used if i >= 0})
        missing = [i for i in used if i not in self._frames]
        if missing:
            raise ValueError(f"scene {self.scene}: frames {missing[:5]} are used by stored pairs but were never added")
        blobs = [np.ascontiguousarray(self._frames[i], dtype=np.uint8).reshape(-1) for i in used]
        L = max(len(b) for b in blobs)
        arrays = {"frame_index": np.asarray(used, np.int32), "frame_nbytes": np.asarray([len(b) for b in blobs], np.int32),
                  "frame_bytes": np.zeros((len(used), L), np.uint8)}
        for k, b in enumerate(blobs):
            arrays["frame_bytes"][k, :len(b)] = b
        specs = frame_layout(L)
        crc = np.zeros((len(used), len(specs)), np.uint32)
        for col, (name, s) in enumerate(specs.items()):
            a = arrays[name]
            crc[:, col] = [crc32c(a[k]) for k in range(len(used))]
            if s.kind == "field":
                per = min(FRAMES_PER_SHARD, len(used))
                self.group.create_array(name, shape=a.shape, dtype=a.dtype, chunks=(1, L), shards=(per, L),
                                        serializer=BytesCodec(), compressors=codecs_for(s), fill_value=0,
                                        config={"write_empty_chunks": True})[...] = a
            else:
                self._write_small(name, a)
        frames_sha256 = self._write_table(FRAME_CHECKSUM_ARRAY, crc)
        self.group.attrs["frames"] = {**self.frames.to_dict(), "count": len(used), "max_bytes": int(L),
                                      "checksum": {"algorithm": "crc32c", "of": "stored bytes of each frame",
                                                   "arrays": list(specs), "table": FRAME_CHECKSUM_ARRAY}}
        return {"frames": len(used), "frame_bytes": int(sum(len(b) for b in blobs)),
                "frames_checksums_sha256": frames_sha256}

    def abort(self) -> None:
        for w in self._writes:  # let a shard in flight finish before its folder goes
            w.exception()
        self._writes = []
        shutil.rmtree(self.tmp, ignore_errors=True)


def clear_stale(root: Path, scene: str) -> None:
    """Remove leftovers of an interrupted attempt at `scene` (temp groups, an unmarked final group)."""
    root = Path(root)
    tdir = M.tmp_dir(root)
    if tdir.is_dir():
        for p in tdir.glob(f"{scene}.*"):
            shutil.rmtree(p, ignore_errors=True)
    if M.complete_record(root, scene) is None and (root / scene).exists():
        shutil.rmtree(root / scene)
