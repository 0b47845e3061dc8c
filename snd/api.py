"""The Python API: get a backbone, get dense features.

    import snd
    model = snd.load_backbone("runs/snd")                       # a run, an export, a weights file or a name
    cls, patches = snd.extract_features(model, [img0, img1])    # PIL / numpy / tensors, any size

Why a thin layer: every other entry point (eval, features, export) needs exactly these two things, with
the preprocessing the model was trained with (its pretrained_cfg mean/std) and without silent key drops.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from snd.errors import SndError

log = logging.getLogger(__name__)

__all__ = ["load_backbone", "extract_features", "to_tensor_list"]


def _arch_of_file(path: Path) -> str:
    """timm architecture of a DINOv2 / DINOv3 weights file (any layout), from its keys and shapes."""
    from snd.models.backbone import SUPPORTED
    from snd.models.weights import guess_arch, timm_state_dict

    _, sd, _, _ = timm_state_dict(path)
    arch = guess_arch(sd)
    if arch not in SUPPORTED:
        dim = sd["cls_token"].shape[-1] if "cls_token" in sd else None
        raise SndError(f"{path}: a ViT with embed dim {dim} is not a supported backbone", path=path,
                       hint="supported: DINOv2 ViT-S/14 (384) and ViT-B/14 (768), with or without registers, and "
                            "DINOv3 S/16, S+/16, B/16, L/16 (docs/backbones.md)")
    return arch


def looks_like_path(source: str | Path) -> bool:
    """Whether `source` names a file or folder rather than a backbone (so a missing one is 'not found',
    not 'unknown backbone')."""
    return Path(source).suffix in (".pth", ".pt", ".safetensors", ".bin") or "/" in str(source)


def load_backbone(source: str | Path, *, weights: str | Path | None = None, which: Literal["student", "teacher"] = "student",
                  device: str | torch.device | None = None) -> nn.Module:
    """A frozen timm ViT (eval mode) from any of:

    * an snd run directory or one of its checkpoints (LoRA merged; `which` picks student or EMA teacher);
    * an `snd export` folder (`config.json` + `model.safetensors`);
    * a weights file: official DINOv2 `.pth`, released SnD `dinov2_{small,base}_snd.pth`, timm/HF safetensors;
    * a backbone name (`dinov2_vits14`, a timm name) together with `weights=`.

    Loading is strict: every key dropped on purpose (e.g. the release files' `mask_token`) or resampled is
    listed in `model.snd_load_report` and logged; anything else that does not fit raises an SndError
    naming the file.
    """
    from snd.models.backbone import create_backbone
    from snd.models.weights import LoadReport, load_backbone_weights

    p = Path(source).expanduser()
    report = None
    if p.is_dir() and (p / "config.json").is_file() and (p / "model.safetensors").is_file():
        cfg = json.loads((p / "config.json").read_text())
        model = create_backbone(cfg["architecture"], init="random")
        report = load_backbone_weights(model, p / "model.safetensors")
    elif p.is_dir() or (p.is_file() and p.parent.name == "checkpoints"):
        from snd.train.checkpoint import load_backbone_from_run

        model = load_backbone_from_run(p, which=which)
        report = LoadReport(layout=f"snd run ({which})")
    elif p.is_file():
        model = create_backbone(_arch_of_file(p), init="random")
        report = load_backbone_weights(model, p)
    else:
        if looks_like_path(source):
            raise SndError(f"backbone file or folder not found: {p}", path=p,
                           hint="pass an existing weights file, run directory or `snd export` folder")
        model = create_backbone(str(source), weights=weights, init="pretrained")
        report = LoadReport(layout=f"name {source}")
    model.snd_load_report = report
    log.info("load_backbone(%s): %s", source, report)
    model = model.eval().requires_grad_(False)
    return model.to(device) if device is not None else model


def to_tensor_list(images) -> list[Tensor]:
    """PIL image(s), HWC numpy array(s) (uint8 or float in [0, 1]) or a tensor [3,H,W] / [B,3,H,W]
    (uint8 or float in [0, 1]) -> list of float32 [3, H, W] tensors in [0, 1]."""
    if isinstance(images, Tensor):
        t = images if images.dim() == 4 else images[None]
        if t.dim() != 4 or t.shape[1] != 3:
            raise ValueError(f"image tensor must be [3, H, W] or [B, 3, H, W], got {tuple(images.shape)}")
        t = t.float() / 255.0 if not t.is_floating_point() else t.float()
        return list(t)
    if not isinstance(images, (list, tuple)):
        images = [images]
    out = []
    for im in images:
        if isinstance(im, Tensor):
            out.extend(to_tensor_list(im))
            continue
        a = np.asarray(im.convert("RGB") if hasattr(im, "convert") else im)
        if a.ndim != 3 or a.shape[2] != 3:
            raise ValueError(f"image arrays must be [H, W, 3], got {a.shape}")
        t = torch.from_numpy(np.array(a, copy=True)).permute(2, 0, 1)
        out.append(t.float() / 255.0 if a.dtype == np.uint8 else t.float())
    return out


def _fit(img: Tensor, size: tuple[int, int] | None, mode: str, p: int) -> Tensor:
    """[3, H, W] -> [3, H', W'] with H', W' multiples of the patch size p."""
    H, W = img.shape[-2:]
    if size is not None:
        th, tw = size
        if th % p or tw % p:
            raise ValueError(f"size {size} must be multiples of the patch size {p}")
        if mode == "pad":
            if th < H or tw < W:
                raise ValueError(f"pad mode: size {size} is smaller than the image {H}x{W}; use resize='resize'")
            return F.pad(img, (0, tw - W, 0, th - H))
        return F.interpolate(img[None], size=(th, tw), mode="bilinear", align_corners=False, antialias=True)[0]
    if mode == "pad":
        return F.pad(img, (0, -W % p, 0, -H % p))
    th, tw = max(p, round(H / p) * p), max(p, round(W / p) * p)
    if (th, tw) == (H, W):
        return img
    return F.interpolate(img[None], size=(th, tw), mode="bilinear", align_corners=False, antialias=True)[0]


@torch.no_grad()
def extract_features(model: nn.Module, images, *, size: tuple[int, int] | None = None,
                     resize: Literal["pad", "resize"] = "pad", batch_size: int = 8,
                     device: str | torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Dense features of images: (cls [B, C], patches [B, C, h, w]) as float32 on the CPU.

    Args:
        model: a backbone from `load_backbone` (a DINOv2 or DINOv3 timm ViT; the patch size p is read from it).
        images: a PIL image or a list of them, HWC numpy arrays, or a tensor [B, 3, H, W] / [3, H, W]
            (uint8, or float in [0, 1]).
        size: (H, W) every image is brought to (multiples of p); None keeps each image's own size.
        resize: how an image gets to a multiple of p: "pad" adds zero pixels (the model's mean colour
            after normalisation is *not* used: padding is black) at the bottom/right and keeps the pixels
            as they are — patches over the padding are returned too; "resize" resamples (antialiased
            bilinear) to `size` or to the nearest multiples of p.
        batch_size: images per forward.
        device: where the model runs (default: the model's device).

    All images must end up with the same grid (pass `size` for mixed sizes).
    """
    from snd.models.backbone import _unwrap, extract, normalize, patch_size

    if resize not in ("pad", "resize"):
        raise ValueError(f"resize must be 'pad' or 'resize', got {resize!r}")
    p = patch_size(_unwrap(model))
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    ims = [_fit(t, size, resize, p) for t in to_tensor_list(images)]
    shapes = {tuple(t.shape) for t in ims}
    if len(shapes) > 1:
        raise ValueError(f"images end up with different sizes {sorted(shapes)}; pass size=(H, W)")
    model = model.to(dev)
    cls_all, patch_all = [], []
    for i in range(0, len(ims), batch_size):
        x = torch.stack(ims[i:i + batch_size]).to(dev)
        cls, patches = extract(model, normalize(model, x))
        cls_all.append(cls.float().cpu())
        patch_all.append(patches.float().cpu())
    return torch.cat(cls_all), torch.cat(patch_all)
