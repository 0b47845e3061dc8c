"""Ray casting against analytic geometry: planes, boxes (slab test), sphere silhouettes, backends agree."""
import numpy as np
import pytest

from snd.data.camera import Camera, intrinsics, look_at
from snd.data.raycast import MeshRaycaster, embree_available, face_labels_from_vertices, lookup, trimesh_available
from snd.data.synth_geometry import box_part, sphere_part


def _cam(eye, target, h=48, w=64, f=50.0):
    return Camera(K=intrinsics(f, f, (w - 1) / 2, (h - 1) / 2), c2w=look_at(np.asarray(eye, float), np.asarray(target, float)), height=h, width=w)


def _quad(center, u, v):
    c, u, v = (np.asarray(a, float) for a in (center, u, v))
    verts = np.array([c - u - v, c + u - v, c + u + v, c - u + v])
    return verts, np.array([[0, 1, 2], [0, 2, 3]])


def test_plane_depth_is_analytic():
    # a tilted plane through p0 with normal n, seen obliquely
    n = np.array([0.2, -0.3, 1.0])
    n /= np.linalg.norm(n)
    p0 = np.array([0.1, 0.2, 0.0])
    u = np.cross(n, [1.0, 0, 0])
    u /= np.linalg.norm(u)
    v = np.cross(n, u)
    verts, faces = _quad(p0, 50 * u, 50 * v)
    cam = _cam([1.0, -2.0, 3.0], [0.3, 0.5, 0.0])
    hits = MeshRaycaster(verts, faces).cast(cam)
    o, d = cam.rays()
    t = (n @ p0 - o @ n) / (d @ n)  # d has unit camera z, so t is the z-depth
    assert hits.hit.all()
    np.testing.assert_allclose(hits.depth, t, rtol=1e-6)
    # the hit points lie on the plane
    np.testing.assert_allclose((hits.points - p0) @ n, 0, atol=1e-9)


def _slab(o, d, lo, hi):
    """Analytic ray / axis-aligned box entry parameter (inf on a miss)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (lo - o) / d, (hi - o) / d
    tmin = np.nanmax(np.minimum(t1, t2), axis=-1)
    tmax = np.nanmin(np.maximum(t1, t2), axis=-1)
    return np.where((tmax >= tmin) & (tmin > 0), tmin, np.inf)


def test_box_depth_matches_slab_intersection():
    size = np.array([0.8, 0.5, 0.6])
    part = box_part((0.2, -0.1), size, yaw=0.0)  # axis-aligned box standing on z = 0
    lo = np.array([0.2, -0.1, 0.0]) - [0.4, 0.25, 0.0]
    hi = lo + size
    cam = _cam([1.4, 1.0, 1.2], [0.2, -0.1, 0.3], h=60, w=80, f=60.0)
    hits = MeshRaycaster(part.vertices, part.faces).cast(cam)
    o, d = cam.rays()
    t = _slab(o, d, lo, hi)
    ana = np.isfinite(t)
    assert ana.sum() > 500  # the box fills a good part of the view
    agree = ana == hits.hit
    assert agree.mean() > 0.995  # only rays grazing an edge may disagree
    both = ana & hits.hit
    np.testing.assert_allclose(hits.depth[both], t[both], rtol=1e-3)
    assert np.abs(hits.depth[both] / t[both] - 1).max() < 1e-5


def test_sphere_instance_mask_is_the_projected_disk():
    r, c = 0.5, np.array([0.0, 0.0, 0.5])
    sph = sphere_part(c, r)
    wall_v, wall_f = _quad([-3.0, 0.0, 0.5], [0, 10.0, 0], [0, 0, 10.0])  # a wall behind the sphere
    verts = np.concatenate([wall_v, sph.vertices])
    faces = np.concatenate([wall_f, sph.faces + len(wall_v)])
    vlab = np.concatenate([np.full(len(wall_v), 1), np.full(len(sph.vertices), 2)])
    cam = _cam([2.5, 0.7, 1.2], c, h=64, w=80, f=60.0)
    hits = MeshRaycaster(verts, faces).cast(cam)
    inst = lookup(hits.face, face_labels_from_vertices(faces, vlab))
    o, d = cam.rays()
    du = d / np.linalg.norm(d, axis=-1, keepdims=True)
    w = c - o
    dist = np.linalg.norm(w - (w * du).sum(-1, keepdims=True) * du, axis=-1)  # ray-to-centre distance
    inside, outside = dist < 0.99 * r, dist > r  # the icosphere lies between radius 0.9955 r and r
    assert inside.sum() > 200
    assert (inst[inside] == 2).all()
    assert (inst[outside] != 2).all()
    assert (inst[outside] == 1).all()  # the wall fills the rest


@pytest.mark.parametrize("backend", ["embree", "trimesh"])
def test_fast_backends_match_brute_force_reference(backend):
    if backend == "embree" and not embree_available():
        pytest.skip("embreex not installed")
    if backend == "trimesh" and not trimesh_available():
        pytest.skip("trimesh's intersector needs rtree, which is not installed")
    rng = np.random.default_rng(0)
    parts = [box_part(rng.uniform(-1, 1, 2), rng.uniform(0.3, 0.8, 3), rng.uniform(0, 3)) for _ in range(3)]
    parts.append(sphere_part([0.0, 0.0, 1.5], 0.4, subdivisions=2))
    verts, faces, off = [], [], 0
    for p in parts:
        verts.append(p.vertices)
        faces.append(p.faces + off)
        off += len(p.vertices)
    verts, faces = np.concatenate(verts), np.concatenate(faces)
    cam = _cam([3.0, 2.0, 2.0], [0.0, 0.0, 0.5], h=24, w=32, f=25.0)
    fast = MeshRaycaster(verts, faces, backend=backend).cast(cam)
    ref = MeshRaycaster(verts, faces, backend="reference").cast(cam)
    same = fast.face == ref.face
    assert same.mean() > 0.99  # ties on shared edges may pick either face
    np.testing.assert_allclose(fast.depth[fast.hit & ref.hit], ref.depth[fast.hit & ref.hit], rtol=1e-4)


def test_face_labels_majority_vote():
    faces = np.array([[0, 1, 2], [0, 3, 4], [5, 0, 3]])
    vlab = np.array([7, 7, 9, 9, 9, 1])
    np.testing.assert_array_equal(face_labels_from_vertices(faces, vlab), [7, 9, 1])


def test_bad_backend_name_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        MeshRaycaster(np.zeros((3, 3)), np.array([[0, 1, 2]]), backend="optix")
