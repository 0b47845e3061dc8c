"""Building transfer operators (`snd.splat.operator`) for a batch of (pair, target) jobs at once.

Why batched: stage one needs three operators per pair for every pair of the dataset. One at a time,
each is a few hundred small kernels with host syncs between them (`nonzero`, `unique`, `int(...)`), so
a GPU spends most of the build waiting on Python. Here all jobs of a chunk share every step.

Why not from the full list of compositing weights (what this module did until 2026-12-05): a 576x880
target of a random-init MVSplat scaffold has ~39 M (pixel, Gaussian) weights, and sorting and reducing them
cost 145 ms of operators per pair on an H100. Neither part of the operator needs that list:

* the direct part reads the render only at the pixels the bilinear downsampling samples (4 per patch,
  ~2 % of the pixels), so the list is asked for there only (`snd.splat.contrib`, ``pixels``);
* the instance part needs, per kept label, each Gaussian's summed weight over the label's pixels divided
  by their count: the render's adjoint (transpose) applied to the labels' mean selectors, which snd's slot kernel
  (or gsplat's backward kernel) computes (``adjoint``); a sparse product with the transposed upsampling taps (one
  per pair for all its jobs) takes it to the context patches.

The math is `snd.splat.operator`'s (module docstring there); per job the result equals building it
alone (tested: batched == one by one == the earlier one-target builder, `tests/operator_reference.py`,
and each == `target_features`). The direct part is aggregated sparsely and its `row_cap` largest
coefficients per patch row are kept, ties broken by column (`torch.topk`'s order among equal values is
unspecified, which only matters when a cap drops mass): on CUDA by snd's direct-rows kernel (`snd.splat.kernels`),
otherwise from the list by a segmented sort (`snd.splat.operator_rows`).
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from snd.splat.contrib import SlotField, contributions
from snd.splat.gaussians import PixelGaussians
from snd.splat.operator_rows import _direct_glue, _rank_in_group
from snd.splat.protocol import Rules, TargetsProtocol, rules
from snd.splat.target import coverage_to_patches
from snd.splat.upsample import UpsampleMode, source_coords, upsample_weights

__all__ = ["ChunkSize", "build_operators"]

f64 = torch.float64
log = logging.getLogger(__name__)


@dataclass
class ChunkSize:
    """Jobs built together, halved in place when a chunk runs out of GPU memory.

    Why: a chunk's memory grows with its targets' pixels, Gaussians and kept labels (the adjoint's [G, K] arrays),
    and with what else holds the GPU (MVSplat's CUDA graphs kept 34 GiB). When the builder listed every
    compositing weight (~39 M per 576x880 random-init MVSplat target), the default of 8 ran an 80 GB H100 out of
    memory (2026-12-05); the adjoint builder fits 8 (peak 22.9 GiB). The operators are the same for every chunk size,
    so a chunk that does not fit is retried in halves; the caller keeps the object, so later batches start at
    the size that fitted."""

    size: int
    initial: int = 0  # the size asked for (set at construction)

    def __post_init__(self) -> None:
        self.size = max(1, int(self.size))
        self.initial = self.initial or self.size

    def shrink(self, failed: int) -> None:
        self.size = max(1, min(self.size, failed // 2))
        log.warning("building the transfer operators of %d targets at once ran out of GPU memory; building %d at "
                    "a time from now on (the same operators; --operator-chunk %d starts there)", failed, self.size,
                    self.size)


def _upsample_taps(ctx_masks: Tensor | None, V: int, h: int, w: int, H: int, W: int, r: Rules,
                   device: torch.device) -> tuple[Tensor, Tensor]:
    """Per context pixel (v, y, x) of V views its 4 (patch column, weight) taps: ([V*H*W, 4] long, float64).

    Columns count patches of the V views in order (v*h*w + i*w + k)."""
    (y0, y1, x0, x1), wts = upsample_weights(ctx_masks, h, w, H, W, fallback=r.fallback, grid=r.grid)  # [V|1, 4, H, W]
    ys = torch.stack([y0, y0, y1, y1]).to(device)  # [4, H]  (neighbour order of upsample_weights)
    xs = torch.stack([x0, x1, x0, x1]).to(device)  # [4, W]
    local = ys[:, :, None] * w + xs[:, None, :]  # [4, H, W]
    v_off = (torch.arange(V, device=device) * (h * w))[:, None, None, None]
    cols = (local[None] + v_off).permute(0, 2, 3, 1).reshape(V * H * W, 4)
    wts = wts.to(device=device, dtype=f64).expand(V, 4, H, W).permute(0, 2, 3, 1).reshape(V * H * W, 4)
    return cols, wts


# the transposed taps' structure of the last grids seen, by (V, H, W, h, w, grid, device): it depends on nothing else,
# and stage one calls the builder once per batch with the same grids (a sort of 4G taps each time: ~2 ms per batch
# on a GPU, seconds on a CPU for 576x880)
_STRUCTURES: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}
_STRUCTURES_KEPT = 2


def _cached_structure(key: tuple, cols: Tensor, J: int) -> tuple[Tensor, Tensor, Tensor]:
    if key not in _STRUCTURES:
        while len(_STRUCTURES) >= _STRUCTURES_KEPT:
            _STRUCTURES.pop(next(iter(_STRUCTURES)))
        _STRUCTURES[key] = _transposed_structure(cols, J)
    return _STRUCTURES[key]


def _transposed_structure(cols: Tensor, J: int) -> tuple[Tensor, Tensor, Tensor]:
    """The CSR structure of one pair's upsampling taps transposed ([J, G]) and the entry each of its 4G taps
    lands in: (crow [J + 1], col [U], slot [G * 4]; taps of one pixel that clamp to the same patch at a border
    share an entry, their weights summed).

    Why separate from the weights: a tap's patch depends only on its pixel and the grids (the masks change the
    weights alone, `upsample_weights`), so every pair of a call has this structure. Each pair then only sums
    its weights into it (one `index_add_`), where sorting its 4G taps again (`coalesce`) took ~300 ms per
    576x880 pair on one CPU thread."""
    G = cols.shape[0]
    key = cols.reshape(-1) * G + torch.arange(G, device=cols.device).repeat_interleave(4)
    uk, slot = torch.unique(key, return_inverse=True)
    row = torch.div(uk, G, rounding_mode="floor")
    crow = torch.zeros(J + 1, dtype=torch.long, device=cols.device)
    crow[1:] = torch.cumsum(torch.bincount(row, minlength=J), 0)
    return crow, uk - row * G, slot


def _downsample_taps(Ht: int, Wt: int, h2: int, w2: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Bilinear (align_corners=False) taps of every patch: (pixel [4, P] long, weight [4, P] float64).

    Tap slot t = (row tap, column tap); within a slot the pixel -> patch map is injective (downsampling)."""
    ya, yb, fy = source_coords(h2, Ht, device)
    xa, xb, fx = source_coords(w2, Wt, device)
    fy, fx = fy.double(), fx.double()
    pix, wt = [], []
    for yy, wy in ((ya, 1 - fy), (yb, fy)):
        for xx, wx in ((xa, 1 - fx), (xb, fx)):
            pix.append((yy[:, None] * Wt + xx[None, :]).reshape(-1))
            wt.append((wy[:, None] * wx[None, :]).reshape(-1))
    return torch.stack(pix), torch.stack(wt)


def _dense_unique(key: Tensor, bins: int, flag: Tensor, max_bins: int = 1 << 22) -> tuple[Tensor, Tensor, Tensor]:
    """`torch.unique(key, return_inverse=True)` for keys in [0, bins), and how many keys of each unique value have
    `flag` (bool, key's shape) set: a histogram and a prefix sum instead of a sort of every key (a chunk's labels are
    N x 576 x 880 pixels, but a few thousand (job, label) values at most).

    Why the counts here: the histogram of (key, flag) gives them with the unique values at no extra cost, where
    `index_add_` of the flags (what `_labels` did) sent millions of float64 atomics to those few thousand addresses:
    5.8 of a 12-target chunk's 43 ms of kernels on an H100 (`docs/bench/profile_operator_store_kernels_h100.jsonl`).
    Falls back to the sort when the histogram's 2 x `bins` exceed `max_bins` (its memory: 8 bytes a bin)."""
    if 2 * bins > max_bins:
        uniq, inv = torch.unique(key, return_inverse=True)
        return uniq, inv, torch.zeros(uniq.numel(), dtype=torch.long, device=key.device).index_add_(0, inv, flag.long())
    hist = torch.bincount(key * 2 + flag.long(), minlength=2 * bins).reshape(bins, 2)  # [bins, (unflagged, flagged)]
    present = hist.sum(1) > 0
    uniq = present.nonzero().squeeze(1)
    return uniq, (torch.cumsum(present, 0) - 1)[key], hist[uniq, 1]


def rank_score(mass: Tensor) -> Tensor:
    """A label's blend mass as its slot is ranked by: rounded to 2^-20, so ties go to the lower label.

    Why: on a GPU `index_add_` sums in no fixed order, so two labels of equal mass (e.g. covering as many whole
    patches) differed in the last bits from run to run and swapped slots: the stored operator was the same map
    with its instance rows permuted, but not the same bytes (seen on an H200, 2026-12-05). Rounded, the noise
    (~1e-12 relative) changes a rank only when a mass lies that close to a multiple of 2^-20."""
    return torch.round(mass * 2.0**20)


@torch.no_grad()
def build_operators(
    gaussians: Sequence[PixelGaussians],  # B pairs, each [V, H, W]
    ctx_masks: Tensor,  # [B, V, H, W] int
    tgt_masks: Tensor,  # [N, Ht, Wt] int
    tgt_K: Tensor,  # [N, 3, 3]
    tgt_w2c: Tensor,  # [N, 4, 4]
    pair: Tensor,  # [N] long: the pair of each job
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
    chunk: int | ChunkSize = 8,
):
    """N jobs' operators as one `TransferOperator` with a leading [N]; job n's equals
    ``target_features(feats, ...)`` of target n over pair ``pair[n]`` for any feats [V, C, *ctx_hw].

    Args:
        gaussians, ctx_masks, tgt_masks, tgt_K, tgt_w2c, out_hw, upsample, blend, blend_weight, protocol,
            near, far: as `snd.splat.target.target_features` (every job uses the same knobs).
        ctx_hw: (h, w) the teacher's patch grid of the context views.
        row_cap: kept coefficients per target patch of the direct part.
        inst_cap: kept instance labels of the blending part.
        max_pairs: memory bound of the torch compositing plan (see `build_plan`).
        backend: where the (pixel, Gaussian) compositing weights come from: "gsplat" (CUDA; gsplat's own
            kernels, `snd.splat.contrib`), "torch" (`build_plan`, any device; ~1e-4 from gsplat) or "auto"
            (gsplat on CUDA when installed).
        chunk: jobs built together (memory ~ chunk x (pixels + Gaussians) x the kept labels, in float32), or a
            `ChunkSize`, which a chunk out of GPU memory halves in place
            (retried, same result; an int is treated as a fresh ChunkSize for this call).

    The direct part accumulates in float64; the instance part comes from snd's slot kernel or gsplat's backward
    kernel (float32, atomic adds: run to run it may differ in the last bits on a GPU) and a float32 sparse product.
    """
    from snd.splat.operator import TransferOperator  # the dataclass module imports this one

    if upsample not in ("mask", "bilinear"):
        raise ValueError(f"upsample must be 'mask' or 'bilinear', got {upsample!r}")
    N = int(pair.numel())
    B = len(gaussians)
    V, H, W = gaussians[0].shape
    assert all(g.shape == (V, H, W) for g in gaussians), "every pair's Gaussians must have the same [V, H, W]"
    assert ctx_masks.shape == (B, V, H, W), f"ctx_masks must be [B, V, H, W] = {(B, V, H, W)}, got {tuple(ctx_masks.shape)}"
    assert tgt_masks.dim() == 3 and tgt_masks.shape[0] == N, f"tgt_masks must be [N={N}, Ht, Wt], got {tuple(tgt_masks.shape)}"
    h2, w2 = int(out_hw[0]), int(out_hw[1])
    Ht, Wt = int(tgt_masks.shape[1]), int(tgt_masks.shape[2])
    if h2 > Ht or w2 > Wt:
        raise ValueError(f"out_hw {(h2, w2)} must not exceed the render size {(Ht, Wt)} (the target is downsampled)")
    r = rules(protocol)
    device = gaussians[0].means.device
    h, w = int(ctx_hw[0]), int(ctx_hw[1])
    masks = ctx_masks.to(device).reshape(B * V, H, W) if upsample == "mask" else None
    ucols, uw = _upsample_taps(masks, B * V, h, w, H, W, r, device)  # [B*G, 4]; columns over all B*V views
    G, J = V * H * W, V * h * w
    ucols = ucols - torch.div(torch.arange(B * G, device=device), G, rounding_mode="floor")[:, None] * J  # per pair
    dpix, dwt = _downsample_taps(Ht, Wt, h2, w2, device)
    transposed: dict[int, Tensor] = {}

    def up_t(p: int) -> Tensor:
        """Pair p's upsampling taps transposed, as a CSR [J, G] float32 (built once per call and pair)."""
        if p not in transposed:
            # every pair's taps have the same columns (`_transposed_structure`), as have every call's with these grids
            crow, col, slot = _cached_structure((V, H, W, h, w, r.grid, str(device)), ucols[:G], J)
            vals = torch.zeros(col.numel(), dtype=torch.float32, device=device)
            vals.index_add_(0, slot, uw[p * G:(p + 1) * G].reshape(-1).float())
            with warnings.catch_warnings():  # torch's note on CSR being in beta
                warnings.simplefilter("ignore", UserWarning)
                transposed[p] = torch.sparse_csr_tensor(crow, col, vals, (J, G))
        return transposed[p]

    # per render pixel, the patch that reads it in each tap slot (-1: none); built once per call
    P = h2 * w2
    pix2patch = torch.full((4, Ht * Wt), -1, dtype=torch.long, device=device)
    pix2patch.scatter_(1, dpix, torch.arange(P, device=device).expand(4, P).contiguous())
    reads = (pix2patch >= 0).sum(0)
    taps = reads > 0  # the only pixels whose (pixel, Gaussian) list the direct part reads
    # a pixel read by one (slot, patch) at most (any downsampling by 2 or more): one lookup per entry gives its
    # patch and weight; otherwise `_assemble` makes one pass per tap slot
    lookup = None
    if not bool(reads.max() > 1):
        wq = torch.zeros(Ht * Wt, dtype=dwt.dtype, device=device).scatter_(0, dpix.reshape(-1), dwt.reshape(-1))
        lookup = (pix2patch.max(0).values, wq)
    const = dict(ucols=ucols, uw=uw, up_t=up_t, G=G, J=J, dpix=dpix, dwt=dwt, pix2patch=pix2patch, lookup=lookup,
                 out_hw=(h2, w2), r=r, row_cap=int(row_cap), inst_cap=int(inst_cap))
    label_knobs = dict(dpix=dpix, dwt=dwt, r=r, blend_w=blend_weight if blend else 0.0, inst_cap=int(inst_cap))
    pair_host = pair.cpu()  # the jobs' pairs as the host reads them (a caller's host tensor: no sync per chunk)
    pair = pair.to(device)
    size = chunk if isinstance(chunk, ChunkSize) else ChunkSize(chunk)
    parts = []
    s = 0
    while s < N:
        sl = slice(s, min(N, s + size.size))
        try:
            lb: dict = {}
            tm = tgt_masks[sl].to(device)

            def field(alpha: Tensor, tm=tm, lb=lb) -> SlotField:
                lb.update(_labels(tm, alpha, **label_knobs))
                return lb["field"]

            def direct(lb=lb, sl=sl) -> dict:  # snd's direct-rows kernel's inputs (the default on CUDA)
                coef = dwt[None] * (1.0 - lb["b_pix"].reshape(sl.stop - sl.start, Ht * Wt)[:, dpix])  # [n, 4, P]
                return dict(tap_pix=dpix, tap_coef=coef, pair=pair[sl], ucols=ucols, uw=uw, row_cap=int(row_cap))

            c = contributions(gaussians, pair_host[sl], tgt_K[sl].to(device, torch.float32),
                              tgt_w2c[sl].to(device, torch.float32), Ht, Wt, near=near, far=far, backend=backend,
                              max_pairs=max_pairs, pixels=taps, adjoint=field, direct=direct)
            parts.append(_assemble(c, lb, pair[sl], pair_host[sl].tolist(), **const))
            s = sl.stop
            continue
        except torch.OutOfMemoryError:
            if sl.stop - sl.start == 1:
                raise
        # after the except block, so its traceback no longer holds the failed chunk's tensors
        c = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        size.shrink(sl.stop - sl.start)
    if not parts:
        P, Kc = h2 * w2, int(inst_cap)
        z = lambda *s, dt=torch.float32: torch.zeros(*s, dtype=dt, device=device)  # noqa: E731
        return TransferOperator(cols=z(0, P, row_cap, dt=torch.long), vals=z(0, P, row_cap), inst=z(0, Kc, J),
                                inst_ids=z(0, P, 4, dt=torch.long), inst_w=z(0, P, 4), valid=z(0, P, dt=torch.bool),
                                dropped_direct=z(0), dropped_inst=z(0), max_row_nnz=z(0, dt=torch.long))
    return TransferOperator(**{k: torch.cat([p[k] for p in parts]) for k in parts[0]})


def _labels(tgt_masks: Tensor, alpha: Tensor, *, dpix: Tensor, dwt: Tensor, r: Rules, blend_w: float,
            inst_cap: int) -> dict:
    """Per chunk of jobs, from the renders' alpha: coverage, each pixel's label and blend weight, and the
    `inst_cap` labels with the most blend weight per job (their slot; -1 for the others), plus the field
    whose render adjoint is the instance part, one channel per pixel (a `SlotField`):
    Y[n, q, slot(label q)] = 1 / |label q's pixels in the means| for pixels q in the means. Labels are sorted
    by (job, label), as a per-job `torch.unique`."""
    device = tgt_masks.device
    N, Ht, Wt = tgt_masks.shape
    Q = Ht * Wt
    covered = (alpha > r.coverage_threshold).reshape(N, Q)
    in_mean = torch.ones_like(covered) if r.mean_over_all else covered  # pixels the segment means run over
    lab = tgt_masks.reshape(N, Q).long()
    lo = lab.min()
    span = lab.max() - lo + 1
    # [N*Q]: the label index of each pixel; per label, its pixels in the means
    labels, inv, counts = _dense_unique((torch.arange(N, device=device)[:, None] * span + (lab - lo)).reshape(-1),
                                        int(span) * N, in_mean.reshape(-1))
    lab_job = torch.div(labels, span, rounding_mode="floor")
    counts = counts.to(f64)
    b_pix = (counts > 0).to(f64)[inv] * blend_w  # [N*Q]: only labels with a pixel in the means are blended
    tap_lab = inv.reshape(N, Q)[:, dpix]  # [N, 4, P]
    tap_w = dwt[None] * b_pix.reshape(N, Q)[:, dpix]  # [N, 4, P]
    mass = torch.zeros(labels.numel(), dtype=f64, device=device).index_add_(0, tap_lab.reshape(-1), tap_w.reshape(-1))
    # ranked per job among its labels with mass (the others in a group of their own, N, and given no slot): no
    # `nonzero` of the used ones, which would wait for the GPU
    used = mass > 0
    o, rank = _rank_in_group(torch.where(used, lab_job, N), rank_score(mass))
    slot = torch.empty_like(o).scatter_(0, o, torch.where(used[o] & (rank < inst_cap), rank, -1))
    n_slots = int(slot.max()) + 1 if slot.numel() else 0  # a host sync: the field's channel count
    ps = torch.where(in_mean.reshape(-1), slot[inv], -1)
    value = torch.where(ps >= 0, 1.0 / counts[inv].clamp_min(1), 0.0).float()
    field = SlotField(ps.reshape(N, Ht, Wt), value.reshape(N, Ht, Wt), n_slots)
    return dict(covered=covered, b_pix=b_pix, tap_lab=tap_lab, tap_w=tap_w, slot=slot, field=field)


def _job_index(jobs: list[int], device: torch.device) -> slice | Tensor:
    """Jobs [n, ...] as an index: a slice when they are consecutive (stage one's jobs are, pair by pair), else a
    tensor copied without waiting. Why: a Python list as an index is copied to the GPU with a blocking copy, which
    waits for every kernel queued on the stream (two such waits per pair and chunk, in the middle of the build)."""
    if jobs == list(range(jobs[0], jobs[-1] + 1)):
        return slice(jobs[0], jobs[-1] + 1)
    return torch.tensor(jobs, dtype=torch.long).to(device, non_blocking=True)


def _assemble(c, lb: dict, pair_sl: Tensor, pairs: list[int], *, ucols: Tensor, uw: Tensor,
              up_t: Callable[[int], Tensor], G: int, J: int, dpix: Tensor, dwt: Tensor, pix2patch: Tensor,
              lookup: tuple[Tensor, Tensor] | None, out_hw: tuple[int, int], r: Rules, row_cap: int,
              inst_cap: int) -> dict:
    """The operators of one chunk of jobs from their contributions `c` (`snd.splat.contrib.Contributions`,
    listed at the downsampling's tap pixels, with the adjoint of `lb["field"]`) and their labels `lb`; `pairs` is
    `pair_sl` as a list."""
    N, P = lb["tap_w"].shape[0], out_hw[0] * out_hw[1]
    Q = lb["covered"].shape[1]
    device = dpix.device
    if c.direct is not None:  # snd's kernel summed and capped the rows already
        cols, ell, nnz, sums = c.direct
        dropped_direct = sums[..., 1].sum(1) / sums[..., 0].sum(1).clamp_min(1e-300)
    else:
        cols, ell, nnz, dropped_direct = _direct_glue(c, lb, pair_sl, N=N, P=P, Q=Q, ucols=ucols, uw=uw, G=G, J=J,
                                                      dwt=dwt, pix2patch=pix2patch, lookup=lookup, row_cap=row_cap)

    # instance part: per job and kept label, the render's adjoint of the label's mean selector (a
    # Gaussian's summed weight over the label's pixels in the means, over their count), sent through the
    # upsampling taps to the context patches
    inst = torch.zeros(N, inst_cap, J, dtype=torch.float32, device=device)
    n_slots = c.adjoint.shape[-1]
    if n_slots:
        for p in sorted(set(pairs)):  # one sparse product per pair for all its jobs' label columns
            jobs = _job_index([n for n in range(N) if pairs[n] == p], device)
            A = c.adjoint[jobs].permute(1, 0, 2).reshape(G, -1)  # [G, jobs x slots]
            out = torch.sparse.mm(up_t(p), A).reshape(J, -1, n_slots)
            inst[jobs, :n_slots] = out.permute(1, 2, 0)
    tap_slot = lb["slot"][lb["tap_lab"]]  # [N, 4, P]
    keep_tap = tap_slot >= 0
    tap_w = lb["tap_w"]
    inst_ids = torch.where(keep_tap, tap_slot, 0).transpose(1, 2).contiguous()  # [N, P, 4]
    inst_w = torch.where(keep_tap, tap_w, 0.0).transpose(1, 2).contiguous()
    dropped_inst = torch.where(keep_tap, 0.0, tap_w.abs()).sum((1, 2)) / tap_w.abs().sum((1, 2)).clamp_min(1e-300)

    Ht, Wt = lb["field"].slot.shape[1:3]
    valid = coverage_to_patches(lb["covered"].reshape(N, Ht, Wt), out_hw, r).reshape(N, P)
    return dict(cols=cols.reshape(N, P, row_cap), vals=ell.reshape(N, P, row_cap).float(),
                inst=inst, inst_ids=inst_ids, inst_w=inst_w.float(), valid=valid,
                dropped_direct=dropped_direct.float().clamp_min(0), dropped_inst=dropped_inst.float().clamp_min(0),
                max_row_nnz=nnz.max(1).values if P else torch.zeros(N, dtype=torch.long, device=device))
