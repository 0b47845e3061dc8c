"""What a stage-one run did: the summary, its JSON record in the store, the printed table."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from snd.cache import manifest as M
from snd.splat.operator_build import ChunkSize

console = Console(stderr=True)


@dataclass
class Summary:
    """What a precompute run did (the CLI exits 1 when `failed` > 0)."""

    scenes_done: int = 0
    scenes_skipped: int = 0
    failed: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    pairs: int = 0
    bytes: int = 0
    frame_bytes: int = 0  # of `bytes`: the stored frames (JPEG/lossless bytes before Zarr's codecs)
    seconds: float = 0.0
    wait_data_s: float = 0.0  # main (device) thread blocked on the loader queue
    wait_write_s: float = 0.0  # main thread blocked on a full writer queue
    batch_times: list[tuple[float, int, float, float]] = field(default_factory=list, repr=False)  # (t_end, pairs, wait_data, wait_write)
    phase_s: dict[str, float] = field(default_factory=dict)  # seconds per phase: main thread (launch, wait_device), operator stage (operators_*), device (device_*)
    phase_log: list[dict[str, float]] = field(default_factory=list, repr=False)  # phase_s (+ writer_busy) after each batch
    operator_chunk: ChunkSize | None = None  # the run's chunk of operator builds (its size as used at the end)
    operator_workers: int = 1  # operator threads as run (1 also when they run inline on the main thread)
    operator_stream: bool = False  # the operators ran on CUDA streams of their own, as run
    operator_priority: bool = False  # ... at a higher priority than MVSplat's, as run
    writer: str = "thread"  # where the shard writer ran ("thread" or "process")
    writer_codecs: str = "zarr"  # the codec pipeline that encoded the shards ("zarr" or "zarrs")

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_pair(self) -> float:
        return self.bytes / 1e6 / self.pairs if self.pairs else 0.0

    @property
    def steady_pairs_per_s(self) -> float | None:
        """pairs/s after the first two batches (compilation, CUDA-graph recording and warm-up excluded)."""
        bt = self.batch_times
        if len(bt) < 4:
            return None
        span = bt[-1][0] - bt[2][0]
        return sum(b[1] for b in bt[3:]) / span if span > 0 else None


def record_run(out: Path, s: Summary, rank: int, world: int, device: torch.device, scenes: list[str]) -> Path:
    """What this worker did, as JSON in the store (``_snd/runs/<time>-rank<r>of<w>.json``): with several
    workers writing one store, each leaves its own figures (pairs/s per worker; their sum is the total)."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    path = M.meta_dir(out) / "runs" / f"{stamp}-rank{rank}of{world}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    M.write_json_atomic(path, {
        "rank": rank, "world_size": world, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "scenes": scenes, "scenes_done": s.scenes_done, "scenes_skipped": s.scenes_skipped, "failed": s.failed,
        "pairs": s.pairs, "bytes": s.bytes, "seconds": s.seconds, "pairs_per_s": s.pairs_per_s,
        "steady_pairs_per_s": s.steady_pairs_per_s, "wait_data_s": s.wait_data_s, "wait_write_s": s.wait_write_s,
        "writer": s.writer, "writer_codecs": s.writer_codecs, "phase_s": s.phase_s})
    return path


def print_summary(s: Summary, out: Path) -> None:
    from rich.table import Table

    t = Table(title=f"snd precompute -> {out}")
    for col in ("scenes done", "skipped", "failed", "pairs", "pairs/s", "MB written", "MB/pair", "waited on data"):
        t.add_column(col, justify="right")
    t.add_row(str(s.scenes_done), str(s.scenes_skipped), str(s.failed), str(s.pairs), f"{s.pairs_per_s:.2f}",
              f"{s.bytes / 1e6:.1f}", f"{s.mb_per_pair:.2f}", f"{s.wait_data_s:.1f} s")
    console.print(t)
    for name, msg in s.failures.items():
        console.print(f"[red]failed[/] {name}: {msg}")
