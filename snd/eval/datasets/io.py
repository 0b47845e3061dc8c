"""Small readers shared by the dataset modules: RGB images, 16-bit PNGs, label PNGs, seeded splits."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from snd.errors import SndError


def read_rgb(path: Path) -> np.ndarray:
    """An image file -> RGB [H, W, 3] uint8 (EXIF orientation is ignored, as the benchmarks do)."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except FileNotFoundError:
        raise SndError(f"missing image {path}", path=path) from None
    except OSError as e:
        raise SndError(f"cannot read image {path}: {e}", path=path) from e


def read_png_u16(path: Path) -> np.ndarray:
    """A 16-bit single-channel PNG (depth in mm or 1/256 m) -> [H, W] uint16, values untouched."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except FileNotFoundError:
        raise SndError(f"missing depth PNG {path}", path=path) from None
    if arr.ndim != 2:
        raise SndError(f"depth PNG {path} has shape {arr.shape}; expected one 16-bit channel", path=path)
    return arr.astype(np.uint16)


def read_label_png(path: Path) -> np.ndarray:
    """A label PNG (8/16-bit grey or palette 'P') -> class indices [H, W] int64 (palette indices, not colours)."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I;16", "I", "I;16B"):
                raise SndError(f"label PNG {path} has mode {im.mode}; expected indices (L, P or 16-bit)", path=path)
            arr = np.asarray(im)
    except FileNotFoundError:
        raise SndError(f"missing label PNG {path}", path=path) from None
    return arr.astype(np.int64)


def random_split(items: Sequence, *, train_fraction: float, seed: int, split: str) -> list:
    """Deterministic random train/val split of `items` (sorted first, so listing order does not matter)."""
    ordered = sorted(items)
    rng = random.Random(seed)
    perm = list(range(len(ordered)))
    rng.shuffle(perm)
    n_train = int(round(train_fraction * len(ordered)))
    chosen = sorted(perm[:n_train]) if split == "train" else sorted(perm[n_train:])
    return [ordered[i] for i in chosen]


def first_existing(*paths: Path) -> Path | None:
    for p in paths:
        if p.exists():
            return p
    return None
