"""Small pieces of the ScanNet++ / nerfstudio / COLMAP file formats shared by the readers and the generator.

World frames (the one subtle thing): ScanNet++'s mesh (``scans/mesh_aligned_0.05.ply``) and the DSLR
COLMAP poses (``dslr/colmap/images.txt``, OpenCV world-to-camera) share one metric, z-up world frame.
The toolkit writes ``dslr/nerfstudio/transforms*.json`` with nerfstudio's COLMAP conversion
(scannetpp ``common/utils/nerfstudio.py``: flip the camera's y/z, then swap world x<->y and negate
world z), so a transforms.json pose lives in a *permuted* world. `nerfstudio_to_mesh_c2w` undoes that
(the permutation is its own inverse) and then applies `opengl_to_opencv`; readers prefer the COLMAP
poses when ``images.txt`` is present and fall back to this conversion otherwise.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from snd.data.camera import opencv_to_opengl, opengl_to_opencv
from snd.errors import SndError

# World permutation applied by nerfstudio's COLMAP->transforms conversion (swap x<->y, negate z).
NS_WORLD = np.array([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])

# Semantic classes of the procedural scenes (line i of metadata/semantic_classes.txt has id i + 1).
SYNTH_CLASSES: tuple[str, ...] = ("wall", "floor", "ceiling", "box", "cylinder", "sphere")


def nerfstudio_to_mesh_c2w(transform_matrix: np.ndarray) -> np.ndarray:
    """A ScanNet++ transforms.json ``transform_matrix`` [4,4] -> OpenCV c2w [4,4] in the mesh world."""
    m = np.asarray(transform_matrix, dtype=np.float64)
    assert m.shape == (4, 4), m.shape
    return opengl_to_opencv(NS_WORLD @ m)


def mesh_c2w_to_nerfstudio(c2w_cv: np.ndarray) -> np.ndarray:
    """Inverse of `nerfstudio_to_mesh_c2w` (what the ScanNet++ toolkit writes for an OpenCV c2w)."""
    return NS_WORLD @ opencv_to_opengl(c2w_cv)


# -- rotations -----------------------------------------------------------------------------------
def rotmat_to_qvec(R: np.ndarray) -> np.ndarray:
    """Rotation [3,3] -> unit quaternion (w, x, y, z) with w >= 0 (COLMAP's order)."""
    R = np.asarray(R, dtype=np.float64)
    K = np.array(
        [
            [R[0, 0] - R[1, 1] - R[2, 2], R[1, 0] + R[0, 1], R[2, 0] + R[0, 2], R[2, 1] - R[1, 2]],
            [R[1, 0] + R[0, 1], R[1, 1] - R[0, 0] - R[2, 2], R[2, 1] + R[1, 2], R[0, 2] - R[2, 0]],
            [R[2, 0] + R[0, 2], R[2, 1] + R[1, 2], R[2, 2] - R[0, 0] - R[1, 1], R[1, 0] - R[0, 1]],
            [R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1], R[0, 0] + R[1, 1] + R[2, 2]],
        ]
    ) / 3.0
    w, V = np.linalg.eigh(K)
    q = V[[3, 0, 1, 2], np.argmax(w)]
    return -q if q[0] < 0 else q


def qvec_to_rotmat(q: np.ndarray) -> np.ndarray:
    """Quaternion (w, x, y, z) -> rotation [3,3]."""
    w, x, y, z = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * y * y - 2 * z * z, 2 * x * y - 2 * w * z, 2 * x * z + 2 * w * y],
            [2 * x * y + 2 * w * z, 1 - 2 * x * x - 2 * z * z, 2 * y * z - 2 * w * x],
            [2 * x * z - 2 * w * y, 2 * y * z + 2 * w * x, 1 - 2 * x * x - 2 * y * y],
        ]
    )


