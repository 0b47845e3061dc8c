"""`snd cache gc`: list (and with `yes`, remove) what no run will read again.

Scaffold stores: groups of incomplete scenes (renamed into place but never marked), their temp folders
under ``_snd/tmp/`` and failure markers, and the temp files of atomic JSON writes a killed process left.
A scene with a completion marker is never a candidate (the rule is checked per scene, not inferred).
Evaluation caches: backbone-key folders whose key matches none of the weights given with `keep`, and
temp files. The model-independent target stores stay.

Both take the cache's in-use lock exclusively (`snd.cache.inuse`) for listing and removing alike, so a
folder a running `snd precompute` / `snd eval` is writing is never listed as a leftover; if one holds the
lock, gc refuses and changes nothing.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snd.cache import manifest as M
from snd.cache.info import cache_kind, eval_keys
from snd.cache.inuse import exclusive
from snd.cache.writer import folder_bytes

__all__ = ["Candidate", "GcReport", "gc"]

_KEY = re.compile(r"^[0-9a-f]{16}$")
_TMP = re.compile(r"^\..+\.tmp$")  # atomic-write temp files: .<name>.<random>.tmp


@dataclass(frozen=True)
class Candidate:
    path: Path
    why: str
    bytes: int


@dataclass
class GcReport:
    root: Path
    kind: str
    candidates: list[Candidate] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # eval keys kept (matched by `keep`)
    removed: bool = False

    @property
    def bytes(self) -> int:
        return sum(c.bytes for c in self.candidates)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.root), "kind": self.kind, "removed": self.removed, "bytes": self.bytes, "kept": self.kept,
                "candidates": [{"path": str(c.path), "why": c.why, "bytes": c.bytes} for c in self.candidates]}


def _size(p: Path) -> int:
    return folder_bytes(p) if p.is_dir() else p.stat().st_size


def _temp_files(folder: Path, recursive: bool) -> list[Candidate]:
    """Temp files of interrupted atomic writes in `folder` (and below it, not inside Zarr stores: a feature
    store holds one chunk file per image, and Zarr never names its files like these)."""
    files: list[Path] = []
    for here, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.endswith(".zarr")) if recursive else []
        files += [Path(here) / n for n in names if _TMP.match(n) or n == "final_norm.tmp"]
    return [Candidate(p, "temp file of an interrupted write", p.stat().st_size) for p in sorted(files)]


def _scaffold_candidates(root: Path) -> list[Candidate]:
    out = []
    tdir = M.tmp_dir(root)
    for t in sorted(tdir.iterdir()) if tdir.is_dir() else []:
        out.append(Candidate(t, "scene being written by a run that was killed", _size(t)))
    for d in sorted(root.iterdir()):
        if d.is_dir() and not d.name.startswith(("_", ".")) and (d / "zarr.json").is_file() \
                and M.complete_record(root, d.name) is None:
            out.append(Candidate(d, "scene group without a completion marker (incomplete)", _size(d)))
    mdir = M.markers_dir(root)
    for m in sorted(mdir.glob("*.failed.json")) if mdir.is_dir() else []:
        out.append(Candidate(m, "failure record of an incomplete scene", m.stat().st_size))
    for folder in (root, M.meta_dir(root), mdir, M.meta_dir(root) / "runs"):
        if folder.is_dir():
            out += _temp_files(folder, recursive=False)
    return out


def _fingerprint(spec: str) -> str:
    """Weights hash of a `--keep` model (run dir, checkpoint, export, weights file, or backbone name)."""
    from snd.eval.features import load_eval_backbone, weights_fingerprint

    return weights_fingerprint(load_eval_backbone(spec))


def _key_matches(key_dir: Path, fingerprints: list[str]) -> bool:
    """Whether a key folder was made from one of the weights (by its recorded hash, or by recomputing the key)."""
    from snd.eval.features import PRECISIONS, key_from_fingerprint

    model = json.loads((key_dir / "model.json").read_text()) if (key_dir / "model.json").is_file() else {}
    if model.get("weights_sha256"):
        return model["weights_sha256"] in fingerprints
    hw = model.get("img_hw")
    if not hw:
        return False
    return any(key_from_fingerprint(fp, (int(hw[0]), int(hw[1])), p) == key_dir.name  # type: ignore[arg-type]
               for fp in fingerprints for p in PRECISIONS)


def _eval_candidates(root: Path, keep: list[str], rep: GcReport) -> list[Candidate]:
    keys = [k for k in keep if _KEY.match(k)]
    fps = [_fingerprint(k) for k in keep if not _KEY.match(k)]
    out = []
    for d in eval_keys(root):
        if d.name in keys or (fps and _key_matches(d, fps)):
            rep.kept.append(d.name)
        else:
            out.append(Candidate(d, "feature cache of weights not given with --keep", _size(d)))
    removed = {c.path for c in out}
    out += [c for c in _temp_files(root, recursive=True) if not any(p in removed for p in c.path.parents)]
    return out


def gc(path: str | Path, *, keep: list[str] | None = None, yes: bool = False) -> GcReport:
    """Find (and with `yes`, remove) a cache's leftovers; see the module docstring for what qualifies.

    Args:
        path: a scaffold store or an evaluation cache folder.
        keep: evaluation caches only: weights whose feature caches stay (run dirs, checkpoints, exports,
            weights files, backbone names, or 16-hex cache keys).
        yes: remove the candidates (default: only list them).
    """
    kind, root = cache_kind(path)
    rep = GcReport(root, kind)
    lock_dir = M.meta_dir(root) if kind == "scaffold" else root
    with exclusive(lock_dir, f"{'scaffold store' if kind == 'scaffold' else 'evaluation cache'} {root}"):
        rep.candidates = _scaffold_candidates(root) if kind == "scaffold" else _eval_candidates(root, list(keep or []), rep)
        if yes:
            for c in rep.candidates:
                if kind == "scaffold" and c.path.parent == root and M.complete_record(root, c.path.name) is not None:
                    # checked again per removal (not an assert: `python -O` would drop it)
                    raise RuntimeError(f"refusing to remove complete scene {c.path}")
                if c.path.is_dir():
                    shutil.rmtree(c.path)
                else:
                    c.path.unlink(missing_ok=True)
            rep.removed = True
    if rep.removed and kind == "scaffold":
        M.merge_manifest(root)
    return rep
