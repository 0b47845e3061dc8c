"""`snd eval`'s correspondence task: no training, one pass over the pairs (`snd.eval.correspondence`).

Paper protocol (Probe3D's ScanNet script): pairs at `PAPER_CORR_HW` (480x640 for ScanNet-1500), centre-padded
to a multiple of the backbone's patch for the ViT (490x644 for /14; 480x640 is already a multiple of 16), normalised
as Probe3D's pairs are (mean/std 0.5, not the backbone's) and padded with zeros after normalising, K from each
scene's intrinsics.npz, depth and K scaled by Probe3D's rules (`geometry="probe3d"`). Fast protocol:
pairs at `snd eval`'s input size, snd's consistent scaling rules.
"""
from __future__ import annotations

import torch

from snd.pipeline.config import EvalConfig


PROBE3D_PAIR_MEAN_STD = 0.5  # Probe3D's ScanNetPairsDataset: Normalize(mean=[0.5] * 3, std=[0.5] * 3)


def corr_model_fn(net: torch.nn.Module, *, paper: bool, precision: str, device: torch.device):
    """images [B, 3, H, W] in [0, 1] -> raw last-block patch features [B, C, h, w] of `net`.

    Paper (Probe3D's `ScanNetPairsDataset` + `DINO.forward`): the backbone receives (x - 0.5) / 0.5, whatever its
    own mean/std, centre-padded with zeros (`center_pad` on the normalised image, Probe3D's `center_padding`) to a
    multiple of its patch (480x640 -> 490x644 for /14, unchanged for /16), so the map covers the padded frame;
    Probe3D then samples it as if it covered the unpadded image (`snd.eval.correspondence.sample_features`).
    Fast: the backbone's own normalisation (ImageNet mean/std), no padding."""
    from snd.eval.features import extract_tokens, split_tokens
    from snd.eval.protocol import center_pad
    from snd.models.backbone import _unwrap, patch_size

    p = patch_size(_unwrap(net))

    def model_fn(images: torch.Tensor) -> torch.Tensor:
        if paper:
            x = images.sub(PROBE3D_PAIR_MEAN_STD).div(PROBE3D_PAIR_MEAN_STD)  # torchvision Normalize's arithmetic
            x = center_pad(x, p, torch.zeros(3))
            tok = extract_tokens(net, x.to(device), precision, normalized=True)
        else:
            x = images
            tok = extract_tokens(net, x.to(device), precision)
        return split_tokens(tok, (x.shape[-2] // p, x.shape[-1] // p))[1]

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
