"""Binary PLY meshes with vertex colours: a small deterministic writer and a checked reader.

Why our own writer: the procedural generator must be byte-identical for a seed, so the header and
layout are fixed here (the layout of ScanNet++'s ``mesh_aligned_0.05.ply``: float x/y/z, uchar
red/green/blue, ``list uchar int vertex_indices``). Reading goes through trimesh, which handles the
real release's files (ascii or binary, extra properties), and is wrapped so a broken file is a
`SndError` naming it.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from snd.errors import SndError, require_file


def write_ply(path: str | Path, vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray) -> None:
    """Write a binary little-endian PLY atomically.

    Args:
        vertices: [N, 3] float (stored as float32).
        faces: [F, 3] int (stored as int32).
        colors: [N, 3] uint8 RGB.
    """
    vertices = np.asarray(vertices)
    faces = np.asarray(faces)
    colors = np.asarray(colors)
    assert vertices.ndim == 2 and vertices.shape[1] == 3, vertices.shape
    assert faces.ndim == 2 and faces.shape[1] == 3, faces.shape
    assert colors.shape == vertices.shape and colors.dtype == np.uint8, (colors.shape, colors.dtype)
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"element vertex {len(vertices)}\n"
        "property float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\n"
        f"element face {len(faces)}\n"
        "property list uchar int vertex_indices\nend_header\n"
    ).encode("ascii")
    vdt = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("r", "u1"), ("g", "u1"), ("b", "u1")])
    v = np.empty(len(vertices), dtype=vdt)
    v["x"], v["y"], v["z"] = vertices[:, 0], vertices[:, 1], vertices[:, 2]
    v["r"], v["g"], v["b"] = colors[:, 0], colors[:, 1], colors[:, 2]
    fdt = np.dtype([("n", "u1"), ("i", "<i4", (3,))])
    f = np.empty(len(faces), dtype=fdt)
    f["n"] = 3
    f["i"] = faces
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as fh:
        fh.write(header)
        fh.write(v.tobytes())
        fh.write(f.tobytes())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def read_mesh(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Read a triangle mesh -> (vertices [N,3] float64, faces [F,3] int64, colors [N,3] uint8 or None).

    Raises `SndError` naming the file when it is missing, unreadable, or has no faces (a point cloud).
    """
    p = require_file(path, "mesh (PLY)", hint="ScanNet++ v2 ships scans/mesh_aligned_0.05.ply per scene")
    import trimesh

    try:
        mesh = trimesh.load(p, file_type="ply", process=False, force="mesh")
    except Exception as e:  # trimesh raises many kinds of errors for a broken file
        raise SndError(f"cannot read mesh {p}: {type(e).__name__}: {e}", path=p, hint="re-download or re-generate the file") from e
    faces = np.asarray(getattr(mesh, "faces", np.zeros((0, 3))), dtype=np.int64)
    vertices = np.asarray(getattr(mesh, "vertices", np.zeros((0, 3))), dtype=np.float64)
    if faces.ndim != 2 or len(faces) == 0:
        raise SndError(f"mesh has no faces (a point cloud?): {p}", path=p, hint="depth and instance masks are ray-cast from a triangle mesh; use scans/mesh_aligned_0.05.ply")
    if faces.shape[1] != 3:
        raise SndError(f"mesh faces are not triangles ({faces.shape[1]} vertices each): {p}", path=p)
    colors = None
    vc = getattr(getattr(mesh, "visual", None), "vertex_colors", None)
    if vc is not None and len(vc) == len(vertices):
        colors = np.asarray(vc)[:, :3].astype(np.uint8)
    return vertices, faces, colors
