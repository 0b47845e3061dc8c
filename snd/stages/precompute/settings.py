"""Stage one's settings derived from its config: this worker's rank, the operator spec, the store header,
the scaffold source."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snd.cache.schema import Encoding, FrameSpec, OperatorSpec
from snd.errors import SndError
from snd.pipeline.config import BenchPrecomputeConfig, PrecomputeConfig, to_jsonable
from snd.scaffold import ScaffoldSource, create_source

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch


def resolve_rank(cfg_rank: int, cfg_world: int) -> tuple[int, int]:
    """--rank/--world-size, or torchrun's RANK/WORLD_SIZE when the options are left at 0/1."""
    rank, world = cfg_rank, cfg_world
    if world == 1 and rank == 0 and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
    if world < 1 or not 0 <= rank < world:
        raise SndError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world}")
    return rank, world


AUTO_BATCH_PAIRS = {"cuda": 8, "cpu": 1}  # `--batch-pairs 0`: per device type
AUTO_OPERATOR_CHUNK = {"cuda": 24, "cpu": 1}  # `--operator-chunk 0`: per device type (docs/performance.md)
AUTO_OPERATOR_WORKERS = {"cuda": 2, "cpu": 1}  # `--operator-workers 0`: per device type (docs/performance.md)
AUTO_WRITER = {"cuda": "process", "cpu": "thread"}  # `--writer auto`: per device type (docs/performance.md)


def auto_count(value: int, table: dict[str, int], device: "str | torch.device", flag: str) -> int:
    """A count option as used: the number given, or for 0 (auto) `table`'s entry for the device's type (1 for
    a type it does not name); a negative number is an error naming `flag`."""
    if value < 0:
        raise SndError(f"{flag} must be >= 1, or 0 for auto ({table['cuda']} on CUDA, {table['cpu']} on CPU), got {value}")
    if value:
        return value
    return table.get(device_kind(device), 1)


def device_kind(device: "str | torch.device") -> str:
    """"cuda" or "cpu" (or another torch device type) for a --device value, "auto" included."""
    import torch

    name = str(device)
    try:
        return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else torch.device(name).type
    except RuntimeError:  # a bad --device: `resolve_device` reports it when the source is made
        return "cpu"


def resolve_batch_pairs(batch_pairs: int, device: "str | torch.device") -> int:
    """`--batch-pairs` as used: the number given, or for 0 (auto) 8 on CUDA and 1 elsewhere. Why: on the GPU a
    batch of 8 is ~5 % faster than 4 (31.2 vs 29.7 pairs/s, docs/bench/*_graphs_b{8,4}_h100.json), but its
    activations at 576x880 take ~23 GiB: on this repo's 24 GiB CPU machine a batch of 8 was killed for memory,
    while one pair per forward peaked at 7.0 GB (docs/mvsplat.md)."""
    return auto_count(batch_pairs, AUTO_BATCH_PAIRS, device, "--batch-pairs")


def resolve_operator_chunk(chunk: int, device: "str | torch.device") -> int:
    """`--operator-chunk` as used: the number given, or for 0 (auto) 24 on CUDA (a whole batch of 8 pairs x 3
    targets: stage one ran 22.7-23.2 pairs/s against 18.2-19.4 at 8 on an H100, peak memory 8 GiB) and 1 elsewhere.
    Why: one batched render and sort per chunk pays on the GPU, while on CPU a chunk of 9 measured 20-30 % slower
    than one target at a time (bigger sorts; docs/performance.md). The operators are the same for every chunk size."""
    return auto_count(chunk, AUTO_OPERATOR_CHUNK, device, "--operator-chunk")


def resolve_operator_workers(workers: int, device: "str | torch.device") -> int:
    """`--operator-workers` as used: the number given, or for 0 (auto) 2 on CUDA and 1 elsewhere. Why two on the GPU:
    one builder thread spends most of its time in Python and at host syncs while the GPU could run another batch's
    kernels; on an H100 two ran stage one at 28.1 and 24.9 pairs/s against one's 20.9 and 19.8, alternating in one
    process (`docs/bench/pipeline_ab3_h100.jsonl`). On another H100, whose shard writer was the limit, two ran 16.3
    and 18.2 against 17.1 and 19.3, in an order that favoured the later runs (`pipeline_ab4_h100.jsonl`): to be
    timed again. On a CPU the builders' torch ops already use every core."""
    return auto_count(workers, AUTO_OPERATOR_WORKERS, device, "--operator-workers")


def resolve_writer(writer: str, device: "str | torch.device") -> str:
    """`--writer` as used: "thread" or "process", or for "auto" `AUTO_WRITER`'s entry for the device type. Why a
    process on CUDA: the shard writer's zarr work is mostly GIL-holding Python (`writer_process.py`), which there
    competes with the threads that launch MVSplat and the operators' kernels; on an H100 the process took the main
    thread's launch from 16-19 to 13-15 ms per pair and ran stage one at 32.9 and 29.7 pairs/s against the thread's
    28.3 and 30.1, and `snd bench precompute` at 32.6 (`docs/bench/pipeline_ab7_h100.jsonl`). On the CPU the spawn
    costs ~2-3 s per run and the spill copy ~20-30 ms per pair, while both cores are busy anyway
    (`docs/bench/writer_rates_process_cpu.jsonl`)."""
    if writer not in ("auto", "thread", "process"):
        raise SndError(f"--writer must be auto, thread or process, got {writer!r}")
    return AUTO_WRITER.get(device_kind(device), "thread") if writer == "auto" else writer


