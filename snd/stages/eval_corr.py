"""`snd eval`'s correspondence task: no training, one pass over the pairs (`snd.eval.correspondence`).

Paper protocol (Probe3D's ScanNet script): pairs at `PAPER_CORR_HW` (480x640 for ScanNet-1500), centre-padded
to a multiple of the backbone's patch for the ViT (490x644 for /14; 480x640 is already a multiple of 16; the padding normalises to 0
as Probe3D's does), K from
each scene's intrinsics.npz, depth and K scaled by Probe3D's rules (`geometry="probe3d"`). Fast protocol:
pairs at `snd eval`'s input size, snd's consistent scaling rules.
"""
from __future__ import annotations

import torch

from snd.pipeline.config import EvalConfig


def _backbone_mean(net: torch.nn.Module) -> torch.Tensor:
    """[3] the image value the backbone normalises to 0 (its mean), read off `normalize` itself."""
    from snd.models.backbone import _unwrap, normalize

    vit = _unwrap(net)
    z = normalize(vit, torch.zeros(1, 3, 1, 1))[0, :, 0, 0]  # -mean / std
    o = normalize(vit, torch.ones(1, 3, 1, 1))[0, :, 0, 0]  # (1 - mean) / std
    return (-z / (o - z)).float()


def corr_model_fn(net: torch.nn.Module, *, paper: bool, precision: str, device: torch.device):
    """images [B, 3, H, W] in [0, 1] -> raw last-block patch features [B, C, h, w] of `net`. Paper: the images
    are first centre-padded to a multiple of the backbone's own patch (`center_pad`, the padding normalising to
    0: 480x640 -> 490x644 for /14, unchanged for /16), so the map covers the padded frame; Probe3D then samples
    it as if it covered the unpadded image (`snd.eval.correspondence.sample_features`)."""
    from snd.eval.features import extract_tokens, split_tokens
    from snd.eval.protocol import center_pad
    from snd.models.backbone import _unwrap, patch_size

    p = patch_size(_unwrap(net))
    fill = _backbone_mean(net)

    def model_fn(images: torch.Tensor) -> torch.Tensor:
        if paper:
            images = center_pad(images, p, fill)
        tok = extract_tokens(net, images.to(device), precision)
        return split_tokens(tok, (images.shape[-2] // p, images.shape[-1] // p))[1]

    return model_fn


def _eval_corr(role, name: str, cfg: EvalConfig, device: torch.device) -> dict:
    from snd.eval import datasets as D
    from snd.eval.correspondence import evaluate_correspondence
    from snd.eval.protocol import PAPER_CORR_HW, dataset_kwargs

    paper = cfg.protocol == "paper"
    hw = PAPER_CORR_HW.get(name, (cfg.img_height, cfg.img_width)) if paper else (cfg.img_height, cfg.img_width)
    model_fn = corr_model_fn(role.net.to(device), paper=paper, precision=cfg.extract_precision, device=device)
    pairs = D.get_dataset(name, cfg.data_root, "val", "correspondence", hw,
                          **dataset_kwargs(cfg.protocol, name, "correspondence", "val"))
    res = evaluate_correspondence(model_fn, pairs, max_pairs=cfg.max_images, geometry="probe3d" if paper else "snd")
    metrics = {f"recall_{k}": 100 * v for k, v in res["recall"].items()}
    for k, v in res["recall_by_rotation"].items():
        metrics[f"recall_10px_rot_{k}"] = None if v is None else 100 * v
    return {"metrics": metrics, "curve": res["curve"], "n_val": res["num_pairs"], "input_hw": list(hw),
            "geometry": res["geometry"], "pairs_by_rotation": res["pairs_by_rotation"],
            "num_correspondences": res["num_correspondences"]}
