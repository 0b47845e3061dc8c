"""Load DINOv2 / DINOv3 weights from a local file into a timm ViT: detect the layout, convert, load strictly.

Why a converter per layout + strict loading: the official README loads the released SnD weights with
`strict=False`, which silently ignores every mismatch (a ViT-B file into a ViT-S, an MVSplat checkpoint,
a typo'd prefix). Here each known layout goes through a pure `convert_*(state_dict) -> state_dict`
function, the result must fill every parameter of the model exactly, and the only keys ever dropped are
listed (`mask_token`, classifier heads) and reported.

Layouts (detected by signature keys, like timm's `checkpoint_filter_fn`):
  - "dinov2":  facebookresearch/dinov2 torch.hub state dict (`dinov2_vits14_pretrain.pth`, the released
               `dinov2_small_snd.pth`): `mask_token`, `register_tokens`, `blocks.i.ls1.gamma`, SwiGLU
               `mlp.w12`/`mlp.w3` (giant), chunked `blocks.c.i.` (training checkpoints).
  - "hf":      Hugging Face transformers `Dinov2Model` (`embeddings.*`, `encoder.layer.i.*`).
  - "dinov3":  facebookresearch/dinov3 release `.pth` (`storage_tokens`, `ls1.gamma`, masked qkv bias):
               `snd.models.weights_dinov3.convert_dinov3_state_dict`.
  - "hf_dinov3": Hugging Face transformers `DINOv3ViTModel` (the facebook/dinov3-* hub repos).
  - "timm":    timm's own layout (timm HF hub `model.safetensors` / `pytorch_model.bin`, snd exports).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from snd.errors import SndError
from snd.models.weights_dinov3 import (convert_dinov3_state_dict, convert_hf_dinov3_state_dict, guess_dinov3_arch,
                                       is_dinov3_official, is_hf_dinov3)

log = logging.getLogger(__name__)

__all__ = ["LoadReport", "convert_dinov2_state_dict", "convert_hf_dinov2_state_dict", "detect_layout",
           "load_backbone_weights", "read_state_dict", "find_weights_file", "to_dinov2_state_dict"]

# Keys a backbone file may hold that a feature extractor has no use for (reported, never silent).
_DROPPABLE = re.compile(r"^(mask_token|head\.(weight|bias)|fc_norm\.(weight|bias)|pooler\..*)$")
_PREFIXES = ("module.", "_orig_mod.", "backbone.", "model.", "encoder.backbone.")
_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


@dataclass
class LoadReport:
    """What loading did: the detected layout, keys dropped, tensors resampled."""

    layout: str
    dropped: list[str] = field(default_factory=list)
    resampled: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"layout={self.layout} dropped={self.dropped or 'none'} resampled={self.resampled or 'none'}"


# ---- reading -----------------------------------------------------------------------------------------
def find_weights_file(path: str | Path) -> Path:
    """`path` itself if a file, else the single weights file inside a folder (e.g. an HF cache snapshot)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.is_dir():
        raise SndError(f"weights file not found: {p}", path=p, hint="pass an existing .pth/.safetensors file with --weights")
    for name in _WEIGHT_NAMES:
        hits = sorted(p.rglob(name))
        if hits:
            if len(hits) > 1:
                log.info("several %s under %s; using %s", name, p, hits[-1])
            return hits[-1]
    raise SndError(f"no weights file ({', '.join(_WEIGHT_NAMES)}) in folder {p}", path=p,
                   hint="pass the .pth or .safetensors file itself with --weights")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a .safetensors or torch file (weights_only), unwrapped from {'model'|'state_dict'|'teacher': ...}."""
    p = find_weights_file(path)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any decode failure is a user-fixable bad file
        raise SndError(f"cannot read weights {p}: {type(e).__name__}: {e}", path=p,
                       hint="pass a DINOv2 .pth (torch.hub layout) or a .safetensors file; if it is one, it is damaged "
                            "or cut short (compare its size with the source's) and needs downloading again") from e
    for wrapper in ("model", "state_dict", "teacher", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict) and not isinstance(sd.get(wrapper), Tensor):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise SndError(f"{p} does not hold a state dict of tensors", path=p)
    return dict(sd)


def _strip_prefixes(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    changed = True
    while changed:
        changed = False
        for pre in _PREFIXES:
            if sd and all(k.startswith(pre) for k in sd):
                sd = {k[len(pre):]: v for k, v in sd.items()}
                changed = True
    # DINOv2 training checkpoints hold the teacher under 'backbone.' next to 'dino_head.'/'ibot_head.'
    if any(k.startswith("backbone.") for k in sd) and not any(k.startswith("blocks.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


def detect_layout(sd: dict[str, Tensor]) -> str:
    """'dinov3' | 'hf_dinov3' | 'dinov2' | 'hf' | 'timm' | 'unknown' from signature keys."""
    keys = set(sd)
    if is_dinov3_official(sd):  # before dinov2: DINOv3 files hold a mask_token too
        return "dinov3"
    if is_hf_dinov3(sd):  # before hf: both have embeddings.cls_token
        return "hf_dinov3"
    if "mask_token" in keys or "register_tokens" in keys or any(".ls1.gamma" in k and re.match(r"blocks\.\d+\.\d+\.", k) for k in keys):
        return "dinov2"
    if "embeddings.cls_token" in keys:
        return "hf"
    if "cls_token" in keys and any(k.startswith("blocks.") for k in keys):
        return "timm"
    return "unknown"


# ---- converters (pure) -------------------------------------------------------------------------------
def convert_dinov2_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """facebookresearch/dinov2 torch.hub keys -> timm `VisionTransformer` keys (same math as timm's
    `_convert_dinov2`): drops `mask_token`; with registers, folds `pos_embed[:, 0]` into `cls_token` and
    moves `register_tokens` to `reg_token` (timm's reg4 models keep prefix tokens out of the position
    embedding); SwiGLU `w12`/`w3` -> `fc1`/`fc2`; chunked `blocks.c.i.` -> `blocks.i.`."""
    sd = dict(sd)
    sd.pop("mask_token", None)
    out: dict[str, Tensor] = {}
    if "register_tokens" in sd:
        out["reg_token"] = sd.pop("register_tokens")
        pos = sd.pop("pos_embed")  # [1, 1 + h*w, C]
        out["cls_token"] = sd.pop("cls_token") + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    for k, v in sd.items():
        k = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)  # block chunks (FSDP training checkpoints)
        k = re.sub(r"(blocks\.\d+\.mlp)\.w12\.", r"\1.fc1.", k)
        k = re.sub(r"(blocks\.\d+\.mlp)\.w3\.", r"\1.fc2.", k)
        out[k] = v
    return out


def to_dinov2_state_dict(timm_sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of `convert_dinov2_state_dict` (timm -> torch.hub DINOv2 keys; `mask_token` zeros).

    Why: exports in the layout of the released SnD files, and tests that build official-layout files."""
    sd = dict(timm_sd)
    out: dict[str, Tensor] = {}
    C = sd["cls_token"].shape[-1]
    if "reg_token" in sd:
        pos = sd.pop("pos_embed")  # [1, h*w, C]
        cls_pos = torch.zeros(1, 1, C, dtype=pos.dtype)
        out["register_tokens"] = sd.pop("reg_token")
        out["cls_token"] = sd.pop("cls_token")  # its pos term is folded in already; keep pos[:, 0] = 0
        out["pos_embed"] = torch.cat([cls_pos, pos], dim=1)
    for k, v in sd.items():
        if k.startswith(("head.", "fc_norm.")):
            continue
        out[k] = v
    out["mask_token"] = torch.zeros(1, C, dtype=out["cls_token"].dtype)
    return out


