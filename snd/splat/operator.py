"""The per-pair transfer operator: everything from teacher patch features to the loss target as one
fixed linear map, built once from the cached scaffold.

Why: every step of `snd.splat.target.target_features` after the teacher (mask-aware upsample -> lift ->
alpha-composited splat -> semantic blend -> bilinear downsample) is linear in the teacher's context patch
features, and its coefficients depend only on the scaffold, the masks and the cameras, which stage one
fixes. Building the operator once per (pair, target) replaces a ~60 ms render per step (H100, ViT-S) by a
scatter and two small dense matmuls with static shapes (what a captured CUDA graph needs).

With F = context patch features flattened to [J = V*h*w, C] (row j = v*h*w + i*w + k), P = h2*w2 target
patches and R the render's compositing weights (`render_torch.build_plan`), U the upsampling taps, D the
bilinear downsampling taps, S the pixels a segment mean runs over (all pixels under the "official"
protocol, covered ones under "snd", `snd.splat.protocol`), b_q = blend_weight if pixel q's label has a
pixel in S (else 0):

    target[p] = sum_q D[p,q] (1 - b_q) (R U F)[q]                        "direct" part   [P, J] sparse
              + sum_k T[p,k] * mean_{q in S, label k} (R U F)[q]          "instance" part [P, K] x [K, J]
    T[p,k]    = sum_{q: label(q) = k} D[p,q] b_q

The protocol's upsampling grid and fallback are in U, its coverage rule in `valid`; the operator is built
for one protocol and the store records which (`snd.cache.schema.OperatorSpec.protocol`).

Storage (ELL, static shapes): the direct part keeps the `row_cap` largest coefficients of every patch row
(cols [P, R_cap], vals [P, R_cap]); the instance part keeps the `inst_cap` labels with the most blend weight
(inst [K_cap, J], and 4 (label slot, weight) taps per patch). Coefficients beyond a cap are dropped and
the dropped fraction of absolute weight is reported (`dropped_direct`, `dropped_inst`), so a user sees
when a cap is too small; at the defaults it is 0 on procedural scenes (tested: the operator then equals
`target_features` to float32 round-off).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from snd.splat.gaussians import PixelGaussians
from snd.splat.operator_build import build_operators

__all__ = ["TransferOperator", "apply_operator", "build_operator", "build_operators", "stack_operators"]


@dataclass
class TransferOperator:
    """One target's operator (leading batch dims allowed: [B, ...] after `stack_operators`).

    cols [P, R] long, vals [P, R] float: direct part in ELL form (unused slots: col 0, val 0).
    inst [K, J] float: per kept label, the mean over its pixels in S of the rendered feature, as
        weights on the J context patches. inst_ids [P, 4] long, inst_w [P, 4] float: each patch's 4
        downsampling taps into those label rows (weight 0 for unused taps).
    valid [P] bool: the patch is covered under the protocol's rule (as `target_features`).
    dropped_direct, dropped_inst: [] float, fraction of absolute coefficient mass lost to the caps.
    max_row_nnz: [] long, the largest number of nonzeros of a direct row (<= R means exact).
    """

    cols: Tensor
    vals: Tensor
    inst: Tensor
    inst_ids: Tensor
    inst_w: Tensor
    valid: Tensor
    dropped_direct: Tensor
    dropped_inst: Tensor
    max_row_nnz: Tensor

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "TransferOperator":
        """Move every tensor to `device`; `dtype` only applies to the float coefficient tensors."""
        out = {}
        for f in fields(self):
            t = getattr(self, f.name)
            out[f.name] = t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else t.dtype)
        return TransferOperator(**out)

    def as_dict(self, prefix: str = "op_") -> dict[str, Tensor]:
        return {prefix + f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Tensor], prefix: str = "op_") -> "TransferOperator":
        return cls(**{f.name: d[prefix + f.name] for f in fields(cls)})


def stack_operators(ops: list[TransferOperator]) -> TransferOperator:
    """[TransferOperator] of equal shapes -> one with a leading batch dim."""
    return TransferOperator(**{f.name: torch.stack([getattr(o, f.name) for o in ops]) for f in fields(TransferOperator)})


@torch.no_grad()
def build_operator(
    gaussians: PixelGaussians,  # [V, H, W]
    ctx_masks: Tensor,  # [V, H, W] int
    tgt_mask: Tensor,  # [Ht, Wt] int
    tgt_K: Tensor,  # [3, 3]
    tgt_w2c: Tensor,  # [4, 4]
    ctx_hw: tuple[int, int],
    out_hw: tuple[int, int],
    **knobs,
) -> TransferOperator:
    """The operator equal to ``target_features(feats, ...)`` for any feats [V, C, *ctx_hw].

    One job of `snd.splat.operator_build.build_operators` (stage one builds many at once), which documents the
    keyword knobs (upsample, blend, blend_weight, protocol, row_cap, inst_cap, near, far, max_pairs, backend);
    the positional arguments are one target's, without the batch dimension.
    """
    V, H, W = gaussians.shape
    assert ctx_masks.shape == (V, H, W), f"ctx_masks must be [V, H, W] = {(V, H, W)}, got {tuple(ctx_masks.shape)}"
    assert tgt_mask.dim() == 2, f"tgt_mask must be [Ht, Wt], got {tuple(tgt_mask.shape)}"
    dev = gaussians.means.device
    ops = build_operators([gaussians], ctx_masks[None], tgt_mask[None], tgt_K[None], tgt_w2c[None],
                          torch.zeros(1, dtype=torch.long, device=dev), ctx_hw, out_hw, **knobs)
    return TransferOperator(**{f.name: getattr(ops, f.name)[0] for f in fields(TransferOperator)})


def apply_operator(op: TransferOperator, ctx_feats: Tensor, out_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """ctx_feats [B, V, C, h, w] (or [V, C, h, w]) -> (targets [B, C, h2, w2] float32, valid [B, h2, w2]).

    Static shapes and no host syncs: scatter the ELL rows into a dense [P, J] matrix (52 MB at
    2542 x 5084), then two matmuls. Coefficients are promoted to float32 whatever their stored dtype.
    """
    single = ctx_feats.dim() == 4
    if single:
        ctx_feats = ctx_feats[None]
        op = TransferOperator(**{f.name: getattr(op, f.name)[None] for f in fields(TransferOperator)})
    B, V, C, h, w = ctx_feats.shape
    h2, w2 = out_hw
    P, J = h2 * w2, V * h * w
    assert op.cols.shape[:2] == (B, P), f"operator rows {tuple(op.cols.shape[:2])} vs (B, P) = {(B, P)}"
    assert op.inst.shape[-1] == J, f"operator columns {op.inst.shape[-1]} vs J = V*h*w = {J}"
    F = ctx_feats.float().permute(0, 1, 3, 4, 2).reshape(B, J, C)
    A = torch.zeros(B, P, J, dtype=torch.float32, device=F.device)
    A.scatter_add_(2, op.cols, op.vals.float())
    T = torch.zeros(B, P, op.inst.shape[1], dtype=torch.float32, device=F.device)
    T.scatter_add_(2, op.inst_ids, op.inst_w.float())
    out = torch.bmm(A, F) + torch.bmm(T, torch.bmm(op.inst.float(), F))  # [B, P, C]
    out = out.transpose(1, 2).reshape(B, C, h2, w2)
    valid = op.valid.reshape(B, h2, w2)
    if single:
        return out[0], valid[0]
    return out, valid
