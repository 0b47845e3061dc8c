"""What every probe shares: its training recipe (`ProbeSpec`) and the head interface (`Probe`).

A probe reads the cached last-block tokens `[B, 1 + h*w, C]` (pre final norm, CLS first; see
`snd.eval.features`), builds its own input from them (`prepare`), and predicts at the label resolution.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from snd.eval.probes.schedules import Schedule

__all__ = ["ProbeSpec", "Probe"]


@dataclass
class ProbeSpec:
    """Training recipe of one probe; defaults per task come from the official configs (see each probe)."""

    iters: int  # optimizer steps (paper scale: 10^5); None-able override via `with_overrides`
    batch: int
    lr: float
    weight_decay: float
    schedule: Schedule
    warmup: int  # warm-up steps
    warmup_ratio: float = 1e-3  # mmcv warm-up start factor
    min_ratio: float = 0.0  # final lr factor (mmcv schedules)
    grad_clip: float | None = None  # max grad norm
    betas: tuple[float, float] = (0.9, 0.999)
    # beta1 follows mmcv's OneCycle momentum (0.95 -> 0.85 -> 0.95, `snd.eval.protocol.onecycle_beta1`) instead
    # of betas[0]: the official depth config's `momentum_config=dict(policy="OneCycle")` (paper protocol)
    beta1_cycle: bool = False
    # rows in file order every epoch instead of a fresh permutation: Probe3D's NYU normals loader (split
    # "trainval" is not shuffled; paper protocol)
    shuffle: bool = True

    def with_overrides(self, *, iters: int | None = None, batch: int | None = None,
                       lr_scale: float = 1.0) -> "ProbeSpec":
        """Quick runs: fewer iterations keep the warm-up *fraction* of the paper's schedule.

        `lr_scale` multiplies the learning rate: the paper's rates are tuned for 10^5 steps, so a run of a
        few hundred steps at those rates barely moves a randomly initialised probe.
        """
        if not (lr_scale > 0 and math.isfinite(lr_scale)):
            raise ValueError(f"lr_scale must be a positive finite number, got {lr_scale}")
        out = dataclasses.replace(self)
        if iters is not None:
            out.iters = int(iters)
            out.warmup = int(round(self.warmup * iters / max(self.iters, 1)))
        if batch is not None:
            out.batch = int(batch)
        out.lr = self.lr * float(lr_scale)
        return out

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


class Probe(nn.Module):
    """A frozen-feature head. Subclasses set `task` and implement `prepare`, `forward`, `loss`, `predict`."""

    task: str = ""

    def prepare(self, tokens: Tensor, grid: tuple[int, int], norm: dict[str, Tensor]) -> Tensor:
        """tokens [B, 1+h*w, C] (pre-norm) -> the head's input feature map [B, C', h, w]."""
        raise NotImplementedError

    def loss(self, feats: Tensor, batch: dict[str, Tensor], *, step: int) -> Tensor:
        """Training loss of the prepared features against the batch's targets (label resolution)."""
        raise NotImplementedError

    def predict(self, feats: Tensor, out_hw: tuple[int, int]) -> Tensor:
        """Final prediction at `out_hw` (depth [B,H,W] m, normals [B,3,H,W] unit, seg [B,H,W] int64)."""
        raise NotImplementedError

    def config(self) -> dict:
        """Constructor arguments, stored in checkpoints so a probe is rebuilt exactly."""
        raise NotImplementedError

    def graph_from(self) -> int:
        """First step from which `loss` runs the same computation every step (a CUDA graph can be
        captured); earlier steps run eagerly. 0 unless the loss has a warm-up form."""
        return 0


def _check_tokens(tokens: Tensor, grid: tuple[int, int]) -> None:
    assert tokens.ndim == 3 and tokens.shape[1] == 1 + grid[0] * grid[1], \
        f"tokens must be [B, 1+h*w, C] for grid {grid}, got {tuple(tokens.shape)}"


def patches_nchw(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """[B, 1+h*w, C] -> patch map [B, C, h, w] (CLS dropped)."""
    _check_tokens(tokens, grid)
    B, _, C = tokens.shape
    return tokens[:, 1:].transpose(1, 2).reshape(B, C, grid[0], grid[1])


def to_device(batch: dict, device: torch.device | str) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in batch.items()}
