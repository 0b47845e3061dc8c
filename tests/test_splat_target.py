"""From context features to the loss target (snd.splat.target, snd.splat.from_depth) on scenes with known geometry."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from snd.data.camera import Camera, intrinsics, look_at
from snd.splat.from_depth import gaussians_from_depth, unproject_depth
from snd.splat.inputs import SplatInput
from snd.splat.render import render_features
from snd.splat.target import target_features
from snd.splat.upsample import upsample_features

H, W = 48, 64


def _planes_scene(eyes: list[tuple[float, float, float]]) -> tuple[list[Camera], np.ndarray, np.ndarray]:
    """A floor (z = 0, 2 m tiles), a back wall (y = 4, 2 m columns) and a floating panel (y = 2) in front.

    Returns (cameras, z-depth [V, H, W] from exact ray/plane hits, instance ids [V, H, W]).
    """
    K = intrinsics(45.0, 45.0, (W - 1) / 2, (H - 1) / 2)
    cams = [Camera(K=K, c2w=look_at(np.array(e), np.array([0.0, 3.0, 0.6])), height=H, width=W) for e in eyes]
    depths, ids = [], []
    for cam in cams:
        o, d = cam.rays()  # d has camera z = 1, so the ray parameter is the z-depth
        best_t = np.full((H, W), np.inf)
        best_id = np.zeros((H, W), dtype=np.int64)

        def hit(t, pts, ok, lab):
            nonlocal best_t, best_id
            ok = ok & (t > 1e-6) & (t < best_t)
            best_t = np.where(ok, t, best_t)
            best_id = np.where(ok, lab, best_id)

        with np.errstate(divide="ignore", invalid="ignore"):
            t = -o[..., 2] / d[..., 2]  # floor z = 0
            p = o + t[..., None] * d
            hit(t, p, np.abs(p[..., 0]) < 3, 1 + np.floor(p[..., 0] / 2 + 2) + 10 * np.clip(np.floor(p[..., 1] / 2), -1, 8))
            t = (4.0 - o[..., 1]) / d[..., 1]  # wall y = 4
            p = o + t[..., None] * d
            hit(t, p, (np.abs(p[..., 0]) < 3) & (p[..., 2] < 3), 200 + np.floor(p[..., 0] / 2 + 2))
            t = (2.0 - o[..., 1]) / d[..., 1]  # panel y = 2, |x| < 0.5, 0.3 < z < 1.1
            p = o + t[..., None] * d
            hit(t, p, (np.abs(p[..., 0]) < 0.5) & (p[..., 2] > 0.3) & (p[..., 2] < 1.1), 300)
        depths.append(np.where(np.isfinite(best_t), best_t, 0.0))
        ids.append(best_id)
    return cams, np.stack(depths).astype(np.float32), np.stack(ids).astype(np.int64)


@pytest.fixture(scope="module")
def scene():
    cams, depth, ids = _planes_scene([(-0.35, -1.0, 1.3), (0.0, -1.0, 1.35), (0.35, -1.0, 1.3)])
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    return {
        "K": torch.stack([t(c.K) for c in cams]), "c2w": torch.stack([t(c.c2w) for c in cams]),
        "w2c": torch.stack([t(c.w2c) for c in cams]), "depth": t(depth), "ids": torch.as_tensor(ids),
    }


def test_gaussians_from_depth_geometry(scene):
    g = gaussians_from_depth(scene["depth"][:1], scene["K"][:1], scene["c2w"][:1], scale_mult=0.5, opacity=0.8)
    cam_pts = unproject_depth(scene["depth"][:1], scene["K"][:1], scene["c2w"][:1])
    torch.testing.assert_close(g.means, cam_pts)
    # the mean projects back onto its own pixel at its own depth
    w2c = scene["w2c"][0]
    pc = g.means[0] @ w2c[:3, :3].T + w2c[:3, 3]
    uv = pc @ scene["K"][0].T
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    valid = scene["depth"][0] > 0
    torch.testing.assert_close((uv[..., 0] / uv[..., 2])[valid], xs[valid], atol=1e-3, rtol=0)
    torch.testing.assert_close((uv[..., 1] / uv[..., 2])[valid], ys[valid], atol=1e-3, rtol=0)
    torch.testing.assert_close(pc[..., 2][valid], scene["depth"][0][valid], atol=1e-4, rtol=1e-5)
    # std = 0.5 * depth / focal, isotropic; invalid pixels are transparent
    torch.testing.assert_close(g.scales[0, ..., 0][valid], 0.5 * scene["depth"][0][valid] / 45.0)
    assert torch.equal(g.scales[..., 0], g.scales[..., 2])
    assert torch.equal(g.opacities[0] > 0, valid) and g.opacities.max() == pytest.approx(0.8)
    assert (~valid).any()  # the scene has sky pixels, so the invalid branch is exercised


def _ctx_target(scene):
    ctx = [0, 2]
    g = gaussians_from_depth(scene["depth"][ctx], scene["K"][ctx], scene["c2w"][ctx])
    return ctx, g


def test_world_coordinates_reproduce_target(scene):
    """Splat each context pixel's true world xyz into the middle view: it must land where the target sees it."""
    ctx, g = _ctx_target(scene)
    xyz = unproject_depth(scene["depth"][ctx], scene["K"][ctx], scene["c2w"][ctx])  # [2, H, W, 3]
    means, quats, scales, opac = g.flatten()
    img, alpha = render_features(SplatInput(means, quats, scales, opac, scene["K"][1], scene["w2c"][1], H, W),
                                 xyz.reshape(-1, 3), backend="torch")
    tgt_xyz = unproject_depth(scene["depth"][1:2], scene["K"][1:2], scene["c2w"][1:2])[0]  # [H, W, 3]
    covered = (alpha > 0.5) & (scene["depth"][1] > 0)
    assert covered.float().mean() > 0.85
    got = (img / alpha.clamp_min(1e-6)).permute(1, 2, 0)  # [H, W, 3] composited world point
    err = (got - tgt_xyz).norm(dim=-1)[covered]  # metres
    px_err = _reprojection_error(got, scene["K"][1], scene["w2c"][1])[covered]  # target pixels
    print(f"world-xyz splat: reprojection error median {px_err.median().item():.3f} px, 90% "
          f"{px_err.quantile(0.9).item():.3f} px; metric median {err.median().item() * 100:.2f} cm "
          f"(scene depth 2-5 m); covered {covered.float().mean().item():.3f}")
    # splatting sorts whole Gaussians by depth, so nearer neighbours bias a pixel by ~1 px (see from_depth)
    assert px_err.median() < 1.25
    assert px_err.quantile(0.9) < 2.0
    assert err.median() < 0.05 * scene["depth"][1][covered].median()
    # the unnormalised render composites to alpha ~ 1 on surfaces
    assert alpha[covered].median() > 0.99


