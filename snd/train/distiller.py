"""The networks of one SnD run and the three computations of a step.

    teacher_features(ctx images)            -> context patch features           (no grad, plain ViT)
    build_targets(ctx feats, scaffold, ...)  -> target patch features + valid    (snd.splat.target)
    student_loss(tgt images, targets, valid) -> scalar                           (grad into LoRA + head)

Why split this way: each piece is a pure function of tensors with static shapes (for a fixed input
size), so the student and teacher computations can be `torch.compile`d independently of the renderer,
and `snd bench distill` can time each phase.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from snd.models.backbone import create_backbone, embed_dim, extract, normalize, patch_size, set_input_size
from snd.models.ema import EmaTeacher
from snd.models.head import DINOHead
from snd.models.lora import LoraSpec, apply_lora
from snd.models.loss import cosine_loss, dino_ce, feature_mse_loss
from snd.pipeline.config import DistillConfig
from snd.splat.gaussians import PixelGaussians
from snd.splat.protocol import rules

log = logging.getLogger(__name__)

__all__ = ["Distiller", "TargetFn", "build_base_backbone", "lora_spec"]

# (ctx_feats [V,C,h,w], gaussians, ctx_masks [V,H,W], tgt_mask [H,W], tgt_K [3,3], tgt_w2c [4,4], out_hw,
#  *, upsample, blend, backend, protocol) -> (feats [C,h2,w2], valid [h2,w2])
TargetFn = Callable[..., tuple[Tensor, Tensor]]


def lora_spec(cfg: DistillConfig) -> LoraSpec:
    return LoraSpec(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, patch_embed=cfg.lora_patch_embed)


def build_base_backbone(cfg: DistillConfig, base_file: Path | None = None) -> nn.Module:
    """The run's base backbone at the weights' native grid: from `base_file` (a run's saved base, so a
    resume needs neither --weights nor the same random draw) or from cfg (weights / random init)."""
    if base_file is not None and base_file.is_file():
        from snd.train.checkpoint import load_base

        return load_base(create_backbone(cfg.model, init="random"), base_file)
    return create_backbone(cfg.model, weights=cfg.weights if cfg.init == "pretrained" else None, init=cfg.init)


def rigid_inverse(c2w: Tensor) -> Tensor:
    """[..., 4, 4] camera-to-world -> world-to-camera as [R^T, -R^T t] (exact for rigid poses; unlike
    torch.linalg.inv on CUDA it never waits for the GPU to report singular matrices). Batched, so stage one
    inverts a whole batch's target poses in one call."""
    assert c2w.shape[-2:] == (4, 4), f"expected [..., 4, 4], got {tuple(c2w.shape)}"
    Rt = c2w[..., :3, :3].transpose(-1, -2)
    out = torch.zeros_like(c2w)
    out[..., :3, :3] = Rt
    out[..., :3, 3:] = -(Rt @ c2w[..., :3, 3:])
    out[..., 3, 3] = 1.0
    return out


