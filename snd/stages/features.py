"""`snd features IMAGES... --model ... --out DIR`: features.npz and the pictures of what the features see.

Writes ``features.npz`` (``cls [B, C]``, ``patches [B, C, h, w]``, ``names``), per image ``<name>_pca.png``
(first 3 principal components fitted jointly over all images, so colours compare across views) and
``<name>_kmeans.png`` (K-means on all images' patches jointly), and for the first two images
``matches.png`` (mutual nearest neighbours drawn as lines). Pictures are at the image size (patches
upsampled nearest).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from snd.errors import SndError
from snd.pipeline.config import FeaturesConfig

_PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
                     [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [170, 110, 40]],
                    dtype=np.uint8)


def _upscale(a: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(a).resize((hw[1], hw[0]), Image.NEAREST))


def run(cfg: FeaturesConfig, images: list[Path]) -> dict:
    from PIL import Image

    from snd.api import extract_features, load_backbone
    from snd.pipeline.device import resolve_device
    from snd.viz import draw_matches, kmeans, mutual_nn, pca_colors

    if not images:
        raise SndError("no images given", hint="snd features img0.jpg img1.jpg --model ... --out DIR")
    pils = []
    for p in images:
        if not Path(p).is_file():
            raise SndError(f"{'a folder, not an image' if Path(p).is_dir() else 'image not found'}: {p}", path=p,
                           hint="pass image files (a shell glob works: DIR/*.jpg)" if Path(p).is_dir() else None)
        try:
            pils.append(Image.open(p).convert("RGB"))
        except OSError as e:
            raise SndError(f"cannot read image {p}: {e}", path=p) from e
    size = None
    if cfg.img_height or cfg.img_width:
        if not (cfg.img_height and cfg.img_width):
            raise SndError("give both --img-height and --img-width")
        size = (cfg.img_height, cfg.img_width)
    model = load_backbone(cfg.model, weights=cfg.weights, device=resolve_device(cfg.device))
    if size is None and len({im.size for im in pils}) > 1:  # mixed sizes: the first's, on the model's patch grid
        from snd.models.backbone import _unwrap, patch_size

        p = patch_size(_unwrap(model))
        size = (round(pils[0].size[1] / p) * p, round(pils[0].size[0] / p) * p)
    cls, patches = extract_features(model, pils, size=size, resize=cfg.resize)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [Path(p).stem for p in images]
    np.savez(out / "features.npz", cls=cls.numpy(), patches=patches.numpy(), names=np.array(names))
    written = ["features.npz"]
    arrays = [np.asarray(im) for im in pils]
    B, C, h, w = patches.shape
    colours = pca_colors(list(patches))
    labels, _ = kmeans(patches.permute(0, 2, 3, 1).reshape(-1, C), min(cfg.clusters, B * h * w), seed=cfg.seed)
    labels = labels.reshape(B, h, w).numpy()
    for i, name in enumerate(names):
        hw = arrays[i].shape[:2]
        Image.fromarray(_upscale((colours[i].numpy() * 255).round().astype(np.uint8), hw)).save(out / f"{name}_pca.png")
        seg = _PALETTE[labels[i] % len(_PALETTE)]
        Image.fromarray(_upscale(seg, hw)).save(out / f"{name}_kmeans.png")
        written += [f"{name}_pca.png", f"{name}_kmeans.png"]
    if B >= 2:
        i0, i1, _ = mutual_nn(patches[0], patches[1])
        draw_matches(arrays[0], arrays[1], (h, w), (h, w), i0, i1).save(out / "matches.png")
        written.append("matches.png")
    return {"out": str(out), "files": written, "grid": [h, w], "dim": C}
