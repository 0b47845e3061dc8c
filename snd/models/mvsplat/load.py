"""Loading MVSplat encoder weights: Lightning `.ckpt` (keys `encoder.*` under `state_dict`) or a bare
encoder state dict (`.pth` / `.pt` / `.safetensors`), always strictly and without unpickling code.

Why so strict: a wrong checkpoint (another model, or re10k weights under the ScanNet++ config) would
otherwise load partially and silently produce garbage scaffolds for a whole precompute run. Every
failure names the file, says which known layout it resembles, and how to fix it.
"""
from __future__ import annotations

import logging
import pickle
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from snd.errors import SndError, require_file

from .config import CONFIG_NAMES, MVSplatConfig, resolve_config
from .encoder import MVSplatEncoder

log = logging.getLogger(__name__)

# Top-level modules of upstream's Lightning `ModelWrapper` besides the encoder. None has persistent
# weights in released checkpoints (decoder/LPIPS buffers are non-persistent), but a fork might save
# some; they are dropped and reported, anything else is an error.
KNOWN_OTHER_PREFIXES = ("decoder.", "losses.", "encoder_visualizer.", "data_shim.", "benchmarker.")
_ENCODER_PREFIX = "encoder."


def convert_mvsplat_state_dict(sd: dict[str, Tensor], *, dropped: Optional[list[str]] = None) -> dict[str, Tensor]:
    """Any supported layout -> the bare encoder state dict `MVSplatEncoder.load_state_dict` expects.

    Accepts upstream's Lightning model state (`encoder.<key>` plus known non-encoder modules), a bare
    encoder state dict, and either wrapped in DDP's `module.` prefix. Pure: does not touch `sd`.

    Args:
        sd: flat name -> tensor mapping (the Lightning checkpoint's `state_dict` entry or a bare one).
        dropped: if given, receives the keys that were recognised as non-encoder and dropped.
    Raises:
        ValueError: keys that belong to no known module (the caller adds the file name).
    """
    if not isinstance(sd, dict) or not sd:
        raise ValueError("empty or non-dict state dict")
    keys = list(sd)
    if all(k.startswith("module.") for k in keys):
        sd = {k[len("module."):]: v for k, v in sd.items()}
        keys = list(sd)
    if not any(k.startswith(_ENCODER_PREFIX) for k in keys):
        return dict(sd)  # bare encoder (validated by the caller against the architecture)
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for k, v in sd.items():
        if k.startswith(_ENCODER_PREFIX):
            out[k[len(_ENCODER_PREFIX):]] = v
        elif k.startswith(KNOWN_OTHER_PREFIXES):
            if dropped is not None:
                dropped.append(k)
        else:
            unknown.append(k)
    if unknown:
        raise ValueError(f"{len(unknown)} keys belong to no known MVSplat module, e.g. {unknown[:3]}")
    return out


@lru_cache(maxsize=None)
def reference_layout(config: "str | MVSplatConfig") -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """key -> (shape, dtype) of the encoder state dict for a config (built on the meta device: free)."""
    with torch.device("meta"):
        enc = MVSplatEncoder(resolve_config(config))
    return {k: (tuple(v.shape), v.dtype) for k, v in enc.state_dict().items()}


def layout_match(sd: dict[str, Tensor], config: "str | MVSplatConfig") -> tuple[int, int]:
    """(tensors of `sd` whose key and shape match the config's layout, tensors the layout has)."""
    ref = reference_layout(config)
    hits = sum(1 for k, v in sd.items() if k in ref and tuple(getattr(v, "shape", ())) == ref[k][0])
    return hits, len(ref)


def identify_config(sd: dict[str, Tensor]) -> Optional[str]:
    """The preset whose layout `sd` matches exactly (keys and shapes), else None."""
    for name in CONFIG_NAMES:
        ref = reference_layout(name)
        if set(sd) == set(ref) and all(tuple(sd[k].shape) == ref[k][0] for k in ref):
            return name
    return None


_BAD_FILE_HINT = ("pass MVSplat's Lightning .ckpt (e.g. re10k.ckpt) or an encoder .safetensors; if it is one, it is "
                  "damaged or cut short (compare its size with the download's) and needs downloading again")