def _reprojection_error(points: torch.Tensor, K: torch.Tensor, w2c: torch.Tensor) -> torch.Tensor:
    """Distance [H, W] in pixels between where world points [H, W, 3] project and the pixel that shows them."""
    pc = points @ w2c[:3, :3].T + w2c[:3, 3]
    uv = pc @ K.T
    uv = uv[..., :2] / uv[..., 2:3]
    Hh, Ww = points.shape[:2]
    ys, xs = torch.meshgrid(torch.arange(Hh, dtype=torch.float32), torch.arange(Ww, dtype=torch.float32), indexing="ij")
    return ((uv[..., 0] - xs) ** 2 + (uv[..., 1] - ys) ** 2).sqrt()


def _onehots(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    labels, inv = torch.unique(ids, return_inverse=True)
    return labels, F.one_hot(inv, len(labels)).permute(0, 3, 1, 2).float()  # [V, L, H, W]


def _interior(mask: torch.Tensor, r: int = 2) -> torch.Tensor:
    """Pixels [H, W] with no other label within r pixels (splatting moves edges by ~1 px, see from_depth)."""
    same = torch.ones_like(mask, dtype=torch.bool)
    pad = F.pad(mask[None, None].float(), (r, r, r, r), mode="replicate")[0, 0]
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            same &= pad[dy:dy + mask.shape[0], dx:dx + mask.shape[1]] == mask
    return same


def test_instance_onehots_match_target_mask(scene):
    ctx, g = _ctx_target(scene)
    labels, oh = _onehots(scene["ids"])
    feats, valid = target_features(oh[ctx], g, scene["ids"][ctx], scene["ids"][1], scene["K"][1], scene["w2c"][1],
                                   (H, W), upsample="bilinear", blend=False, backend="torch")
    assert feats.shape == (len(labels), H, W) and valid.shape == (H, W)
    ok = labels[feats.argmax(0)] == scene["ids"][1]
    inner = valid & _interior(scene["ids"][1])
    agree, agree_in = ok[valid].float().mean().item(), ok[inner].float().mean().item()
    print(f"instance one-hots: agreement {agree:.4f} on {valid.float().mean().item():.3f} of the target, "
          f"{agree_in:.4f} away from label edges")
    assert valid.float().mean() > 0.85
    assert agree > 0.85  # 48x64 pixels: a quarter of them sit on a label edge
    assert agree_in > 0.99


@pytest.mark.parametrize("protocol", ["official", "snd"])
def test_mask_aware_upsampling_on_scene_masks(scene, protocol):
    """Patch-grid one-hots (h = H/4) of the real scene masks: mask-aware keeps instance edges, bilinear blurs them;
    both still give a usable splatted target. Patch one-hots: the labels at the protocol's label rows/cols
    (official: corners) or the area average of each patch (snd: patch-centred grid)."""
    from snd.splat.upsample import patch_labels

    ctx, g = _ctx_target(scene)
    labels, oh = _onehots(scene["ids"])
    grid = "corners" if protocol == "official" else "centres"
    if protocol == "official":
        lab = torch.searchsorted(labels, patch_labels(scene["ids"], H // 4, W // 4, grid))
        patch = F.one_hot(lab, len(labels)).permute(0, 3, 1, 2).float()
    else:
        patch = F.interpolate(oh, size=(H // 4, W // 4), mode="area")  # [3, L, h, w] soft patch labels
    fb = "zero" if protocol == "official" else "bilinear"
    up = {m: upsample_features(patch, scene["ids"], mode=m, grid=grid, fallback=fb) for m in ("mask", "bilinear")}
    hit = up["mask"].sum(1) > 0.5  # official: pixels with no matching neighbour are 0 (no label)
    agree = {m: (labels[u.argmax(1)] == scene["ids"])[hit].float().mean().item() for m, u in up.items()}
    print(f"{protocol}: upsampled patch one-hots vs masks: mask-aware {agree['mask']:.4f}, bilinear {agree['bilinear']:.4f}"
          f" on {hit.float().mean().item():.3f} of the pixels")
    assert hit.float().mean() > 0.97
    assert agree["mask"] > 0.985 and agree["mask"] > agree["bilinear"] + 0.01
    feats, valid = target_features(patch[ctx], g, scene["ids"][ctx], scene["ids"][1], scene["K"][1], scene["w2c"][1],
                                   (H, W), upsample="mask", blend=False, backend="torch", protocol=protocol)
    ok = labels[feats.argmax(0)] == scene["ids"][1]
    assert ok[valid & _interior(scene["ids"][1])].float().mean() > 0.98


@pytest.mark.parametrize("protocol", ["official", "snd"])
def test_blend_and_downsample_rules(scene, protocol):
    """target_features == render -> blend -> bilinear resize, valid from the coverage. Official: uncovered =
    no contribution (render exactly 0), means over all pixels, uncovered mask resized nearest, >= 0.5;
    snd: covered = alpha > 0.5, means over covered pixels, bilinear coverage >= 0.5."""
    from snd.splat.blend import semantic_blend

    ctx, g = _ctx_target(scene)
    gen = torch.Generator().manual_seed(0)
    pf = torch.randn(2, 6, H, W, generator=gen)
    feats, valid = target_features(pf, g, scene["ids"][ctx], scene["ids"][1], scene["K"][1], scene["w2c"][1],
                                   (12, 16), upsample="bilinear", blend=True, backend="torch", protocol=protocol)
    means, quats, scales, opac = g.flatten()
    img, alpha = render_features(SplatInput(means, quats, scales, opac, scene["K"][1], scene["w2c"][1], H, W),
                                 pf.permute(0, 2, 3, 1).reshape(-1, 6), backend="torch")
    if protocol == "official":
        unc = (img == 0).all(0)  # the official test: the render is exactly 0 in every channel
        assert torch.equal(unc, alpha == 0) and unc.any()
        blended = semantic_blend(img, scene["ids"][1])
        ref_valid = ~(F.interpolate(unc.float()[None, None], size=(12, 16), mode="nearest")[0, 0] >= 0.5)
    else:
        cov = alpha > 0.5
        blended = semantic_blend(img, scene["ids"][1], valid=cov)
        ref_valid = F.interpolate(cov.float()[None, None], size=(12, 16), mode="bilinear", align_corners=False)[0, 0] >= 0.5
    ref = F.interpolate(blended[None], size=(12, 16), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(feats, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(valid, ref_valid) and valid.any() and not valid.all()


def test_coverage_to_patches_hand_computed():
    """4 x 6 pixel coverage -> 2 x 3 patches. Nearest (official) reads pixel rows floor(i * 4/2) = 0, 2 and
    cols 0, 2, 4; bilinear (snd, align_corners=False, 2x) averages each 2 x 2 block, kept at >= 0.5."""
    from snd.splat.protocol import rules
    from snd.splat.target import coverage_to_patches

    cov = torch.tensor([[1, 0, 1, 1, 0, 0],
                        [0, 0, 1, 1, 0, 1],
                        [0, 1, 0, 0, 1, 1],
                        [1, 1, 0, 0, 1, 1]], dtype=torch.bool)
    assert coverage_to_patches(cov, (2, 3), rules("official")).tolist() == [[True, True, False], [False, False, True]]
    # block means .25, 1, .25 / .75, 0, 1
    assert coverage_to_patches(cov, (2, 3), rules("snd")).tolist() == [[False, True, False], [True, False, True]]


def test_chunked_equals_unchunked(scene):
    ctx, g = _ctx_target(scene)
    pf = torch.randn(2, 7, 12, 16, generator=torch.Generator().manual_seed(1))
    args = (pf, g, scene["ids"][ctx], scene["ids"][1], scene["K"][1], scene["w2c"][1], (6, 8))
    a, va = target_features(*args, channel_chunk=None, backend="torch")
    b, vb = target_features(*args, channel_chunk=3, backend="torch")
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert torch.equal(va, vb)


def test_synth_scene_true_depth(synth_root, tmp_path):
    """The data helper's procedural scenes: splat instance one-hots from two true-depth scaffolds into a view between."""
    from snd.data import open_dataset

    ds = open_dataset(synth_root, cache_dir=tmp_path)  # the fixture is read-only: keep ray-cast caches out of it
    name = ds.scene_names("distill")[0] if ds.scene_names("distill") else ds.scene_names("train")[0]
    sc = ds.scene(name)
    ctx, tgt = (4, 8), 6
    cams = [sc.camera(i) for i in (*ctx, tgt)]
    Hs, Ws = cams[0].height, cams[0].width
    depth = torch.stack([torch.as_tensor(sc.depth(i)) for i in ctx])
    K = torch.stack([torch.as_tensor(c.K, dtype=torch.float32) for c in cams[:2]])
    c2w = torch.stack([torch.as_tensor(c.c2w, dtype=torch.float32) for c in cams[:2]])
    g = gaussians_from_depth(depth, K, c2w)
    masks = torch.stack([torch.as_tensor(sc.instance_mask(i)).long() for i in (*ctx, tgt)])
    labels, oh = _onehots(masks)
    # world xyz check against the target's own depth
    xyz = unproject_depth(depth, K, c2w)
    means, quats, scales, opac = g.flatten()
    tK = torch.as_tensor(cams[2].K, dtype=torch.float32)
    tw2c = torch.as_tensor(cams[2].w2c, dtype=torch.float32)
    img, alpha = render_features(SplatInput(means, quats, scales, opac, tK, tw2c, Hs, Ws), xyz.reshape(-1, 3),
                                 backend="torch")
    tdepth = torch.as_tensor(sc.depth(tgt))
    txyz = unproject_depth(tdepth[None], tK[None], torch.as_tensor(cams[2].c2w, dtype=torch.float32)[None])[0]
    covered = (alpha > 0.5) & (tdepth > 0)
    got = (img / alpha.clamp_min(1e-6)).permute(1, 2, 0)
    err = (got - txyz).norm(dim=-1)[covered]
    px_err = _reprojection_error(got, tK, tw2c)[covered]
    scale = (txyz[covered] - txyz[covered].mean(0)).norm(dim=-1).median()
    print(f"synth scene {name}: covered {covered.float().mean().item():.3f}, reprojection error median "
          f"{px_err.median().item():.3f} px, 90% {px_err.quantile(0.9).item():.3f} px; metric median "
          f"{err.median().item() * 100:.2f} cm vs scene scale {scale.item():.2f} m")
    assert covered.float().mean() > 0.5
    assert px_err.median() < 1.25
    assert err.median() < 0.03 * scale
    feats, valid = target_features(oh[:2], g, masks[:2], masks[2], tK, tw2c, (Hs, Ws), upsample="bilinear",
                                   blend=False, backend="torch")
    ok = labels[feats.argmax(0)] == masks[2]
    agree, agree_in = ok[valid].float().mean(), ok[valid & _interior(masks[2])].float().mean()
    print(f"synth scene {name}: instance agreement {agree.item():.4f}, away from edges {agree_in.item():.4f}")
    assert agree > 0.85
    assert agree_in > 0.98


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA + gsplat")
@pytest.mark.parametrize("protocol", ["official", "snd"])
def test_target_features_gsplat_matches_torch(scene, protocol):
    """Both backends under each coverage rule (official: any contribution, nearest; snd: alpha > 0.5)."""
    pytest.importorskip("gsplat")
    ctx, g = _ctx_target(scene)
    dev = torch.device("cuda")
    pf = torch.randn(2, 40, 12, 16, generator=torch.Generator().manual_seed(2)).to(dev)
    args = (pf, g.to(dev), scene["ids"][ctx].to(dev), scene["ids"][1].to(dev), scene["K"][1].to(dev),
            scene["w2c"][1].to(dev), (12, 16))
    a, va = target_features(*args, backend="gsplat", protocol=protocol)
    b, vb = target_features(*args, backend="torch", protocol=protocol)
    rel = ((a - b).norm() / b.norm()).item()
    print(f"{protocol}: target_features gsplat vs torch: rel. L2 error {rel:.2e}, valid agree {(va == vb).float().mean().item():.4f}")
    assert rel < 1e-3
    assert (va == vb).float().mean() > 0.99
