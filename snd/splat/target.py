"""Teacher patch features of two context views -> the loss target in the target view.

    upsample (mask-aware | bilinear) -> lift (feature of context pixel (v, y, x) -> Gaussian (v, y, x))
    -> render into the target camera -> coverage -> semantic blend (optional)
    -> bilinear downsample to the student's patch grid -> valid = coverage resized to the patch grid

The rules of each step follow ``protocol`` (`snd.splat.protocol`): "official" (default) computes what
the official SnD code computes (``src/model/model_wrapper.py`` ``training_step``); "snd" is the earlier
variant. Common to both:

* Rendered features are the plain alpha-composited sum, **not divided by alpha** (official: the 3DGS
  rasteriser with ``override_color`` and a zero background, nothing normalised).
* Blending follows the official order (render -> blend -> downsample) and blends label 0 too.
* Downsampling: ``F.interpolate(..., mode="bilinear", align_corners=False)`` without antialiasing.

Official: a pixel is uncovered when no Gaussian contributes (alpha exactly 0; the official code tests
the decoder's RGB render for exact 0), the segment means of the blend run over all pixels, and the
uncovered mask goes to the patch grid with ``mode="nearest"``, thresholded at 0.5. snd: covered means
alpha > 0.5, means over covered pixels, bilinear coverage >= 0.5.

Memory: every step after upsampling is independent per channel, so the whole chain runs one channel
chunk at a time; only the geometry (the torch backend's sparse compositing plan, or gsplat's alpha)
is shared. Chunked and single-shot results are equal (tested).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from snd.splat.blend import semantic_blend
from snd.splat.gaussians import PixelGaussians
from snd.splat.inputs import drawable
from snd.splat.protocol import Rules, TargetsProtocol, rules
from snd.splat.render import Backend, resolve_backend
from snd.splat.render_gsplat import render_gsplat
from snd.splat.render_torch import build_plan
from snd.splat.upsample import UpsampleMode, bilinear_resize, upsample_features

log = logging.getLogger(__name__)


def coverage_to_patches(covered: Tensor, out_hw: tuple[int, int], r: Rules) -> Tensor:
    """Pixel coverage [..., H, W] bool -> patch validity [..., h2, w2] bool: nearest (official; the
    uncovered mask resized with ``F.interpolate(mode="nearest")`` and kept where >= 0.5) or bilinear
    coverage >= 0.5 (snd)."""
    lead = covered.shape[:-2]
    x = covered.reshape(-1, 1, *covered.shape[-2:]).float()
    if r.coverage_resize == "nearest":
        unc = F.interpolate(1.0 - x, size=tuple(out_hw), mode="nearest") >= 0.5
        return (~unc).reshape(*lead, *out_hw)
    return (bilinear_resize(x, tuple(out_hw)) >= 0.5).reshape(*lead, *out_hw)


def target_features(
    ctx_feats: Tensor,  # [V, C, h, w]
    gaussians: PixelGaussians,  # [V, H, W]
    ctx_masks: Tensor,  # [V, H, W] int
    tgt_mask: Tensor,  # [Ht, Wt] int
    tgt_K: Tensor,  # [3, 3]
    tgt_w2c: Tensor,  # [4, 4]
    out_hw: tuple[int, int],
    *,
    upsample: UpsampleMode = "mask",
    blend: bool = True,
    backend: Backend = "auto",
    blend_weight: float = 0.5,
    protocol: TargetsProtocol = "official",
    channel_chunk: int | None = None,
    render_chunk: int = 32,
    near: float = 0.01,
    far: float = 1e10,
) -> tuple[Tensor, Tensor]:
    """Render teacher features of the context views into the target view at the student's patch grid.

    Args:
        ctx_feats: [V, C, h, w] teacher patch features of the V context views.
        gaussians: PixelGaussians [V, H, W], one per context pixel (scaffold resolution H x W).
        ctx_masks: [V, H, W] instance labels of the context views (mask-aware upsampling).
        tgt_mask:  [Ht, Wt] instance labels of the target view; sets the render size.
        tgt_K:     [3, 3] target intrinsics for Ht x Wt (pixel centres at integers).
        tgt_w2c:   [4, 4] target world-to-camera (OpenCV axes).
        out_hw:    (h2, w2) the student's patch grid.
        upsample:  "mask" (paper) or "bilinear" (ablation B).
        blend:     semantic blending on (paper) or off (ablation A / correspondence variant).
        backend:   renderer, see `snd.splat.render.render_features`.
        blend_weight: w of the blend (0.5 in the paper).
        protocol:  "official" or "snd" rules for grid, fallback, blend means and coverage (module docstring).
        channel_chunk: channels pushed through upsample/render/blend/downsample at once; None = all at once
            on CUDA (one projection + sort per target, the fast path) and 128 on CPU (bounds memory).
        render_chunk: channels per gsplat rasteriser pass (32 measured fastest on an H100: docs/performance.md).
        near, far: camera-z range of Gaussians drawn.

    Returns:
        (feats [C, h2, w2] float32, valid [h2, w2] bool).
    """
    assert ctx_feats.dim() == 4, f"ctx_feats must be [V, C, h, w], got {tuple(ctx_feats.shape)}"
    V, C, h, w = ctx_feats.shape
    Vg, H, W = gaussians.shape
    assert Vg == V, f"gaussians must have V={V} views, got {Vg}"
    assert ctx_masks.shape == (V, H, W), f"ctx_masks must be [V, H, W] = {(V, H, W)}, got {tuple(ctx_masks.shape)}"
    assert tgt_mask.dim() == 2, f"tgt_mask must be [Ht, Wt], got {tuple(tgt_mask.shape)}"
    assert tgt_K.shape == (3, 3), f"tgt_K must be [3, 3], got {tuple(tgt_K.shape)}"
    assert tgt_w2c.shape == (4, 4), f"tgt_w2c must be [4, 4], got {tuple(tgt_w2c.shape)}"
    Ht, Wt = tgt_mask.shape
    h2, w2 = int(out_hw[0]), int(out_hw[1])
    device = ctx_feats.device
    which = resolve_backend(backend, device)
    r = rules(protocol)

    scene, alive = drawable(gaussians, tgt_K, tgt_w2c, Ht, Wt, near=near, far=far, device=device)
    ctx_masks = ctx_masks.to(device)
    tgt_mask = tgt_mask.to(device)

    plan = build_plan(scene) if which == "torch" else None

    def render(f: Tensor) -> tuple[Tensor, Tensor]:
        if plan is not None:
            return plan.apply(f), plan.alpha
        return render_gsplat(scene, f, channel_chunk=min(render_chunk, f.shape[1]))

    out = torch.empty(C, h2, w2, dtype=torch.float32, device=device)
    covered = None
    if channel_chunk is None:
        channel_chunk = None if device.type == "cuda" else 128
    step = C if not channel_chunk else int(channel_chunk)
    for c0 in range(0, C, step):
        up = upsample_features(ctx_feats[:, c0:c0 + step].float(), ctx_masks, mode=upsample,
                               fallback=r.fallback, grid=r.grid)  # [V, c, H, W]
        lifted = up.permute(0, 2, 3, 1).reshape(V * H * W, -1)[alive]  # [N_alive, c]
        del up
        img, alpha = render(lifted)  # [c, Ht, Wt], [Ht, Wt]
        if covered is None:
            covered = alpha > r.coverage_threshold
        if blend:
            img = semantic_blend(img, tgt_mask, weight=blend_weight, valid=None if r.mean_over_all else covered)
        out[c0:c0 + step] = bilinear_resize(img, (h2, w2))
    if covered is None:  # C == 0
        covered = torch.zeros(Ht, Wt, dtype=torch.bool, device=device)
    return out, coverage_to_patches(covered, (h2, w2), r)
