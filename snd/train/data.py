"""Batches for the distillation loop: the shard stream in a DataLoader, device transfer, view selection.

Exact resume: the data position is the number of stream items each rank has consumed (the stream's
*local* position `start`, the same on every rank); a resumed run opens the stream there and sees the same
next batches. Each rank streams a disjoint part (the stream splits by rank, then by DataLoader worker in
blocks of the batch size, so the loader's output order does not depend on the number of workers). The DataLoader gets its own torch.Generator so that
creating its iterator never draws from the global RNG (which drives LoRA dropout and must resume exactly).
"""
from __future__ import annotations

import functools
import logging
from typing import Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from snd.cache.packed import unpack
from snd.errors import SndError
from snd.pipeline.config import DistillConfig

__all__ = ["StreamFactory", "BatchIterator", "shard_stream_factory", "operator_decision", "use_stored_operators", "store_operators_fit", "resolve_num_workers",
           "to_device", "select_views", "TENSOR_KEYS"]

log = logging.getLogger(__name__)

# (start = local position, rank, world_size) -> IterableDataset of stream items (split as ShardStream)
StreamFactory = Callable[[int, int, int], IterableDataset]

TENSOR_KEYS = ("ctx_images", "tgt_image", "means", "quats", "scales", "opacities", "ctx_masks", "tgt_mask",
               "ctx_K", "ctx_c2w", "tgt_K", "tgt_c2w", "index")  # + "op_*" (schema v2 operators) when in use


