"""The scaffold store's schema: which arrays a scene group holds, their stored dtypes/layouts and codecs.

Why one table: the writer, the reader, the stream and docs/cache-format.md must agree on every array;
bump `SCHEMA_VERSION` whenever a stored meaning changes (readers refuse other versions).

Stored layout of one scene group (P pairs, T targets per pair, scaffold H x W):

* per-pair *fields* (one Zarr chunk per pair, `PAIRS_PER_SHARD` pairs per shard file):
  ``depth [P,2,H,W] float16``, ``offset [P,2,2,H,W] int8`` (only if the source has sub-pixel offsets),
  ``quats [P,2,4,H,W] int8|int16``, ``scales [P,2,3,H,W] uint8|uint16``, ``opacity [P,2,H,W] uint8``,
  ``ctx_mask [P,2,H,W] uint16``, ``tgt_mask [P,T,H,W] uint16`` (instance ids < 65536). Channels are stored planar (C before H, W)
  and the quantised integer fields hold *row deltas* along W (`delta_encode`), both because zstd then
  sees long runs of small numbers.
* small per-pair arrays (one chunk each): ``offset_range [P,2] f32``, ``scale_range [P,2,2] f32``,
  ``ctx_index [P,2] i32``, ``tgt_index [P,T] i32`` (-1 = no target), ``ctx_K [P,2,3,3] f64``,
  ``ctx_c2w [P,2,4,4] f64``, ``tgt_K [P,T,3,3] f64``, ``tgt_c2w [P,T,4,4] f64``, and
  ``crc32c [P,A] uint32`` (per pair, per array in `CHECKED_ARRAYS`, of the stored bytes).
* v2 adds, when the store was built with an operator (`OperatorSpec`), per pair and target slot the
  transfer operator of `snd.splat.operator` (R = row cap, K = instance cap, P = h2*w2 target patches,
  J = 2*h*w context patches): ``op_cols [P,T,P,R] int16|int32``, ``op_vals [P,T,P,R] f16``,
  ``op_inst [P,T,K,J] f16``, ``op_inst_ids [P,T,P,4] int16``, ``op_inst_w [P,T,P,4] f16``,
  ``op_valid [P,T,P] uint8`` and ``op_stats [P,T,3] f32`` (dropped direct / instance mass, max row nnz).
  float16 coefficients move targets by < 1e-3 of their scale (tested), below the bf16 teacher's own
  rounding. v1 stores (no operator) stay readable.
* v3 adds, when the store was built with frames (`FrameSpec`), per scene (not per pair) every frame any
  stored pair uses, once, at the backbone input size (`snd.cache.frames`): ``frame_index [F] i32`` (into
  the group's ``frame_ids``, like ``ctx_index``), ``frame_nbytes [F] i32`` and ``frame_bytes [F,L] uint8``
  (one chunk per frame: JPEG bytes or the lossless row-delta planar image, zero-padded to the longest,
  L), with their own checksum table ``frame_crc32c [F,3] uint32`` (per frame, per array of
  `frame_layout`, of the stored bytes) pinned by ``frames_checksums_sha256`` in the completion marker.
  v1/v2 stores (no frames) stay readable; stage two then reads images from the dataset.
* v4 stores the same arrays; only the operator fields change how they are cut: one Zarr chunk per pair *and
  target slot* (`chunk_shape`) instead of per pair, with a second checksum table ``op_crc32c [P,T,A_op]
  uint32`` (per pair, per target slot, per operator field of `operator_fields`, of that slot's stored
  bytes) pinned by ``op_checksums_sha256`` in the completion marker. Why: a training item uses one target
  of its pair; reading all three slots made an item's read 24-28 ms instead of 20-22 on one CPU thread
  (docs/cache-format.md). v3 stores stay readable; their operators are read whole and sliced.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

SCHEMA_VERSION = 5
# Revision of the operator builder, recorded as the group attribute ``operator_builder`` of stores with
# operators. 2: the GPU builder's fix of 2026-12-05 (before it, every target of a chunk but the first was built
# with the first target's projected Gaussians when stage one ran on CUDA, so those operators were wrong; CPU
# builds were right). A store without the attribute is readable; the reader warns once (`snd.cache.reader`).
OPERATOR_BUILDER = 2
READABLE_VERSIONS = (1, 2, 3, 4, 5)  # v1 = v2 without operator arrays; v2 = v3 without frames; v3 = v4 with
# operators chunked per pair rather than per (pair, target); v4 = v5 with lossless frames row-filtered only (v5 writes
# the "grad" filter, `FrameSpec.filter`)
FORMAT_NAME = "snd-scaffold-cache"
PAIRS_PER_SHARD = 16  # pairs per shard file: ~100 MB files at 576x880, few files per scene

Kind = Literal["field", "small"]


@dataclass(frozen=True)
class Encoding:
    """Quantisation knobs; recorded in every scene group's attributes (``encoding``).

    quat_bits:  8 -> int8 (component error <= 1/254), 16 -> int16.
    scale_bits: 8 -> uint8 over the per-view log2 range (relative error <= range/510 octaves), 16 -> uint16.
    offset:     store sub-pixel offsets of the means (sources whose Gaussians leave the pixel ray).
    delta:      row-delta filter on the integer fields (exact; smaller files for smooth fields).
    """

    quat_bits: Literal[8, 16] = 8
    scale_bits: Literal[8, 16] = 8
    offset: bool = False
    delta: bool = True

    def __post_init__(self) -> None:
        if self.quat_bits not in (8, 16):
            raise ValueError(f"quat_bits must be 8 or 16, got {self.quat_bits}")
        if self.scale_bits not in (8, 16):
            raise ValueError(f"scale_bits must be 8 or 16, got {self.scale_bits}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Encoding":
        return cls(**d)

    @property
    def quat_dtype(self) -> np.dtype:
        return np.dtype(np.int8 if self.quat_bits == 8 else np.int16)

    @property
    def scale_dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if self.scale_bits == 8 else np.uint16)


@dataclass(frozen=True)
class OperatorSpec:
    """Shape and meaning of the stored transfer operators (recorded in the header and every scene group).

    ctx_hw / out_hw: the teacher's context patch grid and the student's target patch grid (stage two's
    backbone input size // patch size). The rest are `snd.splat.operator.build_operator`'s knobs; stage
    two uses the stored operators only when its own settings equal these. ``protocol`` is the targets
    protocol baked in (`snd.splat.protocol`); a header written before it existed holds the old fixed
    knobs (coverage alpha > 0.5, bilinear fallback, ...), i.e. the "snd" rules, and reads back as such.
    """

    ctx_hw: tuple[int, int]
    out_hw: tuple[int, int]
    upsample: Literal["mask", "bilinear"] = "mask"
    blend: bool = True
    blend_weight: float = 0.5
    protocol: Literal["official", "snd"] = "official"
    row_cap: int = 64
    inst_cap: int = 128
    patch: int = 14  # backbone patch size the grids are counted in (written only when not DINOv2's 14)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ctx_hw", tuple(int(x) for x in self.ctx_hw))
        object.__setattr__(self, "out_hw", tuple(int(x) for x in self.out_hw))
        if self.row_cap < 1 or self.inst_cap < 1:
            raise ValueError(f"row_cap and inst_cap must be >= 1, got {self.row_cap}, {self.inst_cap}")

    @property
    def P(self) -> int:
        return self.out_hw[0] * self.out_hw[1]

    @property
    def J(self) -> int:
        return 2 * self.ctx_hw[0] * self.ctx_hw[1]

    @property
    def col_dtype(self) -> np.dtype:
        return np.dtype(np.int16 if self.J <= np.iinfo(np.int16).max else np.int32)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ctx_hw"], d["out_hw"] = list(self.ctx_hw), list(self.out_hw)
        if d["patch"] == 14:  # DINOv2 stores keep their header byte for byte (a missing patch reads as 14)
            del d["patch"]
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "OperatorSpec | None":
        if not d:
            return None
        d = dict(d)
        if "protocol" not in d:  # a store from before the protocol field: the earlier ("snd") rules
            d.pop("coverage_threshold", None)
            d.pop("upsample_fallback", None)
            d["protocol"] = "snd"
        return cls(**d)


@dataclass(frozen=True)
class FrameSpec:
    """How a scene group stores its frames (recorded in the header's ``images`` and each group's ``frames``).

    codec: "jpeg" (at `quality`) or "lossless" (`snd.cache.frames`); height, width: the stored size, stage
    two's backbone input (a run at another size resizes them, see `snd.cache.stream`); filter (lossless only):
    "row" (row deltas; stores up to v4, which do not record it) or "grad" (row and column deltas, then red and
    blue minus green: 16-34 % fewer bytes, docs/cache-format.md; what v5 writes).
    """

    codec: Literal["jpeg", "lossless"]
    height: int
    width: int
    quality: int = 95
    filter: Literal["row", "grad"] = "row"

    def __post_init__(self) -> None:
        if self.codec not in ("jpeg", "lossless"):
            raise ValueError(f"frame codec must be 'jpeg' or 'lossless', got {self.codec!r}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"JPEG quality must be in [1, 100], got {self.quality}")
        if self.filter not in ("row", "grad"):
            raise ValueError(f"lossless frame filter must be 'row' or 'grad', got {self.filter!r}")

    @property
    def hw(self) -> tuple[int, int]:
        return (self.height, self.width)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "FrameSpec | None":
        return None if not d else cls(**{k: d[k] for k in ("codec", "height", "width", "quality", "filter") if k in d})


@dataclass(frozen=True)
class ArraySpec:
    """One stored array: per-pair shape (the leading P axis excluded), dtype, kind, filters."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    kind: Kind
    delta: bool = False  # row deltas along the last axis (integer fields only)
    codec: Literal["zstd", "blosc-zstd", "blosc-bitshuffle", "blosc-shuffle"] = "blosc-zstd"


def layout(height: int, width: int, targets: int, enc: Encoding, op: OperatorSpec | None = None) -> dict[str, ArraySpec]:
    """All arrays of a scene group in a fixed order (the order of the checksum table's columns)."""
    H, W, T = height, width, targets
    d = enc.delta
    specs = [
        ArraySpec("depth", (2, H, W), np.dtype(np.float16), "field", codec="blosc-bitshuffle"),
        *([ArraySpec("offset", (2, 2, H, W), np.dtype(np.int8), "field", delta=d)] if enc.offset else []),
        ArraySpec("quats", (2, 4, H, W), enc.quat_dtype, "field", delta=d),
        ArraySpec("scales", (2, 3, H, W), enc.scale_dtype, "field", delta=d),
        ArraySpec("opacity", (2, H, W), np.dtype(np.uint8), "field", delta=d),
        ArraySpec("ctx_mask", (2, H, W), np.dtype(np.uint16), "field", codec="blosc-shuffle"),
        ArraySpec("tgt_mask", (T, H, W), np.dtype(np.uint16), "field", codec="blosc-shuffle"),
        ArraySpec("offset_range", (2,), np.dtype(np.float32), "small"),
        ArraySpec("scale_range", (2, 2), np.dtype(np.float32), "small"),
        ArraySpec("ctx_index", (2,), np.dtype(np.int32), "small"),
        ArraySpec("tgt_index", (T,), np.dtype(np.int32), "small"),
        ArraySpec("ctx_K", (2, 3, 3), np.dtype(np.float64), "small"),
        ArraySpec("ctx_c2w", (2, 4, 4), np.dtype(np.float64), "small"),
        ArraySpec("tgt_K", (T, 3, 3), np.dtype(np.float64), "small"),
        ArraySpec("tgt_c2w", (T, 4, 4), np.dtype(np.float64), "small"),
    ]
    if op is not None:
        P, J, R, Kc = op.P, op.J, op.row_cap, op.inst_cap
        f16 = np.dtype(np.float16)
        specs += [
            ArraySpec("op_cols", (T, P, R), op.col_dtype, "field", codec="blosc-shuffle"),
            ArraySpec("op_vals", (T, P, R), f16, "field", codec="blosc-bitshuffle"),
            ArraySpec("op_inst", (T, Kc, J), f16, "field", codec="blosc-bitshuffle"),
            ArraySpec("op_inst_ids", (T, P, 4), np.dtype(np.int16), "field", codec="blosc-shuffle"),
            ArraySpec("op_inst_w", (T, P, 4), f16, "field", codec="blosc-bitshuffle"),
            ArraySpec("op_valid", (T, P), np.dtype(np.uint8), "field", codec="blosc-shuffle"),
            ArraySpec("op_stats", (T, 3), np.dtype(np.float32), "small"),
        ]
    return {s.name: s for s in specs}


CHECKSUM_ARRAY = "crc32c"
FRAME_CHECKSUM_ARRAY = "frame_crc32c"
OP_CHECKSUM_ARRAY = "op_crc32c"  # v4: [P, T, len(operator_fields)], one CRC per target slot of each operator field
FRAMES_PER_SHARD = 16  # frames per shard file of frame_bytes


def operator_fields(specs: dict[str, ArraySpec]) -> list[str]:
    """The operator arrays stored per target slot (v4): the per-pair fields named ``op_*``, in layout order."""
    return [n for n, s in specs.items() if s.kind == "field" and n.startswith("op_")]


def chunk_shape(spec: ArraySpec) -> tuple[int, ...]:
    """One stored chunk of a per-pair field (leading P axis included): one pair, or for the operator fields
    (v4) one pair's one target slot, which is all a training item reads."""
    if spec.kind == "field" and spec.name.startswith("op_"):
        return (1, 1, *spec.shape[1:])
    return (1, *spec.shape)


def frame_layout(max_bytes: int) -> dict[str, ArraySpec]:
    """The frame arrays of a v3 scene group (leading axis: F frames), in the order of `frame_crc32c`'s
    columns. `max_bytes` (L) is the scene's longest stored frame."""
    return {s.name: s for s in (
        ArraySpec("frame_index", (), np.dtype(np.int32), "small"),
        ArraySpec("frame_nbytes", (), np.dtype(np.int32), "small"),
        ArraySpec("frame_bytes", (int(max_bytes),), np.dtype(np.uint8), "field", codec="blosc-zstd"),
    )}


def delta_encode(a: np.ndarray) -> np.ndarray:
    """Differences along the last axis in the array's own (wrapping) integer type; exact inverse below."""
    assert np.issubdtype(a.dtype, np.integer), a.dtype
    out = np.empty_like(a)
    out[..., :1] = a[..., :1]
    np.subtract(a[..., 1:], a[..., :-1], out=out[..., 1:], casting="unsafe")
    return out


def delta_decode(d: np.ndarray) -> np.ndarray:
    """Inverse of `delta_encode`: cumulative sum with the same wrap-around.

    uint8 (the stored frames and 1-byte fields) goes through torch's cumsum, which keeps uint8 and wraps
    modulo 256 exactly as numpy does, 4.7x faster than numpy's (0.68 against 3.2 ms for a 574x868 frame on one
    core): stage two's loader workers decode three frames per item, and that cumsum was their largest cost."""
    assert np.issubdtype(d.dtype, np.integer), d.dtype
    if d.dtype == np.uint8 and d.ndim:
        import torch

        return torch.from_numpy(np.ascontiguousarray(d)).cumsum(-1, dtype=torch.uint8).numpy()
    return np.cumsum(d, axis=-1, dtype=d.dtype)


def codecs_for(spec: ArraySpec) -> list:
    """Zarr v3 bytes->bytes codecs of one array's chunks (compressor + a crc32c of every chunk).

    Choices measured on MVSplat-like and depth-source fields (docs/cache-format.md): blosc/zstd (blosc
    compresses blocks on its own threads, so one writer uses every core) without shuffle on the
    delta-filtered 1-byte fields, with bit-shuffle on float16 depth, with byte shuffle on uint16 masks.
    zstd level 1 on the 1-byte fields: ~3x faster than level 3 for < 1 % more bytes on MVSplat fields (the
    writer was stage one's limit).
    """
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    if spec.codec == "zstd":
        comp = ZstdCodec(level=3)
    elif spec.codec == "blosc-zstd":
        comp = BloscCodec(cname="zstd", clevel=1, shuffle="noshuffle", typesize=spec.dtype.itemsize)
    elif spec.codec == "blosc-bitshuffle":
        comp = BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle", typesize=spec.dtype.itemsize)
    else:
        comp = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=spec.dtype.itemsize)
    return [comp, Crc32cCodec()]
