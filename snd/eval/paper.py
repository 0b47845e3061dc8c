"""The paper's probe numbers (Tables 1–4), printed beside ours when dataset and backbone size match.

Units as in the paper and in snd's results: depth AbsRel / RMSE (m), normals RMSE (degrees), segmentation
aAcc / mIoU / mAcc (percent). Rows: "DINOv2" (the released weights) and "SnD" (the paper's "Ours").
Correspondence numbers exist only as a figure (Fig. 7), so none are listed.
"""
from __future__ import annotations

from typing import Optional

__all__ = ["PAPER", "paper_number", "backbone_size"]

# PAPER[(size, dataset, task)][row][metric]
PAPER: dict[tuple[str, str, str], dict[str, dict[str, float]]] = {
    # Table 1: monocular depth
    ("vits", "scannetpp", "depth"): {"DINOv2": {"abs_rel": 0.2811, "rmse": 0.3777}, "FiT3D": {"abs_rel": 0.2500, "rmse": 0.3506},
                                     "SnD": {"abs_rel": 0.2421, "rmse": 0.3299}},
    ("vits", "scannet", "depth"): {"DINOv2": {"abs_rel": 0.1437, "rmse": 0.2817}, "FiT3D": {"abs_rel": 0.1375, "rmse": 0.2713},
                                   "SnD": {"abs_rel": 0.1266, "rmse": 0.2555}},
    ("vits", "nyuv2", "depth"): {"DINOv2": {"abs_rel": 0.1476, "rmse": 0.5210}, "FiT3D": {"abs_rel": 0.1418, "rmse": 0.5075},
                                 "SnD": {"abs_rel": 0.1406, "rmse": 0.4912}},
    ("vitb", "scannetpp", "depth"): {"DINOv2": {"abs_rel": 0.2539, "rmse": 0.3435}, "FiT3D": {"abs_rel": 0.2420, "rmse": 0.3306},
                                     "SnD": {"abs_rel": 0.2169, "rmse": 0.2971}},
    ("vitb", "scannet", "depth"): {"DINOv2": {"abs_rel": 0.1169, "rmse": 0.2369}, "FiT3D": {"abs_rel": 0.1166, "rmse": 0.2346},
                                   "SnD": {"abs_rel": 0.1113, "rmse": 0.2245}},
    ("vitb", "nyuv2", "depth"): {"DINOv2": {"abs_rel": 0.1375, "rmse": 0.4948}, "FiT3D": {"abs_rel": 0.1359, "rmse": 0.4794},
                                 "SnD": {"abs_rel": 0.1261, "rmse": 0.4596}},
    # Table 4 (ViT-B only): KITTI depth
    ("vitb", "kitti", "depth"): {"DINOv2": {"abs_rel": 0.0686, "rmse": 2.3558}, "FiT3D": {"abs_rel": 0.0679, "rmse": 2.2485},
                                 "SnD": {"abs_rel": 0.0631, "rmse": 2.1741}},
    # Table 2: normals (NYUv2)
    ("vits", "nyuv2", "normals"): {"DINOv2": {"rmse": 30.99}, "FiT3D": {"rmse": 30.57}, "SnD": {"rmse": 28.93}},
    ("vitb", "nyuv2", "normals"): {"DINOv2": {"rmse": 31.40}, "FiT3D": {"rmse": 30.57}, "SnD": {"rmse": 29.37}},
    # Table 3: segmentation
    ("vits", "scannetpp", "seg"): {"DINOv2": {"aAcc": 80.23, "mIoU": 29.54, "mAcc": 39.11},
                                   "FiT3D": {"aAcc": 83.34, "mIoU": 31.77, "mAcc": 41.09},
                                   "SnD": {"aAcc": 83.84, "mIoU": 31.78, "mAcc": 41.42}},
    ("vits", "scannet", "seg"): {"DINOv2": {"aAcc": 76.60, "mIoU": 51.27, "mAcc": 63.28},
                                 "FiT3D": {"aAcc": 78.53, "mIoU": 54.50, "mAcc": 66.57},
                                 "SnD": {"aAcc": 79.48, "mIoU": 56.01, "mAcc": 68.10}},
    ("vits", "nyuv2", "seg"): {"DINOv2": {"aAcc": 82.25, "mIoU": 64.73, "mAcc": 75.56},
                               "FiT3D": {"aAcc": 83.32, "mIoU": 66.33, "mAcc": 77.06},
                               "SnD": {"aAcc": 84.31, "mIoU": 67.50, "mAcc": 77.96}},
    ("vitb", "scannetpp", "seg"): {"DINOv2": {"aAcc": 81.85, "mIoU": 31.95, "mAcc": 41.69},
                                   "FiT3D": {"aAcc": 84.90, "mIoU": 34.85, "mAcc": 44.83},
                                   "SnD": {"aAcc": 84.77, "mIoU": 34.07, "mAcc": 44.00}},
    ("vitb", "scannet", "seg"): {"DINOv2": {"aAcc": 79.48, "mIoU": 56.42, "mAcc": 68.22},
                                 "FiT3D": {"aAcc": 82.25, "mIoU": 60.78, "mAcc": 72.60},
                                 "SnD": {"aAcc": 83.43, "mIoU": 62.64, "mAcc": 74.29}},
    ("vitb", "nyuv2", "seg"): {"DINOv2": {"aAcc": 83.92, "mIoU": 67.47, "mAcc": 78.02},
                               "FiT3D": {"aAcc": 85.54, "mIoU": 70.18, "mAcc": 80.36},
                               "SnD": {"aAcc": 86.05, "mIoU": 70.60, "mAcc": 80.91}},
    # Table 4 (ViT-B only): out-of-domain segmentation
    ("vitb", "ade20k", "seg"): {"DINOv2": {"aAcc": 77.39, "mIoU": 40.78, "mAcc": 53.31},
                                "FiT3D": {"aAcc": 82.21, "mIoU": 48.29, "mAcc": 60.03},
                                "SnD": {"aAcc": 83.24, "mIoU": 50.01, "mAcc": 61.61}},
    ("vitb", "voc", "seg"): {"DINOv2": {"aAcc": 96.20, "mIoU": 83.00, "mAcc": 89.36},
                             "FiT3D": {"aAcc": 96.77, "mIoU": 85.08, "mAcc": 90.72},
                             "SnD": {"aAcc": 96.96, "mIoU": 85.75, "mAcc": 91.63}},
}


def backbone_size(embed_dim: int, patch_size: int) -> Optional[str]:
    """'vits' / 'vitb' for DINOv2-shaped ViT-S/14 and ViT-B/14 (the only sizes the paper reports)."""
    if patch_size != 14:
        return None
    return {384: "vits", 768: "vitb"}.get(int(embed_dim))


def paper_number(size: Optional[str], dataset: str, task: str, row: str, metric: str) -> Optional[float]:
    """The paper's value, or None when the paper has no such cell."""
    if size is None:
        return None
    return PAPER.get((size, dataset, task), {}).get(row, {}).get(metric)
