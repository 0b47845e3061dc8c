"""LoRA on the student backbone (peft), and merging LoRA into a plain ViT for the teacher.

Why peft: its LoRA layers (Linear and the Conv2d of the patch embedding) are the official code's, so the
student is the same function as SnD's. Why merge for the teacher: the teacher never trains, so it needs no
adapter wrappers; a plain timm ViT with W = W0 + (alpha/r) B A is the same function (LoRA dropout is off in
eval) with fewer kernels per forward (see perf-notes: the step is launch-bound).

Target modules: the official config lists the suffixes `qkv` and `proj`; in the DINOv2 module tree `proj`
also matches `patch_embed.proj` (a Conv2d), so the official student adapts the patch embedding too
(`patch_embed=True`, the default); the MLP layers are `fc1`/`fc2` and are not adapted. DINOv3 (timm's
Eva blocks) has the same roles under the same names (`attn.qkv`, `attn.proj`; `_qkvb` keeps its q/v biases
as separate parameters, which stay frozen like every other bias); each family's suffixes come from
`snd.models.backbone.REGISTRY`, and `describe_lora` lists what was adapted (printed at the start of a run).
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

__all__ = ["LoraSpec", "apply_lora", "describe_lora", "lora_layers", "lora_parameters", "merge_lora_into",
           "merged_copy", "target_regex"]

ADAPTER = "default"


@dataclass(frozen=True)
class LoraSpec:
    """LoRA hyper-parameters (official SnD: r 8, alpha 8, dropout 0.1, bias none, qkv + proj)."""

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.1
    patch_embed: bool = True


_DEFAULT_TARGETS = ("attn.qkv", "attn.proj")


def target_regex(patch_embed: bool, targets: tuple[str, ...] = _DEFAULT_TARGETS) -> str:
    """peft `target_modules` regex (full-name match): the attention's `targets` suffixes (the registry's),
    optionally the patch embedding."""
    if tuple(targets) == _DEFAULT_TARGETS:  # the DINOv2 regex, kept verbatim
        return r".*(attn\.qkv|attn\.proj|patch_embed\.proj)$" if patch_embed else r".*attn\.(qkv|proj)$"
    alts = [re.escape(t) for t in targets] + ([r"patch_embed\.proj"] if patch_embed else [])
    return r".*(" + "|".join(alts) + r")$"


def describe_lora(model: nn.Module) -> str:
    """The adapted modules, block indices folded: 'patch_embed.proj, blocks.{0..11}.attn.qkv, ...'."""
    groups: dict[str, list[int]] = {}
    for name in lora_layers(model):
        m = re.match(r"^(.*?blocks)\.(\d+)\.(.+)$", name)
        key = f"{m.group(1)}.{{}}.{m.group(3)}" if m else name
        groups.setdefault(key, []).append(int(m.group(2)) if m else -1)
    parts = []
    for key, idx in groups.items():
        if "{}" not in key:
            parts.append(key)
            continue
        lo, hi = min(idx), max(idx)
        span = f"{{{lo}..{hi}}}" if sorted(idx) == list(range(lo, hi + 1)) and hi > lo else "{" + ",".join(map(str, idx)) + "}"
        parts.append(key.format(span))
    return f"{len(lora_layers(model))} modules: " + ", ".join(parts)


def apply_lora(model: nn.Module, spec: LoraSpec = LoraSpec(), targets: tuple[str, ...] | None = None) -> nn.Module:
    """Inject LoRA adapters into `model` in place and freeze everything except them.

    Returns the same module object (no PeftModel wrapper), so `forward_features` and timm helpers work.
    Adapters start as the identity (peft initialises B = 0), so the student equals its base model at step 0.
    """
    if targets is None:
        targets = _registry_targets(model)
    cfg = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, bias="none",
                     target_modules=target_regex(spec.patch_embed, targets))
    model = inject_adapter_in_model(cfg, model)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    n = len(lora_layers(model))
    assert n > 0, f"LoRA found no target modules (expected {targets})"
    return model


def _registry_targets(model: nn.Module) -> tuple[str, ...]:
    """The registry's LoRA suffixes for `model`'s architecture (timm records it in `pretrained_cfg`)."""
    from snd.models.backbone import REGISTRY

    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    spec = REGISTRY.get(arch) if arch else None
    return spec.lora if spec is not None else _DEFAULT_TARGETS


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """Module name -> peft LoRA layer, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter parameters (name -> parameter), the only trainable part of a LoRA backbone."""
    return {n: p for n, p in model.named_parameters() if ".lora_" in n}


@torch.no_grad()
def merge_lora_into(plain: nn.Module, lora_model: nn.Module) -> None:
    """Write W0 + delta(LoRA) of every adapted layer of `lora_model` into the same-named plain layer of
    `plain` (in place: parameter storage is kept, so compiled graphs / CUDA graphs stay valid).

    `plain` must have `lora_model`'s architecture without adapters (e.g. from `merged_copy`). The delta is
    peft's own `get_delta_weight` (B A * alpha / r, or its convolution form for the patch embedding)."""
    for name, layer in lora_layers(lora_model).items():
        base = layer.get_base_layer()
        dst = plain.get_submodule(name)
        assert isinstance(dst, type(base)), f"{name}: plain layer is {type(dst).__name__}, expected {type(base).__name__}"
        delta = layer.get_delta_weight(ADAPTER)
        dst.weight.copy_(base.weight + delta.to(base.weight.dtype))
        if base.bias is not None:
            dst.bias.copy_(base.bias)


def merged_copy(lora_model: nn.Module) -> nn.Module:
    """A plain (adapter-free) deep copy of `lora_model` with LoRA merged into the weights, no grads."""
    plain = copy.deepcopy(lora_model)
    for name, layer in lora_layers(plain).items():
        parent_name, _, child = name.rpartition(".")
        parent = plain.get_submodule(parent_name) if parent_name else plain
        setattr(parent, child, layer.get_base_layer())
    assert not lora_layers(plain), "merged copy still holds LoRA layers"
    merge_lora_into(plain, lora_model)
    for p in plain.parameters():
        p.requires_grad_(False)
    return plain
