"""The EMA teacher: a momentum copy of the whole student (LoRA backbone + DINO head), run as a plain ViT.

Official SnD: teacher = deep copy of the LoRA student; every 10 optimizer steps every parameter pair is
updated θt ← m·θt + (1 - m)·θs with m = 0.999; no gradients reach the teacher. Here:
  - `ema_backbone` / `head` hold the EMA parameters (same module tree as the student, adapters included);
  - the update is `lerp` over ALL parameter pairs: θt + (1 - m)(θs - θt) is the same formula, and leaves
    the frozen base weights bit-exactly unchanged (θs == θt), where m·θ + (1 - m)·θ may round;
  - `backbone` is a plain timm ViT with W = W0 + ΔW(LoRA) re-merged after each update: the teacher forward
    has no adapter wrappers (fewer kernels). In eval mode this is the same function as `ema_backbone`
    (LoRA dropout is only active in training; the official Lightning code leaves the teacher in train mode,
    so its teacher forwards were also perturbed by LoRA dropout — snd's teacher is deterministic).
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from snd.models.lora import merge_lora_into, merged_copy

__all__ = ["EmaTeacher", "ema_update_"]


@torch.no_grad()
def ema_update_(teacher: list[Tensor], student: list[Tensor], momentum: float) -> None:
    """In place: t ← t + (1 - momentum)(s - t) for every pair (one fused foreach kernel per dtype/device)."""
    assert len(teacher) == len(student), f"{len(teacher)} teacher vs {len(student)} student tensors"
    for t, s in zip(teacher, student):
        assert t.shape == s.shape, f"EMA pair shape mismatch: teacher {tuple(t.shape)} vs student {tuple(s.shape)}"
    torch._foreach_lerp_(teacher, student, 1.0 - momentum)


class EmaTeacher(nn.Module):
    """Teacher = EMA of (student backbone with LoRA, student head); forward through a merged plain ViT."""

    def __init__(self, student_backbone: nn.Module, student_head: nn.Module | None, *, momentum: float = 0.999):
        super().__init__()
        self.momentum = float(momentum)
        self.ema_backbone = copy.deepcopy(student_backbone).eval().requires_grad_(False)
        self.head = copy.deepcopy(student_head).eval().requires_grad_(False) if student_head is not None else None
        self.backbone = merged_copy(self.ema_backbone).eval()

    def train(self, mode: bool = True) -> "EmaTeacher":
        """The teacher is always in eval mode (no LoRA dropout)."""
        return super().train(False)

    def _pairs(self, student_backbone: nn.Module, student_head: nn.Module | None) -> tuple[list[Tensor], list[Tensor]]:
        t = list(self.ema_backbone.parameters())
        s = list(student_backbone.parameters())
        if self.head is not None and student_head is not None:
            t += list(self.head.parameters())
            s += list(student_head.parameters())
        return [p.data for p in t], [p.data for p in s]

    @torch.no_grad()
    def update(self, student_backbone: nn.Module, student_head: nn.Module | None) -> None:
        """EMA step over all parameters, then re-merge LoRA into the plain teacher backbone."""
        t, s = self._pairs(student_backbone, student_head)
        ema_update_(t, s, self.momentum)
        self.sync_merged()

    @torch.no_grad()
    def sync_merged(self) -> None:
        """Rewrite the plain backbone's adapted weights from `ema_backbone` (after an update or a restore)."""
        merge_lora_into(self.backbone, self.ema_backbone)
