"""In-memory stream items with exact geometry, for tests and `snd bench distill`.

Why: the distillation loop, its resume and its multi-process split should be testable (and timeable)
without a scaffold store. Each item is a textured, labelled plane seen by two context cameras and a
target camera between them; the scaffold is `gaussians_from_depth` of the exact depth, so items have the
stream contract's keys, shapes and dtypes (see `snd.cache.stream.ShardStream`).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

__all__ = ["PoisonedStream", "SyntheticStream", "synthetic_sample"]


def _camera(tx: float, H: int, W: int) -> tuple[Tensor, Tensor]:
    f = 0.8 * W
    K = torch.tensor([[f, 0.0, (W - 1) / 2], [0.0, f, (H - 1) / 2], [0.0, 0.0, 1.0]])
    c2w = torch.eye(4)
    c2w[0, 3] = tx
    return K, c2w


def _scale_K(K: Tensor, sy: float, sx: float) -> Tensor:
    """Intrinsics for an image resized by (sy, sx), pixel centres at integers."""
    K = K.clone()
    K[0, 0] *= sx
    K[1, 1] *= sy
    K[0, 2] = (K[0, 2] + 0.5) * sx - 0.5
    K[1, 2] = (K[1, 2] + 0.5) * sy - 0.5
    return K


def _world_xy(K: Tensor, tx: float, depth: float, H: int, W: int) -> tuple[Tensor, Tensor]:
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    X = (u - K[0, 2]) / K[0, 0] * depth + tx
    Y = (v - K[1, 2]) / K[1, 1] * depth
    return X, Y


def _labels(X: Tensor, Y: Tensor) -> Tensor:
    return (torch.floor((X + 4.0) / 0.6) + 20 * (Y > 0.3).to(X.dtype) + 1).to(torch.int64)


def _texture(X: Tensor, Y: Tensor, phase: float) -> Tensor:
    lab = _labels(X, Y).float()
    r = 0.5 + 0.4 * torch.sin(3.0 * X + phase) * torch.cos(2.0 * Y)
    g = 0.5 + 0.4 * torch.sin(0.7 * lab + phase)
    b = 0.5 + 0.4 * torch.cos(5.0 * Y - X)
    return torch.stack([r, g, b]).clamp(0, 1)  # [3, H, W]


def synthetic_sample(index: int, *, img_hw: tuple[int, int], scaffold_hw: tuple[int, int], seed: int = 0) -> dict:
    """One stream item (contract of `ShardStream`) for a labelled textured plane; deterministic in (index, seed)."""
    from snd.splat.from_depth import gaussians_from_depth

    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    Hi, Wi = img_hw
    H, W = scaffold_hw
    depth = 2.5 + float(torch.rand((), generator=g))
    baseline = 0.15 + 0.1 * float(torch.rand((), generator=g))
    t = float(torch.rand((), generator=g))
    phase = 2 * math.pi * float(torch.rand((), generator=g))
    txs = [-baseline, baseline, -baseline + 2 * baseline * t]
    Ks, c2ws, masks, images = [], [], [], []
    for tx in txs:
        K, c2w = _camera(tx, H, W)
        X, Y = _world_xy(K, tx, depth, H, W)
        Ki = _scale_K(K, Hi / H, Wi / W)
        Xi, Yi = _world_xy(Ki, tx, depth, Hi, Wi)
        Ks.append(K)
        c2ws.append(c2w)
        masks.append(_labels(X, Y))
        images.append(_texture(Xi, Yi, phase))
    ctx_K, ctx_c2w = torch.stack(Ks[:2]), torch.stack(c2ws[:2])
    gs = gaussians_from_depth(torch.full((2, H, W), depth), ctx_K, ctx_c2w, scale_mult=1.0, opacity=0.9)
    return {
        "ctx_images": torch.stack(images[:2]), "tgt_image": images[2],
        "means": gs.means, "quats": gs.quats, "scales": gs.scales, "opacities": gs.opacities,
        "ctx_masks": torch.stack(masks[:2]), "tgt_mask": masks[2],
        "ctx_K": ctx_K, "ctx_c2w": ctx_c2w, "tgt_K": Ks[2], "tgt_c2w": c2ws[2],
        "index": torch.tensor(index, dtype=torch.int64),
        "scene": f"synthetic_{index % 7:02d}", "ctx_frames": (0, 10), "tgt_frame": 5,
    }


class SyntheticStream(IterableDataset):
    """An endless stream split exactly like `snd.cache.stream.ShardStream`: rank r of R owns the global
    positions g = j * R + r (j = local position, from `start`); local positions are cut into blocks of
    `batch_size` that go to DataLoader workers round-robin. Item g shows scene g % `distinct` (None: every
    item differs) and carries `index` = g. With `operator_grid` (the backbone's patch grid) each item also
    carries its target's transfer operator, as a store built with operators does (the fast path's input)."""

    def __init__(self, *, img_hw: tuple[int, int], scaffold_hw: tuple[int, int], seed: int = 0, rank: int = 0,
                 world_size: int = 1, start: int = 0, batch_size: int = 1, distinct: int | None = None,
                 operator_grid: tuple[int, int] | None = None):
        super().__init__()
        self.img_hw, self.scaffold_hw, self.seed = tuple(img_hw), tuple(scaffold_hw), seed
        self.rank, self.world_size, self.start, self.distinct = rank, world_size, start, distinct
        self.batch_size, self.operator_grid = batch_size, operator_grid

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        block = wid
        while True:
            first = self.start + block * self.batch_size
            for j in range(first, first + self.batch_size):
                g = j * self.world_size + self.rank
                scene = g if self.distinct is None else g % self.distinct
                item = synthetic_sample(scene, img_hw=self.img_hw, scaffold_hw=self.scaffold_hw, seed=self.seed)
                if self.operator_grid is not None:
                    item = with_operator(item, self.operator_grid)
                item["index"] = torch.tensor(g, dtype=torch.int64)
                yield item
            block += nw


def spawn_worker(rank: int, world_size: int, cfg, port: int, out_dir: str, distinct: int | None = None,
                 operator_grid: tuple[int, int] | None = None, nan_at: int | None = None) -> None:
    """Entry of one process of a multi-process CPU run on synthetic items (tests; gloo backend).

    nan_at: the stream position whose target image is all NaN (a step every rank must skip).
    Writes `<out_dir>/rank<r>.json` with the summary's seen indices, losses and parameter digest."""
    import json
    import os

    from snd.train.distributed import DistEnv
    from snd.train.loop import train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)

    def factory(start: int, r: int, ws: int):
        s = SyntheticStream(img_hw=(cfg.img_height, cfg.img_width), scaffold_hw=(cfg.img_height // 4, cfg.img_width // 4),
                            seed=cfg.seed, rank=r, world_size=ws, start=start, batch_size=cfg.batch, distinct=distinct,
                            operator_grid=operator_grid)
        return s if nan_at is None else PoisonedStream(s, nan_at)

    s = train(cfg, stream_factory=factory, progress=False, env=DistEnv(rank, world_size, 0))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"seen": s.seen_indices, "losses": s.losses, "digest": s.param_digest, "step": s.step,
                   "skipped": s.skipped}, f)


