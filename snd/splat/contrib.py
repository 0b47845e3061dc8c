"""The compositing weights of a batch of renders: as a flat list at chosen pixels, and as the render's adjoint.

Why a batch: stage one builds three transfer operators per pair (`snd.splat.operator_build`), and each
needs compositing weights of its target render. Done one render at a time, the work is
a few hundred small kernels and several host syncs per target (~22 ms on an H100 for a 576x880 render,
`docs/bench/profile_operator_h100.jsonl`). Here the renders of many (pair, target) jobs go through
gsplat's kernels in one call each (jobs are gsplat's batch dimension), and the result is one flat list
tagged with its job, which the operator builder aggregates with one sort.

Each job n renders the Gaussians of pair ``pair[n]`` into camera (K[n], w2c[n]). Gaussian indices are
into that pair's flattened V*H*W scaffold (not into a culled subset), so jobs of one pair share them.

Two ways out, because an operator needs both and listing everything is what made it slow (~39 M weights
per 576x880 target of a random-init MVSplat scaffold, 145 ms of operators per pair on an H100):

* `pixels`: the full (pixel, Gaussian) list only at the pixels asked for (the ~2 % that the bilinear
  downsampling reads). gsplat's index rasteriser starts every other pixel at transmittance 0, so it stops
  there at its first contributing Gaussian and writes nothing, while the asked pixels run exactly as in a
  full render.
* `adjoint`: for an image-space field Y [N, H, W, K], the sum over pixels sum_q w_qg Y[q] for every
  Gaussian g, i.e. the transpose of the render applied to Y. That is the gradient of <render(c), Y> with
  respect to the colours c, which gsplat's backward kernel computes without listing any pair; the instance
  part of an operator (per label, a Gaussian's summed weight over the label's pixels) is this with Y = the
  labels' mean selectors. Such a field has one channel set per pixel (its label's slot); given as a
  `SlotField`, gsplat's backend computes it with snd's own slot kernel (`snd.splat.kernels`; ``SND_SLOT_ADJOINT=off``
  goes back to gsplat's backward kernel, which works on all K channels of every pair: the builder then takes
  1.4-1.7x as long on an H100).
* `direct`: snd's direct-rows kernel sums the list's weights per target patch itself (``SND_DIRECT_KERNEL=off``:
  the list is returned and `snd.splat.operator_rows` aggregates it in torch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from snd.splat import kernels
from snd.splat.gaussians import PixelGaussians
from snd.splat.inputs import drawable, drawable_mask
from snd.splat.render import Backend, resolve_backend
from snd.splat.render_gsplat import gsplat_K
from snd.splat.render_torch import ALPHA_MAX, build_plan, composite_weights

__all__ = ["Contributions", "SlotField", "contributions"]


@dataclass
class Contributions:
    """The compositing weights of N renders of H x W pixels.

    job, pix, gauss [M] long: render, pixel (y*W + x) and Gaussian (index into the job's pair's V*H*W
    scaffold) of each (pixel, Gaussian) pair that contributes; weight [M] float64: alpha_i T_i;
    alpha [N, H, W] float32: 1 - final transmittance of each render (every pixel, whatever `pixels` was).
    adjoint [N, G, K] float32 or None: sum_q weight(q, g) * Y[n, q, k] for the field Y the caller's
    selector returned (G = the pair's V*H*W; Gaussians that are not drawn get 0).
    direct: the direct part's rows from snd's kernel (`snd.splat.kernels.direct_rows`: cols, vals, nnz, abs) when
    the caller asked for them and the kernel ran; the list (job .. weight) is then empty.
    """

    job: Tensor
    pix: Tensor
    gauss: Tensor
    weight: Tensor
    alpha: Tensor
    adjoint: Tensor | None = None
    direct: tuple[Tensor, Tensor, Tensor, Tensor] | None = None


@dataclass
class SlotField:
    """A field Y [N, H, W, channels] with at most one channel set per pixel: Y[n, y, x, slot] = value at that
    pixel's slot, 0 elsewhere (slot -1: the pixel is 0 in every channel)."""

    slot: Tensor  # [N, H, W] long or int
    value: Tensor  # [N, H, W] float32
    channels: int

    def dense(self) -> Tensor:
        """Y as a dense [N, H, W, channels] float32 tensor."""
        Y = torch.zeros(*self.slot.shape, self.channels, dtype=torch.float32, device=self.slot.device)
        on = (self.slot >= 0) & (self.slot < self.channels)
        Y[on, self.slot[on].long()] = self.value[on].float()
        return Y


# alpha [N, H, W] -> Y [N, H, W, K] float32 (dense or as a SlotField), the field of the adjoint
Selector = Callable[[Tensor], "Tensor | SlotField"]
# () -> the inputs of `kernels.direct_rows` besides the renders (tap_pix, tap_coef, pair, ucols, uw, row_cap),
# asked for after the adjoint's selector (the coefficients depend on the labels it computed)
DirectRequest = Callable[[], dict]
GSPLAT_CHANNELS = (1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 64, 65, 128, 129, 256, 257, 512, 513)  # compiled


def contributions(gaussians: Sequence[PixelGaussians], pair: Tensor, K: Tensor, w2c: Tensor, height: int, width: int,
                  *, near: float = 0.01, far: float = 1e10, backend: Backend = "auto",
                  max_pairs: int = 1 << 24, pixels: Tensor | None = None,
                  adjoint: Selector | None = None, direct: DirectRequest | None = None) -> Contributions:
    """Compositing weights of N jobs: job n draws ``gaussians[pair[n]]`` ([V, H, W] each, equal shapes) into
    the camera K[n] [3, 3], w2c[n] [4, 4] at height x width.

    backend: "gsplat" (CUDA: gsplat's projection, tile intersection, index rasteriser and backward kernel,
    all jobs in one call each), "torch" (`build_plan`, one job at a time; any device) or "auto".
    pixels: [height*width] bool; when given, the list holds only the pairs at these pixels (all of them).
    adjoint: called once with every job's alpha; the field Y it returns is pulled back to the Gaussians
    (`Contributions.adjoint`).
    direct: with the gsplat backend (and ``SND_DIRECT_KERNEL`` not "off"), called once after ``adjoint``; snd's
    kernel then computes the direct part's rows from its inputs (`Contributions.direct`) instead of listing the
    pairs. Ignored otherwise (the list is returned and the caller aggregates it).
    The same Gaussians are drawn as by `snd.splat.inputs.drawable` (opacity >= 1/255, finite).
    """
    device = gaussians[0].means.device
    N = int(pair.numel())
    if N == 0:
        e = torch.zeros(0, dtype=torch.long, device=device)
        return Contributions(e, e, e, torch.zeros(0, dtype=torch.float64, device=device),
                             torch.zeros(0, height, width, device=device))
    if resolve_backend(backend, device) == "gsplat":
        return _contributions_gsplat(gaussians, pair, K, w2c, height, width, near=near, far=far, pixels=pixels,
                                     adjoint=adjoint, direct=direct)
    job, pix, gauss, wt, alpha, plans = [], [], [], [], [], []
    pixels = pixels.to(device) if pixels is not None else None
    for n in range(N):
        scene, kept = drawable(gaussians[int(pair[n])], K[n], w2c[n], height, width, near=near, far=far, device=device)
        plan = build_plan(scene, max_pairs=max_pairs)
        q, g = plan.weights.indices()
        v = plan.weights.values()
        if pixels is not None:
            at = pixels[q]
            q, g, v = q[at], g[at], v[at]
        job.append(torch.full_like(q, n))
        pix.append(q)
        gauss.append(kept[g])
        wt.append(v.to(torch.float64))
        alpha.append(plan.alpha.float())
        if adjoint is not None:
            plans.append((plan, kept))
    alpha = torch.stack(alpha)
    adj = None
    if adjoint is not None:
        Y = adjoint(alpha)
        Y = Y.dense() if isinstance(Y, SlotField) else Y
        G = gaussians[0].means[..., 0].numel()
        adj = torch.zeros(N, G, Y.shape[-1], dtype=torch.float32, device=device)
        for n, (plan, kept) in enumerate(plans):
            if Y.shape[-1]:
                yn = Y[n].reshape(height * width, -1).to(plan.weights.dtype)
                adj[n, kept] = torch.sparse.mm(plan.weights.t(), yn).float()
    return Contributions(torch.cat(job), torch.cat(pix), torch.cat(gauss), torch.cat(wt), alpha, adj)


def _job_scenes(gaussians: Sequence[PixelGaussians], pair: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per job its pair's flattened Gaussians as float32 [N, G, ...]; those `drawable` would drop get
    opacity 0 (gsplat's projection culls opacity < 1/255) and finite placeholder values."""
    flat = [gaussians[i].to(dtype=torch.float32).flatten() for i in pair.tolist()]
    means, quats, scales, opac = (torch.stack([f[k] for f in flat]) for k in range(4))  # [N, G, ...]
    ok = drawable_mask(means, scales, opac)
    means = torch.where(ok[..., None], means, torch.zeros_like(means))
    scales = torch.where(ok[..., None], scales, torch.ones_like(scales))
    quats = torch.where(ok[..., None] & torch.isfinite(quats).all(-1, keepdim=True), quats,
                        torch.tensor([1.0, 0.0, 0.0, 0.0], device=quats.device))
    return means, quats, scales, torch.where(ok, opac, torch.zeros_like(opac))


def _contributions_gsplat(gaussians: Sequence[PixelGaussians], pair: Tensor, K: Tensor, w2c: Tensor, height: int,
                          width: int, *, near: float, far: float, pixels: Tensor | None = None,
                          adjoint: Selector | None = None, direct: DirectRequest | None = None,
                          tile_size: int = 16) -> Contributions:
    """gsplat's kernels decide which pairs contribute, exactly as its rasteriser does (alpha >= 1/255, stop
    before T <= 1e-4: ``rasterize_to_indices_in_range`` over the whole depth range, T starting at 1 at the
    asked pixels and 0 elsewhere); the weights alpha_i T_i are recomputed in torch (float64 transmittance)
    as gsplat's pure-torch ``accumulate`` does. alpha comes from gsplat's forward kernel (one channel) and
    the adjoint from snd's slot kernel for a `SlotField` (unless SND_SLOT_ADJOINT=off), else from gsplat's
    backward kernel called directly with the field as the output gradient (the public autograd path would also run a K-channel forward whose
    output nobody needs). Jobs are gsplat's batch dimension ([N, 1 camera])."""
    from gsplat.cuda._wrapper import (_make_lazy_cuda_func, fully_fused_projection, isect_offset_encode, isect_tiles,
                                      rasterize_to_indices_in_range)

    if not gaussians[0].means.is_cuda:
        raise ValueError("the gsplat backend needs CUDA tensors; use backend='torch' on CPU")
    dev = gaussians[0].means.device
    means, quats, scales, opac = _job_scenes(gaussians, pair)  # [N, G, ...]
    N, G = opac.shape
    Kg = gsplat_K(K, dev)  # [N, 3, 3]
    viewmats = w2c.to(dev, torch.float32)[:, None].contiguous()  # [N, 1, 4, 4]
    radii, means2d, depths, conics, _ = fully_fused_projection(
        means, None, quats, scales, viewmats, Kg[:, None].contiguous(), width, height, eps2d=0.3,
        near_plane=near, far_plane=far, packed=False, opacities=opac)  # [N, 1, G, ...]
    tw, th = math.ceil(width / tile_size), math.ceil(height / tile_size)
    _, isect_ids, flatten_ids = isect_tiles(means2d, radii, depths, tile_size, tw, th, packed=False)
    offsets = isect_offset_encode(isect_ids, N, tw, th).reshape(N, 1, th, tw)
    op = opac[:, None].contiguous()
    geo = (means2d.contiguous(), conics.contiguous())
    ras = (int(width), int(height), tile_size, offsets.contiguous(), flatten_ids.contiguous())
    _, alphas, last_ids = _make_lazy_cuda_func("rasterize_to_pixels_3dgs_fwd")(
        *geo, means2d.new_zeros(N, 1, G, 1), op, None, None, *ras)  # [N, 1, H, W, 1]
    alpha = alphas.float().reshape(N, height, width)
    adj = None
    if adjoint is not None:
        Y = adjoint(alpha)
        adj = _adjoint_gsplat(Y, geo, op, ras, alphas, last_ids, N, G, dev)
    if direct is not None and kernels.enabled("direct"):
        rows = _direct_kernel(direct(), geo, op, ras)
        if rows is not None:
            e = torch.zeros(0, dtype=torch.long, device=dev)
            return Contributions(e, e, e, torch.zeros(0, dtype=torch.float64, device=dev), alpha, adj, rows)
    flat = torch.cat([offsets.reshape(-1), offsets.new_tensor([flatten_ids.numel()])])
    longest = int((flat[1:] - flat[:-1]).max()) if flatten_ids.numel() else 0  # a host sync (as `pair.tolist()`)
    n_batches = max(1, -(-longest // (tile_size * tile_size)))
    T0 = torch.ones(N, 1, int(height), int(width), device=dev)
    if pixels is not None:
        T0 = T0 * pixels.to(dev, torch.float32).reshape(1, 1, int(height), int(width))
    gid, pix, img = rasterize_to_indices_in_range(0, n_batches, T0, means2d, conics, opac[:, None], int(width),
                                                  int(height), tile_size, offsets, flatten_ids)
    # gid is the Gaussian's index within its image (the kernel writes ``g % N``), not into the [N * G] batch;
    # fid is the latter (before this was found, every job of a chunk but the first read job 0's projection)
    gid, pix, img = gid.long(), pix.long(), img.long()
    fid = img * G + gid
    # alpha of every pair, as gsplat's accumulate (pixel centres at +0.5)
    px = (pix % width).to(torch.float32) + 0.5
    py = torch.div(pix, width, rounding_mode="floor").to(torch.float32) + 0.5
    m2, c = means2d.reshape(-1, 2)[fid], conics.reshape(-1, 3)[fid]
    dx, dy = px - m2[:, 0], py - m2[:, 1]
    sigma = 0.5 * (c[:, 0] * dx * dx + c[:, 2] * dy * dy) + c[:, 1] * dx * dy
    a = (opac.reshape(-1)[fid] * torch.exp(-sigma)).clamp_max(ALPHA_MAX)
    # front to back within each pixel: gsplat sorts a tile's list by depth (stable on Gaussian index) and writes
    # each pixel's hits at the cumulative count of the pixels before it, so the list is normally in (pixel,
    # depth) order already. The check (one sync) reads each entry's depth; only a list out of order pays for
    # ranking every Gaussian by depth (a sort of all N x G depths) and sorting the entries.
    Q = int(height) * int(width)
    gpix = img * Q + pix  # pixel of the whole batch
    d = depths.reshape(-1)[fid]
    in_order = (gpix[1:] > gpix[:-1]) | ((gpix[1:] == gpix[:-1]) & (d[1:] >= d[:-1]))
    if gpix.numel() > 1 and not bool(in_order.all()):
        order = torch.sort(depths.reshape(N, G), dim=1, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(G, device=dev).expand(N, G).contiguous())
        srt = torch.sort(gpix * G + rank.reshape(-1)[fid]).indices
        gpix, gid, a = gpix[srt], gid[srt], a[srt]
    w, _, _ = composite_weights(gpix, a.double(), N * Q)
    job = torch.div(gpix, Q, rounding_mode="floor")
    return Contributions(job, gpix - job * Q, gid, w, alpha, adj)


def _adjoint_gsplat(Y: "Tensor | SlotField", geo: tuple, op: Tensor, ras: tuple, alphas: Tensor, last_ids: Tensor,
                    N: int, G: int, dev: torch.device) -> Tensor:
    """The adjoint [N, G, K] of Y on the GPU: snd's slot kernel for a `SlotField` unless SND_SLOT_ADJOINT=off (if it
    cannot build here: once a warning, then as off), else gsplat's backward kernel on the dense field."""
    from gsplat.cuda._wrapper import _make_lazy_cuda_func

    if isinstance(Y, SlotField) and Y.channels and kernels.enabled("slot"):
        width, height, tile_size, offsets, flatten_ids = ras
        try:
            out = kernels.slot_adjoint(geo[0], geo[1], op, offsets, flatten_ids, Y.slot, Y.value, Y.channels, width,
                                       height, tile_size)
            return out.reshape(N, G, Y.channels)
        except kernels.KernelUnavailable as e:
            kernels.fall_back("slot", e, "using gsplat's backward kernel")
    Y = (Y.dense() if isinstance(Y, SlotField) else Y).to(torch.float32)  # [N, H, W, K]
    Kc = int(Y.shape[-1])
    if not Kc:
        return torch.zeros(N, G, 0, device=dev)
    if Kc > GSPLAT_CHANNELS[-1]:
        raise ValueError(f"the adjoint's field has {Kc} channels; gsplat's kernels take at most "
                         f"{GSPLAT_CHANNELS[-1]} (lower the operator's inst_cap)")
    Kp = next(c for c in GSPLAT_CHANNELS if c >= Kc)
    Yp = torch.nn.functional.pad(Y, (0, Kp - Kc))[:, None].contiguous()
    v_colors = _make_lazy_cuda_func("rasterize_to_pixels_3dgs_bwd")(
        *geo, geo[0].new_zeros(N, 1, G, Kp), op, None, None, *ras, alphas, last_ids, Yp,
        torch.zeros_like(alphas), False)[3]  # [N, 1, G, Kp]
    return v_colors[:, 0, :, :Kc]


def _direct_kernel(req: dict, geo: tuple, op: Tensor, ras: tuple) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """The direct rows from snd's kernel, or None (the caller lists the pairs instead): a row too wide for its
    table, or the kernel unavailable here (then once a warning and the torch glue from now on)."""
    width, height, tile_size, offsets, flatten_ids = ras
    try:
        return kernels.direct_rows(geo[0], geo[1], op, offsets, flatten_ids, width, height, tile_size, **req)
    except kernels.KernelUnavailable as e:
        kernels.fall_back("direct", e, "aggregating gsplat's list in torch")
        return None
