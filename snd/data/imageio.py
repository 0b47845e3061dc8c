"""Checked image reading and resizing shared by the readers.

Resizing rules (one place, so every reader agrees): colour images bilinear (PIL, antialiased when
shrinking), label maps nearest (labels must never blend), depth is never resized here (the raw reader
ray-casts it at the requested size; the prepared layout has none).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from snd.errors import SndError


def read_rgb(path: str | Path) -> np.ndarray:
    """RGB image [H, W, 3] uint8, or an `SndError` naming a missing or undecodable file."""
    p = Path(path)
    if not p.is_file():
        raise SndError(f"missing image: {p}", path=p)
    try:
        with Image.open(p) as im:
            im.load()
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise SndError(f"cannot decode image {p}: {e}", path=p, hint="the file is truncated or not an image; re-download it") from e


def read_label_png(path: str | Path) -> np.ndarray:
    """A label PNG (8 or 16 bit, single channel) -> [H, W] int32, or an `SndError` naming the file."""
    p = Path(path)
    if not p.is_file():
        raise SndError(f"missing instance mask: {p}", path=p)
    try:
        with Image.open(p) as im:
            im.load()
            a = np.asarray(im)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise SndError(f"cannot decode label image {p}: {e}", path=p) from e
    if a.ndim != 2:
        raise SndError(f"label image must have one channel, got shape {a.shape}: {p}", path=p)
    return a.astype(np.int32)


def write_label_png(path: str | Path, labels: np.ndarray) -> None:
    """[H, W] non-negative ints < 65536 -> 16-bit PNG (what SnD's ``instance_segmentation/`` holds)."""
    labels = np.asarray(labels)
    assert labels.ndim == 2, labels.shape
    if labels.size and (labels.min() < 0 or labels.max() > 65535):
        raise ValueError(f"labels out of 16-bit range: {labels.min()}..{labels.max()}")
    Image.fromarray(labels.astype(np.uint16)).save(path, format="PNG")


def resize_rgb(img: np.ndarray, height: int, width: int) -> np.ndarray:
    if img.shape[:2] == (height, width):
        return img
    return np.asarray(Image.fromarray(img).resize((width, height), Image.BILINEAR))


def resize_labels(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a label map [H, W] (pixel centres mapped exactly, like PIL NEAREST)."""
    H, W = labels.shape
    if (H, W) == (height, width):
        return labels
    rows = np.minimum(((np.arange(height) + 0.5) * H / height).astype(np.int64), H - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * W / width).astype(np.int64), W - 1)
    return labels[rows[:, None], cols[None, :]]
