"""Feature rendering backends (snd.splat.render*): torch vs brute force on CPU, gsplat vs torch on GPU."""
from __future__ import annotations

import pytest
import torch

from snd.splat.inputs import SplatInput
from snd.splat.render import render_features, resolve_backend
from snd.splat.render_reference import render_reference
from snd.splat.render_torch import build_plan, render_torch


def _random_scene(N: int, C: int, seed: int, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(N, 3, generator=g) * torch.tensor([0.6, 0.45, 0.5]) + torch.tensor([0.0, 0.0, 3.0])
    quats = torch.randn(N, 4, generator=g)
    scales = torch.rand(N, 3, generator=g) * 0.15 + 0.01
    opac = torch.rand(N, generator=g) * 0.95 + 0.02
    feats = torch.randn(N, C, generator=g)
    K = torch.tensor([[22.0, 0.0, 9.3], [0.0, 21.0, 6.8], [0.0, 0.0, 1.0]])
    a = 0.2
    w2c = torch.eye(4)
    w2c[:3, :3] = torch.tensor([[1.0, 0.0, 0.0], [0.0, torch.cos(torch.tensor(a)), -torch.sin(torch.tensor(a))],
                                [0.0, torch.sin(torch.tensor(a)), torch.cos(torch.tensor(a))]])
    w2c[:3, 3] = torch.tensor([0.1, 0.4, 0.2])
    return [t.to(device) for t in (means, quats, scales, opac, feats, K, w2c)]


@pytest.mark.parametrize("seed", [0, 1])
def test_torch_equals_bruteforce(seed):
    means, quats, scales, opac, feats, K, w2c = _random_scene(40, 3, seed)
    # one Gaussian behind the near plane and one fully transparent: both must be culled
    means[0, 2] = -1.0
    opac[1] = 0.001
    H, W = 13, 19
    img, alpha = render_torch(SplatInput(means, quats, scales, opac, K, w2c, H, W), feats)
    ref_img, ref_alpha = render_reference(SplatInput(means, quats, scales, opac, K, w2c, H, W), feats)
    assert img.shape == (3, H, W) and alpha.shape == (H, W)
    assert ref_alpha.max() > 0.9 and (ref_alpha < 0.5).any()  # a scene with both opaque and empty pixels
    torch.testing.assert_close(alpha.double(), ref_alpha, atol=2e-5, rtol=0)
    torch.testing.assert_close(img.double(), ref_img, atol=2e-5, rtol=0)


def test_early_stop_and_clamp():
    """A stack of identical opaque Gaussians: alpha clamps at 0.999 and the pixel stops after T <= 1e-4."""
    N = 5
    means = torch.tensor([[0.0, 0.0, 2.0 + 0.1 * i] for i in range(N)])
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(N, 1)
    scales = torch.full((N, 3), 0.5)
    opac = torch.ones(N)
    feats = torch.arange(1.0, N + 1)[:, None]
    K = torch.tensor([[10.0, 0.0, 2.0], [0.0, 10.0, 2.0], [0.0, 0.0, 1.0]])
    img, alpha = render_torch(SplatInput(means, quats, scales, opac, K, torch.eye(4), 5, 5), feats)
    # centre pixel (2, 2) sits at the projected mean: alpha_1 = 0.999, T after = 1e-3;
    # the second would give T = 1e-6 <= 1e-4, so it is excluded: colour = 0.999 * 1, alpha = 0.999
    assert img[0, 2, 2].item() == pytest.approx(0.999, abs=1e-6)
    assert alpha[2, 2].item() == pytest.approx(0.999, abs=1e-6)
    ref_img, ref_alpha = render_reference(SplatInput(means, quats, scales, opac, K, torch.eye(4), 5, 5), feats)
    torch.testing.assert_close(img.double(), ref_img, atol=1e-6, rtol=0)


def test_pixel_centre_convention():
    """One small Gaussian projected exactly onto pixel (row 3, col 5) peaks there and is symmetric."""
    K = torch.tensor([[50.0, 0.0, 5.0], [0.0, 50.0, 3.0], [0.0, 0.0, 1.0]])
    means = torch.tensor([[0.0, 0.0, 5.0]])  # projects to (cx, cy) = (5, 3)
    img, alpha = render_torch(SplatInput(means, torch.tensor([[1.0, 0, 0, 0]]), torch.full((1, 3), 0.1),
                                         torch.tensor([0.9]), K, torch.eye(4), 7, 11), torch.ones(1, 1))
    assert divmod(int(alpha.argmax()), 11) == (3, 5)
    torch.testing.assert_close(alpha[3, 4], alpha[3, 6])
    torch.testing.assert_close(alpha[2, 5], alpha[4, 5])


def test_banded_plan_equals_single_band():
    means, quats, scales, opac, feats, K, w2c = _random_scene(300, 5, 7)
    inp = SplatInput(means, quats, scales, opac, K, w2c, 15, 21)
    a_img, a_alpha = render_torch(inp, feats, max_pairs=1 << 30)
    b_img, b_alpha = render_torch(inp, feats, max_pairs=200, channel_chunk=2)
    torch.testing.assert_close(a_img, b_img, atol=1e-6, rtol=0)
    torch.testing.assert_close(a_alpha, b_alpha, atol=1e-6, rtol=0)
    plan = build_plan(inp)
    torch.testing.assert_close(plan.apply(feats), a_img)


def test_auto_is_torch_on_cpu():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda", torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA + gsplat")
def test_gsplat_matches_torch_backend():
    pytest.importorskip("gsplat")
    dev = torch.device("cuda")
    means, quats, scales, opac, feats, K, w2c = _random_scene(4000, 40, 11, device=dev)
    scales = scales * 0.3
    H, W = 60, 80
    K = K.clone()
    K[0] *= 4.2
    K[1] *= 4.4
    for C in (3, 40):  # 40 = one 32-channel gsplat pass + one padded 8-channel pass
        f = feats[:, :C]
        inp = SplatInput(means, quats, scales, opac, K, w2c, H, W)
        g_img, g_alpha = render_features(inp, f, backend="gsplat")
        t_img, t_alpha = render_features(inp, f, backend="torch")
        rel = ((g_img - t_img).norm() / t_img.norm()).item()
        a_err = (g_alpha - t_alpha).abs().max().item()
        print(f"gsplat vs torch, C={C}: feature rel. L2 error {rel:.2e}, alpha max abs error {a_err:.2e}, "
              f"mean alpha {t_alpha.mean().item():.3f}")
        assert t_alpha.mean() > 0.3
        assert rel < 1e-3
        # pixels where float32 rounding flips a 1/255 or 1e-4 decision differ by one Gaussian's share
        assert (g_alpha - t_alpha).abs().quantile(0.99) < 1e-4


