"""NYU "trainval" of GeoNet, as Probe3D reads it: the normals probe's training set under the paper protocol.

Layout (Probe3D's data_processing/README.md: GeoNet's data1.zip + data2.zip, https://github.com/xjqi/GeoNet,
unzipped and merged into one folder): `<data_root>/nyuv2_geonet/*.mat` (Probe3D's config path;
`<data_root>/nyu_geonet/` as in its README works too), ~30k MATLAB files, each holding

    img    [H, W, 3] float: the colour frame minus twice the per-channel mean (122.175, 116.169, 103.508)
    depth  [H, W]    metres
    norm   [H, W, 3] surface normals

Probe3D (`evals/datasets/nyu.py`, `NYU_geonet`) lists the folder, sorts the names, deletes the entries at
positions 21181 and then 6919 of the sorted list (two bad frames; snd does this only when the folder is
that large, so a small procedural stand-in in the same layout keeps all its files), and split "trainval"
is every remaining file, in that order (`train_snorm.py` builds its loader without shuffling). Per file:
rows/columns [:480, :640]; image = img + 2·mean cast to uint8; depth above 10 m set to 0; the centre
480x480 square (`center_crop=True`: columns 80:560); then, with `augment` (Probe3D's `augment_train`):
ColorJitter(0.2, 0.2, 0.2, 0.2) with probability 0.8 on the image, and one RandomResizedCrop (scale 0.5-1,
ratio 1, nearest, probability 0.5) shared by image, depth and normals, no flip or rotation.

Sample (what the probes read): image [3, S, S] in [0, 1] (the 480x480 crop centre-padded to a multiple of the
backbone's `patch` with the ImageNet mean, as Probe3D's model pads the normalised image with 0: S = 490 for
patch 14, 480 for 16) and normals
[3, 480, 480], NaN where depth is 0 (Probe3D's loss mask is depth > 0, so a zero normal at a valid pixel is
trained on, as an error of 90 degrees). The augmentation draws from torch's global generator (seeded per
DataLoader worker): fresh draws every epoch, as Probe3D's.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from snd.errors import SndError
from snd.eval.datasets.matfile import load_mat

FOLDERS = ("nyuv2_geonet", "nyu_geonet")
URL = ("GeoNet's NYU data1.zip + data2.zip (https://github.com/xjqi/GeoNet), unzipped into one folder "
       "(github.com/mbanani/probe3d data_processing/README.md)")
GEONET_MEAN = np.array([122.175, 116.169, 103.508], dtype=np.float64)
BAD_POSITIONS = (21181, 6919)  # deleted from the sorted listing in this order (Probe3D)
MAX_DEPTH = 10.0
CROP = 480  # rows kept and the side of the centre square


def find_geonet(data_root: str | Path) -> Optional[Path]:
    """The GeoNet folder under `data_root` (or `data_root` itself when it holds the .mat files)."""
    root = Path(data_root)
    for cand in [root / f for f in FOLDERS] + [root / "nyuv2" / f for f in FOLDERS] + [root]:
        if cand.is_dir() and any(cand.glob("*.mat")) and not (cand / "nyu_depth_v2_labeled.mat").exists():
            return cand
    return None


def geonet_files(path: Path) -> list[str]:
    """Probe3D's "trainval" list: sorted .mat names, the two bad positions removed (when present)."""
    names = sorted(n for n in os.listdir(path) if n.endswith(".mat"))
    if len(names) > max(BAD_POSITIONS):
        for i in BAD_POSITIONS:
            del names[i]
    return names


def random_resized_square(h: int, w: int, gen: Optional[torch.Generator] = None) -> tuple[int, int, int]:
    """(top, left, side) of albumentations' RandomResizedCrop with scale (0.5, 1) and ratio (1, 1): the area
    fraction is uniform in [0.5, 1], the side round(sqrt(area)); it always fits a square image."""
    area = h * w * float(torch.empty(()).uniform_(0.5, 1.0, generator=gen))
    side = min(int(round(math.sqrt(area))), h, w)
    top = int(torch.randint(0, h - side + 1, (), generator=gen))
    left = int(torch.randint(0, w - side + 1, (), generator=gen))
    return top, left, side


