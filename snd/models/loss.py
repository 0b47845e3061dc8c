"""Distillation losses over the valid (rendered) patches of the target view.

`dino_ce` is the paper's loss: per patch, H(softmax(teacher_logits / t_t), log_softmax(student_logits / t_s)),
averaged over the patches marked valid. Which patches those are is the caller's rule
(`snd.train.distiller.Distiller.student_loss`): the official code zeroes the student's and the target's
features at uncovered patches and averages over ALL patches (valid = all), which is not the same as
leaving them out (that weights every step as if fully covered: the "snd" protocol). It is fused and chunked: logits are
built a chunk of patches at a time from the normalised bottleneck [N, D] and the prototypes [K, D], and the
gradients w.r.t. the student bottleneck and prototypes are formed in the same pass, so no [N, K] fp32
tensor (2,542 x 65,536 x 4 B = 666 MB, plus its softmax and its gradient) ever exists.
`dino_ce_reference` is the slow obvious formula the tests compare against.

Ablations: `cosine_loss` (C: cosine on patch features, no head) and `feature_mse_loss` (G: direct
feature-rendering loss on a fixed teacher).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cosine_loss", "dino_ce", "dino_ce_reference", "feature_mse_loss", "masked_mean"]


def masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean of `values` [N] over `valid` [N] (bool); 0 when nothing is valid. No host sync."""
    w = valid.to(values.dtype)
    return (values * w).sum() / w.sum().clamp_min(1.0)


def dino_ce_reference(z_s: Tensor, w_s: Tensor, z_t: Tensor, w_t: Tensor, valid: Tensor, *,
                      student_temp: float = 1.0, teacher_temp: float = 1.0) -> Tensor:
    """Naive DINO cross-entropy (full [N, K] logits in fp32). Shapes as in `dino_ce`."""
    t = F.softmax((z_t.float() @ w_t.float().t()) / teacher_temp, dim=-1).detach()
    logq = F.log_softmax((z_s.float() @ w_s.float().t()) / student_temp, dim=-1)
    return masked_mean(-(t * logq).sum(-1), valid)


class _FusedDinoCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z_s, w_s, z_t, w_t, valid, student_temp, teacher_temp, chunk, compute_dtype):
        N = z_s.shape[0]
        w = valid.to(torch.float32)
        denom = w.sum().clamp_min(1.0)
        zs_c, ws_c = z_s.to(compute_dtype), w_s.to(compute_dtype)
        zt_c, wt_c = z_t.to(compute_dtype), w_t.to(compute_dtype)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_z = torch.empty(z_s.shape, dtype=torch.float32, device=z_s.device) if need_grad else None
        grad_w = torch.zeros(w_s.shape, dtype=torch.float32, device=w_s.device) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=z_s.device)
        for a in range(0, N, chunk):
            b = min(a + chunk, N)
            p_t = torch.softmax((zt_c[a:b] @ wt_c.t()).float() / teacher_temp, dim=-1)  # [c, K]
            s = (zs_c[a:b] @ ws_c.t()).float() / student_temp  # [c, K]
            lse = torch.logsumexp(s, dim=-1, keepdim=True)  # [c, 1]
            # H(p, q) = lse - sum_k p_k s_k  (sum_k p_k = 1)
            loss_rows = lse.squeeze(-1) - (p_t * s).sum(-1)  # [c]
            total = total + (loss_rows * w[a:b]).sum()
            if need_grad:
                # d loss_row / d logits_raw = (softmax(s) - p_t) / t_s, weighted by the row's mask
                g = (torch.exp(s - lse) - p_t) * (w[a:b] / student_temp)[:, None]  # [c, K]
                g = g.to(compute_dtype)
                grad_z[a:b] = (g @ ws_c).float()
                grad_w += (g.t() @ zs_c[a:b]).float()
        if need_grad:
            ctx.save_for_backward(grad_z / denom, grad_w / denom)
            ctx.in_dtypes = (z_s.dtype, w_s.dtype)
        return total / denom

    @staticmethod
    def backward(ctx, grad_out):
        grad_z, grad_w = ctx.saved_tensors
        dz_dtype, dw_dtype = ctx.in_dtypes
        return ((grad_z * grad_out).to(dz_dtype), (grad_w * grad_out).to(dw_dtype),
                None, None, None, None, None, None, None)


def dino_ce(z_s: Tensor, w_s: Tensor, z_t: Tensor, w_t: Tensor, valid: Tensor, *,
            student_temp: float = 1.0, teacher_temp: float = 1.0, chunk: int = 512,
            compute_dtype: torch.dtype | None = None) -> Tensor:
    """Fused, chunked DINO cross-entropy averaged over valid patches.

    Args:
        z_s: [N, D] student bottleneck (L2-normalised), gets a gradient.
        w_s: [K, D] student prototypes (weight-normed), gets a gradient.
        z_t: [N, D] teacher bottleneck of the target features (no gradient).
        w_t: [K, D] teacher prototypes (no gradient).
        valid: [N] bool, patches with rendered coverage.
        student_temp, teacher_temp: softmax temperatures (official: 1, 1).
        chunk: patches per chunk (peak extra memory ~ 4 x chunk x K x 4 bytes).
        compute_dtype: matmul dtype (default: bf16 under CUDA autocast, else the inputs' dtype);
            softmax / logsumexp / accumulation are always fp32.

    Returns:
        scalar loss (fp32).
    """
    N, D = z_s.shape
    K = w_s.shape[0]
    assert w_s.shape == (K, D), f"w_s must be [K, D] = [{K}, {D}], got {tuple(w_s.shape)}"
    assert z_t.shape == (N, D), f"z_t must be [N, D] = [{N}, {D}], got {tuple(z_t.shape)}"
    assert w_t.shape == (K, D), f"w_t must be [K, D] = [{K}, {D}], got {tuple(w_t.shape)}"
    assert valid.shape == (N,), f"valid must be [N] = [{N}], got {tuple(valid.shape)}"
    if compute_dtype is None:
        if z_s.is_cuda and torch.is_autocast_enabled("cuda"):
            compute_dtype = torch.get_autocast_dtype("cuda")
        else:
            compute_dtype = z_s.dtype
    with torch.autocast(z_s.device.type, enabled=False):
        return _FusedDinoCE.apply(z_s, w_s, z_t.detach(), w_t.detach(), valid, float(student_temp),
                                  float(teacher_temp), int(chunk), compute_dtype)


def cosine_loss(student: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Ablation C: mean over valid patches of 1 - cos(student [N, C], target [N, C])."""
    cos = F.cosine_similarity(student.float(), target.float().detach(), dim=-1, eps=1e-6)
    return masked_mean(1.0 - cos, valid)


def feature_mse_loss(student: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Ablation G: mean over valid patches of the channel-mean squared error to the rendered features."""
    return masked_mean((student.float() - target.float().detach()).square().mean(-1), valid)
