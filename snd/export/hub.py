"""`snd export RUN --out DIR`: the run's backbone (LoRA merged) as files plain timm loads.

Layouts:
* "timm" (default): ``model.safetensors`` (timm keys, native position grid) + ``config.json`` in the
  timm/HF-hub layout (``architecture``, ``num_features``, ``pretrained_cfg`` with input size and mean/std,
  ``model_args``) + ``README.md`` model card. Loads with
  ``timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=".../model.safetensors"),
  num_classes=0, dynamic_img_size=True)``: the weights round-trip exactly, and the tokens equal snd's
  exactly at the native input size (518 x 518 for DINOv2).
* "snd-release": additionally ``dinov2_{small,base}_snd.pth``, the torch.hub DINOv2 state dict of the
  official SnD release files (tensors only), so code written for those keeps working.

Why the native grid: the position embedding is stored at the base weights' grid (37x37 for DINOv2), as the
official weights; any input size works with ``dynamic_img_size=True`` (interpolated per forward). At
other sizes plain timm interpolates with its own rule (antialiased bicubic to the exact grid), while snd
(`snd.models.backbone.DinoV2ViT`) and the official SnD code (torch.hub DINOv2) use the hub's rule: ~1e-3
relative on the tokens at 574x868. ``snd.load_backbone(folder)``, or torch.hub DINOv2 with the
"snd-release" file, give the hub's tokens; the model card says so.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from snd.data.formats import atomic_write_text, write_json
from snd.errors import SndError

log = logging.getLogger(__name__)

_RELEASE = {384: "dinov2_small_snd.pth", 768: "dinov2_base_snd.pth", 64: "snd_test_snd.pth"}


def _atomic(path: Path, write) -> None:
    """Binary files (safetensors, torch.save) through a temp file; text goes through `snd.data.formats`."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _card(arch: str, run: Path, which: str, cfg: dict, files: list[str], hw: tuple[int, int], family: str = "dinov2",
          patch: int = 14) -> str:
    """README.md: how to load, what it was trained with, and the eval table when the run has one."""
    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in sorted(cfg.items()) if not isinstance(v, (list, dict)))
    evals = ""
    for cand in (run / "eval" / "results.md", run / "results.md"):
        if cand.is_file():
            evals = "\n## Evaluation (`snd eval`)\n\n" + cand.read_text()
            break
    return f"""---
library_name: timm
tags: [image-feature-extraction, {family}, splat-and-distill, snd]
license: apache-2.0
---
# {arch} — Splat and Distill ({which})

{"DINOv3" if family == "dinov3" else "DINOv2"} backbone fine-tuned with Splat and Distill (SnD, ICLR 2026) by `snd distill`; LoRA merged into the
weights. Exported by `snd export` from run `{run.name}`.

```python
import timm
model = timm.create_model("{arch}", pretrained=True, num_classes=0, dynamic_img_size=True,
                          pretrained_cfg_overlay=dict(file="model.safetensors"))
feats = model.forward_features(images)  # images normalised with the mean/std of config.json, H, W multiples of {patch}
```

or `snd.load_backbone("<this folder>")`. Trained at {hw[0]}x{hw[1]} input. Files: {", ".join(files)}.

{_POS_V3 if family == "dinov3" else _POS_V2}

## Training configuration

| option | value |
|---|---|
{rows}
{evals}"""


_POS_V2 = """Position embeddings: stored at the native grid. At the native input size plain timm gives exactly the
tokens snd trained with; at other sizes timm resamples them with its own rule, while snd and the official
SnD code (torch.hub DINOv2) use DINOv2's `interpolate_pos_encoding` (~1e-3 relative difference on the
tokens at 574x868). For the trained-with tokens at any size use `snd.load_backbone`, or torch.hub DINOv2
with the `dinov2_*_snd.pth` file (`--format snd-release`)."""
_POS_V3 = """Position embeddings: rotary (RoPE), computed from the input grid; plain timm gives the tokens snd
trained with at every input size. `--format snd-release` adds the facebookresearch/dinov3 layout file."""


