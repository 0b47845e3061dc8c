"""The one-target operator builder snd shipped before the batched one (dense [P, J] direct part,
`torch.topk` per row), kept verbatim as an independent reference for `snd.splat.operator_build`. Only
its two tap tables (upsampling, downsampling) come from `snd.splat.operator_build`: they were moved there
unchanged, and `tests/test_splat_operator.py` checks them against `target_features`.

Test-only: `tests/test_operator_batched.py` checks that the batched builder gives, job by job, the
operator this one gives.
"""
from __future__ import annotations

import torch
from torch import Tensor

from snd.splat.gaussians import PixelGaussians
from snd.splat.inputs import drawable
from snd.splat.operator import TransferOperator
from snd.splat.operator_build import _downsample_taps, _upsample_taps, rank_score
from snd.splat.protocol import TargetsProtocol, rules
from snd.splat.render_torch import build_plan
from snd.splat.target import coverage_to_patches
from snd.splat.upsample import UpsampleMode


def reference_operator(
    gaussians: PixelGaussians,  # [V, H, W]
    ctx_masks: Tensor,  # [V, H, W] int
    tgt_mask: Tensor,  # [Ht, Wt] int
    tgt_K: Tensor,  # [3, 3]
    tgt_w2c: Tensor,  # [4, 4]
    ctx_hw: tuple[int, int],
    out_hw: tuple[int, int],
    *,
    upsample: UpsampleMode = "mask",
    blend: bool = True,
    blend_weight: float = 0.5,
    protocol: TargetsProtocol = "official",
    row_cap: int = 64,
    inst_cap: int = 128,
    near: float = 0.01,
    far: float = 1e10,
    max_pairs: int = 1 << 24,
    backend: str = "auto",
) -> TransferOperator:
    """The operator equal to ``target_features(feats, ...)`` for any feats [V, C, *ctx_hw] (same knobs).

    Args:
        gaussians, ctx_masks, tgt_mask, tgt_K, tgt_w2c, out_hw, upsample, blend, blend_weight,
            protocol, near, far: as `snd.splat.target.target_features`.
        ctx_hw: (h, w) the teacher's patch grid of the context views.
        row_cap: kept coefficients per target patch of the direct part.
        inst_cap: kept instance labels of the blending part.
        max_pairs: memory bound of the torch compositing plan (see `build_plan`).
        backend: ignored (the reference always uses the torch plan).

    Accumulation is in float64 so the result does not depend on the order of atomic adds on GPU.
    """
    V, H, W = gaussians.shape
    assert ctx_masks.shape == (V, H, W), f"ctx_masks must be [V, H, W] = {(V, H, W)}, got {tuple(ctx_masks.shape)}"
    assert tgt_mask.dim() == 2, f"tgt_mask must be [Ht, Wt], got {tuple(tgt_mask.shape)}"
    if upsample not in ("mask", "bilinear"):
        raise ValueError(f"upsample must be 'mask' or 'bilinear', got {upsample!r}")
    r = rules(protocol)
    h, w = int(ctx_hw[0]), int(ctx_hw[1])
    h2, w2 = int(out_hw[0]), int(out_hw[1])
    Ht, Wt = tgt_mask.shape
    if h2 > Ht or w2 > Wt:
        raise ValueError(f"out_hw {(h2, w2)} must not exceed the render size {(Ht, Wt)} (the target is downsampled)")
    device = gaussians.means.device
    J, P, Q = V * h * w, h2 * w2, Ht * Wt
    f64 = torch.float64

    # render plan over the Gaussians that can be drawn (same culling as target_features)
    scene, alive = drawable(gaussians, tgt_K, tgt_w2c, Ht, Wt, near=near, far=far, device=device)
    plan = build_plan(scene, max_pairs=max_pairs)
    rq, rg = plan.weights.indices()  # [nnz] pixel, alive-Gaussian
    rv, alpha = plan.weights.values(), plan.alpha
    rv = rv.to(f64)
    covered = (alpha > r.coverage_threshold).reshape(Q)
    in_mean = torch.ones_like(covered) if r.mean_over_all else covered  # pixels the segment means run over
    # pixels a patch samples (the direct part reads only these; the instance means read the `in_mean` ones)
    sampled = torch.zeros(Q, dtype=torch.bool, device=device)
    dpix, dwt = _downsample_taps(Ht, Wt, h2, w2, device)  # [4, P]
    sampled[dpix.reshape(-1)] = True

    # upsampling taps of every alive Gaussian: render entries (q, g, w) compose to (q, patch j, w * u)
    ucols, uw = _upsample_taps(ctx_masks.to(device) if upsample == "mask" else None, V, h, w, H, W,
                               r, device)
    ucols, uw = ucols[alive], uw[alive]  # [N_alive, 4]

    # blend weight per pixel: only labels with a pixel in the means are blended (as semantic_blend)
    labels, inv = torch.unique(tgt_mask.to(device).reshape(Q), return_inverse=True)
    L = labels.numel()
    counts = torch.zeros(L, dtype=f64, device=device).index_add_(0, inv[in_mean], torch.ones(int(in_mean.sum()), dtype=f64, device=device))
    b_pix = (counts > 0).to(f64)[inv] * (blend_weight if blend else 0.0)  # [Q]

    # direct part: only the sampled pixels' entries, expanded to their 4 upsampling taps, scattered
    # through the 4 downsampling tap slots (each slot maps pixels to patches 1:1)
    direct = torch.zeros(P * J, dtype=f64, device=device)
    s_idx = sampled[rq].nonzero().squeeze(1)
    sq = rq[s_idx][:, None].expand(-1, 4).reshape(-1)
    sj = ucols[rg[s_idx]].reshape(-1)
    sv = (rv[s_idx][:, None] * uw[rg[s_idx]]).reshape(-1)
    for t in range(4):
        pix2patch = torch.full((Q,), -1, dtype=torch.long, device=device)
        pix2patch[dpix[t]] = torch.arange(P, device=device)
        p = pix2patch[sq]
        k = (p >= 0).nonzero().squeeze(1)
        pk, qk = p[k], sq[k]
        coef = dwt[t][pk] * (1.0 - b_pix[qk])
        direct.index_add_(0, pk * J + sj[k], coef * sv[k])
    direct = direct.reshape(P, J)

    # instance part: which labels are kept, then per (label, Gaussian) the summed weight over the
    # label's covered pixels (aggregated before expanding to the taps: ~10x fewer entries)
    tap_lab = inv[dpix]  # [4, P] label index of each tap
    tap_w = dwt * b_pix[dpix]  # [4, P]
    lab_mass = torch.zeros(L, dtype=f64, device=device).index_add_(0, tap_lab.reshape(-1), tap_w.reshape(-1))
    used = (lab_mass > 0).nonzero().squeeze(1)
    order = used[torch.argsort(rank_score(lab_mass[used]), descending=True, stable=True)]  # ties: lower label first
    kept = order[:inst_cap]
    slot = torch.full((L,), -1, dtype=torch.long, device=device)
    slot[kept] = torch.arange(kept.numel(), device=device)
    inst = torch.zeros(inst_cap * J, dtype=f64, device=device)
    if kept.numel():
        lq = inv[rq]
        k = (in_mean[rq] & (slot[lq] >= 0)).nonzero().squeeze(1)
        lk = lq[k]
        n_alive = ucols.shape[0]
        key, pos = torch.unique(slot[lk] * n_alive + rg[k], return_inverse=True)
        agg = torch.zeros(key.numel(), dtype=f64, device=device).index_add_(0, pos, rv[k] / counts[lk])
        ks, kg = torch.div(key, n_alive, rounding_mode="floor"), key % n_alive
        inst.index_add_(0, (ks[:, None] * J + ucols[kg]).reshape(-1), (agg[:, None] * uw[kg]).reshape(-1))
    inst = inst.reshape(inst_cap, J)
    tap_slot = slot[tap_lab]  # [4, P]
    keep_tap = tap_slot >= 0
    inst_ids = torch.where(keep_tap, tap_slot, torch.zeros_like(tap_slot)).T.contiguous()  # [P, 4]
    inst_w = torch.where(keep_tap, tap_w, torch.zeros_like(tap_w)).T.contiguous()
    dropped_inst = torch.where(keep_tap, 0.0, tap_w.abs()).sum() / tap_w.abs().sum().clamp_min(1e-300)

    # ELL of the direct part
    nnz = (direct != 0).sum(1)
    R = min(int(row_cap), J)
    top = torch.topk(direct.abs(), R, dim=1, sorted=True)
    cols = top.indices
    vals = torch.gather(direct, 1, cols)
    cols = torch.where(vals != 0, cols, torch.zeros_like(cols))
    if R < row_cap:  # fewer context patches than the cap: pad to the fixed width
        pad = row_cap - R
        cols = torch.cat([cols, cols.new_zeros(P, pad)], 1)
        vals = torch.cat([vals, vals.new_zeros(P, pad)], 1)
    rest = direct.abs().scatter(1, top.indices, 0.0)  # what the cap left out
    dropped_direct = rest.sum() / direct.abs().sum().clamp_min(1e-300)

    valid = coverage_to_patches(covered.reshape(Ht, Wt), (h2, w2), r).reshape(P)
    return TransferOperator(
        cols=cols, vals=vals.float(), inst=inst.float(), inst_ids=inst_ids, inst_w=inst_w.float(), valid=valid,
        dropped_direct=dropped_direct.float().clamp_min(0), dropped_inst=dropped_inst.float().clamp_min(0),
        max_row_nnz=nnz.max() if P else torch.zeros((), dtype=torch.long, device=device))
