"""Appearance of the procedural rooms of `snd.data.synth`: a procedural solid texture per surface.

Why its own module: DINOv2 needs texture to describe, so every surface gets stripes, checkers, planks,
dots or a sum of sinusoids in its own colours; these are pure functions of a seeded generator and of world
points, shared by the shading of images (`snd.data.synth_scene.SynthScene.shade`) and the mesh's vertex
colours, and apart from the geometry (`snd.data.synth_geometry`) and the scene sampling.
"""
from __future__ import annotations

import numpy as np

__all__ = ["texture"]


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _texture_params(rng: np.random.Generator, label: str) -> dict:
    kinds = {"floor": ["planks", "checker"], "ceiling": ["waves"], "wall": ["stripes", "waves", "dots"]}
    kind = str(rng.choice(kinds.get(label, ["checker", "stripes", "dots", "waves"])))
    hue = rng.uniform()
    sat = rng.uniform(0.15, 0.35) if label in ("wall", "ceiling") else rng.uniform(0.4, 0.85)
    val = rng.uniform(0.7, 0.95) if label in ("wall", "ceiling") else rng.uniform(0.55, 0.95)
    c1 = _hsv(hue, sat, val)
    c2 = _hsv((hue + rng.uniform(0.3, 0.7)) % 1.0, rng.uniform(0.3, 0.8), rng.uniform(0.3, 0.7))
    if label == "ceiling":
        c2 = c1 * 0.85
    return {
        "kind": kind,
        "c1": c1,
        "c2": c2,
        "freq": rng.uniform(2.0, 5.0),
        "rot": _random_rotation(rng),
        "waves": rng.normal(size=(4, 3)) * rng.uniform(1.5, 4.0),
        "phase": rng.uniform(0, 2 * np.pi, size=4),
    }


def texture(points: np.ndarray, tex: dict) -> np.ndarray:
    """Unshaded albedo [M, 3] in [0, 1] of a procedural solid texture at world points [M, 3]."""
    p = points @ tex["rot"].T
    f = tex["freq"]
    kind = tex["kind"]
    if kind == "checker":
        g = np.floor(p * f + 0.013).sum(axis=1)
        m = (g % 2).astype(np.float64)
    elif kind == "stripes":
        m = 0.5 + 0.5 * np.tanh(3.0 * np.sin(2 * np.pi * f * p[:, 0]))
    elif kind == "planks":
        m = 0.5 + 0.5 * np.sin(2 * np.pi * 1.5 * f * p[:, 0] + 2.0 * np.sin(3.0 * p[:, 1]))
        m = 0.6 * m + 0.4 * (np.floor(p[:, 1] * f * 0.7) % 2)
    elif kind == "dots":
        q = p * f
        d = np.linalg.norm(q - np.round(q), axis=1)
        m = (d < 0.32).astype(np.float64)
    else:  # waves: a sum of four sinusoids
        m = 0.5 + 0.125 * np.sin(p @ tex["waves"].T + tex["phase"]).sum(axis=1)
    low = 0.9 + 0.1 * np.sin(points @ tex["waves"][0] * 0.3 + tex["phase"][0])
    col = tex["c1"][None] * (1 - m[:, None]) + tex["c2"][None] * m[:, None]
    return np.clip(col * low[:, None], 0.0, 1.0)