def convert_hf_dinov2_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face transformers `Dinov2Model` keys -> timm keys (separate q/k/v are concatenated)."""
    out: dict[str, Tensor] = {}
    has_reg = "embeddings.register_tokens" in sd
    for k, v in sd.items():
        if k == "embeddings.mask_token" or k.startswith("pooler."):
            continue
        if k == "embeddings.cls_token":
            out["cls_token"] = v
        elif k == "embeddings.register_tokens":
            out["reg_token"] = v
        elif k == "embeddings.position_embeddings":
            out["pos_embed"] = v
        elif k.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("layernorm."):
            out["norm." + k.rsplit(".", 1)[1]] = v
        elif m := re.match(r"encoder\.layer\.(\d+)\.(.+)$", k):
            i, rest = m.groups()
            if rest.startswith("attention.attention."):
                continue  # q/k/v handled below
            rest = (rest.replace("attention.output.dense.", "attn.proj.")
                    .replace("layer_scale1.lambda1", "ls1.gamma").replace("layer_scale2.lambda1", "ls2.gamma")
                    .replace("mlp.weights_in.", "mlp.fc1.").replace("mlp.weights_out.", "mlp.fc2."))
            out[f"blocks.{i}.{rest}"] = v
        else:
            out[k] = v  # unknown: left for the strict check to report
    for k in sd:
        if m := re.match(r"encoder\.layer\.(\d+)\.attention\.attention\.query\.(weight|bias)$", k):
            i, kind = m.groups()
            pre = f"encoder.layer.{i}.attention.attention."
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([sd[pre + f"{n}.{kind}"] for n in ("query", "key", "value")])
    if has_reg and "pos_embed" in out:  # HF keeps the CLS position like the official layout
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    return out


# ---- loading -----------------------------------------------------------------------------------------
def _describe(sd: dict[str, Tensor]) -> str:
    dim = sd["cls_token"].shape[-1] if "cls_token" in sd else None
    depth = len({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    regs = sd["reg_token"].shape[1] if "reg_token" in sd else 0
    return f"embed dim {dim}, depth {depth}, {regs} registers"


_ARCH_BY_DIM = {384: "vit_small_patch14", 768: "vit_base_patch14", 1024: "vit_large_patch14", 1536: "vit_giant_patch14"}


def guess_arch(sd: dict[str, Tensor]) -> str | None:
    """timm architecture of a timm-layout ViT state dict from its embed dim and registers (None: unknown)."""
    v3 = guess_dinov3_arch(sd)
    if v3 is not None:
        return v3
    dim = int(sd["cls_token"].shape[-1]) if "cls_token" in sd else None
    if dim == 64:
        return "snd_test_vit_patch14"
    base = _ARCH_BY_DIM.get(dim)
    return None if base is None else f"{base}{'_reg4' if 'reg_token' in sd else ''}_dinov2"


def _model_hint(sd: dict[str, Tensor], target: dict[str, Tensor]) -> str:
    arch = guess_arch(sd)
    if arch is None or arch.startswith("snd_test"):
        return "pass DINOv2/DINOv3 weights that match --model"
    if arch == guess_arch(target) and _describe(sd) == _describe(target):
        # the model's own architecture, yet keys or shapes differ: a partial or damaged file, not a wrong --model
        return (f"the file looks like a {arch} with tensors missing or misshapen (a partial state dict or a damaged "
                "download?): download the weights again, or pass the complete file")
    return f"this file holds a {arch}: use --model {arch}, or pass the weights of your --model"


def timm_state_dict(path: str | Path, *, qkv_bias: bool | None = None) -> tuple[Path, dict[str, Tensor], str, list[str]]:
    """The weights file at `path` (or the one in a folder) in timm keys, whatever its layout:
    (file, state dict, detected layout, keys dropped on purpose). SndError when it is no ViT backbone.
    `qkv_bias`: for DINOv3 files, whether the target has q/v biases (None: iff the file's are non-zero)."""
    p = find_weights_file(path)
    raw = _strip_prefixes(read_state_dict(p))
    layout = detect_layout(raw)
    if layout in ("dinov3", "hf_dinov3"):
        if qkv_bias is None:
            qkv_bias = any(bool(v.any()) for k, v in raw.items() if k.endswith(("attn.qkv.bias", "q_proj.bias")))
        convert = convert_dinov3_state_dict if layout == "dinov3" else convert_hf_dinov3_state_dict
        sd, dropped = convert(raw, qkv_bias=qkv_bias)
    elif layout == "dinov2":
        sd, dropped = convert_dinov2_state_dict(raw), ["mask_token"] if "mask_token" in raw else []
    elif layout == "hf":
        sd, dropped = convert_hf_dinov2_state_dict(raw), [k for k in raw if k == "embeddings.mask_token" or k.startswith("pooler.")]
    elif layout == "timm":
        sd, dropped = dict(raw), []
    else:
        sample = ", ".join(sorted(raw)[:4])
        raise SndError(f"{p} is not a DINOv2/ViT backbone state dict (keys like: {sample}, ...)", path=p,
                       hint="pass the DINOv2 weights (e.g. dinov2_vits14_pretrain.pth or the timm model.safetensors); "
                            "MVSplat checkpoints go to `snd precompute --mvsplat-ckpt`")
    return p, sd, layout, dropped


def load_backbone_weights(model: nn.Module, path: str | Path) -> LoadReport:
    """Convert the file at `path` to timm keys and load it into `model` strictly (in place).

    Raises SndError naming the file, what the model expects and what the file holds (embed dim, depth,
    registers), and the fix, for any missing/unexpected key or shape mismatch. Returns a LoadReport listing
    the keys dropped on purpose (`mask_token`, classifier heads) and tensors resampled (position grid)."""
    target = model.state_dict()
    p, sd, layout, dropped = timm_state_dict(path, qkv_bias=any(k.endswith("attn.q_bias") for k in target))
    for k in sorted(sd):
        if k not in target and _DROPPABLE.match(k):
            dropped.append(k)
            del sd[k]
    expected = _describe(target)
    found = _describe(sd)
    resampled: list[str] = []
    if "pos_embed" in sd and "pos_embed" in target and sd["pos_embed"].shape != target["pos_embed"].shape \
            and sd["pos_embed"].shape[-1] == target["pos_embed"].shape[-1]:
        n_prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        n_old = sd["pos_embed"].shape[1] - n_prefix
        side = int(round(n_old ** 0.5))
        if side * side == n_old:
            sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], new_size=list(model.patch_embed.grid_size),
                                                     old_size=[side, side], num_prefix_tokens=n_prefix)
            resampled.append(f"pos_embed {side}x{side} -> {tuple(model.patch_embed.grid_size)}")
    missing = sorted(set(target) - set(sd))
    unexpected = sorted(set(sd) - set(target))
    bad_shape = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
                 for k in sorted(set(sd) & set(target)) if sd[k].shape != target[k].shape]
    if missing or unexpected or bad_shape:
        parts = []
        if bad_shape:
            parts.append(f"{len(bad_shape)} shape mismatches (e.g. {'; '.join(bad_shape[:3])})")
        if missing:
            parts.append(f"{len(missing)} model keys not in the file (e.g. {', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"{len(unexpected)} file keys the model lacks (e.g. {', '.join(unexpected[:5])})")
        raise SndError(f"weights {p} ({layout} layout) do not fit the model: expected {expected}, "
                       f"found {found}; " + "; ".join(parts), path=p, hint=_model_hint(sd, target))
    dtype_sd = {k: v.to(target[k].dtype) for k, v in sd.items()}
    model.load_state_dict(dtype_sd, strict=True)
    report = LoadReport(layout=layout, dropped=dropped, resampled=resampled)
    if dropped or resampled:
        log.info("weights %s: %s", p, report)
    return report