class Distiller(nn.Module):
    """Student (LoRA ViT + DINO head) and EMA teacher for one DistillConfig.

    Ablations: loss "cosine" (C) and `feature_render_loss` (G) train without a head; `frozen_teacher` (D)
    and G never update the teacher; `render_to_context` (E) is handled by the batch builder."""

    def __init__(self, cfg: DistillConfig, base: nn.Module):
        super().__init__()
        self.cfg = cfg
        set_input_size(base, (cfg.img_height, cfg.img_width))
        self.student = apply_lora(base, lora_spec(cfg)).train()
        C = embed_dim(self.student)
        self.uses_head = cfg.loss == "dino" and not cfg.feature_render_loss
        self.student_head = (DINOHead(C, hidden=cfg.head_hidden, bottleneck=cfg.head_bottleneck,
                                      prototypes=cfg.head_prototypes) if self.uses_head else None)
        self.teacher = EmaTeacher(self.student, self.student_head, momentum=cfg.ema_momentum)
        self.ema_enabled = not (cfg.frozen_teacher or cfg.feature_render_loss)
        self.patch = patch_size(self.student)
        self.grid = (cfg.img_height // self.patch, cfg.img_width // self.patch)
        self.ce_dtype: torch.dtype | None = None  # matmul dtype of the fused CE (the autocast dtype; set by StepRunner)
        self.loss_over_all = rules(cfg.targets_protocol).loss_over_all

    # ---- parameters --------------------------------------------------------------------------------
    def trainable(self) -> dict[str, nn.Parameter]:
        """Name -> parameter of everything the optimiser updates (LoRA adapters, and the head if used)."""
        out = {f"student.{n}": p for n, p in self.student.named_parameters() if p.requires_grad}
        if self.student_head is not None:
            out.update({f"student_head.{n}": p for n, p in self.student_head.named_parameters()})
        return out

    def teacher_state(self) -> dict[str, Tensor]:
        """The teacher's tensors that differ from the base weights (EMA LoRA + EMA head)."""
        out = {f"teacher.{n}": p for n, p in self.teacher.ema_backbone.named_parameters() if ".lora_" in n}
        if self.teacher.head is not None:
            out.update({f"teacher_head.{n}": p for n, p in self.teacher.head.named_parameters()})
        return out

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        self.teacher.train(False)
        return self

    @torch.no_grad()
    def maybe_update_teacher(self, step: int) -> bool:
        """EMA update after optimizer step `step` (1-based) when step % ema_every == 0."""
        if not self.ema_enabled or step % self.cfg.ema_every != 0:
            return False
        self.teacher.update(self.student, self.student_head)
        return True

    # ---- the three computations --------------------------------------------------------------------
    @torch.no_grad()
    def teacher_features(self, images01: Tensor) -> Tensor:
        """Context images [N, 3, H, W] in [0, 1] -> teacher patch features [N, C, h, w]."""
        return extract(self.teacher.backbone, normalize(self.teacher.backbone, images01))[1]

    @torch.no_grad()
    def build_targets(self, ctx_feats: Tensor, batch: dict, target_fn: TargetFn) -> tuple[Tensor, Tensor]:
        """ctx_feats [B, 2, C, h, w] -> targets in each pair's target view ([B, C, h, w], valid [B, h, w]):
        through the batch's stored operators when it carries them (``op_*``, see `use_stored_operators`),
        else by rendering each pair with `target_fn`."""
        if "op_cols" in batch and self.cfg.targets != "render":
            from snd.cache.opcodec import operator_from_batch
            from snd.splat.operator import apply_operator

            return apply_operator(operator_from_batch(batch), ctx_feats, self.grid)
        B = ctx_feats.shape[0]
        feats, valid = [], []
        w2c = rigid_inverse(batch["tgt_c2w"].float())  # [B, 4, 4], one call for the batch
        for b in range(B):
            g = PixelGaussians(batch["means"][b], batch["quats"][b], batch["scales"][b], batch["opacities"][b])
            f, v = target_fn(ctx_feats[b].float(), g, batch["ctx_masks"][b], batch["tgt_mask"][b], batch["tgt_K"][b],
                             w2c[b], self.grid, upsample=self.cfg.upsample,
                             blend=self.cfg.blend, backend=self.cfg.renderer, protocol=self.cfg.targets_protocol)
            feats.append(f)
            valid.append(v)
        return torch.stack(feats), torch.stack(valid)

    def student_loss(self, tgt_images01: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
        """Target images [B, 3, H, W], target features [B, C, h, w], valid [B, h, w] -> scalar loss.

        The "official" protocol (the official training step) sets the student's patch features AND the
        target to zero at uncovered patches and averages over all patches (the zero rows still go through
        both heads); "snd" averages over the covered patches only. No host sync either way."""
        B, C, h, w = targets.shape
        assert valid.shape == (B, h, w), f"valid must be [B, h, w] = {(B, h, w)}, got {tuple(valid.shape)}"
        patches = extract(self.student, normalize(self.student, tgt_images01))[1]  # [B, C, h, w]
        assert patches.shape == targets.shape, f"student patches {tuple(patches.shape)} vs targets {tuple(targets.shape)}"
        s_tok = patches.permute(0, 2, 3, 1).reshape(B * h * w, C)
        t_tok = targets.permute(0, 2, 3, 1).reshape(B * h * w, C)
        v = valid.reshape(B * h * w)
        if self.loss_over_all:
            keep = v[:, None].to(s_tok.dtype)
            s_tok, t_tok = s_tok * keep, t_tok * keep.to(t_tok.dtype)
            v = torch.ones_like(v)
        if self.cfg.feature_render_loss:
            return feature_mse_loss(s_tok, t_tok, v)
        if self.cfg.loss == "cosine":
            return cosine_loss(s_tok, t_tok, v)
        with torch.no_grad():
            z_t = self.teacher.head.bottleneck(t_tok)
            w_t = self.teacher.head.prototypes()
        z_s = self.student_head.bottleneck(s_tok)
        w_s = self.student_head.prototypes()
        return dino_ce(z_s, w_s, z_t, w_t, v, student_temp=self.cfg.student_temp, teacher_temp=self.cfg.teacher_temp,
                       compute_dtype=self.ce_dtype or z_s.dtype)
