"""Stage one: predict the Gaussian scaffold of every context pair once and store it in Zarr shards.

Four threads keep the device busy: a *loader* reads frames (images, masks, depth, cameras; a small pool
decodes in parallel, an LRU keeps frames shared by neighbouring pairs) one batch ahead into a bounded
queue; the *main* thread runs the scaffold source and quantises on the device; the *operator stage* builds
the transfer operators of the batch before, on its own CUDA stream; a *writer* compresses and writes shards,
commits scenes atomically and records them in the manifest (on CUDA in a child process, so zarr's Python does not
share the GIL with the threads launching GPU work). Time the main thread spends blocked on the
loader queue is reported ("the device waited on I/O").

Scenes are split over ranks (``names[rank::world_size]``, from --rank/--world-size or torchrun's RANK /
WORLD_SIZE); a scene that fails (missing file, bad image) is reported by name and the run goes on.

Modules: `settings` (rank, operator spec, header, source), `frames` (loader thread), `launch` (device
thread: launch/land), `operators` (transfer operators of a batch; their thread), `writer` (writer thread), `writer_process`
(the writer in a child process), `report` (summary), `stage` (`run`: the wiring).
"""
from __future__ import annotations

from snd.stages.precompute.frames import FRAME_CACHE, LOAD_THREADS, _Batch
from snd.stages.precompute.launch import _land, _launch
from snd.stages.precompute.report import Summary, print_summary, record_run
from snd.stages.precompute.settings import PATCH, make_source, operator_spec, resolve_rank, store_header
from snd.stages.precompute.stage import run

__all__ = ["FRAME_CACHE", "LOAD_THREADS", "PATCH", "Summary", "_Batch", "_land", "_launch", "make_source", "operator_spec",
           "print_summary", "record_run", "resolve_rank", "run", "store_header"]