def read_state_dict(path: "str | Path") -> dict[str, Tensor]:
    """Read a flat tensor mapping from .ckpt/.pth/.pt (torch, weights_only) or .safetensors.

    A Lightning checkpoint's `state_dict` entry is returned as is; a bare dict of tensors likewise.
    """
    p = require_file(path, "MVSplat checkpoint", hint="pass --mvsplat-ckpt <re10k.ckpt or an encoder state dict>")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
            raise SndError(f"cannot read safetensors file {p}: {e}", path=p) from e
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        blocked = next((ln.strip() for ln in text.splitlines() if "Unsupported global" in ln), None)
        if blocked is None:  # not a pickled-object refusal: the file is corrupt or not a checkpoint
            raise SndError(f"cannot read {p} as a torch checkpoint: {text.splitlines()[0] if text else e!r}",
                           path=p, hint=_BAD_FILE_HINT) from e
        blocked = blocked.split(" was not an allowed global")[0].replace("WeightsUnpickler error: ", "")
        raise SndError(
            f"{p} holds Python objects besides tensors, which snd will not unpickle ({blocked})",
            path=p,
            hint=("if you trust the file, save only its weights once: "
                  f"python -m snd.models.mvsplat.resave {p} {p.with_suffix('')}_encoder.safetensors "
                  "and pass that file instead"),
        ) from e
    except Exception as e:  # noqa: BLE001 - zip/pickle corruption, not a checkpoint at all
        raise SndError(f"cannot read {p} as a torch checkpoint: {type(e).__name__}: {e}", path=p,
                       hint=_BAD_FILE_HINT) from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        kind = type(obj).__name__
        keys = list(obj)[:5] if isinstance(obj, dict) else []
        raise SndError(f"{p} is not a state dict of tensors (got {kind} with keys {keys})", path=p,
                       hint="pass MVSplat's Lightning .ckpt or a bare encoder state dict")
    return obj


def _describe(sd: dict[str, Tensor]) -> str:
    scores = {name: layout_match(sd, name) for name in CONFIG_NAMES}
    best = max(scores, key=lambda n: scores[n][0] / scores[n][1])
    hits, total = scores[best]
    parts = ", ".join(f"{n}: {h}/{t} tensors match" for n, (h, t) in scores.items())
    if hits == 0:
        return f"it does not look like an MVSplat encoder at all ({parts}; first keys: {list(sd)[:3]})"
    return f"closest layout is '{best}' ({parts})"


def load_mvsplat(path: "str | Path", config: "str | MVSplatConfig" = "scannetpp", *,
                 device: "str | torch.device" = "cpu") -> MVSplatEncoder:
    """Build the encoder for `config`, load `path` strictly, move to `device`, set eval mode, freeze.

    Raises:
        SndError: missing/unreadable file, not MVSplat, or weights of the other preset (with the fix).
    """
    p = Path(path)
    cfg = resolve_config(config)
    raw = read_state_dict(p)
    dropped: list[str] = []
    try:
        sd = convert_mvsplat_state_dict(raw, dropped=dropped)
    except ValueError as e:
        raise SndError(f"{p} is not an MVSplat checkpoint: {e}; {_describe(raw)}", path=p) from e
    if dropped:
        log.info("%s: dropped %d non-encoder tensors (%s...)", p, len(dropped), ", ".join(dropped[:3]))
    ref = reference_layout(cfg)
    if set(sd) != set(ref) or any(tuple(sd[k].shape) != ref[k][0] for k in ref):
        found = identify_config(sd)
        want = config if isinstance(config, str) else "the given config"
        if found is not None:
            raise SndError(
                f"{p} holds MVSplat '{found}' encoder weights, but config {want!r} was requested", path=p,
                hint=f"pass --mvsplat-config {found}")
        missing = sorted(set(ref) - set(sd))
        extra = sorted(set(sd) - set(ref))
        shape = [k for k in ref if k in sd and tuple(sd[k].shape) != ref[k][0]]
        raise SndError(
            f"{p} does not match the MVSplat {want!r} encoder: {len(missing)} missing, {len(extra)} unexpected, "
            f"{len(shape)} wrong-shape tensors (e.g. {(missing + extra + shape)[:3]}); {_describe(sd)}",
            path=p,
            hint="pass an MVSplat encoder checkpoint (upstream re10k.ckpt -> --mvsplat-config re10k; "
                 "SnD's ScanNet++ fine-tune -> scannetpp)")
    model = MVSplatEncoder(cfg)
    bad = [k for k in ref if sd[k].dtype != ref[k][1]]
    if bad:
        log.info("%s: casting %d tensors to %s", p, len(bad), ref[bad[0]][1])
    model.load_state_dict({k: v.to(ref[k][1]) for k, v in sd.items()}, strict=True)
    model = model.to(device).eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    return model


__all__ = ["convert_mvsplat_state_dict", "load_mvsplat", "read_state_dict", "identify_config",
           "reference_layout", "layout_match", "KNOWN_OTHER_PREFIXES"]