# -- COLMAP text model ---------------------------------------------------------------------------
def write_colmap_images(path: Path, names: list[str], c2w_cv: list[np.ndarray]) -> None:
    """COLMAP ``images.txt``: one line per image (world-to-camera qvec/tvec) plus an empty points line."""
    lines = ["# Image list with two lines of data per image:", "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME", "#   POINTS2D[] as (X, Y, POINT3D_ID)"]
    for i, (name, c2w) in enumerate(zip(names, c2w_cv)):
        R = c2w[:3, :3].T
        t = -R @ c2w[:3, 3]
        q = rotmat_to_qvec(R)
        lines.append(f"{i + 1} " + " ".join(f"{v:.12f}" for v in (*q, *t)) + f" 1 {name}")
        lines.append("")
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_colmap_images(path: Path) -> dict[str, np.ndarray]:
    """COLMAP ``images.txt`` -> {image name (basename): OpenCV c2w [4,4]}."""
    out: dict[str, np.ndarray] = {}
    try:
        text = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SndError(f"cannot read COLMAP images file {path}: {e}", path=path) from e
    body = [ln for ln in text if not ln.startswith("#")]
    # Lines alternate: image line, points line (which may be empty).
    for k in range(0, len(body), 2):
        parts = body[k].split()
        if not parts:
            continue
        if len(parts) < 10:
            raise SndError(f"malformed line {k} in COLMAP images file {path}: {body[k][:80]!r}", path=path)
        try:
            q = np.array([float(v) for v in parts[1:5]])
            t = np.array([float(v) for v in parts[5:8]])
        except ValueError as e:
            raise SndError(f"malformed numbers in COLMAP images file {path}: {body[k][:80]!r}", path=path) from e
        R = qvec_to_rotmat(q)
        c2w = np.eye(4)
        c2w[:3, :3] = R.T
        c2w[:3, 3] = -R.T @ t
        out[Path(" ".join(parts[9:])).name] = c2w
    return out


# -- small I/O helpers ---------------------------------------------------------------------------
def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: str | Path, what: str, hint: str | None = None) -> Any:
    """Load a JSON file or raise an `SndError` naming it (missing / not JSON)."""
    p = Path(path)
    if not p.is_file():
        raise SndError(f"missing {what}: {p}", path=p, hint=hint)
    try:
        return json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SndError(f"malformed {what} {p}: {e}", path=p, hint=hint) from e


def read_list(path: str | Path, what: str) -> list[str]:
    """A text list (one name per line, blanks and '#' comments ignored) or an `SndError` naming it."""
    p = Path(path)
    if not p.is_file():
        raise SndError(f"missing {what}: {p}", path=p)
    try:
        lines = p.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SndError(f"cannot read {what} {p}: {e}", path=p) from e
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def frame_number(name: str) -> int:
    """The first run of digits in a frame name (``DSC01752.JPG`` -> 1752), -1 if none (SnD's rule)."""
    digits = ""
    for ch in Path(name).name:
        if ch.isdigit():
            digits += ch
        elif digits:
            break
    return int(digits) if digits else -1


def read_transform_frames(
    frames: list, tf_path: Path, image_dir: Path, to_name: Callable[[str], str]
) -> tuple[list[str], list[bool], list[np.ndarray]]:
    """Frames of a nerfstudio transforms file that have an image: (names, is_bad, OpenGL matrices [4, 4]).

    Sorted by frame number as SnD does; `to_name` maps a `file_path` entry to its name under `image_dir`.
    Both ScanNet++ layouts read their frame lists through this one function.
    """
    rows = []
    for fr in frames:
        try:
            name = to_name(str(fr["file_path"]))
            M = np.asarray(fr["transform_matrix"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as e:
            raise SndError(f"malformed frame entry in {tf_path}: {str(fr)[:120]}", path=tf_path) from e
        if M.shape != (4, 4):
            raise SndError(f"transform_matrix of {name} is not 4x4 in {tf_path}", path=tf_path)
        if (image_dir / name).is_file():
            rows.append((frame_number(name), name, M, bool(fr.get("is_bad", False))))
    if not rows:
        raise SndError(f"no frame of {tf_path} has an image in {image_dir}", path=tf_path)
    rows.sort(key=lambda r: (r[0], r[1]))
    return [r[1] for r in rows], [r[3] for r in rows], [r[2] for r in rows]
