"""Writable copies of the procedural dataset (the `synth_root` fixture), for reader tests that break or
rewrite one scene's files; shared by the raw-reader and fisheye reader tests."""
from __future__ import annotations

import shutil
from pathlib import Path


def copy_root(synth_root: Path, tmp_path: Path) -> Path:
    """A copy of the whole dataset root under `tmp_path` (without the reader's render cache)."""
    dst = tmp_path / "root"
    shutil.copytree(synth_root, dst, ignore=shutil.ignore_patterns(".snd_cache"))
    return dst


def copied_scene(synth_root: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(copied root, its first scene's folder `data/<scene>`)."""
    root = copy_root(synth_root, tmp_path)
    return root, sorted(p for p in (root / "data").iterdir() if p.is_dir() and not p.name.startswith("."))[0]
