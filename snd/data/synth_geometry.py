"""Geometry of the procedural rooms of `snd.data.synth`: a box room and boxes, cylinders, spheres.

Why its own module: each shape is a pure function of its sizes that tests use on their own (ray casting
against analytic planes and spheres), apart from the scene sampling, shading and file writing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


# ------------------------------------------------------------------------------------------------
# Geometry
# ------------------------------------------------------------------------------------------------
@dataclass
class Part:
    """One annotated surface group: its own vertices (never shared with other parts), one instance."""

    vertices: np.ndarray  # [n, 3]
    normals: np.ndarray  # [n, 3] unit, per vertex (flat parts repeat the face normal)
    faces: np.ndarray  # [f, 3] local indices
    face_segment: np.ndarray  # [f] local segment number (0..k-1)
    label: str
    texture: dict = field(default_factory=dict)
    shape: dict = field(default_factory=dict)  # analytic description (kind, centre, sizes, yaw)


def _grid(origin, u, v, nu: int, nv: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A planar grid patch: corner `origin`, edges `u`, `v` -> (vertices, normals, faces), normal = u x v."""
    origin, u, v = (np.asarray(a, dtype=np.float64) for a in (origin, u, v))
    a, b = np.meshgrid(np.linspace(0, 1, nu + 1), np.linspace(0, 1, nv + 1), indexing="ij")
    verts = origin + a.reshape(-1, 1) * u + b.reshape(-1, 1) * v
    n = np.cross(u, v)
    n /= np.linalg.norm(n)
    idx = np.arange((nu + 1) * (nv + 1)).reshape(nu + 1, nv + 1)
    p00, p10, p01, p11 = idx[:-1, :-1].ravel(), idx[1:, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, 1:].ravel()
    faces = np.concatenate([np.stack([p00, p10, p11], 1), np.stack([p00, p11, p01], 1)])
    return verts, np.broadcast_to(n, verts.shape).copy(), faces