class GeoNetNYU(torch.utils.data.Dataset):
    """NYU "trainval" of GeoNet (see the module docstring)."""

    name = "nyu_geonet"
    file_order = True  # Probe3D's "trainval" loader does not shuffle: `snd eval` keeps the file order
    device_keys = ("aug", "depth")  # what `worker_item` adds for `device_augment` (`ProbeData` passes it on)
    zero_normal_is_error = True  # validity = depth > 0, as Probe3D's loss mask

    def __init__(self, path: str | Path, *, augment: bool = True, patch: int = 14):
        self.path = Path(path)
        if not self.path.is_dir():
            raise SndError(f"NYU GeoNet training set missing: {self.path}", path=self.path, hint=f"download {URL}")
        self.files = geonet_files(self.path)
        if not self.files:
            raise SndError(f"no .mat files in {self.path}", path=self.path, hint=f"download {URL}")
        self.augment, self.patch = augment, patch
        self.self_augmenting = augment  # fresh draws per item: `snd eval` runs the backbone live on it
        from snd.eval.protocol import padded_hw

        _, depth, _ = self.load(0)  # the input size: the centre square padded to the patch (490 / 480 for patch 14 / 16)
        self.img_hw = padded_hw(depth.shape, patch)

    def __len__(self) -> int:
        return len(self.files)

    def unaugmented(self) -> "GeoNetNYU":
        """The same files without the augmentation, in the same order (what the trivial baseline is fit on:
        the training targets themselves, deterministic, not one epoch's random crops)."""
        return self if not self.augment else GeoNetNYU(self.path, augment=False, patch=self.patch)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image uint8 [480, 480, 3], depth [480, 480], normals [480, 480, 3]) before augmentation."""
        f = self.path / self.files[index]
        m = load_mat(f, ["img", "depth", "norm"])
        missing = [k for k in ("img", "depth", "norm") if k not in m]
        if missing:
            raise SndError(f"{f}: no variable(s) {missing} (expected GeoNet's img, depth, norm)", path=f)
        img, depth, norm = m["img"][:CROP, :640], m["depth"][:CROP, :640], m["norm"][:CROP, :640]
        if img.ndim != 3 or norm.ndim != 3 or img.shape[:2] != depth.shape or norm.shape[:2] != depth.shape:
            raise SndError(f"{f}: img {img.shape}, depth {depth.shape}, norm {norm.shape} do not match", path=f)
        image = np.clip(img.astype(np.float64) + 2 * GEONET_MEAN, 0, 255).astype(np.uint8)
        depth = np.where(depth > MAX_DEPTH, 0.0, depth).astype(np.float32)
        H, W = depth.shape
        c0 = (W - H) // 2 if W > H else 0
        s = min(H, W)
        return image[:s, c0 : c0 + s], depth[:s, c0 : c0 + s], norm[:s, c0 : c0 + s].astype(np.float32)

    def worker_item(self, index: int) -> dict:
        """The per-item CPU part: the 480x480 frame (image uint8 [3, S, S], depth [S, S], normals [3, S, S]) and,
        with `augment`, the draws of `augment_geonet` in its order (the jitter coin, ColorJitter's own
        `get_params`: order and four factors, the crop coin, `random_resized_square`) as `aug` float64
        [jitter?, order x4, brightness, contrast, saturation, hue, top, left, side] (no crop: the whole square)."""
        image, depth, norm = self.load(index)
        S = depth.shape[-1]
        aug = [0.0] * 9 + [0.0, 0.0, float(S)]
        if self.augment:
            from torchvision.transforms import ColorJitter

            if float(torch.rand(())) < 0.8:
                cj = ColorJitter(0.2, 0.2, 0.2, 0.2)
                order, b, c, s, h = cj.get_params(cj.brightness, cj.contrast, cj.saturation, cj.hue)
                aug[:9] = [1.0, *order.tolist(), b, c, s, h]
            if float(torch.rand(())) < 0.5:
                t, l, side = random_resized_square(*depth.shape)
                aug[9:] = [float(t), float(l), float(side)]
        return {"image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous(),
                "depth": torch.from_numpy(np.ascontiguousarray(depth)),
                "normals": torch.from_numpy(np.ascontiguousarray(norm)).permute(2, 0, 1).contiguous(),
                "aug": torch.tensor(aug, dtype=torch.float64),
                "meta": {"dataset": self.name, "split": "train", "index": int(index), "id": self.files[index]}}

    def device_augment(self, batch: dict) -> dict:
        """The rest on a collated batch of `worker_item`s, on the batch's device: ColorJitter in each item's order
        (`jitter_batch`), the shared square crop resized back with nearest (one index gather), NaN normals where
        depth is 0, the centre padding to the patch. Returns `image`, `normals` (and the batch's other keys less
        `aug`, `depth`): per item `dataset[i]`'s numbers."""
        from snd.eval.protocol import IMAGENET_MEAN, center_pad

        p, d = batch["aug"], batch["depth"].float()
        img = jitter_batch(batch["image"].float() / 255, p[:, :9])
        B, S, dev = img.shape[0], d.shape[-1], img.device
        # F.interpolate's nearest on a side x side crop: source floor(dst * (side / S in float32)), at most side - 1
        side = p[:, 11].float()
        idx = torch.minimum(torch.floor(torch.arange(S, device=dev, dtype=torch.float32)[None] * (side / S)[:, None]),
                            side[:, None] - 1).long()
        rows, cols = (p[:, 9].long()[:, None] + idx)[:, :, None], (p[:, 10].long()[:, None] + idx)[:, None, :]
        bi = torch.arange(B, device=dev)[:, None, None]
        img, d = img[bi, :, rows, cols].permute(0, 3, 1, 2), d[bi, rows, cols]
        n = batch["normals"].float()[bi, :, rows, cols].permute(0, 3, 1, 2)
        n = torch.where((d > 0)[:, None], n, torch.full_like(n, float("nan")))
        out = {k: v for k, v in batch.items() if k not in self.device_keys}
        out.update(image=center_pad(img, self.patch, torch.tensor(IMAGENET_MEAN)).contiguous(), normals=n.contiguous())
        return out

    def __getitem__(self, index: int) -> dict:
        from snd.eval.augment import augment_one

        return augment_one(self, index, ("image", "normals"))


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """torchvision's `_hsv2rgb` on [..., 3, H, W] with its sector picked by a gather: its one-hot einsum is a
    matmul, which a GPU with TF32 enabled (snd's extraction default) would round to 10 mantissa bits."""
    h, s, v = hsv.unbind(dim=-3)
    i = torch.floor(h * 6.0)
    f = (h * 6.0) - i
    p = torch.clamp((v * (1.0 - s)), 0.0, 1.0)
    q = torch.clamp((v * (1.0 - s * f)), 0.0, 1.0)
    t = torch.clamp((v * (1.0 - s * (1.0 - f))), 0.0, 1.0)
    table = torch.stack([torch.stack(c, dim=-3) for c in ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))],
                        dim=-4)  # [..., 3, 6, H, W]
    sector = (i.to(torch.int32) % 6).long()[..., None, None, :, :]
    return table.gather(-3, sector.expand(*table.shape[:-3], 1, *table.shape[-2:])).squeeze(-3)


