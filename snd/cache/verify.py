"""`snd cache verify`: read every chunk of every array of every complete scene and check every checksum.

Why a separate pass: the reader checks what training touches, when it touches it (possibly hours in), and
an array the current path does not read is never checked. This pass reads *all* of it up front, in
parallel, and reports every bad (scene, row, array) instead of stopping at the first.

Generic by design (arrays are added by later schema versions): it iterates the arrays a scene group
*holds*, not a fixed list. Each is read block by block along its first axis (one shard or chunk at a
time), which runs Zarr's per-chunk crc32c codec and the shard index checksums; each row of an array named
by a checksum description in the group's attributes is compared with its recorded CRC-32C of the stored
bytes. A description is any attribute ``checksum`` or ``checksum_<name>`` of the form
``{"algorithm": "crc32c", "arrays": [...], "table": <array>}`` (table defaults to ``crc32c``): entry
[i, j] of a 2-D table is the CRC of row i of ``arrays[j]``; entry [i, t, j] of a 3-D one (v4's
``op_crc32c``) the CRC of row i's slot t. An array may be checked by several tables (v4's operator fields:
whole rows and slots). Every table is pinned by a SHA-256 in the scene's completion marker.

`--fix` removes each bad scene's marker, then its group, under the exclusive in-use lock, so the same
`snd precompute` redoes exactly those scenes (and a resumed store is byte-identical to an uninterrupted one).
"""
from __future__ import annotations

import contextlib
import hashlib
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from snd.cache import manifest as M
from snd.cache.inuse import exclusive
from snd.cache.schema import CHECKSUM_ARRAY, FRAME_CHECKSUM_ARRAY, OP_CHECKSUM_ARRAY
from snd.cache.writer import crc32c

__all__ = ["Problem", "VerifyReport", "checksum_tables", "verify_store", "remove_scenes"]


@dataclass(frozen=True)
class Problem:
    """One damaged place: scene, array (None = the group itself), row along the first axis (None = whole):
    a pair for the scaffold arrays, a stored frame (row k of ``frame_index``) for the ``frame_*`` arrays."""

    scene: str
    array: str | None
    row: int | None
    what: str

    def __str__(self) -> str:
        where = f"scene {self.scene!r}"
        if self.row is not None:  # the frame arrays' rows are stored frames (their order), not pairs
            where += f" {'frame row' if (self.array or '').startswith('frame_') else 'pair'} {self.row}"
        if self.array is not None:
            where += f" array {self.array!r}"
        return f"{where}: {self.what}"


@dataclass
class VerifyReport:
    """What `verify_store` read and found."""

    root: Path
    scenes: int = 0  # complete scenes checked
    incomplete: int = 0  # scenes with leftovers or a failure marker (not checked; `snd cache gc` lists them)
    arrays: int = 0  # (scene, array) checked
    rows: int = 0  # rows whose CRC-32C was compared with its table
    bytes: int = 0  # decoded bytes read
    problems: list[Problem] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # scenes removed by --fix

    @property
    def bad_scenes(self) -> list[str]:
        return sorted({p.scene for p in self.problems})

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"store": str(self.root), "ok": self.ok, "scenes": self.scenes, "incomplete": self.incomplete,
                "arrays": self.arrays, "rows": self.rows, "bytes": self.bytes, "bad_scenes": self.bad_scenes,
                "problems": [dict(scene=p.scene, array=p.array, pair=p.row, what=p.what) for p in self.problems],
                "removed": self.removed}


# the marker field that pins each checksum table (a damaged table would otherwise excuse damaged rows)
_PINNED_BY = {CHECKSUM_ARRAY: "checksums_sha256", FRAME_CHECKSUM_ARRAY: "frames_checksums_sha256",
              OP_CHECKSUM_ARRAY: "op_checksums_sha256"}


