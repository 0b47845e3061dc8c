"""The direct part of transfer operators from a list of (tap pixel, Gaussian) weights, in torch.

Why a module of its own: this is the path of `snd.splat.operator_build` for the direct part on the CPU (the torch
plan's list) and with ``SND_DIRECT_KERNEL=off`` on CUDA; snd's direct-rows kernel (`snd.splat.kernels.direct_rows`,
the default on CUDA) computes the same rows without the list. Both give each patch row's `row_cap` largest
coefficients, ties by column, with the row's count and the dropped share.
"""
from __future__ import annotations

import torch
from torch import Tensor

f64 = torch.float64


def _sum_by_key(key: Tensor, val: Tensor) -> tuple[Tensor, Tensor]:
    """(unique keys ascending, summed values)."""
    uk, inv = torch.unique(key, return_inverse=True)
    return uk, torch.zeros(uk.numel(), dtype=val.dtype, device=val.device).index_add_(0, inv, val)


def _rank_in_group(group: Tensor, score: Tensor) -> tuple[Tensor, Tensor]:
    """Order entries by (group ascending, score descending, position ascending): (order, rank within group)."""
    o = torch.sort(score, descending=True, stable=True).indices
    o = o[torch.sort(group[o], stable=True).indices]
    g = group[o]
    first = torch.ones_like(g, dtype=torch.bool)
    first[1:] = g[1:] != g[:-1]
    start = torch.cummax(torch.where(first, torch.arange(g.numel(), device=g.device), 0), 0).values
    return o, torch.arange(g.numel(), device=g.device) - start


def _per_job_sum(job: Tensor, val: Tensor, N: int) -> Tensor:
    return torch.zeros(N, dtype=val.dtype, device=val.device).index_add_(0, job, val)


def _direct_ell(key: Tensor, val: Tensor, N: int, P: int, J: int, row_cap: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The direct part's ELL rows from its entries (key = row * J + column, repeated keys summed), keeping per row
    the `row_cap` largest |coefficients|, ties by column (what a stable sort by |value| over columns keeps).

    Sparse on purpose: a dense [N * P, J] float64 matrix (one `index_add_`, then `topk` per row) was measured
    slower on an H100 (9.5 against 7.6 ms per 576x880 target at chunk 8, 2026-12-05, docs/performance.md).
    Returns cols [N*P, row_cap] long, vals [N*P, row_cap] float64 (ranked by |value| descending, then column;
    empty slots 0), nnz [N, P] long and the dropped share of each job's |coefficients| [N]. A non-finite sum
    stays an entry (stage one drops targets whose operator holds one)."""
    device = val.device
    key, val = _sum_by_key(key, val)
    nz = (val != 0).nonzero().squeeze(1)  # taps of weight 0 (a zero fallback, full blending) are not entries
    key, val = key[nz], val[nz]
    row = torch.div(key, J, rounding_mode="floor")
    rjob = torch.div(row, P, rounding_mode="floor")
    nnz = torch.bincount(row, minlength=N * P).reshape(N, P)
    o, rank = _rank_in_group(row, val.abs())
    keep = rank < row_cap
    cols = torch.zeros(N * P, row_cap, dtype=torch.long, device=device)
    ell = torch.zeros(N * P, row_cap, dtype=f64, device=device)
    cols[row[o][keep], rank[keep]] = key[o][keep] % J
    ell[row[o][keep], rank[keep]] = val[o][keep]
    tot = _per_job_sum(rjob, val.abs(), N)
    dropped = _per_job_sum(rjob[o][~keep], val[o][~keep].abs(), N) / tot.clamp_min(1e-300)
    return cols, ell, nnz, dropped


def _direct_glue(c, lb: dict, pair_sl: Tensor, *, N: int, P: int, Q: int, ucols: Tensor, uw: Tensor, G: int, J: int,
                 dwt: Tensor, pix2patch: Tensor, lookup: tuple[Tensor, Tensor] | None,
                 row_cap: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The direct part's rows (`_direct_ell`) from the pairs listed in `c`, in torch (on CUDA snd's kernel computes
    the same rows without the list, unless ``SND_DIRECT_KERNEL=off``)."""
    b_pix = lb["b_pix"]
    gq = c.job * Q + c.pix  # pixel of the chunk

    # direct part: entries (all at pixels a patch samples: `c` was listed there only) sent through the
    # downsampling taps that read their pixel and their Gaussian's 4 upsampling taps
    if lookup is None:  # some pixel is read by two taps (a downsampling by less than 2): one pass per tap slot
        grow = pair_sl[c.job] * G + c.gauss  # row of each entry's Gaussian in the upsampling taps
        sj = ucols[grow]  # [M, 4]
        sv = c.weight[:, None] * uw[grow] * (1.0 - b_pix[gq])[:, None]
        keys, vals = [], []
        for t in range(4):
            p = pix2patch[t, c.pix]
            k = (p >= 0).nonzero().squeeze(1)
            row = c.job[k] * P + p[k]
            keys.append((row[:, None] * J + sj[k]).reshape(-1))
            vals.append((dwt[t][p[k]][:, None] * sv[k]).reshape(-1))
        key, val = torch.cat(keys), torch.cat(vals)
    else:  # each tap pixel is read by exactly one (slot, patch): one lookup per entry, no pass per slot
        patch, wq = lookup  # [Q]: the patch reading each pixel (-1: none) and its downsampling weight
        row = c.job * P + patch[c.pix]
        # a patch's tap pixels are neighbours and see nearly the same Gaussians: each Gaussian's share of a
        # patch row is summed first, and only the sums go through its 4 upsampling taps (fewer taps gathered,
        # fewer keys sorted; the same sums in another order)
        rg, share = _sum_by_key(row * G + c.gauss, c.weight * wq[c.pix] * (1.0 - b_pix[gq]))
        row = torch.div(rg, G, rounding_mode="floor")
        grow = pair_sl[torch.div(row, P, rounding_mode="floor")] * G + (rg - row * G)
        key = (row[:, None] * J + ucols[grow]).reshape(-1)
        val = (share[:, None] * uw[grow]).reshape(-1)
    return _direct_ell(key, val, N, P, J, row_cap)