def jitter_batch(img: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """torchvision's ColorJitter on every item of img [B, 3, H, W] in [0, 1] whose p [B, 9] row says so
    ([jitter?, order x4, brightness, contrast, saturation, hue], `GeoNetNYU.worker_item`): at each of the four
    positions each adjustment is applied to the items whose order puts it there (`where_items`), with
    torchvision's own formulas (`_blend`: ratio·a + (1 − ratio)·b, clipped; the hue through its HSV formulas)."""
    from torchvision.transforms._functional_tensor import _rgb2hsv, rgb_to_grayscale

    from snd.eval.augment import where_items

    on = p[:, 0] > 0

    def blend(a: torch.Tensor, b: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
        n = ratio.shape[0]
        r, q = ratio.float().view(n, 1, 1, 1), (1.0 - ratio).float().view(n, 1, 1, 1)  # 1 - ratio in float64 first
        return (r * a + q * b).clamp(0, 1)

    def adjust(x: torch.Tensor, k: int, sel) -> torch.Tensor:
        x, q = x[sel], p[sel]
        if k == 0:
            return blend(x, torch.zeros_like(x), q[:, 5])
        if k == 1:
            return blend(x, torch.mean(rgb_to_grayscale(x), dim=(-3, -2, -1), keepdim=True), q[:, 6])
        if k == 2:
            return blend(x, rgb_to_grayscale(x), q[:, 7])
        h, s, v = _rgb2hsv(x).unbind(dim=-3)
        return _hsv_to_rgb(torch.stack(((h + q[:, 8].float().view(-1, 1, 1)) % 1.0, s, v), dim=-3))

    for pos in range(4):
        for k in range(4):
            img = where_items(on & (p[:, 1 + pos] == k), img, lambda sel: adjust(img, k, sel))
    return img


def augment_geonet(img: torch.Tensor, depth: torch.Tensor, normals: torch.Tensor,
                   gen: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Probe3D's NYU training augmentation: ColorJitter(0.2, 0.2, 0.2, 0.2) with p 0.8 on the image
    (torchvision's own), then with p 0.5 one random square crop resized back with nearest, shared by all three.

    Args:
        img: [3, S, S] in [0, 1]; depth: [S, S]; normals: [3, S, S].
    """
    from torchvision.transforms import ColorJitter

    if float(torch.rand((), generator=gen)) < 0.8:
        img = ColorJitter(0.2, 0.2, 0.2, 0.2)(img)
    if float(torch.rand((), generator=gen)) < 0.5:
        S = depth.shape[-1]
        t, l, side = random_resized_square(*depth.shape, gen)

        def crop(x: torch.Tensor) -> torch.Tensor:
            x = x[..., t : t + side, l : l + side]
            y = x[None] if x.ndim == 3 else x[None, None]
            y = torch.nn.functional.interpolate(y.float(), size=(S, S), mode="nearest")
            return y[0] if x.ndim == 3 else y[0, 0]

        img, depth, normals = crop(img), crop(depth), crop(normals)
    return img, depth, normals


def write_geonet_standin(folder: str | Path, n: int = 4, *, hw: tuple[int, int] = (480, 640), seed: int = 0) -> Path:
    """A procedural stand-in for GeoNet's NYU set in exactly its layout: `n` .mat files (`img` = colour minus
    twice the mean, `depth` metres, `norm` unit normals) of a camera facing a tilted plane with a box in front;
    a band of zero depth and a patch of zero normals at valid depth exercise both validity rules."""
    from snd.eval.datasets.matfile import save_mat_v5

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    H, W = hw
    f = 0.9 * W
    v, u = np.meshgrid(np.arange(H) - (H - 1) / 2, np.arange(W) - (W - 1) / 2, indexing="ij")
    rays = np.stack([u / f, v / f, np.ones_like(u)], -1)  # camera frame, z forward
    for i in range(n):
        nrm = np.array([rng.uniform(-0.4, 0.4), rng.uniform(-0.4, 0.4), -1.0])
        nrm /= np.linalg.norm(nrm)
        dist = rng.uniform(2.0, 6.0)  # plane n.x + dist = 0 facing the camera
        depth = -dist / (rays @ nrm)
        norm = np.broadcast_to(nrm, (H, W, 3)).copy()
        r0, c0 = rng.integers(H // 4, H // 2), rng.integers(W // 4, W // 2)
        box = (slice(r0, r0 + H // 4), slice(c0, c0 + W // 4))
        depth[box] = depth[box].min() * 0.6
        norm[box] = [0.0, 0.0, -1.0]
        depth[: H // 16] = 0.0  # no depth: invalid
        norm[H - H // 16 :, : W // 8] = 0.0  # zero normals where depth is valid
        colour = 60 + 150 * (0.5 + 0.5 * norm) + rng.normal(0, 4, (H, W, 3))
        img = colour - 2 * GEONET_MEAN
        save_mat_v5(folder / f"{i:06d}_standin_{i:04d}-{i:06d}.mat",
                    {"img": img.astype(np.float32), "depth": depth.astype(np.float32), "norm": norm.astype(np.float32)})
    return folder