def checksum_tables(attrs: dict) -> list[tuple[str, list[str]]]:
    """(table array, checked arrays in column order) of every checksum description in a group's attributes."""
    out = []
    for key, val in sorted(attrs.items()):
        if (key == "checksum" or key.startswith("checksum_")) and isinstance(val, dict) and "arrays" in val:
            out.append((str(val.get("table", CHECKSUM_ARRAY)), [str(a) for a in val["arrays"]]))
        elif isinstance(val, dict) and isinstance(val.get("checksum"), dict) and "table" in val["checksum"]:
            # a nested description (v3's ``frames.checksum``) names its table explicitly
            out.append((str(val["checksum"]["table"]), [str(a) for a in val["checksum"]["arrays"]]))
    return out


@dataclass
class _Block:
    """Rows [lo, hi) of one array of one scene, with their expected CRCs: one [hi-lo] (per row) or
    [hi-lo, T] (per slot of each row) uint32 array per checksum table that covers the array."""

    scene: str
    name: str
    arr: Any
    lo: int
    hi: int
    crcs: list[np.ndarray]


def _err(e: BaseException) -> str:
    return f"unreadable ({type(e).__name__}: {e})"[:300]


def _check_block(b: _Block) -> tuple[int, int, list[Problem]]:
    """Read one block (row by row if the block read fails, to name the bad rows); (bytes, rows checked, problems)."""
    problems: list[Problem] = []
    if b.arr.ndim == 0:
        try:
            return int(np.asarray(b.arr[...]).nbytes), 0, []
        except Exception as e:  # noqa: BLE001 - any decode failure is a damaged chunk
            return 0, 0, [Problem(b.scene, b.name, None, _err(e))]
    rows: list[np.ndarray | None]
    try:
        block = b.arr[b.lo:b.hi]
        rows = [block[i] for i in range(b.hi - b.lo)]
    except Exception:  # noqa: BLE001 - find which rows: read them one at a time
        rows = []
        for i in range(b.lo, b.hi):
            try:
                rows.append(b.arr[i])
            except Exception as e:  # noqa: BLE001
                rows.append(None)
                problems.append(Problem(b.scene, b.name, i, _err(e)))
    nbytes, checked = 0, 0
    for k, a in enumerate(rows):
        if a is None:
            continue
        a = np.asarray(a)
        nbytes += a.nbytes
        checked += bool(b.crcs)
        where = []  # one problem per row, naming what differs: the whole row and/or target slots
        for tab in b.crcs:
            if tab.ndim == 2:  # per target slot
                bad = [t for t in range(tab.shape[1]) if crc32c(a[t]) != int(tab[k, t])]
                where += [f"target slot(s) {bad}"] if bad else []
            elif crc32c(a) != int(tab[k]):
                where.append("the row")
        if where:
            problems.append(Problem(b.scene, b.name, b.lo + k,
                                    f"checksum mismatch in {' and '.join(where)} (stored bytes differ from those written)"))
    return nbytes, checked, problems


def _plan_scene(root: Path, scene: str, record: dict, rep: VerifyReport) -> list[_Block]:
    """Open one scene group, check its checksum tables, and list the blocks to read (problems go to `rep`)."""
    import zarr

    try:
        group = zarr.open_group(store=str(root / scene), mode="r")
        attrs = dict(group.attrs)
        names = sorted(group.array_keys())
    except Exception as e:  # noqa: BLE001
        rep.problems.append(Problem(scene, None, None, f"group {_err(e)}"))
        return []
    expected: dict[str, list[tuple[np.ndarray, int]]] = {}  # array -> [(table, column), ...]
    for table_name, cols in checksum_tables(attrs):
        try:
            table = np.asarray(group[table_name][...])
        except Exception as e:  # noqa: BLE001
            rep.problems.append(Problem(scene, table_name, None, f"checksum table {_err(e)}"))
            continue
        pin = _PINNED_BY.get(table_name)
        if pin in record and hashlib.sha256(np.ascontiguousarray(table).tobytes()).hexdigest() != record[pin]:
            rep.problems.append(Problem(scene, table_name, None, "checksum table does not match the scene's marker"))
            continue
        if table.ndim not in (2, 3) or table.shape[-1] != len(cols):
            rep.problems.append(Problem(scene, table_name, None, f"checksum table is {table.shape}, expected [N, (T,) {len(cols)}]"))
            continue
        for j, c in enumerate(cols):
            expected.setdefault(c, []).append((table, j))
    for c in sorted(set(expected) - set(names)):
        rep.problems.append(Problem(scene, c, None, "array missing from the group"))
    blocks = []
    for name in names:
        try:
            arr = group[name]
        except Exception as e:  # noqa: BLE001 - damaged array metadata
            rep.problems.append(Problem(scene, name, None, f"array metadata {_err(e)}"))
            continue
        rep.arrays += 1
        n = int(arr.shape[0]) if arr.ndim else 1
        step = int((arr.shards or arr.chunks)[0]) if arr.ndim else 1
        tabs = []
        for table, j in expected.get(name, []):
            if table.shape[0] != n:
                rep.problems.append(Problem(scene, name, None, f"{n} rows but the checksum table has {table.shape[0]}"))
            else:
                tabs.append((table, j))
        for lo in range(0, n, max(step, 1)):
            hi = min(lo + step, n) if arr.ndim else 1
            blocks.append(_Block(scene, name, arr, lo, hi, [table[lo:hi, ..., j] for table, j in tabs]))
    return blocks


