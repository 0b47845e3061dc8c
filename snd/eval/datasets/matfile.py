"""Reading MATLAB .mat files without scipy: v7.3 (HDF5, via h5py) and v5 numeric matrices.

Why our own v5 reader: NYUv2's `splits.mat` and the class-mapping files are small v5 files, and scipy is
not a dependency. Only numeric (non-complex, non-sparse) matrices are decoded; cells, structs and chars
are skipped. Arrays come back in MATLAB's shape (column-major reshape), e.g. trainNdxs as [795, 1].
v7.3 files come back as h5py arrays, which are the MATLAB array *transposed* (h5py reverses the axes).
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from snd.errors import SndError

# v5 data types (miXXX) -> numpy dtype characters
_MI = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
_MI_MATRIX, _MI_COMPRESSED = 14, 15
# v5 array classes (mxXXX_CLASS) -> numpy dtype characters
_MX = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4", 14: "i8", 15: "u8"}


def is_v73(path: Path) -> bool:
    """True for an HDF5-based (-v7.3) MAT file."""
    with open(path, "rb") as f:
        head = f.read(520)
    return head[512:520] == b"\x89HDF\r\n\x1a\n" or head[:8] == b"\x89HDF\r\n\x1a\n"


def load_mat(path: str | Path, keys: Optional[Iterable[str]] = None) -> dict[str, np.ndarray]:
    """Numeric variables of a .mat file (v5 or v7.3) as numpy arrays in MATLAB's axis order.

    v7.3 arrays are transposed back to MATLAB order here, so both versions agree.
    """
    path = Path(path)
    if not path.is_file():
        raise SndError(f"missing MAT file {path}", path=path)
    want = set(keys) if keys is not None else None
    if is_v73(path):
        import h5py

        out = {}
        with h5py.File(path, "r") as f:
            for k, v in f.items():
                if (want is None or k in want) and isinstance(v, h5py.Dataset) and v.dtype.kind in "iuf":
                    out[k] = np.asarray(v[()]).T
        return out
    return _load_v5(path, want)


def _load_v5(path: Path, want: Optional[set]) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    if len(data) < 128:
        raise SndError(f"{path} is too short to be a MAT file", path=path)
    endian = {b"IM": "<", b"MI": ">"}.get(data[126:128])
    if endian is None:
        raise SndError(f"{path} is not a MATLAB v5/v7.3 file (bad header)", path=path)
    out: dict[str, np.ndarray] = {}
    for name, arr in _elements(data, 128, endian):
        if arr is not None and (want is None or name in want):
            out[name] = arr
    return out


def _tag(buf: bytes, pos: int, e: str) -> tuple[int, int, int, int]:
    """(type, nbytes, data_start, next_element_pos) of the element at `pos`."""
    (first,) = struct.unpack_from(e + "I", buf, pos)
    if first >> 16:  # small data element: type and size packed in 4 bytes, data in the next 4
        return first & 0xFFFF, first >> 16, pos + 4, pos + 8
    mtype, nbytes = struct.unpack_from(e + "II", buf, pos)
    start = pos + 8
    end = start + nbytes
    return mtype, nbytes, start, end + ((-nbytes) % 8 if mtype != _MI_COMPRESSED else 0)


def _elements(buf: bytes, pos: int, e: str):
    while pos + 8 <= len(buf):
        mtype, nbytes, start, nxt = _tag(buf, pos, e)
        payload = buf[start : start + nbytes]
        if mtype == _MI_COMPRESSED:
            yield from _elements(zlib.decompress(payload), 0, e)
            while nxt < len(buf) and nxt % 8 and buf[nxt] == 0:  # tolerate writers that pad them anyway
                nxt += 1
        elif mtype == _MI_MATRIX:
            yield _matrix(payload, e)
        pos = nxt


def _matrix(buf: bytes, e: str) -> tuple[str, Optional[np.ndarray]]:
    subs = []
    pos = 0
    while pos + 8 <= len(buf) and len(subs) < 5:
        mtype, nbytes, start, nxt = _tag(buf, pos, e)
        subs.append((mtype, buf[start : start + nbytes]))
        pos = nxt
    if len(subs) < 3:
        return "", None
    flags = struct.unpack_from(e + "I", subs[0][1], 0)[0]
    cls, is_complex = flags & 0xFF, bool(flags & 0x0800)
    dims = np.frombuffer(subs[1][1], dtype=e + "i4").astype(int).tolist()
    name = subs[2][1].decode("latin-1")
    if cls not in _MX or is_complex or len(subs) < 4:
        return name, None
    mtype, payload = subs[3]
    if mtype not in _MI:
        return name, None
    values = np.frombuffer(payload, dtype=e + _MI[mtype]).astype(_MX[cls])
    return name, values.reshape(dims, order="F")


def save_mat_v5(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Write numeric arrays as a MATLAB level-5 MAT file (float32 -> single, else double; zlib-compressed).

    For procedural stand-ins of released .mat datasets (`snd.eval.datasets.geonet`); MATLAB stores arrays
    column-major, so `load_mat` (and scipy/MATLAB) read back the same shapes and values.
    """
    def element(mtype: int, payload: bytes) -> bytes:
        return struct.pack("<II", mtype, len(payload)) + payload + b"\0" * ((-len(payload)) % 8)

    out = bytearray(b"MATLAB 5.0 MAT-file, written by snd".ljust(116, b" ") + b"\0" * 8)
    out += struct.pack("<H", 0x0100) + b"IM"
    for name, arr in arrays.items():
        arr = np.atleast_2d(np.asarray(arr))
        single = arr.dtype == np.float32
        data = arr.astype("<f4" if single else "<f8")
        body = element(6, struct.pack("<II", 7 if single else 6, 0))  # array flags: mxSINGLE / mxDOUBLE class
        body += element(5, np.array(arr.shape, dtype="<i4").tobytes())
        body += element(1, name.encode())
        body += element(7 if single else 9, data.tobytes(order="F"))  # miSINGLE / miDOUBLE
        z = zlib.compress(struct.pack("<II", _MI_MATRIX, len(body)) + body)
        out += struct.pack("<II", _MI_COMPRESSED, len(z)) + z
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(bytes(out))
    tmp.replace(path)
