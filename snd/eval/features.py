"""Frozen-backbone tokens for the probes, and their on-disk cache.

What is extracted: the output of the **last transformer block before the final LayerNorm**, CLS token first,
then the h*w patch tokens (register tokens dropped), `tokens [N, 1 + h*w, C]`. Why pre-norm: the official
probes disagree about the final norm — depth (`create_depther`, `final_norm=False`) and normals (probe3d's
block loop) read the raw block output, segmentation (`get_intermediate_layers`, norm=True) reads the normed
one. LayerNorm acts per token, so caching the raw tokens plus the norm's weights (`final_norm.safetensors`)
serves every probe without touching the backbone again (`apply_final_norm`).

Cache layout (one folder per model weights + input size, so a changed checkpoint never reads stale
features):

    <cache>/<key>/final_norm.safetensors         LayerNorm weight/bias (+ eps in the metadata)
    <cache>/<key>/model.json                     what the key was computed from (weights sha256, size, precision)
    <cache>/<key>/<dataset>/<split>[_n<N>].zarr  Zarr v3 array `tokens` [N, 1+h*w, C] float16, one chunk/image
    <cache>/<key>/<dataset>/<split>[_n<N>].json  progress: {"n", "n_done", "complete", grid, dim, ...}

`key` = sha256 of every tensor of the state dict (names, shapes, dtypes, bytes), the input size and
`FEATURE_VERSION`. Writing and resuming are `snd.eval.rowstore`'s: images in order, the progress JSON
replaced atomically after each batch, so a killed run resumes at `n_done`; readers accept a store only
when `complete` is true.

Departure from the paper (documented in docs/evaluation.md): the official probes augment every training
step (random crop/flip/rotate/colour), which needs a backbone forward per step; cached features are
computed once on un-augmented images. `snd eval --no-feature-cache` is the faithful path: it runs the frozen
backbone every step on flipped / colour-jittered images (see `snd.eval.augment`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn

from snd.errors import SndError
from snd.pipeline.device import to_host_async
from snd.data.formats import write_json
from snd.eval.rowstore import LazyRows, OrderedWrites, RowWriter, open_rows

log = logging.getLogger(__name__)

__all__ = ["FEATURE_VERSION", "PRECISIONS", "precision_context", "load_eval_backbone", "weights_fingerprint", "cache_key", "key_from_fingerprint", "extract_tokens",
           "final_norm_params", "apply_final_norm", "split_tokens", "FeatureStore", "ensure_features"]

# Bump when what is stored changes (layer, token order, dtype), so old caches are not read.
FEATURE_VERSION = 1

Precision = Literal["fp32", "tf32", "bf16"]
PRECISIONS = ("fp32", "tf32", "bf16")


@contextlib.contextmanager
def precision_context(precision: Precision, device: torch.device | str):
    """The backbone's arithmetic for extraction: plain fp32, TF32 matmuls/convolutions (fp32 storage, 10-bit
    mantissa products), or bf16 autocast. CPU runs every mode in fp32 except bf16 autocast."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ---- the backbone --------------------------------------------------------------------------------
def load_eval_backbone(model: str, *, weights: str | Path | None = None, init: str = "pretrained",
                       seed: int = 0) -> nn.Module:
    """A frozen backbone for probing: an SnD run dir / checkpoint / export path, or a backbone name.

    Args:
        model: existing path -> `snd.api.load_backbone(path)` (run / checkpoint with LoRA merged, export
            folder, or weights file);
            otherwise a name for `snd.models.backbone.create_backbone` (`dinov2_vits14`, a timm name, ...).
        weights, init: passed to `create_backbone` for names.
        seed: seeds the random init (`init="random"`), so a baseline built twice is the same network.
    """
    from snd.api import load_backbone, looks_like_path

    p = Path(model)
    if p.exists() or looks_like_path(model):  # a run, a checkpoint, an export or a weights file: the API's one loader
        net = load_backbone(p)
    else:
        from snd.models.backbone import create_backbone

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = create_backbone(model, weights=weights, init=init)  # type: ignore[arg-type]
    net.eval()
    for q in net.parameters():
        q.requires_grad_(False)
    return net


def _vit(model: nn.Module) -> nn.Module:
    from snd.models.backbone import _unwrap

    try:
        return _unwrap(model)
    except TypeError as e:
        raise SndError(f"probes need a timm VisionTransformer backbone: {e}") from e


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over the state dict (sorted names, dtype, shape, raw bytes): equal iff the weights are equal."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_key(model: nn.Module, img_hw: tuple[int, int], precision: Precision = "fp32") -> str:
    """Folder name of a model's features at one input size, patch size and extraction precision (16 hex
    digits; fp32 / patch-14 keys are those made before these options existed)."""
    from snd.models.backbone import patch_size

    return key_from_fingerprint(weights_fingerprint(model), img_hw, precision, patch_size(_vit(model)))