def verify_store(root: str | Path, *, jobs: int = 4, fix: bool = False, progress: bool = True) -> VerifyReport:
    """Check every complete scene of the scaffold store at `root`; with `fix`, remove the bad ones.

    Args:
        root: the `snd precompute --out` folder.
        jobs: blocks read at once (threads: decompression and CRC release the GIL).
        fix: remove each bad scene's marker and group (needs the store free: no precompute running).
        progress: a rich progress bar on stderr.
    """
    root = Path(root)
    damaged: dict[str, str] = {}  # scenes whose marker is unreadable: a problem of that scene, --fix redoes it
    man = M.read_manifest(root, damaged=damaged)  # raises a clear SndError when `root` is not a scaffold store
    guard = exclusive(M.meta_dir(root), f"scaffold store {root}") if fix else contextlib.nullcontext()
    with guard:
        rep = VerifyReport(root)
        rep.problems += [Problem(name, None, None, f"completion marker unreadable ({why})") for name, why in damaged.items()]
        recs = {n: r for n, r in man["scenes"].items() if r.get("status") == "complete"}
        rep.incomplete = len(set(man["scenes"]) - set(recs))
        blocks: list[_Block] = []
        for name in sorted(recs):
            rep.scenes += 1
            blocks += _plan_scene(root, name, recs[name], rep)
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        prog = Progress(TextColumn("verify {task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[mb]}"),
                        TimeRemainingColumn(), console=Console(stderr=True), disable=not progress, transient=True)
        with prog, ThreadPoolExecutor(max(int(jobs), 1), thread_name_prefix="snd-verify") as pool:
            task = prog.add_task(f"{root.name} (blocks)", total=len(blocks), mb="")
            for nbytes, checked, problems in pool.map(_check_block, blocks):
                rep.bytes += nbytes
                rep.rows += checked
                rep.problems += problems
                prog.update(task, advance=1, mb=f"{rep.bytes / 1e6:.0f} MB")
        rep.problems.sort(key=lambda p: (p.scene, p.array or "", -1 if p.row is None else p.row))
        if fix and rep.problems:
            rep.removed = remove_scenes(root, rep.bad_scenes)
    if rep.removed:
        M.merge_manifest(root)
    return rep


def remove_scenes(root: Path, scenes: list[str]) -> list[str]:
    """Remove scenes' markers, then their groups (the caller holds the store's in-use lock exclusively).

    Marker first: if this is interrupted, what is left is an unmarked group, which precompute redoes."""
    root = Path(root)
    for s in scenes:
        M.check_scene_name(s)
        for m in (M.markers_dir(root) / f"{s}.json", M.markers_dir(root) / f"{s}.failed.json"):
            m.unlink(missing_ok=True)
        shutil.rmtree(root / s, ignore_errors=True)
    return list(scenes)
