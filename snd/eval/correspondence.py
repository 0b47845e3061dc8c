"""Multi-view correspondence probe (Probe3D's ScanNet protocol) and its recall-curve figure.

Protocol (github.com/mbanani/probe3d evaluate_scannet_correspondence.py + evals/utils/correspondence.py,
read and re-implemented): per pair, dense features of both images; depth and intrinsics are scaled by
`scale` (0.25); every valid depth pixel of that grid is unprojected to 3D and gets the bilinearly sampled
feature at its position; for each point of view 0 the 2 nearest neighbours among view-1 points by cosine
distance; the ratio test weight 1 - d1/d2 ranks matches and the top `num_corr` (1,000) are kept; the
view-0 point is moved by the GT relative pose T_0to1 and projected into view 1; the error is its pixel
distance to the projection of the matched view-1 point, in pixels *of the scaled grid* (as Probe3D).
Recall@{5,10,20}px is over all kept correspondences of all pairs; recall@10px per rotation bin is the
mean of per-pair recalls of the pairs whose GT relative rotation angle falls in the bin.

`geometry="probe3d"` (the paper protocol) downsamples depth as Probe3D does, `F.interpolate(scale_factor=s,
mode="nearest")` (grid pixel j reads source pixel floor(j / s)), and scales K as Probe3D does, K[:2] *= s
with pixel centres at +0.5 (`probe3d_intrinsics`): a grid pixel's point is unprojected through the centre
of a cell that does not hold the pixel whose depth it read. `geometry="snd"` (the fast protocol) keeps
the two consistent: depth by nearest-exact and K scaled as (c + 0.5) s - 0.5 (+0.2 to +1.7 recall points
against Probe3D's rule on a synthetic scene). Other departures from Probe3D (deliberate, small): separate
K0/K1 (Probe3D assumes one K); `ratio_test=False` ranks by smallest cosine distance
(Probe3D's topk would keep the *largest* distances there); the last rotation bin includes 180 degrees.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

ModelFn = Callable[[torch.Tensor], torch.Tensor]  # images [B,3,H,W] in [0,1] -> features [B,C,h,w]


# -- geometry ---------------------------------------------------------------------------------------
def scale_intrinsics(K: torch.Tensor, sx: float, sy: float) -> torch.Tensor:
    """K [3,3] for an image resized by (sx, sy), pixel centres at integers."""
    assert K.shape == (3, 3), f"K must be [3,3], got {tuple(K.shape)}"
    K = K.clone().double()
    K[0, 0] *= sx
    K[0, 1] *= sx
    K[1, 1] *= sy
    K[0, 2] = (K[0, 2] + 0.5) * sx - 0.5
    K[1, 2] = (K[1, 2] + 0.5) * sy - 0.5
    return K


def probe3d_intrinsics(K: torch.Tensor, scale: float) -> torch.Tensor:
    """Probe3D's K for the depth grid scaled by `scale`: K[:2] *= scale, pixel centres at +0.5. Returned in
    snd's convention (centres at integers: cx, cy − 0.5) so `depth_points`/`project` compute Probe3D's points."""
    assert K.shape == (3, 3), f"K must be [3,3], got {tuple(K.shape)}"
    K = K.clone().double()
    K[:2] *= scale
    K[0, 2] -= 0.5
    K[1, 2] -= 0.5
    return K


def depth_points(depth: torch.Tensor, K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid depth pixels -> (camera-frame points [N, 3], pixel coordinates [N, 2] as (u, v)).

    Args:
        depth: [h, w] z-depth, 0 = invalid.
        K:     [3, 3] intrinsics of the h x w grid (centres at integers).
    """
    assert depth.ndim == 2, f"depth must be [h,w], got {tuple(depth.shape)}"
    v, u = torch.nonzero(depth > 0, as_tuple=True)
    z = depth[v, u].double()
    uv = torch.stack([u, v], -1).double()
    K = K.double().to(depth.device)
    x = (uv[:, 0] - K[0, 2] - K[0, 1] * (uv[:, 1] - K[1, 2]) / K[1, 1]) / K[0, 0] * z
    y = (uv[:, 1] - K[1, 2]) / K[1, 1] * z
    return torch.stack([x, y, z], -1), uv


