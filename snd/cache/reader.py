"""Read scene groups of a scaffold store: one pair at a time, checksum-verified, decoded to float32.

Why per pair: stage two reads random pairs; each field is chunked per pair inside its shard, so one pair
costs one ranged read and one decompression per array. Every read is checked twice: Zarr's crc32c codec
on each chunk, then snd's per-pair CRC table (recorded at write time, itself pinned by a SHA-256 in the
scene's completion marker). Any mismatch raises an `SndError` naming the scene and the pair.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from snd.cache import manifest as M
from snd.cache.encode import decode_scaffold
from snd.cache.schema import (CHECKSUM_ARRAY, FRAME_CHECKSUM_ARRAY, OP_CHECKSUM_ARRAY, OPERATOR_BUILDER, READABLE_VERSIONS,
                              Encoding, FrameSpec, OperatorSpec, delta_decode, frame_layout, layout)
from snd.cache.writer import crc32c
from snd.errors import SndError

_warned: set[str] = set()


def _warn_old_builder(root: Path) -> None:
    """Once per store and process: its operators predate `OPERATOR_BUILDER` (see `snd.cache.schema`)."""
    if str(root) in _warned:
        return
    _warned.add(str(root))
    logging.getLogger(__name__).warning(
        "%s: its transfer operators were written before snd's operator builder revision %d; if stage one ran on a "
        "GPU, every target of a build chunk but the first has a wrong operator (a batched-builder bug fixed on "
        "2026-12-05; CPU builds are right): rebuild the store with `snd precompute`", root, OPERATOR_BUILDER)


def _corrupt(root: Path, scene: str, pair: int | None, what: str) -> SndError:
    where = f"scene {scene!r}" + (f" pair {pair}" if pair is not None else "")
    return SndError(f"corrupted scaffold cache: {where}: {what}", path=Path(root) / scene,
                    hint=f"delete {Path(root) / scene} and {M.markers_dir(root) / (scene + '.json')}, then rerun "
                         "`snd precompute` with the same options (it redoes only that scene)")


@dataclass
class DecodedPair:
    """One pair of a scene, decoded (float32 Gaussians at the scaffold size)."""

    scene: str
    pair: int
    means: Tensor  # [2,H,W,3]
    quats: Tensor  # [2,H,W,4]
    scales: Tensor  # [2,H,W,3]
    opacities: Tensor  # [2,H,W]
    ctx_masks: Tensor  # [2,H,W] int64
    tgt_masks: Tensor  # [T,H,W] int64
    ctx_K: Tensor  # [2,3,3] float32
    ctx_c2w: Tensor  # [2,4,4] float32
    tgt_K: Tensor  # [T,3,3]
    tgt_c2w: Tensor  # [T,4,4]
    ctx_index: tuple[int, int]
    tgt_index: tuple[int, ...]  # -1 = no target in that slot
    operator: dict[str, Tensor] | None = None  # op_* arrays [T, ...] as stored (schema v2), or None
    op_target: int | None = None  # set: `operator` holds only this target slot's arrays, [1, ...]


class SceneReader:
    """Random access to the pairs of one complete scene group."""

    def __init__(self, root: Path, scene: str, record: dict, *, verify: bool = True):
        import zarr

        self.root, self.scene, self.verify = Path(root), scene, verify
        try:
            self.group = zarr.open_group(store=str(self.root / scene), mode="r")
            attrs = dict(self.group.attrs)
        except Exception as e:  # noqa: BLE001 - any failure to open is a damaged store for the user
            raise _corrupt(root, scene, None, f"cannot open group ({type(e).__name__}: {e})") from e
        if attrs.get("schema_version") not in READABLE_VERSIONS:
            raise _corrupt(root, scene, None, f"schema version {attrs.get('schema_version')} not in {READABLE_VERSIONS}")
        self.attrs = attrs
        self.height, self.width = int(attrs["height"]), int(attrs["width"])
        self.n_pairs, self.n_targets = int(attrs["n_pairs"]), int(attrs["n_targets"])
        self.enc = Encoding.from_dict(attrs["encoding"])
        self.frame_ids: list[str] = list(attrs.get("frame_ids", []))
        self.op = OperatorSpec.from_dict(attrs.get("operator"))
        if self.op is not None and attrs.get("operator_builder") is None:
            _warn_old_builder(self.root)
        self.specs = layout(self.height, self.width, self.n_targets, self.enc, self.op)
        self._small = {n: self._read_whole(n) for n, s in self.specs.items() if s.kind == "small"}
        self._crc = self._pinned_table(CHECKSUM_ARRAY, record, "checksums_sha256", "checksum table")
        self._cols = {n: i for i, n in enumerate(self.specs)}
        self._op_crc = self._op_cols = None  # v4: per-target-slot checksums of the operator fields
        if (attrs.get("checksum_ops") or {}).get("table") == OP_CHECKSUM_ARRAY:
            self._op_crc = self._pinned_table(OP_CHECKSUM_ARRAY, record, "op_checksums_sha256", "operator checksum table")
            self._op_cols = {n: i for i, n in enumerate(attrs["checksum_ops"]["arrays"])}
        self._arrays: dict[str, Any] = {}
        self.frames = FrameSpec.from_dict(attrs.get("frames"))  # None: a v1/v2 group (images from the dataset)
        self._frame_row: dict[int, int] = {}
        if self.frames is not None:
            self._open_frames(record)

    def _open_frames(self, record: dict) -> None:
        """Read the frame index, lengths and checksum table (verified against the marker and per frame)."""
        fa = self.attrs["frames"]
        self._frame_specs = frame_layout(int(fa["max_bytes"]))
        self._frame_crc = self._pinned_table(FRAME_CHECKSUM_ARRAY, record, "frames_checksums_sha256", "frame checksum table")
        self._frame_small = {n: self._read_whole(n) for n in ("frame_index", "frame_nbytes")}
        if self.verify:
            for col, n in enumerate(self._frame_specs):
                if n in self._frame_small and any(crc32c(v) != int(c) for v, c in zip(self._frame_small[n], self._frame_crc[:, col])):
                    raise _corrupt(self.root, self.scene, None, f"array {n!r} checksum mismatch")
        self._frame_row = {int(i): k for k, i in enumerate(self._frame_small["frame_index"])}

    @property
    def stored_frames(self) -> list[int]:
        """Indices (into `frame_ids`) of the frames this group stores, ascending; empty without frames."""
        return sorted(self._frame_row)

    def frame_bytes(self, index: int) -> np.ndarray:
        """The stored bytes of frame `index` (an index into `frame_ids`, as in ``ctx_index``), checksum-verified."""
        if self.frames is None:
            raise ValueError(f"scene {self.scene}: this group stores no frames (schema v{self.attrs.get('schema_version')})")
        k = self._frame_row.get(int(index))
        if k is None:
            raise _corrupt(self.root, self.scene, None, f"frame {index} is used by a pair but not stored")
        want = self._frame_crc[k, list(self._frame_specs).index("frame_bytes")]
        row = self._read_checked("frame_bytes", k, want, None, f"frame {index}: array 'frame_bytes'")
        return row[: int(self._frame_small["frame_nbytes"][k])]

    def frame(self, index: int) -> Tensor:
        """Frame `index` decoded to uint8 [3, H, W] at the stored size (`self.frames.hw`)."""
        from snd.cache.frames import decode_frame

        assert self.frames is not None
        return decode_frame(self.frame_bytes(index), self.frames.codec, self.frames.hw, filter=self.frames.filter)

    def _array(self, name: str):
        """The opened Zarr array `name` (opened once: opening reads its metadata, ~1 ms a time)."""
        arr = self._arrays.get(name)
        if arr is None:
            arr = self._arrays[name] = self.group[name]
        return arr

    def _check(self, a: np.ndarray, want, pair: int | None, what: str) -> np.ndarray:
        """`a` itself if its CRC-32C is the recorded `want` (or `verify` is off); else the damaged-store error."""
        if self.verify and crc32c(a) != int(want):
            raise _corrupt(self.root, self.scene, pair, f"{what} checksum mismatch")
        return a

    def _read_checked(self, name: str, index, want, pair: int | None, what: str) -> np.ndarray:
        """`name[index]` read from Zarr (a damaged chunk is the damaged-store error) and `_check`ed against `want`;
        `what` names it in the error, which also names the pair when there is one."""
        try:
            a = self._array(name)[index]
        except Exception as e:  # noqa: BLE001 - codec/crc errors of a damaged chunk
            raise _corrupt(self.root, self.scene, pair, f"{what} unreadable ({type(e).__name__}: {e})") from e
        return self._check(a, want, pair, what)

    def _pinned_table(self, name: str, record: dict, pin: str, what: str) -> np.ndarray:
        """Checksum table `name`, checked (with `verify`) against the SHA-256 its scene's marker records under `pin`:
        a damaged table would otherwise excuse damaged rows."""
        table = self._read_whole(name)
        if self.verify and hashlib.sha256(np.ascontiguousarray(table).tobytes()).hexdigest() != record.get(pin):
            raise _corrupt(self.root, self.scene, None, f"{what} does not match the manifest")
        return table

    def _read_whole(self, name: str) -> np.ndarray:
        try:
            return self.group[name][...]
        except Exception as e:  # noqa: BLE001
            raise _corrupt(self.root, self.scene, None, f"array {name!r} unreadable ({type(e).__name__}: {e})") from e

    def read_stored(self, p: int, names: "set[str] | None" = None, *, op_target: int | None = None) -> dict[str, np.ndarray]:
        """Pair `p`'s arrays as stored (row deltas undone), checksum-verified; `names` limits which are read.
        With `op_target`, the operator arrays (``op_*``) hold only that target slot, [1, ...]: a v4 group
        reads and checks that slot's chunk alone; an older one reads the pair's whole row and slices it."""
        if not 0 <= p < self.n_pairs:
            raise IndexError(f"scene {self.scene}: pair {p} out of range [0, {self.n_pairs})")
        if op_target is not None and not 0 <= op_target < self.n_targets:
            raise IndexError(f"scene {self.scene}: target slot {op_target} out of range [0, {self.n_targets})")
        out = {}
        for name, s in self.specs.items():
            if names is not None and name not in names:
                continue
            slot = op_target if name.startswith("op_") else None
            if slot is not None and self._op_cols is not None and name in self._op_cols:
                out[name] = self._read_slot(p, name, slot)
                continue
            want = self._crc[p, self._cols[name]]
            if s.kind == "small":
                a = self._check(self._small[name][p], want, p, f"array {name!r}")
            else:
                a = self._read_checked(name, p, want, p, f"array {name!r}")
            a = delta_decode(a) if s.delta else np.array(a, copy=True)
            out[name] = a[slot:slot + 1] if slot is not None else a
        return out

    def _read_slot(self, p: int, name: str, t: int) -> np.ndarray:
        """Target slot `t` of pair `p` of operator field `name` (v4: its own chunk), checked, [1, ...]."""
        assert self._op_crc is not None and self._op_cols is not None
        want = self._op_crc[p, t, self._op_cols[name]]
        return self._read_checked(name, (p, t), want, p, f"array {name!r} target {t}")[None]  # no row deltas here

    def pair(self, p: int, *, gaussians: bool = True, operator: bool = True, masks: bool | None = None,
             op_target: int | None = None) -> DecodedPair:
        """Pair `p` decoded to float32 Gaussians (empty tensors when `gaussians=False`, which skips reading
        and decoding them: stage two's operator path needs none), int64 masks (`masks`, default as
        `gaussians`: the operators already hold what the masks give; empty tensors otherwise) and float32
        cameras; with `operator` (and a store that has them), the stored operator arrays [T, ...] as tensors,
        or with `op_target` only that target slot's, [1, ...] (all a training item needs)."""
        masks = gaussians if masks is None else masks
        names = set(self.specs)
        if not gaussians:
            names -= {"depth", "offset", "quats", "scales", "opacity"}
        if not masks:
            names -= {"ctx_mask", "tgt_mask"}
        if not operator:
            names -= {n for n in self.specs if n.startswith("op_")}
        st = self.read_stored(p, names, op_target=op_target)
        if gaussians:
            K = torch.from_numpy(st["ctx_K"])[None]
            c2w = torch.from_numpy(st["ctx_c2w"])[None]
            fields = {k: st[k][None] for k in ("depth", "quats", "scales", "opacity", "offset_range", "scale_range")}
            if self.enc.offset:
                fields["offset"] = st["offset"][None]
            means, quats, scales, opac = (x[0] for x in decode_scaffold(fields, K, c2w, enc=self.enc))
        else:
            means = quats = scales = opac = torch.zeros(0)
        ops = None
        if operator and self.op is not None:
            ops = {n: torch.from_numpy(np.ascontiguousarray(st[n])) for n in self.specs if n.startswith("op_")}
        f32 = torch.float32
        return DecodedPair(
            scene=self.scene, pair=p, means=means, quats=quats, scales=scales, opacities=opac, operator=ops,
            op_target=op_target if ops is not None else None,
            ctx_masks=torch.from_numpy(st["ctx_mask"].astype(np.int64)) if masks else torch.zeros(0, dtype=torch.int64),
            tgt_masks=(torch.from_numpy(st["tgt_mask"].astype(np.int64)) if masks
                       else torch.zeros(self.n_targets, 0, dtype=torch.int64)),
            ctx_K=torch.from_numpy(st["ctx_K"]).to(f32), ctx_c2w=torch.from_numpy(st["ctx_c2w"]).to(f32),
            tgt_K=torch.from_numpy(st["tgt_K"]).to(f32), tgt_c2w=torch.from_numpy(st["tgt_c2w"]).to(f32),
            ctx_index=tuple(int(i) for i in st["ctx_index"]), tgt_index=tuple(int(i) for i in st["tgt_index"]),
        )


