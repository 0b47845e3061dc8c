"""The store's manifest: a header fixed at creation plus one completion marker per scene.

Why markers instead of one shared JSON: several ranks write one store at once. Each committed scene gets
its own marker file (written atomically after the scene group was renamed into place), so no writer
ever rewrites another's record; `read_manifest` merges header + markers, and `merge_manifest` writes that
merge to ``manifest.json`` under a file lock as a human-readable snapshot. A scene without a marker is
not complete, whatever is on disk.

Files (all JSON): ``<store>/_snd/header.json``, ``<store>/_snd/markers/<scene>.json`` (complete),
``<store>/_snd/markers/<scene>.failed.json`` (last failure), ``<store>/manifest.json`` (merged).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterator

from snd.cache.schema import FORMAT_NAME, READABLE_VERSIONS, SCHEMA_VERSION
from snd.errors import SndError

META_DIR = "_snd"
# Header keys that must match for a rerun to add to an existing store (anything else may change).
IDENTITY_KEYS = ("format", "schema_version", "dataset", "source", "scaffold", "sampler", "encoding", "operator", "images")


def meta_dir(root: Path) -> Path:
    return Path(root) / META_DIR


def markers_dir(root: Path) -> Path:
    return meta_dir(root) / "markers"


def tmp_dir(root: Path) -> Path:
    return meta_dir(root) / "tmp"


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a unique temp file beside `path`, fsync, then rename over it (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


_HEADER_HINT = ("the store's header is damaged; manifest.json beside it holds a copy (every key but 'scenes' and "
                "'totals'): restore header.json from it, or use a new --out")


def _read_json(path: Path, hint: str = "the store is damaged; delete this file (the scene is then redone; `snd cache "
                                       "verify <store> --fix` does it) or use a new --out") -> dict:
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SndError(f"cannot read cache metadata {path}: {e}", path=path, hint=hint) from e
    if not isinstance(obj, dict):
        raise SndError(f"cannot read cache metadata {path}: a JSON {type(obj).__name__}, not an object", path=path,
                       hint=hint)
    return obj


def check_scene_name(name: str) -> None:
    if not name or name.startswith(("_", ".")) or "/" in name or name in ("manifest.json", "zarr.json"):
        raise SndError(f"scene name {name!r} cannot be a cache group name",
                       hint="scene folders must not start with '_' or '.', nor contain '/'")


@contextlib.contextmanager
def store_lock(root: Path) -> Iterator[None]:
    """An exclusive advisory lock on the store (header creation and manifest merges)."""
    meta_dir(root).mkdir(parents=True, exist_ok=True)
    with open(meta_dir(root) / "lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def init_store(root: Path, header: dict) -> dict:
    """Create the store (or open an existing one) with `header`; refuse a store made with other settings.

    Returns the header in force. Safe to call from several ranks at once.
    """
    root = Path(root)
    header = {"format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, **header}
    with store_lock(root):
        hpath = meta_dir(root) / "header.json"
        if hpath.exists():
            old = _read_json(hpath, _HEADER_HINT)
            diff = [k for k in IDENTITY_KEYS if old.get(k) != header.get(k)]
            if diff:
                details = "; ".join(f"{k}: store has {old.get(k)!r}, this run {header.get(k)!r}" for k in diff)
                raise SndError(f"cache store {root} was written with different settings ({details})", path=root,
                               hint="use a new --out, or delete the store to rebuild it")
            header = old
        else:
            write_json_atomic(hpath, header)
        root_meta = root / "zarr.json"
        if not root_meta.exists():
            write_json_atomic(root_meta, {"zarr_format": 3, "node_type": "group",
                                          "attributes": {"format": FORMAT_NAME, "schema_version": SCHEMA_VERSION}})
        markers_dir(root).mkdir(parents=True, exist_ok=True)
        tmp_dir(root).mkdir(parents=True, exist_ok=True)
    return header


def read_header(root: Path) -> dict:
    hpath = meta_dir(root) / "header.json"
    if not hpath.exists():
        raise SndError(f"not a scaffold cache (no {META_DIR}/header.json): {root}", path=root,
                       hint="point at the --out folder of `snd precompute`")
    header = _read_json(hpath, _HEADER_HINT)
    if header.get("format") != FORMAT_NAME or header.get("schema_version") not in READABLE_VERSIONS:
        raise SndError(f"cache {root} has format {header.get('format')!r} v{header.get('schema_version')}, "
                       f"this snd reads {FORMAT_NAME!r} v{SCHEMA_VERSION}", path=root,
                       hint="rebuild the cache with this version's `snd precompute`")
    return header


def write_marker(root: Path, scene: str, record: dict) -> None:
    """Record `scene` complete (after its group was renamed into place); clears an old failure marker."""
    write_json_atomic(markers_dir(root) / f"{scene}.json", {"scene": scene, "status": "complete", **record})
    with contextlib.suppress(FileNotFoundError):
        (markers_dir(root) / f"{scene}.failed.json").unlink()


def write_failure(root: Path, scene: str, message: str) -> None:
    write_json_atomic(markers_dir(root) / f"{scene}.failed.json", {"scene": scene, "status": "failed", "error": message})


def complete_record(root: Path, scene: str) -> dict | None:
    """The scene's completion marker if the scene is complete (marker and group both present)."""
    m = markers_dir(root) / f"{scene}.json"
    if not m.exists() or not (Path(root) / scene / "zarr.json").exists():
        return None
    return _read_json(m)


def read_manifest(root: Path, *, damaged: dict[str, str] | None = None) -> dict:
    """Header + ``scenes: {name: record}`` merged from the markers (the source of truth).

    `damaged`: collect unreadable markers here (scene -> error; `snd cache verify` reports and fixes them)
    instead of raising."""
    root = Path(root)
    header = read_header(root)
    scenes: dict[str, dict] = {}
    mdir = markers_dir(root)
    names = sorted(os.listdir(mdir)) if mdir.is_dir() else []
    for fn in names:
        if fn.endswith(".failed.json"):
            name = fn[: -len(".failed.json")]
            if name in scenes:
                continue
        elif fn.endswith(".json") and not fn.startswith("."):
            name = fn[: -len(".json")]
            if not (root / name / "zarr.json").exists():
                continue
        else:
            continue
        try:
            scenes[name] = _read_json(mdir / fn)
        except SndError as e:
            if damaged is None:
                raise
            damaged[name] = e.message
    return {**header, "scenes": dict(sorted(scenes.items()))}


def merge_manifest(root: Path) -> dict:
    """Write the merged manifest to ``<store>/manifest.json`` (a snapshot; markers stay authoritative)."""
    with store_lock(root):
        man = read_manifest(root)
        done = [s for s in man["scenes"].values() if s.get("status") == "complete"]
        man["totals"] = {"scenes": len(done), "pairs": sum(s["pairs"] for s in done),
                         "items": sum(s.get("items", 0) for s in done), "bytes": sum(s["bytes"] for s in done)}
        write_json_atomic(Path(root) / "manifest.json", man)
    return man


def scene_digests(root: Path) -> dict[str, dict[str, str]]:
    """sha256 of every file of every scene folder of the store at `root` (metadata and manifest left out):
    two stores with equal digests hold byte-identical shards, e.g. one written by a single worker and one
    written by several (`scripts/compare_stores.py`)."""
    import hashlib

    root = Path(root)
    out: dict[str, dict[str, str]] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        out[d.name] = {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest()
                       for f in sorted(d.rglob("*")) if f.is_file()}
    return out