def key_from_fingerprint(fingerprint: str, img_hw: tuple[int, int], precision: Precision = "fp32",
                         patch: int = 14) -> str:
    """`cache_key` from a `weights_fingerprint` (`snd cache gc --keep` matches folders without loading twice)."""
    text = f"{fingerprint}|{img_hw[0]}x{img_hw[1]}|v{FEATURE_VERSION}"
    if precision != "fp32":
        text += f"|{precision}"
    if patch != 14:  # DINOv2 keys stay as they were
        text += f"|p{patch}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@torch.no_grad()
def extract_tokens(model: nn.Module, images01: Tensor, precision: Precision = "fp32", *,
                   normalized: bool = False) -> Tensor:
    """Last-block tokens before the final norm.

    Args:
        model: timm ViT (maybe wrapped).
        images01: [B, 3, H, W] in [0, 1], H and W multiples of the patch size.
        precision: the backbone's arithmetic (`precision_context`); tokens come back as float32 either way.
        normalized: the images are already the backbone's input (a protocol that normalises its own way, e.g.
            Probe3D's ScanNet pairs), passed unchanged instead of through the backbone's mean/std.

    Returns:
        tokens [B, 1 + h*w, C] float32: CLS first, then patches in row-major order (registers dropped).
    """
    from snd.models.backbone import normalize, patch_size

    vit = _vit(model)
    B, three, H, W = images01.shape
    assert three == 3, f"images must be [B,3,H,W], got {tuple(images01.shape)}"
    p = patch_size(vit)
    assert H % p == 0 and W % p == 0, f"image size {H}x{W} is not a multiple of the patch size {p}"
    with precision_context(precision, images01.device):
        x = images01 if normalized else normalize(vit, images01)
        out = vit.forward_intermediates(x, indices=1, norm=False, return_prefix_tokens=True,
                                        intermediates_only=True, output_fmt="NLC")
    spatial, prefix = out[0]  # [B, h*w, C], [B, n_prefix, C]
    assert spatial.shape[1] == (H // p) * (W // p), f"{tuple(spatial.shape)} vs grid {H // p}x{W // p}"
    if getattr(vit, "cls_token", None) is None:
        raise SndError("the backbone has no CLS token; the depth probe (CLS ⊕ patch) needs one")
    return torch.cat([prefix[:, :1], spatial], 1).float()


def final_norm_params(model: nn.Module) -> dict[str, Tensor]:
    """The final LayerNorm as tensors {"weight", "bias", "eps"} (what `apply_final_norm` needs)."""
    norm = _vit(model).norm
    if not isinstance(norm, nn.LayerNorm):
        raise SndError(f"expected a final LayerNorm, got {type(norm).__name__}")
    return {"weight": norm.weight.detach().float().cpu().clone(), "bias": norm.bias.detach().float().cpu().clone(),
            "eps": torch.tensor([norm.eps], dtype=torch.float64)}


def apply_final_norm(tokens: Tensor, params: dict[str, Tensor]) -> Tensor:
    """tokens [..., C] -> the backbone's final-norm output (what `forward_features` returns)."""
    w, b = params["weight"].to(tokens), params["bias"].to(tokens)
    return torch.nn.functional.layer_norm(tokens, (tokens.shape[-1],), w, b, float(params["eps"]))


def split_tokens(tokens: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """tokens [B, 1 + h*w, C] -> cls [B, C], patches [B, C, h, w]."""
    B, T, C = tokens.shape
    h, w = grid
    assert T == 1 + h * w, f"tokens {tuple(tokens.shape)} do not match grid {h}x{w} + CLS"
    return tokens[:, 0], tokens[:, 1:].transpose(1, 2).reshape(B, C, h, w)


# ---- the cache -----------------------------------------------------------------------------------
@dataclass
class FeatureStore(LazyRows):
    """Cached tokens of one (model key, dataset, split): `len(store)`, `store.tokens(i) -> [1+h*w, C]`."""

    path: Path  # the .zarr folder
    n: int
    grid: tuple[int, int]
    dim: int
    norm: dict[str, Tensor]
    _arr: Any = None

    def __len__(self) -> int:
        return self.n

    def tokens(self, i: int) -> Tensor:
        """Row i as stored (float16 [1+h*w, C]): half the bytes through worker pipes and host-to-device
        copies; the probes compute in float32 after the copy."""
        return torch.from_numpy(self._row("tokens", i))


def _store_paths(cache_dir: Path, key: str, dataset: str, split: str, n: int, full_n: int) -> tuple[Path, Path]:
    stem = split if n == full_n else f"{split}_n{n}"
    folder = cache_dir / key / dataset
    return folder / f"{stem}.zarr", folder / f"{stem}.json"


def ensure_features(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    *,
    cache_dir: Path,
    dataset_name: str,
    split: str,
    img_hw: tuple[int, int],
    indices: list[int] | None = None,
    key: str | None = None,
    batch: int = 16,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    precision: Precision = "fp32",
    writers: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> FeatureStore:
    """Tokens of `dataset[indices]` (all items when None) from the cache, extracting what is missing.

    Args:
        model: frozen backbone. Only called on a cache miss or to finish an interrupted extraction.
        dataset: items with `image [3,H,W]` in [0,1] at `img_hw`.
        cache_dir: cache root; `key` defaults to `cache_key(model, img_hw)`.
        indices: the subset of items (e.g. `--max-images`); the store's i-th row is `dataset[indices[i]]`.
        precision: the backbone's arithmetic (`precision_context`); part of the default `key`.
        writers: threads writing row blocks (different chunks) at the same time; the progress file still
            advances in row order, so a killed run resumes at the first block not yet written.
        progress: called with (done, total) after each batch.

    Returns:
        a complete `FeatureStore`.
    """
    key = key or cache_key(model, img_hw, precision)
    indices = list(range(len(dataset))) if indices is None else list(indices)  # type: ignore[arg-type]
    n = len(indices)
    zpath, jpath = _store_paths(Path(cache_dir), key, dataset_name, split, n, len(dataset))  # type: ignore[arg-type]
    norm_path = Path(cache_dir) / key / "final_norm.safetensors"
    from safetensors.torch import save_file

    vit = _vit(model)
    from snd.models.backbone import patch_size

    p = patch_size(vit)
    grid = (img_hw[0] // p, img_hw[1] // p)
    dim = int(vit.embed_dim)
    want = {"n": n, "grid": list(grid), "dim": dim, "img_hw": list(img_hw), "version": FEATURE_VERSION,
            "indices_sha": hashlib.sha256(json.dumps(indices).encode()).hexdigest()[:16]}
    if precision != "fp32":  # fp32 stores made before the option existed stay valid
        want["precision"] = precision
    if open_rows(zpath, jpath, want) and norm_path.is_file():
        return FeatureStore(zpath, n, grid, dim, _load_norm(norm_path))

    zpath.parent.mkdir(parents=True, exist_ok=True)
    if not norm_path.is_file():
        params = final_norm_params(model)
        save_file({k: v.float() for k, v in params.items()}, str(norm_path.with_suffix(".tmp")))
        os.replace(norm_path.with_suffix(".tmp"), norm_path)
        write_json(Path(cache_dir) / key / "model.json", {"key": key, "img_hw": list(img_hw), "dim": dim,
                                                           "class": type(vit).__name__, "version": FEATURE_VERSION,
                                                           "precision": precision,  # `snd cache info` / `gc --keep`
                                                           "weights_sha256": weights_fingerprint(model)})
    T = 1 + grid[0] * grid[1]
    writer = RowWriter(zpath, jpath, want, {"tokens": ((T, dim), "float16", None)}, n)
    start = writer.done
    sub = torch.utils.data.Subset(dataset, indices[start:])
    device = torch.device(device)
    cuda = device.type == "cuda"
    loader = torch.utils.data.DataLoader(sub, batch_size=batch, shuffle=False, num_workers=num_workers,
                                         collate_fn=_collate_images, pin_memory=cuda)
    model = model.to(device)
    # writer threads: each waits for its batch's tokens to reach the host and writes them while the next
    # batches' forwards run; blocks are committed in order (`OrderedWrites`). The main thread never waits
    # for the device: copies in and out are asynchronous.
    def rows(host: Tensor, ready: torch.cuda.Event | None):
        def make() -> dict:
            if ready is not None:
                ready.synchronize()
            return {"tokens": host.numpy()}
        return make

    with OrderedWrites(writer, writers, progress) as out:
        for images in loader:
            tok = extract_tokens(model, images.to(device, non_blocking=True), precision)
            assert tok.shape[1:] == (T, dim), f"tokens {tuple(tok.shape)} vs grid {grid} dim {dim}"
            host = to_host_async(tok.half())
            ready = None
            if cuda:
                ready = torch.cuda.Event()
                ready.record()
            out.submit(rows(host, ready), host.shape[0])
    writer.finish()
    return FeatureStore(zpath, n, grid, dim, _load_norm(norm_path))


def _load_norm(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _collate_images(items: list[dict]) -> Tensor:
    return torch.stack([it["image"] for it in items])
