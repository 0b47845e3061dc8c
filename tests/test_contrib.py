"""`snd.splat.contrib.contributions`: the list at chosen pixels is the full list cut to those pixels, and
the adjoint is the transpose of the render (checked against the full list summed by hand, and against
<render(f), Y> = <f, adjoint(Y)> for random f, which holds for the transpose and nothing else)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from snd.splat.contrib import contributions
from snd.splat.from_depth import gaussians_from_depth
from tests.test_splat_target import _planes_scene

EYES = [(-0.35, -1.0, 1.3), (0.35, -1.0, 1.3), (0.0, -2.2, 1.6), (0.1, -1.6, 1.2)]


def _t(a):
    return torch.as_tensor(np.asarray(a), dtype=torch.float32)


def _scene(device="cpu"):
    cams, depth, _ = _planes_scene(EYES)
    K = torch.stack([_t(c.K) for c in cams])
    g = gaussians_from_depth(_t(depth[:2]), K[:2], torch.stack([_t(c.c2w) for c in cams[:2]]), scale_mult=0.7,
                             opacity=0.9)
    w2c = torch.stack([_t(c.w2c) for c in cams])
    H, W = depth.shape[1:]
    return g.to(device=device), K[2:].to(device), w2c[2:].to(device), int(H), int(W)


def _by_hand_adjoint(c, Y, G):
    """sum_q w_qg Y[n, q] from the full list, in float64."""
    N, H, W, K = Y.shape
    out = torch.zeros(N * G, K, dtype=torch.float64, device=Y.device)
    out.index_add_(0, c.job * G + c.gauss, c.weight[:, None] * Y.reshape(N, H * W, K)[c.job, c.pix].double())
    return out.reshape(N, G, K)


def _check(backend, device, rtol):
    """rtol: of the adjoint against the float64 list (gsplat's backward recomputes T by division in float32:
    2.4e-4 measured on an H100; the torch plan's weights are the list's own)."""
    g, K, w2c, H, W = _scene(device)
    pair = torch.zeros(2, dtype=torch.long, device=device)
    G = g.means[..., 0].numel()
    gen = torch.Generator(device="cpu").manual_seed(0)
    Y = torch.rand(2, H, W, 3, generator=gen).to(device)
    pixels = (torch.rand(H * W, generator=gen) < 0.1).to(device)
    seen = []

    def field(alpha):
        seen.append(alpha)
        return Y

    full = contributions([g], pair, K, w2c, H, W, backend=backend)
    cut = contributions([g], pair, K, w2c, H, W, backend=backend, pixels=pixels, adjoint=field)
    # the list at chosen pixels == the full list's entries there, in the same order, with the same weights
    at = pixels[full.pix]
    assert 0 < int(at.sum()) < full.pix.numel()
    for k in ("job", "pix", "gauss"):
        assert torch.equal(getattr(cut, k), getattr(full, k)[at]), k
    # float64 transmittance from a cumulative sum over the whole list: a shorter list rounds differently (~1e-11)
    torch.testing.assert_close(cut.weight, full.weight[at], rtol=1e-9, atol=0)
    torch.testing.assert_close(cut.alpha, full.alpha, rtol=0, atol=1e-5)  # gsplat: float32 forward vs float64
    assert len(seen) == 1 and seen[0].shape == (2, H, W)
    # the adjoint == the full list summed by hand
    ref = _by_hand_adjoint(full, Y, G)
    assert cut.adjoint.shape == (2, G, 3) and ref.abs().max() > 0.1
    torch.testing.assert_close(cut.adjoint.double(), ref, rtol=rtol, atol=rtol / 10)
    # and it is the render's transpose: <R f, Y> == <f, R^T Y> for random Gaussian features f
    f = torch.randn(G, 3, generator=gen).double().to(device)
    img = torch.zeros(2 * H * W, 3, dtype=torch.float64, device=device)
    img.index_add_(0, full.job * H * W + full.pix, full.weight[:, None] * f[full.gauss])
    lhs = (img * Y.reshape(-1, 3).double()).sum()
    rhs = (cut.adjoint.double() * f[None]).sum()
    torch.testing.assert_close(rhs, lhs, rtol=rtol, atol=1e-6)


def test_pixels_and_adjoint_torch():
    _check("torch", "cpu", rtol=1e-4)


def test_an_empty_field_gives_an_empty_adjoint():
    g, K, w2c, H, W = _scene()
    c = contributions([g], torch.zeros(2, dtype=torch.long), K, w2c, H, W, backend="torch",
                      adjoint=lambda a: torch.zeros(*a.shape, 0))
    assert c.adjoint.shape == (2, g.means[..., 0].numel(), 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pixels_and_adjoint_gsplat():
    """gsplat's index rasteriser started at T=0 off the chosen pixels, and its backward kernel as the adjoint."""
    pytest.importorskip("gsplat")
    _check("gsplat", "cuda", rtol=1e-3)
