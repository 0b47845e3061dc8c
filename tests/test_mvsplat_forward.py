"""MVSplat forward: fast paths vs upstream-literal references, geometry vs snd's camera math, and
output invariants (random weights; real weights do not change any of these properties)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from snd.data.camera import Camera, intrinsics, look_at
from snd.errors import SndError
from snd.models.mvsplat import MVSplatEncoder, gaussian_means, pixel_K_to_normalized
from snd.models.mvsplat.attention import window_attention
from snd.models.mvsplat.backbone import sine_position_embedding
from snd.models.mvsplat.depth import plane_sweep_correlation
from snd.models.mvsplat.geometry import plane_sweep_grid
from snd.models.mvsplat.reference import (
    add_position_reference,
    attention_block_reference,
    cost_volume_reference,
    gaussian_adapter_reference,
    window_attention_reference,
)
from snd.models.mvsplat.source import MVSplatSource, cameras_to_tensors
from snd.models.mvsplat.unet import AttentionBlock

H, W = 32, 48  # smallest size the ScanNet++ config allows (multiples of 16) that is not square
NEAR, FAR = 0.5, 20.0


# -- building blocks vs upstream formulations ------------------------------------------------------
@pytest.mark.parametrize("splits,shift", [(1, False), (2, False), (2, True), (3, True)])
def test_window_attention_matches_upstream_mask(splits: int, shift: bool) -> None:
    g = torch.Generator().manual_seed(splits * 2 + shift)
    q, k, v = (torch.randn(2, 12, 18, 8, generator=g) for _ in range(3))  # windows 6x9: odd widths too
    fast = window_attention(q, k, v, splits=splits, shift=shift)
    ref = window_attention_reference(q, k, v, splits=splits, shift=shift)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_position_embedding_matches_upstream() -> None:
    x = torch.randn(2, 16, 8, 12)
    pe = sine_position_embedding(4, 6, 16).repeat(2, 2, 1)  # one window, tiled over 2x2 windows
    torch.testing.assert_close(x + pe.permute(2, 0, 1), add_position_reference(x, 2), rtol=1e-6, atol=1e-6)


def test_unet_attention_block_matches_upstream() -> None:
    torch.manual_seed(0)
    blk = AttentionBlock(64, 32, num_views=2)
    torch.nn.init.normal_(blk.norm.weight)  # upstream zero-inits the post-norm: make it matter
    torch.nn.init.normal_(blk.norm.bias)
    x = torch.randn(4, 64, 3, 5)  # B=2 pairs, (b v) order
    torch.testing.assert_close(blk(x), attention_block_reference(blk, x), rtol=1e-5, atol=1e-5)


def test_cost_volume_matches_upstream() -> None:
    g = torch.Generator().manual_seed(1)
    B, C, h, w, D = 2, 8, 6, 10, 16
    feats = torch.randn(B, 2, C, h, w, generator=g)
    K = torch.tensor([[0.8, 0.0, 0.52], [0.0, 1.1, 0.47], [0.0, 0.0, 1.0]]).expand(B, 2, 3, 3)
    c2w = torch.stack([torch.stack([torch.from_numpy(c.c2w).float() for c in _pair_cameras(i)]) for i in range(B)])
    near, far = torch.tensor([[0.5, 0.5], [1.0, 1.0]]), torch.tensor([[10.0, 10.0], [50.0, 50.0]])
    ref = cost_volume_reference(feats, K, c2w, near, far, D).reshape(B * 2, D, h, w)
    for chunk in (1 << 30, 4 * B * 2 * C * h * w * 3):  # one chunk / chunks of 3 candidates
        fast, disp = plane_sweep_correlation(feats, K, c2w, near, far, D, chunk_bytes=chunk)
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)
    assert disp.shape == (B * 2, D) and torch.allclose(disp[2, [0, -1]], torch.tensor([1 / 50.0, 1.0]))
    assert (ref != 0).float().mean() > 0.3  # the views overlap: most candidates sample inside the image


def test_plane_sweep_grid_is_the_projection_of_back_projected_points() -> None:
    """Independent truth: snd Camera unproject/project (float64), different intrinsics per view."""
    h, w = 6, 10
    Kr, Ks = intrinsics(7.0, 8.0, 4.2, 2.9), intrinsics(9.0, 8.5, 5.1, 2.4)
    cr = Camera(Kr, look_at(np.array([0.0, 0.0, 0.0]), np.array([0.2, 5.0, 0.1])), h, w)
    cs = Camera(Ks, look_at(np.array([0.4, 0.1, 0.05]), np.array([0.0, 5.0, 0.0])), h, w)
    disp = torch.tensor([[0.5, 0.2, 0.1]])
    ref_to_src = torch.from_numpy(cs.w2c @ cr.c2w).float()[None]
    grid = plane_sweep_grid(torch.from_numpy(Kr).float()[None], torch.from_numpy(Ks).float()[None], ref_to_src, disp, h, w)
    for di, d in enumerate((2.0, 5.0, 10.0)):
        pts = cr.depth_to_points(np.full((h, w), d))
        uv, z = cs.project(pts)
        assert (z > 0).all()
        expect = np.stack([2 * uv[..., 0] / (w - 1) - 1, 2 * uv[..., 1] / (h - 1) - 1], -1)
        np.testing.assert_allclose(grid[0, di].numpy(), expect, rtol=1e-4, atol=1e-4)


# -- the whole encoder -----------------------------------------------------------------------------
def _pair_cameras(seed: int) -> tuple[Camera, Camera]:
    rng = np.random.default_rng(seed)
    K = intrinsics(38.0 + seed, 40.0, W / 2 - 0.5 + rng.normal(), H / 2 - 0.5 + rng.normal())
    eye = rng.normal(size=3)
    target = eye + np.array([0.0, 4.0, 0.0]) + rng.normal(size=3) * 0.3
    c0 = Camera(K, look_at(eye, target), H, W)
    c1 = Camera(K, look_at(eye + np.array([0.35, 0.05, 0.0]), target), H, W)
    return c0, c1


@pytest.fixture(scope="module")
def run() -> dict:
    """One ScanNet++-config encoder; a batch (pair, views-swapped pair), the pair alone, and the pair's
    raw network outputs (a second run: determinism)."""
    torch.manual_seed(0)
    enc = MVSplatEncoder("scannetpp").eval()
    c0, c1 = _pair_cameras(0)
    img = torch.rand(1, 2, 3, H, W, generator=torch.Generator().manual_seed(5))
    K, c2w = cameras_to_tensors([(c0, c1)], H, W)
    near, far = torch.full((1, 2), NEAR), torch.full((1, 2), FAR)
    sw = [1, 0]
    batch = enc(torch.cat([img, img[:, sw]]), torch.cat([K, K[:, sw]]), torch.cat([c2w, c2w[:, sw]]),
                torch.cat([near, near]), torch.cat([far, far]), with_covariances=True)
    single = enc(img, K, c2w, near, far)
    pred = enc._networks(img, K, c2w, near, far)
    return dict(enc=enc, cams=(c0, c1), img=img, K=K, c2w=c2w, batch=batch, single=single, pred=pred)


def test_shapes_and_determinism(run) -> None:
    b, s, p = run["batch"], run["single"], run["pred"]
    assert b.means.shape == (2, 2, H, W, 3) and b.quats.shape == (2, 2, H, W, 4) and b.scales.shape == (2, 2, H, W, 3)
    assert b.opacities.shape == (2, 2, H, W) and b.depth.shape == (2, 2, H, W) and b.offset_xy.shape == (2, 2, H, W, 2)
    assert b.covariances.shape == (2, 2, H, W, 3, 3) and s.covariances is None
    assert b.coarse_depth.shape == (2, 2, H // 4, W // 4)
    assert len(b.gaussians) == 2 and b.gaussians[1].shape == (2, H, W)
    assert torch.equal(b.gaussians[1].means, b.means[1])
    assert torch.equal(p.depth, s.depth) and torch.equal(p.density, s.opacities)  # deterministic re-run
    assert torch.equal(torch.sigmoid(p.raw[..., :2]) - 0.5, s.offset_xy)
    for f in ("means", "quats", "scales", "opacities", "depth", "offset_xy"):
        assert getattr(s, f).dtype == torch.float32 and torch.isfinite(getattr(s, f)).all(), f


def test_batch_items_independent_and_views_symmetric(run) -> None:
    """Batching must not mix pairs; swapping the two views must swap the outputs (the architecture is
    symmetric in its views), which catches view/batch index mix-ups in the (b v) plumbing."""
    b, s = run["batch"], run["single"]
    for f in ("depth", "means", "quats", "scales", "opacities"):
        x, one, swapped = getattr(b, f)[0], getattr(s, f)[0], getattr(b, f)[1].flip(0)
        torch.testing.assert_close(x, one, rtol=1e-4, atol=1e-4, msg=f)
        torch.testing.assert_close(x, swapped, rtol=1e-4, atol=1e-4, msg=f)


def test_gaussian_adapter_matches_upstream(run) -> None:
    p, b, enc = run["pred"], run["batch"], run["enc"]
    means, cov, opa = gaussian_adapter_reference(p.raw, p.depth, p.density, run["K"], run["c2w"],
                                                 scale_min=enc.cfg.gaussian_scale_min, scale_max=enc.cfg.gaussian_scale_max)
    torch.testing.assert_close(b.means[:1], means, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.covariances[:1], cov, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(b.opacities[:1], opa)


def test_invariants(run) -> None:
    b = run["batch"]
    cov = b.covariances.double()
    torch.testing.assert_close(cov, cov.transpose(-1, -2))
    assert (torch.linalg.eigvalsh(cov) > 0).all()
    assert ((b.opacities > 0) & (b.opacities < 1)).all()
    torch.testing.assert_close(b.quats.norm(dim=-1), torch.ones(2, 2, H, W))
    assert (b.quats[..., 0] >= 0).all() and (b.scales > 0).all()
    assert (b.depth >= NEAR * (1 - 1e-6)).all() and (b.depth <= FAR * (1 + 1e-6)).all()
    assert ((b.offset_xy > -0.5) & (b.offset_xy < 0.5)).all()
    # rebuilding means from (depth, offsets) is exact
    K = torch.cat([run["K"], run["K"][:, [1, 0]]])
    c2w = torch.cat([run["c2w"], run["c2w"][:, [1, 0]]])
    assert torch.equal(gaussian_means(b.depth, b.offset_xy, K, c2w), b.means)


def test_means_on_pixel_rays_in_snd_convention(run) -> None:
    """Independent truth: snd's Camera (pixel centres at integers) in float64. Each mean lies at
    distance `depth` from the camera centre, on the ray through pixel (x + off_x, y + off_y), in front."""
    s = run["single"]
    for v, cam in enumerate(run["cams"]):
        ys, xs = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
        uv = np.stack([xs, ys], -1) + s.offset_xy[0, v].double().numpy()
        d = cam.pixel_to_camera_dirs(uv)
        d = d / np.linalg.norm(d, axis=-1, keepdims=True)
        expect = cam.center + (d @ cam.c2w[:3, :3].T) * s.depth[0, v].double().numpy()[..., None]
        np.testing.assert_allclose(s.means[0, v].numpy(), expect, rtol=1e-4, atol=1e-4)
        _, z = cam.project(s.means[0, v].double().numpy())
        assert (z > 0).all()


def test_scales_follow_depth_and_pixel_footprint(run) -> None:
    """scale / depth / (0.1 (1/fx + 1/fy)) is the activated raw scale, in [0.5, 15]."""
    s, cam = run["single"], run["cams"][0]
    fx, fy = cam.K[0, 0], cam.K[1, 1]
    unit = s.scales[0, 0] / s.depth[0, 0, ..., None] / (0.1 * (1 / fx + 1 / fy))
    assert (unit > 0.5 - 1e-4).all() and (unit < 15.0 + 1e-4).all()


def test_size_and_input_errors() -> None:
    enc = MVSplatEncoder("re10k")
    K = torch.eye(3).expand(1, 2, 3, 3)
    c2w = torch.eye(4).expand(1, 2, 4, 4)
    with pytest.raises(SndError, match="divisible by 16"):
        enc(torch.rand(1, 2, 3, 40, 48), K, c2w, torch.ones(1, 2), torch.full((1, 2), 10.0))
    with pytest.raises(ValueError, match="precision"):
        enc(torch.rand(1, 2, 3, 32, 48), K, c2w, torch.ones(1, 2), torch.full((1, 2), 10.0), precision="int8")


def test_normalized_K_convention() -> None:
    """A centred camera (cx = W/2 - 0.5 in snd pixels) has normalised cx = 0.5, as MVSplat's datasets."""
    K = torch.tensor(intrinsics(50.0, 60.0, W / 2 - 0.5, H / 2 - 0.5)).float()
    Kn = pixel_K_to_normalized(K, H, W)
    torch.testing.assert_close(Kn, torch.tensor([[50 / W, 0, 0.5], [0, 60 / H, 0.5], [0, 0, 1.0]]))