def resolve_writer_codecs(codecs: str) -> str:
    """`--writer-codecs`, checked: "zarr" (the default) or "zarrs" (zarrs-python installed). Why zarrs is not the
    default: it encodes a shard's inner chunks on several threads and lays them out in the order they finish, so its
    shard files differ from run to run (values and checksums do not); pinned to one thread per call it writes the same
    bytes but was 7x slower than zarr's own pipeline in stage one's writer process (147 against 22 ms per pair, H100,
    `docs/bench/pipeline_ab6_h100.jsonl`). In a writer thread on a host whose writer was the limit it ran stage one at
    29.2 and 30.1 pairs/s against 21.1 and 19.8 (`pipeline_ab5_h100.jsonl`)."""
    import importlib.util

    if codecs not in ("zarr", "zarrs"):
        raise SndError(f"--writer-codecs must be zarr or zarrs, got {codecs!r}")
    if codecs == "zarrs" and importlib.util.find_spec("zarrs") is None:
        raise SndError("--writer-codecs zarrs needs zarrs-python: pip install zarrs (or --writer-codecs zarr)")
    return codecs


PATCH = 14  # DINOv2's patch size, the default of --patch-size (the operators are built for stage two's grids)


def backbone_hw(cfg: PrecomputeConfig) -> tuple[int, int]:
    """Stage two's backbone input size this store is built for (operators and frames)."""
    p = getattr(cfg, "patch_size", PATCH)
    ih = cfg.operator_img_height or cfg.height // p * p
    iw = cfg.operator_img_width or cfg.width // p * p
    if p < 1 or ih % p or iw % p or ih < p or iw < p:
        raise SndError(f"operator input size {ih}x{iw} is not a positive multiple of the patch size {p}",
                       hint=f"pass --operator-img-height/--operator-img-width as multiples of {p}")
    return ih, iw


def frame_spec(cfg: PrecomputeConfig) -> FrameSpec | None:
    """How this run stores frames (None with --images off)."""
    codec = getattr(cfg, "images", "off")
    if codec == "off":
        return None
    if not 1 <= cfg.image_quality <= 100:
        raise SndError(f"--image-quality must be in [1, 100], got {cfg.image_quality}")
    ih, iw = backbone_hw(cfg)
    return FrameSpec(codec=codec, height=ih, width=iw, quality=cfg.image_quality, filter="grad" if codec == "lossless" else "row")


def operator_spec(cfg: PrecomputeConfig) -> OperatorSpec | None:
    """The operator shape/knobs this run stores (None with --no-operator)."""
    if not getattr(cfg, "operator", False):
        return None
    ih, iw = backbone_hw(cfg)
    p = getattr(cfg, "patch_size", PATCH)
    grid = (ih // p, iw // p)
    return OperatorSpec(ctx_hw=grid, out_hw=grid, upsample=cfg.operator_upsample, blend=cfg.operator_blend,
                        protocol=getattr(cfg, "targets_protocol", "official"),
                        row_cap=cfg.operator_row_cap, inst_cap=cfg.operator_inst_cap, patch=p)


def store_header(cfg: PrecomputeConfig, ds: Any, source: ScaffoldSource, enc: Encoding) -> dict:
    src = source.describe()
    op = operator_spec(cfg)
    fs = frame_spec(cfg)
    return {
        "operator": op.to_dict() if op is not None else None,
        "images": fs.to_dict() if fs is not None else None,
        "dataset": {"layout": ds.layout, "split": cfg.split},
        "data_root": str(Path(cfg.data).resolve()),
        "source": {k: v for k, v in src.items() if k != "ckpt"},
        "source_files": {"ckpt": src.get("ckpt")},
        "scaffold": {"height": cfg.height, "width": cfg.width},
        "sampler": {"gap_min": cfg.gap_min, "gap_max": cfg.gap_max, "pairs_per_scene": cfg.pairs_per_scene,
                    "targets_per_pair": cfg.targets_per_pair, "seed": cfg.seed},
        "encoding": enc.to_dict(),
        "config": {k: v for k, v in to_jsonable(cfg).items() if k not in ("rank", "world_size")},
    }


def make_source(cfg: PrecomputeConfig | BenchPrecomputeConfig, *, random_init: bool = False) -> ScaffoldSource:
    return create_source(cfg.source, device=cfg.device, ckpt=cfg.mvsplat_ckpt, config=cfg.mvsplat_config,
                         precision=cfg.precision, near=getattr(cfg, "near", 1.0), far=getattr(cfg, "far", 100.0),
                         random_init=random_init, compile=getattr(cfg, "compile", "off"), pad_to=cfg.batch_pairs)
