"""Stage one's writer thread: compresses and writes shards, commits scenes atomically, records them.
(`writer_process` runs the same work in a child process.)"""
from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

from snd.cache import manifest as M
from snd.cache.schema import Encoding
from snd.cache.writer import SceneWriter
from snd.pipeline.config import PrecomputeConfig
from snd.stages.precompute.settings import frame_spec, operator_spec

log = logging.getLogger(__name__)


class _Writer(threading.Thread):
    """Executes (start | add | commit | abort) per scene in order; a failing scene is recorded, not fatal."""

    def __init__(self, out: Path, cfg: PrecomputeConfig, enc: Encoding, on_commit: Callable[[str, dict], None],
                 on_fail: Callable[[str, str], None], maxsize: int = 2):
        super().__init__(name="snd-writer", daemon=True)
        self.q: queue.Queue = queue.Queue(maxsize=maxsize)
        self.out, self.cfg, self.enc = out, cfg, enc
        self.codecs = cfg.writer_codecs
        self.on_commit, self.on_fail = on_commit, on_fail
        self.writers: dict[str, SceneWriter] = {}
        self.bad: set[str] = set()
        self.busy_s = 0.0  # seconds spent writing (not waiting for work): how close the writer is to the limit

    def run(self) -> None:
        while True:
            op = self.q.get()
            if op[0] == "stop":
                return
            self.step(op)

    def step(self, op: tuple) -> None:
        """One queued operation, timed into `busy_s` (the thread's loop, or the child process's)."""
        t = time.perf_counter()
        try:
            self._do(op)
        finally:
            self.busy_s += time.perf_counter() - t

    def _do(self, op: tuple) -> None:
        """One queued operation; a failing scene is recorded and aborted, the writer goes on."""
        kind, name = op[0], op[1]
        if name in self.bad and kind != "start":
            return
        try:
            if kind == "start":
                self.bad.discard(name)
                _, _, n_pairs, frame_ids = op
                self.writers[name] = SceneWriter(
                    self.out, name, n_pairs=n_pairs, n_targets=self.cfg.targets_per_pair, height=self.cfg.height,
                    width=self.cfg.width, enc=self.enc, attrs={"frame_ids": frame_ids}, op=operator_spec(self.cfg),
                    frames=frame_spec(self.cfg), codecs=self.codecs)
            elif kind == "add":
                self.writers[name].add(op[2])
            elif kind == "commit":
                rec = self.writers.pop(name).commit()
                M.write_marker(self.out, name, rec)
                M.merge_manifest(self.out)
                self.on_commit(name, rec)
            elif kind == "abort":
                w = self.writers.pop(name, None)
                if w is not None:
                    w.abort()
        except Exception as e:  # noqa: BLE001 - e.g. disk full for one scene: report it, go on
            log.debug("writing scene %s failed:\n%s", name, traceback.format_exc())
            self.bad.add(name)
            w = self.writers.pop(name, None)
            if w is not None:
                w.abort()
            self.on_fail(name, f"writing failed: {type(e).__name__}: {e}")


class _suppress_full:
    def __enter__(self) -> None:
        return None

    def __exit__(self, et, e, tb) -> bool:
        return et is queue.Full
