"""Run-directory logging: TensorBoard scalars, a metrics.jsonl for scripts, rich progress with ETA.

Only rank 0 logs (the other ranks get a logger whose methods do nothing). Values reach the logger one
`log_every` window late, read back without a host sync (`snd.train.windows`), and all of them before a
checkpoint and at the end.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

__all__ = ["RunLogger", "METRICS_FILE", "SKIPPED_FILE", "TB_DIR", "announce_targets"]

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"
SKIPPED_FILE = "skipped.jsonl"  # one row per skipped step: its items' stream positions and scenes, per rank
TB_DIR = "tb"


class RunLogger:
    """TensorBoard + metrics.jsonl + progress bar for one run (no-ops where `active` is False)."""

    def __init__(self, run_dir: Path, *, total: int, start: int, active: bool, progress: bool = True):
        self.active = active
        self.run_dir = Path(run_dir)
        self._tb = None
        self._progress = None
        self._task = None
        if not active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = (self.run_dir / METRICS_FILE).open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / TB_DIR), purge_step=start + 1 if start else None)
        except Exception as e:  # noqa: BLE001 - TensorBoard is optional; metrics.jsonl still has everything
            log.warning("TensorBoard logging disabled: %s", e)
        if progress:
            self._progress = Progress(
                TextColumn("[bold]distill"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=Console(stderr=True),
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("distill", total=total, completed=start, info="")

    def steps(self, rows: list[dict]) -> None:
        """Per-step rows (step, loss, lr, it/s and the host's ms per step blocked on the loader over the last logging
        window, step path, skipped 0/1) into metrics.jsonl."""
        if not self.active:
            return
        for r in rows:
            self._metrics.write(json.dumps(r) + "\n")
        self._metrics.flush()

    def skipped(self, rows: list[dict]) -> None:
        """Rows of skipped steps (step, rank, stream positions, scenes) into skipped.jsonl."""
        if not self.active or not rows:
            return
        with (self.run_dir / SKIPPED_FILE).open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.active:
            return
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)
        if self._progress is not None:
            info = f"loss {values.get('train/loss', float('nan')):.4f}  {values.get('perf/it_per_s', 0):.1f} it/s"
            self._progress.update(self._task, completed=step, info=info)

    def text(self, tag: str, value: str, step: int) -> None:
        """A text value in TensorBoard (e.g. the step path; metrics.jsonl carries it on every row)."""
        if self.active and self._tb is not None:
            self._tb.add_text(tag, value, step)

    def close(self) -> None:
        if not self.active:
            return
        if self._progress is not None:
            self._progress.stop()
        if self._tb is not None:
            self._tb.close()
        self._metrics.close()


def announce_targets(run_dir: Path, cfg, batch: dict, *, fast: bool, fast_why: str, active: bool) -> dict:
    """Say which targets protocol and which target path (fast / operator / render) this run uses and why,
    on stderr and in the run's config.json (top-level ``"targets"``; `load_config` reads only ``"config"``).

    Why: the protocol and the path decide what the loss is and how fast a step is; a user comparing two
    runs must be able to see both without reading code. Returns the recorded dict."""
    from snd.data.formats import write_json
    from snd.errors import SndError
    from snd.train.checkpoint import CONFIG_FILE
    from snd.train.data import operator_decision

    stored = "op_cols" in batch and cfg.targets != "render"
    try:
        from snd.cache.manifest import read_header

        _, store_why = operator_decision(cfg, read_header(cfg.shards))
    except (SndError, OSError, ValueError, KeyError):
        store_why = "the stream carries operators" if stored else "the stream carries no operators"
    if fast:
        path, why = "fast", f"{store_why}; whole step replayed as CUDA graphs"
    elif stored:
        path, why = "operator", f"{store_why}; fast path off: {fast_why}"
    else:
        path, why = "render", store_why
    info = {"protocol": cfg.targets_protocol, "path": path, "why": why}
    if active:
        Console(stderr=True).print(f"[bold]targets[/]: protocol {cfg.targets_protocol}, path {path} ({why})")
        cfg_file = Path(run_dir) / CONFIG_FILE
        try:
            raw = json.loads(cfg_file.read_text())
            raw["targets"] = info
            write_json(cfg_file, raw)
        except (OSError, json.JSONDecodeError) as e:
            log.warning("could not record the target path in %s: %s", cfg_file, e)
    return info
