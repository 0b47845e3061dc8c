"""On-disk cache of ray-cast per-frame maps (depth, instance ids, semantic ids) as npz files.

Why: stage one and the probes ask for the same frames' masks again and again (every pair a frame takes
part in); casting a 1M-face mesh costs tens of milliseconds, loading an npz a millisecond.

Keys are ``<scene>/<frame>_<H>x<W>_<digest>.npz`` where the digest covers the camera (K, pose) and the
mesh/annotation files' sizes and modification times, so a re-generated scene or a different camera
never reads a stale entry. Writes are atomic (temp file + rename): concurrent readers/writers (several
DataLoader workers, several ranks) only ever see complete files.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def default_cache_dir(root: str | Path) -> Path:
    """``<root>/.snd_cache`` if we may write there, else ``~/.cache/snd`` (read-only datasets)."""
    root = Path(root)
    cand = root / ".snd_cache"
    try:
        cand.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=cand, prefix=".probe", delete=True)
        probe.close()
        return cand
    except OSError:
        home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "snd"
        return home


def file_signature(*paths: str | Path) -> str:
    """A short string that changes when any of `paths` is rewritten (name, size, mtime)."""
    parts = []
    for p in paths:
        p = Path(p)
        try:
            st = p.stat()
            parts.append(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            parts.append(f"{p}:missing")
    return "|".join(parts)


class MapCache:
    """npz cache of per-frame arrays under one folder (None folder = caching off)."""

    def __init__(self, folder: str | Path | None):
        self.folder = Path(folder) if folder is not None else None

    def key(self, scene: str, frame: str, height: int, width: int, *, K: np.ndarray, c2w: np.ndarray, extra: str) -> Path | None:
        if self.folder is None:
            return None
        h = hashlib.sha1()
        h.update(np.ascontiguousarray(K, dtype=np.float64).tobytes())
        h.update(np.ascontiguousarray(c2w, dtype=np.float64).tobytes())
        h.update(extra.encode())
        stem = Path(frame).stem
        return self.folder / scene / f"{stem}_{height}x{width}_{h.hexdigest()[:12]}.npz"

    def load(self, path: Path | None) -> dict[str, np.ndarray] | None:
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:  # a torn or foreign file: recompute
            log.debug("ignoring unreadable cache entry %s: %s", path, e)
            return None

    def save(self, path: Path | None, arrays: dict[str, np.ndarray]) -> None:
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                np.savez_compressed(f, **arrays)
            os.replace(tmp, path)
        except OSError as e:  # caching is an optimisation: never fail the read because of it
            log.debug("could not write cache entry %s: %s", path, e)