def _merge(pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate (vertices, normals, faces) pieces; the piece index becomes the face's segment."""
    V, N, F, S, off = [], [], [], [], 0
    for k, (v, n, f) in enumerate(pieces):
        V.append(v)
        N.append(n)
        F.append(f + off)
        S.append(np.full(len(f), k))
        off += len(v)
    return np.concatenate(V), np.concatenate(N), np.concatenate(F), np.concatenate(S)


def _rot_z(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _room_parts(lx: float, ly: float, lz: float, step: float = 0.25) -> list[Part]:
    """Floor, ceiling and four walls of an axis-aligned room [-lx/2, lx/2] x [-ly/2, ly/2] x [0, lz], normals inward."""
    hx, hy = lx / 2, ly / 2
    n = lambda L: max(1, int(np.ceil(L / step)))  # noqa: E731
    specs = [
        ("floor", (-hx, -hy, 0), (lx, 0, 0), (0, ly, 0), n(lx), n(ly)),
        ("ceiling", (-hx, -hy, lz), (0, ly, 0), (lx, 0, 0), n(ly), n(lx)),
        ("wall", (-hx, -hy, 0), (0, 0, lz), (lx, 0, 0), n(lz), n(lx)),  # y = -hy, normal +y
        ("wall", (-hx, hy, 0), (lx, 0, 0), (0, 0, lz), n(lx), n(lz)),  # y = +hy, normal -y
        ("wall", (-hx, -hy, 0), (0, ly, 0), (0, 0, lz), n(ly), n(lz)),  # x = -hx, normal +x
        ("wall", (hx, -hy, 0), (0, 0, lz), (0, ly, 0), n(lz), n(ly)),  # x = +hx, normal -x
    ]
    parts = []
    for label, o, u, v, nu, nv in specs:
        verts, norms, faces = _grid(o, u, v, nu, nv)
        parts.append(Part(verts, norms, faces, np.zeros(len(faces), dtype=np.int64), label))
    return parts


def box_part(centre_xy, size, yaw: float, step: float = 0.2) -> Part:
    """A box standing on the floor: footprint centre (x, y), size (sx, sy, sz), rotated by `yaw` about z."""
    h = np.asarray(size, dtype=np.float64) / 2
    R = _rot_z(yaw)
    c = np.array([centre_xy[0], centre_xy[1], h[2]])
    e = np.eye(3)
    pieces = []
    for a in range(3):
        b, cax = (a + 1) % 3, (a + 2) % 3
        for s in (1.0, -1.0):
            u, v = e[b] * 2 * h[b], e[cax] * 2 * h[cax]
            if s < 0:
                u, v = v, u
            corner = s * h[a] * e[a] - h[b] * e[b] - h[cax] * e[cax]
            nu = max(1, int(np.ceil(np.linalg.norm(u) / step)))
            nv = max(1, int(np.ceil(np.linalg.norm(v) / step)))
            verts, norms, faces = _grid(corner, u, v, nu, nv)
            pieces.append((verts @ R.T + c, norms @ R.T, faces))
    V, N, F, S = _merge(pieces)
    return Part(V, N, F, S, "box", shape={"kind": "box", "centre": c.tolist(), "size": (2 * h).tolist(), "yaw": float(yaw)})


def cylinder_part(centre_xy, radius: float, height: float, segments: int = 40) -> Part:
    """An upright cylinder standing on the floor (side + both caps)."""
    ang = np.linspace(0, 2 * np.pi, segments + 1)
    rings = max(2, int(np.ceil(height / 0.2)) + 1)
    z = np.linspace(0, height, rings)
    A, Z = np.meshgrid(ang, z, indexing="ij")  # [segments+1, rings]
    side_v = np.stack([radius * np.cos(A), radius * np.sin(A), Z], -1).reshape(-1, 3)
    side_n = np.stack([np.cos(A), np.sin(A), np.zeros_like(A)], -1).reshape(-1, 3)
    idx = np.arange((segments + 1) * rings).reshape(segments + 1, rings)
    p00, p10, p01, p11 = idx[:-1, :-1].ravel(), idx[1:, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, 1:].ravel()
    side_f = np.concatenate([np.stack([p00, p10, p11], 1), np.stack([p00, p11, p01], 1)])
    pieces = [(side_v, side_n, side_f)]
    for zc, sgn in ((height, 1.0), (0.0, -1.0)):
        ring = np.stack([radius * np.cos(ang[:-1]), radius * np.sin(ang[:-1]), np.full(segments, zc)], -1)
        verts = np.concatenate([[[0.0, 0.0, zc]], ring])
        j = np.arange(segments)
        faces = np.stack([np.zeros(segments, dtype=np.int64), 1 + j, 1 + (j + 1) % segments], 1)
        if sgn < 0:
            faces = faces[:, [0, 2, 1]]
        pieces.append((verts, np.broadcast_to([0.0, 0.0, sgn], verts.shape).copy(), faces))
    V, N, F, S = _merge(pieces)
    c = np.array([centre_xy[0], centre_xy[1], 0.0])
    return Part(V + c, N, F, S, "cylinder", shape={"kind": "cylinder", "centre": c.tolist(), "radius": radius, "height": height})


def sphere_part(centre, radius: float, subdivisions: int = 3) -> Part:
    """An icosphere (vertices on the true sphere) centred at `centre`."""
    import trimesh

    ico = trimesh.creation.icosphere(subdivisions=subdivisions)
    unit = np.asarray(ico.vertices, dtype=np.float64)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    faces = np.asarray(ico.faces, dtype=np.int64)
    c = np.asarray(centre, dtype=np.float64)
    return Part(c + radius * unit, unit.copy(), faces, np.zeros(len(faces), dtype=np.int64), "sphere", shape={"kind": "sphere", "centre": c.tolist(), "radius": radius})