def test_input_type_checks_shapes_once():
    means, quats, scales, opac, feats, K, w2c = _random_scene(5, 2, 0)
    with pytest.raises(AssertionError, match="quats must be"):
        SplatInput(means, quats[:4], scales, opac, K, w2c, 4, 4)
    inp = SplatInput(means, quats, scales, opac, K, w2c, 4, 4)
    with pytest.raises(AssertionError, match="features must be"):
        render_features(inp, feats[:3])
    sub = inp.subset(torch.tensor([0, 2]))
    assert sub.n == 2 and torch.equal(sub.means, means[[0, 2]]) and sub.K is inp.K


def test_band_pairs_exact_past_the_float_integer_limit():
    """A band with more (Gaussian, pixel) pairs than its float dtype counts exactly (float16: 2^11 here; float32:
    2^24, which the fullest band of a 576x880 MVSplat target can pass: it crashed a CPU operator build): the pairs
    equal those of the same band in float64 (three flat Gaussians covering a 40x60 image: 7,200 pairs)."""
    from snd.splat.render_torch import Projected, _band_pairs

    def proj(dt):
        return Projected(ids=torch.arange(3), means2d=torch.tensor([[30.0, 20.0], [10.0, 5.0], [50.0, 35.0]], dtype=dt),
                         conics=torch.full((3, 3), 1e-4, dtype=dt) * torch.tensor([1.0, 0.0, 1.0], dtype=dt),
                         depths=torch.tensor([1.0, 2.0, 3.0], dtype=dt), opacities=torch.full((3,), 0.9, dtype=dt),
                         radii=torch.tensor([[70, 50]] * 3))

    ref = _band_pairs(proj(torch.float64), (0, 40), 60)
    got = _band_pairs(proj(torch.float16), (0, 40), 60)
    assert ref[0].numel() == 3 * 40 * 60
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert torch.allclose(got[2].double(), ref[2], atol=2e-3)
