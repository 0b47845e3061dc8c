"""The transfer operators of a landed batch (`snd.splat.operator`), built from the decoded stored scaffold, on
a thread of their own between the main (device) thread and the writer."""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import fields as dc_fields
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from snd.cache.encode import decode_scaffold
from snd.cache.opcodec import encode_operator_jobs
from snd.cache.schema import Encoding, OperatorSpec

if TYPE_CHECKING:
    from snd.splat.operator import TransferOperator
    from snd.splat.operator_build import ChunkSize
    from snd.stages.precompute.frames import _Batch

log = logging.getLogger(__name__)
FP16_MAX = 65504.0  # coefficients are stored as float16: a larger one would be read back as inf
TARGET_KEYS = ("tgt_index", "tgt_mask", "tgt_K", "tgt_c2w")  # the [B, T, ...] per-target arrays of a batch


class _Phases:
    """Seconds the operator stage spends per phase (the current stream synced at each boundary: every phase ends
    in a device-to-host copy anyway, so the syncs cost nothing and the split is exact). Only the current
    stream: a device-wide sync would also wait for MVSplat's next batch on the other stream."""

    lock = threading.Lock()  # several operator workers add into one dict

    def __init__(self, device: torch.device, into: dict[str, float]):
        self.device, self.into, self.t = device, into, time.perf_counter()

    def mark(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        now = time.perf_counter()
        with self.lock:
            self.into[name] = self.into.get(name, 0.0) + now - self.t
        self.t = now


def _build_operators(fields: dict[str, np.ndarray], b: _Batch, enc: Encoding, spec: OperatorSpec,
                     dev: torch.device, ph: _Phases | None = None, *, chunk: int | ChunkSize = 8,
                     device_fields: dict[str, torch.Tensor] | None = None) -> dict[str, np.ndarray]:
    """Transfer operators of every (pair, target slot) of the batch, built together
    (`snd.splat.operator_build.build_operators`, `chunk` targets at a time, a `ChunkSize` that shrinks when
    a chunk runs out of GPU memory) from the *decoded* stored scaffold, so that stage two's operator path
    equals its render path on exactly what the cache holds. `device_fields`: the same stored fields already
    on `dev` (stage one's quantiser output), decoded instead of `fields`' copies (the same integers)."""
    from snd.splat.gaussians import PixelGaussians
    from snd.splat.operator import build_operators
    from snd.train.distiller import rigid_inverse

    # host arrays go up without waiting (`non_blocking`): a blocking copy waits for every kernel on the stream
    up = lambda a, dtype=None: torch.from_numpy(a).to(dev, dtype, non_blocking=True)  # noqa: E731
    K, c2w = up(b.ctx_K), up(b.ctx_c2w)
    src = device_fields if device_fields is not None else fields
    dec = {k: v for k, v in src.items() if k in ("depth", "offset", "quats", "scales", "opacity", "offset_range", "scale_range")}
    means, quats, scales, opac = decode_scaffold(dec, K, c2w, enc=enc, device=dev)
    if ph is not None:
        ph.mark("operators_decode")
    ex = b.extra
    B, T = ex["tgt_index"].shape
    bi, ti = np.nonzero(ex["tgt_index"] >= 0)  # the jobs: (pair, target slot) with a target
    ops = build_operators(
        [PixelGaussians(means[i], quats[i], scales[i], opac[i]) for i in range(B)],
        up(ex["ctx_mask"].astype(np.int64)),
        up(ex["tgt_mask"][bi, ti].astype(np.int64)),
        up(ex["tgt_K"][bi, ti], torch.float32),
        rigid_inverse(up(ex["tgt_c2w"][bi, ti], torch.float32)),  # [J, 4, 4], one call
        torch.from_numpy(bi), spec.ctx_hw, spec.out_hw, upsample=spec.upsample, blend=spec.blend,
        blend_weight=spec.blend_weight, protocol=spec.protocol, row_cap=spec.row_cap, inst_cap=spec.inst_cap,
        chunk=chunk)
    if ph is not None:
        ph.mark("operators")
    ops, bi, ti, targets = _drop_nonfinite(ops, bi, ti, ex, b.scene)
    out = encode_operator_jobs(ops, torch.from_numpy(bi * T + ti), B, T, spec)
    if ph is not None:
        ph.mark("operators_to_host")
    return {**out, **targets}


def _drop_nonfinite(ops: TransferOperator, bi: np.ndarray, ti: np.ndarray, ex: dict,
                    scene: str) -> tuple[TransferOperator, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Leave out the targets whose operator holds a NaN/inf or a coefficient float16 cannot store.

    Why: such an operator gives a non-finite loss target on every step that draws it, which the training
    loop can only skip; a store must never hold one. The target is dropped from its pair (the pair's other
    targets move up, as the reader expects targets in the first slots) with a warning naming the scene and
    frames, so the store stays usable and the cause (a builder bug or a broken scaffold) can be examined.
    Returns (kept jobs' operators, their pair and new slot indices, the batch's per-target arrays when a
    target was dropped, else {}). One device reduction and one host sync per batch."""
    finite = [(torch.isfinite(x) & (x.abs() <= FP16_MAX)).flatten(1).all(1) for x in (ops.vals, ops.inst, ops.inst_w)]
    ok = torch.stack(finite).all(0).cpu().numpy()
    if ok.all():
        return ops, bi, ti, {}
    for b, t in zip(bi[~ok], ti[~ok]):
        log.warning("scene %s: the transfer operator of the pair of frames %s to target frame %d has non-finite or "
                    "out-of-range coefficients; that target is left out of the store", scene,
                    ex["ctx_index"][b].tolist(), int(ex["tgt_index"][b, t]))
    keep = torch.from_numpy(ok).to(ops.cols.device)
    ops = type(ops)(**{f.name: getattr(ops, f.name)[keep] for f in dc_fields(ops)})
    bi, ti = bi[ok], ti[ok]
    new_ti = np.zeros_like(ti)
    targets = {k: np.zeros_like(ex[k]) for k in TARGET_KEYS}
    targets["tgt_index"][:] = -1
    targets["tgt_c2w"][:] = np.eye(4)
    for n, (b, t) in enumerate(zip(bi, ti)):
        new_ti[n] = int((bi[:n] == b).sum())  # kept targets of the pair before this one, in slot order
        for k in TARGET_KEYS:
            targets[k][b, new_ti[n]] = ex[k][b, t]
    return ops, bi, new_ti, targets


class OperatorStage:
    """Adds the operators to each landed batch and hands it to the writer; scene events (start, commit, abort)
    pass through in order, so the writer sees every batch of a scene before its commit.

    Why a thread of its own (`threaded`, the default): the builder's host code and its syncs take longer than
    MVSplat's launch. On the main thread they kept it from queueing the next batch's network (at chunk 8 its
    phases added up to the whole period, 18.5 pairs/s on an H200, docs/performance.md). Here the main thread only
    launches and lands; the builder works on the batch before, on its own CUDA stream. Measured on an H100: a
    little faster at chunk 8 (18.2 / 19.4 against 16.6 / 18.8 pairs/s), level at today's whole-batch chunk (27.4
    both). Unthreaded (`--no-operator-thread`), `submit` does the same work inline; the stores are identical.

    The stream of their own (`--operator-stream`): queued behind the next batch's MVSplat on the main stream, the
    builder's first host sync would wait for that whole network. The only device data crossing the two streams is
    the quantiser's output (`device_fields`), which `record_stream` keeps from being reused on the main stream
    before the operators' kernels have read it.

    `workers` > 1 (`--operator-workers`): that many threads, each on a stream of its own, build
    successive batches at once, and whichever finishes hands on every finished item in submission order. Why:
    the one builder thread is stage one's critical path (its phases take ~34 ms per pair, its kernels ~6-8; the
    rest is Python and waits at its host syncs) while the GPU idles 4-6 ms per pair (docs/performance.md). A
    second builder fills those gaps: on an H100, 28.1 and 24.9 pairs/s against one builder's 20.9 and 19.8, so
    stage one's auto is 2 on CUDA (`settings.resolve_operator_workers`, which also gives the figures against it).

    on_added(scene, n_pairs, info): called after a batch went to the writer (progress, timings, tests' hooks), in
    submission order, from a worker's thread. An exception in a worker (a builder bug, a hook's error) stops the
    stage; `submit` and `finish` raise it in the main thread."""

    def __init__(self, writer_q: queue.Queue, enc: Encoding, spec: OperatorSpec | None, dev: torch.device,
                 phases: dict[str, float], *, chunk: int | ChunkSize, stream_priority: int | None,
                 on_added: Callable[[str, int, dict], None], threaded: bool = True, workers: int = 1):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.writer_q, self.enc, self.spec, self.dev, self.phases = writer_q, enc, spec, dev, phases
        self.chunk, self.on_added, self.threaded = chunk, on_added, threaded
        self.workers = workers if threaded else 1
        # a CUDA stream per worker at `stream_priority` (lower is higher; None: the current stream, as on the CPU)
        self.streams = [torch.cuda.Stream(dev, priority=stream_priority) if stream_priority is not None else None
                        for _ in range(self.workers)]
        self.q: queue.Queue = queue.Queue(maxsize=self.workers)  # one batch waiting per worker
        self.error: BaseException | None = None
        self.threads = [threading.Thread(target=self._work, args=(self.streams[i],), name=f"snd-operators-{i}",
                                         daemon=True) for i in range(self.workers)] if threaded else []
        self._lock = threading.Lock()  # the emission of finished items, in order
        self._ready: dict[int, tuple] = {}
        self._next = 0  # the next item to hand on
        self._seq = 0  # the next item submitted
        self._stopping = False

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def alive(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def submit(self, op: tuple) -> None:
        """("add", scene, batch, fields, info, device_fields) or a writer event; blocks while every worker has a
        batch waiting."""
        seq, self._seq = self._seq, self._seq + 1
        if not self.threaded:
            self._emit(seq, self._do(op, self.streams[0]))
            return
        self._put((seq, op))

    def finish(self) -> None:
        """Wait until everything submitted went to the writer; raise the stage's error if it failed."""
        if self.alive():
            for _ in self.threads:
                self._put((-1, ("stop",)))
            for t in self.threads:
                t.join()
        self._raise()

    def stop_now(self, timeout: float = 300.0) -> None:
        """After an error (or at the end, where it finds the workers gone): drop what is queued, let each worker
        finish the batch it holds without handing it on, and join them. Why join: a worker killed inside a torch
        call at interpreter exit aborts the process ("terminate called without an active exception") instead of
        letting the error's message and exit status through (seen once at the end of a pytest run, before this join;
        not reproduced in a plain process)."""
        self._stopping = True
        while True:
            try:
                self.q.get_nowait()
            except queue.Empty:
                break
        for _ in self.threads:  # the main thread is the only producer: after the drain these fit
            with contextlib.suppress(queue.Full):
                self.q.put_nowait((-1, ("stop",)))
        for t in self.threads:
            t.join(timeout)

    def _put(self, item: tuple) -> None:
        """Queue `item` for the workers, raising their error instead of waiting on a queue no one empties."""
        while True:
            self._raise()
            try:
                self.q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _work(self, stream: torch.cuda.Stream | None) -> None:
        while True:
            seq, op = self.q.get()
            if op[0] == "stop" or self.error is not None or self._stopping:
                return
            try:
                self._emit(seq, self._do(op, stream))
            except BaseException as e:  # noqa: BLE001 - handed to the main thread, which raises it
                self.error = e
                return

    def _do(self, op: tuple, stream: torch.cuda.Stream | None) -> tuple:
        """An item as the writer gets it (the operators added to a batch's fields; events as they are)."""
        if op[0] != "add":
            return op
        _, scene, batch, fields, info, device_fields = op
        if self.spec is not None:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                if stream is not None and device_fields is not None:
                    for t in device_fields.values():  # made on the main stream: not reused there before this
                        t.record_stream(stream)  # stream's kernels that read them have run
                ph = _Phases(self.dev, self.phases)
                ph.mark("operators_wait")  # the stream's earlier work (0 on a stream of their own)
                fields.update(_build_operators(fields, batch, self.enc, self.spec, self.dev, ph, chunk=self.chunk,
                                               device_fields=device_fields))
        return ("add", scene, fields, batch, info)

    def _emit(self, seq: int, item: tuple) -> None:
        """Hand on every finished item from the next in submission order (by the worker that completes the run)."""
        with self._lock:
            if self._stopping:
                return
            self._ready[seq] = item
            while self._next in self._ready:
                it = self._ready.pop(self._next)
                self._next += 1
                if it[0] != "add":
                    self.writer_q.put(it)
                    continue
                _, scene, fields, batch, info = it
                tw = time.perf_counter()
                self.writer_q.put(("add", scene, fields))
                info["wait_write"] = time.perf_counter() - tw
                self.on_added(scene, len(batch.ctx_K), info)