def project(points: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Camera-frame points [N, 3] -> pixels [N, 2] (z clamped at 1e-9 like Probe3D)."""
    p = points.double() @ K.double().to(points.device).T
    return p[:, :2] / p[:, 2:3].clamp(min=1e-9)


def transform(points: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """Points [N, 3] mapped by a rigid 4x4 T."""
    T = T.double().to(points.device)
    return points.double() @ T[:3, :3].T + T[:3, 3]


def rotation_angle_deg(R: torch.Tensor) -> torch.Tensor:
    """Rotation angle in degrees of rotation matrices [..., 3, 3] (acos((trace - 1) / 2))."""
    tr = R[..., 0, 0] + R[..., 1, 1] + R[..., 2, 2]
    return torch.rad2deg(torch.acos(((tr - 1) * 0.5).clamp(-1, 1)))


def sample_features(feats: torch.Tensor, uv: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear features [N, C] at pixel positions uv [N, 2] of an hw grid, from feats [C, h', w'].

    The feature map covers the same field of view as the hw grid (align_corners=False: the map's and
    the grid's outer pixel edges coincide), so any feature resolution works.
    """
    assert feats.ndim == 3, f"feats must be [C,h,w], got {tuple(feats.shape)}"
    H, W = hw
    g = torch.empty_like(uv, dtype=feats.dtype)
    g[:, 0] = (2 * (uv[:, 0] + 0.5) / W - 1).to(feats.dtype)
    g[:, 1] = (2 * (uv[:, 1] + 0.5) / H - 1).to(feats.dtype)
    out = F.grid_sample(feats[None].float(), g[None, None].float(), mode="bilinear", align_corners=False)
    return out[0, :, 0].T  # [N, C]


# -- matching ---------------------------------------------------------------------------------------
def _top2(f0: torch.Tensor, f1: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine distances [N0, 2] and indices [N0, 2] of the 2 nearest view-1 features (chunked over N0)."""
    a = F.normalize(f0.float(), dim=-1)
    b = F.normalize(f1.float(), dim=-1)
    k = min(2, b.shape[0])
    dists, idx = [], []
    for s in range(0, a.shape[0], chunk):
        sim = a[s : s + chunk] @ b.T
        val, ind = sim.topk(k, dim=1)
        dists.append(1 - val)
        idx.append(ind)
    d, i = torch.cat(dists), torch.cat(idx)
    if k == 1:  # a single candidate: no second neighbour, ratio 1 -> weight 0
        d, i = torch.cat([d, d], 1), torch.cat([i, i], 1)
    return d, i


def match_features(f0: torch.Tensor, f1: torch.Tensor, *, num_corr: int = 1000, ratio_test: bool = True,
                   chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Probe3D matching: nearest view-1 neighbour of every view-0 feature, top `num_corr` by weight.

    Args:
        f0: [N0, C] view-0 features;  f1: [N1, C] view-1 features.
    Returns:
        (idx0 [M], idx1 [M], weight [M]) with M = min(num_corr, N0), sorted by decreasing weight;
        weight = 1 - d1/d2 (ratio test, cosine distances clamped at 1e-9) or -d1 without it.
    """
    assert f0.ndim == 2 and f1.ndim == 2 and f0.shape[1] == f1.shape[1], f"{tuple(f0.shape)} vs {tuple(f1.shape)}"
    if f0.shape[0] == 0 or f1.shape[0] == 0:
        e = torch.zeros(0, dtype=torch.long, device=f0.device)
        return e, e, torch.zeros(0, device=f0.device)
    d, i = _top2(f0, f1, chunk)
    if ratio_test:
        d = d.clamp(min=1e-9)
        weight = 1 - d[:, 0] / d[:, 1]
    else:
        weight = -d[:, 0]
    m = min(num_corr, weight.shape[0])
    w, idx0 = weight.topk(m)
    return idx0, i[idx0, 0], w


def match_features_reference(f0: torch.Tensor, f1: torch.Tensor, *, num_corr: int = 1000,
                             ratio_test: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slow, obviously-correct twin of `match_features`: full distance matrix, full sorts, float64."""
    a = f0.double() / f0.double().norm(dim=1, keepdim=True)
    b = f1.double() / f1.double().norm(dim=1, keepdim=True)
    dist = 1 - a @ b.T  # [N0, N1]
    order = torch.argsort(dist, dim=1, stable=True)
    nn1 = order[:, 0]
    d1 = dist.gather(1, order[:, :1])[:, 0]
    d2 = dist.gather(1, order[:, 1:2])[:, 0] if dist.shape[1] > 1 else d1
    weight = 1 - d1.clamp(min=1e-9) / d2.clamp(min=1e-9) if ratio_test else -d1
    keep = torch.argsort(weight, descending=True, stable=True)[: min(num_corr, len(weight))]
    return keep, nn1[keep], weight[keep]


def pair_errors(feat0: torch.Tensor, feat1: torch.Tensor, depth0: torch.Tensor, depth1: torch.Tensor,
                K0: torch.Tensor, K1: torch.Tensor, T_0to1: torch.Tensor, *, num_corr: int = 1000,
                ratio_test: bool = True, matcher: Callable = match_features) -> torch.Tensor:
    """Pixel errors [M] of the kept correspondences of one pair (all inputs already at the probe grid).

    Args:
        feat0, feat1:   [C, h', w'] dense features of the two images.
        depth0, depth1: [h, w] z-depth of the probe grid (0 invalid).
        K0, K1:         [3, 3] intrinsics of the h x w grid.
        T_0to1:         [4, 4] camera-0 -> camera-1 coordinates.
    """
    xyz0, uv0 = depth_points(depth0, K0)
    xyz1, uv1 = depth_points(depth1, K1)
    f0 = sample_features(feat0, uv0, tuple(depth0.shape))
    f1 = sample_features(feat1, uv1, tuple(depth1.shape))
    i0, i1, _ = matcher(f0, f1, num_corr=num_corr, ratio_test=ratio_test)
    uv_0in1 = project(transform(xyz0[i0], T_0to1), K1)
    uv_1 = project(xyz1[i1], K1)
    return (uv_0in1 - uv_1).norm(dim=1)


def _scaled_geometry(s: dict, scale: float, geometry: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(K0, K1, depths [2, h, w]) of a pair sample at the probe grid, by the rule of `geometry`."""
    d = torch.stack([s["depth0"], s["depth1"]])[:, None].float()
    H, W = d.shape[-2:]
    if geometry == "probe3d":
        deps = F.interpolate(d, scale_factor=scale, mode="nearest")[:, 0]
        return probe3d_intrinsics(s["K0"], scale), probe3d_intrinsics(s["K1"], scale), deps
    h, w = max(1, round(H * scale)), max(1, round(W * scale))
    deps = F.interpolate(d, size=(h, w), mode="nearest-exact")[:, 0]
    return scale_intrinsics(s["K0"], w / W, h / H), scale_intrinsics(s["K1"], w / W, h / H), deps


# -- the probe --------------------------------------------------------------------------------------
def _bin_key(lo: float, hi: float) -> str:
    return f"{lo:g}-{hi:g}"


def bin_by_rotation(values: Sequence[float], angles_deg: Sequence[float],
                    bins: Sequence[tuple[float, float]]) -> tuple[dict, dict]:
    """Mean of per-pair `values` per rotation bin [lo, hi) (the last bin closed) -> ({bin: mean|None}, {bin: count})."""
    v, a = np.asarray(values, dtype=np.float64), np.asarray(angles_deg, dtype=np.float64)
    assert v.shape == a.shape, f"{v.shape} values vs {a.shape} angles"
    means, counts = {}, {}
    for bi, (lo, hi) in enumerate(bins):
        last = bi == len(bins) - 1
        m = (a >= lo) & ((a <= hi) if last else (a < hi))
        means[_bin_key(lo, hi)] = float(v[m].mean()) if m.any() else None
        counts[_bin_key(lo, hi)] = int(m.sum())
    return means, counts


def evaluate_correspondence(
    model_fn: ModelFn,
    pairs_dataset: torch.utils.data.Dataset,
    *,
    scale: float = 0.25,
    num_corr: int = 1000,
    ratio_test: bool = True,
    thresholds: Sequence[float] = (5, 10, 20),
    rotation_bins: Sequence[tuple[float, float]] = ((0, 15), (15, 30), (30, 60), (60, 180)),
    bin_threshold: float = 10.0,
    curve_max_px: Optional[float] = None,
    max_pairs: Optional[int] = None,
    progress: bool = False,
    geometry: str = "snd",
) -> dict:
    """Probe3D correspondence recall of `model_fn` on a pairs dataset (`snd.eval.datasets.pairs` format).

    Args:
        model_fn: images [B, 3, H, W] in [0, 1] (CPU) -> dense features [B, C, h, w] (any device; matching
            runs there).
        pairs_dataset: items with image0/1 [3,H,W], depth0/1 [H,W], K0/K1 [3,3], T_0to1 [4,4], meta.
        scale: probe grid = round(scale * H) x round(scale * W) (probe3d: floor); errors are in pixels of this grid.
        geometry: "snd" or "probe3d" (the depth downsampling and K scaling rules; module docstring).
    Returns:
        dict with recall fractions in [0, 1]: "recall" {"5px": .., ...}, "recall_by_rotation"
        {"0-15": .. | None when the bin is empty}, "pairs_by_rotation", "curve" {"px", "recall"},
        "num_pairs", "num_correspondences", "pairs_without_matches" and the settings used.
    """
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    if num_corr < 1:
        raise ValueError(f"num_corr must be >= 1, got {num_corr}")
    if geometry not in ("snd", "probe3d"):
        raise ValueError(f"geometry must be 'snd' or 'probe3d', got {geometry!r}")
    n = len(pairs_dataset) if max_pairs is None else min(max_pairs, len(pairs_dataset))
    errors: list[torch.Tensor] = []
    per_pair_bin_recall: list[float] = []
    angles: list[float] = []
    empty = 0
    it = range(n)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="correspondence", leave=False)
    for k in it:
        s = pairs_dataset[k]
        imgs = torch.stack([s["image0"], s["image1"]])
        H, W = imgs.shape[-2:]
        with torch.no_grad():
            feats = model_fn(imgs)
        assert feats.ndim == 4 and feats.shape[0] == 2, f"model_fn must return [2,C,h,w], got {tuple(feats.shape)}"
        dev = feats.device
        K0, K1, deps = _scaled_geometry(s, scale, geometry)
        deps = deps.to(dev)
        err = pair_errors(feats[0].float(), feats[1].float(), deps[0], deps[1], K0, K1, s["T_0to1"],
                          num_corr=num_corr, ratio_test=ratio_test).cpu()
        if err.numel() == 0:
            empty += 1
            log.debug("pair %s has no valid correspondences", s["meta"].get("id"))
        errors.append(err)
        per_pair_bin_recall.append(float((err < bin_threshold).float().mean()) if err.numel() else 0.0)
        angles.append(float(rotation_angle_deg(s["T_0to1"][:3, :3].double())))
    all_err = torch.cat(errors) if errors else torch.zeros(0)
    total = all_err.numel()

    def recall(th: float) -> float:
        return float((all_err < th).double().mean()) if total else 0.0

    by_rot, counts = bin_by_rotation(per_pair_bin_recall, angles, rotation_bins)
    cmax = float(curve_max_px if curve_max_px is not None else 2 * max(thresholds))
    px = np.linspace(0, cmax, int(cmax) + 1) if cmax >= 1 else np.array([0.0, cmax])
    return {
        "recall": {f"{t:g}px": recall(t) for t in thresholds},
        "recall_by_rotation": by_rot,
        "pairs_by_rotation": counts,
        "rotation_bin_threshold_px": bin_threshold,
        "curve": {"px": px.tolist(), "recall": [recall(float(p)) for p in px]},
        "num_pairs": n,
        "num_correspondences": int(total),
        "pairs_without_matches": empty,
        "scale": scale, "geometry": geometry,
        "num_corr": num_corr,
        "ratio_test": ratio_test,
    }


# -- figure -----------------------------------------------------------------------------------------
_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


def write_recall_curve_png(curves: dict[str, dict], path: str | Path, *, title: str = "correspondence recall",
                           size: tuple[int, int] = (640, 420)) -> Path:
    """Recall-vs-pixel-threshold curves (one per model, from `evaluate_correspondence(...)["curve"]`) as a PNG.

    Args:
        curves: {label: {"px": [...], "recall": [...]}}; recall in [0, 1].
    """
    from PIL import Image, ImageDraw

    if not curves:
        raise ValueError("write_recall_curve_png needs at least one curve")
    W, H = size
    left, right, top, bottom = 56, 16, 30, 44
    img = Image.new("RGB", (W, H), "white")
    dr = ImageDraw.Draw(img)
    xmax = max(max(c["px"]) for c in curves.values()) or 1.0
    pw, ph = W - left - right, H - top - bottom

    def to_xy(x: float, y: float) -> tuple[float, float]:
        return left + pw * x / xmax, top + ph * (1 - y)

    dr.rectangle([left, top, left + pw, top + ph], outline=(0, 0, 0))
    for yt in (0, 0.25, 0.5, 0.75, 1.0):
        _, yy = to_xy(0, yt)
        dr.line([left, yy, left + pw, yy], fill=(225, 225, 225))
        dr.text((6, yy - 6), f"{100 * yt:.0f}%", fill=(0, 0, 0))
    step = max(1, int(math.ceil(xmax / 8)))
    for xt in range(0, int(xmax) + 1, step):
        xx, _ = to_xy(xt, 0)
        dr.line([xx, top + ph, xx, top + ph + 4], fill=(0, 0, 0))
        dr.text((xx - 6, top + ph + 8), f"{xt}", fill=(0, 0, 0))
    dr.text((left + pw // 2 - 40, H - 18), "error threshold (px)", fill=(0, 0, 0))
    dr.text((left, 8), title, fill=(0, 0, 0))
    for k, (label, c) in enumerate(curves.items()):
        col = _COLOURS[k % len(_COLOURS)]
        pts = [to_xy(float(x), float(y)) for x, y in zip(c["px"], c["recall"])]
        if len(pts) > 1:
            dr.line(pts, fill=col, width=2)
        ly = top + 8 + 14 * k
        dr.line([left + pw - 150, ly + 6, left + pw - 130, ly + 6], fill=col, width=3)
        dr.text((left + pw - 125, ly), label[:22], fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