class PoisonedStream(torch.utils.data.IterableDataset):
    """A stream whose item at stream position `nan_at` has an all-NaN target image."""

    def __init__(self, inner, nan_at: int):
        self.inner, self.nan_at = inner, nan_at

    def __iter__(self):
        for item in self.inner:
            if int(item["index"]) == self.nan_at:
                item["tgt_image"] = torch.full_like(item["tgt_image"], float("nan"))
            yield item


def with_operator(item: dict, grid: tuple[int, int], *, device: torch.device | str = "cpu", **knobs) -> dict:
    """`item` plus its target's transfer operator as the stream carries it (``op_*`` keys, stored dtypes),
    built on `device` from the item's own scaffold (the fast path's input; `snd bench distill`)."""
    from snd.cache.opcodec import encode_operators
    from snd.cache.schema import OperatorSpec
    from snd.splat.gaussians import PixelGaussians
    from snd.splat.operator import build_operator
    from snd.train.distiller import rigid_inverse

    spec = OperatorSpec(ctx_hw=grid, out_hw=grid, **knobs)
    dev = torch.device(device)
    g = PixelGaussians(item["means"], item["quats"], item["scales"], item["opacities"]).to(device=dev)
    op = build_operator(g, item["ctx_masks"].to(dev), item["tgt_mask"].to(dev), item["tgt_K"].to(dev),
                        rigid_inverse(item["tgt_c2w"].to(dev)), spec.ctx_hw, spec.out_hw, upsample=spec.upsample,
                        blend=spec.blend, protocol=spec.protocol, row_cap=spec.row_cap, inst_cap=spec.inst_cap)
    arrays = encode_operators([[op]], spec)
    return {**item, **{k: torch.from_numpy(v[0, 0]) for k, v in arrays.items()}}
