"""Stage one's shard writer in a child process (``--writer process``): `_Writer`'s work with a GIL of its own.

Why: zarr's codec pipeline runs each chunk through asyncio callbacks, ~90 ms of GIL-holding Python per pair on the CI
machine (`docs/bench/writer_rates_cpu.jsonl`), and on CUDA that shares the one GIL with the main thread and two operator
threads launching kernels; on two of three H100 hosts the writer thread was stage one's limit (docs/performance.md).

How the batches cross: not through the pipe. A pipe moves 64 KiB per system call, and between calls the sending
and the receiving thread each take the GIL back; beside threads that hold it, each take can wait a whole switch
interval (5 ms), so a 56 MB batch crawled (7.9 pairs/s on an H100, `docs/bench/pipeline_ab6_h100.jsonl`). A batch's
arrays are instead written into one spill file on a RAM-backed folder (/dev/shm where there is one), one `write`
per array, and the pipe carries only their names, dtypes, shapes and offsets; the child reads each array back with
one `readinto` and deletes the file.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from snd.cache.schema import Encoding
from snd.pipeline.config import PrecomputeConfig
from snd.stages.precompute.writer import _Writer


SHM = Path("/dev/shm")
SHM_FREE_MIN = 2 << 30  # /dev/shm is used only with this much free: ~3 batches in flight, 56 MB each at 576x880


def _spill_dir(ram: bool = True) -> Path:
    """A private folder for this run's spill files: in RAM (/dev/shm) where the system has one with room (a container's
    default is 64 MB), else in the temp folder (on disk, through the page cache)."""
    ok = ram and SHM.is_dir() and os.access(SHM, os.W_OK) and shutil.disk_usage(SHM).free >= SHM_FREE_MIN
    return Path(tempfile.mkdtemp(prefix="snd-writer-", dir=SHM if ok else None))


def spill(fields: dict, path: Path) -> tuple[dict, list]:
    """Write a batch's arrays (``fields[name]``, and ``fields["frames"][index]``) into the file `path`, one write each;
    returns (what is not an array, as is; [(name, frame index or None, dtype, shape, offset)])."""
    rest, index = {}, []

    def put(f, name: str, k: int | None, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a)
        index.append((name, k, a.dtype.str, a.shape, f.tell()))
        if a.nbytes:
            f.write(memoryview(a.reshape(-1)).cast("B"))

    with open(path, "wb") as f:
        for name, v in fields.items():
            if name == "frames":
                rest["frames"] = {}
                for k, a in v.items():
                    put(f, name, k, a)
            elif isinstance(v, np.ndarray):
                put(f, name, None, v)
            else:
                rest[name] = v
    return rest, index


def unspill(rest: dict, index: list, path: Path) -> dict:
    """The batch `spill` wrote (the file is deleted once read)."""
    fields = dict(rest)
    with open(path, "rb") as f:
        for name, k, dtype, shape, off in index:
            a = np.empty(shape, np.dtype(dtype))
            if a.nbytes:
                f.seek(off)
                if f.readinto(memoryview(a.reshape(-1)).cast("B")) != a.nbytes:
                    raise OSError(f"spill file {path} is short: {name} at {off}")
            if k is None:
                fields[name] = a
            else:
                fields.setdefault(name, {})[k] = a
    os.unlink(path)
    return fields


def _serve(ops, events, out: Path, cfg: PrecomputeConfig, enc: Encoding, spill_dir: Path) -> None:
    """The child process: a `_Writer` run op by op, its commits, failures and busy time sent back. The parent gone (a
    kill) closes the pipe: the scenes in the making are removed, as after a killed thread, and so is the spill folder
    (in RAM: nobody else would free it), and the disk folder the parent moved to if RAM ran out."""
    w = _Writer(out, cfg, enc, lambda n, rec: events.send(("commit", n, rec)), lambda n, msg: events.send(("fail", n, msg)))
    spill_dirs = {spill_dir}
    while True:
        try:
            op = ops.recv()
        except (EOFError, OSError):
            for sw in w.writers.values():
                sw.abort()
            for d in spill_dirs:
                shutil.rmtree(d, ignore_errors=True)
            return
        if op[0] == "stop":
            events.send(("stopped", w.busy_s))
            return
        if op[0] == "add_spilled":
            _, scene, rest, index, path = op
            spill_dirs.add(Path(path).parent)
            op = ("add", scene, unspill(rest, index, Path(path)))
        w.step(op)
        events.send(("busy", w.busy_s))


class _WriterProcess:
    """`_Writer`'s work in a spawned child process; the same store, the same callbacks, called in this process (a
    forwarding thread spills each batch and sends the queue's operations down a pipe, a listening thread receives
    what the child reports). If the child dies, every scene not yet committed is recorded as failed (rerun to redo
    them) and the run ends with them listed, as for any failed scene."""

    def __init__(self, out: Path, cfg: PrecomputeConfig, enc: Encoding, on_commit: Callable[[str, dict], None],
                 on_fail: Callable[[str, str], None], maxsize: int = 2):
        self.q: queue.Queue = queue.Queue(maxsize=maxsize)
        self.on_commit, self.on_fail = on_commit, on_fail
        self.busy_s = 0.0
        ctx = mp.get_context("spawn")  # never fork a process that holds CUDA and threads
        ops_r, self._ops = ctx.Pipe(duplex=False)
        self._events, ev_w = ctx.Pipe(duplex=False)
        self._spill = _spill_dir()
        self._old_spills: list[Path] = []  # a /dev/shm folder left for disk when RAM ran out
        self.proc = ctx.Process(target=_serve, args=(ops_r, ev_w, Path(out), cfg, enc, self._spill), name="snd-writer",
                                daemon=True)
        self._child_ends = (ops_r, ev_w)
        self._n = 0  # batches spilled
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
                if op[0] == "add":
                    op = self._spilled(op)
                try:
                    if op is not None:
                        self._ops.send(op)
                except (BrokenPipeError, OSError):
                    self._died()
            if self._dead.is_set() and op[0] == "start":
                self._died()  # a scene that arrives after the child's death fails at once
            if op[0] == "stop":
                return

    def _spilled(self, op: tuple) -> tuple | None:
        """The "add" op as sent: its arrays in a spill file. If RAM runs out, the spill folder moves to disk for
        the rest of the run; if that fails too, the scene fails here (its commit then fails in the child too)."""
        for retry in (True, False):
            path = self._spill / f"{self._n}.bin"
            self._n += 1
            try:
                return ("add_spilled", op[1], *spill(op[2], path), str(path))
            except OSError as e:
                path.unlink(missing_ok=True)
                if not (retry and self._spill.parent == SHM):
                    self.on_fail(op[1], f"could not hand a batch to the writer process through {path}: {e}")
                    return None
                self._old_spills.append(self._spill)
                self._spill = _spill_dir(ram=False)

    def _listen(self) -> None:
        while True:
            try:
                ev = self._events.recv()
            except (EOFError, OSError):
                self._died()
                self._clean()
                return
            if ev[0] == "stopped":
                self.busy_s = ev[1]
                self._clean()
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
        self._clean()

    def _clean(self) -> None:
        """Remove the spill folders (what a dead child left unread); the child stopped or is gone. Also called by
        the listening thread when the child reports its stop, so an error in stage one (which joins nothing) leaves no
        RAM behind."""
        for d in (*self._old_spills, self._spill):
            shutil.rmtree(d, ignore_errors=True)

    def is_alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)


def make_writer(kind: str, out: Path, cfg: PrecomputeConfig, enc: Encoding, on_commit: Callable[[str, dict], None],
                on_fail: Callable[[str, str], None]) -> "_Writer | _WriterProcess":
    """The writer of `kind` ("thread" or "process", as resolved by `settings.resolve_writer`)."""
    return (_WriterProcess if kind == "process" else _Writer)(out, cfg, enc, on_commit, on_fail)