def export_run(run: str | Path, out: str | Path, *, which: Literal["student", "teacher"] = "student",
               fmt: Literal["timm", "snd-release"] = "timm", push: str | None = None) -> dict:
    """Write the export of `run` into `out`; returns {"files": [...], "architecture": ..., "out": ...}."""
    from snd.pipeline.config import DistillConfig, load_config
    from snd.models.backbone import REGISTRY, patch_size, resolve_name
    from snd.train.checkpoint import CONFIG_FILE, load_backbone_from_run

    if fmt not in ("timm", "snd-release"):
        raise SndError(f"unknown export format {fmt!r}", hint="use --format timm or --format snd-release")
    run = Path(run)
    model = load_backbone_from_run(run, which=which)
    run_dir = run if run.is_dir() else run.parent.parent
    cfg = load_config(DistillConfig, run_dir / CONFIG_FILE)
    arch = resolve_name(cfg.model)
    family = REGISTRY[arch].family
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    pc = dict(model.pretrained_cfg or {})
    C = int(model.embed_dim)
    input_size = [3, int(cfg.img_height), int(cfg.img_width)]
    config = {
        "architecture": arch,
        "num_classes": 0,
        "num_features": C,
        "global_pool": getattr(model, "global_pool", "token"),
        "model_args": {"num_classes": 0, "dynamic_img_size": True},
        "pretrained_cfg": {
            "tag": "snd", "custom_load": False, "input_size": input_size, "fixed_input_size": False,
            "interpolation": pc.get("interpolation", "bicubic"), "crop_pct": 1.0, "crop_mode": "center",
            "mean": list(pc.get("mean", (0.485, 0.456, 0.406))), "std": list(pc.get("std", (0.229, 0.224, 0.225))),
            "num_classes": 0, "pool_size": None, "first_conv": "patch_embed.proj", "classifier": "head",
            "license": "apache-2.0",
        },
        "snd": {"run": str(run_dir.resolve()), "which": which, "native_grid": list(model.patch_embed.grid_size),
                "family": family, "patch_size": patch_size(model)},
    }
    files = ["model.safetensors", "config.json", "README.md"]
    _atomic(out / "model.safetensors", lambda t: save_file(sd, str(t), metadata={"format": "pt"}))
    write_json(out / "config.json", config)
    if fmt == "snd-release":
        from snd.models.weights import to_dinov2_state_dict
        from snd.models.weights_dinov3 import to_dinov3_state_dict

        if family == "dinov3":
            name, rel = f"{arch.replace('vit_', 'dinov3_').replace('_patch16_dinov3', '16')}_snd.pth", to_dinov3_state_dict(sd)
        else:
            name, rel = _RELEASE.get(C, f"dinov2_{C}_snd.pth"), to_dinov2_state_dict(sd)
        rel = {k: v.clone() for k, v in rel.items()}
        _atomic(out / name, lambda t: torch.save(rel, t))
        files.append(name)
    cfg_dict = json.loads((run_dir / CONFIG_FILE).read_text()).get("config", {})
    atomic_write_text(out / "README.md", _card(arch, run_dir, which, cfg_dict, files, (cfg.img_height, cfg.img_width),
                                                  family, patch_size(model)))
    if push:
        try:
            import huggingface_hub  # noqa: F401
        except ImportError as e:
            raise SndError("--push needs the huggingface_hub package (and network access)",
                           hint=f"pip install huggingface_hub, then `huggingface-cli upload {push} {out}`") from e
        from huggingface_hub import HfApi

        HfApi().upload_folder(repo_id=push, folder_path=str(out))
    log.info("exported %s (%s) to %s", run_dir, which, out)
    return {"files": files, "architecture": arch, "out": str(out)}