class CacheReader:
    """A scaffold store opened for reading: the merged manifest plus lazily opened scene readers."""

    def __init__(self, root: str | Path, *, verify: bool = True):
        self.root = Path(root)
        if not self.root.is_dir():
            raise SndError(f"missing scaffold cache folder: {self.root}", path=self.root,
                           hint="run `snd precompute --out <folder>` first")
        self.manifest = M.read_manifest(self.root)
        self.verify = verify
        self.records = {n: r for n, r in self.manifest["scenes"].items() if r.get("status") == "complete"}
        self._open: dict[str, SceneReader] = {}

    @property
    def scenes(self) -> list[str]:
        return sorted(self.records)

    def scene(self, name: str) -> SceneReader:
        if name not in self.records:
            raise SndError(f"scene {name!r} is not complete in cache {self.root}", path=self.root)
        if name not in self._open:
            self._open[name] = SceneReader(self.root, name, self.records[name], verify=self.verify)
        return self._open[name]

    def verify_all(self) -> int:
        """Read every pair of every complete scene (raises on the first corruption); returns pairs checked."""
        n = 0
        for s in self.scenes:
            r = SceneReader(self.root, s, self.records[s], verify=True)
            for p in range(r.n_pairs):
                r.read_stored(p)
                for t in range(r.n_targets if r._op_cols else 0):  # v4: each target slot against its own checksums
                    r.read_stored(p, set(r._op_cols), op_target=t)
                n += 1
            for i in r.stored_frames:
                r.frame_bytes(i)
        return n