def test_source_adapter_matches_encoder(run) -> None:
    src = MVSplatSource(None, "scannetpp", "cpu", "fp32")
    src.encoder.load_state_dict(run["enc"].state_dict())
    out = src.predict(run["img"], [run["cams"]], NEAR, FAR)
    assert torch.equal(out.means, run["single"].means)
    with pytest.raises(ValueError, match="Camera.scaled"):
        src.predict(run["img"], [tuple(c.scaled(H // 2, W // 2) for c in run["cams"])], NEAR, FAR)


# -- GPU -------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(run) -> None:
    enc = run["enc"]
    gpu = MVSplatEncoder("scannetpp").eval()
    gpu.load_state_dict(enc.state_dict())
    gpu = gpu.cuda()
    args = [t.cuda() for t in (run["img"], run["K"], run["c2w"])] + [torch.full((1, 2), NEAR, device="cuda"),
                                                                       torch.full((1, 2), FAR, device="cuda")]
    cpu = run["single"]
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        o32 = gpu(*args, precision="fp32")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev
    torch.testing.assert_close(o32.depth.cpu(), cpu.depth, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(o32.means.cpu(), cpu.means, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(o32.opacities.cpu(), cpu.opacities, rtol=1e-3, atol=1e-3)
    gpu.use_channels_last(True)
    for prec in ("bf16", "fp16"):
        o = gpu(*args, precision=prec)
        assert torch.isfinite(o.means).all() and torch.isfinite(o.scales).all()
        rel = ((o.depth.cpu() - cpu.depth).abs() / cpu.depth).median()
        assert rel < 0.05, (prec, float(rel))
        assert (o.opacities.cpu() - cpu.opacities).abs().median() < 0.05, prec


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compiled_matches_eager(run) -> None:
    """torch.compile of the networks (fused cost volume etc.) gives the eager bf16 result."""
    gpu = MVSplatEncoder("scannetpp").eval()
    gpu.load_state_dict(run["enc"].state_dict())
    gpu = gpu.cuda().use_channels_last(True)
    args = [t.cuda() for t in (run["img"], run["K"], run["c2w"])] + [torch.full((1, 2), NEAR, device="cuda"),
                                                                       torch.full((1, 2), FAR, device="cuda")]
    eager = gpu(*args, precision="bf16")
    gpu.compile_networks(dynamic=False)
    comp = gpu(*args, precision="bf16")
    rel = ((comp.depth - eager.depth).abs() / eager.depth).median()
    assert rel < 0.02, float(rel)
    assert (comp.opacities - eager.opacities).abs().median() < 0.02
