"""Camera conventions: analytic projections, world->pixel->world round trips, GL<->CV flips, resizing."""
import numpy as np
import pytest

from snd.data.camera import Camera, intrinsics, look_at, opencv_to_opengl, opengl_to_opencv


def _cam(seed=0):
    rng = np.random.default_rng(seed)
    eye = rng.normal(size=3)
    c2w = look_at(eye, eye + np.array([1.0, 0.3, -0.2]))
    return Camera(K=intrinsics(200.0, 210.0, 79.5, 59.5), c2w=c2w, height=120, width=160)


def test_identity_projection_is_analytic():
    cam = Camera(K=intrinsics(100.0, 100.0, 50.0, 40.0), c2w=np.eye(4), height=80, width=100)
    uv, z = cam.project(np.array([[0.2, -0.1, 2.0]]))
    np.testing.assert_allclose(uv[0], [50 + 100 * 0.1, 40 - 100 * 0.05])
    np.testing.assert_allclose(z, [2.0])


def test_round_trip_world_pixel_world():
    cam = _cam(1)
    rng = np.random.default_rng(2)
    uv = rng.uniform([0, 0], [cam.width, cam.height], size=(500, 2))
    depth = rng.uniform(0.5, 20.0, size=500)
    pts = cam.unproject(uv, depth)
    uv2, z2 = cam.project(pts)
    np.testing.assert_allclose(uv2, uv, atol=1e-5)
    np.testing.assert_allclose(z2, depth, rtol=1e-9, atol=1e-5)


def test_gl_cv_flip_is_involution_and_keeps_centre():
    cam = _cam(3)
    gl = opencv_to_opengl(cam.c2w)
    np.testing.assert_allclose(opengl_to_opencv(gl), cam.c2w)
    np.testing.assert_allclose(gl[:3, 3], cam.c2w[:3, 3])
    # OpenGL looks down -z: the OpenCV forward axis is minus the GL z axis.
    np.testing.assert_allclose(gl[:3, 2], -cam.c2w[:3, 2])


def test_look_at_points_forward():
    c2w = look_at(np.zeros(3), np.array([0.0, 5.0, 0.0]))
    cam = Camera(K=intrinsics(50, 50, 31.5, 23.5), c2w=c2w, height=48, width=64)
    uv, z = cam.project(np.array([[0.0, 5.0, 0.0]]))
    np.testing.assert_allclose(uv[0], [31.5, 23.5], atol=1e-9)
    assert z[0] == pytest.approx(5.0)
    # world up (+z) must appear above the centre (smaller v) in an OpenCV image
    uv_up, _ = cam.project(np.array([[0.0, 5.0, 1.0]]))
    assert uv_up[0, 1] < 23.5


def test_scaled_keeps_pixel_edges():
    cam = _cam(4)
    half = cam.scaled(60, 80)
    # the outer corner of the image (-0.5, -0.5) maps to the same ray
    p = cam.unproject(np.array([[-0.5, -0.5]]), np.array([3.0]))
    uv, _ = half.project(p)
    np.testing.assert_allclose(uv[0], [-0.5, -0.5], atol=1e-9)
    p = cam.unproject(np.array([[cam.width - 0.5, cam.height - 0.5]]), np.array([3.0]))
    uv, _ = half.project(p)
    np.testing.assert_allclose(uv[0], [half.width - 0.5, half.height - 0.5], atol=1e-9)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="K must be"):
        Camera(K=np.eye(4), c2w=np.eye(4), height=2, width=2)


def test_normalized_K_maps_pixel_centres_to_unit_square():
    cam = _cam(5)
    Kn = cam.normalized_K()
    # pixel centre (0, 0) -> normalised (0.5/W, 0.5/H); centre (W-1, H-1) -> (1 - 0.5/W, 1 - 0.5/H)
    for u, v in [(0, 0), (cam.width - 1, cam.height - 1)]:
        d = cam.pixel_to_camera_dirs(np.array([u, v], dtype=float))
        n = Kn @ d
        np.testing.assert_allclose(n[:2], [(u + 0.5) / cam.width, (v + 0.5) / cam.height], atol=1e-12)
