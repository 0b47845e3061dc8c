"""Stage one's writer: compresses and writes shards, commits scenes atomically, records them.

Two forms with one interface (`q`, `busy_s`, `start`, `join`, `is_alive`): `_Writer`, a thread, and
`_WriterProcess`, the same work in a child process. Why a process: zarr's codec pipeline runs each chunk
through asyncio callbacks, ~90 ms of GIL-holding Python per pair on the CI machine
(`docs/bench/writer_rates_cpu.jsonl`), and on CUDA it shares the one GIL with the main thread and two
operator threads that launch kernels; on two of three H100 hosts the writer thread was stage one's limit
(docs/performance.md). In a process it has a GIL of its own; the batches cross a pipe (one pickled copy).
"""
from __future__ import annotations

import logging
import multiprocessing as mp
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
        self.codecs = "zarr" if cfg.writer_codecs == "auto" else cfg.writer_codecs  # stage one resolves "auto" first
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


def _serve(ops, events, out: Path, cfg: PrecomputeConfig, enc: Encoding) -> None:
    """The child process of `_WriterProcess`: a `_Writer` run op by op, its commits, failures and busy time sent
    back. The parent gone (a kill) closes the pipe: the scenes in the making are removed, as after a killed thread.
    With zarrs, one encoding thread per call (`settings.resolve_writer_codecs`: the same bytes every run); the
    writer's pool still encodes the arrays of a shard at once."""
    if cfg.writer_codecs == "zarrs":
        import zarr

        zarr.config.set({"threading.max_workers": 1})  # this process only: it writes and never reads
    w = _Writer(out, cfg, enc, lambda n, rec: events.send(("commit", n, rec)), lambda n, msg: events.send(("fail", n, msg)))
    while True:
        try:
            op = ops.recv()
        except (EOFError, OSError):
            for sw in w.writers.values():
                sw.abort()
            return
        if op[0] == "stop":
            events.send(("stopped", w.busy_s))
            return
        w.step(op)
        events.send(("busy", w.busy_s))


class _WriterProcess:
    """`_Writer`'s work in a spawned child process (``--writer process``); the same store, the same callbacks,
    called in this process (a forwarding thread sends the queue's operations down a pipe, a listening thread
    receives what the child reports). If the child dies, every scene not yet committed is recorded as failed
    (rerun to redo them) and the run ends with them listed, as for any failed scene."""

    def __init__(self, out: Path, cfg: PrecomputeConfig, enc: Encoding, on_commit: Callable[[str, dict], None],
                 on_fail: Callable[[str, str], None], maxsize: int = 2):
        self.q: queue.Queue = queue.Queue(maxsize=maxsize)
        self.on_commit, self.on_fail = on_commit, on_fail
        self.busy_s = 0.0
        ctx = mp.get_context("spawn")  # never fork a process that holds CUDA and threads
        ops_r, self._ops = ctx.Pipe(duplex=False)
        self._events, ev_w = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_serve, args=(ops_r, ev_w, Path(out), cfg, enc), name="snd-writer", daemon=True)
        self._child_ends = (ops_r, ev_w)
        self._open: set[str] = set()  # scenes started and not yet committed or failed
        self._lock = threading.Lock()
        self._dead = threading.Event()
        self._threads = [threading.Thread(target=self._forward, name="snd-writer-send", daemon=True),
                         threading.Thread(target=self._listen, name="snd-writer-recv", daemon=True)]

    def start(self) -> None:
        self.proc.start()
        for c in self._child_ends:  # the child holds its ends now: an exit of either side closes the pipes
            c.close()
        for t in self._threads:
            t.start()

    def _forward(self) -> None:
        while True:
            op = self.q.get()
            if op[0] == "start":
                with self._lock:
                    self._open.add(op[1])
            if not self._dead.is_set():
                try:
                    self._ops.send(op)
                except (BrokenPipeError, OSError):
                    self._died()
            if self._dead.is_set() and op[0] == "start":
                self._died()  # a scene that arrives after the child's death fails at once
            if op[0] == "stop":
                return

    def _listen(self) -> None:
        while True:
            try:
                ev = self._events.recv()
            except (EOFError, OSError):
                self._died()
                return
            if ev[0] == "stopped":
                self.busy_s = ev[1]
                return
            if ev[0] == "busy":
                self.busy_s = ev[1]
                continue
            with self._lock:
                self._open.discard(ev[1])
            (self.on_commit if ev[0] == "commit" else self.on_fail)(ev[1], ev[2])

    def _died(self) -> None:
        """The child is gone: fail what it held (once per scene)."""
        self._dead.set()
        self.proc.join(timeout=5)
        with self._lock:
            lost, self._open = sorted(self._open), set()
        for name in lost:
            self.on_fail(name, f"writer process died (exit code {self.proc.exitcode}); rerun to redo the scene")

    def join(self, timeout: float | None = None) -> None:
        for t in self._threads:
            t.join(timeout)
        self.proc.join(timeout)

    def is_alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)


def make_writer(kind: str, out: Path, cfg: PrecomputeConfig, enc: Encoding, on_commit: Callable[[str, dict], None],
                on_fail: Callable[[str, str], None]) -> "_Writer | _WriterProcess":
    """The writer of `kind` ("thread" or "process", as resolved by `settings.resolve_writer`)."""
    return (_WriterProcess if kind == "process" else _Writer)(out, cfg, enc, on_commit, on_fail)


class _suppress_full:
    def __enter__(self) -> None:
        return None

    def __exit__(self, et, e, tb) -> bool:
        return et is queue.Full