def operator_decision(cfg: DistillConfig, header: dict, patch: int | None = None) -> tuple[bool, str]:
    """(use the store's operators?, why) for this run (`--targets`, see DistillConfig).

    The stored operators bake in the patch grids, the upsampling mode, blending and the targets protocol
    (a store written before the protocol was recorded holds the "snd" rules); they serve a run only when
    those equal the run's own, and never ablation E (targets in the context views). `--targets operator`
    with a mismatch is an error; `auto` falls back to rendering and says why."""
    from snd.cache.schema import OperatorSpec

    if cfg.targets == "render":
        return False, "--targets render"
    patch = patch or _patch_of(cfg)
    raw = header.get("operator")
    spec = OperatorSpec.from_dict(raw) if raw else None
    op = dict(spec.to_dict(), patch=spec.patch) if spec else None
    grid = [cfg.img_height // patch, cfg.img_width // patch]
    want = {"patch": patch, "ctx_hw": grid, "out_hw": grid, "upsample": cfg.upsample, "blend": cfg.blend,
            "protocol": cfg.targets_protocol}
    have = {k: op.get(k) for k in want} if op else None
    ok = have == want and not cfg.render_to_context
    if ok:
        return True, f"the store's operators match this run ({cfg.targets_protocol} protocol)"
    if not op:
        why = "the store has no operators"
    elif cfg.render_to_context:
        why = "--render-to-context needs rendering"
    else:
        diff = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
        why = "store vs run: " + ", ".join(f"{k} {a!r} vs {b!r}" for k, (a, b) in diff.items())
        if "protocol" in diff and raw and "protocol" not in raw:
            why += " (the store predates the protocol field: built with the earlier 'snd' rules)"
        why += f"; a store for this run: `snd precompute {_precompute_flags(cfg, patch)}`"
    if cfg.targets == "operator":
        raise SndError(f"--targets operator: the store's operators do not fit this run ({why})", path=cfg.shards,
                       hint="use --targets render (or auto), or rebuild the store with the `snd precompute` flags above")
    return False, why


def _patch_of(cfg: DistillConfig) -> int:
    from snd.models.backbone import spec_of

    return spec_of(cfg.model).patch


def _precompute_flags(cfg: DistillConfig, patch: int) -> str:
    """The `snd precompute` flags whose operators fit this run (the fix named when a store's do not)."""
    flags = [f"--patch-size {patch}", f"--operator-img-height {cfg.img_height}", f"--operator-img-width {cfg.img_width}",
             f"--operator-upsample {cfg.upsample}", "--operator-blend" if cfg.blend else "--no-operator-blend",
             f"--targets-protocol {cfg.targets_protocol}"]
    return " ".join(flags)


def use_stored_operators(cfg: DistillConfig, header: dict, patch: int | None = None) -> bool:
    """Whether this run builds its targets from the store's operators (see `operator_decision`)."""
    return operator_decision(cfg, header, patch)[0]


def _decode_on_device(cfg: DistillConfig, header: dict) -> bool:
    """Stored frames decoded on the GPU (`--image-decode`): JPEG (nvjpeg) or lossless with the ``grad`` filter
    (two cumulative sums); needs CUDA and frames at the run's size."""
    img = header.get("images")
    device_codec = img is not None and (img["codec"] == "jpeg" or img.get("filter") == "grad")
    fits = cfg.data is None and device_codec and [img["height"], img["width"]] == [cfg.img_height, cfg.img_width]
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if cfg.image_decode == "device" and not (fits and cuda):
        raise SndError("--image-decode device needs CUDA and a store with JPEG or v5 lossless frames at the run's "
                       "--img-height/--img-width", path=cfg.shards, hint="use --image-decode auto or cpu")
    return cfg.image_decode != "cpu" and fits and cuda


def shard_stream_factory(cfg: DistillConfig) -> StreamFactory:
    """Streams from the Zarr store `cfg.shards` (`snd.cache.stream.ShardStream`); with stored operators in
    use the stream skips decoding the Gaussians (the operator replaces them). Images come from the store's
    frames unless the store has none or `--data` is given (then from the dataset)."""
    from snd.cache.manifest import read_header

    header = read_header(cfg.shards)
    use_op = use_stored_operators(cfg, header)
    decode = "device" if _decode_on_device(cfg, header) else "cpu"
    img = header.get("images")
    if img is None and cfg.data is None:
        log.warning("note: store %s has no frames (built by an older snd or with --images off); images are read "
                    "from the dataset at %s", cfg.shards, header.get("data_root"))
    elif cfg.data is None and [img["height"], img["width"]] != [cfg.img_height, cfg.img_width]:
        log.warning("note: store %s holds frames at %dx%d, resized again to this run's %dx%d (a second resampling "
                    "the official inputs do not have); pass --data to read the dataset, or build a store for this run "
                    "(`snd precompute %s`)", cfg.shards, img["height"], img["width"], cfg.img_height, cfg.img_width,
                    _precompute_flags(cfg, _patch_of(cfg)))

    def make(start: int, rank: int, world_size: int) -> IterableDataset:
        from snd.cache.stream import ShardStream

        return ShardStream(cfg.shards, data_root=cfg.data, img_hw=(cfg.img_height, cfg.img_width), seed=cfg.seed,
                           rank=rank, world_size=world_size, start=start, batch_size=cfg.batch,
                           gaussians=not use_op, operator=use_op, decode=decode)
    return make


AUTO_WORKERS_CAP = {"operator": 12, "render": 8}  # per rank: the fast path's ~100 steps/s needs ~12 on 16 cores


def store_operators_fit(cfg: DistillConfig) -> bool:
    """Whether `cfg.shards` holds operators this run uses (False for a store that cannot be read)."""
    from snd.cache.manifest import read_header

    try:
        return use_stored_operators(cfg, read_header(cfg.shards))
    except SndError:
        return False


def resolve_num_workers(value: int | str, *, device: torch.device, operators: bool | Callable[[], bool],
                        world_size: int = 1, cpus: int | None = None) -> int:
    """`--num-workers`: an integer as given, or "auto": the CPU cores of this rank (affinity / world size)
    minus two (the main thread and the pin-memory thread), capped per step path (`AUTO_WORKERS_CAP`: the
    operator/fast path reads few bytes per sample but runs ~100 steps/s; the render path decodes Gaussians
    but steps ~10x slower); on a CPU device at most 2 (the step itself needs the cores). `operators` may be
    a callable, asked only for "auto"."""
    from snd.pipeline.device import cpu_cores, fixed_workers

    n = fixed_workers(value)
    if n is not None:
        return n
    if cpus is None:
        cpus = cpu_cores()
    per_rank = max(cpus // max(world_size, 1), 1)
    if device.type != "cuda":
        return max(min(2, per_rank - 1), 0)
    ops = operators() if callable(operators) else operators
    return max(min(per_rank - 2, AUTO_WORKERS_CAP["operator" if ops else "render"]), 1)


class BatchIterator:
    """Endless batches from a stream factory; tracks the global data position for checkpoints.

    When one pass of the stream ends, the stream is reopened at the current global position (a stream
    that orders several epochs by position continues; one that yields nothing there is an error)."""

    def __init__(self, factory: StreamFactory, *, batch: int, start: int, rank: int, world_size: int,
                 num_workers: int, prefetch: int, pin_memory: bool, seed: int, pack: bool = True):
        self.factory, self.batch, self.rank, self.world_size = factory, batch, rank, world_size
        self.pack = pack  # workers send each batch as one block (`snd.cache.packed`); False: as torch does
        self.num_workers, self.prefetch, self.pin_memory, self.seed = num_workers, prefetch, pin_memory, seed
        self.position = start  # items consumed by this rank (= by every rank)
        self._it: Iterator | None = None

    def _open(self) -> Iterator:
        gen = torch.Generator().manual_seed(self.seed)
        from snd.cache.stream import JPEG_KEYS, collate

        kw = dict(num_workers=self.num_workers, pin_memory=self.pin_memory, generator=gen, collate_fn=collate)
        if self.num_workers > 0:
            from snd.cache.packed import packed_collate
            from snd.train.interrupt import ignore_sigint

            kw.update(prefetch_factor=self.prefetch, persistent_workers=False, worker_init_fn=ignore_sigint)
            if self.pack:  # a worker's batch travels as one shared-memory block (`snd.cache.packed`: receiving
                # ~16 separate tensors cost the training process 5-6 ms of CPU per item, the loader's ceiling)
                kw["collate_fn"] = functools.partial(packed_collate, collate=collate, listed=JPEG_KEYS)
        loader = DataLoader(self.factory(self.position, self.rank, self.world_size), batch_size=self.batch,
                            drop_last=True, **kw)
        return iter(loader)

    def __next__(self) -> dict:
        if self._it is None:
            self._it = self._open()
        try:
            out = next(self._it)
        except StopIteration:
            self._it = self._open()
            try:
                out = next(self._it)
            except StopIteration:
                raise SndError(f"the stream yielded no items at position {self.position} (rank {self.rank})",
                               hint="is the store empty, or smaller than world_size x batch items?") from None
        self.position += self.batch
        return unpack(out)

    def __iter__(self) -> "BatchIterator":
        return self


IMAGE_KEYS = ("ctx_images", "tgt_image")


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors to `device` (non-blocking from pinned memory); uint8 images (the shard stream's) become
    float in [0, 1] there; JPEG bytes (``ctx_jpeg``/``tgt_jpeg``) are decoded there, the whole batch in one
    call (`snd.cache.frames.decode_jpeg_batch`), and so are lossless residual planes (``ctx_grad``/``tgt_grad``,
    `snd.cache.frames.undo_grad`); other values as they are."""
    out = {}
    if "ctx_grad" in batch:  # lossless frames' residual planes: undone here, the whole batch at once
        from snd.cache.frames import undo_grad

        out["ctx_images"] = undo_grad(batch["ctx_grad"].to(device, non_blocking=True)).float().div_(255.0)
        out["tgt_image"] = undo_grad(batch["tgt_grad"].to(device, non_blocking=True)).float().div_(255.0)
        batch = {k: v for k, v in batch.items() if k not in ("ctx_grad", "tgt_grad")}
    if "ctx_jpeg" in batch:
        from snd.cache.frames import decode_jpeg_batch

        ctx, tgt = batch["ctx_jpeg"], batch["tgt_jpeg"]
        B = len(tgt)
        imgs = decode_jpeg_batch([t for pair in ctx for t in pair] + list(tgt), device)  # [3B,3,H,W] uint8
        out["ctx_images"] = imgs[:2 * B].reshape(B, 2, *imgs.shape[1:]).float().div_(255.0)
        out["tgt_image"] = imgs[2 * B:].float().div_(255.0)
        batch = {k: v for k, v in batch.items() if k not in ("ctx_jpeg", "tgt_jpeg")}
    for k, v in batch.items():
        if isinstance(v, Tensor):
            v = v.to(device, non_blocking=True)
            if k in IMAGE_KEYS and v.dtype == torch.uint8:
                v = v.float().div_(255.0)
        out[k] = v
    return out


def select_views(batch: dict, *, render_to_context: bool) -> dict:
    """Ablation E: make context view j = index % 2 the target (image, mask, camera); otherwise unchanged."""
    if not render_to_context:
        return batch
    out = dict(batch)
    j = (batch["index"] % 2).long()  # [B]
    ar = torch.arange(j.shape[0], device=j.device)
    out["tgt_image"] = batch["ctx_images"][ar, j]
    out["tgt_mask"] = batch["ctx_masks"][ar, j]
    out["tgt_K"] = batch["ctx_K"][ar, j]
    out["tgt_c2w"] = batch["ctx_c2w"][ar, j]
    return out


class DevicePrefetcher:
    """Moves the next batch to the GPU on a side stream while the current step computes.

    Returns (stream indices of the batch as a list, batch on device). On CPU it just passes batches on.
    The data position is not tracked here: the loop counts trained batches, so the one batch fetched
    ahead is never counted (exact resume is unaffected)."""

    def __init__(self, it: Iterator[dict], device: torch.device):
        self.it, self.device = it, device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._next: tuple[list[int], dict] | None = None

    def _load(self) -> tuple[list[int], dict]:
        cpu = next(self.it)
        idx = [int(i) for i in cpu["index"].reshape(-1).tolist()]  # CPU tensor: no sync
        if self.stream is None:
            return idx, cpu
        with torch.cuda.stream(self.stream):
            return idx, to_device(cpu, self.device)

    def __next__(self) -> tuple[list[int], dict]:
        if self.stream is None:
            return self._load()
        if self._next is None:
            self._next = self._load()
        idx, batch = self._next
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        for v in batch.values():
            if isinstance(v, Tensor) and v.device.type == "cuda":
                v.record_stream(current)
        self._next = self._load()
        return idx, batch

    def __iter__(self) -> "DevicePrefetcher":
        return self
